//! The service as a library, so that integration tests drive exactly what the binary runs.
//!
//! Where things live:
//! - `app`: the route list and the middleware stack, in order. Start reading here.
//! - `server`, `shutdown`: the listeners and graceful shutdown. `worker`: the job process, and
//!   `jobs`: the job queue (apalis on Postgres) it runs.
//! - `config`: every environment variable. `db`: the pool and migrations. `telemetry`: logging.
//! - Cross-cutting patterns, one module each: `problem` (errors), `extract` and `validation`
//!   (request parsing), `idempotency`, `pagination`, `conditional` (ETags), `deprecation`, `rate_limit`, `client_ip`, `overload`, `kill_switch`,
//!   `circuit_breaker`, `request_id`, `request_log`, `metrics`, `security_headers`, `health`, `openapi`, `keys`.
//! - Domain features: `auth` (login, tokens, default-deny), `users`, `orders`, `imports` (CSV
//!   uploads processed by the worker), and `webhook` (the adapter that notifies a partner).

pub mod app;
pub mod auth;
pub mod circuit_breaker;
pub mod client_ip;
pub mod conditional;
pub mod config;
pub mod db;
pub mod deprecation;
pub mod extract;
pub mod health;
pub mod idempotency;
pub mod imports;
pub mod jobs;
pub mod keys;
pub mod kill_switch;
pub mod metrics;
pub mod middleware;
pub mod openapi;
pub mod orders;
pub mod overload;
pub mod pagination;
pub mod problem;
pub mod rate_limit;
pub mod request_id;
pub mod request_log;
pub mod security_headers;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod users;
pub mod validation;
pub mod webhook;
pub mod worker;
