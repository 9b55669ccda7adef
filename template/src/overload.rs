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
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::config::HttpConfig;
use crate::problem::{ErrorCode, Problem};

/// Routes that are never shed or timed out.
const EXEMPT_ROUTES: &[&str] = &["/livez", "/readyz"];

#[derive(Debug, Clone)]
pub struct Overload {
    slots: Arc<Semaphore>,
    timeout: Duration,
}

impl Overload {
    pub fn new(http: &HttpConfig) -> Self {
        Overload {
            slots: Arc::new(Semaphore::new(http.max_concurrent_requests)),
            timeout: http.request_timeout,
        }
    }
}

pub async fn guard(State(overload): State<Overload>, request: Request, next: Next) -> Response {
    let exempt = request
        .extensions()
        .get::<MatchedPath>()
        .is_some_and(|route| EXEMPT_ROUTES.contains(&route.as_str()));
    if exempt {
        return next.run(request).await;
    }
    // Held until the response is produced; dropping it frees the slot.
    let Ok(_slot) = overload.slots.clone().try_acquire_owned() else {
        return Problem::new(
            ErrorCode::ServiceUnavailable,
            "The service is at capacity; retry shortly.",
        )
        .into_response();
    };
    match tokio::time::timeout(overload.timeout, next.run(request)).await {
        Ok(response) => response,
        Err(_) => Problem::new(
            ErrorCode::Timeout,
            "The request took too long and was abandoned; retry later.",
        )
        .into_response(),
    }
}
