//! The database goes away and comes back (R6): fast 503 problems and failing readiness while it
//! is down, recovery without a restart when it returns, for the API and for the worker. The test runs its own throwaway Postgres
//! (the project's `scripts/local-postgres.sh`), because stopping the suite's shared one would
//! break every other test.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::Value;
use service::config::Config;
use service::users::Role;
use sqlx::PgPool;

use crate::harness::{TestApp, test_config, with_job_queue};
use crate::imports::{csv, finished, start_worker_counting, upload};

/// A Postgres cluster of the test's own, destroyed when dropped.
struct OwnPostgres {
    port: u16,
    dir: String,
}

impl OwnPostgres {
    fn script(&self, action: &str) -> String {
        self.run(action)
            .unwrap_or_else(|error| panic!("local-postgres.sh {action}: {error}"))
    }

    fn run(&self, action: &str) -> Result<String, String> {
        let output = Command::new("bash")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/scripts/local-postgres.sh"
            ))
            .arg(action)
            .env("PGPORT", self.port.to_string())
            .env("PGDATA_DIR", &self.dir)
            .env("DATABASE_NAME", "outage")
            .output()
            .map_err(|error| format!("cannot run the script: {error}"))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    fn start() -> (OwnPostgres, String) {
        // A port that was free when chosen is not reserved: another test may bind it while
        // `initdb` runs, before Postgres does. A failed start tries another port.
        let mut failures = Vec::new();
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|listener| listener.local_addr())
                .unwrap()
                .port();
            let postgres = OwnPostgres {
                port,
                dir: format!("/tmp/outage-test-postgres-{port}"),
            };
            match postgres.run("start") {
                Ok(settings) => {
                    let url = settings.trim_start_matches("DATABASE_URL=").to_owned();
                    return (postgres, url);
                }
                Err(error) => failures.push(error),
            }
        }
        panic!("local-postgres.sh start failed three times: {failures:#?}");
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self.run("destroy");
    }
}

/// A service on `url` that waits at most a second for a connection, so that requests made while
/// the database is down answer at once.
fn settings(url: &str) -> [(&'static str, &str); 2] {
    [
        ("DATABASE_URL", url),
        ("DATABASE_ACQUIRE_TIMEOUT_MS", "1000"),
    ]
}

async fn migrated_pool(url: &str) -> (Config, PgPool) {
    let config = test_config(&settings(url));
    let db = service::db::pool(&config.database).unwrap();
    service::db::MIGRATOR.run(&db).await.unwrap();
    (config, db)
}

#[tokio::test]
async fn with_postgres_stopped_requests_get_fast_503s_and_the_service_recovers_when_it_returns() {
    let (postgres, url) = OwnPostgres::start();
    let (config, db) = migrated_pool(&url).await;
    let app = TestApp::spawn_with(db, config).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let orders = || app.call(Method::GET, "/v1/orders", &token).send();
    assert_eq!(orders().await.unwrap().status(), StatusCode::OK);

    postgres.script("stop");
    for _ in 0..3 {
        let started = Instant::now();
        let response = orders().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "answered in {:?}, not hung",
            started.elapsed()
        );
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(response.headers().contains_key("retry-after"));
        assert_eq!(
            response.json::<Value>().await.unwrap()["code"],
            "service_unavailable"
        );
    }
    assert_eq!(
        app.get("/readyz").await.status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(
        app.get("/livez").await.status(),
        StatusCode::OK,
        "the process is alive; do not restart it"
    );

    postgres.script("start");
    let deadline = Instant::now() + Duration::from_secs(30);
    while app.get("/readyz").await.status() != StatusCode::OK {
        assert!(Instant::now() < deadline, "readiness did not recover");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        orders().await.unwrap().status(),
        StatusCode::OK,
        "recovered without a restart"
    );
}

#[tokio::test]
async fn the_worker_outlives_a_database_outage_and_then_runs_the_jobs_queued_meanwhile() {
    let (postgres, url) = OwnPostgres::start();
    let (config, db) = migrated_pool(&url).await;
    let db = with_job_queue(db).await;
    let restarted = "job worker stopped; starting it again";
    let (mut worker, restarts) = start_worker_counting(&db, &settings(&url), restarted).await;

    // Down long enough for the worker's polling to fail.
    postgres.script("stop");
    let deadline = Instant::now() + Duration::from_secs(30);
    while restarts.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            worker.try_wait().unwrap().is_none(),
            "the worker exited instead of waiting for the database"
        );
        assert!(
            Instant::now() < deadline,
            "the worker never noticed the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    postgres.script("start");

    let app = TestApp::spawn_with(db, config).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let response = upload(&app, &token, csv(3, 2), "after-the-outage").await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let import = finished(&app, &token, &id).await;
    assert_eq!(import["status"], "succeeded", "{import}");
    assert!(
        worker.try_wait().unwrap().is_none(),
        "the same worker process ran it"
    );
    worker.kill().await.unwrap();
}
