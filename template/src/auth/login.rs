//! `POST /v1/auth/token`: e-mail and password in, a short-lived bearer token out.
//!
//! Prevents: account enumeration and login storms. A wrong password, an unknown e-mail and a
//! malformed e-mail all get the same 401 after the same argon2 work (a dummy hash stands in for
//! a missing account), and the hashing runs on the blocking pool so a burst of logins cannot
//! stall other requests.

use axum::Extension;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use validator::Validate;

use crate::app::AppState;
use crate::auth::{Principal, password};
use crate::client_ip::ClientIp;
use crate::extract::Json;
use crate::problem::{ErrorCode, FieldError, Problem};
use crate::users::{self, Email};
use crate::validation::Valid;

#[derive(Deserialize, Validate, ToSchema)]
pub struct TokenRequest {
    /// At most 254 characters: longer cannot be an address, and the name keys a rate-limit bucket.
    #[validate(length(max = 254, code = "length", message = "must be at most 254 characters"))]
    #[schema(example = "ann@example.com", max_length = 254)]
    email: String,
    #[schema(value_type = String, format = Password, max_length = 1024, example = "correct horse battery staple")]
    password: SecretString,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    /// Always `Bearer`.
    #[schema(example = "Bearer")]
    pub token_type: String,
    /// Seconds until the token expires.
    #[schema(example = 900)]
    pub expires_in: u64,
}

/// Caps the work one attempt can ask of the hasher. (Checked by hand: `validator` would copy the
/// value into its error, and a secret must not be copied anywhere.)
const MAX_PASSWORD_BYTES: usize = 1024;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(issue_token))
        .routes(routes!(login))
}

/// Exchange an e-mail and password for a bearer token.
#[utoipa::path(
    post,
    path = "/v1/auth/token",
    tag = "auth",
    request_body = TokenRequest,
    responses(
        (status = OK, description = "Credentials accepted.", body = TokenResponse),
        (status = UNAUTHORIZED, description = "`invalid_credentials`: wrong password or unknown e-mail; the two are indistinguishable.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = TOO_MANY_REQUESTS, description = "`rate_limited`: too many attempts from this IP or for this account; see `Retry-After`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
    ),
)]
pub async fn issue_token(
    State(state): State<AppState>,
    Extension(ClientIp(client)): Extension<ClientIp>,
    body: Valid<TokenRequest>,
) -> Result<Response, Problem> {
    let request = body.value;
    if secrecy::ExposeSecret::expose_secret(&request.password).len() > MAX_PASSWORD_BYTES {
        return Err(Problem::validation(vec![FieldError {
            pointer: "/password".into(),
            code: "length".into(),
            message: "must be at most 1024 bytes".into(),
        }]));
    }
    // Before any password work, so a storm of attempts cannot burn CPU either.
    let (limits, allowed) = state.rate_limiter.check_login(client, &request.email).await;
    let mut response = match allowed {
        Ok(()) => authenticate(&state, request).await.into_response(),
        Err(refused) => refused.into_response(),
    };
    // The RateLimit headers show the login's own buckets too.
    response.extensions_mut().insert(limits);
    Ok(response)
}

async fn authenticate(
    state: &AppState,
    request: TokenRequest,
) -> Result<(StatusCode, Json<TokenResponse>), Problem> {
    // A malformed e-mail is treated exactly like an unknown one.
    let account = match Email::parse(&request.email) {
        Ok(email) => users::find_credentials(&state.db, &email).await?,
        Err(_) => None,
    };
    let stored_hash = account
        .as_ref()
        .map(|account| account.password_hash.clone());
    let verified = password::verify(request.password, stored_hash)
        .await
        .map_err(Problem::internal)?;
    let Some(account) = account.filter(|_| verified) else {
        // RFC 9110: a 401 names the scheme that would work; here, the token this route issues.
        return Err(Problem::new(
            ErrorCode::InvalidCredentials,
            "The e-mail or password is wrong.",
        )
        .with_header(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")));
    };

    let principal = Principal {
        user_id: account.id,
        role: account.role,
    };
    let access_token = state.tokens.issue(&principal).map_err(Problem::internal)?;
    Ok((
        StatusCode::OK,
        Json(TokenResponse {
            access_token,
            token_type: "Bearer".to_owned(),
            expires_in: state.tokens.ttl().as_secs(),
        }),
    ))
}

/// The former name of `POST /v1/auth/token`, kept until its sunset date.
#[utoipa::path(
    post,
    path = "/v1/auth/login",
    tag = "auth",
    request_body = TokenRequest,
    responses(
        (status = OK, description = "Credentials accepted.", body = TokenResponse),
        (status = UNAUTHORIZED, description = "`invalid_credentials`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = TOO_MANY_REQUESTS, description = "`rate_limited`; see `Retry-After`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
    ),
)]
pub async fn login(
    state: State<AppState>,
    client: Extension<ClientIp>,
    body: Valid<TokenRequest>,
) -> Result<Response, Problem> {
    issue_token(state, client, body).await
}
