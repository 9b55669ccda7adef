//! Configuration from the environment (twelve-factor), parsed once at start-up.
//!
//! Prevents: a service that starts with a mistyped or missing setting and fails later, on the first
//! request that needs it. Every variable is parsed here into a typed value; every bad one is
//! reported at once, by the name of the variable the operator has to fix, and the process exits.
//!
//! Hand-written rather than built on `envy` or `config`: those report serde field names instead of
//! variable names, and the whole parser is one page. Every variable is listed in `.env.example`.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;

#[derive(Debug, Clone)]
pub struct Config {
    /// `APP_ENV`: `production` (the default) refuses to start without a strong `SECRET_KEY`.
    pub environment: Environment,
    /// Public API listener (`API_ADDR`).
    pub api_addr: SocketAddr,
    /// Admin listener for metrics and operations (`ADMIN_ADDR`); keep it off the public network.
    pub admin_addr: SocketAddr,
    pub database: DatabaseConfig,
    pub log: LogConfig,
    pub http: HttpConfig,
    pub shutdown: ShutdownConfig,
    pub auth: AuthConfig,
    pub rate_limit: RateLimitConfig,
    pub idempotency: IdempotencyConfig,
    pub imports: ImportsConfig,
    pub jobs: JobsConfig,
}

#[derive(Debug, Clone)]
pub struct ImportsConfig {
    /// Largest CSV upload in bytes (`IMPORT_MAX_BYTES`, default 20 MiB); larger gets 413.
    pub max_bytes: usize,
    /// Most data rows in one file (`IMPORT_MAX_ROWS`); more gets 413.
    pub max_rows: u32,
    /// Imports one user may have queued or running at once (`IMPORT_MAX_ACTIVE_PER_USER`); one
    /// more gets 429 `too_many_imports`.
    pub max_active_per_user: i64,
    /// `IMPORT_WEBHOOK_URL`: told when an import finishes; unset, nobody is.
    pub webhook_url: Option<reqwest::Url>,
    /// `WEBHOOK_ALLOW_PRIVATE_TARGETS`: lets the webhook reach loopback and private networks.
    /// For local development only; see `webhook`.
    pub webhook_allow_private: bool,
    /// Failed deliveries in a row that open the webhook's circuit (`WEBHOOK_BREAKER_FAILURES`).
    pub breaker_failures: u32,
    /// How long an open circuit refuses calls before one trial (`WEBHOOK_BREAKER_COOLDOWN_SECS`).
    pub breaker_cooldown: Duration,
}

#[derive(Debug, Clone)]
pub struct JobsConfig {
    /// Jobs one worker process runs at once, per queue (`WORKER_CONCURRENCY`).
    pub concurrency: usize,
    /// `SERVE_RUNS_WORKERS=true`: `serve` runs the workers in-process too, for deployments
    /// small enough to want one process. Off by default.
    pub in_serve: bool,
    /// How often a worker reports that it is alive (`JOB_HEARTBEAT_SECS`). A worker silent for
    /// `JOB_MISSED_HEARTBEATS` intervals is presumed dead and its jobs go back to the queue.
    pub heartbeat: Duration,
    pub missed_heartbeats: usize,
    /// Runs of a job before it is given up (`JOB_MAX_ATTEMPTS`).
    pub max_attempts: usize,
    /// Delay before the first retry (`JOB_RETRY_BASE_MS`); it doubles on each retry, up to 5 min.
    pub retry_base: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Environment {
    Production,
    Development,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    /// `SECRET_KEY`: signs access tokens and pagination cursors (separate keys are derived from
    /// it). At least 32 bytes in production; rotating it logs everyone out and voids cursors.
    pub secret_key: SecretString,
    /// Lifetime of an access token (`AUTH_TOKEN_TTL_SECS`).
    pub token_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    /// Requests per minute per principal, or per client IP when anonymous
    /// (`RATE_LIMIT_PER_MINUTE`).
    pub per_minute: NonZeroU32,
    /// Writes (POST, PUT, PATCH, DELETE) per minute per principal (`RATE_LIMIT_WRITES_PER_MINUTE`).
    pub writes_per_minute: NonZeroU32,
    /// Login attempts per minute from one client IP (`LOGIN_ATTEMPTS_PER_MINUTE_PER_IP`).
    pub login_per_ip: NonZeroU32,
    /// Login attempts per minute for one account name (`LOGIN_ATTEMPTS_PER_MINUTE_PER_ACCOUNT`).
    pub login_per_account: NonZeroU32,
    /// `REDIS_URL`: when set, buckets are shared by every instance through Redis.
    pub redis_url: Option<SecretString>,
    /// Namespace of the keys in Redis (`RATE_LIMIT_REDIS_PREFIX`, default: the service name).
    pub redis_prefix: String,
    /// How long a rate-limit decision may wait for Redis before falling back to local buckets
    /// (`REDIS_TIMEOUT_MS`).
    pub redis_timeout: Duration,
    /// `TRUSTED_PROXIES`: comma-separated addresses or CIDR networks whose `X-Forwarded-For` is
    /// believed (your load balancers). Empty: the TCP peer is the client.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

#[derive(Debug, Clone)]
pub struct IdempotencyConfig {
    /// How long a key and its stored response are kept (`IDEMPOTENCY_RETENTION_HOURS`, ≥ 24).
    pub retention: Duration,
    /// How often the worker purges expired keys (`IDEMPOTENCY_PURGE_INTERVAL_SECS`).
    pub purge_interval: Duration,
}

/// Shortest `SECRET_KEY` accepted in production: 256 bits, the HMAC-SHA256 key size.
pub const MIN_SECRET_BYTES: usize = 32;

/// Used only when `APP_ENV=development` and no `SECRET_KEY` is set, so that local runs work
/// out of the box. Never accepted in production.
const DEVELOPMENT_SECRET: &str = "development-only-secret-key-do-not-use-in-production";

#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// `DATABASE_URL`; secret because it usually carries the password.
    pub url: SecretString,
    pub max_connections: u32,
    /// How long a request waits for a free connection before it gets a 503.
    pub acquire_timeout: Duration,
    /// Server-side cap on any single statement, so a runaway query cannot hold a connection.
    pub statement_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    /// An `EnvFilter` directive such as `info` or `info,sqlx=warn` (`RUST_LOG`).
    pub filter: String,
    pub format: LogFormat,
    /// `SENTRY_DSN`: where 5xx errors and panics are reported; unset, Sentry is inert.
    pub sentry_dsn: Option<SecretString>,
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` (OTLP/HTTP base URL, e.g. `http://collector:4318`): where
    /// traces are exported; unset, no traces are exported and problems carry no `trace_id`.
    pub otlp_endpoint: Option<String>,
    /// Cap on every outbound HTTP call the service makes (trace export, the import webhook)
    /// (`OUTBOUND_HTTP_TIMEOUT_MS`).
    pub outbound_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, for log shippers.
    Json,
    /// Human-readable, for a terminal.
    Pretty,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest JSON request body accepted, in bytes (`MAX_BODY_BYTES`); larger bodies get 413.
    pub max_body_bytes: usize,

    /// Longest a request may take before it is abandoned with 503 `timeout`
    /// (`REQUEST_TIMEOUT_SECS`). Keep it above `DATABASE_STATEMENT_TIMEOUT_MS`.
    pub request_timeout: Duration,
    /// Longest a CSV upload may take (`IMPORT_UPLOAD_TIMEOUT_SECS`): a 20 MiB file over a slow
    /// link needs far longer than `REQUEST_TIMEOUT_SECS`.
    pub upload_timeout: Duration,
    /// Requests in flight at once before new ones are refused with 503
    /// (`MAX_CONCURRENT_REQUESTS`).
    pub max_concurrent_requests: usize,
    /// Browser origins allowed to call the API (`CORS_ALLOWED_ORIGINS`); empty: none.
    pub cors_allowed_origins: Vec<axum::http::HeaderValue>,
    /// `Strict-Transport-Security` max-age (`HSTS_MAX_AGE_SECS`); set it only when clients reach
    /// the service over HTTPS (TLS is terminated by the load balancer).
    pub hsts_max_age: Option<u64>,
    /// Features and routes switched off (`DISABLED_FEATURES`), see `kill_switch`.
    pub disabled: Vec<crate::kill_switch::Switch>,
}

#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// Time between failing readiness and closing the listeners, so load balancers stop sending
    /// new requests first (`SHUTDOWN_READINESS_DELAY_SECS`).
    pub readiness_delay: Duration,
    /// Longest time in-flight requests get to finish once the listeners close
    /// (`SHUTDOWN_GRACE_PERIOD_SECS`). Keep readiness delay + grace below the orchestrator's kill
    /// timeout (30 s by default in Kubernetes).
    pub grace_period: Duration,
}

/// Every variable that failed to parse, by name.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    problems: Vec<(&'static str, String)>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "invalid configuration:")?;
        for (variable, reason) in &self.problems {
            writeln!(f, "  {variable}: {reason}")?;
        }
        Ok(())
    }
}

impl ConfigError {
    /// The names of the variables that failed, for tests and callers that want to act on them.
    pub fn variables(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.problems.iter().map(|(variable, _)| *variable)
    }
}

/// The secrets that may come from a file instead, as container platforms mount them
/// (`SECRET_KEY_FILE=/run/secrets/secret_key`): the file's contents, less a trailing newline.
const SECRET_FILES: &[(&str, &str)] = &[
    ("DATABASE_URL", "DATABASE_URL_FILE"),
    ("SECRET_KEY", "SECRET_KEY_FILE"),
    ("REDIS_URL", "REDIS_URL_FILE"),
    ("SENTRY_DSN", "SENTRY_DSN_FILE"),
];

impl Config {
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Parses from any source of variables; tests pass a map instead of mutating the process
    /// environment.
    pub fn from_map(vars: &HashMap<String, String>) -> Result<Self, ConfigError> {
        Self::from_lookup(|name| vars.get(name).cloned())
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let mut from_files = HashMap::new();
        for &(name, file_name) in SECRET_FILES {
            let Some(path) = lookup(file_name).filter(|path| !path.trim().is_empty()) else {
                continue;
            };
            if lookup(name).is_some_and(|value| !value.trim().is_empty()) {
                problems.push((file_name, format!("set {name} or {file_name}, not both")));
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(value) => {
                    from_files.insert(name, value.trim_end_matches(['\r', '\n']).to_owned());
                }
                // The path is configuration, not a secret: naming it helps.
                Err(error) => problems.push((file_name, format!("cannot read {path}: {error}"))),
            }
        }
        let lookup = |name: &str| from_files.get(name).cloned().or_else(|| lookup(name));
        let mut env = Reader {
            lookup: &lookup,
            problems,
        };

        let environment = env.environment("APP_ENV");
        let secret_key = env.secret_key("SECRET_KEY", environment);
        let token_ttl = env
            .parse_in_range("AUTH_TOKEN_TTL_SECS", 900, 60..=86_400)
            .map(Duration::from_secs);
        let per_minute = env.per_minute("RATE_LIMIT_PER_MINUTE", 600);
        let writes_per_minute = env.per_minute("RATE_LIMIT_WRITES_PER_MINUTE", 120);
        let redis_url = env.redis_url("REDIS_URL");
        let redis_prefix = env
            .get("RATE_LIMIT_REDIS_PREFIX")
            .unwrap_or_else(|| env!("CARGO_PKG_NAME").to_owned());
        let redis_timeout = env.millis("REDIS_TIMEOUT_MS", 200);
        let trusted_proxies = env.networks("TRUSTED_PROXIES");
        let login_per_ip = env.per_minute("LOGIN_ATTEMPTS_PER_MINUTE_PER_IP", 30);
        let login_per_account = env.per_minute("LOGIN_ATTEMPTS_PER_MINUTE_PER_ACCOUNT", 10);
        let idempotency_retention = env
            .parse_in_range("IDEMPOTENCY_RETENTION_HOURS", 24, 24..=24 * 30)
            .map(|h| Duration::from_secs(h * 3600));
        let purge_interval = env
            .parse_in_range("IDEMPOTENCY_PURGE_INTERVAL_SECS", 3600, 1..=86_400)
            .map(Duration::from_secs);
        let api_addr = env.parse_or("API_ADDR", "0.0.0.0:{{api_port}}");
        let admin_addr = env.parse_or("ADMIN_ADDR", "127.0.0.1:{{admin_port}}");
        let database_url = env.database_url("DATABASE_URL");
        let max_connections = env.parse_in_range("DATABASE_MAX_CONNECTIONS", 10, 1..=1000);
        let acquire_timeout = env.millis("DATABASE_ACQUIRE_TIMEOUT_MS", 3_000);
        let statement_timeout = env.millis("DATABASE_STATEMENT_TIMEOUT_MS", 5_000);
        let log_filter = env.log_filter("RUST_LOG", "info");
        let log_format = env.log_format("LOG_FORMAT");
        let sentry_dsn = env.sentry_dsn("SENTRY_DSN");
        let otlp_endpoint = env.http_url("OTEL_EXPORTER_OTLP_ENDPOINT");
        let outbound_timeout = env.millis("OUTBOUND_HTTP_TIMEOUT_MS", 5_000);
        let max_body_bytes =
            env.parse_in_range("MAX_BODY_BYTES", 1024 * 1024, 1..=64 * 1024 * 1024);
        let request_timeout = env
            .parse_in_range("REQUEST_TIMEOUT_SECS", 10, 1..=600)
            .map(Duration::from_secs);
        let upload_timeout = env
            .parse_in_range("IMPORT_UPLOAD_TIMEOUT_SECS", 300, 1..=3600)
            .map(Duration::from_secs);
        let cors_allowed_origins = env.origins("CORS_ALLOWED_ORIGINS");
        let hsts_max_age = env.optional_in_range("HSTS_MAX_AGE_SECS", 0..=63_072_000);
        let disabled = env.switches("DISABLED_FEATURES");
        let max_concurrent_requests =
            env.parse_in_range("MAX_CONCURRENT_REQUESTS", 256, 1..=100_000);
        let readiness_delay = env.seconds("SHUTDOWN_READINESS_DELAY_SECS", 5);
        let grace_period = env.seconds("SHUTDOWN_GRACE_PERIOD_SECS", 20);
        let imports = env.imports();
        let jobs = env.jobs();

        let (
            Some(environment),
            Some(secret_key),
            Some(token_ttl),
            Some(per_minute),
            Some(writes_per_minute),
            Some(redis_url),
            Some(redis_timeout),
            Some(trusted_proxies),
            Some(login_per_ip),
            Some(login_per_account),
            Some(idempotency_retention),
            Some(purge_interval),
            Some(api_addr),
            Some(admin_addr),
            Some(database_url),
            Some(max_connections),
            Some(acquire_timeout),
            Some(statement_timeout),
            Some(log_filter),
            Some(log_format),
            Some(sentry_dsn),
            Some(otlp_endpoint),
            Some(outbound_timeout),
            Some(max_body_bytes),
            Some(request_timeout),
            Some(upload_timeout),
            Some(max_concurrent_requests),
            Some(cors_allowed_origins),
            Some(hsts_max_age),
            Some(disabled),
            Some(readiness_delay),
            Some(grace_period),
            Some(imports),
            Some(jobs),
        ) = (
            environment,
            secret_key,
            token_ttl,
            per_minute,
            writes_per_minute,
            redis_url,
            redis_timeout,
            trusted_proxies,
            login_per_ip,
            login_per_account,
            idempotency_retention,
            purge_interval,
            api_addr,
            admin_addr,
            database_url,
            max_connections,
            acquire_timeout,
            statement_timeout,
            log_filter,
            log_format,
            sentry_dsn,
            otlp_endpoint,
            outbound_timeout,
            max_body_bytes,
            request_timeout,
            upload_timeout,
            max_concurrent_requests,
            cors_allowed_origins,
            hsts_max_age,
            disabled,
            readiness_delay,
            grace_period,
            imports,
            jobs,
        )
        else {
            return Err(ConfigError {
                problems: env.problems,
            });
        };
        // A secret given twice (variable and file) leaves a usable value, and still stops here.
        if !env.problems.is_empty() {
            return Err(ConfigError {
                problems: env.problems,
            });
        }
        Ok(Config {
            environment,
            api_addr,
            admin_addr,
            database: DatabaseConfig {
                url: SecretString::from(database_url),
                max_connections,
                acquire_timeout,
                statement_timeout,
            },
            log: LogConfig {
                filter: log_filter,
                format: log_format,
                sentry_dsn,
                otlp_endpoint,
                outbound_timeout,
            },
            http: HttpConfig {
                max_body_bytes,
                request_timeout,
                upload_timeout,
                max_concurrent_requests,
                cors_allowed_origins,
                hsts_max_age,
                disabled,
            },
            shutdown: ShutdownConfig {
                readiness_delay,
                grace_period,
            },
            auth: AuthConfig {
                secret_key,
                token_ttl,
            },
            rate_limit: RateLimitConfig {
                per_minute,
                writes_per_minute,
                login_per_ip,
                login_per_account,
                redis_url,
                redis_prefix,
                redis_timeout,
                trusted_proxies,
            },
            idempotency: IdempotencyConfig {
                retention: idempotency_retention,
                purge_interval,
            },
            imports,
            jobs,
        })
    }
}

/// Reads variables and collects every failure instead of stopping at the first one: a failed
/// variable yields `None` and a recorded problem.
struct Reader<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
    problems: Vec<(&'static str, String)>,
}

impl Reader<'_> {
    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name).filter(|value| !value.trim().is_empty())
    }

    fn fail<T>(&mut self, name: &'static str, reason: String) -> Option<T> {
        self.problems.push((name, reason));
        None
    }

    fn required(&mut self, name: &'static str) -> Option<String> {
        match self.get(name) {
            Some(value) => Some(value),
            None => self.fail(name, "is required but not set".into()),
        }
    }

    /// Required, and a URL the Postgres driver accepts, so that a typo stops the start-up here
    /// rather than failing the first query.
    fn database_url(&mut self, name: &'static str) -> Option<String> {
        let url = self.required(name)?;
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return self.fail(name, "must be a postgres:// or postgresql:// URL".into());
        }
        match sqlx::postgres::PgConnectOptions::from_str(&url) {
            Ok(_) => Some(url),
            // The driver's message may quote the URL, password included: say only what is wrong.
            Err(_) => self.fail(name, "is not a valid Postgres connection URL".into()),
        }
    }

    fn parse_or<T>(&mut self, name: &'static str, default: &str) -> Option<T>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        let raw = self.get(name).unwrap_or_else(|| default.to_owned());
        match raw.trim().parse() {
            Ok(value) => Some(value),
            Err(error) => self.fail(name, format!("cannot parse {raw:?}: {error}")),
        }
    }

    fn parse_in_range<T>(
        &mut self,
        name: &'static str,
        default: T,
        range: RangeInclusive<T>,
    ) -> Option<T>
    where
        T: FromStr + PartialOrd + fmt::Display,
        T::Err: fmt::Display,
    {
        let value: T = self.parse_or(name, &default.to_string())?;
        if range.contains(&value) {
            Some(value)
        } else {
            self.fail(
                name,
                format!("{value} is outside {}..={}", range.start(), range.end()),
            )
        }
    }

    fn imports(&mut self) -> Option<ImportsConfig> {
        let max_bytes = self.parse_in_range("IMPORT_MAX_BYTES", 20 * 1024 * 1024, 1..=1 << 30);
        let max_rows = self.parse_in_range("IMPORT_MAX_ROWS", 1_000_000, 1..=10_000_000);
        let max_active_per_user = self.parse_in_range("IMPORT_MAX_ACTIVE_PER_USER", 3, 1..=1000);
        let webhook_url = self.webhook_url("IMPORT_WEBHOOK_URL");
        let webhook_allow_private = self.parse_or("WEBHOOK_ALLOW_PRIVATE_TARGETS", "false");
        // An address written in the URL cannot change: refuse a private one now, not at the
        // first delivery. (A name is checked when it is resolved, on every call.)
        let webhook_url = match (webhook_url, webhook_allow_private) {
            (Some(Some(url)), Some(false))
                if crate::webhook::literal_ip(&url).is_some_and(|ip| !crate::webhook::is_public(ip)) =>
            {
                self.fail(
                    "IMPORT_WEBHOOK_URL",
                    "is not a public address; WEBHOOK_ALLOW_PRIVATE_TARGETS=true allows it (local development)".into(),
                )
            }
            (url, _) => url,
        };
        let breaker_failures = self.parse_in_range("WEBHOOK_BREAKER_FAILURES", 5, 1..=1000);
        let breaker_cooldown = self.seconds("WEBHOOK_BREAKER_COOLDOWN_SECS", 30);
        Some(ImportsConfig {
            max_bytes: max_bytes?,
            max_rows: max_rows?,
            max_active_per_user: max_active_per_user?,
            webhook_url: webhook_url?,
            webhook_allow_private: webhook_allow_private?,
            breaker_failures: breaker_failures?,
            breaker_cooldown: breaker_cooldown?,
        })
    }

    fn jobs(&mut self) -> Option<JobsConfig> {
        let concurrency = self.parse_in_range("WORKER_CONCURRENCY", 2, 1..=256);
        let in_serve = self.parse_or("SERVE_RUNS_WORKERS", "false");
        let heartbeat = self
            .parse_in_range("JOB_HEARTBEAT_SECS", 5, 1..=300)
            .map(Duration::from_secs);
        let missed_heartbeats = self.parse_in_range("JOB_MISSED_HEARTBEATS", 3, 1..=100);
        let max_attempts = self.parse_in_range("JOB_MAX_ATTEMPTS", 5, 1..=100);
        let retry_base = self.millis("JOB_RETRY_BASE_MS", 1_000);
        Some(JobsConfig {
            concurrency: concurrency?,
            in_serve: in_serve?,
            heartbeat: heartbeat?,
            missed_heartbeats: missed_heartbeats?,
            max_attempts: max_attempts?,
            retry_base: retry_base?,
        })
    }

    /// Optional; when set, an absolute `http(s)://` URL. Where it points is checked when it is
    /// called (`webhook::Target`), because DNS answers change.
    fn webhook_url(&mut self, name: &'static str) -> Option<Option<reqwest::Url>> {
        let Some(raw) = self.get(name) else {
            return Some(None);
        };
        match reqwest::Url::parse(raw.trim()) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                Some(Some(url))
            }
            Ok(_) => self.fail(
                name,
                "must be an http:// or https:// URL with a host".into(),
            ),
            Err(error) => self.fail(name, format!("is not a URL: {error}")),
        }
    }

    fn millis(&mut self, name: &'static str, default: u64) -> Option<Duration> {
        self.parse_in_range(name, default, 1..=600_000)
            .map(Duration::from_millis)
    }

    fn seconds(&mut self, name: &'static str, default: u64) -> Option<Duration> {
        self.parse_in_range(name, default, 0..=600)
            .map(Duration::from_secs)
    }

    fn log_filter(&mut self, name: &'static str, default: &str) -> Option<String> {
        let filter = self.get(name).unwrap_or_else(|| default.to_owned());
        match tracing_subscriber::EnvFilter::try_new(&filter) {
            Ok(_) => Some(filter),
            Err(error) => self.fail(name, format!("not a valid filter: {error}")),
        }
    }

    /// Optional; when set, an `http://` or `https://` base URL without a trailing slash.
    fn http_url(&mut self, name: &'static str) -> Option<Option<String>> {
        match self.get(name) {
            None => Some(None),
            Some(url)
                if (url.starts_with("http://") || url.starts_with("https://"))
                    && !url.contains(' ') =>
            {
                Some(Some(url.trim_end_matches('/').to_owned()))
            }
            Some(_) => self.fail(name, "must be an http:// or https:// URL".into()),
        }
    }

    /// Optional; when set, a DSN the Sentry client accepts.
    fn sentry_dsn(&mut self, name: &'static str) -> Option<Option<SecretString>> {
        match self.get(name) {
            None => Some(None),
            Some(dsn) if dsn.parse::<sentry::types::Dsn>().is_ok() => {
                Some(Some(SecretString::from(dsn)))
            }
            Some(_) => self.fail(name, "is not a valid Sentry DSN".into()),
        }
    }

    /// Optional; when set, a `redis://` URL the client accepts.
    fn redis_url(&mut self, name: &'static str) -> Option<Option<SecretString>> {
        match self.get(name) {
            None => Some(None),
            Some(url) if redis::Client::open(url.as_str()).is_ok() => {
                Some(Some(SecretString::from(url)))
            }
            Some(_) => self.fail(name, "is not a valid redis:// URL".into()),
        }
    }

    /// A comma-separated list of `scheme://host[:port]` origins.
    fn origins(&mut self, name: &'static str) -> Option<Vec<axum::http::HeaderValue>> {
        let raw = self.get(name).unwrap_or_default();
        let mut origins = Vec::new();
        for origin in raw
            .split(',')
            .map(str::trim)
            .filter(|origin| !origin.is_empty())
        {
            let well_formed = (origin.starts_with("https://") || origin.starts_with("http://"))
                && !origin.ends_with('/');
            match axum::http::HeaderValue::from_str(origin) {
                Ok(value) if well_formed && origin != "*" => origins.push(value),
                _ => {
                    return self.fail(
                        name,
                        format!("{origin:?} is not an origin like https://app.example.com"),
                    );
                }
            }
        }
        Some(origins)
    }

    fn optional_in_range(
        &mut self,
        name: &'static str,
        range: RangeInclusive<u64>,
    ) -> Option<Option<u64>> {
        match self.get(name) {
            None => Some(None),
            Some(_) => self.parse_in_range(name, 0, range).map(Some),
        }
    }

    fn switches(&mut self, name: &'static str) -> Option<Vec<crate::kill_switch::Switch>> {
        let raw = self.get(name).unwrap_or_default();
        let parsed: Result<Vec<_>, String> = raw
            .split(',')
            .filter(|entry| !entry.trim().is_empty())
            .map(crate::kill_switch::Switch::parse)
            .collect();
        match parsed {
            Ok(switches) => Some(switches),
            Err(reason) => self.fail(name, reason),
        }
    }

    /// A comma-separated list of addresses or CIDR networks.
    fn networks(&mut self, name: &'static str) -> Option<Vec<ipnet::IpNet>> {
        let raw = self.get(name).unwrap_or_default();
        let parsed: Result<Vec<ipnet::IpNet>, String> = raw
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(|item| {
                item.parse::<ipnet::IpNet>()
                    .or_else(|_| item.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                    .map_err(|_| format!("{item:?} is not an address or CIDR network"))
            })
            .collect();
        match parsed {
            Ok(networks) => Some(networks),
            Err(reason) => self.fail(name, reason),
        }
    }

    fn per_minute(&mut self, name: &'static str, default: u32) -> Option<NonZeroU32> {
        self.parse_in_range(name, default, 1..=100_000)
            .and_then(NonZeroU32::new)
    }

    fn environment(&mut self, name: &'static str) -> Option<Environment> {
        match self.get(name).as_deref().map(str::trim) {
            None | Some("production") => Some(Environment::Production),
            Some("development") => Some(Environment::Development),
            Some(other) => self.fail(
                name,
                format!("{other:?} is not one of: production, development"),
            ),
        }
    }

    fn secret_key(
        &mut self,
        name: &'static str,
        environment: Option<Environment>,
    ) -> Option<SecretString> {
        match (self.get(name), environment) {
            (Some(key), _) if key.len() >= MIN_SECRET_BYTES => Some(SecretString::from(key)),
            (Some(_), _) => self.fail(name, format!("must be at least {MIN_SECRET_BYTES} bytes")),
            (None, Some(Environment::Development)) => Some(SecretString::from(DEVELOPMENT_SECRET)),
            (None, _) => self.fail(name, "is required when APP_ENV=production".into()),
        }
    }

    fn log_format(&mut self, name: &'static str) -> Option<LogFormat> {
        match self.get(name).as_deref().map(str::trim) {
            None | Some("json") => Some(LogFormat::Json),
            Some("pretty") => Some(LogFormat::Pretty),
            Some(other) => self.fail(name, format!("{other:?} is not one of: json, pretty")),
        }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn env_example_documents_every_variable() {
        let example = include_str!("../.env.example");
        let source = include_str!("config.rs");
        let names: Vec<&str> = source
            .split("(\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .filter(|name| {
                name.len() > 2
                    && !name.starts_with("CARGO_")
                    && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            })
            .collect();
        assert!(names.len() > 30, "{names:?}");
        for name in names {
            assert!(
                example
                    .lines()
                    .any(|line| line.starts_with(&format!("{name}="))),
                ".env.example lacks {name}"
            );
        }
    }

    #[test]
    fn defaults_apply_when_only_the_required_variables_are_given() {
        let config = Config::from_map(&vars(&[
            ("DATABASE_URL", "postgres://localhost/app"),
            ("SECRET_KEY", SECRET),
        ]))
        .unwrap();
        assert_eq!(config.environment, Environment::Production);
        assert_eq!(config.idempotency.retention, Duration::from_secs(24 * 3600));
        assert_eq!(config.database.max_connections, 10);
        assert_eq!(config.http.max_body_bytes, 1024 * 1024);
        assert_eq!(config.log.format, LogFormat::Json);
        assert!(
            config.admin_addr.ip().is_loopback(),
            "admin listener must default to loopback"
        );
    }

    #[test]
    fn every_bad_variable_is_named_at_once() {
        for bad_url in ["mysql://localhost/app", "postgres://localhost:notaport/app"] {
            let error =
                Config::from_map(&vars(&[("DATABASE_URL", bad_url), ("SECRET_KEY", SECRET)]))
                    .unwrap_err();
            assert_eq!(
                error.variables().collect::<Vec<_>>(),
                ["DATABASE_URL"],
                "{bad_url}"
            );
        }
        let error = Config::from_map(&vars(&[
            ("API_ADDR", "not-an-address"),
            ("DATABASE_MAX_CONNECTIONS", "0"),
            // Keys are kept at least a day (the contract's floor).
            ("IDEMPOTENCY_RETENTION_HOURS", "23"),
            ("LOG_FORMAT", "xml"),
            ("RUST_LOG", "info,[=bad"),
        ]))
        .unwrap_err();
        let mut named: Vec<_> = error.variables().collect();
        named.sort();
        assert_eq!(
            named,
            [
                "API_ADDR",
                "DATABASE_MAX_CONNECTIONS",
                "DATABASE_URL",
                "IDEMPOTENCY_RETENTION_HOURS",
                "LOG_FORMAT",
                "RUST_LOG",
                "SECRET_KEY"
            ]
        );
        let message = error.to_string();
        assert!(
            message.contains("API_ADDR: cannot parse \"not-an-address\""),
            "{message}"
        );
    }

    #[test]
    fn secrets_may_come_from_files_but_not_from_both_places() {
        let dir = std::env::temp_dir().join(format!("config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key_file = dir.join("secret_key");
        std::fs::write(&key_file, format!("{SECRET}\n")).unwrap();
        let key_path = key_file.to_str().unwrap();
        let config = Config::from_map(&vars(&[
            ("DATABASE_URL", "postgres://localhost/app"),
            ("SECRET_KEY_FILE", key_path),
        ]))
        .unwrap();
        assert_eq!(config.auth.secret_key.expose_secret(), SECRET);

        let both = Config::from_map(&vars(&[
            ("DATABASE_URL", "postgres://localhost/app"),
            ("SECRET_KEY", SECRET),
            ("SECRET_KEY_FILE", key_path),
        ]))
        .unwrap_err();
        assert_eq!(both.variables().collect::<Vec<_>>(), ["SECRET_KEY_FILE"]);
        let unreadable = Config::from_map(&vars(&[
            ("DATABASE_URL_FILE", "/nonexistent/database_url"),
            ("SECRET_KEY", SECRET),
        ]))
        .unwrap_err();
        assert!(
            unreadable
                .to_string()
                .contains("DATABASE_URL_FILE: cannot read /nonexistent/database_url"),
            "{unreadable}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn production_refuses_a_missing_or_weak_secret_and_development_falls_back() {
        let database = ("DATABASE_URL", "postgres://localhost/app");
        let weak = Config::from_map(&vars(&[database, ("SECRET_KEY", "short")])).unwrap_err();
        assert!(
            weak.to_string()
                .contains("SECRET_KEY: must be at least 32 bytes"),
            "{weak}"
        );
        let missing = Config::from_map(&vars(&[database])).unwrap_err();
        assert!(
            missing
                .to_string()
                .contains("SECRET_KEY: is required when APP_ENV=production"),
            "{missing}"
        );
        let weak_in_development = Config::from_map(&vars(&[
            database,
            ("APP_ENV", "development"),
            ("SECRET_KEY", "short"),
        ]));
        assert!(
            weak_in_development.is_err(),
            "a key that is set must be strong everywhere"
        );
        let development = Config::from_map(&vars(&[database, ("APP_ENV", "development")])).unwrap();
        assert_eq!(development.environment, Environment::Development);
    }

    #[test]
    fn a_webhook_url_with_a_private_address_is_refused_unless_allowed() {
        let required = [
            ("DATABASE_URL", "postgres://localhost/app"),
            ("SECRET_KEY", SECRET),
        ];
        for private in [
            "http://127.0.0.1:9000/hook",
            "http://[::1]/hook",
            "http://169.254.169.254/",
        ] {
            let refused = Config::from_map(&vars(&[
                required[0],
                required[1],
                ("IMPORT_WEBHOOK_URL", private),
            ]))
            .unwrap_err();
            assert!(
                refused
                    .to_string()
                    .contains("IMPORT_WEBHOOK_URL: is not a public address"),
                "{private}: {refused}"
            );
            let allowed = Config::from_map(&vars(&[
                required[0],
                required[1],
                ("IMPORT_WEBHOOK_URL", private),
                ("WEBHOOK_ALLOW_PRIVATE_TARGETS", "true"),
            ]));
            assert!(allowed.is_ok(), "{private}");
        }
        // Names are checked when resolved, at every call.
        let named = Config::from_map(&vars(&[
            required[0],
            required[1],
            ("IMPORT_WEBHOOK_URL", "https://partner.example/hook"),
        ]));
        assert!(named.is_ok());
    }

    #[test]
    fn the_database_url_never_appears_in_debug_output() {
        let config = Config::from_map(&vars(&[
            ("DATABASE_URL", "postgres://u:hunter2@db/app"),
            ("SECRET_KEY", SECRET),
        ]))
        .unwrap();
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("hunter2") && !debug.contains(SECRET),
            "{debug}"
        );
    }
}
