//! `/livez` and `/readyz`, in the shape of the IETF health-check draft (`application/health+json`).
//!
//! Prevents: two opposite outages. A liveness probe that checks the database restarts every pod
//! when the database blips, so liveness checks nothing but the process. A readiness probe that
//! checks nothing keeps sending traffic to a pod that cannot serve it or is shutting down.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::app::AppState;

const HEALTH_JSON: &str = "application/health+json";

/// A readiness check must answer well within the probe's own timeout (1 s by default in
/// Kubernetes is too tight for a cold pool; probes here are expected to allow 3 s).
const DATABASE_CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HealthStatus {
    Pass,
    Fail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    pub status: HealthStatus,
    /// Why the check failed; absent when it passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    #[schema(example = 1.7)]
    pub duration_ms: f64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthReport {
    pub status: HealthStatus,
    /// One entry per dependency checked, by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub checks: BTreeMap<&'static str, Check>,
}

impl IntoResponse for HealthReport {
    fn into_response(self) -> Response {
        let status = match self.status {
            HealthStatus::Pass => StatusCode::OK,
            HealthStatus::Fail => StatusCode::SERVICE_UNAVAILABLE,
        };
        let mut response = (status, axum::Json(self)).into_response();
        response
            .extensions_mut()
            .insert(crate::problem::OwnErrorBody);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(HEALTH_JSON),
        );
        response
    }
}

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(livez))
        .routes(routes!(readyz))
}

/// Liveness: 200 while the process runs. Checks no dependency on purpose.
#[utoipa::path(
    get,
    path = "/livez",
    tag = "operations",
    responses((status = OK, description = "The process is running.", body = HealthReport, content_type = "application/health+json")),
)]
pub async fn livez() -> HealthReport {
    HealthReport {
        status: HealthStatus::Pass,
        checks: BTreeMap::new(),
    }
}

/// Readiness: 200 when the database answers and the process is not shutting down, else 503.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses(
        (status = OK, description = "Ready to serve traffic.", body = HealthReport, content_type = "application/health+json"),
        (status = SERVICE_UNAVAILABLE, description = "A dependency is down, or the process is shutting down.", body = HealthReport, content_type = "application/health+json"),
    ),
)]
pub async fn readyz(State(state): State<AppState>) -> HealthReport {
    let mut checks = BTreeMap::new();
    checks.insert("database", check_database(&state.db).await);
    let shutting_down = state.readiness.is_shutting_down();
    checks.insert(
        "shutdown",
        Check {
            status: if shutting_down {
                HealthStatus::Fail
            } else {
                HealthStatus::Pass
            },
            output: shutting_down.then(|| "the process is shutting down".to_owned()),
            duration_ms: 0.0,
        },
    );
    let status = if checks
        .values()
        .all(|check| check.status == HealthStatus::Pass)
    {
        HealthStatus::Pass
    } else {
        HealthStatus::Fail
    };
    HealthReport { status, checks }
}

async fn check_database(db: &sqlx::PgPool) -> Check {
    let started = Instant::now();
    let outcome =
        tokio::time::timeout(DATABASE_CHECK_TIMEOUT, sqlx::query("SELECT 1").execute(db)).await;
    let output = match outcome {
        Ok(Ok(_)) => None,
        Ok(Err(error)) => {
            // The cause (host, port, driver message) goes to the logs; the public answer stays vague.
            tracing::warn!(%error, "readiness: database check failed");
            Some("the database is unreachable".to_owned())
        }
        Err(_) => Some(format!(
            "no answer within {} s",
            DATABASE_CHECK_TIMEOUT.as_secs()
        )),
    };
    Check {
        status: if output.is_none() {
            HealthStatus::Pass
        } else {
            HealthStatus::Fail
        },
        output,
        duration_ms: started.elapsed().as_secs_f64() * 1000.0,
    }
}
