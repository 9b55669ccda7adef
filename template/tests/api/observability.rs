//! Request ids, metrics on the admin listener, security headers (O2, O3, S4, S7).

use std::collections::HashSet;

use reqwest::StatusCode;
use service::users::Role;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::{TestApp, test_config};

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
    assert!(
        !text.contains("/no/such/path/12345"),
        "raw paths never become labels"
    );

    app.client
        .request(
            reqwest::Method::from_bytes(b"FOO1").unwrap(),
            format!("{}/livez", app.api),
        )
        .send()
        .await
        .unwrap();
    let text = app.metrics().await;
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

/// The metric names a PromQL expression selects: identifiers with an underscore, outside quoted
/// label values, minus functions.
/// The PromQL functions with an underscore in their name that the rules use.
const PROMQL_FUNCTIONS: [&str; 2] = ["histogram_quantile", "clamp_min"];

fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in expr.chars().chain([' ']) {
        if c == '"' {
            quoted = !quoted;
        }
        if !quoted && (c.is_ascii_alphanumeric() || c == '_') {
            current.push(c);
            continue;
        }
        if current.contains('_')
            && current.starts_with(|c: char| c.is_ascii_lowercase())
            && !PROMQL_FUNCTIONS.contains(&current.as_str())
        {
            names.push(current.clone());
        }
        current.clear();
    }
    names
}

#[sqlx::test]
async fn every_metric_the_alerts_and_dashboard_query_is_exported(db: PgPool) {
    // Redis that never answers, so the fallback counter moves too.
    let config = test_config(&[
        ("RATE_LIMIT_PER_MINUTE", "3"),
        ("REDIS_URL", "redis://127.0.0.1:1"),
        ("REDIS_TIMEOUT_MS", "50"),
    ]);
    // The job queue's tables: its gauges are read from them at scrape time.
    let app = TestApp::spawn_with(crate::harness::with_job_queue(db).await, config).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let create = |body: serde_json::Value| {
        app.call(reqwest::Method::POST, "/v1/orders", &token)
            .header("idempotency-key", "metrics")
            .json(&body)
            .send()
    };
    create(serde_json::json!({"currency": "x", "items": []}))
        .await
        .unwrap();
    create(crate::orders::order_body()).await.unwrap();
    create(crate::orders::order_body()).await.unwrap();
    assert_eq!(
        create(crate::orders::order_body()).await.unwrap().status(),
        StatusCode::TOO_MANY_REQUESTS
    );

    let scrape = app.metrics().await;
    let described: HashSet<&str> = scrape
        .lines()
        .filter_map(|line| line.strip_prefix("# HELP ")?.split(' ').next())
        .collect();
    let exported = |name: &str| {
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        described.contains(name) || described.contains(family)
    };

    let manifest = env!("CARGO_MANIFEST_DIR");
    let rules =
        std::fs::read_to_string(format!("{manifest}/deploy/prometheus/alerts.yml")).unwrap();
    let mut queried = Vec::new();
    let mut in_expr = false;
    for line in rules.lines() {
        let trimmed = line.trim_start();
        if let Some(expr) = trimmed.strip_prefix("expr:") {
            in_expr = true;
            queried.extend(metric_names(expr));
        } else if in_expr && !trimmed.contains(':') {
            queried.extend(metric_names(trimmed));
        } else {
            in_expr = false;
        }
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{manifest}/deploy/grafana/dashboard.json")).unwrap(),
    )
    .unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queried.extend(metric_names(target["expr"].as_str().unwrap()));
        }
    }
    assert!(queried.len() > 10, "the queries were read: {queried:?}");
    for name in &queried {
        assert!(
            exported(name),
            "{name} is queried but not exported; exported: {described:?}"
        );
    }
}
