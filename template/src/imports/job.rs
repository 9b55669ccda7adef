//! The import job: the apalis worker, and one run of an import: read the stored file, write its
//! orders (the steps in `imports::pipeline`), then finish: set the final status and enqueue the
//! webhook notification in one transaction.
//!
//! A run can die anywhere (SIGKILL, a lost connection) or overlap another run of the same import
//! (a worker presumed dead that was only slow): every step commits its effects with the
//! checkpoint that describes them, so the next run resumes at the last checkpoint and nothing
//! is done twice.

use apalis::prelude::*;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::pipeline::{self, Superseded};
use super::store::{self, Import};
use crate::config::Config;
use crate::jobs::{self, JobError, Released};
use crate::webhook;

pub const QUEUE: &str = "imports";

pub const IMPORT_ROWS: &str = "import_rows_total";
pub const IMPORT_ORDERS: &str = "import_orders_total";

/// The job's payload: which import, and the request that created it (for the logs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportJob {
    pub import_id: Uuid,
    pub request_id: Option<String>,
}

#[derive(Debug, Clone)]
pub(super) struct Context {
    pub(super) db: PgPool,
    /// The worker is shutting down: a run stops at its next checkpoint.
    pub(super) stop: CancellationToken,
    notify: bool,
    max_attempts: usize,
}

/// Starts the imports worker; it runs until `stop` is cancelled.
pub fn spawn_worker(
    db: PgPool,
    config: &Config,
    stop: CancellationToken,
) -> anyhow::Result<jobs::Running> {
    let context = Context {
        db: db.clone(),
        stop: stop.clone(),
        notify: config.imports.webhook_url.is_some(),
        max_attempts: config.jobs.max_attempts,
    };
    let worker = WorkerBuilder::new(jobs::worker_name(QUEUE))
        .backend(jobs::storage::<ImportJob>(&db, QUEUE, &config.jobs).with_pubsub())
        .data(context)
        .concurrency(config.jobs.concurrency)
        .retry(jobs::retry_policy(&config.jobs)?)
        .catch_panic()
        .parallelize(tokio::spawn)
        .build(handle);
    Ok(tokio::spawn(worker.run_until(jobs::until(stop))))
}

async fn handle(job: ImportJob, context: Data<Context>, attempt: Attempt) -> Result<(), JobError> {
    let attempt = attempt.current();
    let span = tracing::info_span!(
        "import",
        import_id = %job.import_id,
        request_id = job.request_id.as_deref().unwrap_or_default()
    );
    if attempt > context.max_attempts {
        // Handed out again and again without ever returning (its worker crashes each time):
        // give it up rather than crash workers forever.
        let _enter = span.enter();
        give_up(&context, job.import_id).await;
        return Ok(());
    }
    let result = jobs::instrumented(QUEUE, attempt, async {
        match process(&context, job.import_id).await {
            Err(error) if error.is::<Superseded>() => {
                tracing::info!("{error}");
                Ok(())
            }
            Err(error) if !error.is::<Released>() && attempt >= context.max_attempts => {
                give_up(&context, job.import_id).await;
                Err(error)
            }
            result => result,
        }
    })
    .instrument(span.clone())
    .await;
    match result {
        // Handed on as a fresh job, so that a shutdown does not use up one of the job's attempts
        // (a deploy a day must not fail a long import). If that fails, the released attempt is
        // retried like a failed one.
        Err(error) if error.is::<Released>() => {
            let mut conn = context.db.acquire().await?;
            jobs::enqueue(&mut conn, QUEUE, &job, context.max_attempts).await?;
            span.in_scope(|| tracing::info!("released at a checkpoint; queued to resume"));
            Ok(())
        }
        result => result,
    }
}

async fn process(context: &Context, import_id: Uuid) -> Result<(), JobError> {
    let Some(import) = store::mark_running(&context.db, import_id).await? else {
        tracing::info!("the import is already finished");
        return Ok(());
    };
    let together = match import.rows_together {
        Some(together) => together,
        None => {
            let started = std::time::Instant::now();
            let together = pipeline::rows_are_together(context, &import).await?;
            let together = store::record_rows_together(&context.db, import_id, together).await?;
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis(),
                together,
                "file read"
            );
            together
        }
    };
    let started = std::time::Instant::now();
    if together {
        pipeline::write_in_file_order(context, &import).await?;
    } else {
        if !import.staged {
            pipeline::stage(context, &import).await?;
            store::mark_staged(&context.db, import_id).await?;
            // Fresh planner statistics for the grouping queries: staging has just added up to a
            // million rows, and plans made on the old numbers can be slow enough to time out.
            if let Err(error) = store::analyze_staged_rows(&context.db).await {
                tracing::warn!(%error, "could not refresh the statistics of import_rows");
            }
            tracing::info!(elapsed_ms = started.elapsed().as_millis(), "rows staged");
        }
        pipeline::group(context, &import).await?;
    }
    tracing::info!(elapsed_ms = started.elapsed().as_millis(), "orders written");

    // `finish` changes only a running import, under its row lock: of two overlapping runs, the
    // one that comes second finds it finished and stops here.
    let mut tx = context.db.begin().await?;
    let Some(done) = store::finish(&mut tx, import_id).await? else {
        return Err(Superseded.into());
    };
    if context.notify {
        let notification = webhook::Notification::from(&done);
        jobs::enqueue(&mut tx, webhook::QUEUE, &notification, context.max_attempts).await?;
    }
    tx.commit().await?;
    record_totals(&done);
    tracing::info!(
        total_rows = done.total_rows,
        imported_orders = done.imported_orders,
        rejected_orders = done.rejected_orders,
        failed_rows = done.failed_rows,
        "import finished"
    );
    // What the import no longer needs; the worker's cleanup catches it if this fails.
    if let Err(error) = store::discard_work(&context.db, import_id).await {
        tracing::warn!(%error, "could not remove the import's staged rows and file yet");
    }
    Ok(())
}

/// A safety net, run by the worker's scheduled cleanup: an import that is queued or running
/// with no job left to run it (a run stopped because another was ahead, and that other run died
/// unrecorded) gets a fresh job. Only imports created more than `LOST_AFTER` ago: a margin, as
/// the check reads the states of apalis's table, which apalis, not this service, defines.
pub async fn requeue_lost(db: &PgPool, config: &Config) -> anyhow::Result<()> {
    const LOST_AFTER: std::time::Duration = std::time::Duration::from_secs(300);
    for import_id in store::without_job(db, LOST_AFTER).await? {
        let mut conn = db.acquire().await?;
        let job = ImportJob {
            import_id,
            request_id: None,
        };
        jobs::enqueue(&mut conn, QUEUE, &job, config.jobs.max_attempts).await?;
        tracing::warn!(%import_id, "an import had no job left; queued a new one");
    }
    Ok(())
}

/// The job has run out of attempts: the import is `failed`, and the webhook says so.
async fn give_up(context: &Context, import_id: Uuid) {
    let outcome = async {
        let mut tx = context.db.begin().await?;
        if let Some(failed) = store::fail(&mut tx, import_id).await?
            && context.notify
        {
            let notification = webhook::Notification::from(&failed);
            jobs::enqueue(&mut tx, webhook::QUEUE, &notification, context.max_attempts).await?;
        }
        tx.commit().await?;
        anyhow::Ok(())
    };
    match outcome.await {
        Ok(()) => tracing::error!("import failed: the job ran out of attempts"),
        Err(error) => tracing::error!(%error, "import failed, and could not be marked failed"),
    }
}

fn record_totals(import: &Import) {
    let ok_rows = u64::try_from(import.total_rows - import.failed_rows).unwrap_or(0);
    let failed_rows = u64::try_from(import.failed_rows).unwrap_or(0);
    metrics::counter!(IMPORT_ROWS, "outcome" => "valid").increment(ok_rows);
    metrics::counter!(IMPORT_ROWS, "outcome" => "failed").increment(failed_rows);
    metrics::counter!(IMPORT_ORDERS, "outcome" => "imported")
        .increment(u64::try_from(import.imported_orders).unwrap_or(0));
    metrics::counter!(IMPORT_ORDERS, "outcome" => "rejected")
        .increment(u64::try_from(import.rejected_orders).unwrap_or(0));
}
