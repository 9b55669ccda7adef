//! Keys derived from `SECRET_KEY`, one per purpose.
//!
//! Prevents: one leaked or misused key compromising everything it signs. Access tokens and
//! pagination cursors are signed with different keys (HMAC-SHA256 of the secret and a purpose
//! label), so a cursor can never be passed off as a token or the reverse, while operators still
//! manage a single secret.

use aws_lc_rs::hmac;
use secrecy::{ExposeSecret, SecretString};

/// 32 bytes of key material for `purpose`, stable for a given secret.
pub fn derive(secret: &SecretString, purpose: &str) -> Vec<u8> {
    let root = hmac::Key::new(hmac::HMAC_SHA256, secret.expose_secret().as_bytes());
    hmac::sign(&root, purpose.as_bytes()).as_ref().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purposes_get_different_keys_and_the_same_secret_the_same_key() {
        let secret = SecretString::from("0123456789abcdef0123456789abcdef");
        assert_ne!(derive(&secret, "token"), derive(&secret, "cursor"));
        assert_eq!(derive(&secret, "token"), derive(&secret, "token"));
        assert_eq!(derive(&secret, "token").len(), 32);
    }
}
