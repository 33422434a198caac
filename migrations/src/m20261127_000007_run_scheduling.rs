//! Scheduling columns of runs:
//!
//! - `rev`, a revision of the run's state: every engine write sets a new random value, so a
//!   process that keeps a run's state in memory knows from the locked run row alone whether that
//!   state is still current, instead of reading every stage and task row again on each event;
//! - `concurrency_key`, the rendered key of a pipeline's `concurrency` limit, with an index to
//!   count a key's active runs and find the next one waiting;
//! - an index to count a tenant's running tasks (the per-tenant limit);
//! - `rung_at` and `rings` on task runs: when a queued task was last pushed to the workers and
//!   how many times, so the reaper pushes a task nobody claimed again with a growing delay
//!   instead of flooding a busy queue with copies;
//! - `lost` on task runs: attempts lost with their worker, run again without using a retry;
//! - `max_running_tasks` on tenants: the operator's override of the per-tenant limit on running
//!   tasks (none: the configured default).

use sea_orm_migration::prelude::*;

use crate::util::{c, index};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(c("runs"))
                .add_column(ColumnDef::new(c("rev")).big_integer().not_null().default(0))
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter().table(c("runs")).add_column(ColumnDef::new(c("concurrency_key")).text().null()).to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(c("task_runs"))
                .add_column(ColumnDef::new(c("rung_at")).timestamp_with_time_zone().null())
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(c("task_runs"))
                .add_column(ColumnDef::new(c("rings")).integer().not_null().default(0))
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(c("task_runs"))
                .add_column(ColumnDef::new(c("lost")).integer().not_null().default(0))
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(c("tenants"))
                .add_column(ColumnDef::new(c("max_running_tasks")).big_integer().null())
                .to_owned(),
        )
        .await?;
        m.create_index(index("runs_concurrency", "runs", &["pipeline_id", "concurrency_key", "status"], false)).await?;
        m.create_index(index("task_runs_tenant_status", "task_runs", &["tenant_id", "status"], false)).await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(Index::drop().name("task_runs_tenant_status").table(c("task_runs")).to_owned()).await?;
        m.drop_index(Index::drop().name("runs_concurrency").table(c("runs")).to_owned()).await?;
        m.alter_table(Table::alter().table(c("tenants")).drop_column(c("max_running_tasks")).to_owned()).await?;
        m.alter_table(Table::alter().table(c("task_runs")).drop_column(c("lost")).to_owned()).await?;
        m.alter_table(Table::alter().table(c("task_runs")).drop_column(c("rings")).to_owned()).await?;
        m.alter_table(Table::alter().table(c("task_runs")).drop_column(c("rung_at")).to_owned()).await?;
        m.alter_table(Table::alter().table(c("runs")).drop_column(c("concurrency_key")).to_owned()).await?;
        m.alter_table(Table::alter().table(c("runs")).drop_column(c("rev")).to_owned()).await?;
        Ok(())
    }
}
