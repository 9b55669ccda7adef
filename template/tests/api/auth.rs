//! Authentication, default-deny and identity (S1, S3, S5, S6).

use std::time::Instant;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use service::users::Role;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::{TEST_PASSWORD, TestApp, test_config};

async fn token_request(app: &TestApp, body: Value) -> reqwest::Response {
    app.client
        .post(format!("{}/v1/auth/token", app.api))
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[sqlx::test]
async fn login_issues_a_bearer_token_that_opens_protected_routes(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let user = app.create_user(Role::Customer).await;
    let response = token_request(
        &app,
        json!({"email": user.email.as_str().to_uppercase(), "password": TEST_PASSWORD}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["cache-control"],
        "no-store",
        "tokens are never cached"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    let token = body["access_token"].as_str().unwrap();

    let orders = app
        .call(Method::GET, "/v1/orders", token)
        .send()
        .await
        .unwrap();
    assert_eq!(orders.status(), StatusCode::OK);
}

#[sqlx::test]
async fn a_wrong_password_and_an_unknown_email_are_indistinguishable(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let user = app.create_user(Role::Customer).await;

    let attempts = [
        json!({"email": user.email.as_str(), "password": "wrong password here"}),
        json!({"email": "nobody@example.com", "password": "wrong password here"}),
        json!({"email": "not-an-email", "password": "wrong password here"}),
    ];
    let mut answers = Vec::new();
    // In turns, so that a stretch of load on the machine (other tests' password hashing among
    // it) slows every kind of attempt alike; five rounds, within the login rate limits.
    let mut fastest = [f64::MAX; 3];
    for _ in 0..5 {
        for (kind, body) in attempts.iter().enumerate() {
            let started = Instant::now();
            let response = token_request(&app, body.clone()).await;
            fastest[kind] = fastest[kind].min(started.elapsed().as_secs_f64());
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
            let mut problem: Value = response.json().await.unwrap();
            assert_eq!(problem["code"], "invalid_credentials");
            problem.as_object_mut().unwrap().remove("request_id");
            answers.push(problem);
        }
    }
    assert!(
        answers.windows(2).all(|pair| pair[0] == pair[1]),
        "every failure has the same body: {answers:?}"
    );
    // Every path runs one argon2 verification. Load can only slow a request down, so the fastest
    // of five is a floor on the work done: an unknown account answering in a fraction of a wrong
    // password's floor would mean the verification was skipped.
    let (wrong, unknown, malformed) = (fastest[0], fastest[1], fastest[2]);
    assert!(
        unknown > wrong / 4.0,
        "unknown e-mail {unknown:.4}s vs wrong password {wrong:.4}s"
    );
    assert!(
        malformed > wrong / 4.0,
        "malformed e-mail {malformed:.4}s vs wrong password {wrong:.4}s"
    );
}

#[sqlx::test]
async fn bad_tokens_get_401_with_www_authenticate(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let tampered = format!("{}x", &token[..token.len() - 1]);
    for authorization in [
        None,
        Some("Bearer".to_owned()),
        Some("Basic dXNlcjpwYXNz".to_owned()),
        Some(format!("Bearer {tampered}")),
        Some("Bearer not.a.jwt".to_owned()),
    ] {
        let mut request = app.client.get(format!("{}/v1/orders", app.api));
        if let Some(value) = &authorization {
            request = request.header("authorization", value);
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{authorization:?}"
        );
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "unauthenticated");
    }
}

/// Default-deny: every operation in the OpenAPI document that is not on the public allow-list
/// answers 401 without credentials, so a route added later cannot silently be public.
#[sqlx::test]
async fn every_documented_route_but_the_public_ones_requires_a_token(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    let mut protected = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            let concrete = path.replace("{id}", &Uuid::now_v7().to_string());
            let method = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            let response = app
                .client
                .request(method.clone(), format!("{}{concrete}", app.api))
                .header("content-type", "application/json")
                .body("{}")
                .send()
                .await
                .unwrap();
            if service::auth::PUBLIC_ROUTES.contains(&path.as_str()) {
                assert_ne!(
                    response.status(),
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} is public"
                );
            } else {
                protected += 1;
                assert_eq!(
                    response.status(),
                    StatusCode::UNAUTHORIZED,
                    "{method} {path} needs a token"
                );
                assert_eq!(
                    item[method.as_str().to_lowercase()]["security"][0]["bearer"],
                    json!([]),
                    "{method} {path} documents it"
                );
            }
        }
    }
    assert!(protected >= 7, "the orders routes were walked");
}

#[sqlx::test]
async fn identity_never_comes_from_client_headers(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (admin, _) = app.token_for(Role::Admin).await;
    let (_, customer_token) = app.token_for(Role::Customer).await;

    let spoofed = app
        .client
        .get(format!("{}/v1/orders", app.api))
        .header("x-user-id", admin.id.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(spoofed.status(), StatusCode::UNAUTHORIZED);

    // A customer claiming to be an admin through headers is still a customer.
    let response = app
        .call(
            Method::POST,
            &format!("/v1/orders/{}/approve", Uuid::now_v7()),
            &customer_token,
        )
        .header("x-user-id", admin.id.to_string())
        .header("x-role", "admin")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
}

#[sqlx::test]
async fn the_deprecated_login_route_works_and_says_so(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let user = app.create_user(Role::Customer).await;
    let response = app
        .client
        .post(format!("{}/v1/auth/login", app.api))
        .json(&json!({"email": user.email.as_str(), "password": TEST_PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["deprecation"], "@1793491200");
    assert_eq!(
        response.headers()["sunset"],
        "Wed, 30 Jun 2027 23:59:59 GMT"
    );
    assert_eq!(
        response.headers()["link"],
        "</docs/deprecations>; rel=\"deprecation\"; type=\"text/html\""
    );

    let current = token_request(
        &app,
        json!({"email": user.email.as_str(), "password": TEST_PASSWORD}),
    )
    .await;
    assert!(
        current.headers().get("deprecation").is_none(),
        "only the deprecated route is marked"
    );

    let doc: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(doc["paths"]["/v1/auth/login"]["post"]["deprecated"], true);
    assert!(
        doc["paths"]["/v1/auth/token"]["post"]
            .get("deprecated")
            .is_none()
    );
    assert_eq!(app.get("/docs/deprecations").await.status(), StatusCode::OK);
}

#[sqlx::test]
async fn repeated_login_attempts_are_limited_per_account_and_per_ip(db: PgPool) {
    let config = test_config(&[
        ("LOGIN_ATTEMPTS_PER_MINUTE_PER_ACCOUNT", "3"),
        ("LOGIN_ATTEMPTS_PER_MINUTE_PER_IP", "8"),
    ]);
    let app = TestApp::spawn_with(db, config).await;
    let user = app.create_user(Role::Customer).await;
    let attempt = |email: String, password: &'static str| {
        token_request(&app, json!({"email": email, "password": password}))
    };

    for _ in 0..3 {
        assert_eq!(
            attempt(user.email.to_string(), "wrong password here")
                .await
                .status(),
            StatusCode::UNAUTHORIZED
        );
    }
    // The account's bucket is empty: even the right password waits, so guessing cannot continue.
    let limited = attempt(user.email.to_string(), TEST_PASSWORD).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry_after), "{retry_after}");
    // The RateLimit headers name the login's buckets, and show which one is empty.
    let header = |name: &str| limited.headers()[name].to_str().unwrap().to_owned();
    let policy = header("ratelimit-policy");
    assert!(
        policy.contains("\"login_ip\";q=8;w=60") && policy.contains("\"login_account\";q=3;w=60"),
        "{policy}"
    );
    assert!(
        header("ratelimit").contains("\"login_account\";r=0;"),
        "{}",
        header("ratelimit")
    );
    assert_eq!(
        limited.json::<Value>().await.unwrap()["code"],
        "rate_limited"
    );

    // An account that does not exist is limited exactly the same way.
    for _ in 0..3 {
        assert_eq!(
            attempt("ghost@example.com".into(), "whatever password")
                .await
                .status(),
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        attempt("ghost@example.com".into(), "whatever password")
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    // Eight attempts came from this IP: a ninth, for a fresh account, is refused by the IP's bucket.
    assert_eq!(
        attempt("third@example.com".into(), "whatever password")
            .await
            .status(),
        StatusCode::TOO_MANY_REQUESTS
    );
}

#[sqlx::test]
async fn login_during_a_database_outage_is_a_503_not_a_500(_db: PgPool) {
    let config = test_config(&[
        ("DATABASE_URL", "postgres://app:app@127.0.0.1:1/app"),
        ("DATABASE_ACQUIRE_TIMEOUT_MS", "500"),
    ]);
    let unreachable = service::db::pool(&config.database).unwrap();
    let app = TestApp::spawn_with(unreachable, config).await;
    let response = token_request(
        &app,
        json!({"email": "ann@example.com", "password": "whatever password"}),
    )
    .await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "service_unavailable"
    );
}
