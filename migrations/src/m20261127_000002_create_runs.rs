//! Runs, their stages and tasks (the engine's record of truth), task logs, and worker registrations.

use sea_orm_migration::{prelude::*, schema::*};

use crate::util::{c, index, table, ts, ts_null};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            table("runs")
                .col(pk_uuid(c("id")))
                .col(uuid(c("tenant_id")))
                .col(uuid(c("pipeline_id")))
                .col(string_len(c("pipeline_name"), 63))
                .col(big_integer(c("version")))
                .col(string_len(c("status"), 16))
                .col(string_len(c("trigger"), 16))
                .col(uuid_null(c("initiator_id")))
                .col(string_len(c("initiator"), 400))
                .col(text(c("params")))
                .col(text(c("plan")))
                .col(string_len_null(c("idempotency_key"), 200))
                .col(uuid_null(c("retry_of")))
                .col(ts("created_at"))
                .col(ts_null("started_at"))
                .col(ts_null("finished_at"))
                .col(ts_null("next_wake_at"))
                .to_owned(),
        )
        .await?;
        m.create_index(index("runs_tenant_created", "runs", &["tenant_id", "created_at"], false)).await?;
        m.create_index(index("runs_idempotency", "runs", &["tenant_id", "idempotency_key"], true)).await?;
        m.create_index(index("runs_wake", "runs", &["next_wake_at"], false)).await?;
        m.create_table(
            table("stage_runs")
                .col(uuid(c("run_id")))
                .col(integer(c("idx")))
                .col(uuid(c("tenant_id")))
                .col(string_len(c("stage_id"), 63))
                .col(string_len(c("status"), 16))
                .col(ts_null("gate_deadline"))
                .primary_key(Index::create().col(c("run_id")).col(c("idx")))
                .to_owned(),
        )
        .await?;
        m.create_table(
            table("task_runs")
                .col(uuid(c("run_id")))
                .col(integer(c("idx")))
                .col(uuid(c("tenant_id")))
                .col(string_len(c("key"), 200))
                .col(string_len(c("task_id"), 63))
                .col(integer(c("stage_idx")))
                .col(string_len(c("status"), 16))
                .col(integer(c("attempt")))
                .col(ts_null("not_before"))
                .col(ts_null("queued_at"))
                .col(ts_null("started_at"))
                .col(ts_null("finished_at"))
                .col(integer_null(c("exit_code")))
                .col(text_null(c("message")))
                .col(text(c("outputs")))
                .col(string_len_null(c("lease_owner"), 200))
                .col(ts_null("lease_expires_at"))
                .col(boolean(c("cancel_requested")))
                .primary_key(Index::create().col(c("run_id")).col(c("idx")))
                .to_owned(),
        )
        .await?;
        m.create_index(index("task_runs_status", "task_runs", &["status", "lease_expires_at"], false)).await?;
        m.create_table(
            table("task_logs")
                .col(uuid(c("run_id")))
                .col(integer(c("task_idx")))
                .col(big_integer(c("chunk")))
                .col(uuid(c("tenant_id")))
                .col(integer(c("attempt")))
                .col(big_integer(c("first_line")))
                .col(integer(c("lines")))
                .col(text(c("body")))
                .col(ts("created_at"))
                .primary_key(Index::create().col(c("run_id")).col(c("task_idx")).col(c("chunk")))
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for t in ["task_logs", "task_runs", "stage_runs", "runs"] {
            m.drop_table(Table::drop().table(Alias::new(t)).to_owned()).await?;
        }
        Ok(())
    }
}
