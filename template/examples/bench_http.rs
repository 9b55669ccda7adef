//! HTTP load test and benchmark: the full service beside bare axum handlers that run the same SQL
//! on the same pool without the middleware stack, in one process, one run, one machine.
//!
//!   scripts/bench-http.sh            (release build, throwaway Postgres; prints a table)
//!
//! Measures authenticated `GET /v1/orders/{id}`, `GET /v1/orders?limit=20` and
//! `POST /v1/orders` with `Idempotency-Key` (against a bare insert), each for `--seconds` at
//! `--concurrency` requests in flight, and the p99 of `GET /v1/orders/{id}` during a storm of
//! logins (argon2) beside its p99 without it. First, it measures the middleware stack's own CPU per
//! request in process, where the machine's load cannot blur it. A benchmark, not a test: it prints
//! numbers.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::get;
use reqwest::{Client, RequestBuilder};
use service::auth::password::Password;
use service::config::Config;
use service::orders::OrderView;
use service::orders::domain::{Currency, LineItem, NewOrder, Quantity, Sku, UnitPrice};
use service::orders::store::{self, ListFilter};
use service::pagination::{Keyset, Position};
use service::server::Application;
use service::users::{self, Email, Role};
use sqlx::PgPool;
use uuid::Uuid;

/// The allocator the binary uses (`src/main.rs`), so that both sides are measured with it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const PASSWORD: &str = "bench-password-123";
/// Principals the load is spread over, so that per-principal rate limits (100 000 a minute at
/// most) do not cap the full service's throughput.
const USERS: usize = 16;
const ORDERS_PER_USER: usize = 30;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(default)
    };
    let seconds = Duration::from_secs(arg("--seconds", 10));
    let concurrency = usize::try_from(arg("--concurrency", 32))?;

    let config = config()?;
    let db = service::db::pool(&config.database)?;
    let app = Application::build(&config, db.clone()).await?;
    let full = format!("http://{}", app.api_addr()?);
    tokio::spawn(app.run_until(std::future::pending()));
    let bare = serve_bare(db.clone()).await?;
    let client = Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;

    let run = Uuid::now_v7();
    let mut principals = Vec::new();
    for n in 0..USERS {
        let email = Email::parse(&format!("bench-{run}-{n}@example.com"))?;
        let id = users::create(
            &db,
            &email,
            Role::Customer,
            Password::parse(PASSWORD.into())?,
        )
        .await?;
        let token = login(&client, &full, email.as_str()).await?;
        let mut orders = Vec::new();
        for k in 0..ORDERS_PER_USER {
            let created: serde_json::Value = client
                .post(format!("{full}/v1/orders"))
                .bearer_auth(&token)
                .header("idempotency-key", format!("seed-{k}"))
                .json(&order_body())
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
            orders.push(created["id"].as_str().unwrap_or_default().to_owned());
        }
        principals.push(Principal {
            id,
            email,
            token,
            orders,
        });
    }
    let principals = Arc::new(principals);
    let key = Arc::new(AtomicU64::new(0));

    let (stack_full, stack_bare) = stack_cost(&config, db.clone(), &principals[0].token).await?;
    println!(
        "The middleware stack's own CPU, in process on one task (no network, no database): \
         {stack_full:.1} µs per request through it, {stack_bare:.1} µs without it\n"
    );

    println!("{seconds:?} per scenario, {concurrency} requests in flight, {USERS} principals\n");
    println!(
        "{:<44} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>7}  target",
        "scenario",
        "full req/s",
        "bare req/s",
        "full p50",
        "full p99",
        "bare p50",
        "bare p99",
        "ratio"
    );

    let read_one = {
        let (p, full) = (principals.clone(), full.clone());
        move |c: &Client, i: u64| {
            let p = &p[i as usize % USERS];
            c.get(format!(
                "{full}/v1/orders/{}",
                p.orders[i as usize % ORDERS_PER_USER]
            ))
            .bearer_auth(&p.token)
        }
    };
    let (full_one, bare_one) = {
        let (p, bare) = (principals.clone(), bare.clone());
        let bare_one = move |c: &Client, i: u64| {
            let p = &p[i as usize % USERS];
            c.get(format!(
                "{bare}/bare/orders/{}",
                p.orders[i as usize % ORDERS_PER_USER]
            ))
        };
        compare(&client, seconds, concurrency, read_one.clone(), bare_one).await
    };
    row("GET /v1/orders/{id}", &full_one, &bare_one, "≥ 85% of bare");

    let (full_list, bare_list) = {
        let (p, full, bare) = (principals.clone(), full.clone(), bare.clone());
        let q = p.clone();
        let full_list = move |c: &Client, i: u64| {
            c.get(format!("{full}/v1/orders?limit=20"))
                .bearer_auth(&p[i as usize % USERS].token)
        };
        let bare_list = move |c: &Client, i: u64| {
            c.get(format!(
                "{bare}/bare/orders?owner={}",
                q[i as usize % USERS].id
            ))
        };
        compare(&client, seconds, concurrency, full_list, bare_list).await
    };
    row(
        "GET /v1/orders?limit=20",
        &full_list,
        &bare_list,
        "≥ 85% of bare",
    );

    // The login storm: tasks logging in as fast as argon2 lets them, while reads are measured;
    // beside the same reads measured just before, without it.
    let quiet = measure(&client, seconds, concurrency, read_one.clone()).await;
    let storm_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut storm = Vec::new();
    for n in 0..concurrency / 4 {
        let (client, full, p, stop) = (
            client.clone(),
            full.clone(),
            principals.clone(),
            storm_stop.clone(),
        );
        storm.push(tokio::spawn(async move {
            let mut logins = 0_u64;
            while !stop.load(Ordering::Relaxed) {
                let email = p[n % USERS].email.as_str().to_owned();
                let _ = login(&client, &full, &email).await;
                logins += 1;
            }
            logins
        }));
    }
    let during = measure(&client, seconds, concurrency, read_one).await;
    storm_stop.store(true, Ordering::Relaxed);
    let mut logins = 0;
    for task in storm {
        logins += task.await?;
    }
    println!(
        "GET /v1/orders/{{id}} p99 during a login storm ({:.1} logins/s, {} tasks): {:.2} ms, \
         without: {:.2} ms, ratio {:.2} (target ≤ 2)",
        logins as f64 / seconds.as_secs_f64(),
        concurrency / 4,
        during.p99_ms,
        quiet.p99_ms,
        during.p99_ms / quiet.p99_ms
    );

    let (full_create, bare_create) = {
        let (p, full, bare, key) = (principals.clone(), full.clone(), bare.clone(), key.clone());
        let q = p.clone();
        let full_create = move |c: &Client, i: u64| {
            c.post(format!("{full}/v1/orders"))
                .bearer_auth(&p[i as usize % USERS].token)
                .header(
                    "idempotency-key",
                    format!("bench-{}", key.fetch_add(1, Ordering::Relaxed)),
                )
                .json(&order_body())
        };
        let bare_create = move |c: &Client, i: u64| {
            c.post(format!(
                "{bare}/bare/orders?owner={}",
                q[i as usize % USERS].id
            ))
        };
        compare(&client, seconds, concurrency, full_create, bare_create).await
    };
    row(
        "POST /v1/orders (Idempotency-Key) vs insert",
        &full_create,
        &bare_create,
        "≥ 60% of bare",
    );

    if full_one.errors + full_list.errors + full_create.errors + during.errors > 0 {
        println!(
            "non-2xx answers: reads {}, lists {}, creates {}, reads in the storm {}",
            full_one.errors, full_list.errors, full_create.errors, during.errors
        );
    }
    Ok(())
}

struct Principal {
    id: Uuid,
    email: Email,
    token: String,
    orders: Vec<String>,
}

/// The environment's configuration, with listeners on loopback and limits the benchmark does
/// not run into.
fn config() -> anyhow::Result<Config> {
    let mut vars: HashMap<String, String> = std::env::vars().collect();
    for (name, value) in [
        ("API_ADDR", "127.0.0.1:0"),
        ("ADMIN_ADDR", "127.0.0.1:0"),
        ("RATE_LIMIT_PER_MINUTE", "100000"),
        ("RATE_LIMIT_WRITES_PER_MINUTE", "100000"),
        ("LOGIN_ATTEMPTS_PER_MINUTE_PER_IP", "100000"),
        ("LOGIN_ATTEMPTS_PER_MINUTE_PER_ACCOUNT", "100000"),
        ("MAX_CONCURRENT_REQUESTS", "10000"),
        ("DATABASE_MAX_CONNECTIONS", "20"),
    ] {
        vars.entry(name.to_owned())
            .or_insert_with(|| value.to_owned());
    }
    vars.entry("APP_ENV".into())
        .or_insert_with(|| "development".into());
    Ok(Config::from_map(&vars)?)
}

fn order_body() -> serde_json::Value {
    serde_json::json!({"currency": "EUR", "items": [{"sku": "BOOK-1", "quantity": 2, "unit_price_cents": 1250}]})
}

async fn login(client: &Client, base: &str, email: &str) -> anyhow::Result<String> {
    let body: serde_json::Value = client
        .post(format!("{base}/v1/auth/token"))
        .json(&serde_json::json!({"email": email, "password": PASSWORD}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(body["access_token"].as_str().unwrap_or_default().to_owned())
}

// ---- The bare handlers: the same SQL on the same pool, no middleware -------------------------

async fn serve_bare(db: PgPool) -> anyhow::Result<String> {
    let router = Router::new()
        .route("/bare/orders/{id}", get(bare_find))
        .route("/bare/orders", get(bare_list).post(bare_insert))
        .with_state(db);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, router).await });
    Ok(format!("http://{address}"))
}

#[derive(serde::Deserialize)]
struct Owner {
    owner: Uuid,
}

async fn bare_find(State(db): State<PgPool>, Path(id): Path<Uuid>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Ok(mut conn) = db.acquire().await else {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    match store::find(&mut conn, id).await {
        Ok(Some(order)) => axum::Json(OrderView::from(order)).into_response(),
        _ => axum::http::StatusCode::NOT_FOUND.into_response(),
    }
}

async fn bare_list(
    State(db): State<PgPool>,
    axum::extract::Query(Owner { owner }): axum::extract::Query<Owner>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let Ok(mut conn) = db.acquire().await else {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let filter = ListFilter {
        owner: Some(owner),
        status: None,
    };
    match store::list(&mut conn, filter, Keyset::start(), 21).await {
        Ok(orders) => {
            axum::Json(orders.into_iter().map(OrderView::from).collect::<Vec<_>>()).into_response()
        }
        Err(_) => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn bare_insert(
    State(db): State<PgPool>,
    axum::extract::Query(Owner { owner }): axum::extract::Query<Owner>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let order = || -> Option<NewOrder> {
        Some(NewOrder {
            currency: Currency::parse("EUR".into()).ok()?,
            items: vec![LineItem {
                sku: Sku::parse("BOOK-1".into()).ok()?,
                quantity: Quantity::parse(2).ok()?,
                unit_price: UnitPrice::parse(1250).ok()?,
            }],
            note: None,
            external_ref: None,
        })
    };
    let (Some(order), Ok(mut tx)) = (order(), db.begin().await) else {
        return axum::http::StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    match store::insert(&mut tx, owner, &order).await {
        Ok(order) if tx.commit().await.is_ok() => (
            axum::http::StatusCode::CREATED,
            axum::Json(OrderView::from(order)),
        )
            .into_response(),
        _ => axum::http::StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// What the stack costs by itself: `GET /v1/orders/{id}` through `with_middleware` (every layer,
/// a real bearer token) to a handler that returns a fixed body, beside the same handler bare,
/// called in a loop on one task, alternately, after a warm-up round. Without network, database or
/// Redis (the rate limiter keeps its buckets in process here), so on an idle machine this number
/// moves only when the stack does.
async fn stack_cost(config: &Config, db: PgPool, token: &str) -> anyhow::Result<(f64, f64)> {
    const ROUNDS: u32 = 5;
    const CALLS: u32 = 20_000;
    let fixed = || async { ([("content-type", "application/json")], r#"{"id":"fixed"}"#) };
    let mut config = config.clone();
    config.rate_limit.redis_url = None;
    config.rate_limit.per_minute = std::num::NonZeroU32::MAX;
    let state = service::app::AppState::new(db, &config)?;
    let bare = Router::new().route("/v1/orders/{id}", get(fixed));
    // `with_state` turns handlers into services once, as `axum::serve` does; a router called
    // without it would apply every layer again on each request.
    let full = service::app::with_middleware(bare.clone(), &state, &config.http).with_state(());
    let bare = bare.with_state(());
    let path = format!("/v1/orders/{}", Uuid::now_v7());
    let mut spent = [Duration::ZERO; 2];
    for round in 0..=ROUNDS {
        for (side, router) in [&full, &bare].into_iter().enumerate() {
            let started = Instant::now();
            for _ in 0..CALLS {
                call(router, &path, token).await?;
            }
            if round > 0 {
                spent[side] += started.elapsed();
            }
        }
    }
    let per_request = |spent: Duration| spent.as_secs_f64() * 1e6 / f64::from(ROUNDS * CALLS);
    Ok((per_request(spent[0]), per_request(spent[1])))
}

async fn call(router: &Router, path: &str, token: &str) -> anyhow::Result<()> {
    use tower::ServiceExt;
    let request = axum::http::Request::get(path)
        .header("authorization", format!("Bearer {token}"))
        .body(axum::body::Body::empty())?;
    let response = router.clone().oneshot(request).await?;
    anyhow::ensure!(response.status().is_success(), "{}", response.status());
    axum::body::to_bytes(response.into_body(), usize::MAX).await?;
    Ok(())
}

// ---- The load generator -----------------------------------------------------------------------

struct Stats {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
}

/// What one stretch of load measured.
#[derive(Default)]
struct Sample {
    latencies: Vec<Duration>,
    errors: u64,
    seconds: f64,
}

impl Sample {
    fn merge(mut self, mut other: Sample) -> Sample {
        self.latencies.append(&mut other.latencies);
        self.errors += other.errors;
        self.seconds += other.seconds;
        self
    }

    fn stats(mut self) -> Stats {
        self.latencies.sort_unstable();
        let latencies = &self.latencies;
        let quantile = |q: f64| {
            let index =
                ((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1));
            latencies
                .get(index)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        Stats {
            per_second: latencies.len() as f64 / self.seconds,
            p50_ms: quantile(0.50),
            p99_ms: quantile(0.99),
            errors: self.errors,
        }
    }
}

/// Rounds each side of a comparison is split into, alternating, so that drift during the run
/// (autovacuum, checkpoints, a growing table) falls on both sides alike.
const ROUNDS: u32 = 5;

/// The full service and the bare handler, alternately, `duration` each in all.
async fn compare<F, B>(
    client: &Client,
    duration: Duration,
    concurrency: usize,
    full: F,
    bare: B,
) -> (Stats, Stats)
where
    F: Fn(&Client, u64) -> RequestBuilder + Clone + Send + Sync + 'static,
    B: Fn(&Client, u64) -> RequestBuilder + Clone + Send + Sync + 'static,
{
    let (mut full_sample, mut bare_sample) = (Sample::default(), Sample::default());
    for _ in 0..ROUNDS {
        let slice = duration / ROUNDS;
        bare_sample = bare_sample.merge(load(client, slice, concurrency, bare.clone()).await);
        full_sample = full_sample.merge(load(client, slice, concurrency, full.clone()).await);
    }
    (full_sample.stats(), bare_sample.stats())
}

/// Keeps `concurrency` requests in flight for `duration` and measures every one.
async fn measure<F>(client: &Client, duration: Duration, concurrency: usize, request: F) -> Stats
where
    F: Fn(&Client, u64) -> RequestBuilder + Clone + Send + Sync + 'static,
{
    load(client, duration, concurrency, request).await.stats()
}

async fn load<F>(client: &Client, duration: Duration, concurrency: usize, request: F) -> Sample
where
    F: Fn(&Client, u64) -> RequestBuilder + Clone + Send + Sync + 'static,
{
    let counter = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (client, request, counter) = (client.clone(), request.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let (mut latencies, mut errors) = (Vec::new(), 0_u64);
            while started.elapsed() < duration {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let sent = Instant::now();
                match request(&client, i).send().await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.bytes().await;
                    }
                    _ => errors += 1,
                }
                latencies.push(sent.elapsed());
            }
            (latencies, errors)
        }));
    }
    let mut sample = Sample::default();
    for task in tasks {
        if let Ok((mut latencies, errors)) = task.await {
            sample.latencies.append(&mut latencies);
            sample.errors += errors;
        }
    }
    sample.seconds = started.elapsed().as_secs_f64();
    sample
}

fn row(name: &str, full: &Stats, bare: &Stats, target: &str) {
    println!(
        "{name:<44} {:>10.0} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>6.0}%  {target}",
        full.per_second,
        bare.per_second,
        full.p50_ms,
        full.p99_ms,
        bare.p50_ms,
        bare.p99_ms,
        100.0 * full.per_second / bare.per_second
    );
}
