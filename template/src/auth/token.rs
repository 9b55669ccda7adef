//! Short-lived signed bearer tokens (JWT, HS256 only).
//!
//! Prevents: forged, replayed-forever or algorithm-confused tokens. Only HS256 is accepted (no
//! `alg: none`, no RSA/HMAC confusion); issuer, audience and expiry are required and checked; the
//! lifetime is short (`AUTH_TOKEN_TTL_SECS`), since a stateless token cannot be revoked early.
//!
//! A token that verified is remembered until it expires, so that a client's every request does
//! not check the same signature and parse the same JSON again: counted with callgrind, verifying
//! was 40% of the middleware stack's instructions per request. Only the exact bytes that
//! verified are remembered (the signature is part of the key), and only until the token's own
//! expiry, so the shortcut accepts nothing that verifying would refuse.

use std::time::Duration;

use dashmap::DashMap;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::Principal;
use crate::users::Role;

const ISSUER: &str = env!("CARGO_PKG_NAME");
const AUDIENCE: &str = env!("CARGO_PKG_NAME");
/// Seconds of clock skew allowed on `exp`.
const LEEWAY: u64 = 5;
/// Verified tokens remembered at most; at this many the expired ones are dropped, and if that is
/// not enough the memory is emptied and refills, so it stays bounded whatever clients send (a few
/// MiB: a token is about 300 bytes).
const VERIFIED_CAPACITY: usize = 10_000;

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: Uuid,
    role: Role,
    iss: String,
    aud: String,
    iat: u64,
    exp: u64,
}

pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl: Duration,
    /// Token → its principal and the last second it is valid (`exp` plus the leeway).
    verified: DashMap<Box<str>, (Principal, u64)>,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenKeys")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid access token: {0}")]
pub struct InvalidToken(#[from] jsonwebtoken::errors::Error);

impl TokenKeys {
    pub fn new(key: &[u8], ttl: Duration) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY;
        TokenKeys {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
            ttl,
            verified: DashMap::new(),
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn issue(&self, principal: &Principal) -> anyhow::Result<String> {
        let now = jsonwebtoken::get_current_timestamp();
        let claims = Claims {
            sub: principal.user_id,
            role: principal.role,
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            exp: now + self.ttl.as_secs(),
        };
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &self.encoding,
        )?)
    }

    pub fn verify(&self, token: &str) -> Result<Principal, InvalidToken> {
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(entry) = self.verified.get(token) {
            let (principal, valid_until) = *entry;
            if now <= valid_until {
                return Ok(principal);
            }
        }
        let claims =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?.claims;
        let principal = Principal {
            user_id: claims.sub,
            role: claims.role,
        };
        if self.verified.len() >= VERIFIED_CAPACITY {
            self.verified
                .retain(|_, (_, valid_until)| *valid_until >= now);
            if self.verified.len() >= VERIFIED_CAPACITY {
                self.verified.clear();
            }
        }
        self.verified
            .insert(token.into(), (principal, claims.exp.saturating_add(LEEWAY)));
        Ok(principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    fn keys() -> TokenKeys {
        TokenKeys::new(&[7; 32], Duration::from_secs(60))
    }

    fn principal() -> Principal {
        Principal {
            user_id: Uuid::now_v7(),
            role: Role::Customer,
        }
    }

    #[test]
    fn a_token_round_trips_to_its_principal() {
        let principal = principal();
        let verified = keys().verify(&keys().issue(&principal).unwrap()).unwrap();
        assert_eq!(
            (verified.user_id, verified.role),
            (principal.user_id, principal.role)
        );
    }

    #[test]
    fn a_remembered_token_is_refused_once_it_expires_and_only_its_exact_bytes_hit() {
        let keys = keys();
        let principal = principal();
        let token = keys.issue(&principal).unwrap();
        assert!(keys.verify(&token).is_ok());
        assert!(keys.verify(&token).is_ok(), "remembered");
        // A character well inside the signature (the last one has two padding bits), changed to
        // a different one.
        let (head, tail) = token.split_at(token.len() - 5);
        let swapped = if tail.starts_with('A') { "B" } else { "A" };
        let tampered = format!("{head}{swapped}{}", &tail[1..]);
        assert!(keys.verify(&tampered).is_err(), "other bytes are verified");

        // A token that expired a minute ago, remembered from when it was valid.
        let past = jsonwebtoken::get_current_timestamp() - 60;
        let claims = serde_json::json!({"sub": principal.user_id, "role": "customer",
            "iss": ISSUER, "aud": AUDIENCE, "iat": past - 60, "exp": past - LEEWAY});
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(&[7; 32]),
        )
        .unwrap();
        keys.verified
            .insert(expired.as_str().into(), (principal, past));
        assert!(keys.verify(&expired).is_err(), "refused, remembered or not");
    }

    #[test]
    fn tokens_signed_with_another_key_or_alg_none_are_rejected() {
        let token = TokenKeys::new(&[8; 32], Duration::from_secs(60))
            .issue(&principal())
            .unwrap();
        assert!(keys().verify(&token).is_err(), "wrong signature");

        let valid = keys().issue(&principal()).unwrap();
        let payload = valid.split('.').nth(1).unwrap();
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
        assert!(
            keys().verify(&format!("{header}.{payload}.")).is_err(),
            "alg none"
        );
    }

    #[test]
    fn expired_tokens_and_tokens_for_another_audience_are_rejected() {
        let encode = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(&[7; 32]),
            )
            .unwrap()
        };
        let now = jsonwebtoken::get_current_timestamp();
        let base = serde_json::json!({"sub": Uuid::now_v7(), "role": "admin", "iss": ISSUER, "aud": AUDIENCE, "iat": now});
        let mut expired = base.clone();
        expired["exp"] = (now - 3600).into();
        assert!(keys().verify(&encode(expired)).is_err(), "expired");
        let mut foreign = base.clone();
        foreign["exp"] = (now + 3600).into();
        foreign["aud"] = "another-service".into();
        assert!(keys().verify(&encode(foreign)).is_err(), "wrong audience");
        let mut no_expiry = base;
        no_expiry.as_object_mut().unwrap().remove("exp");
        assert!(keys().verify(&encode(no_expiry)).is_err(), "no expiry");
    }
}
