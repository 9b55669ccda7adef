//! CSV imports (J1–J3, R4): the request path, the worker, crash safety with a real worker process
//! killed by SIGKILL, and webhook notifications to a real local receiver.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::StatusCode;
use axum::routing::post;
use reqwest::Method;
use serde_json::Value;
use service::users::Role;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::cli::{next_log_line, terminate};
use crate::harness::{
    TEST_SECRET_KEY, TestApp, command, sample, serve, test_config, url_of, with_job_queue,
};

const HEADER: &str = "external_ref,currency,sku,quantity,unit_price_cents,note\n";

/// `orders` orders of `lines` rows each, all valid, each order's rows together.
pub(crate) fn csv(orders: usize, lines: usize) -> String {
    csv_from(0, orders, lines)
}

/// Like [`csv`], numbering the orders from `first`.
fn csv_from(first: usize, orders: usize, lines: usize) -> String {
    let mut csv = String::from(HEADER);
    for order in first..first + orders {
        for line in 0..lines {
            csv.push_str(&format!(
                "PO-{order:07},EUR,SKU-{line},{},{},\n",
                line + 1,
                100 + order % 50
            ));
        }
    }
    csv
}

/// `orders` orders of 1 to 7 rows, where every 97th order has a bad row and every 89th a row
/// that names no order after it, as rows of each order `together` or dealt out round robin (each
/// order's rows stay in their order).
fn mixed_csv(orders: usize, together: bool) -> String {
    let rows: Vec<Vec<String>> = (0..orders)
        .map(|order| {
            let mut rows: Vec<String> = (0..1 + order % 7)
                .map(|line| {
                    let quantity = if order % 97 == 3 && line == 0 {
                        0
                    } else {
                        line + 1
                    };
                    let note = if line == 1 {
                        format!("note {order}")
                    } else {
                        String::new()
                    };
                    format!(
                        "PO-{order:07},EUR,SKU-{line},{quantity},{},{note}",
                        100 + order % 50
                    )
                })
                .collect();
            if order % 89 == 5 {
                rows.push(",EUR,SKU-X,1,1,".into());
            }
            rows
        })
        .collect();
    let lines: Vec<&String> = if together {
        rows.iter().flatten().collect()
    } else {
        (0..8)
            .flat_map(|line| rows.iter().filter_map(move |order| order.get(line)))
            .collect()
    };
    let mut csv = String::from(HEADER);
    for line in lines {
        csv.push_str(line);
        csv.push('\n');
    }
    csv
}

pub(crate) async fn upload(
    app: &TestApp,
    token: &str,
    body: impl Into<reqwest::Body>,
    key: &str,
) -> reqwest::Response {
    app.call(Method::POST, "/v1/imports", token)
        .header("content-type", "text/csv")
        .header("idempotency-key", key)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn import_of(app: &TestApp, token: &str, id: &str) -> Value {
    app.get_json(&format!("/v1/imports/{id}"), token).await
}

/// Polls the import until it is finished.
pub(crate) async fn finished(app: &TestApp, token: &str, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let response = app
            .call(Method::GET, &format!("/v1/imports/{id}"), token)
            .send()
            .await
            .unwrap();
        let polling = response.headers().contains_key("retry-after");
        let import: Value = response.json().await.unwrap();
        let status = import["status"].as_str().unwrap().to_owned();
        if !matches!(status.as_str(), "queued" | "running") {
            assert!(!polling, "no Retry-After once finished");
            return import;
        }
        assert!(polling, "Retry-After while {status}");
        assert!(
            Instant::now() < deadline,
            "the import finishes in time: {import}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How many import jobs there are, and the most attempts any of them took.
pub(crate) async fn import_jobs(db: &PgPool) -> (i64, i32) {
    sqlx::query_as("SELECT count(*), max(attempts) FROM apalis.jobs WHERE job_type = 'imports'")
        .fetch_one(db)
        .await
        .unwrap()
}

/// An order as (external_ref, currency, note, total, [(sku, quantity, unit price)]).
type OrderLines = (String, String, Option<String>, i64, Vec<(String, i64, i64)>);

/// Every order of `owner` with its items, for comparing two imports. Also checks that no item
/// lacks its order (no foreign key does: the code writes items only with their order).
async fn orders_of(db: &PgPool, owner: uuid::Uuid) -> Vec<OrderLines> {
    let orphans: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM order_items i WHERE NOT EXISTS (SELECT 1 FROM orders o WHERE o.id = i.order_id)",
    )
    .fetch_one(db)
    .await
    .unwrap();
    assert_eq!(orphans, 0, "items without their order");
    type Row = (
        String,
        String,
        Option<String>,
        i64,
        Option<String>,
        Option<i64>,
        Option<i64>,
    );
    let rows = sqlx::query_as::<_, Row>(
        "SELECT o.external_ref, o.currency, o.note, o.total_cents, i.sku, i.quantity, i.unit_price_cents
         FROM orders o LEFT JOIN order_items i ON i.order_id = o.id
         WHERE o.owner_id = $1 ORDER BY o.external_ref, i.position",
    )
    .bind(owner)
    .fetch_all(db)
    .await
    .unwrap();
    let mut orders: Vec<OrderLines> = Vec::new();
    for (external_ref, currency, note, total, sku, quantity, price) in rows {
        if orders.last().is_none_or(|last| last.0 != external_ref) {
            orders.push((external_ref, currency, note, total, Vec::new()));
        }
        if let (Some(sku), Some(quantity), Some(price)) = (sku, quantity, price) {
            orders.last_mut().unwrap().4.push((sku, quantity, price));
        }
    }
    orders
}

/// Every row error of an import, as (row, field, code), in the order they are served.
async fn errors_of(app: &TestApp, token: &str, id: &str) -> Vec<(i64, String, String)> {
    let mut errors = Vec::new();
    let mut path = format!("/v1/imports/{id}/errors?limit=100");
    loop {
        let page = app.get_json(&path, token).await;
        for e in page["data"].as_array().unwrap() {
            errors.push((
                e["row"].as_i64().unwrap(),
                e["field"].as_str().unwrap().to_owned(),
                e["code"].as_str().unwrap().to_owned(),
            ));
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/imports/{id}/errors?limit=100&cursor={cursor}"),
            None => return errors,
        }
    }
}

/// Polling an import's progress is many requests: a limit that polling never reaches.
fn import_config(extra: &[(&str, &str)]) -> service::config::Config {
    let mut vars = vec![("RATE_LIMIT_PER_MINUTE", "100000")];
    vars.extend_from_slice(extra);
    test_config(&vars)
}

fn with_workers(extra: &[(&str, &str)]) -> service::config::Config {
    let mut vars = vec![("SERVE_RUNS_WORKERS", "true"), ("JOB_RETRY_BASE_MS", "50")];
    vars.extend_from_slice(extra);
    import_config(&vars)
}

#[sqlx::test]
async fn an_upload_is_accepted_at_once_and_a_worker_turns_it_into_orders(db: PgPool) {
    let app = TestApp::spawn_with(with_job_queue(db.clone()).await, with_workers(&[])).await;
    let (user, token) = app.token_for(Role::Customer).await;
    let before = app.metrics().await;
    // Two valid orders; PO-3 has a bad quantity on its second row, PO-4 mixes currencies, PO-5
    // has a row with a missing column.
    let body = format!(
        "{HEADER}PO-1,EUR,BOOK-1,2,1250,gift wrap\nPO-2,EUR,PEN-7,10,199,\nPO-1,EUR,PEN-7,1,199,\n\
         PO-3,EUR,A,1,100,\nPO-3,EUR,B,0,100,\nPO-4,EUR,A,1,100,\nPO-4,USD,B,1,100,\n\
         PO-5,EUR,A,1,100,\nPO-5,EUR,B,1\n"
    );
    let response = upload(&app, &token, body, "import-1").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let accepted: Value = response.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/imports/{}", accepted["id"].as_str().unwrap())
    );
    assert_eq!(accepted["status"], "queued");
    assert_eq!(accepted["total_rows"], 9);

    let id = accepted["id"].as_str().unwrap();
    let done = finished(&app, &token, id).await;
    assert_eq!(done["status"], "completed_with_errors", "{done}");
    assert_eq!(done["processed_rows"], 9);
    assert_eq!(done["imported_orders"], 2);
    assert_eq!(done["rejected_orders"], 3);
    assert_eq!(
        done["failed_rows"], 3,
        "the bad rows, not their valid siblings"
    );
    // Workers wake on NOTIFY rather than apalis's default 30 s poll: the job starts at once (the
    // bound is loose on purpose; it only tells a notification from a poll).
    let started =
        |field: &str| chrono::DateTime::parse_from_rfc3339(done[field].as_str().unwrap()).unwrap();
    assert!(
        started("started_at") - started("created_at") < chrono::TimeDelta::seconds(10),
        "{done}"
    );
    assert!(done["finished_at"].is_string());

    let errors: Value = app
        .get_json(&format!("/v1/imports/{id}/errors"), &token)
        .await;
    let errors: Vec<(i64, &str, &str)> = errors["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["row"].as_i64().unwrap(),
                e["field"].as_str().unwrap(),
                e["code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        [
            (5, "quantity", "range"),
            (7, "currency", "currency_mismatch"),
            (9, "row", "field_count")
        ]
    );

    let orders = orders_of(&db, user.id).await;
    assert_eq!(
        orders,
        [
            (
                "PO-1".into(),
                "EUR".into(),
                Some("gift wrap".into()),
                2699,
                vec![("BOOK-1".into(), 2, 1250), ("PEN-7".into(), 1, 199)]
            ),
            (
                "PO-2".into(),
                "EUR".into(),
                None,
                1990,
                vec![("PEN-7".into(), 10, 199)]
            ),
        ]
    );

    // The same rows again, under a new key: a new import, and no new orders.
    let again = upload(
        &app,
        &token,
        csv(0, 0) + "PO-1,EUR,BOOK-1,2,1250,gift wrap\nPO-1,EUR,PEN-7,1,199,\n",
        "import-2",
    )
    .await;
    assert_eq!(again.status(), StatusCode::ACCEPTED);
    let again: Value = again.json().await.unwrap();
    let again = finished(&app, &token, again["id"].as_str().unwrap()).await;
    assert_eq!(
        (again["status"].as_str(), again["imported_orders"].as_i64()),
        (Some("succeeded"), Some(1))
    );
    assert_eq!(orders_of(&db, user.id).await, orders, "no duplicates");

    // Staged rows and the stored file are gone once the imports are finished.
    let leftovers: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM import_rows) + (SELECT count(*) FROM import_files)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(leftovers, 0);

    // The recorder is the process's, shared with the tests running beside this one: their jobs
    // may count too, so each counter grew by at least this test's own.
    let after = app.metrics().await;
    let grew = |series: &str| sample(&after, series) - sample(&before, series);
    assert!(
        grew("jobs_succeeded_total{queue=\"imports\"}") >= 2.0,
        "{after}"
    );
    assert!(
        grew("import_orders_total{outcome=\"imported\"}") >= 3.0,
        "{after}"
    );
    assert!(
        grew("import_orders_total{outcome=\"rejected\"}") >= 3.0,
        "{after}"
    );
    assert!(
        after.contains("job_queue_depth{queue=\"imports\"} 0\n"),
        "{after}"
    );
    app.stopped().await.unwrap();
}

#[sqlx::test]
async fn bad_uploads_are_refused_in_the_request(db: PgPool) {
    let config = import_config(&[("IMPORT_MAX_BYTES", "4096"), ("IMPORT_MAX_ROWS", "50")]);
    let app = TestApp::spawn_with(with_job_queue(db.clone()).await, config).await;
    let (_, token) = app.token_for(Role::Customer).await;

    let problem = |response: reqwest::Response| async move {
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        (status, body["code"].as_str().unwrap_or_default().to_owned())
    };
    let wrong_header = upload(
        &app,
        &token,
        "currency,external_ref,sku,quantity,unit_price_cents\n",
        "k1",
    )
    .await;
    assert_eq!(
        problem(wrong_header).await,
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_csv_header".into()
        )
    );
    let empty = upload(&app, &token, "", "k2").await;
    assert_eq!(
        problem(empty).await,
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_csv_header".into()
        )
    );
    let too_many_rows = upload(&app, &token, csv(51, 1), "k3").await;
    assert_eq!(
        problem(too_many_rows).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large".into())
    );
    let too_big = upload(&app, &token, format!("{HEADER}{}", "x".repeat(5000)), "k4").await;
    assert_eq!(
        problem(too_big).await,
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large".into())
    );
    // Streamed without a length, the cap still holds.
    let chunks = futures::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b'a'; 1000])));
    let streamed = upload(&app, &token, reqwest::Body::wrap_stream(chunks), "k5").await;
    assert_eq!(problem(streamed).await.0, StatusCode::PAYLOAD_TOO_LARGE);
    let json = app
        .call(Method::POST, "/v1/imports", &token)
        .header("idempotency-key", "k6")
        .json(&serde_json::json!({"csv": "no"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        problem(json).await,
        (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type".into()
        )
    );
    let no_key = app
        .call(Method::POST, "/v1/imports", &token)
        .header("content-type", "text/csv")
        .body(csv(1, 1))
        .send()
        .await
        .unwrap();
    assert_eq!(
        problem(no_key).await,
        (StatusCode::BAD_REQUEST, "idempotency_key_required".into())
    );

    let nothing: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM imports) + (SELECT count(*) FROM import_files)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(nothing, 0, "a refused upload leaves nothing behind");
}

#[sqlx::test]
async fn a_stored_upload_is_compressed_with_lz4(db: PgPool) {
    // No workers: the file stays stored.
    let app = TestApp::spawn_with(with_job_queue(db.clone()).await, import_config(&[])).await;
    let (_, token) = app.token_for(Role::Customer).await;
    // 500 rows, about 14 kB: Postgres leaves values under about 2 kB uncompressed.
    let response = upload(&app, &token, csv(100, 5), "large").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let methods: Vec<Option<String>> =
        sqlx::query_scalar("SELECT pg_column_compression(data) FROM import_files")
            .fetch_all(&db)
            .await
            .unwrap();
    assert_eq!(
        methods,
        [Some("lz4".to_owned())],
        "pglz, Postgres' default, took most of a large upload's time"
    );
}

#[sqlx::test]
async fn a_retried_upload_replays_and_the_cap_on_active_imports_holds(db: PgPool) {
    // No workers: imports stay queued.
    let app = TestApp::spawn_with(
        with_job_queue(db.clone()).await,
        import_config(&[("IMPORT_MAX_ACTIVE_PER_USER", "2")]),
    )
    .await;
    let (_, token) = app.token_for(Role::Customer).await;
    let first = upload(&app, &token, csv(2, 2), "same").await;
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    let replay = upload(&app, &token, csv(2, 2), "same").await;
    assert_eq!(replay.status(), StatusCode::ACCEPTED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let replay: Value = replay.json().await.unwrap();
    assert_eq!(replay["id"], first["id"]);
    let reused = upload(&app, &token, csv(3, 2), "same").await;
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);

    assert_eq!(
        upload(&app, &token, csv(1, 1), "second").await.status(),
        StatusCode::ACCEPTED
    );
    let third = upload(&app, &token, csv(1, 1), "third").await;
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(third.headers().contains_key("retry-after"));
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["code"], "too_many_imports");
    // With no worker running, the two queued jobs show as queue depth (the queue-lag alert's input).
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("job_queue_depth{queue=\"imports\"} 2"),
        "{metrics}"
    );

    let (imports, files): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM imports), (SELECT count(DISTINCT import_id) FROM import_files)",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert_eq!(
        (imports, files),
        (2, 2),
        "replays and refusals keep no second copy of the file"
    );

    // Another customer sees neither the imports nor their errors.
    let (_, other) = app.token_for(Role::Customer).await;
    let id = first["id"].as_str().unwrap();
    for path in [
        format!("/v1/imports/{id}"),
        format!("/v1/imports/{id}/errors"),
    ] {
        let response = app.call(Method::GET, &path, &other).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }
    let list: Value = app.get_json("/v1/imports", &other).await;
    assert_eq!(list["data"].as_array().unwrap().len(), 0);
    let mine: Value = app.get_json("/v1/imports?limit=1", &token).await;
    assert_eq!(mine["data"].as_array().unwrap().len(), 1);
    assert!(mine["next_cursor"].is_string());
}

#[sqlx::test]
async fn row_errors_are_served_in_pages(db: PgPool) {
    let app = TestApp::spawn_with(with_job_queue(db.clone()).await, with_workers(&[])).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let mut body = String::from(HEADER);
    for row in 0..25 {
        body.push_str(&format!(
            "PO-{row},EUR,A,{},100,\n",
            if row % 2 == 0 { "0" } else { "1" }
        ));
    }
    let accepted: Value = upload(&app, &token, body, "errors")
        .await
        .json()
        .await
        .unwrap();
    let id = accepted["id"].as_str().unwrap();
    let done = finished(&app, &token, id).await;
    assert_eq!(
        (
            done["failed_rows"].as_i64(),
            done["imported_orders"].as_i64()
        ),
        (Some(13), Some(12))
    );

    let mut rows = Vec::new();
    let mut path = format!("/v1/imports/{id}/errors?limit=5");
    loop {
        let page: Value = app.get_json(&path, &token).await;
        rows.extend(
            page["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["row"].as_i64().unwrap()),
        );
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/imports/{id}/errors?limit=5&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(
        rows,
        (0..25).step_by(2).map(|row| row + 1).collect::<Vec<i64>>()
    );
    app.stopped().await.unwrap();
}

/// Heartbeats for tests that count how often a job ran. The default test worker (1 s, two
/// missed) lets the kill tests see a dead worker's job taken over quickly; a live worker starved
/// of CPU for two seconds on a busy machine would be taken for dead too, and its job run twice.
pub(crate) const PATIENT_HEARTBEATS: [(&str, &str); 2] =
    [("JOB_HEARTBEAT_SECS", "5"), ("JOB_MISSED_HEARTBEATS", "6")];

/// A real `worker` process against the test's database, with fast heartbeats so that the jobs of
/// a killed worker are taken over within seconds.
pub(crate) async fn start_worker(db: &PgPool, extra: &[(&str, &str)]) -> tokio::process::Child {
    start_worker_counting(db, extra, "\u{0}").await.0
}

/// [`start_worker`], also counting the worker's log lines that contain `marker`. `extra` comes
/// last, so it may override any variable (`DATABASE_URL` for a server of the test's own).
pub(crate) async fn start_worker_counting(
    db: &PgPool,
    extra: &[(&str, &str)],
    marker: &'static str,
) -> (tokio::process::Child, Arc<AtomicUsize>) {
    let url = url_of(db);
    let mut vars = vec![
        ("DATABASE_URL", url.as_str()),
        ("SECRET_KEY", TEST_SECRET_KEY),
        ("ADMIN_ADDR", "127.0.0.1:0"),
        ("JOB_HEARTBEAT_SECS", "1"),
        ("JOB_MISSED_HEARTBEATS", "2"),
        ("RUST_LOG", "info"),
    ];
    vars.extend_from_slice(extra);
    let mut child = command(&["worker"], &vars)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut logs = BufReader::new(child.stdout.take().unwrap()).lines();
    next_log_line(&mut logs, |line| line["message"] == "job workers started").await;
    // Keep draining the logs so the worker never blocks on a full pipe; show its warnings and
    // errors, which explain a failing test.
    let seen = Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = logs.next_line().await {
            if line.contains("\"WARN\"") || line.contains("\"ERROR\"") {
                eprintln!("worker: {line}");
            }
            if line.contains(marker) {
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    (child, seen)
}

/// Polls until `ready` holds for the import, or it finishes.
async fn wait_for(app: &TestApp, token: &str, id: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let import = import_of(app, token, id).await;
        if ready(&import) || !matches!(import["status"].as_str(), Some("queued" | "running")) {
            return import;
        }
        assert!(Instant::now() < deadline, "timed out: {import}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Kills a real worker process with SIGKILL twice while it imports `file` (once `first_kill`
/// holds, then once `second_kill` holds, given the progress seen at the first), lets a third
/// worker finish, and compares everything with an uninterrupted import of the same file.
/// Returns the finished import and its row errors, as served.
async fn killed_twice_and_compared(
    db: &PgPool,
    file: String,
    first_kill: impl Fn(&Value) -> bool,
    second_kill: impl Fn(&Value, &Value) -> bool,
) -> (Value, Vec<(i64, String, String)>) {
    let app = TestApp::spawn_with(with_job_queue(db.clone()).await, import_config(&[])).await;
    let total = i64::try_from(file.lines().count() - 1).unwrap();
    let (user, token) = app.token_for(Role::Customer).await;
    let mut worker = start_worker(db, &[]).await;
    let accepted: Value = upload(&app, &token, file.clone(), "killed")
        .await
        .json()
        .await
        .unwrap();
    let id = accepted["id"].as_str().unwrap();
    wait_for(&app, &token, id, &first_kill).await;
    worker.kill().await.unwrap();
    // Where the killed worker left it (it went on while the test looked).
    let first = import_of(&app, &token, id).await;
    assert!(
        first["processed_rows"].as_i64().unwrap() < total,
        "killed mid-way: {first}"
    );

    // Only the next worker can make the progress this waits for: it ran the job again.
    let mut worker = start_worker(db, &[]).await;
    wait_for(&app, &token, id, |i| second_kill(&first, i)).await;
    worker.kill().await.unwrap();
    let second = import_of(&app, &token, id).await;
    assert_eq!(second["status"], "running", "killed mid-way: {second}");

    let worker = start_worker(db, &[]).await;
    let done = finished(&app, &token, id).await;
    // The job is acknowledged (and its attempts counted) just after the import finishes.
    let deadline = Instant::now() + Duration::from_secs(10);
    let attempts = loop {
        let (status, attempts): (String, i32) =
            sqlx::query_as("SELECT status, attempts FROM apalis.jobs WHERE job_type = 'imports'")
                .fetch_one(db)
                .await
                .unwrap();
        if status == "Done" || Instant::now() > deadline {
            break attempts;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(attempts >= 3, "the job ran three times: {attempts}");
    let errors = same_as_an_uninterrupted_import(&app, db, file, user.id, &token, &done).await;
    terminate(&worker);
    (done, errors)
}

/// Imports `file` again, for another user and without interruption (a worker must be running),
/// and checks that `done`, `user`'s import of it, has the same counters, row errors (each
/// recorded once) and orders. Returns `done`'s row errors, as served.
async fn same_as_an_uninterrupted_import(
    app: &TestApp,
    db: &PgPool,
    file: String,
    user: uuid::Uuid,
    token: &str,
    done: &Value,
) -> Vec<(i64, String, String)> {
    let (reference_user, reference_token) = app.token_for(Role::Customer).await;
    let accepted: Value = upload(app, &reference_token, file, "reference")
        .await
        .json()
        .await
        .unwrap();
    let reference_id = accepted["id"].as_str().unwrap();
    let reference = finished(app, &reference_token, reference_id).await;
    assert_eq!(reference["status"], "completed_with_errors", "{reference}");
    for counter in [
        "status",
        "total_rows",
        "processed_rows",
        "imported_orders",
        "rejected_orders",
        "failed_rows",
    ] {
        assert_eq!(
            done[counter], reference[counter],
            "{counter}: {done} vs {reference}"
        );
    }
    let errors = errors_of(app, token, done["id"].as_str().unwrap()).await;
    assert_eq!(
        errors,
        errors_of(app, &reference_token, reference_id).await,
        "each row error recorded once"
    );
    assert_eq!(
        orders_of(db, user).await,
        orders_of(db, reference_user.id).await
    );
    errors
}

/// When to kill a worker first: once it has committed a batch.
fn some_rows_committed(import: &Value) -> bool {
    import["processed_rows"].as_i64().is_some_and(|n| n > 0)
}

/// When to kill the next worker: once it has committed more than the first had.
fn more_rows_committed(first: &Value, import: &Value) -> bool {
    import["processed_rows"].as_i64() > first["processed_rows"].as_i64()
}

/// Whether the worker took the file's rows as they came (`true`) or staged and sorted them.
async fn rows_together(db: &PgPool, import: &Value) -> bool {
    sqlx::query_scalar("SELECT rows_together FROM imports WHERE id = $1::uuid")
        .bind(import["id"].as_str().unwrap())
        .fetch_one(db)
        .await
        .unwrap()
}

#[sqlx::test]
async fn a_worker_killed_mid_import_loses_and_duplicates_nothing(db: PgPool) {
    // Each order's rows together: orders are written as the file is read. Orders of 1 to 7 rows,
    // some rejected, rows that name no order: a checkpoint that split an order, or counted a
    // row twice, would show. Killed once the first batch is in, then again after the next
    // worker has written more.
    let (done, _) = killed_twice_and_compared(
        &db,
        mixed_csv(20_000, true),
        some_rows_committed,
        more_rows_committed,
    )
    .await;
    assert!(rows_together(&db, &done).await);
}

#[sqlx::test]
async fn a_worker_killed_mid_staging_and_mid_grouping_loses_and_duplicates_nothing(db: PgPool) {
    // Each order's rows scattered over the file: staged, then grouped. Killed while rows are
    // staged, then once the next worker has created orders from them.
    let (done, _) = killed_twice_and_compared(
        &db,
        mixed_csv(20_000, false),
        some_rows_committed,
        |first, i| i["imported_orders"].as_i64() > first["imported_orders"].as_i64(),
    )
    .await;
    assert!(!rows_together(&db, &done).await);
}

/// Row errors per transaction on the direct way: `BATCH_ERRORS` in src/imports/pipeline.rs.
const BATCH_ERRORS: usize = 5_000;

/// One data row of a generated file, and the one error it must get as (field, code), if any.
type Line = (String, Option<(&'static str, &'static str)>);

/// `blocks` times: an order that is created (2 rows), an order of 20 rows of which 13 are bad in
/// each way a row or an order can be (rejected), and 40 rows that name no order; 53 of 62 rows
/// bad. Grouped: each order's rows, and each row that names no order on its own.
fn mostly_bad_rows(blocks: usize) -> Vec<Vec<Line>> {
    let mut groups = Vec::new();
    for block in 0..blocks {
        let (good, bad, price) = (2 * block, 2 * block + 1, 100 + block % 50);
        groups.push(vec![
            (format!("PO-{good:06},EUR,SKU-0,1,{price},"), None),
            (
                format!("PO-{good:06},EUR,SKU-1,2,{price},note {good}"),
                None,
            ),
        ]);
        groups.push(
            (0..20)
                .map(|line| {
                    let row =
                        |quantity: &str| format!("PO-{bad:06},EUR,SKU-{line},{quantity},{price},");
                    match line {
                        4 => (
                            format!("PO-{bad:06},USD,SKU-{line},1,{price},"),
                            Some(("currency", "currency_mismatch")),
                        ),
                        8 => (row("x"), Some(("quantity", "type"))),
                        12 => (
                            format!("PO-{bad:06},EUR,SKU-{line},1"),
                            Some(("row", "field_count")),
                        ),
                        line if line % 2 == 1 => (row("0"), Some(("quantity", "range"))),
                        _ => (row("1"), None),
                    }
                })
                .collect(),
        );
        for line in 0..40 {
            groups.push(vec![if line % 2 == 0 {
                (
                    ",EUR,SKU-X,1,1,".to_owned(),
                    Some(("external_ref", "length")),
                )
            } else {
                (",EUR".to_owned(), Some(("row", "field_count")))
            }]);
        }
    }
    groups
}

/// The file of `groups`, each group's rows together or dealt out round robin (each order's rows
/// stay in their order), and the errors it must get as the errors endpoint serves them: (row,
/// field, code), by row, each once.
fn laid_out(groups: &[Vec<Line>], together: bool) -> (String, Vec<(i64, String, String)>) {
    let lines: Vec<&Line> = if together {
        groups.iter().flatten().collect()
    } else {
        let longest = groups.iter().map(Vec::len).max().unwrap_or_default();
        (0..longest)
            .flat_map(|line| groups.iter().filter_map(move |group| group.get(line)))
            .collect()
    };
    let mut file = String::from(HEADER);
    let mut errors = Vec::new();
    for (row, (text, error)) in (1..).zip(lines) {
        file.push_str(text);
        file.push('\n');
        if let Some((field, code)) = error {
            errors.push((row, (*field).to_owned(), (*code).to_owned()));
        }
    }
    (file, errors)
}

/// Checks a finished import of [`mostly_bad_rows`]`(blocks)` against what the file holds: its
/// counters, every row error served once, and its orders.
async fn imported_every_row_once(
    db: &PgPool,
    blocks: usize,
    done: &Value,
    errors: &[(i64, String, String)],
    expected: &[(i64, String, String)],
) {
    let block = |n: usize| i64::try_from(n * blocks).unwrap();
    let counters = [
        "total_rows",
        "processed_rows",
        "failed_rows",
        "imported_orders",
        "rejected_orders",
    ]
    .map(|counter| done[counter].as_i64().unwrap());
    assert_eq!(
        counters,
        [block(62), block(62), block(53), block(1), block(1)],
        "{done}"
    );
    assert_eq!(done["status"], "completed_with_errors");
    // Tens of thousands of errors: say where they differ rather than print them all.
    let first_difference = errors.iter().zip(expected).position(|(a, b)| a != b);
    assert!(
        errors.len() == expected.len() && first_difference.is_none(),
        "{} errors served, {} expected; first difference at {first_difference:?}: {:?} vs {:?}",
        errors.len(),
        expected.len(),
        first_difference.map(|i| &errors[i]),
        first_difference.map(|i| &expected[i]),
    );
    let owner: uuid::Uuid = sqlx::query_scalar("SELECT owner_id FROM imports WHERE id = $1::uuid")
        .bind(done["id"].as_str().unwrap())
        .fetch_one(db)
        .await
        .unwrap();
    let expected_orders: Vec<OrderLines> = (0..blocks)
        .map(|block| {
            let (good, price) = (2 * block, i64::try_from(100 + block % 50).unwrap());
            (
                format!("PO-{good:06}"),
                "EUR".to_owned(),
                Some(format!("note {good}")),
                3 * price,
                vec![
                    ("SKU-0".to_owned(), 1, price),
                    ("SKU-1".to_owned(), 2, price),
                ],
            )
        })
        .collect();
    assert!(
        orders_of(db, owner).await == expected_orders,
        "the orders of the valid rows, no more"
    );
}

/// Imports `mostly_bad_rows` laid out `together` or scattered, killing the worker twice, and
/// checks the result against an uninterrupted import and against the file itself.
async fn mostly_bad_rows_killed_twice(db: &PgPool, together: bool) -> Value {
    let blocks = 600;
    let (file, expected) = laid_out(&mostly_bad_rows(blocks), together);
    let (done, errors) =
        killed_twice_and_compared(db, file, some_rows_committed, more_rows_committed).await;
    assert_eq!(rows_together(db, &done).await, together);
    imported_every_row_once(db, blocks, &done, &errors, &expected).await;
    done
}

#[sqlx::test]
async fn more_row_errors_than_a_batch_holds_are_each_recorded_once_when_rows_are_together(
    db: PgPool,
) {
    // Guards against: a file that is mostly bad rows (a wrong export) losing or doubling row
    // errors where a batch closes on its error count, or a crash there doing so; and against such
    // a file being held in one transaction, in memory, with no progress committed. 37 200 rows,
    // 31 800 of them bad, in only 1 200 orders (fewer than a batch of orders): only the error
    // count closes batches. Killed once the first batch is in, then again after more.
    let done = mostly_bad_rows_killed_twice(&db, true).await;
    // Each committed batch held about BATCH_ERRORS errors at most (what bounds the worker's
    // memory): it closes at the end of the order (at most 20 rows here) during which its errors
    // reached the limit. The rows one transaction wrote share their `xmin`.
    let per_batch: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM import_errors WHERE import_id = $1::uuid GROUP BY xmin::text",
    )
    .bind(done["id"].as_str().unwrap())
    .fetch_all(&db)
    .await
    .unwrap();
    let largest = per_batch.iter().max().copied().unwrap_or_default();
    assert!(
        largest <= i64::try_from(BATCH_ERRORS + 20).unwrap(),
        "errors per committed batch: {per_batch:?}"
    );
}

#[sqlx::test]
async fn more_row_errors_than_a_batch_holds_are_each_recorded_once_when_rows_are_staged(
    db: PgPool,
) {
    // Guards against: the same file with each order's rows scattered, staged 5 000 rows per
    // transaction with their errors, losing or doubling errors at a staging batch's edge or
    // across a crash there. Killed twice while staging.
    mostly_bad_rows_killed_twice(&db, false).await;
}

#[sqlx::test]
async fn two_runs_of_one_import_at_once_import_it_once(db: PgPool) {
    // As when a worker presumed dead was only slow: a second job for the same import, and two
    // workers that pick up both at once. Every commit checks the checkpoint under the import's
    // row lock, so the run that falls behind stops (`Superseded`) and nothing is written twice.
    let app = TestApp::spawn_with(with_job_queue(db.clone()).await, import_config(&[])).await;
    let (user, token) = app.token_for(Role::Customer).await;
    let file = mixed_csv(20_000, true);
    let accepted: Value = upload(&app, &token, file.clone(), "twice")
        .await
        .json()
        .await
        .unwrap();
    let id = accepted["id"].as_str().unwrap();
    let job = service::imports::job::ImportJob {
        import_id: id.parse().unwrap(),
        request_id: None,
    };
    let mut conn = db.acquire().await.unwrap();
    service::jobs::enqueue(&mut conn, service::imports::job::QUEUE, &job, 3)
        .await
        .unwrap();
    drop(conn);
    let marker = "another run of this import is ahead";
    let (first, superseded_first) = start_worker_counting(&db, &[], marker).await;
    let (second, superseded_second) = start_worker_counting(&db, &[], marker).await;
    let done = finished(&app, &token, id).await;
    same_as_an_uninterrupted_import(&app, &db, file, user.id, &token, &done).await;
    let superseded =
        superseded_first.load(Ordering::SeqCst) + superseded_second.load(Ordering::SeqCst);
    // At least once (more if a slow machine made a worker miss its heartbeats, and its job ran
    // a third time).
    assert!(superseded >= 1, "a run stopped behind the other");
    terminate(&first);
    terminate(&second);
}

#[sqlx::test]
async fn a_run_of_an_import_that_was_given_up_stops_adding_to_it(db: PgPool) {
    // As when the job ran out of attempts while a worker presumed dead was only slow: the import
    // is marked failed under the running worker, which must not commit another batch into it.
    let app = TestApp::spawn_with(with_job_queue(db.clone()).await, import_config(&[])).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let marker = "another run of this import is ahead";
    let (worker, superseded) = start_worker_counting(&db, &[], marker).await;
    let accepted: Value = upload(&app, &token, mixed_csv(20_000, true), "given-up")
        .await
        .json()
        .await
        .unwrap();
    let id = accepted["id"].as_str().unwrap();
    wait_for(&app, &token, id, |i| {
        i["processed_rows"].as_i64().is_some_and(|n| n > 0)
    })
    .await;
    let given_up_at: i32 = sqlx::query_scalar(
        "UPDATE imports SET status = 'failed', finished_at = now() WHERE id = $1::uuid
         RETURNING processed_rows",
    )
    .bind(id)
    .fetch_one(&db)
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while superseded.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the run never stopped");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let import = import_of(&app, &token, id).await;
    assert_eq!(import["status"], "failed", "{import}");
    assert_eq!(import["processed_rows"], given_up_at, "{import}");
    terminate(&worker);
}

#[sqlx::test]
async fn the_order_of_the_rows_in_the_file_does_not_change_what_is_imported(db: PgPool) {
    let app = TestApp::spawn_with(with_job_queue(db.clone()).await, with_workers(&[])).await;
    // Valid orders, and orders broken in every way an order can be: a bad field (PO-005), two
    // currencies (PO-003), too many items (PO-007), a short row (PO-009), a bad first row in
    // another currency (PO-011: the currency is the first *valid* row's), and a row that names
    // no order. Odd orders have no note on their first row: the order's note is the first one.
    let mut groups: Vec<Vec<String>> = (0..30)
        .map(|order| {
            let lines = if order == 7 { 102 } else { 1 + order % 4 };
            (0..lines)
                .map(|line| {
                    let note = if order % 2 == 1 && line == 0 {
                        String::new()
                    } else {
                        format!("n{order}-{line}")
                    };
                    match (order, line) {
                        (9, 0) => format!("PO-{order:03},EUR,A,1"),
                        (3, 1) => format!("PO-{order:03},USD,SKU-{line},1,100,{note}"),
                        (5, 0) => format!("PO-{order:03},EUR,SKU-{line},0,100,{note}"),
                        (11, 0) => format!("PO-{order:03},USD,SKU-{line},0,100,{note}"),
                        _ => format!("PO-{order:03},EUR,SKU-{line},{},100,{note}", line + 1),
                    }
                })
                .collect()
        })
        .collect();
    groups.insert(12, vec![",EUR,A,1,1,".to_owned()]);
    // Each row with its place (group, line), to compare errors across the two files.
    let together: Vec<(usize, usize, &String)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, rows)| rows.iter().enumerate().map(move |(l, row)| (g, l, row)))
        .collect();
    // Round robin over the orders: each order's rows stay in their order, far apart.
    let scattered: Vec<(usize, usize, &String)> = (0..102)
        .flat_map(|l| {
            let groups = &groups;
            (0..groups.len()).filter_map(move |g| groups[g].get(l).map(|row| (g, l, row)))
        })
        .collect();
    let mut results = Vec::new();
    for (file, is_together) in [(together, true), (scattered, false)] {
        let body: String = std::iter::once(HEADER.to_owned())
            .chain(file.iter().map(|(_, _, row)| format!("{row}\n")))
            .collect();
        let (user, token) = app.token_for(Role::Customer).await;
        let accepted: Value = upload(&app, &token, body, "order-of-rows")
            .await
            .json()
            .await
            .unwrap();
        let id = accepted["id"].as_str().unwrap();
        let done = finished(&app, &token, id).await;
        assert_eq!(rows_together(&db, &done).await, is_together);
        let mut errors: Vec<((usize, usize), String, String)> = errors_of(&app, &token, id)
            .await
            .into_iter()
            .map(|(row, field, code)| {
                let (g, l, _) = file[usize::try_from(row).unwrap() - 1];
                ((g, l), field, code)
            })
            .collect();
        errors.sort();
        let counters: Vec<_> = ["imported_orders", "rejected_orders", "failed_rows"]
            .iter()
            .map(|c| done[c].as_i64().unwrap())
            .collect();
        results.push((counters, errors, orders_of(&db, user.id).await));
    }
    assert_eq!(results[0].0, [25, 5, 7], "{:?}", results[0].1);
    let first = &results[0].2[0];
    assert_eq!(
        (first.0.as_str(), first.2.as_deref()),
        ("PO-000", Some("n0-0"))
    );
    let second = &results[0].2[1];
    assert_eq!(
        (second.0.as_str(), second.2.as_deref()),
        ("PO-001", Some("n1-1"))
    );
    assert_eq!(results[0], results[1]);
    app.stopped().await.unwrap();
}

/// A partner endpoint that fails twice, then hangs past the timeout once, then answers 200.
#[sqlx::test]
async fn notifications_survive_a_failing_and_hanging_receiver(db: PgPool) {
    let calls = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(std::sync::Mutex::new(Vec::<(Value, Option<String>)>::new()));
    let receiver = Router::new().route(
        "/hook",
        post({
            let (calls, received) = (calls.clone(), received.clone());
            move |headers: axum::http::HeaderMap, body: axum::Json<Value>| async move {
                match calls.fetch_add(1, Ordering::SeqCst) {
                    0 | 1 => StatusCode::INTERNAL_SERVER_ERROR,
                    2 => {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        StatusCode::OK
                    }
                    _ => {
                        let request_id = headers
                            .get("x-request-id")
                            .and_then(|value| value.to_str().ok())
                            .map(str::to_owned);
                        received.lock().unwrap().push((body.0, request_id));
                        StatusCode::NO_CONTENT
                    }
                }
            }
        }),
    );
    let base = serve(receiver).await;
    let url = format!("{base}/hook");
    let config = with_workers(&[
        ("IMPORT_WEBHOOK_URL", &url),
        ("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true"),
        ("OUTBOUND_HTTP_TIMEOUT_MS", "300"),
        ("WEBHOOK_BREAKER_FAILURES", "3"),
        ("WEBHOOK_BREAKER_COOLDOWN_SECS", "1"),
    ]);
    let app = TestApp::spawn_with(with_job_queue(db.clone()).await, config).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let accepted: Value = app
        .call(Method::POST, "/v1/imports", &token)
        .header("idempotency-key", "notify")
        .header("content-type", "text/csv")
        .header("x-request-id", "upload-that-notifies")
        .body(csv(2, 1))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = accepted["id"].as_str().unwrap();
    finished(&app, &token, id).await;

    let deadline = Instant::now() + Duration::from_secs(30);
    while received.lock().unwrap().is_empty() {
        assert!(
            Instant::now() < deadline,
            "delivered after {} calls",
            calls.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (event, request_id) = received.lock().unwrap()[0].clone();
    assert_eq!(
        request_id.as_deref(),
        Some("upload-that-notifies"),
        "the partner can quote the request that started the import"
    );
    assert_eq!(event["type"], "import.finished");
    assert_eq!(event["id"], format!("import-{id}"));
    assert_eq!(event["data"]["status"], "succeeded");
    assert_eq!(event["data"]["imported_orders"], 2);

    let metrics = app.metrics().await;
    let count = |outcome: &str| {
        metrics
            .lines()
            .find(|line| {
                line.starts_with(&format!(
                    "webhook_deliveries_total{{outcome=\"{outcome}\"}}"
                ))
            })
            .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(count("failed") >= 3.0, "two 500s and a timeout\n{metrics}");
    assert!(
        count("short_circuited") >= 1.0,
        "the open circuit refused calls\n{metrics}"
    );
    assert_eq!(count("delivered"), 1.0);
    app.stopped().await.unwrap();
}

#[sqlx::test]
async fn several_workers_share_one_queue_and_run_each_job_once(db: PgPool) {
    let config = import_config(&[("IMPORT_MAX_ACTIVE_PER_USER", "50")]);
    let app = TestApp::spawn_with(with_job_queue(db.clone()).await, config).await;
    let settings = [
        ("WORKER_CONCURRENCY", "2"),
        PATIENT_HEARTBEATS[0],
        PATIENT_HEARTBEATS[1],
    ];
    let workers = [
        start_worker(&db, &settings).await,
        start_worker(&db, &settings).await,
        start_worker(&db, &settings).await,
    ];
    let (user, token) = app.token_for(Role::Customer).await;
    let mut ids = Vec::new();
    for batch in 0..9 {
        let body = csv_from(batch * 100, 100, 3);
        let accepted: Value = upload(&app, &token, body, &format!("batch-{batch}"))
            .await
            .json()
            .await
            .unwrap();
        ids.push(accepted["id"].as_str().unwrap().to_owned());
    }
    for id in &ids {
        let done = finished(&app, &token, id).await;
        assert_eq!(
            (done["status"].as_str(), done["imported_orders"].as_i64()),
            (Some("succeeded"), Some(100))
        );
    }
    assert_eq!(import_jobs(&db).await, (9, 1), "each job ran exactly once");
    assert_eq!(orders_of(&db, user.id).await.len(), 900);
    for worker in &workers {
        terminate(worker);
    }
}

#[sqlx::test]
async fn sigterm_releases_a_running_import_and_the_next_worker_finishes_it(db: PgPool) {
    let app = TestApp::spawn_with(with_job_queue(db.clone()).await, import_config(&[])).await;
    let (user, token) = app.token_for(Role::Customer).await;
    let mut worker = start_worker(&db, &[]).await;
    // Rejected orders and row errors too: a batch written but not committed when the worker
    // stops must be rolled back, or its errors would be recorded twice.
    let file = mixed_csv(20_000, true);
    let accepted: Value = upload(&app, &token, file.clone(), "released")
        .await
        .json()
        .await
        .unwrap();
    let id = accepted["id"].as_str().unwrap();
    let running = wait_for(&app, &token, id, |i| {
        i["processed_rows"].as_i64().is_some_and(|n| n > 0)
    })
    .await;
    assert_eq!(running["status"], "running", "{running}");

    terminate(&worker);
    let status = tokio::time::timeout(Duration::from_secs(20), worker.wait())
        .await
        .expect("the worker stops within the grace period")
        .unwrap();
    assert!(status.success(), "{status:?}");
    let released = import_of(&app, &token, id).await;
    assert_eq!(
        released["status"], "running",
        "stopped at a checkpoint, not finished: {released}"
    );
    // Handed on as a fresh job: the shutdown used up none of the import's attempts.
    let queued: Vec<(String, i32)> = sqlx::query_as(
        "SELECT status, attempts FROM apalis.jobs WHERE job_type = 'imports' ORDER BY run_at, id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    assert_eq!(queued.len(), 2, "{queued:?}");
    assert_eq!(
        (queued[1].0.as_str(), queued[1].1),
        ("Pending", 0),
        "{queued:?}"
    );

    let worker = start_worker(&db, &[]).await;
    let done = finished(&app, &token, id).await;
    same_as_an_uninterrupted_import(&app, &db, file, user.id, &token, &done).await;
    terminate(&worker);
}

#[sqlx::test]
async fn the_kill_switch_turns_imports_off_and_nothing_else(db: PgPool) {
    let config = import_config(&[("DISABLED_FEATURES", "imports")]);
    let app = TestApp::spawn_with(with_job_queue(db).await, config).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let refused = upload(&app, &token, csv(1, 1), "off").await;
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "service_unavailable");
    let list = app
        .call(Method::GET, "/v1/imports", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(list.status(), StatusCode::SERVICE_UNAVAILABLE);
    let orders = app
        .call(Method::GET, "/v1/orders", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(orders.status(), StatusCode::OK);
}

#[sqlx::test]
async fn a_stored_file_that_lost_rows_fails_the_import_instead_of_importing_part(db: PgPool) {
    let app = TestApp::spawn_with(with_job_queue(db.clone()).await, import_config(&[])).await;
    let (_, token) = app.token_for(Role::Customer).await;
    // More orders than one batch writes, so that writing any before the count is checked would
    // show.
    let file = csv(3_000, 1);
    let accepted: Value = upload(&app, &token, file.clone(), "truncated")
        .await
        .json()
        .await
        .unwrap();
    let id: uuid::Uuid = accepted["id"].as_str().unwrap().parse().unwrap();
    // The stored copy now holds 2 500 rows of the 3 000 the upload counted.
    let truncated: String = file
        .lines()
        .take(2_501)
        .flat_map(|line| [line, "\n"])
        .collect();
    sqlx::query("UPDATE import_files SET data = convert_to($2, 'UTF8') WHERE import_id = $1")
        .bind(id)
        .bind(truncated)
        .execute(&db)
        .await
        .unwrap();
    let worker = start_worker(&db, &[("JOB_MAX_ATTEMPTS", "1")]).await;
    let done = finished(&app, &token, &id.to_string()).await;
    assert_eq!(done["status"], "failed", "{done}");
    let orders: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(orders, 0, "nothing of the partial file was imported");
    terminate(&worker);
}

/// A body that arrives in `chunks` pieces, `pause` apart, as a slow client sends it.
fn slow_body(chunks: usize, pause: Duration) -> reqwest::Body {
    let mut lines = csv(chunks, 1).into_bytes();
    let header_end = HEADER.len();
    let mut pieces = vec![lines.drain(..header_end).collect::<Vec<u8>>()];
    pieces.extend(
        lines
            .chunks(lines.len().div_ceil(chunks).max(1))
            .map(<[u8]>::to_vec),
    );
    let stream = futures::stream::unfold(pieces.into_iter(), move |mut pieces| async move {
        let piece = pieces.next()?;
        tokio::time::sleep(pause).await;
        Some((Ok::<_, std::io::Error>(piece), pieces))
    });
    reqwest::Body::wrap_stream(stream)
}

#[sqlx::test]
async fn an_upload_gets_its_own_timeout_not_the_request_timeout(db: PgPool) {
    let db = with_job_queue(db).await;
    let patient = import_config(&[
        ("REQUEST_TIMEOUT_SECS", "1"),
        ("IMPORT_UPLOAD_TIMEOUT_SECS", "30"),
    ]);
    let app = TestApp::spawn_with(db.clone(), patient).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let slow = upload(
        &app,
        &token,
        slow_body(4, Duration::from_millis(400)),
        "slow",
    )
    .await;
    assert_eq!(
        slow.status(),
        StatusCode::ACCEPTED,
        "2 s of upload under a 1 s request timeout"
    );

    let strict = import_config(&[("IMPORT_UPLOAD_TIMEOUT_SECS", "1")]);
    let app = TestApp::spawn_with(db, strict).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let too_slow = upload(
        &app,
        &token,
        slow_body(4, Duration::from_millis(400)),
        "too-slow",
    )
    .await;
    assert_eq!(too_slow.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = too_slow.json().await.unwrap();
    assert_eq!(body["code"], "timeout");
}

/// A one-process deployment (`SERVE_RUNS_WORKERS=true`) runs the worker's cleanups too: here the
/// one that finds an import without a job, at start-up.
#[sqlx::test]
async fn serve_with_workers_runs_the_cleanups_too(db: PgPool) {
    let db = with_job_queue(db).await;
    let without_workers = TestApp::spawn_with(db.clone(), import_config(&[])).await;
    let (_, token) = without_workers.token_for(Role::Customer).await;
    let accepted: Value = upload(&without_workers, &token, csv(3, 1), "lost")
        .await
        .json()
        .await
        .unwrap();
    let id = accepted["id"].as_str().unwrap();
    sqlx::query("DELETE FROM apalis.jobs")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE imports SET created_at = now() - interval '1 hour'")
        .execute(&db)
        .await
        .unwrap();

    let with_workers = TestApp::spawn_with(db.clone(), with_workers(&[])).await;
    let done = finished(&with_workers, &token, id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    with_workers.stopped().await.unwrap();
}

#[sqlx::test]
async fn an_import_that_lost_its_job_gets_a_new_one_from_the_cleanup(db: PgPool) {
    let db = with_job_queue(db).await;
    let config = import_config(&[]);
    let app = TestApp::spawn_with(db.clone(), config.clone()).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let accepted: Value = upload(&app, &token, csv(3, 1), "lost")
        .await
        .json()
        .await
        .unwrap();
    let id: uuid::Uuid = accepted["id"].as_str().unwrap().parse().unwrap();
    // Its job is gone, and it has been queued for longer than a commit can take.
    sqlx::query("DELETE FROM apalis.jobs")
        .execute(&db)
        .await
        .unwrap();
    sqlx::query("UPDATE imports SET created_at = now() - interval '1 hour' WHERE id = $1")
        .bind(id)
        .execute(&db)
        .await
        .unwrap();
    service::imports::job::requeue_lost(&db, &config)
        .await
        .unwrap();
    assert_eq!(import_jobs(&db).await.0, 1, "a fresh job");
    // Once it has one, the cleanup leaves it alone.
    service::imports::job::requeue_lost(&db, &config)
        .await
        .unwrap();
    assert_eq!(import_jobs(&db).await.0, 1);

    let worker = start_worker(&db, &[]).await;
    let done = finished(&app, &token, &id.to_string()).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    terminate(&worker);
}

#[sqlx::test(migrations = false)]
async fn the_fast_path_migration_keeps_imports_begun_on_the_staged_way_on_it(db: PgPool) {
    // Guards against: a deploy that adds the fast path while an older worker (which only stages)
    // is half-way through an import. Its next run must go on staging and grouping: written
    // straight from the file past `processed_rows`, it would skip the rows already staged and
    // never make their orders. The migration marks such imports `rows_together = false`, and
    // leaves every other import's null: one not begun yet is read and decided by the new worker;
    // a finished one is never run again.
    const FAST_PATH: i64 = 20261202000001;
    let migrator = &service::db::MIGRATOR;
    assert!(migrator.version_exists(FAST_PATH), "the migration is there");
    // The schema the older worker ran on: every migration before this one.
    migrator.run_to(FAST_PATH - 1, &db).await.unwrap();
    let has_column: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                        WHERE table_name = 'imports' AND column_name = 'rows_together')",
    )
    .fetch_one(&db)
    .await
    .unwrap();
    assert!(!has_column, "not migrated past the fast path yet");

    let owner = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO users (id, email, password_hash, role) VALUES ($1, $2, 'unused', 'customer')",
    )
    .bind(owner)
    .bind(format!("{owner}@example.com"))
    .execute(&db)
    .await
    .unwrap();
    // (status, processed_rows, failed_rows, staged, grouped_through) and rows_together after the
    // migration.
    type Case = (
        &'static str,
        i32,
        i32,
        bool,
        Option<&'static str>,
        Option<bool>,
    );
    let cases: [Case; 8] = [
        // In progress on the staged way: must go on that way.
        ("running", 5_000, 312, false, None, Some(false)), // mid-staging
        ("running", 12_000, 700, true, None, Some(false)), // staged, nothing grouped yet
        (
            "running",
            12_000,
            700,
            true,
            Some("PO-0001999"),
            Some(false),
        ), // mid-grouping
        ("queued", 5_000, 312, false, None, Some(false)),  // progress, then queued again
        // Not begun: the new worker reads the file and picks the way.
        ("queued", 0, 0, false, None, None),
        ("running", 0, 0, false, None, None), // started, nothing committed
        // Finished: never run again.
        (
            "completed_with_errors",
            12_000,
            700,
            true,
            Some("PO-0002399"),
            None,
        ),
        ("failed", 5_000, 312, false, None, None),
    ];
    let mut ids = Vec::new();
    for (status, processed, failed, staged, grouped, _) in cases {
        let id = uuid::Uuid::now_v7();
        sqlx::query(
            "INSERT INTO imports (id, owner_id, status, size_bytes, total_rows, processed_rows,
                                  failed_rows, staged, grouped_through, started_at, finished_at)
             VALUES ($1, $2, $3, 400000, 12000, $4, $5, $6, $7,
                     CASE WHEN $4 > 0 OR $3 <> 'queued' THEN now() END,
                     CASE WHEN $3 IN ('completed_with_errors', 'failed') THEN now() END)",
        )
        .bind(id)
        .bind(owner)
        .bind(status)
        .bind(processed)
        .bind(failed)
        .bind(staged)
        .bind(grouped)
        .execute(&db)
        .await
        .unwrap();
        ids.push(id);
    }

    migrator.run_to(FAST_PATH, &db).await.unwrap();
    for ((status, processed, _, staged, grouped, expected), id) in cases.iter().zip(&ids) {
        let together: Option<bool> =
            sqlx::query_scalar("SELECT rows_together FROM imports WHERE id = $1")
                .bind(id)
                .fetch_one(&db)
                .await
                .unwrap();
        assert_eq!(
            together, *expected,
            "{status}, processed_rows {processed}, staged {staged}, grouped_through {grouped:?}"
        );
    }
}

#[sqlx::test]
async fn a_poll_answers_304_until_the_import_moves(db: PgPool) {
    // Clients poll an import until it finishes, and most polls find nothing new: those cost a
    // 304 with no body.
    let db = with_job_queue(db).await;
    let app = TestApp::spawn_with(db.clone(), import_config(&[])).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let response = upload(&app, &token, csv(3, 2), "poll").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let queued_tag = response.headers()["etag"].to_str().unwrap().to_owned();
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let poll = |tag: &str| {
        app.call(Method::GET, &format!("/v1/imports/{id}"), &token)
            .header("if-none-match", tag)
            .send()
    };
    let unchanged = poll(&queued_tag).await.unwrap();
    assert_eq!(unchanged.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(unchanged.headers()["etag"], queued_tag.as_str());
    assert!(
        unchanged.headers().contains_key("retry-after"),
        "still queued: poll again"
    );

    let worker = start_worker(&db, &[]).await;
    let done = finished(&app, &token, &id).await;
    terminate(&worker);
    let moved = poll(&queued_tag).await.unwrap();
    assert_eq!(moved.status(), StatusCode::OK);
    let done_tag = moved.headers()["etag"].to_str().unwrap().to_owned();
    assert_ne!(done_tag, queued_tag);
    assert!(!moved.headers().contains_key("retry-after"));
    assert_eq!(moved.json::<Value>().await.unwrap(), done);
    assert_eq!(
        poll(&done_tag).await.unwrap().status(),
        StatusCode::NOT_MODIFIED
    );
}
