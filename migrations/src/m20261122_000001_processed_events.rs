//! `processed_events`: the key of every event whose effect committed, per
//! consumer group. Inserted in the same transaction as the effect; a
//! redelivered event finds its key and is acked without a second effect.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum ProcessedEvents {
    Table,
    GroupName,
    EventId,
    Stream,
    EntryId,
    ProcessedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(ProcessedEvents::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(ProcessedEvents::GroupName)
                            .string()
                            .not_null(),
                    )
                    .col(ColumnDef::new(ProcessedEvents::EventId).string().not_null())
                    .col(ColumnDef::new(ProcessedEvents::Stream).string().not_null())
                    .col(ColumnDef::new(ProcessedEvents::EntryId).string().not_null())
                    .col(
                        ColumnDef::new(ProcessedEvents::ProcessedAt)
                            .big_integer()
                            .not_null(),
                    )
                    .primary_key(
                        Index::create()
                            .col(ProcessedEvents::GroupName)
                            .col(ProcessedEvents::EventId),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("processed_events_processed_at")
                    .table(ProcessedEvents::Table)
                    .col(ProcessedEvents::ProcessedAt)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(ProcessedEvents::Table).to_owned())
            .await
    }
}
