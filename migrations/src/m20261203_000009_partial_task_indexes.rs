//! The task indexes cover only the tasks they are looked up by: queued tasks (rung again when
//! nobody claimed them) and running tasks (leases that expired, a tenant's running count).
//! Pending and ended tasks, nearly all of them, are in neither, so a task that ends and the one
//! it lets start change one small index page each instead of the entries of a status index
//! spread over its whole length (on SQLite, every page changed is written and synced with the
//! commit).

use sea_orm_migration::prelude::*;

use crate::util::{c, index};

#[derive(DeriveMigrationName)]
pub struct Migration;

/// Statements that read these indexes spell the status as the literal of the index's
/// condition (`status = 'running'`): a planner uses a partial index only for a query whose
/// condition implies the index's.
const CREATE: [&str; 2] = [
    "CREATE INDEX task_runs_running ON task_runs (tenant_id, lease_expires_at) WHERE status = 'running'",
    "CREATE INDEX task_runs_queued ON task_runs (rung_at) WHERE status = 'queued'",
];

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for name in ["task_runs_status", "task_runs_tenant_status"] {
            m.drop_index(Index::drop().name(name).table(c("task_runs")).to_owned()).await?;
        }
        for sql in CREATE {
            m.get_connection().execute_unprepared(sql).await?;
        }
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        for name in ["task_runs_running", "task_runs_queued"] {
            m.drop_index(Index::drop().name(name).table(c("task_runs")).to_owned()).await?;
        }
        m.create_index(index("task_runs_status", "task_runs", &["status", "lease_expires_at"], false)).await?;
        m.create_index(index("task_runs_tenant_status", "task_runs", &["tenant_id", "status"], false)).await?;
        Ok(())
    }
}
