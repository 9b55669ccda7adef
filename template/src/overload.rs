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
//! a semaphore and a timer rather than tower's `LoadShed`/`ConcurrencyLimit`/`Timeout` layers,
//! which `Router::layer` would apply to every route alike.

use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;

use crate::config::HttpConfig;
use crate::middleware::Around;
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

/// What a request that counts against the ceiling holds until its response is produced.
pub struct Admitted {
    /// Dropping it frees the slot.
    _slot: OwnedSemaphorePermit,
    deadline: Pin<Box<Sleep>>,
}

impl Around for Overload {
    /// `None` for the exempt routes.
    type Carry = Option<Admitted>;

    fn before(&self, request: &mut Request) -> ControlFlow<Response, Self::Carry> {
        let route = request
            .extensions()
            .get::<MatchedPath>()
            .map(MatchedPath::as_str);
        if route.is_some_and(|route| EXEMPT_ROUTES.contains(&route)) {
            return ControlFlow::Continue(None);
        }
        let upload = request.method() == Method::POST
            && route.is_some_and(|route| UPLOAD_ROUTES.contains(&route));
        let timeout = if upload {
            self.upload_timeout
        } else {
            self.timeout
        };
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            return ControlFlow::Break(
                Problem::new(
                    ErrorCode::ServiceUnavailable,
                    "The service is at capacity; retry shortly.",
                )
                .into_response(),
            );
        };
        ControlFlow::Continue(Some(Admitted {
            _slot: slot,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }))
    }

    fn interrupt(admitted: &mut Self::Carry, cx: &mut Context<'_>) -> Poll<Response> {
        let Some(admitted) = admitted else {
            return Poll::Pending;
        };
        // Polled outside the task's budget (`middleware::Around::interrupt`), so it fires even
        // under a handler that spends the budget on every poll.
        ready!(admitted.deadline.as_mut().poll(cx));
        Poll::Ready(
            Problem::new(
                ErrorCode::Timeout,
                "The request took too long and was abandoned; retry later.",
            )
            .into_response(),
        )
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use axum::body::Body;
    use axum::http::StatusCode;
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::middleware::around;

    #[tokio::test]
    async fn a_handler_that_spends_every_budget_still_times_out_and_frees_its_slot() {
        let http = HttpConfig {
            max_body_bytes: 1024,
            request_timeout: Duration::from_millis(50),
            upload_timeout: Duration::from_millis(50),
            max_concurrent_requests: 1,
            cors_allowed_origins: Vec::new(),
            hsts_max_age: None,
            disabled: Vec::new(),
        };
        // `/busy` never finishes and never lets its task's budget go unspent, like a handler
        // reading a long run of ready socket data; anything else answers at once.
        let handler = tower::service_fn(|request: Request| async move {
            while request.uri().path() == "/busy" {
                tokio::task::coop::consume_budget().await;
            }
            Ok::<_, Infallible>(StatusCode::OK.into_response())
        });
        let service = ServiceBuilder::new()
            .layer(around(Overload::new(&http)))
            .service(handler);
        let send = |path: &'static str| {
            let request = Request::builder().uri(path).body(Body::empty()).unwrap();
            let answer = service.clone().oneshot(request);
            async { tokio::time::timeout(Duration::from_secs(10), answer).await }
        };

        let timed_out = send("/busy").await.expect("the deadline fires").unwrap();
        assert_eq!(timed_out.status(), StatusCode::SERVICE_UNAVAILABLE);
        let next = send("/").await.expect("answers").unwrap();
        assert_eq!(next.status(), StatusCode::OK, "the only slot is free again");
    }
}
