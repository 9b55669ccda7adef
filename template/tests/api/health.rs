//! Liveness, readiness and graceful shutdown (O7, R5, S4).

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::Value;
use service::db;
use service::users::Role;
use sqlx::PgPool;

use crate::harness::{TestApp, test_config};

#[sqlx::test]
async fn liveness_and_readiness_pass_with_a_database(db: PgPool) {
    let app = TestApp::spawn(db).await;

    let live = app.get("/livez").await;
    assert_eq!(live.status(), StatusCode::OK);
    assert_eq!(live.headers()["content-type"], "application/health+json");

    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), StatusCode::OK);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "pass");
    assert_eq!(body["checks"]["database"]["status"], "pass");
}

#[sqlx::test]
async fn readiness_fails_fast_without_a_database_while_liveness_passes(_db: PgPool) {
    // Nothing listens on port 1: the pool can never connect.
    let config = test_config(&[
        ("DATABASE_URL", "postgres://app:app@127.0.0.1:1/app"),
        ("DATABASE_ACQUIRE_TIMEOUT_MS", "500"),
    ]);
    let unreachable = db::pool(&config.database).unwrap();
    let app = TestApp::spawn_with(unreachable, config).await;

    assert_eq!(
        app.get("/livez").await.status(),
        StatusCode::OK,
        "liveness checks no dependency"
    );

    let started = Instant::now();
    let ready = app.get("/readyz").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "readiness answers fast: {:?}",
        started.elapsed()
    );
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "fail");
    assert_eq!(body["checks"]["database"]["status"], "fail");
    let output = body["checks"]["database"]["output"].as_str().unwrap();
    assert!(
        !output.contains("127.0.0.1"),
        "connection details stay in the logs: {output}"
    );
}

#[sqlx::test]
async fn readiness_fails_first_on_shutdown_then_the_server_stops(db: PgPool) {
    let config = test_config(&[("SHUTDOWN_READINESS_DELAY_SECS", "2")]);
    let mut app = TestApp::spawn_with(db, config).await;
    assert_eq!(app.get("/readyz").await.status(), StatusCode::OK);

    app.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Still serving during the readiness delay, but telling the load balancer to go away.
    let ready = app.get("/readyz").await;
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["shutdown"]["status"], "fail");
    assert_eq!(app.get("/livez").await.status(), StatusCode::OK);

    let api = app.api.clone();
    app.stopped().await.expect("a clean stop");
    assert!(
        reqwest::get(format!("{api}/livez")).await.is_err(),
        "the listener is closed"
    );
}

#[sqlx::test]
async fn a_statement_over_the_timeout_is_cancelled_and_becomes_a_503_timeout(db: PgPool) {
    let config = test_config(&[
        ("DATABASE_URL", &crate::harness::url_of(&db)),
        ("DATABASE_STATEMENT_TIMEOUT_MS", "50"),
    ]);
    let pool = db::pool(&config.database).unwrap();
    let started = Instant::now();
    let error = sqlx::query("SELECT pg_sleep(2)")
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "cancelled by the server, not waited out"
    );
    let problem = service::problem::Problem::from(error);
    assert_eq!(problem.code(), service::problem::ErrorCode::Timeout);

    // Over HTTP: an edit that waits behind another transaction's lock on the order is cancelled
    // at the timeout and answers 503 `timeout`, instead of holding its connection. (A longer
    // timeout here, so that no set-up statement on a busy machine runs into it.)
    let config = test_config(&[
        ("DATABASE_URL", &crate::harness::url_of(&db)),
        ("DATABASE_STATEMENT_TIMEOUT_MS", "1000"),
    ]);
    let pool = db::pool(&config.database).unwrap();
    let app = TestApp::spawn_with(pool, config).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let (order, etag) = crate::orders::create(&app, &token).await;
    let id: uuid::Uuid = order["id"].as_str().unwrap().parse().unwrap();
    let mut holder = db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let response = app
        .call(reqwest::Method::PATCH, &format!("/v1/orders/{id}"), &token)
        .header("if-match", etag)
        .json(&serde_json::json!({"note": "waits"}))
        .send()
        .await
        .unwrap();
    holder.rollback().await.unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "timeout");
}
