//! Security response headers on every response, CORS by explicit allow-list, and HSTS.
//!
//! Prevents: browsers sniffing a JSON error into HTML, the API being framed for clickjacking,
//! caches or proxies storing personal data, other sites' scripts calling the API from a user's
//! browser, and downgrade to plain HTTP once a browser has seen HTTPS. Each header is only set when the handler did not set
//! its own, so a route can opt into caching (`Cache-Control: private, no-cache` with an ETag) or
//! into a looser content policy (the docs page).

use std::time::Duration;

use axum::http::{HeaderName, HeaderValue, Method, header};
use axum::response::Response;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::config::HttpConfig;

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

/// CORS for the origins in `CORS_ALLOWED_ORIGINS` only; none when the list is empty, so browsers
/// enforce the same-origin policy. No credentials mode: tokens travel in `Authorization`, never
/// in cookies, so a `*`-style reflection could never leak a session.
pub fn cors(http: &HttpConfig) -> Option<CorsLayer> {
    if http.cors_allowed_origins.is_empty() {
        return None;
    }
    let header = |name: &'static str| HeaderName::from_static(name);
    Some(
        CorsLayer::new()
            .allow_origin(AllowOrigin::list(http.cors_allowed_origins.clone()))
            .allow_methods([Method::GET, Method::POST, Method::PATCH])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::IF_MATCH,
                header::IF_NONE_MATCH,
                header("idempotency-key"),
                header("x-request-id"),
            ])
            .expose_headers([
                header::ETAG,
                header::LOCATION,
                header::LINK,
                header::RETRY_AFTER,
                header("x-request-id"),
                header("idempotent-replayed"),
                header("ratelimit"),
                header("ratelimit-policy"),
                header("deprecation"),
                header("sunset"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

/// `Strict-Transport-Security` when `HSTS_MAX_AGE_SECS` is set.
pub fn hsts(http: &HttpConfig) -> Option<SetResponseHeaderLayer<HeaderValue>> {
    let max_age = http.hsts_max_age?;
    let value = HeaderValue::from_str(&format!("max-age={max_age}; includeSubDomains")).ok()?;
    Some(SetResponseHeaderLayer::if_not_present(
        header::STRICT_TRANSPORT_SECURITY,
        value,
    ))
}
