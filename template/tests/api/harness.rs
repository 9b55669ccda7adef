//! The one harness every integration test uses: spawn the app on port 0 against the test's own
//! database, create users, call it over HTTP, or run the real binary as a separate process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::Router;
use service::auth::password::Password;
use service::config::Config;
use service::server::Application;
use service::users::{self, Email, Role};
use sqlx::PgPool;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use uuid::Uuid;

/// The configuration tests start from: both listeners on loopback port 0, no shutdown delays.
pub fn test_config(overrides: &[(&str, &str)]) -> Config {
    // Rate limits use Redis when the suite has one (`REDIS_URL`), under a namespace of their own
    // so that tests sharing the server never share buckets.
    let redis_url = std::env::var("REDIS_URL").unwrap_or_default();
    let prefix = format!("test-{}", Uuid::now_v7());
    let mut vars: HashMap<String, String> = [
        ("DATABASE_URL", database_url().as_str()),
        ("API_ADDR", "127.0.0.1:0"),
        ("ADMIN_ADDR", "127.0.0.1:0"),
        ("SHUTDOWN_READINESS_DELAY_SECS", "0"),
        ("SHUTDOWN_GRACE_PERIOD_SECS", "5"),
        ("SECRET_KEY", TEST_SECRET_KEY),
        ("REDIS_URL", redis_url.as_str()),
        ("RATE_LIMIT_REDIS_PREFIX", prefix.as_str()),
        // A busy machine's Redis may take longer than the production 200 ms; a timeout would
        // decide from the process's own buckets and split the counts tests assert on. Tests of
        // the timeout itself set their own.
        ("REDIS_TIMEOUT_MS", "2000"),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value.to_owned()))
    .collect();
    for (name, value) in overrides {
        vars.insert((*name).to_owned(), (*value).to_owned());
    }
    Config::from_map(&vars).expect("test configuration is valid")
}

/// Creates the job queue's tables in a test database: `#[sqlx::test]` applies the service's own
/// migrations, and the queue's are apalis's (the `migrate` subcommand runs both).
pub async fn with_job_queue(db: PgPool) -> PgPool {
    service::jobs::migrate(&db)
        .await
        .expect("the job queue's tables are created");
    db
}

/// The server `#[sqlx::test]` creates its databases on.
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .expect("DATABASE_URL must point at a Postgres server the tests may create databases on")
}

/// A URL for the database behind `db` (each `#[sqlx::test]` gets its own), for child processes.
pub fn url_of(db: &PgPool) -> String {
    let options = db.connect_options();
    let name = options
        .get_database()
        .expect("test pools name their database");
    let base = database_url();
    let (server, _) = base
        .rsplit_once('/')
        .expect("DATABASE_URL has a database path");
    format!("{server}/{name}")
}

/// The `SECRET_KEY` of every test app.
pub const TEST_SECRET_KEY: &str = "test-secret-key-with-at-least-32-bytes";

/// Every user the harness creates has this password.
pub const TEST_PASSWORD: &str = "correct horse battery staple";

pub struct TestApp {
    pub api: String,
    pub admin: String,
    pub client: reqwest::Client,
    pub db: PgPool,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<anyhow::Result<()>>,
}

impl TestApp {
    pub async fn spawn(db: PgPool) -> TestApp {
        TestApp::spawn_with(db, test_config(&[])).await
    }

    pub async fn spawn_with(db: PgPool, config: Config) -> TestApp {
        let application = Application::build(&config, db.clone())
            .await
            .expect("the application builds");
        let api = format!("http://{}", application.api_addr().expect("bound"));
        let admin = format!("http://{}", application.admin_addr().expect("bound"));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(application.run_until(async {
            let _ = stopped.await;
        }));
        TestApp {
            api,
            admin,
            client: client(),
            db,
            stop: Some(stop),
            server,
        }
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(format!("{}{path}", self.api))
            .send()
            .await
            .expect("request sent")
    }

    /// The admin listener's Prometheus scrape.
    pub async fn metrics(&self) -> String {
        let response = self
            .client
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .expect("scrape sent");
        response.text().await.expect("scrape body")
    }

    /// Starts the shutdown sequence, as SIGTERM would.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Waits for the server to finish its shutdown and returns how it ended.
    pub async fn stopped(mut self) -> anyhow::Result<()> {
        self.begin_shutdown();
        tokio::time::timeout(Duration::from_secs(30), self.server)
            .await
            .expect("the server stops within 30 s")
            .expect("the server task did not panic")
    }

    pub async fn create_user(&self, role: Role) -> TestUser {
        let email = Email::parse(&format!("{}@example.com", Uuid::now_v7())).expect("valid e-mail");
        let password = Password::parse(TEST_PASSWORD.to_owned()).expect("valid password");
        let id = users::create(&self.db, &email, role, password)
            .await
            .expect("user created");
        TestUser { id, email, role }
    }

    /// Creates a user with `role` and logs in over HTTP, as a client would.
    pub async fn token_for(&self, role: Role) -> (TestUser, String) {
        let user = self.create_user(role).await;
        let token = self.login(&user).await;
        (user, token)
    }

    pub async fn login(&self, user: &TestUser) -> String {
        let response = self
            .client
            .post(format!("{}/v1/auth/token", self.api))
            .json(&serde_json::json!({"email": user.email.as_str(), "password": TEST_PASSWORD}))
            .send()
            .await
            .expect("login sent");
        assert_eq!(response.status(), 200, "login succeeds");
        let body: serde_json::Value = response.json().await.expect("token JSON");
        body["access_token"]
            .as_str()
            .expect("access_token")
            .to_owned()
    }

    /// `GET path` with a bearer token, its body as JSON.
    pub async fn get_json(&self, path: &str, token: &str) -> serde_json::Value {
        get_json_at(&self.api, path, token).await
    }

    /// A request to the public API with a bearer token.
    pub fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
    ) -> reqwest::RequestBuilder {
        self.client
            .request(method, format!("{}{path}", self.api))
            .bearer_auth(token)
    }
}

#[derive(Debug, Clone)]
pub struct TestUser {
    pub id: Uuid,
    pub email: Email,
    pub role: Role,
}

/// `GET path` on the service at `base` (a separate process, say) with a bearer token, its body as
/// JSON.
pub async fn get_json_at(base: &str, path: &str, token: &str) -> serde_json::Value {
    client()
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .expect("request sent")
        .json()
        .await
        .expect("a JSON body")
}

/// The value of one series (`name{labels}`, exactly as exported) in a Prometheus text scrape;
/// 0 when it is not there yet.
pub fn sample(scrape: &str, series: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client builds")
}

/// Serves an arbitrary router on loopback port 0: for routes that exist only in tests (one that
/// panics, one with a typed path parameter) behind the production middleware stack.
pub async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("bound");
    tokio::spawn(async move {
        axum::serve(
            listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    format!("http://{addr}")
}

/// The service's own binary, built by cargo for the integration tests (it sits beside the
/// `deps/` directory that holds this test executable).
pub fn binary() -> PathBuf {
    let test_exe = std::env::current_exe().expect("current exe");
    let profile_dir = test_exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    profile_dir.join(env!("CARGO_PKG_NAME"))
}

/// Runs the binary with a clean environment plus `vars`, so the developer's own settings cannot
/// leak into the test.
pub fn command(args: &[&str], vars: &[(&str, &str)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(binary());
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (name, value) in vars {
        command.env(name, value);
    }
    command.kill_on_drop(true);
    command
}
