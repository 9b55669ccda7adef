//! Integration tests: the real application over real HTTP on loopback, each test with its own
//! freshly migrated Postgres database (`#[sqlx::test]`). One binary, so the suite links once.

mod harness;

mod auth;
mod browser_and_switches;
mod cli;
mod errors;
mod health;
mod idempotency;
mod imports;
mod instances;
mod observability;
mod openapi;
mod orders;
mod outage;
mod pagination;
mod rate_limit;
mod statements;
mod users;
