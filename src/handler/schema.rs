//! [`Schema`]: the version a handler reads, and the upcasters from older
//! versions.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::error::BoxError;
use crate::wire::{DecodeError, Entry};

type Upcaster = Arc<dyn Fn(serde_json::Value) -> Result<serde_json::Value, BoxError> + Send + Sync>;

/// The schema version a handler reads, with upcasters that turn payloads of
/// older versions into the next version.
///
/// An entry's version is its `v` field (1 when absent). An entry newer than
/// `current`, or older with a gap in the upcaster chain, is dead-lettered
/// with reason `unknown_schema_version`.
///
/// ```
/// use redstream::{BoxError, Schema};
/// use serde_json::{json, Value};
///
/// // v1 had `amount` in euros; v2 has `amount_cents`.
/// let schema = Schema::new(2).upcast(1, |mut v: Value| {
///     let euros = v["amount"].as_f64().ok_or("amount missing")?;
///     v["amount_cents"] = json!((euros * 100.0).round() as i64);
///     Ok::<_, BoxError>(v)
/// });
/// assert_eq!(schema.current(), 2);
/// ```
#[derive(Clone)]
pub struct Schema {
    current: u32,
    upcasters: BTreeMap<u32, Upcaster>,
}

impl Default for Schema {
    fn default() -> Self {
        Schema::new(1)
    }
}

impl fmt::Debug for Schema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Schema")
            .field("current", &self.current)
            .field("upcasts_from", &self.upcasters.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Schema {
    /// A schema whose current version is `current`.
    pub fn new(current: u32) -> Self {
        Schema {
            current,
            upcasters: BTreeMap::new(),
        }
    }

    /// The version handlers receive.
    pub fn current(&self) -> u32 {
        self.current
    }

    /// Registers the upcaster from version `from` to `from + 1`.
    pub fn upcast<F, E>(mut self, from: u32, f: F) -> Self
    where
        F: Fn(serde_json::Value) -> Result<serde_json::Value, E> + Send + Sync + 'static,
        E: Into<BoxError>,
    {
        self.upcasters
            .insert(from, Arc::new(move |v| f(v).map_err(Into::into)));
        self
    }

    /// Decodes an entry's payload into `T`, upcasting first if needed.
    pub fn decode<T: DeserializeOwned>(&self, entry: &Entry) -> Result<T, DecodeError> {
        let version = entry.version();
        let bad_json = |e: serde_json::Error| DecodeError::BadJson {
            detail: e.to_string(),
        };
        if version == self.current {
            return match entry.data() {
                Some(data) => serde_json::from_slice(data).map_err(bad_json),
                None => serde_json::from_value(entry.fields_as_json()?).map_err(bad_json),
            };
        }
        let unknown = DecodeError::UnknownVersion {
            version,
            current: self.current,
        };
        if version > self.current
            || !(version..self.current).all(|v| self.upcasters.contains_key(&v))
        {
            return Err(unknown);
        }
        let mut value = match entry.data() {
            Some(data) => serde_json::from_slice(data).map_err(bad_json)?,
            None => entry.fields_as_json()?,
        };
        for from in version..self.current {
            if let Some(up) = self.upcasters.get(&from) {
                value = up(value).map_err(|e| DecodeError::UpcastFailed {
                    from,
                    detail: e.to_string(),
                })?;
            }
        }
        serde_json::from_value(value).map_err(bad_json)
    }
}
