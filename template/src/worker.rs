//! The `worker` process: runs background work, separately from the API so each scales on its own.
//!
//! Today that is the scheduled purge of expired idempotency keys; the CSV import queues join it.
//! Several workers may run: the purge is a plain batched DELETE, safe to run concurrently.

use sqlx::PgPool;

use crate::config::IdempotencyConfig;
use crate::{idempotency, shutdown};

pub async fn run(db: PgPool, config: IdempotencyConfig) -> anyhow::Result<()> {
    let stop = shutdown::signal();
    sqlx::query("SELECT 1").execute(&db).await?;
    tracing::info!(
        purge_interval_secs = config.purge_interval.as_secs(),
        "worker started"
    );
    let purge = async {
        let mut every = tokio::time::interval(config.purge_interval);
        loop {
            every.tick().await;
            match idempotency::purge_expired(&db, config.retention).await {
                Ok(deleted) => tracing::info!(deleted, "purged expired idempotency keys"),
                // A failed purge is retried at the next tick; keys only live a little longer.
                Err(error) => tracing::warn!(%error, "purging idempotency keys failed"),
            }
        }
    };
    tokio::select! {
        () = purge => {}
        () = stop => {}
    }
    tracing::info!("worker stopped");
    Ok(())
}
