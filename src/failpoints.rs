//! Named crash points for the fault-injection suite (`tests/chaos`).
//!
//! With the `failpoints` feature, each point is a [`fail`] failpoint that a
//! test process configures (`fail::cfg`, `fail::cfg_callback`, or the
//! `FAILPOINTS` environment variable with `fail::FailScenario`), typically to
//! abort the process at a known step. Without the feature (the default),
//! every point compiles to nothing.
//!
//! | point | where |
//! |---|---|
//! | `consumer.after_read` | a member's `XREADGROUP` returned entries, before any handler runs |
//! | `handler.before_commit` | an exactly-once batch ran its handlers, before `COMMIT` |
//! | `handler.after_commit_before_ack` | the batch committed, before its outcomes are reported (so before `XACK`) |
//! | `ack.after_xack` | an `XACK` returned, before the supervisor records it |
//! | `reclaimer.after_claim` | `XAUTOCLAIM` returned entries, before they are handed on |
//! | `dlq.after_write` | the dead-letter script returned (its `XADD` and the original's `XACK` are one atomic step, so there is no point between them) |
//! | `producer.after_send` | a batch's `XADD`s were answered, before the publishers are |
//! | `outbox.after_xadd_before_mark` | the relay published rows, before it marks them sent |

/// Every crash point's name.
pub const POINTS: [&str; 8] = [
    "consumer.after_read",
    "handler.before_commit",
    "handler.after_commit_before_ack",
    "ack.after_xack",
    "reclaimer.after_claim",
    "dlq.after_write",
    "producer.after_send",
    "outbox.after_xadd_before_mark",
];

/// A crash point: a `fail` failpoint with the `failpoints` feature, nothing
/// without it.
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name);
    };
}

pub(crate) use crash_point;

/// Makes the process abort (as a `kill -9` would end it, with no cleanup)
/// the `hit`-th time (1-based) execution passes `point`.
///
/// ```no_run
/// # #[cfg(feature = "failpoints")]
/// redstream::failpoints::crash_at("handler.after_commit_before_ack", 1)?;
/// # Ok::<(), redstream::Error>(())
/// ```
#[cfg(feature = "failpoints")]
pub fn crash_at(point: &str, hit: u64) -> crate::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    if !POINTS.contains(&point) {
        return Err(crate::Error::settings(
            "failpoints",
            format!(
                "unknown crash point `{point}`; known: {}",
                POINTS.join(", ")
            ),
        ));
    }
    let passes = AtomicU64::new(0);
    fail::cfg_callback(point, move || {
        if passes.fetch_add(1, Ordering::SeqCst) + 1 == hit {
            eprintln!("crash point reached: aborting");
            std::process::abort();
        }
    })
    .map_err(|e| crate::Error::settings("failpoints", e))
}
