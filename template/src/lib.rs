//! The service as a library, so that integration tests drive exactly what the binary runs.
//!
//! Where things live:
//! - `app`: the route list and the middleware stack, in order. Start reading here.
//! - `server`, `shutdown`: the listeners and graceful shutdown. `worker`: the job process.
//! - `config`: every environment variable. `db`: the pool and migrations. `telemetry`: logging.
//! - Cross-cutting patterns, one module each: `problem` (errors), `extract` (request parsing),
//!   `request_id`, `request_log`, `metrics`, `security_headers`, `health`, `openapi`.
//! - Domain features: `users`, `auth`.

pub mod app;
pub mod auth;
pub mod config;
pub mod db;
pub mod extract;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod problem;
pub mod request_id;
pub mod request_log;
pub mod security_headers;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod users;
pub mod worker;
