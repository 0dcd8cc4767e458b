//! [`Leases`] for Redis: one string key per lease holding its token, taken
//! and released by scripts that check the token.
//!
//! Calls that arrive together go out together: the renewals of thousands
//! of groups fall due at the same moment (their timers are aligned), and
//! are gathered for [`GATHER`] into one script call per
//! [`KEYS_PER_CALL`] keys, instead of one call per group.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use redis::Value;
use tokio::sync::oneshot;

use super::{RedisBroker, lease_prefix};
use crate::broker::{Leases, MemberRef};
use crate::error::{Error, Result};

/// How long the first of a batch of lease calls waits for companions.
const GATHER: Duration = Duration::from_millis(1);
/// Most keys one lease script call takes.
const KEYS_PER_CALL: usize = 1_000;

/// Lease calls waiting to go out together.
#[derive(Default)]
pub(super) struct LeaseCalls {
    waiting: Mutex<Vec<LeaseCall>>,
}

struct LeaseCall {
    keys: Vec<String>,
    token: String,
    ttl_ms: u64,
    reply: oneshot::Sender<Result<Vec<bool>>>,
}

impl RedisBroker {
    /// Sends the lease calls gathered so far: one script call per token,
    /// lifetime and [`KEYS_PER_CALL`] keys.
    async fn acquire_gathered(&self) {
        let calls = std::mem::take(
            &mut *self
                .inner
                .lease_calls
                .waiting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let mut by_lease: HashMap<(String, u64), Vec<LeaseCall>> = HashMap::new();
        for call in calls {
            by_lease
                .entry((call.token.clone(), call.ttl_ms))
                .or_default()
                .push(call);
        }
        for ((token, ttl_ms), calls) in by_lease {
            let keys: Vec<&String> = calls.iter().flat_map(|c| &c.keys).collect();
            let mut held = Vec::with_capacity(keys.len());
            let mut failure = None;
            for chunk in keys.chunks(KEYS_PER_CALL) {
                match self.acquire_once(chunk, &token, ttl_ms).await {
                    Ok(part) => held.extend(part),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            let mut held = held.into_iter();
            for call in calls {
                let reply = match &failure {
                    Some(e) => Err(e.clone_for_caller()),
                    None => Ok(held.by_ref().take(call.keys.len()).collect()),
                };
                let _ = call.reply.send(reply);
            }
        }
    }

    async fn acquire_once(&self, keys: &[&String], token: &str, ttl_ms: u64) -> Result<Vec<bool>> {
        let mut invocation = self.inner.scripts.lease_acquire.prepare_invoke();
        for key in keys {
            invocation.key(*key);
        }
        invocation.arg(token).arg(ttl_ms);
        let held: Vec<i64> = invocation.invoke_async(&mut self.conn()).await?;
        if held.len() != keys.len() {
            return Err(super::reply::unexpected(
                "EVALSHA (lease)",
                "not one answer per key",
            ));
        }
        Ok(held.into_iter().map(|h| h == 1).collect())
    }
}

#[async_trait]
impl Leases for RedisBroker {
    async fn acquire_leases(
        &self,
        keys: &[String],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<bool>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = oneshot::channel();
        let first = {
            let mut waiting = self
                .inner
                .lease_calls
                .waiting
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            waiting.push(LeaseCall {
                keys: keys.to_vec(),
                token: token.to_owned(),
                ttl_ms: crate::clock::millis(ttl),
                reply,
            });
            waiting.len() == 1
        };
        if first {
            // A task of its own: the batch goes out even if this caller
            // stops waiting.
            let broker = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(GATHER).await;
                broker.acquire_gathered().await;
            });
        }
        answer.await.map_err(|_| Error::Stopped)?
    }

    async fn release_leases(&self, keys: &[String], token: &str) -> Result<()> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut invocation = self.inner.scripts.lease_release.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation.arg(token);
        let _: Value = invocation.invoke_async(&mut self.conn()).await?;
        Ok(())
    }

    fn lease_key(&self, member: &MemberRef) -> String {
        let group = member.group();
        format!(
            "{}{}",
            lease_prefix(group.stream(), group.name()),
            member.member()
        )
    }
}
