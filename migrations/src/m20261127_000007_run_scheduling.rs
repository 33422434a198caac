//! A revision counter on runs: every engine write of a run's state increments it, so a process
//! that keeps a run's state in memory knows from the locked run row alone whether that state is
//! still current, instead of reading every stage and task row again on each event.

use sea_orm_migration::prelude::*;

use crate::util::c;

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
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(Table::alter().table(c("runs")).drop_column(c("rev")).to_owned()).await?;
        Ok(())
    }
}
