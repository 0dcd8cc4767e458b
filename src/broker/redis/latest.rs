//! The Redis commands of [`LatestValues`](crate::LatestValues): a
//! compare-and-set of a hash field by version (a Lua script), and reads.

use redis::Value;

use super::RedisBroker;
use super::reply::{text, unexpected};
use crate::error::Result;
use crate::latest::{Applied, Version};

/// The hash holding the versions of the values in `key`.
pub(crate) fn version_key(key: &str) -> String {
    format!("{key}:version")
}

/// Parses a stored `<at_ms>:<tiebreak>` version.
fn parse_version(raw: &str) -> Option<Version> {
    let (at, tiebreak) = raw.split_once(':')?;
    Some(Version::new(at.parse().ok()?, tiebreak.parse().ok()?))
}

/// Values as bytes (RESP2 bulk strings or RESP3 verbatim text).
fn bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        _ => None,
    }
}

impl RedisBroker {
    /// Writes `value` as the value of `field` in hash `key` if `version` is
    /// newer than the stored one, atomically.
    pub(crate) async fn latest_put(
        &self,
        key: &str,
        field: &str,
        version: Version,
        value: &[u8],
    ) -> Result<Applied> {
        let outcome: i64 = self
            .inner
            .scripts
            .latest_put
            .key(key)
            .key(version_key(key))
            .arg(field)
            .arg(version.at_ms())
            .arg(version.tiebreak())
            .arg(value)
            .invoke_async(&mut self.conn())
            .await?;
        Ok(match outcome {
            1 => Applied::Updated,
            0 => Applied::Unchanged,
            _ => Applied::Stale,
        })
    }

    /// The value and version of `field`, if set.
    pub(crate) async fn latest_get(
        &self,
        key: &str,
        field: &str,
    ) -> Result<Option<(Vec<u8>, Version)>> {
        let (value, version): (Value, Value) = redis::pipe()
            .cmd("HGET")
            .arg(key)
            .arg(field)
            .cmd("HGET")
            .arg(version_key(key))
            .arg(field)
            .query_async(&mut self.conn())
            .await?;
        let (Some(value), Some(version)) = (bytes(value), text(&version)) else {
            return Ok(None);
        };
        let version =
            parse_version(&version).ok_or_else(|| unexpected("HGET", "malformed version"))?;
        Ok(Some((value, version)))
    }

    /// Every field of hash `key` with its value and version, sorted by field.
    /// Fields without a readable version are left out.
    pub(crate) async fn latest_all(&self, key: &str) -> Result<Vec<(String, Vec<u8>, Version)>> {
        let (values, versions): (Value, Value) = redis::pipe()
            .cmd("HGETALL")
            .arg(key)
            .cmd("HGETALL")
            .arg(version_key(key))
            .query_async(&mut self.conn())
            .await?;
        let versions: std::collections::HashMap<String, Version> = pairs(versions)
            .into_iter()
            .filter_map(|(f, v)| {
                let v = String::from_utf8(v).ok()?;
                Some((f, parse_version(&v)?))
            })
            .collect();
        let mut out: Vec<(String, Vec<u8>, Version)> = pairs(values)
            .into_iter()
            .filter_map(|(f, v)| {
                let version = *versions.get(&f)?;
                Some((f, v, version))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// The field/value pairs of an HGETALL reply (a flat RESP2 array or a RESP3
/// map); non-UTF-8 field names are left out.
fn pairs(v: Value) -> Vec<(String, Vec<u8>)> {
    match v {
        Value::Array(flat) => {
            let mut out = Vec::with_capacity(flat.len() / 2);
            let mut it = flat.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let (Some(k), Some(v)) = (text(&k), bytes(v)) {
                    out.push((k, v));
                }
            }
            out
        }
        Value::Map(map) => map
            .into_iter()
            .filter_map(|(k, v)| Some((text(&k)?, bytes(v)?)))
            .collect(),
        _ => Vec::new(),
    }
}
