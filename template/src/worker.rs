//! The `worker` process: background work, separate from the API so each scales on its own.
//!
//! It runs the job queues (`jobs`: CSV imports, webhook notifications) and the scheduled
//! cleanups (expired idempotency keys, the leftovers of finished imports), and serves `/metrics`
//! on `ADMIN_ADDR` for its own job metrics. Several workers may run: apalis gives each job to one
//! worker, and the cleanups are plain batched DELETEs. On SIGTERM the worker takes no new job,
//! lets running jobs reach their next checkpoint (their progress is committed; another worker
//! resumes them), closes its connections and exits.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::{idempotency, imports, jobs, shutdown};

/// Uploads older than this with no import are abandoned requests.
const ORPHAN_UPLOAD_AGE: Duration = Duration::from_secs(3600);

pub async fn run(db: PgPool, config: Config) -> anyhow::Result<()> {
    let signal = shutdown::signal();
    sqlx::query("SELECT 1").execute(&db).await?;
    let stop = CancellationToken::new();
    let admin = tokio::net::TcpListener::bind(config.admin_addr)
        .await
        .with_context(|| format!("cannot listen on ADMIN_ADDR {}", config.admin_addr))?;
    let metrics = axum::serve(admin, crate::app::admin_router(db.clone()))
        .with_graceful_shutdown(stop.clone().cancelled_owned());
    let metrics = tokio::spawn(metrics.into_future());
    tracing::info!(admin_addr = %config.admin_addr, "worker started");
    let mut background = tokio::spawn(run_background(db.clone(), config, stop.clone()));
    tokio::select! {
        () = signal => {}
        // Exit non-zero, so that the orchestrator restarts a worker that would otherwise idle,
        // healthy-looking.
        ended = &mut background => {
            stop.cancel();
            metrics.await??;
            return ended?;
        }
    }
    tracing::info!("shutdown requested: finishing the work in progress");
    stop.cancel();
    background.await??;
    metrics.await??;
    db.close().await;
    tracing::info!("worker stopped");
    Ok(())
}

/// The background work, until `stop`: the job queues and the scheduled cleanups. Run by the
/// `worker` process, and by `serve` with `SERVE_RUNS_WORKERS=true`. The job workers must not end
/// on their own; if they do, this stops the cleanups and returns an error.
pub async fn run_background(
    db: PgPool,
    config: Config,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let cleanups_stop = stop.child_token();
    let cleanup = tokio::spawn(cleanups(db.clone(), config.clone(), cleanups_stop.clone()));
    let jobs = jobs::run(db, config, stop.clone()).await;
    cleanups_stop.cancel();
    cleanup.await?;
    jobs?;
    anyhow::ensure!(
        stop.is_cancelled(),
        "the job workers stopped without being asked to"
    );
    Ok(())
}

/// The scheduled cleanups, every `IDEMPOTENCY_PURGE_INTERVAL_SECS`. A failed run is retried at
/// the next tick; rows only live a little longer.
async fn cleanups(db: PgPool, config: Config, stop: CancellationToken) {
    let mut every = tokio::time::interval(config.idempotency.purge_interval);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stop.cancelled() => return,
        }
        match idempotency::purge_expired(&db, config.idempotency.retention, &stop).await {
            Ok(deleted) => tracing::info!(deleted, "purged expired idempotency keys"),
            Err(error) => tracing::warn!(%error, "purging idempotency keys failed"),
        }
        match imports::store::clean_up(&db, ORPHAN_UPLOAD_AGE).await {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "removed finished imports' leftovers"),
            Err(error) => tracing::warn!(%error, "cleaning up imports failed"),
        }
        if let Err(error) = imports::job::requeue_lost(&db, &config).await {
            tracing::warn!(%error, "looking for imports without a job failed");
        }
    }
}
