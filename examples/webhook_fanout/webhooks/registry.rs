//! `webhook_endpoints` as endpoints: adding or replacing a row, enabling
//! or disabling one, loading and checking them, and the [`EndpointCache`]
//! the fan-out and the deliveries read.

use std::sync::{Arc, Mutex, RwLock};

use sea_orm::entity::prelude::*;
use sea_orm::sea_query::OnConflict;
use sea_orm::{ConnectionTrait, QueryOrder, Set};

use super::endpoint::{Endpoint, parse_event_types, validate_endpoint};
use super::tables::endpoint_row;
use super::{AnyError, now_ms};

/// Adds an endpoint, or replaces its URL, secret, event types, timeout and
/// enabled flag if the name exists (its `created_at` is kept). Validates
/// first: a bad endpoint is an error, nothing is written.
pub(crate) async fn upsert_endpoint<C: ConnectionTrait>(
    db: &C,
    e: &Endpoint,
) -> Result<(), AnyError> {
    validate_endpoint(e)?;
    let row = endpoint_row::ActiveModel {
        name: Set(e.name.clone()),
        url: Set(e.url.clone()),
        secret: Set(e.secret.clone()),
        event_types: Set(e.event_types.join(",")),
        timeout_ms: Set(i64::try_from(e.timeout_ms).unwrap_or(i64::MAX)),
        enabled: Set(e.enabled),
        created_at: Set(now_ms()),
    };
    let update = OnConflict::column(endpoint_row::Column::Name)
        .update_columns([
            endpoint_row::Column::Url,
            endpoint_row::Column::Secret,
            endpoint_row::Column::EventTypes,
            endpoint_row::Column::TimeoutMs,
            endpoint_row::Column::Enabled,
        ])
        .to_owned();
    endpoint_row::Entity::insert(row)
        .on_conflict(update)
        .exec_without_returning(db)
        .await?;
    Ok(())
}

/// Enables or disables an endpoint; `false` when there is no such name.
pub(crate) async fn set_endpoint_enabled<C: ConnectionTrait>(
    db: &C,
    name: &str,
    enabled: bool,
) -> Result<bool, DbErr> {
    let result = endpoint_row::Entity::update_many()
        .col_expr(endpoint_row::Column::Enabled, Expr::value(enabled))
        .filter(endpoint_row::Column::Name.eq(name))
        .exec(db)
        .await?;
    Ok(result.rows_affected > 0)
}

/// A table row as an endpoint, checked.
pub(crate) fn endpoint_from_row(row: endpoint_row::Model) -> Result<Endpoint, String> {
    let event_types =
        parse_event_types(&row.event_types).map_err(|e| format!("endpoint `{}`: {e}", row.name))?;
    let timeout_ms = u64::try_from(row.timeout_ms).unwrap_or(0);
    let endpoint = Endpoint {
        name: row.name,
        url: row.url,
        secret: row.secret,
        event_types,
        timeout_ms,
        enabled: row.enabled,
        created_at_ms: row.created_at,
    };
    validate_endpoint(&endpoint)?;
    Ok(endpoint)
}

/// Every row of `webhook_endpoints` (disabled ones included), by name; the
/// rows that do not validate are left out and described in the second list.
pub(crate) async fn load_endpoints<C: ConnectionTrait>(
    db: &C,
) -> Result<(Vec<Endpoint>, Vec<String>), DbErr> {
    let rows = endpoint_row::Entity::find()
        .order_by_asc(endpoint_row::Column::Name)
        .all(db)
        .await?;
    let mut endpoints = Vec::with_capacity(rows.len());
    let mut problems = Vec::new();
    for row in rows {
        match endpoint_from_row(row) {
            Ok(e) => endpoints.push(e),
            Err(problem) => problems.push(problem),
        }
    }
    Ok((endpoints, problems))
}

/// The endpoints the fan-out and the deliveries use: a snapshot of
/// `webhook_endpoints` replaced by [`refresh`](Self::refresh), or a fixed
/// list.
#[derive(Clone, Debug, Default)]
pub(crate) struct EndpointCache {
    current: Arc<RwLock<Arc<[Endpoint]>>>,
    /// The invalid rows of the last refresh (logged when they change).
    problems: Arc<Mutex<Vec<String>>>,
}

impl EndpointCache {
    /// A cache that holds these endpoints until a refresh.
    #[allow(dead_code)] // the tests' endpoints
    pub(crate) fn fixed(endpoints: Vec<Endpoint>) -> EndpointCache {
        EndpointCache {
            current: Arc::new(RwLock::new(Arc::from(endpoints))),
            problems: Arc::default(),
        }
    }

    /// The endpoints now, disabled ones included.
    pub(crate) fn snapshot(&self) -> Arc<[Endpoint]> {
        match self.current.read() {
            Ok(c) => Arc::clone(&c),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// One endpoint now.
    pub(crate) fn get(&self, name: &str) -> Option<Endpoint> {
        self.snapshot().iter().find(|e| e.name == name).cloned()
    }

    /// Reloads the table. Invalid rows are skipped and logged (once per
    /// change) and returned; the valid ones replace the snapshot. On a
    /// database error the snapshot is kept.
    pub(crate) async fn refresh<C: ConnectionTrait>(&self, db: &C) -> Result<Vec<String>, DbErr> {
        let (endpoints, problems) = load_endpoints(db).await?;
        match self.current.write() {
            Ok(mut c) => *c = Arc::from(endpoints),
            Err(poisoned) => *poisoned.into_inner() = Arc::from(endpoints),
        }
        if let Ok(mut last) = self.problems.lock()
            && *last != problems
        {
            for p in problems.iter().filter(|p| !last.contains(p)) {
                tracing::warn!("webhook_endpoints: row skipped: {p}");
            }
            *last = problems.clone();
        }
        Ok(problems)
    }
}
