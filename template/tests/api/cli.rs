//! The binary itself, run as a separate process: configuration errors (D1), `migrate` (D2),
//! `create-user` (S3, S6), structured request logs (O1), and SIGTERM handling (R5).

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdout};

use crate::harness::{TEST_SECRET_KEY, client, command, url_of};

const PASSWORD: &str = "correct horse battery staple";

#[tokio::test]
async fn bad_configuration_exits_non_zero_naming_each_variable() {
    let output = command(
        &["serve"],
        &[("API_ADDR", "not-an-address"), ("MAX_BODY_BYTES", "-1")],
    )
    .output()
    .await
    .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for variable in ["API_ADDR", "MAX_BODY_BYTES", "DATABASE_URL"] {
        assert!(stderr.contains(variable), "{variable} named in: {stderr}");
    }
}

#[sqlx::test(migrations = false)]
async fn migrate_creates_the_schema_and_is_idempotent(db: PgPool) {
    let url = url_of(&db);
    for _ in 0..2 {
        let output = command(
            &["migrate"],
            &[("DATABASE_URL", &url), ("SECRET_KEY", TEST_SECRET_KEY)],
        )
        .output()
        .await
        .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let users: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(users, 0);
}

async fn create_user(
    url: &str,
    email: &str,
    password_env: Option<&str>,
    stdin: &str,
) -> std::process::Output {
    let mut vars = vec![("DATABASE_URL", url), ("SECRET_KEY", TEST_SECRET_KEY)];
    if let Some(password) = password_env {
        vars.push(("CREATE_USER_PASSWORD", password));
    }
    let mut child = command(&["create-user", "--email", email, "--role", "admin"], &vars)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    child.wait_with_output().await.unwrap()
}

#[sqlx::test]
async fn create_user_reads_the_password_from_stdin_and_stores_only_an_argon2id_hash(db: PgPool) {
    let url = url_of(&db);
    let output = create_user(&url, "Ann@Example.com", None, &format!("{PASSWORD}\n")).await;
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let logs = String::from_utf8_lossy(&output.stdout);
    assert!(!logs.contains(PASSWORD), "the password is never logged");

    let (email, hash, role): (String, String, String) =
        sqlx::query_as("SELECT email, password_hash, role FROM users")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(email, "ann@example.com");
    assert_eq!(role, "admin");
    assert!(hash.starts_with("$argon2id$v=19$"), "{hash}");
    assert!(!hash.contains(PASSWORD));

    let duplicate = create_user(&url, "ann@example.com", Some(PASSWORD), "").await;
    assert!(!duplicate.status.success());
    assert!(String::from_utf8_lossy(&duplicate.stderr).contains("already exists"));

    let weak = create_user(&url, "bob@example.com", Some("short"), "").await;
    assert!(!weak.status.success());
    assert!(String::from_utf8_lossy(&weak.stderr).contains("password"));

    let from_env = create_user(&url, "carol@example.com", Some(PASSWORD), "").await;
    assert!(
        from_env.status.success(),
        "{}",
        String::from_utf8_lossy(&from_env.stderr)
    );
}

/// Reads JSON log lines until one satisfies `wanted`, within `limit`.
pub(crate) async fn next_log_line(
    lines: &mut tokio::io::Lines<BufReader<ChildStdout>>,
    wanted: impl Fn(&Value) -> bool,
) -> Value {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let line = lines
                .next_line()
                .await
                .unwrap()
                .expect("the process is still logging");
            let Ok(entry) = serde_json::from_str::<Value>(&line) else {
                panic!("not a JSON log line: {line}")
            };
            if wanted(&entry) {
                return entry;
            }
        }
    })
    .await
    .expect("the log line appears in time")
}

pub(crate) fn terminate(child: &Child) {
    let pid = child.id().expect("running").to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// The real binary serving on loopback port 0, with its log lines.
pub(crate) struct Served {
    pub(crate) child: Child,
    pub(crate) api: String,
    pub(crate) logs: tokio::io::Lines<BufReader<ChildStdout>>,
}

/// Runs `serve` against the test's database; `vars` add to or override the defaults.
pub(crate) async fn serve(db: &PgPool, vars: &[(&str, &str)]) -> Served {
    let url = url_of(db);
    let mut all = vec![
        ("DATABASE_URL", url.as_str()),
        ("API_ADDR", "127.0.0.1:0"),
        ("ADMIN_ADDR", "127.0.0.1:0"),
        ("SHUTDOWN_READINESS_DELAY_SECS", "0"),
        ("SECRET_KEY", TEST_SECRET_KEY),
    ];
    all.retain(|(name, _)| !vars.iter().any(|(other, _)| other == name));
    all.extend_from_slice(vars);
    let mut child = command(&["serve"], &all)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut logs = BufReader::new(child.stdout.take().unwrap()).lines();
    let listening = next_log_line(&mut logs, |line| line["message"] == "listening").await;
    let api = format!("http://{}", listening["api_addr"].as_str().unwrap());
    Served { child, api, logs }
}

pub(crate) async fn create_customer(db: &PgPool, email: &str) {
    let email = service::users::Email::parse(email).unwrap();
    let password = service::auth::password::Password::parse(PASSWORD.to_owned()).unwrap();
    service::users::create(db, &email, service::users::Role::Customer, password)
        .await
        .unwrap();
}

/// Logs in over HTTP, as a client would.
pub(crate) async fn login(api: &str, email: &str) -> String {
    let body: Value = client()
        .post(format!("{api}/v1/auth/token"))
        .json(&serde_json::json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    body["access_token"].as_str().unwrap().to_owned()
}

#[sqlx::test]
async fn serve_logs_one_json_line_per_request_and_stops_cleanly_on_sigterm(db: PgPool) {
    // The readiness delay is long enough for the test to read the shutdown line and ask
    // `/readyz` before the listener closes, on a busy machine too; it waits for the exit anyway.
    let Served {
        mut child,
        api,
        mut logs,
    } = serve(&db, &[("SHUTDOWN_READINESS_DELAY_SECS", "5")]).await;
    let client = client();

    let response = client
        .get(format!("{api}/no/such/route"))
        .header("x-request-id", "log-test-1")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let line = next_log_line(&mut logs, |line| line["message"] == "request").await;
    assert_eq!(line["span"]["request_id"], "log-test-1");
    assert_eq!(
        line["span"]["trace_id"], "0af7651916cd43dd8448eb211c80319c",
        "the caller's trace, with no exporter configured"
    );
    assert_eq!(line["span"]["method"], "GET");
    assert_eq!(line["span"]["route"], "unmatched");
    assert_eq!(line["status"], 404);
    assert_eq!(line["error_code"], "not_found");
    assert!(line["latency_ms"].is_number());
    assert_eq!(line["level"], "WARN");

    terminate(&child);
    next_log_line(&mut logs, |line| {
        line["message"] == "shutdown requested: readiness now fails"
    })
    .await;
    let ready = client.get(format!("{api}/readyz")).send().await.unwrap();
    assert_eq!(
        ready.status(),
        503,
        "readiness fails while the listener still serves"
    );

    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[sqlx::test]
async fn the_worker_starts_and_stops_cleanly_on_sigterm(db: PgPool) {
    let db = crate::harness::with_job_queue(db).await;
    let url = url_of(&db);
    let mut child = command(
        &["worker"],
        &[
            ("DATABASE_URL", &url),
            ("SECRET_KEY", TEST_SECRET_KEY),
            ("ADMIN_ADDR", "127.0.0.1:0"),
        ],
    )
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let mut logs = BufReader::new(child.stdout.take().unwrap()).lines();
    next_log_line(&mut logs, |line| {
        line["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("worker started"))
    })
    .await;
    terminate(&child);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits in time")
        .unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn the_openapi_subcommand_prints_the_document_without_configuration() {
    let output = command(&["openapi"], &[]).output().await.unwrap();
    assert!(output.status.success());
    let printed: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        printed,
        serde_json::to_value(service::app::openapi_document()).unwrap()
    );
}

#[sqlx::test]
async fn passwords_and_tokens_never_reach_the_logs_even_at_debug_level(db: PgPool) {
    create_customer(&db, "secretive@example.com").await;
    let Served {
        mut child,
        api,
        mut logs,
    } = serve(&db, &[("RUST_LOG", "debug")]).await;
    let client = client();

    let token = login(&api, "secretive@example.com").await;
    let orders = client
        .get(format!("{api}/v1/orders"))
        .bearer_auth(&token)
        .header("cookie", "session=cookie-secret-value")
        .send()
        .await
        .unwrap();
    assert_eq!(orders.status(), 200);
    // A failed login with another password, and a forged token, must not be logged either.
    client
        .post(format!("{api}/v1/auth/token"))
        .json(&serde_json::json!({"email": "secretive@example.com", "password": "another secret 123"}))
        .send()
        .await
        .unwrap();
    client
        .get(format!("{api}/v1/orders"))
        .bearer_auth("forged.token.value")
        .send()
        .await
        .unwrap();

    terminate(&child);
    let mut everything = String::new();
    while let Ok(Some(line)) = logs.next_line().await {
        everything.push_str(&line);
        everything.push('\n');
    }
    child.wait().await.unwrap();
    // The authenticated read's line names its route template and its principal, by id.
    let user_id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM users WHERE email = 'secretive@example.com'")
            .fetch_one(&db)
            .await
            .unwrap();
    let read = everything
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| {
            line["message"] == "request"
                && line["status"] == 200
                && line["span"]["route"] == "/v1/orders"
        })
        .expect("the read's request line");
    assert_eq!(read["span"]["principal"], user_id.to_string());
    for secret in [
        PASSWORD,
        "another secret 123",
        &token,
        "forged.token.value",
        "cookie-secret-value",
    ] {
        assert!(
            !everything.contains(secret),
            "{secret:?} appeared in the logs"
        );
    }
}

#[sqlx::test]
async fn sigterm_under_load_drains_without_failing_a_request(db: PgPool) {
    create_customer(&db, "loaded@example.com").await;
    let Served {
        mut child,
        api,
        mut logs,
    } = serve(
        &db,
        &[
            ("SHUTDOWN_READINESS_DELAY_SECS", "5"),
            ("SHUTDOWN_GRACE_PERIOD_SECS", "10"),
            ("RATE_LIMIT_PER_MINUTE", "100000"),
        ],
    )
    .await;
    // Keep draining stdout so the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });
    let token = login(&api, "loaded@example.com").await;

    // Traffic stops when readiness fails, as a load balancer's would. The readiness delay (5 s,
    // the default) must exceed how long the balancer takes to notice, here a 100 ms poll that a
    // busy machine can slow down a lot.
    let routed = Arc::new(AtomicBool::new(true));
    let signalled = Arc::new(AtomicBool::new(false));
    let served_so_far = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let balancer = {
        let (routed, api) = (routed.clone(), api.clone());
        tokio::spawn(async move {
            let probe = client();
            while routed.load(Ordering::SeqCst) {
                if let Ok(response) = probe.get(format!("{api}/readyz")).send().await
                    && response.status() == 503
                {
                    routed.store(false, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (routed, signalled, served_so_far, api, token) = (
            routed.clone(),
            signalled.clone(),
            served_so_far.clone(),
            api.clone(),
            token.clone(),
        );
        clients.push(tokio::spawn(async move {
            let http = client();
            let (mut served, mut served_after_signal, mut failed) = (0, 0, Vec::new());
            while routed.load(Ordering::SeqCst) {
                match http
                    .get(format!("{api}/v1/orders"))
                    .bearer_auth(&token)
                    .send()
                    .await
                {
                    Ok(response) if response.status() == 200 => {
                        served += 1;
                        served_so_far.fetch_add(1, Ordering::SeqCst);
                        if signalled.load(Ordering::SeqCst) {
                            served_after_signal += 1;
                        }
                    }
                    Ok(response) => failed.push(response.status().to_string()),
                    Err(error) => failed.push(error.to_string()),
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (served, served_after_signal, failed)
        }));
    }

    // Signal once the load is really running, however slow the machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while served_so_far.load(Ordering::SeqCst) < 40 {
        assert!(
            std::time::Instant::now() < deadline,
            "the load did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    signalled.store(true, Ordering::SeqCst);
    terminate(&child);

    let (mut served, mut served_after_signal, mut failed) = (0, 0, Vec::new());
    for load in clients {
        let (ok, after, errors) = load.await.unwrap();
        served += ok;
        served_after_signal += after;
        failed.extend(errors);
    }
    balancer.await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits within the grace period")
        .unwrap();
    assert!(status.success(), "{status:?}");
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert!(served > 20, "the load ran: {served}");
    assert!(
        served_after_signal > 0,
        "requests kept being served between SIGTERM and the readiness failing"
    );
}

/// A stand-in for an outside collector (Sentry's ingestion endpoint, an OTLP/HTTP collector):
/// records the raw body of every request posted to it. Returns its address (`127.0.0.1:port`).
async fn recording_endpoint() -> (String, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let store = received.clone();
    let router = axum::Router::new().fallback(move |body: axum::body::Bytes| {
        let store = store.clone();
        async move {
            store.lock().unwrap().push(body.to_vec());
            "{}"
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (addr.to_string(), received)
}

#[sqlx::test]
async fn internal_errors_are_logged_and_reach_sentry_under_the_request_id(db: PgPool) {
    let (addr, received) = recording_endpoint().await;
    let dsn = format!("http://public@{addr}/1");
    create_customer(&db, "reported@example.com").await;
    let Served {
        mut child,
        api,
        mut logs,
    } = serve(&db, &[("SENTRY_DSN", &dsn)]).await;
    let token = login(&api, "reported@example.com").await;

    // A bug in production: the schema no longer matches the code.
    sqlx::query("ALTER TABLE orders RENAME COLUMN note TO note_renamed")
        .execute(&db)
        .await
        .unwrap();
    let response = client()
        .get(format!("{api}/v1/orders"))
        .bearer_auth(&token)
        .header("x-request-id", "sentry-check-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 500);
    let body = response.text().await.unwrap();
    assert!(
        !body.contains("note"),
        "the client sees nothing internal: {body}"
    );
    // The cause goes to the log instead, under the request's id.
    let logged = next_log_line(&mut logs, |line| line["message"] == "request failed").await;
    assert_eq!(logged["span"]["request_id"], "sentry-check-1", "{logged}");
    assert!(
        logged["error"]
            .as_str()
            .is_some_and(|error| error.contains("note")),
        "the cause is logged: {logged}"
    );
    tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });

    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let event = loop {
        let found = received
            .lock()
            .unwrap()
            .iter()
            .map(|body| String::from_utf8_lossy(body).into_owned())
            .find(|envelope| envelope.contains("sentry-check-1"));
        if let Some(event) = found {
            break event;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no event reached the Sentry endpoint"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        event.contains(concat!(
            "\"",
            env!("CARGO_PKG_NAME"),
            "@",
            env!("CARGO_PKG_VERSION"),
            "\""
        )),
        "tagged with the release: {event}"
    );
    assert!(
        event.contains("note_renamed") || event.contains("note"),
        "the cause is in the event: {event}"
    );
    assert!(
        !event.contains(&token) && !event.contains(PASSWORD),
        "no secrets in the event"
    );
    terminate(&child);
    child.wait().await.unwrap();
}

#[sqlx::test]
async fn traces_continue_the_callers_traceparent_and_reach_the_collector(db: PgPool) {
    let (addr, received) = recording_endpoint().await;
    let endpoint = format!("http://{addr}");
    create_customer(&db, "traced@example.com").await;
    let Served {
        mut child,
        api,
        mut logs,
    } = serve(&db, &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)]).await;
    let token = login(&api, "traced@example.com").await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let missing = uuid::Uuid::now_v7();
    let response = client()
        .get(format!("{api}/v1/orders/{missing}"))
        .bearer_auth(&token)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(
        problem["trace_id"], trace_id,
        "the problem names the caller's trace"
    );
    let line = next_log_line(&mut logs, |line| {
        line["message"] == "request" && line["status"] == 404
    })
    .await;
    assert_eq!(
        line["span"]["trace_id"], trace_id,
        "and so does the log line"
    );

    // Shutting down flushes the batch of spans to the collector.
    terminate(&child);
    tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    let exported: Vec<u8> = received.lock().unwrap().concat();
    let contains = |needle: &[u8]| {
        exported
            .windows(needle.len())
            .any(|window| window == needle)
    };
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert!(
        contains(&trace_bytes),
        "spans of the caller's trace were exported"
    );
    assert!(
        contains(b"GET /v1/orders/{id}"),
        "the server span is named after the route template"
    );
    assert!(contains(b"orders.find"), "with a database span under it");
}
