//! Request extractors whose rejections are [`Problem`]s.
//!
//! Prevents: axum's own rejections answering in plain text with messages clients cannot act on.
//! Use `app::extract::{Json, Path, Query}` in handlers instead of axum's; they behave the same on
//! success and fail with a problem+json document that names the parameter.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::problem::{ErrorCode, Problem};

/// `axum::Json`, with malformed bodies → 400 `malformed_body`, a wrong content type → 415, an
/// oversized body → 413 and a body of the wrong shape (including unknown fields on types marked
/// `deny_unknown_fields`) → 422 `validation_failed`.
#[derive(Debug, Clone, Copy, Default, FromRequest)]
#[from_request(via(axum::Json), rejection(Problem))]
pub struct Json<T>(pub T);

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

impl From<JsonRejection> for Problem {
    fn from(rejection: JsonRejection) -> Self {
        let code = match &rejection {
            JsonRejection::MissingJsonContentType(_) => ErrorCode::UnsupportedMediaType,
            JsonRejection::JsonDataError(_) => ErrorCode::ValidationFailed,
            JsonRejection::JsonSyntaxError(_) => ErrorCode::MalformedBody,
            // Reading the body failed; the only cause a client controls is its size.
            other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ErrorCode::PayloadTooLarge,
            _ => ErrorCode::MalformedBody,
        };
        Problem::new(code, bounded(rejection.body_text()))
    }
}

/// `axum::extract::Path`; an unparsable path parameter → 400 `invalid_parameter`.
#[derive(Debug, Clone, Copy, Default, FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(Problem))]
pub struct Path<T>(pub T);

impl From<PathRejection> for Problem {
    fn from(rejection: PathRejection) -> Self {
        Problem::new(ErrorCode::InvalidParameter, bounded(rejection.body_text()))
    }
}

/// serde's messages name the field and position but may quote the offending value, which can be
/// as long as the body: keep the first 200 characters.
pub(crate) fn bounded(mut detail: String) -> String {
    if let Some((cut, _)) = detail.char_indices().nth(200) {
        detail.truncate(cut);
        detail.push('…');
    }
    detail
}

/// The longest query string a route parses: a cursor, a page size and a filter take a few hundred
/// bytes. Longer ones are refused before serde walks them (checklist V3).
pub const MAX_QUERY_BYTES: usize = 2048;

/// `axum::extract::Query`; a query string over [`MAX_QUERY_BYTES`] or an unparsable one
/// (`limit=abc`, an unknown `status`) → 400 `invalid_parameter`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<S, T> FromRequestParts<S> for Query<T>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        if parts.uri.query().map_or(0, str::len) > MAX_QUERY_BYTES {
            return Err(Problem::new(
                ErrorCode::InvalidParameter,
                format!("The query string is longer than {MAX_QUERY_BYTES} bytes."),
            ));
        }
        let axum::extract::Query(value) =
            axum::extract::Query::<T>::from_request_parts(parts, state).await?;
        Ok(Query(value))
    }
}

impl From<QueryRejection> for Problem {
    fn from(rejection: QueryRejection) -> Self {
        Problem::new(ErrorCode::InvalidParameter, bounded(rejection.body_text()))
    }
}
