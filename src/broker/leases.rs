//! Named leases: a key held by one token for a lifetime, renewed by its
//! holder. The runtime leases member names (one live process per name); a
//! coordinator behind this trait can live in Redis even when the stream
//! broker is another one.

use std::time::Duration;

use async_trait::async_trait;

use super::MemberRef;
use crate::error::Result;

/// Leases on keys.
#[async_trait]
pub trait Leases: Send + Sync + 'static {
    /// Takes or renews leases (`true` per key held by `token` afterwards).
    async fn acquire_leases(
        &self,
        keys: &[String],
        token: &str,
        ttl: Duration,
    ) -> Result<Vec<bool>>;

    /// Gives up leases still held by `token`.
    async fn release_leases(&self, keys: &[String], token: &str) -> Result<()>;

    /// The lease key of a member's name.
    fn lease_key(&self, member: &MemberRef) -> String;
}
