//! Route deprecation (RFC 9745 `Deprecation`, RFC 8594 `Sunset`, `Link; rel="deprecation"`).
//!
//! Prevents: removing a route that clients still call without having told them in a way their
//! tooling can see. A deprecation is declared once, in [`DEPRECATED`]: the middleware adds the
//! headers to every response of that route and the OpenAPI document marks the operation
//! `deprecated`. Deprecation changes no behaviour. The policy is in `docs/deprecation.md` and
//! served at `/docs/deprecations`.

use std::ops::ControlFlow;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderName, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};

use crate::middleware::Around;

pub struct Deprecated {
    pub method: &'static str,
    pub route: &'static str,
    /// When it was deprecated (Unix seconds; may be in the future to announce it).
    pub since: i64,
    /// When it may stop working (Unix seconds); never earlier than `since`.
    pub sunset: i64,
    /// What to call instead.
    pub replacement: &'static str,
}

/// Every deprecated route. Add an entry here; nothing else is needed.
pub const DEPRECATED: &[Deprecated] = &[Deprecated {
    method: "POST",
    route: "/v1/auth/login",
    since: 1_793_491_200,  // 2026-11-01T00:00:00Z
    sunset: 1_814_399_999, // 2027-06-30T23:59:59Z
    replacement: "POST /v1/auth/token",
}];

const POLICY: &str = "/docs/deprecations";

pub fn find(method: &str, route: &str) -> Option<&'static Deprecated> {
    DEPRECATED
        .iter()
        .find(|entry| entry.method.eq_ignore_ascii_case(method) && entry.route == route)
}

/// The middleware: adds the headers to every response of a route in [`DEPRECATED`].
#[derive(Debug, Clone, Copy)]
pub struct AddHeaders;

impl Around for AddHeaders {
    type Carry = Option<&'static Deprecated>;

    fn before(&self, request: &mut Request) -> ControlFlow<Response, Self::Carry> {
        ControlFlow::Continue(
            request
                .extensions()
                .get::<MatchedPath>()
                .and_then(|route| find(request.method().as_str(), route.as_str())),
        )
    }

    fn after(entry: Self::Carry, mut response: Response) -> Response {
        if let Some(entry) = entry {
            let headers = response.headers_mut();
            for (name, value) in header_values(entry) {
                if let Ok(value) = HeaderValue::from_str(&value) {
                    headers.append(name, value);
                }
            }
        }
        response
    }
}

fn header_values(entry: &Deprecated) -> [(HeaderName, String); 3] {
    let sunset = DateTime::<Utc>::from_timestamp(entry.sunset, 0).unwrap_or_default();
    [
        (
            HeaderName::from_static("deprecation"),
            format!("@{}", entry.since),
        ),
        (
            HeaderName::from_static("sunset"),
            sunset.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
        ),
        (
            axum::http::header::LINK,
            format!("<{POLICY}>; rel=\"deprecation\"; type=\"text/html\""),
        ),
    ]
}

/// The page `Link: rel="deprecation"` points to.
pub async fn policy_page() -> impl IntoResponse {
    let mut rows = String::new();
    for entry in DEPRECATED {
        let date = |seconds| {
            DateTime::<Utc>::from_timestamp(seconds, 0)
                .unwrap_or_default()
                .format("%Y-%m-%d")
                .to_string()
        };
        rows.push_str(&format!(
            "<tr><td><code>{} {}</code></td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>\n",
            entry.method,
            entry.route,
            date(entry.since),
            date(entry.sunset),
            entry.replacement
        ));
    }
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Deprecations</title></head><body>\
         <h1>Deprecated routes</h1><p>A deprecated route keeps working unchanged until its sunset date, and answers with \
         <code>Deprecation</code>, <code>Sunset</code> and <code>Link; rel=\"deprecation\"</code> headers. It is removed no \
         earlier than six months after deprecation, and only in a release announced in the changelog.</p>\
         <table><thead><tr><th>Route</th><th>Deprecated</th><th>Sunset</th><th>Use instead</th></tr></thead><tbody>\n{rows}</tbody></table></body></html>"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_follow_the_rfcs() {
        let [deprecation, sunset, link] = header_values(&DEPRECATED[0]);
        assert_eq!(deprecation.1, "@1793491200");
        assert_eq!(sunset.1, "Wed, 30 Jun 2027 23:59:59 GMT");
        assert_eq!(
            link.1,
            "</docs/deprecations>; rel=\"deprecation\"; type=\"text/html\""
        );
    }

    #[test]
    fn a_sunset_never_precedes_its_deprecation() {
        for entry in DEPRECATED {
            assert!(
                entry.sunset >= entry.since,
                "{} {}",
                entry.method,
                entry.route
            );
        }
    }
}
