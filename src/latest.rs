//! The newest value per key, in a Redis hash, safe against out-of-order
//! updates.
//!
//! History belongs in the database; dashboards and other services often only
//! want "the latest price of AAPL". [`LatestValues`] keeps that in a Redis
//! hash, written from a handler in the same step as its database write.
//!
//! **The rule for out-of-order updates:** every write carries a [`Version`]
//! — a time in ms (usually the source's own timestamp, not the arrival
//! time) and a tiebreak number. A write lands only if its version is greater
//! than the stored one: time first, then tiebreak. So an older event never
//! overwrites a newer one, whatever order redeliveries, retries or several
//! members deliver them in, and the same version written twice is a no-op
//! ([`Applied::Unchanged`]); two different values with equal versions keep
//! the one written first, so give versions a tiebreak that differs between
//! them (a sequence number, or [`Version::from_entry_id`]). The comparison
//! and the write are one Lua script, atomic in Redis.
//!
//! **With a [`TxHandler`](crate::TxHandler):** put the value *after* the
//! database writes, as the handler's last step. A failing write then stops
//! the handler before Redis is touched; if the commit itself fails after the
//! put, the entry is retried, and its put is repeated harmlessly (same
//! version). Redis and the database are not one transaction: an event that
//! is finally dead-lettered after its put leaves its value in Redis.
//!
//! Keys: the values in hash `<key>` (field → value, readable with
//! `redis-cli HGETALL <key>`), their versions in `<key>:version` (field →
//! `<at_ms>:<tiebreak>`). On a Redis Cluster, put a hash tag in `key`
//! (`{market}:latest`) so both hashes share a slot.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::broker::RedisBroker;
use crate::error::{Error, Result};

/// The largest version part: Lua compares numbers as doubles, which hold
/// integers exactly up to 2^53.
pub const MAX_VERSION_PART: u64 = (1 << 53) - 1;

/// The order of a value: compared by time, then tiebreak.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    at_ms: u64,
    tiebreak: u64,
}

impl Version {
    /// A version at `at_ms` (ms since the Unix epoch, usually the source's
    /// timestamp) with a `tiebreak` for equal times (a sequence number).
    /// Both must be at most [`MAX_VERSION_PART`], checked when written.
    pub fn new(at_ms: u64, tiebreak: u64) -> Self {
        Version { at_ms, tiebreak }
    }

    /// The order of a stream entry: its id `<ms>-<seq>` as `(ms, seq)`.
    /// Use it when arrival order in the stream is the order you want.
    pub fn from_entry_id(id: &str) -> Result<Self> {
        let invalid = || Error::InvalidEvent {
            reason: format!("`{id}` is not a stream entry id (<ms>-<seq>)"),
        };
        let (ms, seq) = id.split_once('-').ok_or_else(invalid)?;
        Ok(Version::new(
            ms.parse().map_err(|_| invalid())?,
            seq.parse().map_err(|_| invalid())?,
        ))
    }

    /// The time part.
    pub fn at_ms(&self) -> u64 {
        self.at_ms
    }

    /// The tiebreak part.
    pub fn tiebreak(&self) -> u64 {
        self.tiebreak
    }

    fn check(&self) -> Result<()> {
        if self.at_ms > MAX_VERSION_PART || self.tiebreak > MAX_VERSION_PART {
            return Err(Error::InvalidEvent {
                reason: format!(
                    "latest-value version {}:{} has a part above 2^53 - 1",
                    self.at_ms, self.tiebreak
                ),
            });
        }
        Ok(())
    }
}

/// What a write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Applied {
    /// The value was newer and is now the latest.
    Updated,
    /// The same version is already stored (a redelivery): nothing changed.
    Unchanged,
    /// A newer version is stored: nothing changed.
    Stale,
}

impl Applied {
    /// Whether the value was written.
    pub fn is_updated(self) -> bool {
        self == Applied::Updated
    }
}

/// A field's latest value with its version.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Latest<T> {
    /// The field.
    pub field: String,
    /// Its value.
    pub value: T,
    /// Its version.
    pub version: Version,
}

/// The newest value per field in one Redis hash, written only forward in
/// [`Version`] order: a write lands only if its version is greater than
/// the stored one (time first, then tiebreak), so an older event never
/// overwrites a newer one, and the same version written twice is a no-op
/// ([`Applied::Unchanged`]).
///
/// ```no_run
/// # async fn demo() -> redstream::Result<()> {
/// use redstream::{Applied, LatestValues, RedisBroker, Settings, Version};
///
/// let settings = Settings::load()?;
/// let broker = RedisBroker::connect(&settings.redis, "scanner-latest").await?;
/// let latest = LatestValues::new(&broker, "market:latest");
///
/// let newer = latest.put_json("AAPL:quote", Version::new(1_700_000_060_000, 2), &190.5).await?;
/// let older = latest.put_json("AAPL:quote", Version::new(1_700_000_000_000, 1), &189.0).await?;
/// assert_eq!((newer, older), (Applied::Updated, Applied::Stale));
/// let now = latest.get_json::<f64>("AAPL:quote").await?;
/// assert_eq!(now.map(|l| l.value), Some(190.5));
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct LatestValues {
    broker: RedisBroker,
    key: Arc<str>,
}

impl LatestValues {
    /// The map in hash `key` (and `<key>:version`), through `broker`'s
    /// shared connection.
    pub fn new(broker: &RedisBroker, key: impl Into<String>) -> Self {
        LatestValues {
            broker: broker.clone(),
            key: Arc::from(key.into()),
        }
    }

    /// The hash key of the values.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Makes `value` the latest of `field` if `version` is newer than the
    /// stored one (atomically).
    pub async fn put(
        &self,
        field: &str,
        version: Version,
        value: impl AsRef<[u8]>,
    ) -> Result<Applied> {
        version.check()?;
        self.broker
            .latest_put(&self.key, field, version, value.as_ref())
            .await
    }

    /// [`LatestValues::put`] with the value as JSON.
    pub async fn put_json<T: Serialize + ?Sized>(
        &self,
        field: &str,
        version: Version,
        value: &T,
    ) -> Result<Applied> {
        let json = serde_json::to_vec(value).map_err(Error::Encode)?;
        self.put(field, version, json).await
    }

    /// The latest value of `field`, if any.
    pub async fn get(&self, field: &str) -> Result<Option<Latest<Vec<u8>>>> {
        Ok(self
            .broker
            .latest_get(&self.key, field)
            .await?
            .map(|(value, version)| Latest {
                field: field.to_owned(),
                value,
                version,
            }))
    }

    /// The latest value of `field` decoded from JSON; a value that does not
    /// decode as `T` is an [`Error::UnexpectedReply`].
    pub async fn get_json<T: DeserializeOwned>(&self, field: &str) -> Result<Option<Latest<T>>> {
        let Some(latest) = self.get(field).await? else {
            return Ok(None);
        };
        let value = decode(&latest.field, &latest.value)?;
        Ok(Some(Latest {
            field: latest.field,
            value,
            version: latest.version,
        }))
    }

    /// Every field's latest value, sorted by field.
    pub async fn all(&self) -> Result<Vec<Latest<Vec<u8>>>> {
        Ok(self
            .broker
            .latest_all(&self.key)
            .await?
            .into_iter()
            .map(|(field, value, version)| Latest {
                field,
                value,
                version,
            })
            .collect())
    }

    /// Every field's latest value decoded from JSON, sorted by field;
    /// values that do not decode as `T` are left out (and logged), so one
    /// foreign field cannot hide the others.
    pub async fn all_json<T: DeserializeOwned>(&self) -> Result<Vec<Latest<T>>> {
        Ok(self
            .all()
            .await?
            .into_iter()
            .filter_map(|l| match decode(&l.field, &l.value) {
                Ok(value) => Some(Latest {
                    field: l.field,
                    value,
                    version: l.version,
                }),
                Err(e) => {
                    tracing::warn!(key = %self.key, "{e}");
                    None
                }
            })
            .collect())
    }
}

fn decode<T: DeserializeOwned>(field: &str, value: &[u8]) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| Error::UnexpectedReply {
        command: "HGET",
        detail: format!("latest value of `{field}` is not the expected JSON: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_time_then_tiebreak() {
        assert!(Version::new(2, 0) > Version::new(1, 99));
        assert!(Version::new(2, 1) > Version::new(2, 0));
        assert_eq!(
            Version::from_entry_id("1700000000000-7").ok(),
            Some(Version::new(1_700_000_000_000, 7))
        );
        assert!(Version::from_entry_id("abc").is_err());
        assert!(Version::from_entry_id("1-x").is_err());
        assert!(Version::new(MAX_VERSION_PART, 0).check().is_ok());
        assert!(Version::new(MAX_VERSION_PART + 1, 0).check().is_err());
        assert!(Version::new(0, u64::MAX).check().is_err());
    }
}
