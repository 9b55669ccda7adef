//! A kill switch: turn a feature or a single endpoint off without a deploy.
//!
//! Prevents: having to ship code, at the worst moment, to stop a feature that is failing,
//! overloading a dependency or leaking data. `DISABLED_FEATURES` lists features (`orders`, which
//! covers every `/v1/orders…` route) or single routes (`POST /v1/orders`); while listed they answer
//! 503 `service_unavailable` with `Retry-After`, everything else keeps working. Change the
//! variable and restart (a rolling restart, not a build). See `docs/kill-switch.md` for gradual
//! rollout.

use std::ops::ControlFlow;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

use crate::middleware::Around;
use crate::problem::{ErrorCode, Problem};

/// One entry of `DISABLED_FEATURES`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Switch {
    /// Every route under `/v1/<name>`.
    Feature(String),
    /// One method on one route template.
    Route { method: String, route: String },
}

impl Switch {
    pub fn parse(entry: &str) -> Result<Switch, String> {
        let entry = entry.trim();
        match entry.split_once(' ') {
            Some((method, route)) if route.trim().starts_with('/') => Ok(Switch::Route {
                method: method.to_ascii_uppercase(),
                route: route.trim().to_owned(),
            }),
            None if !entry.is_empty()
                && entry
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') =>
            {
                Ok(Switch::Feature(entry.to_owned()))
            }
            _ => Err(format!(
                "{entry:?} is neither a feature name nor `METHOD /route`"
            )),
        }
    }

    fn covers(&self, method: &str, route: &str) -> bool {
        // HEAD is served by the GET handler, so switching GET off switches HEAD off too.
        let method = if method == "HEAD" { "GET" } else { method };
        match self {
            Switch::Feature(name) => {
                let prefix = format!("/v1/{name}");
                route == prefix || route.starts_with(&format!("{prefix}/"))
            }
            Switch::Route {
                method: switched,
                route: switched_route,
            } => switched == method && switched_route == route,
        }
    }
}

/// Every switch must name something that exists, or a typo would silently leave a feature on.
/// `routes` are the service's `(method, route template)` pairs.
pub fn check_known(switches: &[Switch], routes: &[(String, String)]) -> Result<(), String> {
    for switch in switches {
        if !routes
            .iter()
            .any(|(method, route)| switch.covers(method, route))
        {
            return Err(format!(
                "DISABLED_FEATURES: {switch:?} matches no route of this service"
            ));
        }
    }
    Ok(())
}

/// How long clients are told to wait: features are switched back on by people, not in seconds.
const RETRY_AFTER_SECONDS: HeaderValue = HeaderValue::from_static("60");

/// The middleware: answers 503 for every switched-off route, before the body limits and the
/// handler.
#[derive(Debug, Clone)]
pub struct Enforce {
    switches: Arc<[Switch]>,
}

impl Enforce {
    pub fn new(switches: &[Switch]) -> Self {
        Enforce {
            switches: switches.into(),
        }
    }
}

impl Around for Enforce {
    type Carry = ();

    fn before(&self, request: &mut Request) -> ControlFlow<Response, ()> {
        let off = request
            .extensions()
            .get::<MatchedPath>()
            .is_some_and(|route| {
                self.switches
                    .iter()
                    .any(|switch| switch.covers(request.method().as_str(), route.as_str()))
            });
        if off {
            return ControlFlow::Break(
                Problem::new(
                    ErrorCode::ServiceUnavailable,
                    "This feature is switched off for now; retry later.",
                )
                .with_header(header::RETRY_AFTER, RETRY_AFTER_SECONDS)
                .into_response(),
            );
        }
        ControlFlow::Continue(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_cover_their_routes_and_routes_only_themselves() {
        let orders = Switch::parse("orders").unwrap();
        assert!(
            orders.covers("GET", "/v1/orders") && orders.covers("POST", "/v1/orders/{id}/submit")
        );
        assert!(!orders.covers("GET", "/v1/orders-archive"));
        let create = Switch::parse("post /v1/orders").unwrap();
        assert!(create.covers("POST", "/v1/orders") && !create.covers("GET", "/v1/orders"));
        assert!(Switch::parse("/v1/orders").is_err());
        let get = Switch::parse("GET /v1/orders/{id}").unwrap();
        assert!(get.covers("HEAD", "/v1/orders/{id}"), "HEAD is GET");
        let routes = vec![("GET".to_owned(), "/v1/orders".to_owned())];
        assert!(check_known(std::slice::from_ref(&orders), &routes).is_ok());
        assert!(
            check_known(&[Switch::parse("ordres").unwrap()], &routes).is_err(),
            "a typo is refused"
        );
        assert!(Switch::parse("orders; drop").is_err());
    }
}
