//! Prometheus metrics, scraped from the admin listener.
//!
//! Prevents: finding out about errors and latency from users. Request duration is a histogram
//! labelled by method, matched route template and status, so label cardinality stays bounded no
//! matter what paths clients send (`/v1/orders/1`, `/v1/orders/2`, … are one series).

use std::sync::OnceLock;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{Method, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use sqlx::PgPool;

pub const REQUEST_DURATION: &str = "http_server_request_duration_seconds";
pub const POOL_CONNECTIONS: &str = "db_pool_connections";
pub const POOL_MAX_CONNECTIONS: &str = "db_pool_max_connections";
pub const VALIDATION_FAILURES: &str = "validation_failures_total";

/// The OpenTelemetry HTTP semantic-convention buckets, in seconds.
const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// Jobs take from milliseconds (a webhook call) to minutes (a large import).
const JOB_DURATION_BUCKETS: [f64; 12] = [
    0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
];

/// Installs the process-wide recorder once and returns its handle; later calls (several apps in
/// one test process) share it.
pub fn recorder() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(REQUEST_DURATION.to_owned()),
                    &DURATION_BUCKETS,
                )
                .expect("the bucket list is a non-empty constant")
                .set_buckets_for_metric(
                    Matcher::Full(crate::jobs::JOB_DURATION.to_owned()),
                    &JOB_DURATION_BUCKETS,
                )
                .expect("the bucket list is a non-empty constant");
            let handle = builder
                .install_recorder()
                .expect("no other metrics recorder is installed in this process");
            describe();
            handle
        })
        .clone()
}

/// Every metric the service exports, described once: Prometheus tooling (and `promtool check
/// metrics`) rejects undescribed ones, and this is the list the alert rules may rely on.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        REQUEST_DURATION,
        Unit::Seconds,
        "Duration of HTTP requests on the public listener, by method, route template and status."
    );
    describe_gauge!(
        POOL_CONNECTIONS,
        "Database pool connections by state (idle, in_use)."
    );
    describe_gauge!(
        POOL_MAX_CONNECTIONS,
        "Database pool size limit (DATABASE_MAX_CONNECTIONS)."
    );
    describe_counter!(
        VALIDATION_FAILURES,
        "Request bodies rejected with 422 validation_failed."
    );
    describe_counter!(
        crate::rate_limit::REJECTIONS,
        "Requests refused with 429 by a rate limit, by policy."
    );
    describe_counter!(
        crate::rate_limit::BACKEND_ERRORS,
        "Rate-limit decisions that fell back to local buckets because Redis did not answer."
    );
    describe_counter!(
        crate::idempotency::REPLAYS,
        "Responses replayed for a repeated Idempotency-Key."
    );
    use crate::jobs;
    // Exported from the start, so that alerts and dashboards see zeros rather than no data.
    for (counter, description) in jobs::COUNTERS {
        describe_counter!(counter, description);
        for queue in jobs::QUEUES {
            metrics::counter!(counter, "queue" => queue).absolute(0);
        }
    }
    describe_histogram!(
        jobs::JOB_DURATION,
        Unit::Seconds,
        "Duration of job attempts, by queue and outcome (succeeded, failed, released)."
    );
    describe_gauge!(
        jobs::QUEUE_DEPTH,
        "Jobs waiting to run, by queue (read from the database at scrape time)."
    );
    describe_gauge!(
        jobs::QUEUE_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest job waiting to run, by queue: the queue lag."
    );
    describe_counter!(
        crate::imports::job::IMPORT_ROWS,
        "Rows of finished imports, by outcome (valid, failed: with an error)."
    );
    describe_counter!(
        crate::imports::job::IMPORT_ORDERS,
        "Orders of finished imports, by outcome (imported, rejected)."
    );
    describe_counter!(
        crate::webhook::DELIVERIES,
        "Webhook calls, by outcome (delivered, failed, short_circuited, forbidden)."
    );
    describe_gauge!(
        crate::webhook::CIRCUIT_OPEN,
        "1 while the webhook's circuit breaker is open."
    );
    describe_gauge!(
        crate::rate_limit::CIRCUIT_OPEN,
        "1 while the rate limiter's circuit breaker to Redis is open (decisions are local)."
    );
}

/// Records one request in the request-duration histogram, labelled by the matched route template.
/// Called by the request log's layer (`request_log::LogRequest`), which already holds the
/// method, route and latency: a second layer timing the same request would cost every request a
/// boxed future and a copy of the layers below it.
pub fn record_request(method: &Method, route: String, status: StatusCode, elapsed: Duration) {
    metrics::histogram!(
        REQUEST_DURATION,
        "method" => method_label(method),
        "route" => route,
        "status" => status.as_u16().to_string()
    )
    .record(elapsed.as_secs_f64());
}

/// Standard methods by name, anything else (`FOO1`, `FOO2`, …) as `_OTHER`, as OpenTelemetry's
/// semantic conventions ask, so a client cannot mint new series.
pub(crate) fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::CONNECT => "CONNECT",
        _ => "_OTHER",
    }
}

/// `GET /metrics` in the Prometheus text format, for the admin listener only.
pub fn admin_routes(db: PgPool) -> Router {
    let handle = recorder();
    // Histograms buffer samples until upkeep folds them in; without it memory grows between scrapes.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Router::new()
        .route("/metrics", get(render))
        .with_state(Scrape { handle, db })
}

#[derive(Clone)]
struct Scrape {
    handle: PrometheusHandle,
    db: PgPool,
}

/// Pool gauges are read at scrape time, from the pool itself: always current, no extra task.
async fn render(State(Scrape { handle, db }): State<Scrape>) -> impl IntoResponse {
    let (size, idle) = (db.size(), u32::try_from(db.num_idle()).unwrap_or(u32::MAX));
    metrics::gauge!(POOL_CONNECTIONS, "state" => "idle").set(f64::from(idle));
    metrics::gauge!(POOL_CONNECTIONS, "state" => "in_use")
        .set(f64::from(size.saturating_sub(idle)));
    metrics::gauge!(POOL_MAX_CONNECTIONS).set(f64::from(db.options().get_max_connections()));
    // Bounded: a scrape during a database outage must still answer, with the pool gauges.
    match tokio::time::timeout(
        Duration::from_secs(1),
        crate::jobs::record_queue_gauges(&db),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(error)) => tracing::warn!(%error, "cannot read the job queues for metrics"),
        Err(_) => tracing::warn!("reading the job queues for metrics timed out"),
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
}
