//! [`Leases`] for Redis: one string key per lease holding its token, taken
//! and released by scripts that check the token.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::{RedisBroker, lease_prefix};
use crate::broker::{Leases, MemberRef};
use crate::error::Result;

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
        let mut invocation = self.inner.scripts.lease_acquire.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        invocation.arg(token).arg(ttl.as_millis() as u64);
        let held: Vec<i64> = invocation.invoke_async(&mut self.conn()).await?;
        Ok(held.into_iter().map(|h| h == 1).collect())
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
