//! Security response headers on every response.
//!
//! Prevents: browsers sniffing a JSON error into HTML, the API being framed for clickjacking, and
//! caches or proxies storing personal data. Each header is only set when the handler did not set
//! its own, so a route can opt into caching (`Cache-Control: private, no-cache` with an ETag) or
//! into a looser content policy (the docs page).

use axum::http::{HeaderName, HeaderValue, header};
use axum::response::Response;

const DEFAULTS: [(HeaderName, &str); 5] = [
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
    // An API answers with data, never with pages: nothing may load, run or frame it.
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; frame-ancestors 'none'",
    ),
    (header::CACHE_CONTROL, "no-store"),
];

pub fn set_defaults(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in DEFAULTS {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    response
}
