//! Authentication and authorization: who is calling (a verified bearer token), and default-deny.
//!
//! Prevents: the route someone adds next year without a guard. Authentication is middleware over
//! the whole router ([`identify`] verifies the token, [`Require`] denies by default), and the only
//! routes it lets through anonymously are the ones in [`PUBLIC_ROUTES`], matched by route
//! template. Identity comes from the verified token alone, never from a header a client can set.

pub mod login;
pub mod password;
pub mod token;

use std::ops::ControlFlow;

use axum::extract::{FromRequestParts, MatchedPath, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

use crate::middleware::Around;
use crate::problem::{ErrorCode, Problem};
use crate::users::Role;
use token::TokenKeys;

/// The routes anyone may call, by route template. Everything else needs a valid bearer token.
/// Keep this list short; `tests/api/auth.rs` walks every documented route to prove the rest
/// answer 401 without credentials.
pub const PUBLIC_ROUTES: &[&str] = &[
    "/livez",
    "/readyz",
    "/openapi.json",
    "/docs",
    "/docs/",
    "/docs/{*rest}",
    "/docs/errors",
    "/docs/deprecations",
    "/v1/auth/token",
    // Deprecated name of /v1/auth/token (see `deprecation::DEPRECATED`).
    "/v1/auth/login",
];

/// The authenticated caller of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub user_id: Uuid,
    pub role: Role,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// Succeeds for admins only; customers get 403.
    pub fn require_admin(&self) -> Result<(), Problem> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(Problem::new(
                ErrorCode::Forbidden,
                "Only an admin may do this.",
            ))
        }
    }
}

/// Handlers take `Principal` as an argument. It is present on every non-public route, because
/// [`Require`] rejected the request otherwise.
impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .copied()
            .ok_or_else(unauthenticated)
    }
}

fn unauthenticated() -> Problem {
    Problem::new(
        ErrorCode::Unauthenticated,
        "A valid bearer token is required.",
    )
    .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))
}

/// Verifies the bearer token, if one is sent, and puts the [`Principal`] in the request. Rejects
/// nothing itself: [`Require`] does, after rate limiting has seen who is calling.
pub fn identify(keys: &TokenKeys, mut request: Request) -> Request {
    if let Some(token) = bearer_token(&request) {
        match keys.verify(token) {
            Ok(principal) => {
                // On the request's span (`request_log`), so every line logged from here on says who.
                tracing::Span::current()
                    .record("principal", tracing::field::display(principal.user_id));
                request.extensions_mut().insert(principal);
            }
            Err(error) => tracing::info!(%error, "rejected bearer token"),
        }
    }
    request
}

/// Default-deny: every route not in [`PUBLIC_ROUTES`] needs a principal, or answers 401.
/// Requests that match no route pass through to the 404 fallback, which reveals nothing.
#[derive(Debug, Clone, Copy)]
pub struct Require;

impl Around for Require {
    type Carry = ();

    fn before(&self, request: &mut Request) -> ControlFlow<Response, ()> {
        let is_public = request
            .extensions()
            .get::<MatchedPath>()
            .is_none_or(|route| PUBLIC_ROUTES.contains(&route.as_str()));
        if is_public || request.extensions().get::<Principal>().is_some() {
            ControlFlow::Continue(())
        } else {
            ControlFlow::Break(unauthenticated().into_response())
        }
    }
}

fn bearer_token(request: &Request) -> Option<&str> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = value.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty()).then(|| token.trim())
}
