//! Request ids: accepted from the caller when sane, generated otherwise, echoed in `x-request-id`,
//! carried by every log line of the request and by problem bodies.
//!
//! Prevents: a support ticket quoting an id nobody can find in the logs, and a caller-supplied id
//! of 10 kB or with control characters poisoning the logs. tower-http does the propagation; this
//! module adds the sanity check it lacks and uses time-ordered UUIDv7 ids.

use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue};
use tower_http::request_id::{MakeRequestId, RequestId};

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Removes a caller's `x-request-id` that is not 1–128 characters of `[A-Za-z0-9._-]`, so that
/// `SetRequestIdLayer` generates a fresh one in its place.
pub fn drop_insane_request_id(mut request: Request) -> Request {
    let sane = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .map(|value| is_sane(value.as_bytes()));
    if sane == Some(false) {
        request.headers_mut().remove(&REQUEST_ID_HEADER);
    }
    request
}

fn is_sane(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'))
}

/// Generates UUIDv7 ids: unique without coordination, and sortable by time in log searches.
#[derive(Debug, Clone, Copy, Default)]
pub struct MakeUuidV7;

impl MakeRequestId for MakeUuidV7 {
    fn make_request_id<B>(&mut self, _request: &axum::http::Request<B>) -> Option<RequestId> {
        let mut text = uuid::Uuid::encode_buffer();
        let id = uuid::Uuid::now_v7().hyphenated().encode_lower(&mut text);
        HeaderValue::from_str(id).ok().map(RequestId::new)
    }
}

/// The request id of a request that went through the request-id layers.
pub fn of(request: &Request) -> &str {
    text(request.extensions().get::<RequestId>())
}

/// A request id as text; empty when there is none.
pub fn text(id: Option<&RequestId>) -> &str {
    id.and_then(|id| id.header_value().to_str().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::is_sane;

    #[test]
    fn sane_ids_are_short_and_plain() {
        assert!(is_sane(b"abc-123_x.y"));
        assert!(is_sane(&[b'a'; 128]));
        assert!(!is_sane(b""));
        assert!(!is_sane(&[b'a'; 129]));
        assert!(!is_sane(b"has space"));
        assert!(!is_sane(b"line\nbreak"));
    }
}
