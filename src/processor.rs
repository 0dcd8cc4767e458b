//! The root: builds and starts the actor system, and stops it in order.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use actix::prelude::*;

use crate::broker::{
    Broker, Diagnostics, GroupRef, Leases, Redelivery, RedisBroker, ServerReport, Streams,
};
use crate::error::{Error, Result};
use crate::group::supervisor::{GroupStopReport, GroupSupervisor, Lease, StopGroup};
use crate::group::{GroupOptions, GroupRuntime, RestartPolicy};
use crate::handle::{GroupHandle, Health, Inner as HandleInner, ProcessorHandle};
use crate::handler::RetryPolicy;
use crate::handler::{ErasedHandler, Handler, erase, handler_fn};
use crate::metrics::GroupMetrics;
use crate::producer::actor::{Flush, ProducerActor, ProducerOptions, StatCounters};
use crate::producer::{Producer, ProducerLimits, new_event_id};
use crate::schedule::actor::{SchedulerActor, StopSchedule};
use crate::schedule::{Schedule, ScheduleCounters, ScheduleStats};
use crate::settings::{IdFormat, Settings, StartFrom};
use crate::status::GroupStatus;
use crate::store::{OutboxRelay, RelayOptions, StopRelay, Store, TxHandler, erase_tx};

/// A consumer group to run in this process: a stream, a group name and the
/// handler for its entries, with optional overrides of the `[consumer]` and
/// `[retry]` settings.
///
/// ```
/// use std::time::Duration;
/// use redstream::{handler_fn, Group, Meta, Outcome, RetryPolicy};
///
/// let group = Group::new("orders", "billing", handler_fn(|_: serde_json::Value, _: Meta| async {
///     Ok(Outcome::Ack)
/// }))
/// .with_members(4)
/// .with_retry(RetryPolicy::default().with_max_attempts(8).with_initial_delay(Duration::from_secs(2)));
/// # let _ = group;
/// ```
pub struct Group {
    stream: String,
    group: String,
    handler: ErasedHandler,
    store: Option<Store>,
    members: Option<usize>,
    in_flight: Option<usize>,
    count: Option<usize>,
    max_pending: Option<u64>,
    start_from: Option<StartFrom>,
    retry: Option<RetryPolicy>,
    min_idle: Option<Duration>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("stream", &self.stream)
            .field("group", &self.group)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

impl Group {
    /// A group named `group` reading `stream` with `handler`.
    pub fn new<H: Handler>(
        stream: impl Into<String>,
        group: impl Into<String>,
        handler: H,
    ) -> Self {
        Group {
            stream: stream.into(),
            group: group.into(),
            handler: erase(handler),
            store: None,
            members: None,
            in_flight: None,
            count: None,
            max_pending: None,
            start_from: None,
            retry: None,
            min_idle: None,
        }
    }

    /// A group whose handler writes through a database transaction, with
    /// exactly one effect per event (see [`TxHandler`]). Entries of one read
    /// share a transaction (up to `database.batch_size`).
    pub fn transactional<H: TxHandler>(
        stream: impl Into<String>,
        group: impl Into<String>,
        store: &Store,
        handler: H,
    ) -> Self {
        let mut g = Group::new(
            stream,
            group,
            handler_fn(|_: serde_json::Value, _: crate::Meta| async { Ok(crate::Outcome::Ack) }),
        );
        g.handler = erase_tx(store.clone(), handler);
        g.store = Some(store.clone());
        g
    }

    /// Members in this process (default `consumer.members`).
    pub fn with_members(mut self, n: usize) -> Self {
        self.members = Some(n);
        self
    }

    /// Handlers running at once per member (default `consumer.in_flight`).
    pub fn with_in_flight(mut self, n: usize) -> Self {
        self.in_flight = Some(n);
        self
    }

    /// Entries per read (default `consumer.count`).
    pub fn with_count(mut self, n: usize) -> Self {
        self.count = Some(n);
        self
    }

    /// Pending bound above which reading pauses, 0 for none (default
    /// `consumer.max_pending`).
    pub fn with_max_pending(mut self, n: u64) -> Self {
        self.max_pending = Some(n);
        self
    }

    /// Where the group starts if it does not exist (default
    /// `consumer.start_from`).
    pub fn with_start_from(mut self, start: StartFrom) -> Self {
        self.start_from = Some(start);
        self
    }

    /// Retry and dead-letter policy (default from `[retry]`).
    pub fn with_retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = Some(policy);
        self
    }

    /// Idle time after which entries are reclaimed (default
    /// `reclaim.min_idle_ms`). A heartbeat period longer than half of it is
    /// cut to a third of it.
    pub fn with_min_idle(mut self, d: Duration) -> Self {
        self.min_idle = Some(d);
        self
    }

    /// The stream.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The group name.
    pub fn name(&self) -> &str {
        &self.group
    }

    fn resolve(&self, s: &Settings, instance: &str) -> Result<GroupOptions> {
        let key = |k: &str| format!("group `{}` on `{}`: {k}", self.group, self.stream);
        let members = self.members.unwrap_or(s.consumer.members);
        let in_flight = self.in_flight.unwrap_or(s.consumer.in_flight);
        let count = self.count.unwrap_or(s.consumer.count);
        for (name, value) in [
            ("members", members),
            ("in_flight", in_flight),
            ("count", count),
        ] {
            if value == 0 {
                return Err(Error::settings(key(name), "must be at least 1"));
            }
        }
        if self.stream.is_empty() || self.group.is_empty() {
            return Err(Error::settings(
                key("name"),
                "stream and group must not be empty",
            ));
        }
        let min_idle = self
            .min_idle
            .unwrap_or(Duration::from_millis(s.reclaim.min_idle_ms));
        let mut heartbeat = Duration::from_millis(s.reclaim.heartbeat_ms);
        if heartbeat * 2 > min_idle {
            heartbeat = min_idle / 3;
        }
        Ok(GroupOptions {
            member_names: (0..members)
                .map(|i| Arc::from(format!("{instance}-{i}")))
                .collect(),
            count,
            in_flight,
            block: Duration::from_millis(s.consumer.block_ms),
            max_pending: self.max_pending.unwrap_or(s.consumer.max_pending),
            pending_check: Duration::from_millis(s.consumer.pending_check_ms),
            start_from: self.start_from.unwrap_or(s.consumer.start_from),
            on_missing_group: s.consumer.on_missing_group,
            retry: self
                .retry
                .clone()
                .unwrap_or_else(|| RetryPolicy::from(&s.retry)),
            min_idle,
            reclaim_interval: Duration::from_millis(s.reclaim.interval_ms),
            reclaim_count: s.reclaim.count,
            retry_poll: Duration::from_millis(s.reclaim.retry_poll_ms),
            heartbeat,
            lease_ttl: Duration::from_millis(s.reclaim.lease_ttl_ms),
            remove_idle_consumers: Duration::from_millis(s.reclaim.remove_idle_consumers_ms),
            restart: RestartPolicy {
                min: Duration::from_millis(s.supervision.restart_min_ms),
                max: Duration::from_millis(s.supervision.restart_max_ms),
                healthy_run: RestartPolicy::HEALTHY_RUN,
            },
            shutdown_deadline: Duration::from_millis(s.shutdown.deadline_ms),
            // Decided at start-up, once the stream's groups are known.
            delete_acked: false,
        })
    }
}

/// Builds a [`Processor`].
pub struct ProcessorBuilder {
    settings: Settings,
    groups: Vec<Group>,
    schedules: Vec<Schedule>,
    outbox: Option<Store>,
    max_lens: HashMap<String, u64>,
    broker: Option<Arc<dyn Broker>>,
}

impl std::fmt::Debug for ProcessorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessorBuilder")
            .field("groups", &self.groups)
            .field("schedules", &self.schedules)
            .finish_non_exhaustive()
    }
}

impl ProcessorBuilder {
    /// Adds a consumer group.
    pub fn group(mut self, group: Group) -> Self {
        self.groups.push(group);
        self
    }

    /// Adds a scheduled producer: its function runs on its cadence and its
    /// events are published through this processor's producer. It starts
    /// with the processor and stops first at shutdown (see
    /// [`Schedule`](crate::Schedule)).
    pub fn schedule(mut self, schedule: Schedule) -> Self {
        self.schedules.push(schedule);
        self
    }

    /// Trims `stream` to about `max_len` entries on every publish (`MAXLEN
    /// ~`), overriding `producer.max_len`. Only safe when a single group
    /// reads the stream, or all keep up; see the README on retention.
    pub fn stream_max_len(mut self, stream: impl Into<String>, max_len: u64) -> Self {
        self.max_lens.insert(stream.into(), max_len);
        self
    }

    /// Relays this store's outbox to its streams (see [`enqueue`](crate::enqueue)).
    pub fn outbox(mut self, store: &Store) -> Self {
        self.outbox = Some(store.clone());
        self
    }

    /// Uses this broker instead of connecting to `redis.url`.
    pub fn broker(mut self, broker: Arc<dyn Broker>) -> Self {
        self.broker = Some(broker);
        self
    }

    /// Validates settings, connects, creates every group (before anything
    /// is published, so nothing is skipped), takes the member leases, and
    /// starts the actors. Must be called inside an actix `System`
    /// (`#[actix::main]`, `#[actix_web::main]`, `#[actix_rt::test]`).
    pub async fn start(self) -> Result<Processor> {
        if System::try_current().is_none() {
            return Err(Error::NoActixSystem);
        }
        let settings = self.settings;
        settings.validate()?;
        let mut names = std::collections::HashSet::new();
        for schedule in &self.schedules {
            schedule.validate()?;
            if !names.insert(schedule.name.clone()) {
                return Err(Error::settings(
                    "schedules",
                    format!("schedule `{}` is added twice", schedule.name),
                ));
            }
        }
        let instance = settings.instance.resolved_name();
        let broker: Arc<dyn Broker> = match self.broker {
            Some(b) => b,
            None => Arc::new(RedisBroker::connect(&settings.redis, &instance).await?),
        };
        let mut server = broker.server_report().await?;
        tracing::info!(
            server = %server.server,
            newer_commands = %server.features.describe(),
            "connected to the stream server"
        );
        for warning in &server.warnings {
            tracing::warn!(redis_version = %server.version, "{warning}");
        }

        let mut seen = std::collections::HashSet::new();
        let mut seen_many = std::collections::HashSet::new();
        let mut runtimes = Vec::with_capacity(self.groups.len());
        for group in &self.groups {
            if !seen.insert((group.stream.clone(), group.group.clone())) {
                return Err(Error::settings(
                    "groups",
                    format!(
                        "group `{}` on stream `{}` is added twice",
                        group.group, group.stream
                    ),
                ));
            }
            let mut options = group.resolve(&settings, &instance)?;
            let target = GroupRef::new(group.stream.as_str(), group.group.as_str());
            let created = broker.ensure_group(&target, options.start_from).await?;
            if created {
                tracing::info!(stream = %group.stream, group = %group.group, "created consumer group");
            }
            if settings.retention.delete_acked {
                // Deleting what one group acked is safe only when no other
                // group reads the stream: here, or in another process.
                let here = self
                    .groups
                    .iter()
                    .filter(|g| g.stream == group.stream)
                    .count() as u64;
                let groups = broker.group_count(&group.stream).await?.max(here);
                options.delete_acked = groups == 1;
                if groups == 1 {
                    tracing::info!(
                        stream = %group.stream, group = %group.group,
                        "retention.delete_acked: acked entries are deleted ({})",
                        if server.features.xackdel { "XACKDEL" } else { "script" }
                    );
                } else if seen_many.insert(group.stream.clone()) {
                    let warning = format!(
                        "retention.delete_acked is on, but `{}` is read by {groups} groups: its acked entries are kept",
                        group.stream
                    );
                    tracing::warn!("{warning}");
                    server.warnings.push(warning);
                }
            }
            let budget = crate::group::budget::ReadBudget::new(options.max_pending);
            runtimes.push(Arc::new(GroupRuntime {
                metrics: GroupMetrics::new(&group.stream, &group.group),
                streams: Arc::clone(&broker) as Arc<dyn Streams>,
                redelivery: Arc::clone(&broker) as Arc<dyn Redelivery>,
                leases: Arc::clone(&broker) as Arc<dyn Leases>,
                diagnostics: Arc::clone(&broker) as Arc<dyn Diagnostics>,
                capabilities: broker.capabilities(),
                handler: group.handler.clone(),
                target,
                options,
                read_turns: Arc::new(tokio::sync::Semaphore::new(
                    settings.consumer.blocked_readers,
                )),
                budget,
            }));
        }

        let token: Arc<str> = Arc::from(new_event_id(IdFormat::Ulid));
        let mut leases = Vec::with_capacity(runtimes.len());
        for rt in &runtimes {
            let keys: Vec<String> = rt
                .options
                .member_names
                .iter()
                .map(|m| broker.lease_key(&rt.target.member(Arc::clone(m))))
                .collect();
            leases.push(Lease {
                token: Arc::clone(&token),
                keys,
            });
        }
        let wait = Duration::from_millis(settings.reclaim.lease_wait_ms);
        let ttl = Duration::from_millis(settings.reclaim.lease_ttl_ms);
        acquire_all(&broker, &runtimes, &leases, ttl, wait).await?;

        let workers = match settings.consumer.workers {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(4),
            n => n,
        };
        let arbiters: Vec<Arbiter> = (0..workers).map(|_| Arbiter::new()).collect();
        let handles: Arc<[ArbiterHandle]> = arbiters.iter().map(Arbiter::handle).collect();

        let p = &settings.producer;
        let stats = Arc::new(StatCounters::default());
        let permits = Arc::new(tokio::sync::Semaphore::new(p.buffer));
        let producer_actor = ProducerActor::new(
            Arc::clone(&broker) as Arc<dyn Streams>,
            ProducerOptions {
                permits: Arc::clone(&permits),
                capacity: p.buffer,
                batch_size: p.batch_size,
                max_in_flight: p.max_in_flight,
                linger: Duration::from_millis(p.linger_ms),
                attempts: p.publish_attempts,
                retry_min: Duration::from_millis(p.retry_initial_ms),
                retry_max: Duration::from_millis(p.retry_max_ms),
            },
            Arc::clone(&stats),
        )
        .start();
        let producer = Producer::new(
            producer_actor,
            stats,
            permits,
            ProducerLimits {
                capacity: p.buffer,
                max_payload: p.max_payload_bytes,
                id_format: p.id_format,
                default_max_len: (p.max_len > 0).then_some(p.max_len),
                max_lens: self.max_lens,
            },
        );

        let mut offset = 0;
        let mut groups = Vec::with_capacity(runtimes.len());
        for (rt, lease) in runtimes.into_iter().zip(leases) {
            let members = rt.options.member_names.len();
            let supervisor =
                GroupSupervisor::new(Arc::clone(&rt), Arc::clone(&handles), offset, lease).start();
            offset += members;
            groups.push(GroupHandle {
                stream: Arc::clone(rt.target.stream_arc()),
                group: Arc::clone(rt.target.name_arc()),
                addr: supervisor,
            });
        }
        let schedules = self
            .schedules
            .into_iter()
            .map(|s| {
                let counters = Arc::new(ScheduleCounters::new(&s.name));
                let name = Arc::clone(&s.name);
                let addr = SchedulerActor::new(
                    s,
                    producer.clone(),
                    Arc::clone(&broker) as Arc<dyn Diagnostics>,
                    Arc::clone(&counters),
                )
                .start();
                ScheduleHandle {
                    name,
                    addr,
                    counters,
                }
            })
            .collect();
        let mut stores: Vec<Store> = Vec::new();
        for store in self
            .groups
            .iter()
            .filter_map(|g| g.store.as_ref())
            .chain(&self.outbox)
        {
            if !stores.iter().any(|s| s.same_as(store)) {
                stores.push(store.clone());
            }
        }
        let relay = self.outbox.map(|store| {
            let o = &settings.outbox;
            OutboxRelay::new(
                store,
                producer.clone(),
                RelayOptions {
                    poll: Duration::from_millis(o.poll_ms),
                    batch: o.batch_size,
                    lease_ttl: Duration::from_millis(o.lease_ttl_ms),
                },
            )
            .start()
        });
        tracing::info!(
            instance = %instance, groups = groups.len(), workers,
            redis_version = %server.version, "redstream processor started",
        );
        Ok(Processor {
            handle: ProcessorHandle {
                inner: Arc::new(HandleInner {
                    producer,
                    groups,
                    broker: broker.clone() as Arc<dyn Diagnostics>,
                    stores,
                    server,
                    instance,
                    started: Instant::now(),
                    stopping: AtomicBool::new(false),
                }),
            },
            relay,
            schedules,
            arbiters,
            settings,
        })
    }
}

/// Takes every member lease, waiting up to `wait` for leases another
/// process holds (it may have been killed a moment ago).
async fn acquire_all(
    broker: &Arc<dyn Broker>,
    runtimes: &[Arc<GroupRuntime>],
    leases: &[Lease],
    ttl: Duration,
    wait: Duration,
) -> Result<()> {
    let give_up = Instant::now() + wait;
    let mut announced = false;
    for (rt, lease) in runtimes.iter().zip(leases) {
        loop {
            let held = broker
                .acquire_leases(&lease.keys, &lease.token, ttl)
                .await?;
            let Some(missing) = held.iter().position(|h| !h) else {
                break;
            };
            if Instant::now() >= give_up {
                let all: Vec<String> = leases.iter().flat_map(|l| l.keys.clone()).collect();
                let _ = broker.release_leases(&all, &lease.token).await;
                return Err(Error::LeaseHeld {
                    stream: rt.target.stream().to_owned(),
                    group: rt.target.name().to_owned(),
                    member: rt.options.member_names[missing].to_string(),
                    key: lease.keys[missing].clone(),
                });
            }
            if !announced {
                tracing::warn!(
                    stream = %rt.target.stream(), group = %rt.target.name(),
                    member = %rt.options.member_names[missing],
                    "member name is leased by another process; waiting up to {wait:?} for it to expire",
                );
                announced = true;
            }
            tokio::time::sleep(
                (ttl / 10).clamp(Duration::from_millis(50), Duration::from_millis(500)),
            )
            .await;
        }
    }
    Ok(())
}

/// What a graceful stop did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Entries still running at the deadline: not acked, released at once
    /// to other processes.
    pub released: usize,
    /// Whether every ack, retry and dead-letter decision was written.
    pub settled: bool,
    /// How long the stop took.
    pub took: Duration,
}

/// The running actor system: the producer and one supervisor per group.
/// The one handle to start ([`Processor::builder`]) and stop
/// ([`Processor::shutdown`]).
///
/// ```no_run
/// use redstream::{handler_fn, Event, Group, Meta, Outcome, Processor, Settings};
///
/// #[actix::main]
/// async fn main() -> redstream::Result<()> {
///     let settings = Settings::load()?;
///     let orders = handler_fn(|order: serde_json::Value, meta: Meta| async move {
///         println!("{} attempt {}: {order}", meta.entry_id(), meta.attempt());
///         Ok(Outcome::Ack)
///     });
///     let processor = Processor::builder(settings)
///         .group(Group::new("orders", "order-processing", orders).with_members(4))
///         .start()
///         .await?;
///     processor
///         .producer()
///         .publish("orders", Event::new("order.created", &serde_json::json!({"order_id": "o-1"}))?)
///         .await?;
///     processor.run_until_signal().await?;
///     Ok(())
/// }
/// ```
pub struct Processor {
    handle: ProcessorHandle,
    relay: Option<Addr<OutboxRelay>>,
    schedules: Vec<ScheduleHandle>,
    arbiters: Vec<Arbiter>,
    settings: Settings,
}

/// A running schedule, as the processor keeps it.
struct ScheduleHandle {
    name: Arc<str>,
    addr: Addr<SchedulerActor>,
    counters: Arc<ScheduleCounters>,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("handle", &self.handle)
            .finish_non_exhaustive()
    }
}

impl Processor {
    /// Starts building a processor from settings.
    pub fn builder(settings: Settings) -> ProcessorBuilder {
        ProcessorBuilder {
            settings,
            groups: Vec::new(),
            schedules: Vec::new(),
            outbox: None,
            max_lens: HashMap::new(),
            broker: None,
        }
    }

    /// A clonable view for publishing, status and health probes (share it
    /// with actix-web handlers through `web::Data`).
    pub fn handle(&self) -> ProcessorHandle {
        self.handle.clone()
    }

    /// The publishing handle.
    pub fn producer(&self) -> Producer {
        self.handle.producer()
    }

    /// This process's instance name (member names are `<instance>-<i>`).
    pub fn instance(&self) -> &str {
        self.handle.instance()
    }

    /// The Redis server's version and data-loss warnings, read at start.
    pub fn server(&self) -> &ServerReport {
        self.handle.server()
    }

    /// The status of every group.
    pub async fn status(&self) -> Result<Vec<GroupStatus>> {
        self.handle.status().await
    }

    /// The status of one group.
    pub async fn group_status(&self, stream: &str, group: &str) -> Result<GroupStatus> {
        self.handle.group_status(stream, group).await
    }

    /// What the schedule named `name` has done, if there is one.
    pub fn schedule_stats(&self, name: &str) -> Option<ScheduleStats> {
        self.schedules
            .iter()
            .find(|s| &*s.name == name)
            .map(|s| s.counters.snapshot())
    }

    /// Redis, databases and groups: see [`ProcessorHandle::health`].
    pub async fn health(&self) -> Health {
        self.handle.health().await
    }

    /// Stops in order: schedules stop ticking and a run in progress may
    /// finish publishing; members stop reading and finish running handlers by
    /// `shutdown.deadline_ms`; their acks, retries and dead letters are
    /// written; entries still running at the deadline are released (not
    /// acked); the outbox relay makes a last pass; then the producer writes
    /// what it holds and refuses more.
    pub async fn shutdown(self) -> Result<ShutdownReport> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.settings.shutdown.deadline_ms);
        self.handle.mark_stopping();
        let inner = &self.handle.inner;
        let schedule_stops = self.schedules.iter().map(|s| s.addr.send(StopSchedule));
        let schedules_stopped = tokio::time::timeout(
            deadline.saturating_duration_since(Instant::now()),
            futures_util::future::join_all(schedule_stops),
        )
        .await
        .is_ok();
        if !schedules_stopped {
            tracing::warn!("a scheduled run was still running at the shutdown deadline");
        }
        let stops = inner
            .groups
            .iter()
            .map(|g| g.addr.send(StopGroup { deadline }));
        let reports: Vec<GroupStopReport> = futures_util::future::join_all(stops)
            .await
            .into_iter()
            .map(|r| {
                r.unwrap_or(GroupStopReport {
                    released: 0,
                    settled: false,
                })
            })
            .collect();
        if let Some(relay) = &self.relay {
            // A last pass, so rows committed by the handlers just stopped go
            // out. It ends by the deadline even while the database is down;
            // giving up the lease takes half a second more at most.
            let _ = tokio::time::timeout(
                deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1),
                relay.send(StopRelay { deadline }),
            )
            .await;
        }
        inner.producer.close();
        let flush_for = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(5);
        let flushed = tokio::time::timeout(flush_for, inner.producer.actor().send(Flush))
            .await
            .is_ok_and(|r| r.is_ok());
        if !flushed {
            tracing::error!("the producer did not finish writing before the deadline");
        }
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
        let report = ShutdownReport {
            released: reports.iter().map(|r| r.released).sum(),
            settled: flushed && reports.iter().all(|r| r.settled),
            took: started.elapsed(),
        };
        tracing::info!(
            released = report.released, settled = report.settled, took = ?report.took,
            "redstream processor stopped",
        );
        Ok(report)
    }

    /// Runs until SIGINT or SIGTERM, then [`Processor::shutdown`].
    pub async fn run_until_signal(self) -> Result<ShutdownReport> {
        wait_for_signal().await;
        tracing::info!("stop signal received; shutting down");
        self.shutdown().await
    }
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
