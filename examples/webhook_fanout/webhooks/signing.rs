//! Standard Webhooks signatures: HMAC-SHA256 over `{id}.{timestamp}.{body}`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`, the Standard
/// Webhooks signature.
pub(crate) fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).map_err(|e| format!("hmac key: {e}"))?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    Ok(format!("v1,{}", BASE64.encode(mac.finalize().into_bytes())))
}

/// Whether one of the space-separated `v1,<sig>` in `header` is the
/// signature of this message (constant-time comparison).
pub(crate) fn verify(key: &[u8], id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
    header.split(' ').any(|candidate| {
        let Some(sig) = candidate.strip_prefix("v1,") else {
            return false;
        };
        let Ok(sig) = BASE64.decode(sig) else {
            return false;
        };
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
            return false;
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&sig).is_ok()
    })
}
