//! The `worker` process: runs background jobs, separately from the API so each scales on its own.
//!
//! No job queue is registered yet (CSV imports bring the first). Until then the process starts,
//! checks its configuration and database like the real thing, and stops cleanly on SIGTERM, so
//! deployments can already include it.

use sqlx::PgPool;

use crate::shutdown;

pub async fn run(db: PgPool) -> anyhow::Result<()> {
    sqlx::query("SELECT 1").execute(&db).await?;
    tracing::info!("worker started; no job queues are registered yet");
    shutdown::signal().await;
    tracing::info!("worker stopped");
    Ok(())
}
