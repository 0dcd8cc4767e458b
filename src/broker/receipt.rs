//! What a broker hands out with each delivery, and takes back to settle it.

use std::fmt;
use std::sync::Arc;

use crate::wire::RawEntry;

/// The broker's handle on one delivery: settling it (ack, retry,
/// dead-letter, release, heartbeat) takes this, never a backend detail.
/// Opaque to the runtime: the stream it came from and a token that only the
/// broker that issued it reads (Redis: the entry id; NATS: the reply
/// subject). Cheap to clone.
///
/// ```
/// use redstream::broker::Receipt;
///
/// let receipt = Receipt::new("orders", "1700000000000-0");
/// assert_eq!((receipt.stream(), receipt.token()), ("orders", "1700000000000-0"));
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Receipt {
    stream: Arc<str>,
    token: Arc<str>,
}

impl Receipt {
    /// A receipt for a delivery from `stream`, with the broker's `token`.
    pub fn new(stream: impl Into<Arc<str>>, token: impl Into<Arc<str>>) -> Self {
        Receipt {
            stream: stream.into(),
            token: token.into(),
        }
    }

    /// The stream the delivery came from.
    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The broker's token: meaningful only to the broker that issued it.
    pub fn token(&self) -> &str {
        &self.token
    }
}

impl fmt::Debug for Receipt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Receipt({}/{})", self.stream, self.token)
    }
}

/// One delivered entry with its receipt.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Delivery {
    /// The entry as stored (`fields` is `None` when its payload is gone).
    pub entry: RawEntry,
    /// What settling it takes.
    pub receipt: Receipt,
}

impl Delivery {
    /// A delivery of `entry` with `receipt`.
    pub fn new(entry: RawEntry, receipt: Receipt) -> Self {
        Delivery { entry, receipt }
    }

    /// The entry's id (its identity across deliveries).
    pub fn id(&self) -> &str {
        &self.entry.id
    }
}
