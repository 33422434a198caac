//! Tenant secrets: AES-256-GCM ciphertexts (base64), never the values.

use sea_orm_migration::{prelude::*, schema::*};

use crate::util::{c, ts};

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(c("secrets"))
                .col(uuid(c("tenant_id")))
                .col(string_len(c("name"), 64))
                .col(big_integer(c("version")))
                .col(string_len(c("nonce"), 32))
                .col(text(c("ciphertext")))
                .col(uuid(c("created_by")))
                .col(ts("created_at"))
                .col(ts("updated_at"))
                .primary_key(Index::create().col(c("tenant_id")).col(c("name")))
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(c("secrets")).to_owned()).await
    }
}
