//! Rate limits (R1, S5): per principal, per client IP, stricter for writes; RateLimit headers;
//! in-process and shared through a real Redis; the fallback when Redis is down.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use service::users::Role;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::{TestApp, test_config};
use crate::orders::order_body;

/// The Redis server the suite runs against (`scripts/local-redis.sh start` prints it).
fn redis_url() -> String {
    std::env::var("REDIS_URL").expect(
        "REDIS_URL must point at a Redis server: run `eval \"$(scripts/local-redis.sh start)\"`",
    )
}

/// A "Redis" that accepts connections and never answers: the timeout, not a refusal, decides.
/// Abort the task to close it.
async fn silent_redis() -> (String, tokio::task::JoinHandle<()>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    (url, held)
}

async fn get_orders(app: &TestApp, token: &str) -> reqwest::Response {
    app.call(Method::GET, "/v1/orders", token)
        .send()
        .await
        .unwrap()
}

#[sqlx::test]
async fn every_v1_response_carries_ratelimit_headers_and_the_limit_answers_429(db: PgPool) {
    let app = TestApp::spawn_with(
        db,
        test_config(&[("RATE_LIMIT_PER_MINUTE", "5"), ("REDIS_URL", "")]),
    )
    .await;
    let (_, token) = app.token_for(Role::Customer).await;
    for remaining in (0..5).rev() {
        let response = get_orders(&app, &token).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["ratelimit-policy"],
            "\"default\";q=5;w=60"
        );
        let state = response.headers()["ratelimit"].to_str().unwrap().to_owned();
        assert!(
            state.starts_with(&format!("\"default\";r={remaining};t=")),
            "{state}"
        );
    }
    let limited = get_orders(&app, &token).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=12).contains(&retry_after),
        "one token returns every 12 s: {retry_after}"
    );
    let state = limited.headers()["ratelimit"].to_str().unwrap().to_owned();
    assert_eq!(
        state,
        format!("\"default\";r=0;t={retry_after}"),
        "Retry-After is never earlier than t"
    );
    assert_eq!(
        limited.json::<Value>().await.unwrap()["code"],
        "rate_limited"
    );

    // Limits are per principal: someone else is unaffected.
    let (_, other) = app.token_for(Role::Customer).await;
    assert_eq!(get_orders(&app, &other).await.status(), StatusCode::OK);

    // Anonymous calls are limited per client IP, and their 401s carry the headers too.
    let anonymous = app
        .client
        .get(format!("{}/v1/orders", app.api))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    assert!(anonymous.headers().contains_key("ratelimit"));
    // Unknown /v1 paths are limited too: they are answered (404) with the headers.
    let unknown = app
        .call(Method::GET, "/v1/no-such-thing", &other)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert!(unknown.headers().contains_key("ratelimit"));
    // Operational routes are not /v1 and not limited.
    assert!(app.get("/livez").await.headers().get("ratelimit").is_none());
}

#[sqlx::test]
async fn writes_have_their_own_stricter_limit(db: PgPool) {
    let app = TestApp::spawn_with(
        db,
        test_config(&[("RATE_LIMIT_WRITES_PER_MINUTE", "2"), ("REDIS_URL", "")]),
    )
    .await;
    let (_, token) = app.token_for(Role::Customer).await;
    let create = || {
        app.call(Method::POST, "/v1/orders", &token)
            .header("idempotency-key", Uuid::now_v7().to_string())
            .json(&order_body())
            .send()
    };
    for _ in 0..2 {
        let response = create().await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let policies = response.headers()["ratelimit-policy"]
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(policies, "\"default\";q=600;w=60, \"writes\";q=2;w=60");
    }
    assert_eq!(
        create().await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        get_orders(&app, &token).await.status(),
        StatusCode::OK,
        "reads are still allowed"
    );
}

#[sqlx::test]
async fn forwarded_for_is_believed_only_from_trusted_proxies(db: PgPool) {
    let attempt = |app: &TestApp, forwarded: &str, email: &str| {
        app.client
            .post(format!("{}/v1/auth/token", app.api))
            .header("x-forwarded-for", forwarded)
            .json(&json!({"email": email, "password": "whatever password"}))
            .send()
    };
    let limits = [("LOGIN_ATTEMPTS_PER_MINUTE_PER_IP", "2"), ("REDIS_URL", "")];

    // Behind a trusted proxy, each client has its own bucket.
    let mut trusted = limits.to_vec();
    trusted.push(("TRUSTED_PROXIES", "127.0.0.1/32"));
    let app = TestApp::spawn_with(db.clone(), test_config(&trusted)).await;
    for email in ["a@example.com", "b@example.com"] {
        assert_eq!(
            attempt(&app, "203.0.113.1", email).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        attempt(&app, "203.0.113.1", "c@example.com")
            .await
            .unwrap()
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        attempt(&app, "203.0.113.2", "d@example.com")
            .await
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED,
        "another client"
    );

    // Without trust, a client cannot escape its bucket by inventing a forwarded address.
    let app = TestApp::spawn_with(db, test_config(&limits)).await;
    for (forwarded, email) in [
        ("198.51.100.1", "a@example.com"),
        ("198.51.100.2", "b@example.com"),
    ] {
        assert_eq!(
            attempt(&app, forwarded, email).await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        attempt(&app, "198.51.100.3", "c@example.com")
            .await
            .unwrap()
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[sqlx::test]
async fn a_redis_bucket_is_shared_by_every_instance(db: PgPool) {
    let namespace = format!("shared-{}", Uuid::now_v7());
    let config = || {
        test_config(&[
            ("RATE_LIMIT_PER_MINUTE", "4"),
            ("REDIS_URL", &redis_url()),
            ("RATE_LIMIT_REDIS_PREFIX", &namespace),
        ])
    };
    let first = TestApp::spawn_with(db.clone(), config()).await;
    let second = TestApp::spawn_with(db, config()).await;
    let (_, token) = first.token_for(Role::Customer).await;

    for app in [&first, &second, &first, &second] {
        assert_eq!(get_orders(app, &token).await.status(), StatusCode::OK);
    }
    for app in [&first, &second] {
        let limited = get_orders(app, &token).await;
        assert_eq!(
            limited.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "the quota is shared, not per instance"
        );
        assert!(limited.headers().contains_key("retry-after"));
    }
}

#[sqlx::test]
async fn with_redis_down_each_instance_falls_back_to_its_own_buckets(db: PgPool) {
    let (silent_url, held) = silent_redis().await;
    let config = test_config(&[
        ("RATE_LIMIT_PER_MINUTE", "3"),
        ("REDIS_URL", &silent_url),
        ("REDIS_TIMEOUT_MS", "100"),
    ]);
    let app = TestApp::spawn_with(db, config).await;
    let (_, token) = app.token_for(Role::Customer).await;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        assert_eq!(
            get_orders(&app, &token).await.status(),
            StatusCode::OK,
            "requests are still served"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "Redis is waited on only briefly: {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        get_orders(&app, &token).await.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "and still limited"
    );
    held.abort();
}

#[sqlx::test]
async fn a_hanging_redis_is_waited_on_until_its_circuit_opens(db: PgPool) {
    let (silent_url, held) = silent_redis().await;
    let timeout = std::time::Duration::from_millis(1000);
    let config = test_config(&[("REDIS_URL", &silent_url), ("REDIS_TIMEOUT_MS", "1000")]);
    let app = TestApp::spawn_with(db.clone(), config.clone()).await;
    let user = app.create_user(Role::Customer).await;
    // A token issued directly: a login would make decisions of its own, and its argon2 work could
    // outlast the cooldown on a busy machine.
    let principal = service::auth::Principal {
        user_id: user.id,
        role: Role::Customer,
    };
    let token = service::app::AppState::new(db, &config)
        .unwrap()
        .tokens
        .issue(&principal)
        .unwrap();
    // The first three requests are three failures in a row: each waits out the timeout (or
    // fails at once when the connection was dropped). They open the circuit.
    let mut waited = 0;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        assert_eq!(get_orders(&app, &token).await.status(), StatusCode::OK);
        waited += usize::from(started.elapsed() >= timeout);
    }
    assert!(waited >= 1, "Redis was asked");
    // Then, for the cooldown (5 s), decisions are local at once; when a trial is next let through
    // is `circuit_breaker`'s unit test.
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let response = get_orders(&app, &token).await;
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.headers().contains_key("ratelimit"));
        assert!(
            started.elapsed() < timeout / 2,
            "Redis was waited on: {:?}",
            started.elapsed()
        );
    }
    held.abort();
}

#[sqlx::test]
async fn high_quotas_work_on_redis_too(db: PgPool) {
    // 100 000 a minute is an emission interval of 600 µs: below a millisecond.
    let config = test_config(&[
        ("RATE_LIMIT_PER_MINUTE", "100000"),
        ("REDIS_URL", &redis_url()),
    ]);
    let app = TestApp::spawn_with(db, config).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let response = get_orders(&app, &token).await;
    assert_eq!(response.status(), StatusCode::OK);
    let state = response.headers()["ratelimit"].to_str().unwrap().to_owned();
    assert!(state.starts_with("\"default\";r=99999;"), "{state}");
}
