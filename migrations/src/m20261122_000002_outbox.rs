//! `outbox`: events written inside the application's own transactions,
//! relayed to their stream in `id` order by the outbox relay, which marks
//! each row sent.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum Outbox {
    Table,
    Id,
    Stream,
    EventId,
    EventType,
    Version,
    Data,
    EventKey,
    Headers,
    Traceparent,
    CreatedAt,
    SentAt,
    EntryId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Outbox::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(Outbox::Id)
                            .big_integer()
                            .not_null()
                            .auto_increment()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(Outbox::Stream).string().not_null())
                    .col(
                        ColumnDef::new(Outbox::EventId)
                            .string()
                            .not_null()
                            .unique_key(),
                    )
                    .col(ColumnDef::new(Outbox::EventType).string().not_null())
                    .col(
                        ColumnDef::new(Outbox::Version)
                            .integer()
                            .not_null()
                            .default(1),
                    )
                    .col(ColumnDef::new(Outbox::Data).text().not_null())
                    .col(ColumnDef::new(Outbox::EventKey).string().null())
                    .col(ColumnDef::new(Outbox::Headers).text().null())
                    .col(ColumnDef::new(Outbox::Traceparent).string().null())
                    .col(ColumnDef::new(Outbox::CreatedAt).big_integer().not_null())
                    .col(ColumnDef::new(Outbox::SentAt).big_integer().null())
                    .col(ColumnDef::new(Outbox::EntryId).string().null())
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .if_not_exists()
                    .name("outbox_unsent")
                    .table(Outbox::Table)
                    .col(Outbox::SentAt)
                    .col(Outbox::Id)
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Outbox::Table).to_owned())
            .await
    }
}
