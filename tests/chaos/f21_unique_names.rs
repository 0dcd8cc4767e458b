//! F21 (a): consumer identity across restarts. Workers use process-unique
//! member names (`CHAOS_UNIQUE_NAMES=1`: `<instance>-p<pid>-<i>`), and are
//! restarted under load, killed with SIGKILL or SIGTERM at random. Every
//! restart leaves its old names behind in the group; the reclaimer must
//! claim what they held and remove them (`DELCONSUMER` only when nothing is
//! pending), so `XINFO CONSUMERS` stays bounded and no entry is lost.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::db::Backend;
use crate::harness::{Chaos, SERIAL, Tier};

/// Worker processes, and members in each.
const WORKERS: usize = 2;
const MEMBERS: usize = 2;

/// Longest a gone process's names may stay in the group: its entries are
/// reclaimed after min_idle (1.5 s), its lease expires (2 s), the names must
/// be idle 1 s, and a cleanup round runs after a full scan (every 1 s at
/// most): about 4–5 s, asserted with room for a loaded machine.
const LINGER_MAX: Duration = Duration::from_secs(15);

/// Names of gone processes: when their process stopped, and when a name of
/// it was last seen in `XINFO CONSUMERS`.
#[derive(Default)]
struct Gone {
    stopped: HashMap<String, Instant>,
    last_seen: HashMap<String, Instant>,
}

impl Gone {
    fn observe(&mut self, consumers: &[String]) {
        let now = Instant::now();
        for name in consumers {
            // Member names are `<instance>-<i>`.
            if let Some((instance, _)) = name.rsplit_once('-')
                && self.stopped.contains_key(instance)
            {
                self.last_seen.insert(instance.to_owned(), now);
            }
        }
    }

    /// The longest time from a process's stop to the last sight of a name.
    fn max_linger(&self) -> Duration {
        self.last_seen
            .iter()
            .map(|(i, seen)| seen.saturating_duration_since(self.stopped[i]))
            .max()
            .unwrap_or_default()
    }
}

async fn run(backend: Backend, tier: Tier) {
    let _serial = SERIAL.lock().await;
    let Some(mut c) = Chaos::new("F21 unique names restarts", backend, "aof-always", &[]).await
    else {
        return;
    };
    let n = tier.pick(3_000, 100_000);
    let restarts = tier.pick(50, 300);
    c.set_env("CHAOS_UNIQUE_NAMES", 1);
    // Names of gone processes are removable soon: nothing pending, idle 1 s,
    // lease expired (lease_ttl 2 s); SIGKILLed ones' entries are reclaimed
    // after min_idle.
    c.set_env("REDSTREAM__RECLAIM__MIN_IDLE_MS", 1_500);
    c.set_env("REDSTREAM__RECLAIM__HEARTBEAT_MS", 500);
    c.set_env("REDSTREAM__RECLAIM__REMOVE_IDLE_CONSUMERS_MS", 1_000);
    for name in ["a", "b"] {
        c.spawn_worker(&format!("f21a-{name}"), MEMBERS, true).await;
    }
    let members = WORKERS * MEMBERS;
    c.start_sampler();
    let producing = c
        .start_producing(n, Duration::from_secs(tier.pick(15, 240)))
        .await;
    let mut max_consumers = c.consumers().await.len();
    let mut gone = Gone::default();
    let (mut kills, mut terms, mut unclean) = (0, 0, 0);
    for _ in 0..restarts {
        let pause = c.jitter_ms(100, 400);
        tokio::time::sleep(pause).await;
        let i = rand::Rng::random_range(&mut c.rng, 0..WORKERS);
        // A SIGTERM that lands before the signal handler is installed ends
        // the process by the default action: stop only started workers.
        assert!(
            c.workers[i].wait_started(Duration::from_secs(30)).await,
            "worker did not restart (seed {})",
            c.seed
        );
        c.sample_rss_now();
        c.fault();
        let instance = format!("{}-p{}", c.workers[i].instance, c.workers[i].pid());
        if rand::Rng::random_bool(&mut c.rng, 0.5) {
            kills += 1;
            c.workers[i].kill9();
        } else {
            terms += 1;
            let (_, clean) = c.workers[i].terminate(Duration::from_secs(15)).await;
            unclean += u32::from(!clean);
        }
        gone.stopped.insert(instance, Instant::now());
        c.respawn(i, MEMBERS, false).await;
        let consumers = c.consumers().await;
        gone.observe(&consumers);
        max_consumers = max_consumers.max(consumers.len());
    }
    let history = producing.await.expect("producer task");
    for w in &mut c.workers {
        assert!(w.wait_started(Duration::from_secs(30)).await);
    }
    let drain = c.wait_drained(Duration::from_secs(60)).await;
    // Names left by the last restarts go once their leases expire and they
    // have been idle long enough.
    let settle = Instant::now();
    let mut consumers = c.consumers().await;
    gone.observe(&consumers);
    max_consumers = max_consumers.max(consumers.len());
    while consumers.len() > members && settle.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        consumers = c.consumers().await;
        gone.observe(&consumers);
    }
    let linger = gone.max_linger();
    let settled_in = settle.elapsed();
    let pending = c.group_state().await.map(|(p, _)| p);
    let note = format!(
        "{restarts} restarts ({kills} SIGKILL, {terms} SIGTERM, unclean {unclean}) of {WORKERS}×{MEMBERS} members with process-unique names; consumers max {max_consumers} during the run, {} at the end (settled {:.1}s after drain); names of a gone process removed within {:.1}s (max); pending at end {}",
        consumers.len(),
        settled_in.as_secs_f64(),
        linger.as_secs_f64(),
        pending.map_or("?".to_owned(), |p| p.to_string()),
    );
    let (v, _) = c.finish(&history, drain, &note).await;
    c.assert_core(&v, drain);
    assert_eq!(v.dead_total(), 0, "{:?}", v.dead_lettered);
    assert_eq!(pending, Some(0), "entries still pending at the end");
    assert_eq!(unclean, 0, "a SIGTERM did not end in a clean exit");
    // Without removal every restart would add MEMBERS names (the group
    // would end with members + MEMBERS × restarts). Names of gone processes
    // may linger a few seconds (min_idle, lease, idle time, one cleanup
    // round), so the count during the run is restart rate × linger; what
    // users rely on is that each goes within a bound and none piles up.
    assert!(
        linger <= LINGER_MAX,
        "a gone process's names stayed {linger:?} in the group (seed {})",
        c.seed
    );
    assert!(
        max_consumers < members + MEMBERS * restarts as usize / 2,
        "consumers reached {max_consumers} (members {members}): names pile up (seed {})",
        c.seed
    );
    assert_eq!(
        consumers.len(),
        members,
        "names of gone processes were not removed: {consumers:?} (seed {})",
        c.seed
    );
    c.shutdown().await;
}

scenario_tests! {
    f21_unique_names_restarts_sqlite => run(Backend::Sqlite, Tier::from_env());
    f21_unique_names_restarts_pg => run(Backend::Postgres, Tier::from_env());
}
