//! The Postgres pool and the embedded migrations.
//!
//! Prevents: requests that hang when the database is slow or gone. Every connection carries a
//! server-side statement timeout, and waiting for a free connection is bounded, so an outage turns
//! into fast 503s instead of piled-up requests. The pool connects lazily: the service starts, and
//! answers `/readyz` with 503, while the database is still coming up.

use std::str::FromStr;

use secrecy::ExposeSecret;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::DatabaseConfig;

/// The migrations in `migrations/`, compiled into the binary and run by the `migrate` subcommand.
pub static MIGRATOR: Migrator = sqlx::migrate!();

pub fn pool(config: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(config.url.expose_secret())?
        .application_name(env!("CARGO_PKG_NAME"))
        .options([(
            "statement_timeout",
            format!("{}ms", config.statement_timeout.as_millis()),
        )]);
    Ok(PgPoolOptions::new()
        .max_connections(config.max_connections)
        .acquire_timeout(config.acquire_timeout)
        .connect_lazy_with(options))
}

/// One connection for `migrate`, without the request statement timeout: building an index on a
/// big table may rightly take minutes. Waiting for locks held by live traffic stays bounded, so a
/// migration that cannot get its lock fails instead of stalling every request queued behind it.
pub async fn migration_pool(config: &DatabaseConfig) -> Result<PgPool, sqlx::Error> {
    let options = PgConnectOptions::from_str(config.url.expose_secret())?
        .application_name(concat!(env!("CARGO_PKG_NAME"), "-migrate"))
        .options([("statement_timeout", "0"), ("lock_timeout", "10s")]);
    PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
}
