//! `redstream_leases`: named leases kept in the database itself, so that
//! exactly one process relays a database's outbox.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum RedstreamLeases {
    Table,
    Name,
    Holder,
    ExpiresAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(RedstreamLeases::Table)
                    .if_not_exists()
                    .col(
                        ColumnDef::new(RedstreamLeases::Name)
                            .string()
                            .not_null()
                            .primary_key(),
                    )
                    .col(ColumnDef::new(RedstreamLeases::Holder).string().not_null())
                    .col(
                        ColumnDef::new(RedstreamLeases::ExpiresAt)
                            .big_integer()
                            .not_null(),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(RedstreamLeases::Table).to_owned())
            .await
    }
}
