//! An index over runs by status, pipeline and concurrency key: the reaper looks up the runs
//! queued behind a concurrency limit (`status = 'pending'`) every second, across pipelines.

use sea_orm_migration::prelude::*;

use crate::util::{c, index};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_index(index("runs_status_key", "runs", &["status", "pipeline_id", "concurrency_key"], false)).await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_index(Index::drop().name("runs_status_key").table(c("runs")).to_owned()).await?;
        Ok(())
    }
}
