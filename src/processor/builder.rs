//! [`ProcessorBuilder`]: what to run, and `start`, in named steps.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::{StreamExt, TryStreamExt};

use super::run_time::GroupsAtRunTime;
use super::{Group, Processor, ScheduleHandle};
use crate::broker::{Broker, Diagnostics, GroupRef, Leases, RedisBroker, ServerReport, Streams};
use crate::error::{Error, Result};
use crate::group::GroupRuntime;
use crate::group::budget::ReadBudget;
use crate::group::supervisor::{GroupSupervisor, Lease};
use crate::handle::{GroupHandle, Inner as HandleInner, ProcessorHandle};
use crate::metrics::GroupMetrics;
use crate::producer::actor::{ProducerActor, ProducerOptions, StatCounters};
use crate::producer::{Producer, ProducerLimits, new_event_id};
use crate::schedule::actor::SchedulerActor;
use crate::schedule::{Schedule, ScheduleCounters};
use crate::settings::{IdFormat, Settings};
use crate::store::{OutboxRelay, RelayOptions, Store};

/// Builds a [`Processor`].
pub struct ProcessorBuilder {
    pub(super) settings: Settings,
    pub(super) groups: Vec<Group>,
    pub(super) schedules: Vec<Schedule>,
    pub(super) outbox: Option<Store>,
    pub(super) max_lens: HashMap<String, u64>,
    pub(super) broker: Option<Arc<dyn Broker>>,
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
        self.settings.validate()?;
        check_schedules(&self.schedules)?;
        // For a host whose recorder was installed without `describe()`.
        crate::metrics::build_info();
        let instance = self.settings.instance.resolved_name();
        let broker: Arc<dyn Broker> = match self.broker {
            Some(b) => b,
            None => Arc::new(RedisBroker::connect(&self.settings.redis, &instance).await?),
        };
        let mut server = report_server(broker.as_ref()).await?;
        let runtimes = prepare_groups(
            &self.groups,
            &self.settings,
            &instance,
            &broker,
            &mut server,
        )
        .await?;
        let token: Arc<str> = Arc::from(process_token());
        let leases = take_leases(&broker, &runtimes, &self.settings, &token).await?;
        let settings = self.settings;
        let workers = match settings.consumer.workers {
            0 => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
                .min(4),
            n => n,
        };
        let arbiters: Vec<Arbiter> = (0..workers).map(|_| Arbiter::new()).collect();
        let handles: Arc<[ArbiterHandle]> = arbiters.iter().map(Arbiter::handle).collect();
        let producer = start_producer(&settings, &broker, self.max_lens);
        let next_member = AtomicUsize::new(0);
        let groups = start_groups(runtimes, leases, &handles, &next_member);
        let schedules = start_schedules(self.schedules, &producer, &broker);
        let stores = distinct_stores(&self.groups, self.outbox.as_ref());
        let relay = self
            .outbox
            .map(|store| start_relay(store, &producer, &settings));
        tracing::info!(
            instance = %instance, groups = groups.len(), workers,
            redis_version = %server.version, "redstream processor started",
        );
        Ok(Processor {
            handle: ProcessorHandle {
                inner: Arc::new(HandleInner {
                    producer,
                    groups: RwLock::new(groups),
                    admin: Arc::clone(&broker).admin(),
                    groups_at_run_time: GroupsAtRunTime {
                        settings: settings.clone(),
                        instance: instance.clone(),
                        broker: Arc::clone(&broker),
                        arbiters: handles,
                        token,
                        next_member,
                        changing: tokio::sync::Mutex::new(()),
                    },
                    broker,
                    stores: RwLock::new(stores),
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

/// Each schedule is valid, and no name is added twice.
fn check_schedules(schedules: &[Schedule]) -> Result<()> {
    let mut names = HashSet::new();
    for schedule in schedules {
        schedule.validate()?;
        if !names.insert(schedule.name.clone()) {
            return Err(Error::settings(
                "schedules",
                format!("schedule `{}` is added twice", schedule.name),
            ));
        }
    }
    Ok(())
}

/// The server's report, logged with its data-loss warnings.
async fn report_server(broker: &dyn Broker) -> Result<ServerReport> {
    let server = broker.server_report().await?;
    tracing::info!(
        server = %server.server,
        newer_commands = %server.features.describe(),
        "connected to the stream server"
    );
    for warning in &server.warnings {
        tracing::warn!(redis_version = %server.version, "{warning}");
    }
    Ok(server)
}

/// Creates every missing group and resolves each group's options into its
/// runtime. A group added twice is a settings error.
/// Consumer groups created (or found) at once at start-up.
const ENSURE_AT_ONCE: usize = 64;

pub(super) async fn prepare_groups(
    groups: &[Group],
    settings: &Settings,
    instance: &str,
    broker: &Arc<dyn Broker>,
    server: &mut ServerReport,
) -> Result<Vec<Arc<GroupRuntime>>> {
    let mut seen = HashSet::new();
    let mut seen_many = HashSet::new();
    let mut runtimes = Vec::with_capacity(groups.len());
    if let Some(needs) = broker.capabilities().needing_redelivery()
        && Arc::clone(broker).redelivery().is_none()
    {
        return Err(Error::settings(
            "broker",
            format!(
                "its capabilities ({needs}) need the Redelivery trait, which it does not implement"
            ),
        ));
    }
    let mut resolved = Vec::with_capacity(groups.len());
    for group in groups {
        if !seen.insert((group.stream.clone(), group.group.clone())) {
            return Err(Error::settings(
                "groups",
                format!(
                    "group `{}` on stream `{}` is added twice",
                    group.group, group.stream
                ),
            ));
        }
        resolved.push(group.resolve(settings, instance)?);
    }
    // Created concurrently: thousands of groups start in a few round trips'
    // time, not one after the other.
    let created: Vec<bool> = futures_util::stream::iter(groups.iter().zip(&resolved).map(
        |(group, options)| async move {
            let target = GroupRef::new(group.stream.as_str(), group.group.as_str());
            broker.ensure_group(&target, options.start_from).await
        },
    ))
    .buffered(ENSURE_AT_ONCE)
    .try_collect()
    .await?;
    for ((group, mut options), created) in groups.iter().zip(resolved).zip(created) {
        let target = GroupRef::new(group.stream.as_str(), group.group.as_str());
        if created {
            tracing::info!(stream = %group.stream, group = %group.group, "created consumer group");
        }
        if settings.retention.delete_acked {
            // Deleting what one group acked is safe only when no other
            // group reads the stream: here, or in another process.
            let here = groups.iter().filter(|g| g.stream == group.stream).count() as u64;
            let readers = broker.group_count(&group.stream).await?.max(here);
            options.delete_acked = readers == 1;
            if readers == 1 {
                tracing::info!(
                    stream = %group.stream, group = %group.group,
                    "retention.delete_acked: acked entries are deleted ({})",
                    if server.features.xackdel { "XACKDEL" } else { "script" }
                );
            } else if seen_many.insert(group.stream.clone()) {
                let warning = format!(
                    "retention.delete_acked is on, but `{}` is read by {readers} groups: its acked entries are kept",
                    group.stream
                );
                tracing::warn!("{warning}");
                server.warnings.push(warning);
            }
        }
        let budget = ReadBudget::new(options.max_pending);
        runtimes.push(Arc::new(GroupRuntime {
            metrics: GroupMetrics::new(&group.stream, &group.group, &options.member_names),
            streams: Arc::clone(broker) as Arc<dyn Streams>,
            redelivery: Arc::clone(broker).redelivery(),
            leases: Arc::clone(broker) as Arc<dyn Leases>,
            diagnostics: Arc::clone(broker) as Arc<dyn Diagnostics>,
            capabilities: broker.capabilities(),
            handler: group.handler.clone(),
            span: tracing::error_span!(
                "redstream.group",
                stream = %target.stream(),
                group = %target.name(),
            ),
            target,
            options,
            read_turns: Arc::new(tokio::sync::Semaphore::new(
                settings.consumer.blocked_readers,
            )),
            budget,
        }));
    }
    Ok(runtimes)
}

/// The lease token of this process: `<host>/<pid>/<ulid>`, unique per
/// process start, and telling an operator (`redstream consumers`) which
/// process holds a member name.
fn process_token() -> String {
    let host = gethostname::gethostname()
        .into_string()
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    format!(
        "{host}/{}/{}",
        std::process::id(),
        new_event_id(IdFormat::Ulid)
    )
}

/// Leases every member name of every group for this process (one token).
pub(super) async fn take_leases(
    broker: &Arc<dyn Broker>,
    runtimes: &[Arc<GroupRuntime>],
    settings: &Settings,
    token: &Arc<str>,
) -> Result<Vec<Lease>> {
    let mut leases = Vec::with_capacity(runtimes.len());
    for rt in runtimes {
        let keys: Vec<String> = rt
            .options
            .member_names
            .iter()
            .map(|m| broker.lease_key(&rt.target.member(Arc::clone(m))))
            .collect();
        leases.push(Lease {
            token: Arc::clone(token),
            keys,
        });
    }
    let wait = Duration::from_millis(settings.reclaim.lease_wait_ms);
    let ttl = Duration::from_millis(settings.reclaim.lease_ttl_ms);
    acquire_all(broker, runtimes, &leases, ttl, wait).await?;
    Ok(leases)
}

/// The producer actor and its handle.
fn start_producer(
    settings: &Settings,
    broker: &Arc<dyn Broker>,
    max_lens: HashMap<String, u64>,
) -> Producer {
    let p = &settings.producer;
    let stats = Arc::new(StatCounters::default());
    let permits = Arc::new(tokio::sync::Semaphore::new(p.buffer));
    let producer_actor = ProducerActor::new(
        Arc::clone(broker) as Arc<dyn Streams>,
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
    Producer::new(
        producer_actor,
        stats,
        permits,
        ProducerLimits {
            capacity: p.buffer,
            max_payload: p.max_payload_bytes,
            id_format: p.id_format,
            default_max_len: (p.max_len > 0).then_some(p.max_len),
            max_lens,
        },
    )
}

/// One supervisor per group; members are spread over the arbiters, from
/// `next_member` on (which moves past them).
pub(super) fn start_groups(
    runtimes: Vec<Arc<GroupRuntime>>,
    leases: Vec<Lease>,
    handles: &Arc<[ArbiterHandle]>,
    next_member: &AtomicUsize,
) -> Vec<GroupHandle> {
    let mut groups = Vec::with_capacity(runtimes.len());
    for (rt, lease) in runtimes.into_iter().zip(leases) {
        let members = rt.options.member_names.len();
        let offset = next_member.fetch_add(members, Ordering::Relaxed);
        let supervisor =
            GroupSupervisor::new(Arc::clone(&rt), Arc::clone(handles), offset, lease).start();
        groups.push(GroupHandle {
            stream: Arc::clone(rt.target.stream_arc()),
            group: Arc::clone(rt.target.name_arc()),
            addr: supervisor,
            unready_after: rt.options.unready_after,
        });
    }
    groups
}

/// One actor per schedule, timed by the broker's clock.
fn start_schedules(
    schedules: Vec<Schedule>,
    producer: &Producer,
    broker: &Arc<dyn Broker>,
) -> Vec<ScheduleHandle> {
    schedules
        .into_iter()
        .map(|s| {
            let counters = Arc::new(ScheduleCounters::new(&s.name));
            let name = Arc::clone(&s.name);
            let addr = SchedulerActor::new(
                s,
                producer.clone(),
                Arc::clone(broker) as Arc<dyn Diagnostics>,
                Arc::clone(&counters),
            )
            .start();
            ScheduleHandle {
                name,
                addr,
                counters,
            }
        })
        .collect()
}

/// The stores the groups and the outbox use, each once (for health checks).
fn distinct_stores(groups: &[Group], outbox: Option<&Store>) -> Vec<Store> {
    let mut stores: Vec<Store> = Vec::new();
    for store in groups.iter().filter_map(|g| g.store.as_ref()).chain(outbox) {
        if !stores.iter().any(|s| s.same_as(store)) {
            stores.push(store.clone());
        }
    }
    stores
}

/// The outbox relay of `store`.
fn start_relay(store: Store, producer: &Producer, settings: &Settings) -> Addr<OutboxRelay> {
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
    // Every lease in one call first (the usual case: none is held
    // elsewhere); then group by group, waiting where one is.
    if let Some(first) = leases.first() {
        let all: Vec<String> = leases.iter().flat_map(|l| l.keys.clone()).collect();
        if broker
            .acquire_leases(&all, &first.token, ttl)
            .await?
            .iter()
            .all(|held| *held)
        {
            return Ok(());
        }
    }
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
