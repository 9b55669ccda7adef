//! What the middleware stack costs a request, on its own: no network, no database. Sends
//! `GET /v1/orders/{id}` with a bearer token through `app::with_middleware` to a handler with a
//! fixed body, then straight to the same handler, and prints the time per request of each.
//!
//!   cargo run --release --example stack_cost [requests] [stack|handler]
//!
//! Time depends on the machine's load; instructions do not. For a count that moves only when the
//! stack does, and where it goes, run one side under callgrind:
//!
//!   valgrind --tool=callgrind --toggle-collect='*stack_cost::send*' \
//!       target/release/examples/stack_cost 2000 stack
//!   callgrind_annotate --inclusive=yes callgrind.out.<pid> | head -60
//!
//! No database is contacted: the pool is lazy and the handler never uses it.

use std::collections::HashMap;
use std::time::Instant;

use axum::Router;
use axum::routing::get;
use service::auth::Principal;
use service::users::Role;
use tower::ServiceExt;
use uuid::Uuid;

/// The allocator the binary uses (`src/main.rs`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let requests: u32 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let side = std::env::args().nth(2);
    let unused_database = "postgres://stack-cost@127.0.0.1:1/none";
    let vars: HashMap<String, String> = [
        ("DATABASE_URL", unused_database),
        ("APP_ENV", "development"),
        ("RATE_LIMIT_PER_MINUTE", "100000"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    let config = service::config::Config::from_map(&vars)?;
    let db = sqlx::postgres::PgPoolOptions::new().connect_lazy(unused_database)?;
    let state = service::app::AppState::new(db, &config)?;
    let token = state.tokens.issue(&Principal {
        user_id: Uuid::now_v7(),
        role: Role::Customer,
    })?;
    let fixed = || async { ([("content-type", "application/json")], r#"{"id":"fixed"}"#) };
    let bare = Router::new().route("/v1/orders/{id}", get(fixed));
    // `with_state` turns handlers into services once, as `axum::serve` does; a router called
    // without it would apply every layer again on each request.
    let full = service::app::with_middleware(bare.clone(), &state, &config.http).with_state(());
    let bare = bare.with_state(());
    let path = format!("/v1/orders/{}", Uuid::now_v7());

    // The first requests warm caches and the allocator up; the rest are measured.
    for (name, router) in [("stack", &full), ("handler", &bare)] {
        if side.as_deref().is_some_and(|side| side != name) {
            continue;
        }
        send(router, &path, &token, 100).await?;
        let started = Instant::now();
        send(router, &path, &token, requests).await?;
        let micros = started.elapsed().as_secs_f64() * 1e6 / f64::from(requests);
        println!("{name}: {micros:.1} µs per request");
    }
    Ok(())
}

async fn send(router: &Router, path: &str, token: &str, n: u32) -> anyhow::Result<()> {
    for _ in 0..n {
        let request = axum::http::Request::get(path)
            .header("authorization", format!("Bearer {token}"))
            .body(axum::body::Body::empty())?;
        let response = router.clone().oneshot(request).await?;
        anyhow::ensure!(response.status().is_success(), "{}", response.status());
        axum::body::to_bytes(response.into_body(), usize::MAX).await?;
    }
    Ok(())
}
