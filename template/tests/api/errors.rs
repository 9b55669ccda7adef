//! Every error, ours or the framework's, is the same problem+json document (E1–E3, V3, V4).

use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use service::app::AppState;
use service::auth::Principal;
use service::config::HttpConfig;
use service::db;
use service::extract::{Json, Path};
use service::users::Role;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::{TestApp, serve, test_config};

/// Reads a problem document and checks the members every problem must have.
async fn problem(response: reqwest::Response, status: StatusCode, code: &str) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let request_id = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status.as_u16(), "{body}");
    assert_eq!(body["type"], format!("/docs/errors#{code}"), "{body}");
    assert!(
        body["title"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert!(
        body["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{body}"
    );
    assert_eq!(
        body["request_id"], request_id,
        "the body and the header carry the same id"
    );
    body
}

#[sqlx::test]
async fn an_unknown_route_is_a_404_problem(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let body = problem(
        app.get("/v1/nothing/here").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_eq!(body["instance"], "/v1/nothing/here");
}

#[sqlx::test]
async fn a_wrong_method_is_a_405_problem_with_allow(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let response = app
        .client
        .delete(format!("{}/livez", app.api))
        .send()
        .await
        .unwrap();
    let allow = response.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET"), "{allow}");
    problem(
        response,
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
    )
    .await;
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Widget {
    name: String,
    size: u8,
}

/// What other layers (a rate limiter, a timeout, an auth proxy) answer on their own.
async fn layer_answers(Path(status): Path<u16>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let status = axum::http::StatusCode::from_u16(status).unwrap();
    (
        status,
        [("www-authenticate", "Bearer"), ("retry-after", "7")],
        "plain text from a layer",
    )
        .into_response()
}

async fn panics() -> &'static str {
    panic!("secret detail: connection string postgres://u:p@db")
}

async fn sleeps(Path(millis): Path<u64>) -> &'static str {
    tokio::time::sleep(Duration::from_millis(millis)).await;
    "slept"
}

fn http(max_body_bytes: usize) -> HttpConfig {
    HttpConfig {
        max_body_bytes,
        request_timeout: Duration::from_secs(10),
        upload_timeout: Duration::from_secs(10),
        max_concurrent_requests: 100,
        cors_allowed_origins: Vec::new(),
        hsts_max_age: None,
        disabled: Vec::new(),
    }
}

async fn test_routes(max_body_bytes: usize) -> (String, reqwest::Client) {
    test_routes_with(http(max_body_bytes)).await
}

/// Routes that exist only here, behind exactly the production middleware stack, and a client
/// whose bearer token passes its authentication. The state's pool points nowhere: these routes
/// never use it.
async fn test_routes_with(http: HttpConfig) -> (String, reqwest::Client) {
    let routes = Router::new()
        .route(
            "/widgets",
            post(|Json(widget): Json<Widget>| async move { format!("{widget:?}") }),
        )
        .route(
            "/widgets/{id}",
            get(|Path(id): Path<Uuid>| async move { id.to_string() }),
        )
        .route("/v1/panic", get(panics))
        .route("/layer/{status}", get(layer_answers))
        .route("/sleep/{millis}", get(sleeps))
        .route("/livez", get(|| async { "alive" }));
    let config = test_config(&[("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")]);
    let state = AppState::new(db::pool(&config.database).unwrap(), &config).unwrap();
    let token = state
        .tokens
        .issue(&Principal {
            user_id: Uuid::now_v7(),
            role: Role::Customer,
        })
        .unwrap();
    let base = serve(service::app::with_middleware(routes, &state, &http)).await;
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
    let client = reqwest::Client::builder()
        .default_headers(headers)
        .build()
        .unwrap();
    (base, client)
}

#[tokio::test]
async fn framework_rejections_become_problems() {
    let (base, client) = test_routes(1024).await;
    let post = |body: &'static str, content_type: &'static str| {
        client
            .post(format!("{base}/widgets"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };

    let body = problem(
        post("{not json", "application/json").await.unwrap(),
        StatusCode::BAD_REQUEST,
        "malformed_body",
    )
    .await;
    assert!(
        body["detail"].as_str().unwrap().contains("line 1"),
        "serde's position helps the client: {body}"
    );

    problem(
        post(r#"{"name":"a","size":1}"#, "text/plain")
            .await
            .unwrap(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported_media_type",
    )
    .await;

    let body = problem(
        post(r#"{"name":"a","size":1,"admin":true}"#, "application/json")
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert!(
        body["detail"].as_str().unwrap().contains("admin"),
        "the unknown field is named: {body}"
    );

    problem(
        post(r#"{"name":"a","size":1000}"#, "application/json")
            .await
            .unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;

    let response = client
        .get(format!("{base}/widgets/not-a-uuid"))
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::BAD_REQUEST, "invalid_parameter").await;

    let ok = client
        .get(format!("{base}/widgets/{}", Uuid::nil()))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_body_over_the_limit_is_a_413_problem() {
    let (base, client) = test_routes(1024).await;
    let big = format!(r#"{{"name":"{}","size":1}}"#, "x".repeat(2048));
    let response = client
        .post(format!("{base}/widgets"))
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    problem(response, StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large").await;
}

#[tokio::test]
async fn a_panic_is_a_generic_500_problem() {
    let (base, client) = test_routes(1024).await;
    let response = client.get(format!("{base}/v1/panic")).send().await.unwrap();
    // It passed every layer on its way out, like any other answer.
    for name in [
        "ratelimit",
        "ratelimit-policy",
        "x-request-id",
        "x-content-type-options",
    ] {
        assert!(response.headers().contains_key(name), "{name} is missing");
    }
    let body = problem(
        response,
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal_error",
    )
    .await;
    let text = body.to_string();
    assert!(
        !text.contains("secret") && !text.contains("postgres://"),
        "nothing internal leaks: {text}"
    );

    // The process keeps serving after a panic.
    let after = client
        .get(format!("{base}/widgets/{}", Uuid::nil()))
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), StatusCode::OK);
}

#[tokio::test]
async fn error_responses_from_other_layers_keep_their_status_and_headers() {
    let (base, client) = test_routes(1024).await;
    for (status, code) in [
        (401, "unauthenticated"),
        (409, "invalid_parameter"),
        (429, "rate_limited"),
        (408, "timeout"),
        (504, "timeout"),
        (503, "service_unavailable"),
    ] {
        let response = client
            .get(format!("{base}/layer/{status}"))
            .send()
            .await
            .unwrap();
        let expected = StatusCode::from_u16(status).unwrap();
        assert_eq!(
            response.headers()["retry-after"],
            "7",
            "{status}: the layer's headers are kept"
        );
        let body = problem(response, expected, code).await;
        assert_eq!(body["status"], status);
    }
}

#[tokio::test]
async fn rejection_details_do_not_echo_long_input() {
    let (base, client) = test_routes(64 * 1024).await;
    let long = "x".repeat(5000);
    let response = client
        .post(format!("{base}/widgets"))
        .header("content-type", "application/json")
        .body(format!(r#"{{"name":"a","size":"{long}"}}"#))
        .send()
        .await
        .unwrap();
    let body = problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    assert!(body["detail"].as_str().unwrap().len() < 400, "{body}");
}

#[tokio::test]
async fn a_request_past_the_timeout_is_a_503_timeout_with_retry_after() {
    let (base, client) = test_routes_with(HttpConfig {
        request_timeout: Duration::from_secs(1),
        ..http(1024)
    })
    .await;
    let started = std::time::Instant::now();
    let response = client
        .get(format!("{base}/sleep/5000"))
        .send()
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "abandoned at the timeout, not after the handler"
    );
    assert_eq!(response.headers()["retry-after"], "1");
    problem(response, StatusCode::SERVICE_UNAVAILABLE, "timeout").await;
}

#[tokio::test]
async fn past_the_concurrency_ceiling_requests_are_refused_at_once() {
    let (base, client) = test_routes_with(HttpConfig {
        max_concurrent_requests: 2,
        ..http(1024)
    })
    .await;
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(client.get(format!("{base}/sleep/4000")).send()))
        .collect();

    // Once both slow requests hold the two slots, the next one is refused without waiting. Poll
    // rather than guess when they have arrived: a busy machine may take a while to send them.
    let mut shed = None;
    for _ in 0..30 {
        let started = std::time::Instant::now();
        let response = client.get(format!("{base}/sleep/0")).send().await.unwrap();
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            shed = Some((response, started.elapsed()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (shed, waited) = shed.expect("a request past the ceiling was refused");
    // Probes are never shed: a busy pod must not be restarted for being busy.
    assert_eq!(
        client
            .get(format!("{base}/livez"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    assert!(
        waited < Duration::from_millis(1000),
        "refused without waiting for a slot: {waited:?}"
    );
    assert_eq!(shed.headers()["retry-after"], "1");
    problem(shed, StatusCode::SERVICE_UNAVAILABLE, "service_unavailable").await;

    for request in slow {
        assert_eq!(
            request.await.unwrap().unwrap().status(),
            StatusCode::OK,
            "admitted requests complete"
        );
    }
    let after = client.get(format!("{base}/sleep/0")).send().await.unwrap();
    assert_eq!(
        after.status(),
        StatusCode::OK,
        "capacity is back once they finish"
    );
}
