//! Tenants, users, memberships, groups, sessions, API tokens, policies, pipelines, audit log and
//! login throttling.

use sea_orm_migration::{prelude::*, schema::*};

use crate::util::{c, index, table, ts, ts_null};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            table("tenants")
                .col(pk_uuid(c("id")))
                .col(string_len_uniq(c("slug"), 63))
                .col(string_len(c("name"), 200))
                .col(big_integer(c("policy_version")))
                .col(ts("created_at"))
                .to_owned(),
        )
        .await?;
        m.create_table(
            table("users")
                .col(pk_uuid(c("id")))
                .col(string_len_uniq(c("email"), 320))
                .col(text_null(c("password_hash")))
                .col(boolean(c("disabled")))
                .col(ts("created_at"))
                .to_owned(),
        )
        .await?;
        m.create_table(
            table("memberships")
                .col(uuid(c("tenant_id")))
                .col(uuid(c("user_id")))
                .col(text(c("groups")))
                .col(ts("created_at"))
                .primary_key(Index::create().col(c("tenant_id")).col(c("user_id")))
                .to_owned(),
        )
        .await?;
        m.create_index(index("memberships_user", "memberships", &["user_id"], false)).await?;
        m.create_table(
            table("groups")
                .col(uuid(c("tenant_id")))
                .col(string_len(c("name"), 63))
                .col(string_len(c("description"), 500))
                .col(ts("created_at"))
                .primary_key(Index::create().col(c("tenant_id")).col(c("name")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            table("invitations")
                .col(pk_uuid(c("id")))
                .col(uuid(c("tenant_id")))
                .col(uuid(c("user_id")))
                .col(string_len_uniq(c("token_hash"), 64))
                .col(ts("expires_at"))
                .col(ts_null("used_at"))
                .col(ts("created_at"))
                .to_owned(),
        )
        .await?;
        m.create_table(
            table("sessions")
                .col(pk_uuid(c("id")))
                .col(uuid(c("user_id")))
                .col(ts("created_at"))
                .col(ts("expires_at"))
                .col(ts_null("revoked_at"))
                .to_owned(),
        )
        .await?;
        m.create_index(index("sessions_user", "sessions", &["user_id"], false)).await?;
        m.create_table(
            table("refresh_tokens")
                .col(string_len(c("token_hash"), 64).primary_key())
                .col(uuid(c("session_id")))
                .col(ts("created_at"))
                .col(ts_null("used_at"))
                .to_owned(),
        )
        .await?;
        m.create_index(index("refresh_tokens_session", "refresh_tokens", &["session_id"], false)).await?;
        m.create_table(
            table("api_tokens")
                .col(pk_uuid(c("id")))
                .col(uuid(c("tenant_id")))
                .col(string_len(c("name"), 100))
                .col(string_len(c("prefix"), 16))
                .col(string_len_uniq(c("token_hash"), 64))
                .col(uuid(c("created_by")))
                .col(text(c("groups")))
                .col(ts("created_at"))
                .col(ts("expires_at"))
                .col(ts_null("last_used_at"))
                .col(ts_null("revoked_at"))
                .to_owned(),
        )
        .await?;
        m.create_index(index("api_tokens_tenant", "api_tokens", &["tenant_id", "created_at"], false)).await?;
        m.create_table(
            table("policy_versions")
                .col(uuid(c("tenant_id")))
                .col(big_integer(c("version")))
                .col(text(c("text")))
                .col(string_len(c("message"), 1000))
                .col(string_len(c("author"), 400))
                .col(string_len(c("sha256"), 64))
                .col(ts("created_at"))
                .primary_key(Index::create().col(c("tenant_id")).col(c("version")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            table("pipelines")
                .col(pk_uuid(c("id")))
                .col(uuid(c("tenant_id")))
                .col(string_len(c("name"), 63))
                .col(big_integer(c("latest_version")))
                .col(uuid(c("created_by")))
                .col(ts("created_at"))
                .col(ts("updated_at"))
                .col(ts_null("archived_at"))
                .to_owned(),
        )
        .await?;
        m.create_index(index("pipelines_tenant_name", "pipelines", &["tenant_id", "name"], true)).await?;
        m.create_table(
            table("pipeline_versions")
                .col(uuid(c("tenant_id")))
                .col(uuid(c("pipeline_id")))
                .col(big_integer(c("version")))
                .col(text(c("definition")))
                .col(text(c("source")))
                .col(string_len(c("sha256"), 64))
                .col(string_len(c("message"), 1000))
                .col(uuid(c("author_id")))
                .col(string_len(c("author"), 400))
                .col(ts("created_at"))
                .primary_key(Index::create().col(c("pipeline_id")).col(c("version")))
                .to_owned(),
        )
        .await?;
        m.create_index(index("pipeline_versions_tenant", "pipeline_versions", &["tenant_id", "pipeline_id"], false))
            .await?;
        m.create_table(
            table("audit_heads")
                .col(pk_uuid(c("tenant_id")))
                .col(big_integer(c("seq")))
                .col(string_len(c("hash"), 64))
                .to_owned(),
        )
        .await?;
        m.create_table(
            table("audit_events")
                .col(uuid(c("tenant_id")))
                .col(big_integer(c("seq")))
                .col(ts("occurred_at"))
                .col(string_len(c("actor_type"), 16))
                .col(string_len_null(c("actor_id"), 64))
                .col(string_len(c("actor_label"), 400))
                .col(string_len(c("action"), 64))
                .col(string_len(c("resource_type"), 32))
                .col(string_len_null(c("resource_id"), 200))
                .col(big_integer_null(c("resource_version")))
                .col(string_len(c("outcome"), 8))
                .col(text(c("policy_ids")))
                .col(string_len_null(c("source_ip"), 64))
                .col(string_len_null(c("user_agent"), 512))
                .col(string_len_null(c("request_id"), 64))
                .col(text(c("details")))
                .col(string_len(c("prev_hash"), 64))
                .col(string_len(c("hash"), 64))
                .primary_key(Index::create().col(c("tenant_id")).col(c("seq")))
                .to_owned(),
        )
        .await?;
        m.create_index(index("audit_events_time", "audit_events", &["tenant_id", "occurred_at"], false)).await?;
        m.create_table(
            table("login_throttle")
                .col(string_len(c("key"), 400).primary_key())
                .col(big_integer(c("failures")))
                .col(ts("last_failure_at"))
                .col(ts_null("blocked_until"))
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in [
            "login_throttle",
            "audit_events",
            "audit_heads",
            "pipeline_versions",
            "pipelines",
            "policy_versions",
            "api_tokens",
            "refresh_tokens",
            "sessions",
            "invitations",
            "groups",
            "memberships",
            "users",
            "tenants",
        ] {
            m.drop_table(Table::drop().table(Alias::new(t)).to_owned()).await?;
        }
        Ok(())
    }
}
