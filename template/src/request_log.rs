//! One structured log line per request, and a span that every log line of the request inherits;
//! the same layer records the request in the metrics (`metrics::record_request`).
//!
//! Prevents: requests you cannot find or correlate. Every line written while a request is handled
//! carries its `request_id`; the closing `request` line adds method, matched route, the
//! authenticated principal, status, latency and, for errors, the problem `code`, so a dashboard can be built on the logs alone.
//! Hand-written rather than tower-http's `TraceLayer` because that layer cannot see the matched
//! route template or our error code, which are the fields worth searching on.

use std::ops::ControlFlow;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::response::Response;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::middleware::Around;
use crate::problem::ErrorCode;

/// Route label for requests no route matched; a fixed value keeps log and metric labels bounded.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The matched route template (`/v1/orders/{id}`), never the raw path.
pub fn route_of(request: &Request) -> String {
    request.extensions().get::<MatchedPath>().map_or_else(
        || UNMATCHED_ROUTE.to_owned(),
        |path| path.as_str().to_owned(),
    )
}

/// `{METHOD} {route}`, or only the method when no route matched, with unknown methods as `HTTP`,
/// as the semantic conventions ask, so that clients cannot mint span names.
fn span_name(method: &Method, route: &str) -> String {
    let method = match crate::metrics::method_label(method) {
        "_OTHER" => "HTTP",
        known => known,
    };
    if route == UNMATCHED_ROUTE {
        method.to_owned()
    } else {
        format!("{method} {route}")
    }
}

/// The middleware: opens the request's span, and logs and counts the request when it is answered.
#[derive(Debug, Clone, Copy)]
pub struct LogRequest;

/// What the closing line and the metric need of the request.
pub struct Open {
    started: Instant,
    method: Method,
    route: String,
    span: Span,
}

impl Around for LogRequest {
    type Carry = Open;

    fn before(&self, request: &mut Request) -> ControlFlow<Response, Open> {
        ControlFlow::Continue(open(request))
    }

    fn scope<R>(open: &Open, below: impl FnOnce() -> R) -> R {
        open.span.in_scope(below)
    }

    fn after(open: Open, response: Response) -> Response {
        close(open, response)
    }
}

fn open(request: &Request) -> Open {
    let started = Instant::now();
    let method = request.method().clone();
    let route = route_of(request);
    // Error level, so that the span (and the request id it carries) exists at every log level:
    // with `RUST_LOG=warn` an info span would be disabled and warnings would lose their context.
    // The `otel.*` and `http.*` fields make it an OpenTelemetry server span named
    // `{METHOD} {route}` (semantic conventions) when traces are exported.
    let span = tracing::error_span!(
        "request",
        request_id = crate::request_id::of(request),
        method = %method,
        route = %route,
        // Recorded by `auth::identify` once the token is verified.
        principal = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        otel.name = span_name(&method, &route),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = %route,
        url.path = request.uri().path(),
        http.response.status_code = tracing::field::Empty,
    );
    // Continue the caller's trace (W3C `traceparent`); an invalid or missing one starts a new one.
    let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.extract(&opentelemetry_http::HeaderExtractor(request.headers()))
    });
    let _ = span.set_parent(parent);
    if let Some(trace_id) = span.in_scope(crate::telemetry::current_trace_id) {
        span.record("trace_id", trace_id);
    }
    Open {
        started,
        method,
        route,
        span,
    }
}

fn close(
    Open {
        started,
        method,
        route,
        span,
    }: Open,
    response: Response,
) -> Response {
    let status = response.status().as_u16();
    span.record("http.response.status_code", status);
    if response.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    let elapsed = started.elapsed();
    crate::metrics::record_request(&method, route, response.status(), elapsed);
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    let error_code = response
        .extensions()
        .get::<ErrorCode>()
        .map(|code| code.as_str());
    // Errors are problems we rendered; a failing health report (503 while shutting down) is an
    // answer, not an error, and is logged as one.
    span.in_scope(|| match error_code {
        Some(code) if response.status().is_server_error() => {
            tracing::error!(status, latency_ms, error_code = code, "request")
        }
        Some(code) => tracing::warn!(status, latency_ms, error_code = code, "request"),
        None => tracing::info!(status, latency_ms, "request"),
    });
    response
}
