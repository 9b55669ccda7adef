//! Passwords: parsed into a type that cannot be logged, hashed with argon2id off the async
//! threads.
//!
//! Prevents: passwords in logs or crash dumps, weak hashes, and a burst of logins stalling every
//! other request (argon2 is deliberately slow: ~20 MiB and tens of milliseconds per hash, which
//! must not run on the threads that drive I/O). Hashing also gets a bounded share of the CPU (all
//! cores but one): a login storm makes logins wait, not every other request.

use std::sync::LazyLock;

use tokio::sync::Semaphore;

/// How many hashes may run at once: one core is always left for everything else.
static HASHING: LazyLock<Semaphore> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    Semaphore::new(cores.saturating_sub(1).max(1))
});

/// Runs `work` (an argon2 hash or check) on the blocking pool, within the CPU share above.
async fn hashing<T: Send + 'static>(
    work: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let _permit = HASHING.acquire().await?;
    let current_span = tracing::Span::current();
    tokio::task::spawn_blocking(move || {
        let _entered = current_span.enter();
        work()
    })
    .await?
}

use argon2::Argon2;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use secrecy::{ExposeSecret, SecretString};

/// NIST SP 800-63B: at least 8 characters, 15 for single-factor accounts; we take 12 as the
/// template's default. The upper bound keeps hashing cost bounded.
pub const MIN_LENGTH: usize = 12;
pub const MAX_LENGTH: usize = 128;

/// A password that passed the length policy. `Debug` prints `[REDACTED]`.
#[derive(Debug)]
pub struct Password(SecretString);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("a password must be {MIN_LENGTH} to {MAX_LENGTH} characters long")]
pub struct InvalidPassword;

impl Password {
    pub fn parse(raw: String) -> Result<Self, InvalidPassword> {
        let length = raw.chars().count();
        if (MIN_LENGTH..=MAX_LENGTH).contains(&length) {
            Ok(Password(SecretString::from(raw)))
        } else {
            Err(InvalidPassword)
        }
    }
}

/// Hashes with argon2id (v19, OWASP's default parameters) and a fresh random salt, returning the
/// PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`) that records the parameters for later checks.
pub async fn hash(password: Password) -> anyhow::Result<String> {
    hashing(move || {
        Argon2::default()
            .hash_password(password.0.expose_secret().as_bytes())
            .map(|hash| hash.to_string())
            .map_err(|error| anyhow::anyhow!("cannot hash password: {error}"))
    })
    .await
}

/// A hash of a random password, verified against when the e-mail is unknown, so that an unknown
/// account costs the same argon2 work as a wrong password and timing reveals nothing.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    let random = uuid::Uuid::new_v4().to_string();
    Argon2::default()
        .hash_password(random.as_bytes())
        .map(|hash| hash.to_string())
        .unwrap_or_default()
});

/// Computes the dummy hash ahead of the first login, off the async threads.
pub async fn warm_up() {
    let _ = tokio::task::spawn_blocking(|| LazyLock::force(&DUMMY_HASH).len()).await;
}

/// Checks `candidate` against a stored PHC string, or against the dummy hash when there is no
/// account (`stored` is `None`); false in that case, after the same work.
pub async fn verify(candidate: SecretString, stored: Option<String>) -> anyhow::Result<bool> {
    hashing(move || {
        let account_exists = stored.is_some();
        let phc = stored.unwrap_or_else(|| DUMMY_HASH.clone());
        let hash = PasswordHash::new(&phc)
            .map_err(|error| anyhow::anyhow!("stored hash is not a PHC string: {error}"))?;
        let matches = Argon2::default()
            .verify_password(candidate.expose_secret().as_bytes(), &hash)
            .is_ok();
        Ok(account_exists && matches)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_policy_counts_characters_not_bytes() {
        assert_eq!(
            Password::parse("short".into()).unwrap_err(),
            InvalidPassword
        );
        assert!(
            Password::parse("ééééééééééé".into()).is_err(),
            "11 characters, 22 bytes"
        );
        assert!(Password::parse("correct horse".into()).is_ok());
        assert!(Password::parse("x".repeat(MAX_LENGTH + 1)).is_err());
    }

    #[tokio::test]
    async fn hashes_are_argon2id_and_salted() {
        let first = hash(Password::parse("correct horse battery".into()).unwrap())
            .await
            .unwrap();
        let second = hash(Password::parse("correct horse battery".into()).unwrap())
            .await
            .unwrap();
        assert!(first.starts_with("$argon2id$v=19$"), "{first}");
        assert_ne!(first, second, "each hash has its own salt");
    }

    #[tokio::test]
    async fn verification_accepts_only_the_right_password_and_never_a_missing_account() {
        let stored = hash(Password::parse("correct horse battery".into()).unwrap())
            .await
            .unwrap();
        let check =
            |candidate: &str, stored: Option<String>| verify(SecretString::from(candidate), stored);
        assert!(
            check("correct horse battery", Some(stored.clone()))
                .await
                .unwrap()
        );
        assert!(!check("wrong horse battery", Some(stored)).await.unwrap());
        assert!(!check("correct horse battery", None).await.unwrap());
    }

    #[test]
    fn debug_output_hides_the_password() {
        let password = Password::parse("correct horse battery".into()).unwrap();
        assert!(!format!("{password:?}").contains("horse"));
    }
}
