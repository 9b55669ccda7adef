//! The HTTP application: which routes exist, and the middleware every request passes through.
//!
//! To add a feature, write its `routes()` (an `OpenApiRouter`, so its operations join the
//! OpenAPI document) and merge it in [`routes`].

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use sqlx::PgPool;
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use utoipa_axum::router::OpenApiRouter;

use crate::auth::token::TokenKeys;
use crate::client_ip::TrustedProxies;
use crate::config::{Config, HttpConfig, ImportsConfig, JobsConfig};
use crate::middleware::around;
use crate::pagination::Cursors;
use crate::rate_limit::RateLimiter;
use crate::request_id::{MakeUuidV7, REQUEST_ID_HEADER};
use crate::shutdown::Readiness;
use crate::{
    auth, client_ip, deprecation, health, imports, keys, kill_switch, metrics, openapi, orders,
    overload, problem, rate_limit, request_id, request_log, security_headers,
};

/// What handlers share, behind one `Arc` (`state.db` reads through it). axum clones the state
/// with the route's service on every request, once per layer around it: one reference count to
/// bump instead of eight, which on a busy multi-core machine are eight cache lines that every
/// core writes to.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The handles themselves. Some are `Arc`s of their own because the middleware layers take a
/// clone of just what they need (`with_middleware`).
#[derive(Debug)]
pub struct Shared {
    pub db: PgPool,
    pub readiness: Readiness,
    pub tokens: Arc<TokenKeys>,
    pub cursors: Arc<Cursors>,
    pub rate_limiter: Arc<RateLimiter>,
    pub trusted_proxies: Arc<TrustedProxies>,
    pub imports: Arc<ImportsConfig>,
    pub jobs: Arc<JobsConfig>,
}

impl AppState {
    pub fn new(db: PgPool, config: &Config) -> anyhow::Result<Self> {
        let secret = &config.auth.secret_key;
        Ok(AppState(Arc::new(Shared {
            db,
            readiness: Readiness::default(),
            tokens: Arc::new(TokenKeys::new(
                &keys::derive(secret, "access-token"),
                config.auth.token_ttl,
            )),
            cursors: Arc::new(Cursors::new(&keys::derive(secret, "pagination-cursor"))),
            rate_limiter: Arc::new(RateLimiter::new(&config.rate_limit)?),
            trusted_proxies: Arc::new(TrustedProxies::new(
                config.rate_limit.trusted_proxies.clone(),
            )),
            imports: Arc::new(config.imports.clone()),
            jobs: Arc::new(config.jobs.clone()),
        })))
    }
}

/// Every public route. Merge a new feature's router here; its operations join the document.
fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::base())
        .merge(health::routes())
        .merge(auth::login::routes())
        .merge(orders::routes())
        .merge(imports::routes())
}

fn split(routes: OpenApiRouter<AppState>) -> (Router<AppState>, utoipa::openapi::OpenApi) {
    let (router, mut doc) = routes.split_for_parts();
    openapi::finish(&mut doc);
    (router, doc)
}

/// The public listener's whole application: routes, docs, and the middleware stack.
pub fn public_router(state: AppState, http: &HttpConfig) -> Router {
    let (routes, doc) = split(routes());
    let stack = state.clone();
    with_middleware(
        routes.with_state(state).merge(openapi::docs_routes(doc)),
        &stack,
        http,
    )
}

/// The OpenAPI document alone, for the `openapi` subcommand and the drift test; needs no database.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    split(routes()).1
}

/// Wraps `router` in the stack every public request passes through, outermost first. Exposed so
/// tests can put extra routes (one that panics, say) behind exactly the same stack.
pub fn with_middleware(router: Router, state: &AppState, http: &HttpConfig) -> Router {
    // The fallback is added before `layer` so that unknown paths get the same middleware.
    router.fallback(problem::not_found).layer(
        ServiceBuilder::new()
            .map_request(request_id::drop_insane_request_id)
            .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER, MakeUuidV7))
            .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER))
            // The log line and the request-duration metric, from one timing of the request.
            .layer(around(request_log::LogRequest))
            .map_response(security_headers::set_defaults)
            .option_layer(security_headers::hsts(http))
            .option_layer(security_headers::cors(http))
            .layer(around(problem::Render))
            // A panic in one of the layers below becomes a 500 problem here. A handler's panic is
            // caught innermost (the last layer), so its 500 still passes every layer on the way
            // out and carries the RateLimit and Deprecation headers like any other answer.
            .layer(CatchPanicLayer::custom(problem::from_panic))
            // Steps that only add to the request and never answer are plain functions under
            // tower's `map_request`, which, like `around`, calls the layer below in line.
            .map_request({
                let trusted = state.trusted_proxies.clone();
                move |request| client_ip::resolve(&trusted, request)
            })
            .layer(around(deprecation::AddHeaders))
            .map_request({
                let keys = state.tokens.clone();
                move |request| auth::identify(&keys, request)
            })
            // Limits per principal (per client IP when anonymous), before anything is refused, so
            // every `/v1` answer, 401s included, carries the RateLimit headers. An axum `from_fn`
            // because it may wait for Redis before the request goes on (`middleware` says why
            // the others are not).
            .layer(axum::middleware::from_fn_with_state(
                state.rate_limiter.clone(),
                rate_limit::enforce,
            ))
            // Overload: refuse at once past the concurrency ceiling, abandon what runs too long.
            // Inside the rate limiter, so these 503s carry the RateLimit headers too.
            .layer(around(overload::Overload::new(http)))
            // Default-deny: every route but `auth::PUBLIC_ROUTES` needs a valid bearer token.
            .layer(around(auth::Require))
            .layer(around(kill_switch::Enforce::new(&http.disabled)))
            // Two body limits. tower-http's covers every body, streamed or buffered, at the
            // largest any route takes (a CSV import); axum's applies to the JSON extractors.
            .layer(RequestBodyLimitLayer::new(
                http.max_body_bytes.max(state.imports.max_bytes),
            ))
            .layer(DefaultBodyLimit::max(http.max_body_bytes))
            .layer(CatchPanicLayer::custom(problem::from_panic)),
    )
}

/// The admin listener's application: metrics, and the operations endpoints the service grows.
pub fn admin_router(db: PgPool) -> Router {
    metrics::admin_routes(db)
        .fallback(problem::not_found)
        .layer(
            ServiceBuilder::new()
                .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER, MakeUuidV7))
                .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER))
                .layer(around(problem::Render)),
        )
}
