//! The `worker` process: runs background work, separately from the API so each scales on its own.
//!
//! Today that is the scheduled purge of expired idempotency keys; the CSV import queues join it.
//! Several workers may run: the purge is a plain batched DELETE, safe to run concurrently. On
//! SIGTERM the worker takes no new work, finishes the batch in progress, closes its connections
//! and exits.

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::IdempotencyConfig;
use crate::{idempotency, shutdown};

pub async fn run(db: PgPool, config: IdempotencyConfig) -> anyhow::Result<()> {
    let signal = shutdown::signal();
    sqlx::query("SELECT 1").execute(&db).await?;
    tracing::info!(
        purge_interval_secs = config.purge_interval.as_secs(),
        "worker started"
    );
    let stop = CancellationToken::new();
    let purge = {
        let (db, stop) = (db.clone(), stop.clone());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(config.purge_interval);
            loop {
                tokio::select! {
                    _ = every.tick() => {}
                    () = stop.cancelled() => return,
                }
                match idempotency::purge_expired(&db, config.retention, &stop).await {
                    Ok(deleted) => tracing::info!(deleted, "purged expired idempotency keys"),
                    // A failed purge is retried at the next tick; keys only live a little longer.
                    Err(error) => tracing::warn!(%error, "purging idempotency keys failed"),
                }
            }
        })
    };
    signal.await;
    tracing::info!("shutdown requested: finishing the work in progress");
    stop.cancel();
    purge.await?;
    db.close().await;
    tracing::info!("worker stopped");
    Ok(())
}
