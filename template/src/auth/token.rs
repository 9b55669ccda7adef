//! Short-lived signed bearer tokens (JWT, HS256 only).
//!
//! Prevents: forged, replayed-forever or algorithm-confused tokens. Only HS256 is accepted (no
//! `alg: none`, no RSA/HMAC confusion); issuer, audience and expiry are required and checked; the
//! lifetime is short (`AUTH_TOKEN_TTL_SECS`), since a stateless token cannot be revoked early.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::auth::Principal;
use crate::users::Role;

const ISSUER: &str = env!("CARGO_PKG_NAME");
const AUDIENCE: &str = env!("CARGO_PKG_NAME");

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
        validation.leeway = 5;
        TokenKeys {
            encoding: EncodingKey::from_secret(key),
            decoding: DecodingKey::from_secret(key),
            validation,
            ttl,
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
        let claims =
            jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)?.claims;
        Ok(Principal {
            user_id: claims.sub,
            role: claims.role,
        })
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
