//! The tenant's HTTP allow-list: networks (CIDRs, canonical text) that the tenant's `http:`
//! tasks may reach although they are private, loopback or link-local. A JSON array of strings;
//! empty (the default) allows public addresses only.

use sea_orm_migration::prelude::*;

use crate::util::c;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(c("tenants"))
                .add_column(ColumnDef::new(c("http_allow")).text().not_null().default("[]"))
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(Table::alter().table(c("tenants")).drop_column(c("http_allow")).to_owned()).await?;
        Ok(())
    }
}
