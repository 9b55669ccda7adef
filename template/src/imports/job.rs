//! The import job: stage the file's rows, group them into orders, finish.
//!
//! Every step commits its effects together with the progress counters and the checkpoint that
//! describe them, so a run that dies anywhere (SIGKILL, a lost connection) resumes at the last
//! checkpoint when the job runs again, and nothing is done twice:
//! 1. Staging reads the stored file chunk by chunk, validates each row with the orders API's
//!    rules and COPYs a batch of rows into `import_rows`, with the batch's row errors and
//!    `processed_rows`; a rerun skips the rows already counted.
//! 2. Grouping turns ranges of external_refs into draft orders in SQL, with `grouped_through`;
//!    orders are also keyed by (owner, external_ref), so even a repeated range creates nothing twice.
//! 3. Finishing sets the final status and enqueues the webhook notification in one transaction.

use apalis::prelude::*;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::csv::{Records, Step, check_header};
use super::domain::{RowError, StagedRow, parse_row};
use super::store::{self, Import};
use crate::config::Config;
use crate::jobs::{self, JobError, Released};
use crate::webhook;

pub const QUEUE: &str = "imports";

pub const IMPORT_ROWS: &str = "import_rows_total";
pub const IMPORT_ORDERS: &str = "import_orders_total";

/// Rows per staging transaction: large enough that COPY dominates, small enough that progress
/// moves every fraction of a second and a crash repeats little.
const STAGE_BATCH_ROWS: usize = 5_000;
/// Orders per grouping transaction.
const GROUP_BATCH_ORDERS: i64 = 2_000;

/// The job's payload: which import, and the request that created it (for the logs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImportJob {
    pub import_id: Uuid,
    pub request_id: Option<String>,
}

#[derive(Debug, Clone)]
struct Context {
    db: PgPool,
    stop: CancellationToken,
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

/// Another run of the same import committed this step first; this run stops and leaves the rest
/// to it.
#[derive(Debug, thiserror::Error)]
#[error("another run of this import is ahead of this one")]
struct Superseded;

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
    if !import.staged {
        let started = std::time::Instant::now();
        stage(context, &import).await?;
        store::mark_staged(&context.db, import_id).await?;
        // Fresh planner statistics for the grouping queries: staging has just added up to a
        // million rows, and plans made on the old numbers can be slow enough to time out.
        if let Err(error) = store::analyze_staged_rows(&context.db).await {
            tracing::warn!(%error, "could not refresh the statistics of import_rows");
        }
        tracing::info!(elapsed_ms = started.elapsed().as_millis(), "rows staged");
    }
    let started = std::time::Instant::now();
    group(context, &import).await?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis(),
        "rows grouped into orders"
    );

    let mut tx = context.db.begin().await?;
    store::lock_checkpoints(&mut tx, import_id).await?;
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

/// Step 1: validate every row not yet staged and stage it, a batch per transaction.
async fn stage(context: &Context, import: &Import) -> Result<(), JobError> {
    let db = &context.db;
    let already = import.processed_rows;
    let mut records = Records::default();
    let (mut chunk, mut position, mut seq, mut at_end) = (Vec::new(), 0, 0, false);
    let mut has_note = None;
    let (mut row, mut pending, mut committed) = (0_i32, 0_usize, already);
    let mut staged: Vec<StagedRow> = Vec::with_capacity(STAGE_BATCH_ROWS);
    let mut errors: Vec<RowError> = Vec::new();
    loop {
        let mut input = &chunk[position..];
        let step = records.read(&mut input, at_end)?;
        position = chunk.len() - input.len();
        match step {
            Step::NeedInput => {
                match store::chunk(db, import.id, seq).await? {
                    Some(data) => chunk = data,
                    None if at_end => return Err("the stored file ended twice".into()),
                    None => {
                        chunk = Vec::new();
                        at_end = true;
                    }
                }
                (position, seq) = (0, seq + 1);
            }
            Step::Record => {
                let Some(has_note) = has_note else {
                    has_note = Some(
                        check_header(records.fields()).ok_or("the stored file has no header")?,
                    );
                    continue;
                };
                row += 1;
                if row <= already {
                    continue;
                }
                let parsed = parse_row(row, records.fields(), has_note);
                staged.extend(parsed.staged);
                errors.extend(parsed.errors);
                pending += 1;
                if pending == STAGE_BATCH_ROWS {
                    commit_batch(context, import.id, &mut staged, &mut errors, committed, row)
                        .await?;
                    (pending, committed) = (0, row);
                }
            }
            Step::End => break,
        }
    }
    let through = row.max(already);
    commit_batch(
        context,
        import.id,
        &mut staged,
        &mut errors,
        committed,
        through,
    )
    .await
}

async fn commit_batch(
    context: &Context,
    import_id: Uuid,
    staged: &mut Vec<StagedRow>,
    errors: &mut Vec<RowError>,
    from_row: i32,
    through_row: i32,
) -> Result<(), JobError> {
    let mut tx = context.db.begin().await?;
    if store::lock_checkpoints(&mut tx, import_id).await?.0 != from_row {
        return Err(Superseded.into());
    }
    store::stage_batch(&mut tx, import_id, staged, errors, through_row).await?;
    tx.commit().await?;
    staged.clear();
    errors.clear();
    if context.stop.is_cancelled() {
        return Err(Released.into());
    }
    Ok(())
}

/// Step 2: turn the staged rows into orders, a range of external_refs per transaction.
async fn group(context: &Context, import: &Import) -> Result<(), JobError> {
    let db = &context.db;
    let mut after = import.grouped_through.clone();
    while let Some(through) =
        store::next_range(db, import.id, after.as_deref(), GROUP_BATCH_ORDERS).await?
    {
        let mut tx = db.begin().await?;
        if store::lock_checkpoints(&mut tx, import.id).await?.1 != after {
            return Err(Superseded.into());
        }
        store::group_range(
            &mut tx,
            import.id,
            import.owner_id,
            after.as_deref(),
            &through,
        )
        .await?;
        tx.commit().await?;
        after = Some(through);
        if context.stop.is_cancelled() {
            return Err(Released.into());
        }
    }
    Ok(())
}

/// A safety net, run by the worker's scheduled cleanup: an import that is queued or running
/// with no job left to run it (a run stopped because another was ahead, and that other run died
/// unrecorded) gets a fresh job. Imports younger than `LOST_AFTER` are left alone: their job may
/// simply not be committed yet.
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
