//! Several instances behave as one (D3): two `serve` and two `worker` processes, one Postgres and
//! one Redis. A rate limit holds across both APIs, one idempotency key sent to both at once has
//! one effect, a cursor minted by one works on the other, and each import job runs once.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::process::Child;
use uuid::Uuid;

use crate::cli::{create_customer, login, serve, terminate};
use crate::harness::{client, get_json_at, with_job_queue};
use crate::imports::{PATIENT_HEARTBEATS, csv, import_jobs, start_worker};

/// Starts one `serve` process with `vars`; its logs are drained so it never blocks on them.
async fn instance(db: &PgPool, vars: &[(&str, &str)]) -> (Child, String) {
    let served = serve(db, vars).await;
    let mut logs = served.logs;
    tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });
    (served.child, served.api)
}

#[sqlx::test]
async fn two_api_and_two_worker_processes_behave_as_one_service(db: PgPool) {
    let db = with_job_queue(db).await;
    let redis = std::env::var("REDIS_URL").expect("REDIS_URL must point at the suite's Redis");
    let prefix = format!("instances-{}", Uuid::now_v7());
    let vars = [
        ("REDIS_URL", redis.as_str()),
        ("RATE_LIMIT_REDIS_PREFIX", prefix.as_str()),
        // A busy machine's Redis may take longer than the production 200 ms; a timeout would
        // decide from this process's own buckets and split the shared count.
        ("REDIS_TIMEOUT_MS", "2000"),
        ("RATE_LIMIT_PER_MINUTE", "40"),
        ("RATE_LIMIT_WRITES_PER_MINUTE", "1000"),
        ("IMPORT_MAX_ACTIVE_PER_USER", "10"),
    ];
    let (api_a, a) = instance(&db, &vars).await;
    let (api_b, b) = instance(&db, &vars).await;
    let workers = [
        start_worker(&db, &PATIENT_HEARTBEATS).await,
        start_worker(&db, &PATIENT_HEARTBEATS).await,
    ];
    let http = client();
    create_customer(&db, "both@example.com").await;
    let token = login(&a, "both@example.com").await;

    // One idempotency key, sent to both instances at once, ten times: one order.
    let sends = (0..10).map(|n| {
        let base = if n % 2 == 0 { &a } else { &b };
        http.post(format!("{base}/v1/orders"))
            .bearer_auth(&token)
            .header("idempotency-key", "one-effect")
            .json(&json!({"currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 100}]}))
            .send()
    });
    let answers = futures::future::join_all(sends).await;
    let mut ids = Vec::new();
    for answer in answers {
        let answer = answer.unwrap();
        match answer.status() {
            StatusCode::CREATED => ids.push(answer.json::<Value>().await.unwrap()["id"].clone()),
            StatusCode::CONFLICT => {} // in flight on the other instance: retry later
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        !ids.is_empty() && ids.iter().all(|id| *id == ids[0]),
        "{ids:?}"
    );
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(orders, 1);

    // A second order, then a cursor minted by A is honoured by B.
    let newest = http
        .post(format!("{b}/v1/orders"))
        .bearer_auth(&token)
        .header("idempotency-key", "second")
        .json(&json!({"currency": "EUR", "items": [{"sku": "B", "quantity": 1, "unit_price_cents": 100}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(newest.status(), StatusCode::CREATED);
    let newest = newest.json::<Value>().await.unwrap()["id"].clone();
    let first = get_json_at(&a, "/v1/orders?limit=1", &token).await;
    assert_eq!(first["data"][0]["id"], newest, "newest first");
    let cursor = first["next_cursor"].as_str().expect("a next page");
    let second = http
        .get(format!("{b}/v1/orders?limit=1&cursor={cursor}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::OK);
    let second: Value = second.json().await.unwrap();
    assert_eq!(
        second["data"][0]["id"], ids[0],
        "the page after it, from the other instance"
    );

    // Imports uploaded to either instance are each run once, by either worker.
    let mut imports = Vec::new();
    for (n, base) in [&a, &b, &a, &b].into_iter().enumerate() {
        let body = csv(50, 2).replace("PO-", &format!("I{n}-"));
        let accepted: Value = http
            .post(format!("{base}/v1/imports"))
            .bearer_auth(&token)
            .header("idempotency-key", format!("import-{n}"))
            .header("content-type", "text/csv")
            .body(body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        imports.push(accepted["id"].as_str().unwrap().to_owned());
    }
    // Polled in the database: this principal's rate limit is kept for the requests above.
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &imports {
        let id: Uuid = id.parse().unwrap();
        loop {
            let (status, imported): (String, i32) =
                sqlx::query_as("SELECT status, imported_orders FROM imports WHERE id = $1")
                    .bind(id)
                    .fetch_one(&db)
                    .await
                    .unwrap();
            if status == "succeeded" {
                assert_eq!(imported, 50);
                break;
            }
            assert!(Instant::now() < deadline, "{status}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(import_jobs(&db).await, (4, 1), "each job ran once");

    // One rate limit across both instances, for a fresh principal: 40 a minute in all.
    create_customer(&db, "limited@example.com").await;
    let limited = login(&b, "limited@example.com").await;
    let mut statuses = Vec::new();
    let started = Instant::now();
    for n in 0..60 {
        let base = if n % 2 == 0 { &a } else { &b };
        let answer = http
            .get(format!("{base}/v1/orders"))
            .bearer_auth(&limited)
            .send()
            .await
            .unwrap();
        statuses.push(answer.status());
    }
    let granted = statuses
        .iter()
        .filter(|status| **status == StatusCode::OK)
        .count();
    // The bucket gains a request back every 1.5 s: on a slow machine the loop itself earns some.
    // (Past half a minute the bound no longer bites; the 429s still show one shared bucket, as
    // two per-instance buckets of 40 would grant all 60.)
    let refilled = (started.elapsed().as_secs_f64() / 1.5) as usize;
    assert!(
        statuses.contains(&StatusCode::TOO_MANY_REQUESTS) && granted <= 41 + refilled,
        "40 a minute in all, not per instance: {granted} granted, {refilled} refilled"
    );

    for child in [&api_a, &api_b].into_iter().chain(workers.iter()) {
        terminate(child);
    }
}
