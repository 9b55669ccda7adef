//! Middleware that runs in line with the request: a step before the layers below it, a step on
//! their response, and nothing allocated or cloned by the plumbing in between.
//!
//! Prevents: a middleware stack whose plumbing costs more than its work. axum's `from_fn`, per
//! request and per layer, clones every layer below it down to the handler, boxes that clone and
//! boxes its own future. Under load on two cores, a build with every layer's work skipped, only
//! that plumbing left, still served reads at 85% of a bare handler's rate (`docs/benchmarks.md`,
//! "Fewer boxed layers"). Most of the stack's steps do not need an `async fn` at all: they look
//! at the request, perhaps answer it at once, and look at the response. [`Around`] is that shape;
//! its one tower service calls the layer below directly and returns a future it can name.
//!
//! A step that must wait for something before the request goes on (the rate limiter asking
//! Redis) stays an axum `from_fn`: it needs its own copy of the layers below to call later.

use std::convert::Infallible;
use std::future::Future;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use axum::body::Body;
use axum::extract::Request;
use axum::response::Response;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

/// One middleware step. `before` sees the request on its way down, `after` the response on its
/// way up. They are plain functions: nothing a step does can wait (a step that must is an axum
/// `from_fn`).
///
/// Only `before` takes `&self`: the service keeps the step, its future does not (that would be a
/// clone per request), so whatever `after`, `scope` and `interrupt` need of the step or the
/// request travels in [`Around::Carry`].
pub trait Around: Clone + Send + Sync + 'static {
    /// What the request leaves for its response: a start time, the matched route, a permit.
    type Carry: Send + 'static;

    /// Lets the request on to the layers below (`Continue`), or answers it now (`Break`): then
    /// they never see it, and `after` does not run.
    fn before(&self, request: &mut Request) -> ControlFlow<Response, Self::Carry>;

    /// Changes the response on its way out: that of the layers below, or `interrupt`'s.
    fn after(carry: Self::Carry, response: Response) -> Response {
        let _ = carry;
        response
    }

    /// Runs the layers below: their call, each poll of their future, and its drop. For a tracing
    /// span: every line logged below, and `Span::current()` (where `auth::identify` records the
    /// caller), must find the request's span. `before`, `after` and `interrupt` run outside it.
    fn scope<R>(carry: &Self::Carry, below: impl FnOnce() -> R) -> R {
        let _ = carry;
        below()
    }

    /// Asked each time the layers below are not done yet: an answer in their place (a deadline
    /// passed), after which they are dropped, or `Pending` to keep waiting. Like any poll, a
    /// `Pending` must have registered `cx`'s waker for what it waits on. It is asked outside
    /// tokio's task budget, so a timer polled here fires even when the layers below spend it.
    fn interrupt(carry: &mut Self::Carry, cx: &mut Context<'_>) -> Poll<Response> {
        let _ = (carry, cx);
        Poll::Pending
    }
}

/// The layer for `step`: `ServiceBuilder::new().layer(middleware::around(step))`.
pub fn around<A: Around>(step: A) -> AroundLayer<A> {
    AroundLayer { step }
}

#[derive(Debug, Clone)]
pub struct AroundLayer<A> {
    step: A,
}

impl<A: Around, S> Layer<S> for AroundLayer<A> {
    type Service = AroundService<A, S>;

    fn layer(&self, inner: S) -> Self::Service {
        AroundService {
            step: self.step.clone(),
            inner,
        }
    }
}

#[derive(Debug, Clone)]
pub struct AroundService<A, S> {
    step: A,
    inner: S,
}

impl<A, S, B> Service<Request> for AroundService<A, S>
where
    A: Around,
    S: Service<Request, Response = axum::http::Response<B>, Error = Infallible>,
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = AroundFuture<A, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        match self.step.before(&mut request) {
            ControlFlow::Continue(carry) => AroundFuture {
                below: Some(A::scope(&carry, || self.inner.call(request))),
                carry: Some(carry),
                answer: None,
            },
            ControlFlow::Break(answer) => AroundFuture {
                below: None,
                carry: None,
                answer: Some(answer),
            },
        }
    }
}

pin_project! {
    /// The response of the layers below, or `before`'s own answer.
    pub struct AroundFuture<A: Around, F> {
        #[pin]
        below: Option<F>,
        carry: Option<A::Carry>,
        answer: Option<Response>,
    }

    // A request abandoned before its answer (the client went away) drops the layers below in
    // scope too, as a finished one does: whatever their drop logs belongs to the request.
    impl<A: Around, F> PinnedDrop for AroundFuture<A, F> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            if let Some(carry) = this.carry.as_ref() {
                A::scope(carry, || this.below.set(None));
            }
        }
    }
}

impl<A, F, B> Future for AroundFuture<A, F>
where
    A: Around,
    F: Future<Output = Result<axum::http::Response<B>, Infallible>>,
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        const POLLED_AFTER_READY: &str = "a middleware future was polled after it finished";
        let mut this = self.project();
        if let Some(answer) = this.answer.take() {
            return Poll::Ready(Ok(answer));
        }
        let carry = this.carry.as_mut().expect(POLLED_AFTER_READY);
        let below = this.below.as_mut().as_pin_mut().expect(POLLED_AFTER_READY);
        let response = match A::scope(carry, || below.poll(cx)) {
            Poll::Ready(Ok(response)) => response.map(Body::new),
            Poll::Ready(Err(never)) => match never {},
            // Outside tokio's task budget, as `tokio::time::timeout` polls its timer: a handler
            // that spends the budget on every poll (a long run of ready socket reads) would
            // otherwise make every deadline answer `Pending`, and never time out.
            Poll::Pending => {
                let interrupt = std::future::poll_fn(|cx| A::interrupt(carry, cx));
                ready!(Pin::new(&mut tokio::task::coop::unconstrained(interrupt)).poll(cx))
            }
        };
        let carry = this.carry.take().expect(POLLED_AFTER_READY);
        // Done with the layers below (an interrupted handler too): dropped now, in scope, so
        // what they hold (a connection, a permit) is free before the response goes on.
        A::scope(&carry, || this.below.set(None));
        Poll::Ready(Ok(A::after(carry, response)))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::time::Duration;

    use axum::http::{HeaderValue, StatusCode};
    use axum::response::IntoResponse;
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;

    thread_local! {
        static IN_SCOPE: Cell<bool> = const { Cell::new(false) };
        /// Set when the layer below's future is dropped: `Some(in scope or not)`.
        static BELOW_DROPPED: Cell<Option<bool>> = const { Cell::new(None) };
    }

    /// Refuses `/refused`, marks what it lets through, and gives the layer below 50 ms.
    #[derive(Clone)]
    struct Step;

    impl Around for Step {
        type Carry = Pin<Box<tokio::time::Sleep>>;

        fn before(&self, request: &mut Request) -> ControlFlow<Response, Self::Carry> {
            if request.uri().path() == "/refused" {
                return ControlFlow::Break(StatusCode::FORBIDDEN.into_response());
            }
            ControlFlow::Continue(Box::pin(tokio::time::sleep(Duration::from_millis(50))))
        }

        fn after(_: Self::Carry, mut response: Response) -> Response {
            let dropped = match BELOW_DROPPED.get() {
                Some(true) => "in scope",
                Some(false) => "outside",
                None => "no",
            };
            let headers = response.headers_mut();
            headers.insert("x-after", HeaderValue::from_static("yes"));
            headers.insert("x-below-dropped", HeaderValue::from_static(dropped));
            response
        }

        fn scope<R>(_: &Self::Carry, below: impl FnOnce() -> R) -> R {
            IN_SCOPE.set(true);
            let result = below();
            IN_SCOPE.set(false);
            result
        }

        fn interrupt(deadline: &mut Self::Carry, cx: &mut Context<'_>) -> Poll<Response> {
            ready!(deadline.as_mut().poll(cx));
            Poll::Ready(StatusCode::SERVICE_UNAVAILABLE.into_response())
        }
    }

    struct DropFlag;

    impl Drop for DropFlag {
        fn drop(&mut self) {
            BELOW_DROPPED.set(Some(IN_SCOPE.get()));
        }
    }

    /// Behind the step: answers after one yield, or never for `/slow` (spending its task's
    /// budget on every poll), and says whether its call and its later poll ran in scope.
    async fn send(path: &str) -> Response {
        BELOW_DROPPED.set(None);
        let below = tower::service_fn(|request: Request| {
            let called_in_scope = IN_SCOPE.get();
            let slow = request.uri().path() == "/slow";
            async move {
                let _flag = DropFlag;
                tokio::task::yield_now().await;
                if slow {
                    loop {
                        tokio::task::coop::consume_budget().await;
                    }
                }
                let polled_in_scope = IN_SCOPE.get();
                let body = format!("{called_in_scope} {polled_in_scope}");
                Ok::<_, Infallible>(body.into_response())
            }
        });
        let service = ServiceBuilder::new().layer(around(Step)).service(below);
        let request = Request::builder().uri(path).body(Body::empty()).unwrap();
        service.oneshot(request).await.unwrap()
    }

    async fn text(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn the_layer_below_runs_in_scope_and_its_answer_passes_after() {
        let response = send("/").await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-after"], "yes");
        assert_eq!(response.headers()["x-below-dropped"], "in scope");
        assert_eq!(
            text(response).await,
            "true true",
            "call and later poll in scope"
        );
    }

    #[tokio::test]
    async fn an_answer_from_before_skips_the_layer_below_and_after() {
        let response = send("/refused").await;
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert!(response.headers().get("x-after").is_none());
        assert_eq!(BELOW_DROPPED.get(), None, "never called");
        assert_eq!(text(response).await, "");
    }

    #[tokio::test]
    async fn an_interrupt_answers_in_place_of_a_layer_below_that_never_finishes() {
        let response = tokio::time::timeout(Duration::from_secs(10), send("/slow"))
            .await
            .expect("the interrupt answers, though the layer below spends every budget");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["x-after"], "yes", "after sees it too");
        assert_eq!(
            response.headers()["x-below-dropped"],
            "in scope",
            "the abandoned layer below is dropped before after runs"
        );
    }
}
