//! Metrics, through the [`metrics`] facade.
//!
//! The library only emits; the host application installs a recorder (for
//! Prometheus, [`install_prometheus`] does it in one call) **before**
//! starting the [`Processor`](crate::Processor): handles are taken at start.
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `redstream_build_info` | gauge | version | 1; the crate's version (set by [`describe`], so by [`install_prometheus`], and at start) |
//! | `redstream_published_total` | counter | stream | events written by the producer |
//! | `redstream_publish_failures_total` | counter | stream | events whose publish failed after every attempt |
//! | `redstream_producer_buffered` | gauge | | events accepted by the producer and not yet written |
//! | `redstream_producer_capacity` | gauge | | the producer's buffer size |
//! | `redstream_handled_total` | counter | stream, group, outcome (`ack`, `retry`, `dead_letter`) | decisions made |
//! | `redstream_duplicates_total` | counter | stream, group | redeliveries absorbed by exactly-once handlers |
//! | `redstream_handler_seconds` | histogram | stream, group | handler run time |
//! | `redstream_end_to_end_seconds` | histogram | stream, group | decision time minus the event's publish time (`ts`) |
//! | `redstream_delivery_attempt` | histogram | stream, group | attempt number of each handled delivery |
//! | `redstream_group_members` | gauge | stream, group | members of the group running in this process (set when one starts, restarts or stops) |
//! | `redstream_group_lag` | gauge | stream, group | entries not yet delivered to the group (XINFO GROUPS) |
//! | `redstream_group_pending` | gauge | stream, group | entries delivered and not acked |
//! | `redstream_group_waiting_retry` | gauge | stream, group | of those, entries waiting for a retry |
//! | `redstream_group_longest_pending_seconds` | gauge | stream, group | the longest time an entry has been pending (since delivery or last claim, retries waiting left out): high when entries are stuck, not during a backlog |
//! | `redstream_group_queue_latency_seconds` | gauge | stream, group | age of the oldest entry not yet delivered: grows during a backlog |
//! | `redstream_dead_letters` | gauge | stream | length of `<stream>:dlq`; one series per stream, however many groups read it: set by whichever group's pending check ran last (sum it over streams, not groups) |
//! | `redstream_reclaimed_total` | counter | stream, group | entries taken over from stopped members |
//! | `redstream_consumer_restarts_total` | counter | stream, group, member | consumer restarts (member names are fixed per process, so the label is bounded) |
//! | `redstream_ownership_lost_total` | counter | stream, group, member | entries a heartbeat found taken over from this member |
//! | `redstream_database_retries_total` | counter | stream, group | exactly-once batches rerun because the database was unavailable |
//! | `redstream_database_available` | gauge | database (its URL without the password) | 1 while the database takes writes, 0 during an outage |
//! | `redstream_database_outages_total` | counter | database | outages begun: episodes of failing writes |
//! | `redstream_schedule_runs_total` | counter | schedule, outcome (`ok`, `failed`, `skipped`) | scheduled runs, and ticks skipped because the previous run was still running |
//! | `redstream_schedule_run_seconds` | histogram | schedule | scheduled run time, publish included |

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};

/// Metric names.
pub mod names {
    /// 1, labelled with the crate's version.
    pub const BUILD_INFO: &str = "redstream_build_info";
    /// Events written by the producer.
    pub const PUBLISHED: &str = "redstream_published_total";
    /// Events whose publish failed after every attempt.
    pub const PUBLISH_FAILURES: &str = "redstream_publish_failures_total";
    /// Events accepted by the producer and not yet written.
    pub const PRODUCER_BUFFERED: &str = "redstream_producer_buffered";
    /// The producer's buffer size.
    pub const PRODUCER_CAPACITY: &str = "redstream_producer_capacity";
    /// Decisions made, by outcome.
    pub const HANDLED: &str = "redstream_handled_total";
    /// Redeliveries absorbed by exactly-once handlers.
    pub const DUPLICATES: &str = "redstream_duplicates_total";
    /// Handler run time.
    pub const HANDLER_SECONDS: &str = "redstream_handler_seconds";
    /// Decision time minus publish time.
    pub const END_TO_END_SECONDS: &str = "redstream_end_to_end_seconds";
    /// Attempt number of each handled delivery.
    pub const DELIVERY_ATTEMPT: &str = "redstream_delivery_attempt";
    /// Members of a group running in this process.
    pub const GROUP_MEMBERS: &str = "redstream_group_members";
    /// Entries not yet delivered to the group.
    pub const GROUP_LAG: &str = "redstream_group_lag";
    /// Entries delivered and not acked.
    pub const GROUP_PENDING: &str = "redstream_group_pending";
    /// Pending entries waiting for a retry.
    pub const GROUP_WAITING_RETRY: &str = "redstream_group_waiting_retry";
    /// The longest time an entry has been pending.
    pub const GROUP_LONGEST_PENDING_SECONDS: &str = "redstream_group_longest_pending_seconds";
    /// Age of the oldest entry not yet delivered.
    pub const GROUP_QUEUE_LATENCY_SECONDS: &str = "redstream_group_queue_latency_seconds";
    /// Length of the dead-letter stream (label `stream` only).
    pub const DEAD_LETTERS: &str = "redstream_dead_letters";
    /// Entries taken over from stopped members.
    pub const RECLAIMED: &str = "redstream_reclaimed_total";
    /// Consumer restarts, per member.
    pub const CONSUMER_RESTARTS: &str = "redstream_consumer_restarts_total";
    /// Entries a heartbeat found taken over, per member.
    pub const OWNERSHIP_LOST: &str = "redstream_ownership_lost_total";
    /// Exactly-once batches rerun because the database was unavailable.
    pub const DATABASE_RETRIES: &str = "redstream_database_retries_total";
    /// 1 while the database takes writes, 0 during an outage (label
    /// `database`: its URL without the password).
    pub const DATABASE_AVAILABLE: &str = "redstream_database_available";
    /// Database outages begun: episodes of failing writes.
    pub const DATABASE_OUTAGES: &str = "redstream_database_outages_total";
    /// Scheduled runs by outcome (`ok`, `failed`, `skipped`).
    pub const SCHEDULE_RUNS: &str = "redstream_schedule_runs_total";
    /// Scheduled run time, publish included.
    pub const SCHEDULE_RUN_SECONDS: &str = "redstream_schedule_run_seconds";
}

/// Registers the descriptions of every metric with the installed recorder,
/// and sets `redstream_build_info`.
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_gauge!(BUILD_INFO, "1, labelled with the redstream version");
    build_info();
    describe_counter!(PUBLISHED, "Events written by the producer");
    describe_counter!(
        PUBLISH_FAILURES,
        "Events whose publish failed after every attempt"
    );
    describe_gauge!(
        PRODUCER_BUFFERED,
        "Events accepted by the producer and not yet written"
    );
    describe_gauge!(PRODUCER_CAPACITY, "The producer's buffer size");
    describe_counter!(HANDLED, "Decisions made, by outcome");
    describe_counter!(DUPLICATES, "Redeliveries absorbed by exactly-once handlers");
    describe_histogram!(HANDLER_SECONDS, Unit::Seconds, "Handler run time");
    describe_histogram!(
        END_TO_END_SECONDS,
        Unit::Seconds,
        "Decision time minus the event's publish time"
    );
    describe_histogram!(DELIVERY_ATTEMPT, "Attempt number of each handled delivery");
    describe_gauge!(
        GROUP_MEMBERS,
        "Members of the group running in this process"
    );
    describe_gauge!(GROUP_LAG, "Entries not yet delivered to the group");
    describe_gauge!(GROUP_PENDING, "Entries delivered and not acked");
    describe_gauge!(GROUP_WAITING_RETRY, "Pending entries waiting for a retry");
    describe_gauge!(
        GROUP_LONGEST_PENDING_SECONDS,
        Unit::Seconds,
        "The longest time an entry has been pending (since delivery or last claim)"
    );
    describe_gauge!(
        GROUP_QUEUE_LATENCY_SECONDS,
        Unit::Seconds,
        "Age of the oldest entry not yet delivered to the group"
    );
    describe_gauge!(
        DEAD_LETTERS,
        "Length of the dead-letter stream (one series per stream)"
    );
    describe_counter!(RECLAIMED, "Entries taken over from stopped members");
    describe_counter!(CONSUMER_RESTARTS, "Consumer restarts, per member");
    describe_counter!(
        OWNERSHIP_LOST,
        "Entries a heartbeat found taken over, per member"
    );
    describe_counter!(
        DATABASE_RETRIES,
        "Exactly-once batches rerun because the database was unavailable"
    );
    describe_gauge!(
        DATABASE_AVAILABLE,
        "1 while the database takes writes, 0 while writes fail"
    );
    describe_counter!(
        DATABASE_OUTAGES,
        "Episodes in which the database refused writes"
    );
    describe_counter!(
        SCHEDULE_RUNS,
        "Scheduled runs by outcome; skipped: the previous run was still running"
    );
    describe_histogram!(
        SCHEDULE_RUN_SECONDS,
        Unit::Seconds,
        "Scheduled run time, publish included"
    );
}

/// Installs a Prometheus recorder as the global recorder, registers the
/// descriptions, and returns the handle that renders the exposition text
/// (serve `handle.render()`, e.g. from [`web::scope`](crate::web::scope)).
/// Call it once, before starting the processor. This is the host's choice to
/// make: the library itself never installs a recorder.
#[cfg(feature = "prometheus")]
pub fn install_prometheus() -> crate::Result<metrics_exporter_prometheus::PrometheusHandle> {
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Suffix("_seconds".to_owned()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0, 60.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(names::DELIVERY_ATTEMPT.to_owned()),
                &[1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0],
            )
        })
        .map_err(|e| crate::Error::settings("metrics", e.to_string()))?
        .install_recorder()
        .map_err(|e| crate::Error::settings("metrics", e.to_string()))?;
    describe();
    Ok(handle)
}

/// Sets `redstream_build_info{version}` to 1.
pub(crate) fn build_info() {
    gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// The metric handles of one member, taken once at start.
#[derive(Clone)]
pub(crate) struct MemberMetrics {
    pub(crate) restarts: Counter,
    pub(crate) ownership_lost: Counter,
}

/// The metric handles of one group, taken once at start.
#[derive(Clone)]
pub(crate) struct GroupMetrics {
    pub(crate) acked: Counter,
    pub(crate) retried: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) handler_seconds: Histogram,
    pub(crate) end_to_end_seconds: Histogram,
    pub(crate) delivery_attempt: Histogram,
    pub(crate) members: Gauge,
    pub(crate) lag: Gauge,
    pub(crate) pending: Gauge,
    pub(crate) waiting_retry: Gauge,
    pub(crate) longest_pending_seconds: Gauge,
    pub(crate) queue_latency_seconds: Gauge,
    pub(crate) dead_letters: Gauge,
    pub(crate) reclaimed: Counter,
    /// Per member, by index.
    by_member: Vec<MemberMetrics>,
    /// For a member index out of range (never, by construction).
    no_member: MemberMetrics,
}

impl GroupMetrics {
    pub(crate) fn new(stream: &str, group: &str, members: &[std::sync::Arc<str>]) -> Self {
        use names::*;
        let l = || [("stream", stream.to_owned()), ("group", group.to_owned())];
        let member = |name: &str| {
            let labels = [
                ("stream", stream.to_owned()),
                ("group", group.to_owned()),
                ("member", name.to_owned()),
            ];
            MemberMetrics {
                restarts: counter!(CONSUMER_RESTARTS, &labels),
                ownership_lost: counter!(OWNERSHIP_LOST, &labels),
            }
        };
        let outcome = |o: &'static str| counter!(HANDLED, "stream" => stream.to_owned(), "group" => group.to_owned(), "outcome" => o);
        GroupMetrics {
            acked: outcome("ack"),
            retried: outcome("retry"),
            dead_lettered: outcome("dead_letter"),
            handler_seconds: histogram!(HANDLER_SECONDS, &l()),
            end_to_end_seconds: histogram!(END_TO_END_SECONDS, &l()),
            delivery_attempt: histogram!(DELIVERY_ATTEMPT, &l()),
            members: gauge!(GROUP_MEMBERS, &l()),
            lag: gauge!(GROUP_LAG, &l()),
            pending: gauge!(GROUP_PENDING, &l()),
            waiting_retry: gauge!(GROUP_WAITING_RETRY, &l()),
            longest_pending_seconds: gauge!(GROUP_LONGEST_PENDING_SECONDS, &l()),
            queue_latency_seconds: gauge!(GROUP_QUEUE_LATENCY_SECONDS, &l()),
            // One DLQ per stream, however many groups read it.
            dead_letters: gauge!(DEAD_LETTERS, "stream" => stream.to_owned()),
            reclaimed: counter!(RECLAIMED, &l()),
            by_member: members.iter().map(|m| member(m)).collect(),
            no_member: MemberMetrics {
                restarts: Counter::noop(),
                ownership_lost: Counter::noop(),
            },
        }
    }

    /// The handles of member `index`.
    pub(crate) fn member(&self, index: usize) -> &MemberMetrics {
        self.by_member.get(index).unwrap_or(&self.no_member)
    }
}

/// Counts written and failed events of one stream.
pub(crate) fn published(stream: &str, written: u64, failed: u64) {
    if written > 0 {
        counter!(names::PUBLISHED, "stream" => stream.to_owned()).increment(written);
    }
    if failed > 0 {
        counter!(names::PUBLISH_FAILURES, "stream" => stream.to_owned()).increment(failed);
    }
}

/// Sets the producer's buffer gauges.
pub(crate) fn producer_buffer(buffered: usize, capacity: usize) {
    gauge!(names::PRODUCER_BUFFERED).set(buffered as f64);
    gauge!(names::PRODUCER_CAPACITY).set(capacity as f64);
}
