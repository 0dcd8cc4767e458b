//! Running a handler: the erased handler the consumers hold (one future
//! per entry, or batches in shared transactions), and the one place where a
//! handler's result or panic becomes a [`Verdict`].

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::{Handler, HandlerResult, Meta, Outcome, Schema};
use crate::wire::DecodeError;

/// What running a handler on one entry came to.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// The handler decided.
    Decided(Outcome),
    /// The handler returned `Err` or panicked: a failed attempt.
    Failed { error: String, panicked: bool },
    /// The payload could not be decoded for this handler.
    Undecodable(DecodeError),
    /// Not run: its attempt budget was already spent (an earlier
    /// dead-letter write failed, or the budget was lowered).
    Exhausted,
    /// Not committed: another member took the entry over. Nothing is
    /// reported for it.
    Lost,
}

impl Verdict {
    /// A failed attempt: the handler returned this error.
    pub(crate) fn failed(error: impl std::fmt::Display) -> Verdict {
        Verdict::Failed {
            error: error.to_string(),
            panicked: false,
        }
    }

    /// A failed attempt: the handler (or its event's `Deserialize`)
    /// panicked with this payload.
    pub(crate) fn panicked(payload: &(dyn std::any::Any + Send)) -> Verdict {
        Verdict::Failed {
            error: format!("panic: {}", panic_message(payload)),
            panicked: true,
        }
    }
}

/// The message of a caught panic.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_owned()
    }
}

/// A group's handler with its event type erased, as the consumers run it.
#[derive(Clone)]
pub(crate) enum ErasedHandler {
    /// One future per entry (a [`Handler`]).
    Each(Arc<dyn RunEach>),
    /// Entries in shared transactions, at most `max` per batch (a
    /// [`TxHandler`](crate::TxHandler)).
    Batch {
        handler: Arc<dyn RunBatch>,
        max: usize,
    },
}

impl ErasedHandler {
    /// Whether the handler cannot make progress now: its database refuses
    /// writes. A member that is stopping releases its running entries at
    /// once then, instead of waiting for the shutdown deadline.
    pub(crate) fn stalled(&self) -> bool {
        match self {
            ErasedHandler::Each(_) => false,
            ErasedHandler::Batch { handler, .. } => handler.stalled(),
        }
    }
}

/// A handler that runs one entry at a time.
pub(crate) trait RunEach: Send + Sync + 'static {
    /// Decodes the entry and starts the handler on it.
    fn start(&self, meta: Meta) -> Result<BoxFuture<'static, HandlerResult>, DecodeError>;
}

/// A handler that runs entries in batches.
pub(crate) trait RunBatch: Send + Sync + 'static {
    /// Runs a batch; one verdict per entry, in order.
    fn run_batch(&self, metas: Vec<Meta>) -> BoxFuture<'static, Vec<Verdict>>;

    /// See [`ErasedHandler::stalled`].
    fn stalled(&self) -> bool;
}

struct Erased<H: Handler> {
    handler: Arc<H>,
    schema: Schema,
}

impl<H: Handler> RunEach for Erased<H> {
    fn start(&self, meta: Meta) -> Result<BoxFuture<'static, HandlerResult>, DecodeError> {
        let event: H::Event = self.schema.decode(meta.entry())?;
        let handler = Arc::clone(&self.handler);
        Ok(Box::pin(async move { handler.handle(event, meta).await }))
    }
}

/// Erases a handler's event type.
pub(crate) fn erase<H: Handler>(handler: H) -> ErasedHandler {
    let schema = handler.schema();
    ErasedHandler::Each(Arc::new(Erased {
        handler: Arc::new(handler),
        schema,
    }))
}

/// Runs a handler on one entry: decoding and the handler itself under
/// `catch_unwind`, so neither a bad `Deserialize` impl nor a handler panic
/// escapes into the actor.
pub(crate) async fn run(handler: &dyn RunEach, meta: Meta) -> Verdict {
    let started = std::panic::catch_unwind(AssertUnwindSafe(|| handler.start(meta)));
    let future = match started {
        Ok(Ok(f)) => f,
        Ok(Err(decode)) => return Verdict::Undecodable(decode),
        Err(payload) => return Verdict::panicked(payload.as_ref()),
    };
    match AssertUnwindSafe(future).catch_unwind().await {
        Ok(Ok(outcome)) => Verdict::Decided(outcome),
        Ok(Err(error)) => Verdict::failed(error),
        Err(payload) => Verdict::panicked(payload.as_ref()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::BoxError;
    use crate::handler::handler_fn;
    use crate::wire::Entry;
    use serde_json::json;

    fn entry(fields: &[(&str, &str)]) -> Entry {
        Entry::from_fields(
            "1-0",
            fields
                .iter()
                .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
                .collect(),
        )
        .expect("valid entry")
    }

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Order {
        amount_cents: i64,
    }

    #[test]
    fn upcasts_older_versions_and_refuses_unknown_ones() {
        let schema = Schema::new(2).upcast(1, |mut v: serde_json::Value| {
            let euros = v["amount"].as_f64().ok_or("amount missing")?;
            v["amount_cents"] = json!((euros * 100.0).round() as i64);
            Ok::<_, BoxError>(v)
        });
        let v1 = entry(&[("v", "1"), ("data", r#"{"amount": 2.5}"#)]);
        assert_eq!(schema.decode::<Order>(&v1), Ok(Order { amount_cents: 250 }));
        let v2 = entry(&[("v", "2"), ("data", r#"{"amount_cents": 7}"#)]);
        assert_eq!(schema.decode::<Order>(&v2), Ok(Order { amount_cents: 7 }));
        let v3 = entry(&[("v", "3"), ("data", "{}")]);
        assert!(matches!(
            schema.decode::<Order>(&v3),
            Err(DecodeError::UnknownVersion {
                version: 3,
                current: 2
            })
        ));
        let bad = entry(&[("v", "1"), ("data", r#"{"nope": 1}"#)]);
        assert!(matches!(
            schema.decode::<Order>(&bad),
            Err(DecodeError::UpcastFailed { from: 1, .. })
        ));
    }

    #[test]
    fn version_without_upcaster_is_unknown() {
        let old = entry(&[("v", "1"), ("data", "{}")]);
        assert!(matches!(
            Schema::new(3)
                .upcast(2, Ok::<_, BoxError>)
                .decode::<serde_json::Value>(&old),
            Err(DecodeError::UnknownVersion { version: 1, .. })
        ));
    }

    #[test]
    fn bad_json_is_undecodable() {
        let e = entry(&[("data", "{not json")]);
        let err = Schema::default().decode::<Order>(&e).expect_err("bad json");
        assert!(err.reason().starts_with("bad_json"), "{}", err.reason());
    }

    #[actix_rt::test]
    async fn panics_and_errors_become_verdicts() {
        let ErasedHandler::Each(panicky) =
            erase(handler_fn(|v: serde_json::Value, _m: Meta| async move {
                if v["boom"].as_bool() == Some(true) {
                    panic!("boom requested");
                }
                if v["fail"].as_bool() == Some(true) {
                    return Err("refused".into());
                }
                Ok(Outcome::Ack)
            }))
        else {
            panic!("a Handler runs one entry at a time");
        };
        let meta = |data: &str| Meta::for_test(entry(&[("data", data)]), "s", "g", 1);
        assert!(matches!(
            run(&*panicky, meta(r#"{"boom": true}"#)).await,
            Verdict::Failed { panicked: true, ref error } if error.contains("boom requested")
        ));
        assert!(matches!(
            run(&*panicky, meta(r#"{"fail": true}"#)).await,
            Verdict::Failed { panicked: false, ref error } if error == "refused"
        ));
        assert!(matches!(
            run(&*panicky, meta("{}")).await,
            Verdict::Decided(Outcome::Ack)
        ));
        assert!(matches!(
            run(&*panicky, meta("[")).await,
            Verdict::Undecodable(DecodeError::BadJson { .. })
        ));
    }
}
