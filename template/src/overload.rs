//! Overload protection: a whole-request timeout and a concurrency ceiling.
//!
//! Prevents: an overloaded or stuck service that queues work it can no longer do in time, until
//! every client times out and retries on top. Past `MAX_CONCURRENT_REQUESTS` requests in flight,
//! a new request is refused at once with 503 `service_unavailable` (load shedding); a request
//! that runs longer than `REQUEST_TIMEOUT_SECS` is abandoned with 503 `timeout`. Both carry
//! `Retry-After`, so well-behaved clients back off.
//!
//! The health probes are exempt: a pod that sheds load is busy, not dead, and must not be
//! restarted (`/livez`) for it. That per-route exemption is why this is a small middleware over
//! a semaphore and `tokio::time::timeout` rather than tower's `LoadShed`/`ConcurrencyLimit`/
//! `Timeout` layers, which `Router::layer` would apply to every route alike.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::config::HttpConfig;
use crate::problem::{ErrorCode, Problem};

/// Routes that are never shed or timed out.
const EXEMPT_ROUTES: &[&str] = &["/livez", "/readyz"];

/// Uploads (`POST` on these routes) take as long as the client's bandwidth needs, far longer than
/// an API call should: they get `IMPORT_UPLOAD_TIMEOUT_SECS` instead of `REQUEST_TIMEOUT_SECS`.
const UPLOAD_ROUTES: &[&str] = &["/v1/imports"];

#[derive(Debug, Clone)]
pub struct Overload {
    slots: Arc<Semaphore>,
    timeout: Duration,
    upload_timeout: Duration,
}

impl Overload {
    pub fn new(http: &HttpConfig) -> Self {
        Overload {
            slots: Arc::new(Semaphore::new(http.max_concurrent_requests)),
            timeout: http.request_timeout,
            upload_timeout: http.upload_timeout,
        }
    }
}

pub async fn guard(State(overload): State<Overload>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str);
    if route.is_some_and(|route| EXEMPT_ROUTES.contains(&route)) {
        return next.run(request).await;
    }
    let upload = request.method() == Method::POST
        && route.is_some_and(|route| UPLOAD_ROUTES.contains(&route));
    let timeout = if upload {
        overload.upload_timeout
    } else {
        overload.timeout
    };
    // Held until the response is produced; dropping it frees the slot.
    let Ok(_slot) = overload.slots.clone().try_acquire_owned() else {
        return Problem::new(
            ErrorCode::ServiceUnavailable,
            "The service is at capacity; retry shortly.",
        )
        .into_response();
    };
    match tokio::time::timeout(timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            ErrorCode::Timeout,
            "The request took too long and was abandoned; retry later.",
        )
        .into_response(),
    }
}
