//! The worker registry: one row per worker name. A worker process inserts (or takes over) its
//! row at start, heartbeats it with its load, and marks it stopped when it shuts down. A row
//! without a tenant is a shared worker run by the operator; a row with one is a tenant's own
//! self-hosted worker. Labels are a JSON array of strings.

use sea_orm_migration::{prelude::*, schema::*};

use crate::util::{c, index, table, ts, ts_null};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            table("workers")
                // The same string as `task_runs.lease_owner` of the tasks it claims.
                .col(string_len(c("name"), 200).primary_key())
                // Changes at every (re)registration: a process whose row was taken over sees it.
                .col(uuid(c("instance")))
                .col(uuid_null(c("tenant_id")))
                .col(text(c("labels")))
                .col(string_len(c("mode"), 16))
                .col(string_len(c("host"), 255))
                .col(big_integer(c("pid")))
                .col(string_len(c("version"), 64))
                .col(big_integer(c("cpu_millis")))
                .col(big_integer(c("memory_bytes")))
                .col(integer(c("slots")))
                .col(integer(c("running")))
                .col(big_integer(c("cpu_used_millis")))
                .col(big_integer(c("memory_used_bytes")))
                .col(ts("started_at"))
                .col(ts("last_heartbeat_at"))
                .col(ts_null("stopped_at"))
                .to_owned(),
        )
        .await?;
        m.create_index(index("workers_tenant_name", "workers", &["tenant_id", "name"], false)).await?;
        m.create_index(index("workers_heartbeat", "workers", &["last_heartbeat_at"], false)).await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(c("workers")).to_owned()).await
    }
}
