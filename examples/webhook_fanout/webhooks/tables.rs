//! The example's tables: delivery attempts, analytics counts,
//! notifications and the configured endpoints.

use sea_orm::entity::prelude::*;
use sea_orm::sea_query::Index;
use sea_orm::{ConnectionTrait, Schema};

/// `webhook_deliveries`: one row per delivery attempt.
pub(crate) mod attempt_row {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_deliveries")]
    pub(crate) struct Model {
        #[sea_orm(primary_key)]
        pub(crate) id: i64,
        /// The source event id (`webhook-id`).
        pub(crate) event_id: String,
        pub(crate) endpoint: String,
        /// From 1.
        pub(crate) attempt: i32,
        /// The HTTP status, when there was an answer.
        pub(crate) status_code: Option<i32>,
        /// The error (connect, timeout, …) or a short description of a
        /// non-2xx answer.
        pub(crate) error: Option<String>,
        pub(crate) latency_ms: i64,
        /// `delivered`, `retry`, `rejected` (dead-lettered at once) or
        /// `exhausted` (dead-lettered after the last attempt).
        pub(crate) outcome: String,
        /// When the attempt started, ms since the epoch.
        pub(crate) attempted_at: i64,
        /// When the source event was published, ms since the epoch.
        pub(crate) published_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `analytics_event_counts`: events per type and hour.
pub(crate) mod event_count {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "analytics_event_counts")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) event_type: String,
        /// The hour's start, seconds since the epoch.
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) hour_start: i64,
        pub(crate) events: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `notifications`: one per order.
pub(crate) mod notification {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "notifications")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) order_id: String,
        pub(crate) customer_id: String,
        pub(crate) message: String,
        /// The source event id.
        pub(crate) event_id: String,
        pub(crate) created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// `webhook_endpoints`: the configured endpoints, one row per name.
pub(crate) mod endpoint_row {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "webhook_endpoints")]
    pub(crate) struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub(crate) name: String,
        pub(crate) url: String,
        /// `whsec_<base64>`.
        pub(crate) secret: String,
        /// A comma list (`order.created,order.cancelled`) or a JSON array;
        /// `*` for all.
        pub(crate) event_types: String,
        pub(crate) timeout_ms: i64,
        pub(crate) enabled: bool,
        /// ms since the epoch; kept when the row is updated.
        pub(crate) created_at: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// Creates the example's tables if they do not exist.
pub(crate) async fn create_tables(db: &DatabaseConnection) -> Result<(), DbErr> {
    let schema = Schema::new(db.get_database_backend());
    let mut attempts = schema.create_table_from_entity(attempt_row::Entity);
    let mut counts = schema.create_table_from_entity(event_count::Entity);
    let mut notes = schema.create_table_from_entity(notification::Entity);
    let mut endpoints = schema.create_table_from_entity(endpoint_row::Entity);
    for create in [&mut attempts, &mut counts, &mut notes, &mut endpoints] {
        create.if_not_exists();
        db.execute(&*create).await?;
    }
    let index = Index::create()
        .if_not_exists()
        .name("idx_webhook_deliveries_event")
        .table(attempt_row::Entity)
        .col(attempt_row::Column::EventId)
        .col(attempt_row::Column::Endpoint)
        .to_owned();
    db.execute(&index).await?;
    Ok(())
}
