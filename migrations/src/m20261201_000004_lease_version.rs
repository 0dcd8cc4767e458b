//! `redstream_leases.version`: a counter the holder raises at every renewal.
//! Contenders decide that a lease is stale when its version has not moved
//! for a whole lifetime on their own monotonic clock, so no decision
//! compares the clocks of two processes or hosts. The version a holder got
//! is also its fencing token.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub(crate) struct Migration;

#[derive(DeriveIden)]
enum RedstreamLeases {
    Table,
    Version,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(RedstreamLeases::Table)
                    .add_column(
                        ColumnDef::new(RedstreamLeases::Version)
                            .big_integer()
                            .not_null()
                            .default(0),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .alter_table(
                Table::alter()
                    .table(RedstreamLeases::Table)
                    .drop_column(RedstreamLeases::Version)
                    .to_owned(),
            )
            .await
    }
}
