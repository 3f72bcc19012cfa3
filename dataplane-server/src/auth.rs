//! Challenge–response authentication on a shared secret.
//!
//! The server sends a random nonce of [`AUTH_NONCE_BYTES`]; the client answers
//! `HMAC-SHA256(token, nonce || volume name)`. The MAC binds the answer to the volume, so an
//! authenticated connection can only ever touch the volume it named.

use deltavol_schemas::{AUTH_MAC_BYTES, AUTH_NONCE_BYTES};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Cap on the auth token file.
pub const AUTH_TOKEN_MAX_BYTES: usize = 4096;

/// The client's answer to a challenge.
pub fn answer(token: &[u8], nonce: &[u8], volume: &str) -> [u8; AUTH_MAC_BYTES] {
    let mut mac = HmacSha256::new_from_slice(token).expect("HMAC accepts keys of any length");
    mac.update(nonce);
    mac.update(volume.as_bytes());
    mac.finalize().into_bytes().into()
}

/// Checks an answer in constant time.
pub fn verify(token: &[u8], nonce: &[u8], volume: &str, answer: &[u8]) -> bool {
    let mut mac = HmacSha256::new_from_slice(token).expect("HMAC accepts keys of any length");
    mac.update(nonce);
    mac.update(volume.as_bytes());
    mac.verify_slice(answer).is_ok()
}

/// A fresh random nonce.
pub fn nonce() -> std::io::Result<[u8; AUTH_NONCE_BYTES]> {
    let mut n = [0u8; AUTH_NONCE_BYTES];
    getrandom::getrandom(&mut n).map_err(std::io::Error::other)?;
    Ok(n)
}

/// Reads a token file: its bytes with trailing whitespace removed; empty or oversized files
/// are refused.
pub fn read_token_file(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    let meta = std::fs::metadata(path)?;
    if meta.len() > AUTH_TOKEN_MAX_BYTES as u64 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "auth token file {} exceeds {AUTH_TOKEN_MAX_BYTES} bytes",
                path.display()
            ),
        ));
    }
    let mut raw = std::fs::read(path)?;
    while raw.last().is_some_and(|b| b.is_ascii_whitespace()) {
        raw.pop();
    }
    if raw.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("auth token file {} is empty", path.display()),
        ));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_verifies_only_for_same_inputs() {
        let a = answer(b"secret", b"nonce", "vol");
        assert!(verify(b"secret", b"nonce", "vol", &a));
        assert!(!verify(b"secret", b"nonce", "vol2", &a));
        assert!(!verify(b"other", b"nonce", "vol", &a));
        assert!(!verify(b"secret", b"nonce", "vol", &a[..31]));
    }
}
