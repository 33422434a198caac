//! Webhook triggers: one signing secret per pipeline. (Cron schedules need no table: each
//! server computes fire times from the pipeline's latest version, and the runs' unique
//! idempotency key makes sure a scheduled time starts one run however many servers fire it.)

use sea_orm_migration::{prelude::*, schema::*};

use crate::util::c;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(c("webhooks"))
                .col(pk_uuid(c("pipeline_id")))
                .col(uuid(c("tenant_id")))
                // The HMAC key itself: the server must be able to compute signatures with it.
                .col(string_len(c("secret"), 100))
                .col(uuid(c("created_by")))
                .col(timestamp_with_time_zone(c("created_at")))
                .to_owned(),
        )
        .await?;
        m.create_index(Index::create().name("webhooks_tenant").table(c("webhooks")).col(c("tenant_id")).to_owned())
            .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(c("webhooks")).to_owned()).await?;
        Ok(())
    }
}
