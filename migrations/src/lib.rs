//! Sluice's database migrations. Every migration runs unchanged on PostgreSQL and SQLite: only
//! portable column types (uuid, text, big integer, boolean, timestamp with time zone) and plain
//! or partial indexes (`WHERE` a column equals a literal, which both databases take) are used;
//! JSON documents are stored as text.

pub use sea_orm_migration::prelude::*;

mod m20261127_000001_create_foundation;
mod m20261127_000002_create_runs;
mod m20261127_000003_create_secrets;
mod m20261127_000004_create_triggers;
mod m20261127_000005_create_workers;
mod m20261127_000006_tenant_http_allow;
mod m20261127_000007_run_scheduling;
mod m20261202_000008_pending_runs;
mod m20261203_000009_partial_task_indexes;
mod util;

/// The ordered list of Sluice's migrations.
pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261127_000001_create_foundation::Migration),
            Box::new(m20261127_000002_create_runs::Migration),
            Box::new(m20261127_000003_create_secrets::Migration),
            Box::new(m20261127_000004_create_triggers::Migration),
            Box::new(m20261127_000005_create_workers::Migration),
            Box::new(m20261127_000006_tenant_http_allow::Migration),
            Box::new(m20261127_000007_run_scheduling::Migration),
            Box::new(m20261202_000008_pending_runs::Migration),
            Box::new(m20261203_000009_partial_task_indexes::Migration),
        ]
    }
}
