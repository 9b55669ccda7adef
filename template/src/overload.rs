//! Overload protection: a whole-request timeout and a concurrency ceiling.
//!
//! Prevents: an overloaded or stuck service that queues work it can no longer do in time, until
//! every client times out and retries on top. Past `MAX_CONCURRENT_REQUESTS` requests in flight,
//! a new request is refused at once with 503 `service_unavailable` (load shedding); a request
//! that runs longer than `REQUEST_TIMEOUT_SECS` is abandoned with 503 `timeout`. Both carry
//! `Retry-After`, so well-behaved clients back off.
//!
//! Built from tower's own layers (`TimeoutLayer`, `LoadShedLayer`, `GlobalConcurrencyLimitLayer`,
//! whose one semaphore is shared by every route); this module only turns their errors into
//! problems.

use axum::BoxError;

use crate::problem::{ErrorCode, Problem};

/// The `HandleErrorLayer` function for the overload layers.
pub async fn into_problem(error: BoxError) -> Problem {
    if error.is::<tower::timeout::error::Elapsed>() {
        Problem::new(
            ErrorCode::Timeout,
            "The request took too long and was abandoned; retry later.",
        )
    } else if error.is::<tower::load_shed::error::Overloaded>() {
        Problem::new(
            ErrorCode::ServiceUnavailable,
            "The service is at capacity; retry shortly.",
        )
    } else {
        Problem::internal(anyhow::anyhow!("middleware error: {error}"))
    }
}
