//! Browser-facing headers (S7: CORS allow-list, HSTS) and the kill switch (D5).

use reqwest::{Method, StatusCode};
use serde_json::Value;
use service::users::Role;
use sqlx::PgPool;

use crate::harness::{TestApp, test_config};
use crate::orders::create;

#[sqlx::test]
async fn cors_answers_only_allowed_origins(db: PgPool) {
    let app = TestApp::spawn_with(
        db,
        test_config(&[("CORS_ALLOWED_ORIGINS", "https://app.example.com")]),
    )
    .await;
    let preflight = |origin: &str| {
        app.client
            .request(Method::OPTIONS, format!("{}/v1/orders", app.api))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, idempotency-key, content-type",
            )
            .send()
    };
    let allowed = preflight("https://app.example.com").await.unwrap();
    assert!(
        allowed.status().is_success(),
        "preflight is answered without a token: {}",
        allowed.status()
    );
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let methods = allowed.headers()["access-control-allow-methods"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(methods.contains("POST"), "{methods}");
    assert!(
        allowed
            .headers()
            .get("access-control-allow-credentials")
            .is_none()
    );

    let foreign = preflight("https://evil.example.net").await.unwrap();
    assert!(
        foreign
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "unknown origins get nothing"
    );

    // Error responses carry CORS headers too, so a browser app can read the problem.
    let unauthenticated = app
        .client
        .get(format!("{}/v1/orders", app.api))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        unauthenticated.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    let exposed = unauthenticated.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        exposed.contains("x-request-id") && exposed.contains("ratelimit"),
        "{exposed}"
    );
}

#[sqlx::test]
async fn without_an_allow_list_there_is_no_cors_and_hsts_only_when_configured(db: PgPool) {
    let plain = TestApp::spawn(db.clone()).await;
    let response = plain
        .client
        .get(format!("{}/livez", plain.api))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    assert!(
        response
            .headers()
            .get("strict-transport-security")
            .is_none()
    );

    let https = TestApp::spawn_with(db, test_config(&[("HSTS_MAX_AGE_SECS", "31536000")])).await;
    let response = https.get("/livez").await;
    assert_eq!(
        response.headers()["strict-transport-security"],
        "max-age=31536000; includeSubDomains"
    );
}

#[sqlx::test]
async fn a_switched_off_feature_answers_503_and_the_rest_keeps_working(db: PgPool) {
    let app = TestApp::spawn_with(
        db.clone(),
        test_config(&[("DISABLED_FEATURES", "POST /v1/orders")]),
    )
    .await;
    let (_, token) = app.token_for(Role::Customer).await;
    let create_response = app
        .call(Method::POST, "/v1/orders", &token)
        .header("idempotency-key", "k")
        .json(&crate::orders::order_body())
        .send()
        .await
        .unwrap();
    assert_eq!(create_response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(create_response.headers()["retry-after"], "60");
    assert_eq!(
        create_response.json::<Value>().await.unwrap()["code"],
        "service_unavailable"
    );
    assert_eq!(
        app.call(Method::GET, "/v1/orders", &token)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );

    // A whole feature.
    let app =
        TestApp::spawn_with(db.clone(), test_config(&[("DISABLED_FEATURES", "orders")])).await;
    let (_, token) = app.token_for(Role::Customer).await;
    assert_eq!(
        app.call(Method::GET, "/v1/orders", &token)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        app.get("/readyz").await.status(),
        StatusCode::OK,
        "the rest of the service is up"
    );

    // And back on: the same data, untouched.
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    create(&app, &token).await;
}
