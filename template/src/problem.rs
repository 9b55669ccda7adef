//! One error type for the whole service, rendered as RFC 9457 `application/problem+json`.
//!
//! Prevents: clients that must parse five error shapes (axum's plain-text rejections, empty 405s,
//! tower-http's 413, a panic's dropped connection, our own JSON), and 500 bodies that leak SQL or
//! stack traces. Handlers return `Result<_, Problem>`; the [`Render`] middleware turns every error
//! response, ours or the framework's, into the same document carrying the request id, and logs the
//! cause of 5xx errors under that id.
//!
//! The catalogue of codes is [`ErrorCode`]; `type` links to it (`/docs/errors#<code>`), served by
//! the binary itself.

use std::borrow::Cow;
use std::ops::ControlFlow;
use std::sync::Arc;

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use tower_http::request_id::RequestId;
use utoipa::ToSchema;

use crate::middleware::Around;

pub const PROBLEM_JSON: &str = "application/problem+json";

/// The stable, machine-readable error codes. Clients switch on these, so never rename one; add new
/// variants instead (and a row in [`ErrorCode::spec`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    MalformedBody,
    InvalidParameter,
    InvalidCursor,
    IdempotencyKeyRequired,
    IdempotencyKeyInvalid,
    Unauthenticated,
    InvalidCredentials,
    Forbidden,
    NotFound,
    MethodNotAllowed,
    InvalidStateTransition,
    IdempotencyKeyInUse,
    PreconditionFailed,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
    IdempotencyKeyReused,
    PreconditionRequired,
    RateLimited,
    InvalidCsvHeader,
    ExternalRefTaken,
    TooManyImports,
    InternalError,
    ServiceUnavailable,
    Timeout,
}

/// Everything the catalogue says about one code.
pub struct CodeSpec {
    pub code: &'static str,
    pub status: StatusCode,
    /// Stable per code, as RFC 9457 asks of `title`.
    pub title: &'static str,
    /// When a client sees this code.
    pub meaning: &'static str,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 25] = [
        ErrorCode::MalformedBody,
        ErrorCode::InvalidParameter,
        ErrorCode::InvalidCursor,
        ErrorCode::IdempotencyKeyRequired,
        ErrorCode::IdempotencyKeyInvalid,
        ErrorCode::Unauthenticated,
        ErrorCode::InvalidCredentials,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::InvalidStateTransition,
        ErrorCode::IdempotencyKeyInUse,
        ErrorCode::PreconditionFailed,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::ValidationFailed,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::PreconditionRequired,
        ErrorCode::RateLimited,
        ErrorCode::InvalidCsvHeader,
        ErrorCode::ExternalRefTaken,
        ErrorCode::TooManyImports,
        ErrorCode::InternalError,
        ErrorCode::ServiceUnavailable,
        ErrorCode::Timeout,
    ];

    /// The catalogue: the one place that gives each code its status, title and meaning.
    pub fn spec(self) -> CodeSpec {
        use StatusCode as S;
        let (code, status, title, meaning) = match self {
            ErrorCode::MalformedBody => (
                "malformed_body",
                S::BAD_REQUEST,
                "Malformed request body",
                "The body is not valid JSON (or, for an import, not valid CSV).",
            ),
            ErrorCode::InvalidParameter => (
                "invalid_parameter",
                S::BAD_REQUEST,
                "Invalid parameter",
                "A path or query parameter cannot be parsed or is out of range.",
            ),
            ErrorCode::InvalidCursor => (
                "invalid_cursor",
                S::BAD_REQUEST,
                "Invalid cursor",
                "The pagination cursor was altered, or belongs to another caller or other filters.",
            ),
            ErrorCode::IdempotencyKeyRequired => (
                "idempotency_key_required",
                S::BAD_REQUEST,
                "Idempotency key required",
                "This operation needs an `Idempotency-Key` header.",
            ),
            ErrorCode::IdempotencyKeyInvalid => (
                "idempotency_key_invalid",
                S::BAD_REQUEST,
                "Invalid idempotency key",
                "The `Idempotency-Key` must be 1-255 printable ASCII characters.",
            ),
            ErrorCode::Unauthenticated => (
                "unauthenticated",
                S::UNAUTHORIZED,
                "Unauthenticated",
                "No bearer token, or one that is malformed, expired or forged.",
            ),
            ErrorCode::InvalidCredentials => (
                "invalid_credentials",
                S::UNAUTHORIZED,
                "Invalid credentials",
                "The e-mail and password do not match an account.",
            ),
            ErrorCode::Forbidden => (
                "forbidden",
                S::FORBIDDEN,
                "Forbidden",
                "Your role may not perform this action.",
            ),
            ErrorCode::NotFound => (
                "not_found",
                S::NOT_FOUND,
                "Not found",
                "No such route, no such resource, or a resource you may not see.",
            ),
            ErrorCode::MethodNotAllowed => (
                "method_not_allowed",
                S::METHOD_NOT_ALLOWED,
                "Method not allowed",
                "The route exists but not with this method; see `Allow`.",
            ),
            ErrorCode::InvalidStateTransition => (
                "invalid_state_transition",
                S::CONFLICT,
                "Invalid state transition",
                "The resource's current state does not allow this action; `detail` names the state.",
            ),
            ErrorCode::IdempotencyKeyInUse => (
                "idempotency_key_in_use",
                S::CONFLICT,
                "Idempotency key in use",
                "A request with this key is still being processed; retry after `Retry-After`.",
            ),
            ErrorCode::PreconditionFailed => (
                "precondition_failed",
                S::PRECONDITION_FAILED,
                "Precondition failed",
                "`If-Match` does not match the current `ETag`: fetch the resource again.",
            ),
            ErrorCode::PayloadTooLarge => (
                "payload_too_large",
                S::PAYLOAD_TOO_LARGE,
                "Payload too large",
                "The request body is larger than the service accepts.",
            ),
            ErrorCode::UnsupportedMediaType => (
                "unsupported_media_type",
                S::UNSUPPORTED_MEDIA_TYPE,
                "Unsupported media type",
                "The body's `Content-Type` is not one this route accepts.",
            ),
            ErrorCode::ValidationFailed => (
                "validation_failed",
                S::UNPROCESSABLE_ENTITY,
                "Validation failed",
                "One or more fields are invalid; `errors` lists every one.",
            ),
            ErrorCode::IdempotencyKeyReused => (
                "idempotency_key_reused",
                S::UNPROCESSABLE_ENTITY,
                "Idempotency key reused",
                "This key was used for a different request; use a new key.",
            ),
            ErrorCode::PreconditionRequired => (
                "precondition_required",
                S::PRECONDITION_REQUIRED,
                "Precondition required",
                "This operation needs an `If-Match` header with the current `ETag`.",
            ),
            ErrorCode::RateLimited => (
                "rate_limited",
                S::TOO_MANY_REQUESTS,
                "Too many requests",
                "You sent too many requests; retry after `Retry-After` seconds.",
            ),
            ErrorCode::InvalidCsvHeader => (
                "invalid_csv_header",
                S::UNPROCESSABLE_ENTITY,
                "Invalid CSV header",
                "The first row must be `external_ref,currency,sku,quantity,unit_price_cents` (+ optional `note`).",
            ),
            ErrorCode::ExternalRefTaken => (
                "external_ref_taken",
                S::CONFLICT,
                "External reference taken",
                "Another of your orders already has this `external_ref`.",
            ),
            ErrorCode::TooManyImports => (
                "too_many_imports",
                S::TOO_MANY_REQUESTS,
                "Too many imports",
                "You have as many imports queued or running as allowed; retry after `Retry-After`.",
            ),
            ErrorCode::InternalError => (
                "internal_error",
                S::INTERNAL_SERVER_ERROR,
                "Internal error",
                "An unexpected failure; quote the `request_id` when reporting it.",
            ),
            ErrorCode::ServiceUnavailable => (
                "service_unavailable",
                S::SERVICE_UNAVAILABLE,
                "Service unavailable",
                "A dependency is down or the service is overloaded; retry after `Retry-After`.",
            ),
            ErrorCode::Timeout => (
                "timeout",
                S::SERVICE_UNAVAILABLE,
                "Timeout",
                "The request took too long to complete; retry after `Retry-After`.",
            ),
        };
        CodeSpec {
            code,
            status,
            title,
            meaning,
        }
    }

    pub fn status(self) -> StatusCode {
        self.spec().status
    }

    pub fn as_str(self) -> &'static str {
        self.spec().code
    }

    pub fn title(self) -> &'static str {
        self.spec().title
    }

    pub fn meaning(self) -> &'static str {
        self.spec().meaning
    }

    /// The code named `name`, for problems read back from storage (idempotent replays).
    pub fn from_name(name: &str) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.as_str() == name)
    }

    /// The code for an error response a layer produced without going through [`Problem`]. The
    /// response keeps its own status; this only names it.
    fn for_status(status: StatusCode) -> ErrorCode {
        match status {
            StatusCode::UNAUTHORIZED => ErrorCode::Unauthenticated,
            StatusCode::FORBIDDEN => ErrorCode::Forbidden,
            StatusCode::NOT_FOUND => ErrorCode::NotFound,
            StatusCode::METHOD_NOT_ALLOWED => ErrorCode::MethodNotAllowed,
            StatusCode::PRECONDITION_FAILED => ErrorCode::PreconditionFailed,
            StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ErrorCode::UnsupportedMediaType,
            StatusCode::UNPROCESSABLE_ENTITY => ErrorCode::ValidationFailed,
            StatusCode::PRECONDITION_REQUIRED => ErrorCode::PreconditionRequired,
            StatusCode::TOO_MANY_REQUESTS => ErrorCode::RateLimited,
            StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => ErrorCode::Timeout,
            StatusCode::SERVICE_UNAVAILABLE => ErrorCode::ServiceUnavailable,
            status if status.is_client_error() => ErrorCode::InvalidParameter,
            _ => ErrorCode::InternalError,
        }
    }
}

/// One invalid field of a request, located by a JSON Pointer (RFC 6901) into the body, or by
/// `/query/<name>` and `/path/<name>` for parameters.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FieldError {
    #[schema(example = "/items/0/quantity")]
    pub pointer: String,
    #[schema(example = "range")]
    pub code: Cow<'static, str>,
    #[schema(example = "must be between 1 and 10000")]
    pub message: Cow<'static, str>,
}

/// The wire format of every error response (RFC 9457 plus our extension members).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProblemDocument {
    /// Link to this code's entry in the error catalogue.
    #[serde(rename = "type")]
    #[schema(example = "/docs/errors#not_found")]
    pub type_: String,
    #[schema(example = "Not found")]
    pub title: &'static str,
    #[schema(example = 404)]
    pub status: u16,
    #[schema(example = "No route matches GET /v1/nope.")]
    pub detail: String,
    /// The request path this problem occurred on.
    #[schema(example = "/v1/nope")]
    pub instance: String,
    pub code: ErrorCode,
    /// The same id as the `x-request-id` response header and the service's logs.
    #[schema(example = "0193a5f2-7c1e-7aa0-8f5e-1b2c3d4e5f60")]
    pub request_id: String,
    /// The W3C trace id: the caller's `traceparent`, or a new trace.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(example = "4bf92f3577b34da6a3ce929d0e0e4736")]
    pub trace_id: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

/// The service's error type. Build one with a constructor, return it from a handler, and the
/// [`Render`] middleware does the rest.
#[derive(Debug, Clone)]
pub struct Problem {
    code: ErrorCode,
    detail: Cow<'static, str>,
    errors: Vec<FieldError>,
    /// Headers the client needs to act on the problem (`WWW-Authenticate`, `Retry-After`).
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The cause of a 5xx, logged under the request id and never sent to the client.
    source: Option<Arc<anyhow::Error>>,
}

impl Problem {
    pub fn new(code: ErrorCode, detail: impl Into<Cow<'static, str>>) -> Self {
        Problem {
            code,
            detail: detail.into(),
            errors: Vec::new(),
            headers: Vec::new(),
            source: None,
        }
    }

    /// A 422 listing every failing field at once.
    pub fn validation(errors: Vec<FieldError>) -> Self {
        metrics::counter!(crate::metrics::VALIDATION_FAILURES).increment(1);
        let detail = match errors.len() {
            1 => "1 field is invalid.".to_owned(),
            n => format!("{n} fields are invalid."),
        };
        Problem {
            errors,
            ..Problem::new(ErrorCode::ValidationFailed, detail)
        }
    }

    /// A 500 whose cause is logged, never shown.
    pub fn internal(cause: impl Into<anyhow::Error>) -> Self {
        Problem {
            source: Some(Arc::new(cause.into())),
            ..Problem::new(ErrorCode::InternalError, "An unexpected error occurred.")
        }
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    pub fn code(&self) -> ErrorCode {
        self.code
    }

    pub fn detail(&self) -> &str {
        &self.detail
    }

    pub fn field_errors(&self) -> &[FieldError] {
        &self.errors
    }

    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }

    fn document(self, status: StatusCode, request_id: String, instance: String) -> ProblemDocument {
        ProblemDocument {
            type_: format!("/docs/errors#{}", self.code.as_str()),
            title: self.code.title(),
            status: status.as_u16(),
            detail: self.detail.into_owned(),
            instance,
            code: self.code,
            request_id,
            trace_id: crate::telemetry::current_trace_id(),
            errors: self.errors,
        }
    }
}

impl From<sqlx::Error> for Problem {
    /// The database being down, restarting, saturated or too slow is not our bug and not the
    /// client's: it is a 503 the client may retry. Everything else is a 500.
    fn from(error: sqlx::Error) -> Self {
        let code = match &error {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => Some(ErrorCode::ServiceUnavailable),
            sqlx::Error::Database(database) => match database.code().as_deref() {
                // query_canceled: statement_timeout fired.
                Some("57014") => Some(ErrorCode::Timeout),
                // Connection exceptions, and admin/crash/cannot-connect-now shutdowns.
                Some(code)
                    if code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03") =>
                {
                    Some(ErrorCode::ServiceUnavailable)
                }
                _ => None,
            },
            _ => None,
        };
        match code {
            Some(code) => Problem {
                source: Some(Arc::new(error.into())),
                ..Problem::new(
                    code,
                    "The database is unavailable or too slow right now; retry later.",
                )
            },
            None => Problem::internal(error),
        }
    }
}

impl IntoResponse for Problem {
    /// The body is written by [`Render`], which knows the request id and path; here the problem
    /// only travels in the response extensions.
    fn into_response(self) -> Response {
        let mut response = self.code.status().into_response();
        for (name, value) in &self.headers {
            response.headers_mut().insert(name, value.clone());
        }
        response.extensions_mut().insert(self);
        response
    }
}

/// Put in a response's extensions by a handler whose error status comes with its own,
/// documented JSON body (the 503 health report), so that [`Render`] leaves it alone.
#[derive(Debug, Clone, Copy)]
pub struct OwnErrorBody;

/// How long a client should wait before retrying a 503.
const RETRY_AFTER_SECONDS: HeaderValue = HeaderValue::from_static("1");

/// Middleware that writes the problem document for every error response. It must wrap every other
/// layer that can produce an error (routing, body limit, panic catcher) and sit inside the
/// request-id layer.
#[derive(Debug, Clone, Copy)]
pub struct Render;

/// What an error response's document needs of its request: cheap handles (reference-counted),
/// turned into strings only when there is a problem to write.
pub struct ProblemContext {
    uri: axum::http::Uri,
    request_id: Option<RequestId>,
}

impl Around for Render {
    type Carry = ProblemContext;

    fn before(&self, request: &mut Request) -> ControlFlow<Response, ProblemContext> {
        ControlFlow::Continue(ProblemContext {
            uri: request.uri().clone(),
            request_id: request.extensions().get::<RequestId>().cloned(),
        })
    }

    fn after(context: ProblemContext, response: Response) -> Response {
        write_problem(&context, response)
    }
}

fn write_problem(request: &ProblemContext, mut response: Response) -> Response {
    let (problem, from_handler) = match response.extensions_mut().remove::<Problem>() {
        Some(problem) => (problem, true),
        None if is_unrendered_error(&response) => {
            let code = ErrorCode::for_status(response.status());
            let detail = match code {
                ErrorCode::NotFound => "No route or resource matches this path.".to_owned(),
                ErrorCode::MethodNotAllowed => {
                    "This route does not accept this method; see the Allow header.".to_owned()
                }
                ErrorCode::PayloadTooLarge => "The request body is too large.".to_owned(),
                _ => response
                    .status()
                    .canonical_reason()
                    .unwrap_or("Error")
                    .to_owned(),
            };
            (Problem::new(code, detail), false)
        }
        None => return response,
    };
    let instance = request.uri.path();
    let request_id = crate::request_id::text(request.request_id.as_ref());

    if let Some(cause) = &problem.source {
        tracing::error!(error = ?cause, code = problem.code.as_str(), "request failed");
        // Unexpected failures go to Sentry (a no-op without SENTRY_DSN); outages (503) are for
        // metrics and alerts, not one event per request.
        if problem.code == ErrorCode::InternalError {
            sentry::with_scope(
                |scope| {
                    scope.set_tag("request_id", request_id);
                    scope.set_tag("path", instance);
                },
                || sentry::integrations::anyhow::capture_anyhow(cause),
            );
        }
    }
    let code = problem.code;
    // A problem of ours has its code's status; a layer's response keeps the status it chose.
    let status = if from_handler {
        code.status()
    } else {
        response.status()
    };
    let body = match serde_json::to_vec(&problem.document(
        status,
        request_id.to_owned(),
        instance.to_owned(),
    )) {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(%error, "cannot serialize a problem document");
            Vec::new()
        }
    };

    // Keep the framework's headers (such as `Allow` on a 405) but not the ones describing its body.
    let (mut parts, _) = response.into_parts();
    parts.status = status;
    parts.headers.remove(header::CONTENT_LENGTH);
    parts
        .headers
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        parts
            .headers
            .entry(header::RETRY_AFTER)
            .or_insert(RETRY_AFTER_SECONDS);
    }
    parts.extensions.insert(code);
    Response::from_parts(parts, axum::body::Body::from(body))
}

/// An error response that did not come from [`Problem`]: axum's 404/405, tower-http's 413 and
/// the like, unless its handler marked it as carrying its own documented body.
fn is_unrendered_error(response: &Response) -> bool {
    let is_error = response.status().is_client_error() || response.status().is_server_error();
    is_error && response.extensions().get::<OwnErrorBody>().is_none()
}

/// 404 for every path no route matches.
pub async fn not_found() -> Problem {
    Problem::new(
        ErrorCode::NotFound,
        "No route or resource matches this path.",
    )
}

/// Turns a panic caught by `CatchPanicLayer` into a 500 problem; the panic message is logged by
/// [`Render`] under the request id and never sent.
pub fn from_panic(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    Problem::internal(anyhow::anyhow!("handler panicked: {message}")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_database_is_a_503_and_other_database_errors_a_500() {
        for error in [
            sqlx::Error::PoolTimedOut,
            sqlx::Error::PoolClosed,
            sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        ] {
            assert_eq!(Problem::from(error).code(), ErrorCode::ServiceUnavailable);
        }
        assert_eq!(
            Problem::from(sqlx::Error::RowNotFound).code(),
            ErrorCode::InternalError
        );
    }

    #[test]
    fn every_code_has_a_distinct_name_and_its_own_status() {
        let mut names: Vec<_> = ErrorCode::ALL.iter().map(|code| code.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ErrorCode::ALL.len());
        for code in ErrorCode::ALL {
            assert!(
                code.status().is_client_error() || code.status().is_server_error(),
                "{code:?}"
            );
            assert_eq!(ErrorCode::from_name(code.as_str()), Some(code));
        }
    }
}
