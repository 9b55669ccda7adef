//! Background jobs on Postgres with apalis: enqueueing, the worker loop, and job metrics.
//!
//! Prevents: slow work inside requests; a job lost between a commit and its enqueue, or enqueued
//! for a row that was rolled back (a job is a row in `apalis.jobs`, written in the transaction of
//! its cause); one job run by two workers at once (apalis locks it to one); and jobs lost with a
//! crashed worker (each worker sends heartbeats; the jobs of a worker that falls silent go back to
//! the queue). Jobs must therefore be safe to run again: each commits progress with its effects.
//!
//! To add a job: a payload type, a queue name, a handler, and one `supervise` line in [`run`].

use std::future::Future;
use std::time::{Duration, Instant};

use apalis::layers::retry::{BackoffRetryPolicy, RetryPolicy};
use apalis::prelude::*;
use apalis_postgres::{Config as QueueConfig, PostgresStorage};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};
use tokio_util::sync::CancellationToken;
use tower::retry::backoff::{ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::util::rng::HasherRng;

use crate::config::{Config, JobsConfig};

pub const JOBS_STARTED: &str = "jobs_started_total";
pub const JOBS_SUCCEEDED: &str = "jobs_succeeded_total";
pub const JOBS_FAILED: &str = "jobs_failed_total";
pub const JOBS_RETRIED: &str = "jobs_retried_total";
pub const JOB_DURATION: &str = "job_duration_seconds";

/// The job counters, by queue, with their descriptions.
pub const COUNTERS: [(&str, &str); 4] = [
    (JOBS_STARTED, "Job attempts started, by queue."),
    (JOBS_SUCCEEDED, "Job attempts that succeeded, by queue."),
    (
        JOBS_FAILED,
        "Job attempts that failed (and will be retried while attempts remain), by queue.",
    ),
    (JOBS_RETRIED, "Job attempts that were retries, by queue."),
];
pub const QUEUE_DEPTH: &str = "job_queue_depth";
pub const QUEUE_OLDEST_AGE: &str = "job_queue_oldest_age_seconds";

/// The queues, one per kind of job.
pub const QUEUES: [&str; 2] = [crate::imports::job::QUEUE, crate::webhook::QUEUE];

/// Writes a job into `queue` in the caller's transaction: it becomes visible to workers (and
/// wakes them through NOTIFY) only when that transaction commits.
pub async fn enqueue(
    conn: &mut PgConnection,
    queue: &str,
    payload: &impl Serialize,
    max_attempts: usize,
) -> anyhow::Result<()> {
    enqueue_after(conn, queue, payload, max_attempts, Duration::ZERO).await
}

/// Like [`enqueue`], for a job that must not start before `delay` has passed.
pub async fn enqueue_after(
    conn: &mut PgConnection,
    queue: &str,
    payload: &impl Serialize,
    max_attempts: usize,
    delay: Duration,
) -> anyhow::Result<()> {
    let task = TaskBuilder::new(serde_json::to_vec(payload)?)
        .max_attempts(max_attempts)
        .run_after(delay)
        .build();
    apalis_postgres::queries::push_tasks(conn, queue, vec![task]).await?;
    Ok(())
}

/// Creates the job queue's tables (schema `apalis`); part of the `migrate` subcommand.
pub async fn migrate(db: &PgPool) -> anyhow::Result<()> {
    PostgresStorage::<()>::setup(db).await?;
    Ok(())
}

/// A job that stopped early and was handed on as a fresh job: the worker is shutting down (an
/// import, at a checkpoint), or the job must wait (a notification, for an open circuit). It is
/// not a failure and uses up none of the job's attempts; `imports::job` and `webhook` hand on.
#[derive(Debug, thiserror::Error)]
#[error("released: handed on to run later")]
pub struct Released;

/// Why a job run failed, for the retry policy: [`Released`] is not retried in this process.
pub type JobError = Box<dyn std::error::Error + Send + Sync>;

/// Runs every queue's workers until `stop` is cancelled; then they take no new job, and running
/// jobs stop at their next checkpoint (or finish) before this returns.
pub async fn run(db: PgPool, config: Config, stop: CancellationToken) -> anyhow::Result<()> {
    tracing::info!(
        concurrency = config.jobs.concurrency,
        queues = ?QUEUES,
        "job workers started"
    );
    let imports = supervise(crate::imports::job::QUEUE, &stop, || {
        crate::imports::job::spawn_worker(db.clone(), &config, stop.clone()).map(Some)
    });
    let webhooks = supervise(crate::webhook::QUEUE, &stop, || {
        crate::webhook::spawn_worker(db.clone(), &config, stop.clone())
    });
    tokio::try_join!(imports, webhooks)?;
    tracing::info!("job workers stopped");
    Ok(())
}

/// The pause before a failed worker is started again, doubling up to [`LONGEST_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_secs(1);
const LONGEST_PAUSE: Duration = Duration::from_secs(30);

/// Keeps one queue's worker running until `stop`. apalis ends a worker when polling its backend
/// fails, so without this a database that is away for a few seconds would end the worker
/// process (and an API that runs its workers in process) instead of pausing the jobs. A worker
/// that ends is started again, after a pause that doubles while it keeps failing. Its jobs in
/// flight are safe either way: they commit their own progress, and a job whose worker stopped
/// sending heartbeats goes back to the queue. `start` answering `None` means the queue is off.
async fn supervise(
    queue: &'static str,
    stop: &CancellationToken,
    start: impl Fn() -> anyhow::Result<Option<Running>>,
) -> anyhow::Result<()> {
    let mut pause = FIRST_PAUSE;
    loop {
        let Some(worker) = start()? else {
            return Ok(());
        };
        let started = Instant::now();
        let ended = worker.await;
        if stop.is_cancelled() {
            return Ok(ended??);
        }
        if started.elapsed() > LONGEST_PAUSE {
            pause = FIRST_PAUSE;
        }
        let reason = match ended {
            Ok(Ok(())) => "it stopped without being asked to".to_owned(),
            Ok(Err(error)) => error.to_string(),
            Err(panicked) => panicked.to_string(),
        };
        tracing::warn!(
            queue,
            error = reason,
            retry_in_secs = pause.as_secs(),
            "job worker stopped; starting it again"
        );
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return Ok(()),
        }
        pause = (pause * 2).min(LONGEST_PAUSE);
    }
}

/// A worker running on its own task.
pub type Running = tokio::task::JoinHandle<Result<(), apalis::prelude::WorkerError>>;

/// The shutdown signal in the form apalis's `run_until` takes.
pub async fn until(stop: CancellationToken) -> Result<(), std::io::Error> {
    stop.cancelled().await;
    Ok(())
}

/// The queue settings shared by every worker: wake on NOTIFY, heartbeats, and how long a silent
/// worker's jobs stay locked before another worker takes them over.
pub fn queue_config(queue: &str, jobs: &JobsConfig) -> QueueConfig {
    QueueConfig::default()
        .queue(queue)
        .batch_size(jobs.concurrency)
        .heartbeat_interval(jobs.heartbeat)
        .missed_heartbeats(jobs.missed_heartbeats)
}

pub fn storage<T>(db: &PgPool, queue: &str, jobs: &JobsConfig) -> PostgresStorage<T> {
    PostgresStorage::new(db).with_config(queue_config(queue, jobs))
}

/// Exponential backoff from `JOB_RETRY_BASE_MS`, doubling up to 5 minutes, with jitter so that
/// jobs failing together do not retry together. (A released job never reaches it: its handler
/// hands it on as a fresh job and reports success.)
pub fn retry_policy(jobs: &JobsConfig) -> anyhow::Result<BackoffRetryPolicy<ExponentialBackoff>> {
    let backoff = ExponentialBackoffMaker::new(
        jobs.retry_base,
        Duration::from_secs(300),
        0.5,
        HasherRng::default(),
    )?
    .make_backoff();
    Ok(RetryPolicy::retries(jobs.max_attempts.saturating_sub(1)).with_backoff(backoff))
}

/// A unique worker name per process and queue; apalis tracks heartbeats by it.
pub fn worker_name(queue: &str) -> String {
    format!("{queue}-{}", uuid::Uuid::now_v7())
}

/// Runs one job attempt inside a `job {queue}` span and records its metrics.
pub async fn instrumented<F, T>(queue: &'static str, attempt: usize, work: F) -> Result<T, JobError>
where
    F: Future<Output = Result<T, JobError>>,
{
    use tracing::Instrument;
    metrics::counter!(JOBS_STARTED, "queue" => queue).increment(1);
    if attempt > 1 {
        metrics::counter!(JOBS_RETRIED, "queue" => queue).increment(1);
    }
    let started = Instant::now();
    let span = tracing::info_span!("job", otel.name = format!("job {queue}"), queue, attempt);
    let result = work.instrument(span).await;
    let outcome = match &result {
        Ok(_) => {
            metrics::counter!(JOBS_SUCCEEDED, "queue" => queue).increment(1);
            "succeeded"
        }
        Err(error) if error.is::<Released>() => "released",
        Err(error) => {
            metrics::counter!(JOBS_FAILED, "queue" => queue).increment(1);
            tracing::warn!(queue, attempt, error = %error, "job failed");
            "failed"
        }
    };
    metrics::histogram!(JOB_DURATION, "queue" => queue, "outcome" => outcome)
        .record(started.elapsed().as_secs_f64());
    result
}

/// Queue depth and the age of the oldest waiting job, per queue, read at scrape time: the
/// queue-lag alert fires on the age, which grows when workers are down or too few.
pub async fn record_queue_gauges(db: &PgPool) -> sqlx::Result<()> {
    let rows = sqlx::query!(
        r#"SELECT job_type AS "queue!",
                  count(*) AS "depth!",
                  coalesce(extract(epoch FROM now() - min(run_at)), 0)::float8 AS "oldest_age!"
           FROM apalis.jobs
           WHERE run_at <= now()
             AND (status = 'Pending' OR (status = 'Failed' AND attempts < max_attempts))
           GROUP BY job_type"#,
    )
    .fetch_all(db)
    .await?;
    for queue in QUEUES {
        let row = rows.iter().find(|row| row.queue == queue);
        #[allow(clippy::cast_precision_loss)]
        let depth = row.map_or(0.0, |row| row.depth as f64);
        metrics::gauge!(QUEUE_DEPTH, "queue" => queue).set(depth);
        metrics::gauge!(QUEUE_OLDEST_AGE, "queue" => queue)
            .set(row.map_or(0.0, |row| row.oldest_age));
    }
    Ok(())
}
