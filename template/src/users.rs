//! Users, their roles, and creating one.
//!
//! Prevents: malformed or duplicate accounts. An [`Email`] is parsed and normalised (trimmed,
//! lower-cased) before it reaches the database, so `Ann@Example.com` and `ann@example.com` are one
//! account, and the unique constraint, not a racy "SELECT then INSERT", rejects duplicates.

use std::fmt;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use utoipa::ToSchema;
use uuid::Uuid;
use validator::ValidateEmail;

use crate::auth::password::{self, Password};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees and changes only their own resources.
    Customer,
    /// Sees everything; the only role that may approve orders.
    Admin,
}

impl Role {
    /// The value stored in `users.role` (a CHECK constraint lists the same values).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Admin => "admin",
        }
    }

    fn from_stored(value: &str) -> anyhow::Result<Role> {
        match value {
            "customer" => Ok(Role::Customer),
            "admin" => Ok(Role::Admin),
            other => anyhow::bail!("unknown role {other:?} in users.role"),
        }
    }
}

/// What login needs to know about an account.
pub struct Credentials {
    pub id: Uuid,
    pub role: Role,
    pub password_hash: String,
}

/// The account with this e-mail, if any. Returns the database error as is, so that an outage
/// becomes a 503 rather than a 500.
#[tracing::instrument(name = "users.find_credentials", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn find_credentials(db: &PgPool, email: &Email) -> sqlx::Result<Option<Credentials>> {
    let row = sqlx::query!(
        "SELECT id, role, password_hash FROM users WHERE email = $1",
        email.as_str()
    )
    .fetch_optional(db)
    .await?;
    row.map(|row| {
        Ok(Credentials {
            id: row.id,
            role: Role::from_stored(&row.role)
                .map_err(|error| sqlx::Error::Decode(error.into()))?,
            password_hash: row.password_hash,
        })
    })
    .transpose()
}

/// A syntactically valid e-mail address, trimmed and lower-cased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Email(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a valid e-mail address")]
pub struct InvalidEmail;

impl Email {
    pub fn parse(raw: &str) -> Result<Self, InvalidEmail> {
        let normalised = raw.trim().to_lowercase();
        if normalised.len() <= 254 && normalised.validate_email() {
            Ok(Email(normalised))
        } else {
            Err(InvalidEmail)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CreateUserError {
    #[error("a user with e-mail {0} already exists")]
    EmailTaken(Email),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Creates a user with an argon2id hash of `password`; returns the new id.
pub async fn create(
    db: &PgPool,
    email: &Email,
    role: Role,
    password: Password,
) -> Result<Uuid, CreateUserError> {
    let password_hash = password::hash(password).await?;
    let id = Uuid::now_v7();
    let inserted = sqlx::query!(
        "INSERT INTO users (id, email, password_hash, role) VALUES ($1, $2, $3, $4)",
        id,
        email.as_str(),
        password_hash,
        role.as_str(),
    )
    .execute(db)
    .await;
    match inserted {
        Ok(_) => Ok(id),
        Err(sqlx::Error::Database(error)) if error.constraint() == Some("users_email_key") => {
            Err(CreateUserError::EmailTaken(email.clone()))
        }
        Err(error) => Err(CreateUserError::Unexpected(error.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised() {
        assert_eq!(
            Email::parse("  Ann@Example.COM ").unwrap().as_str(),
            "ann@example.com"
        );
    }

    #[test]
    fn invalid_emails_are_rejected() {
        for raw in ["", "ann", "ann@", "@example.com", "a b@example.com"] {
            assert_eq!(Email::parse(raw), Err(InvalidEmail), "{raw:?}");
        }
    }
}
