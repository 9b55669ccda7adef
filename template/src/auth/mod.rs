//! Authentication and authorization: who is calling (a verified bearer token), and default-deny.
//!
//! Prevents: the route someone adds next year without a guard. Authentication is one middleware
//! over the whole router, and the only routes it lets through anonymously are the ones in
//! [`PUBLIC_ROUTES`], matched by route template. Identity comes from the verified token alone,
//! never from a header a client can set.

pub mod login;
pub mod password;
pub mod token;

use std::sync::Arc;

use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use uuid::Uuid;

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
/// [`authenticate`] rejected the request otherwise.
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

/// Default-deny: verifies the bearer token on every route not in [`PUBLIC_ROUTES`]. Requests that
/// match no route pass through to the 404 fallback, which reveals nothing.
pub async fn authenticate(
    State(keys): State<Arc<TokenKeys>>,
    mut request: Request,
    next: Next,
) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|path| path.as_str().to_owned());
    let is_public = route
        .as_deref()
        .is_none_or(|route| PUBLIC_ROUTES.contains(&route));
    if is_public {
        return next.run(request).await;
    }
    let principal = match bearer_token(&request).map(|token| keys.verify(token)) {
        Some(Ok(principal)) => principal,
        Some(Err(error)) => {
            tracing::info!(%error, "rejected bearer token");
            return unauthenticated().into_response();
        }
        None => return unauthenticated().into_response(),
    };
    request.extensions_mut().insert(principal);
    let mut response = next.run(request).await;
    // For the request log line.
    response.extensions_mut().insert(principal);
    response
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
