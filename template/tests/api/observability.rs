//! Request ids, metrics on the admin listener, security headers (O2, O3, S4, S7).

use reqwest::StatusCode;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::TestApp;

#[sqlx::test]
async fn request_ids_are_echoed_when_sane_and_generated_otherwise(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let with_id = |id: &str| {
        app.client
            .get(format!("{}/livez", app.api))
            .header("x-request-id", id)
            .send()
    };

    let echoed = with_id("client-id_1.2").await.unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "client-id_1.2");

    for insane in ["has spaces", &"a".repeat(129), "semi;colon"] {
        let replaced = with_id(insane).await.unwrap();
        let id = replaced.headers()["x-request-id"].to_str().unwrap();
        assert_ne!(id, insane);
        assert_eq!(
            Uuid::parse_str(id).unwrap().get_version_num(),
            7,
            "a fresh UUIDv7"
        );
    }

    let generated = app.get("/livez").await;
    let id = generated.headers()["x-request-id"].to_str().unwrap();
    assert_eq!(Uuid::parse_str(id).unwrap().get_version_num(), 7);
}

#[sqlx::test]
async fn metrics_are_on_the_admin_listener_only_and_labelled_by_route_template(db: PgPool) {
    let app = TestApp::spawn(db).await;
    app.get("/livez").await;
    app.get("/no/such/path/12345").await;

    let public = app.get("/metrics").await;
    assert_eq!(
        public.status(),
        StatusCode::NOT_FOUND,
        "metrics are not public"
    );

    let scrape = app
        .client
        .get(format!("{}/metrics", app.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(scrape.status(), StatusCode::OK);
    let text = scrape.text().await.unwrap();
    assert!(
        text.contains("# HELP http_server_request_duration_seconds"),
        "described"
    );
    assert!(text.contains(r#"http_server_request_duration_seconds_bucket{method="GET",route="/livez",status="200",le="0.005"}"#), "{text}");
    assert!(
        text.contains(r#"route="unmatched",status="404""#),
        "unknown paths share one label: {text}"
    );
    assert!(!text.contains("12345"), "raw paths never become labels");

    app.client
        .request(
            reqwest::Method::from_bytes(b"FOO1").unwrap(),
            format!("{}/livez", app.api),
        )
        .send()
        .await
        .unwrap();
    let text = app
        .client
        .get(format!("{}/metrics", app.admin))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains("FOO1"),
        "invented methods never become labels"
    );
    assert!(text.contains(r#"method="_OTHER""#));
}

#[sqlx::test]
async fn every_response_carries_the_security_headers(db: PgPool) {
    let app = TestApp::spawn(db).await;
    for path in ["/livez", "/no/such/path", "/openapi.json", "/docs/errors"] {
        let response = app.get(path).await;
        let headers = response.headers();
        assert_eq!(headers["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(headers["x-frame-options"], "DENY", "{path}");
        assert_eq!(headers["referrer-policy"], "no-referrer", "{path}");
        assert!(headers.contains_key("content-security-policy"), "{path}");
        assert_eq!(headers["cache-control"], "no-store", "{path}");
    }
}
