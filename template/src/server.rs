//! The `serve` process: two listeners (public API and admin) and their shutdown.
//!
//! The admin listener is a separate address so that metrics and operations endpoints are never
//! reachable through the public load balancer, whatever its routing rules.

use std::net::SocketAddr;

use anyhow::Context;
use axum::Router;
use sqlx::PgPool;
use tokio::net::TcpListener;

use crate::app::{self, AppState};
use crate::config::{Config, ShutdownConfig};
use crate::shutdown::{self, Readiness};

/// A bound but not yet running server. Binding first lets callers (tests, port 0) learn the
/// addresses before requests start.
pub struct Application {
    api_listener: TcpListener,
    admin_listener: TcpListener,
    api: Router,
    admin: Router,
    readiness: Readiness,
    shutdown: ShutdownConfig,
    /// With `SERVE_RUNS_WORKERS=true`: the job workers, run in this process too.
    workers: Option<(PgPool, Config)>,
}

impl Application {
    pub async fn build(config: &Config, db: PgPool) -> anyhow::Result<Self> {
        let api_listener = TcpListener::bind(config.api_addr)
            .await
            .with_context(|| format!("cannot listen on API_ADDR {}", config.api_addr))?;
        let admin_listener = TcpListener::bind(config.admin_addr)
            .await
            .with_context(|| format!("cannot listen on ADMIN_ADDR {}", config.admin_addr))?;
        let routes = app::openapi_document()
            .paths
            .paths
            .iter()
            .flat_map(|(path, item)| {
                let methods = [
                    ("GET", item.get.is_some()),
                    ("POST", item.post.is_some()),
                    ("PUT", item.put.is_some()),
                    ("PATCH", item.patch.is_some()),
                    ("DELETE", item.delete.is_some()),
                ];
                methods
                    .into_iter()
                    .filter(|(_, present)| *present)
                    .map(|(method, _)| (method.to_owned(), path.clone()))
                    .collect::<Vec<_>>()
            })
            .collect::<Vec<_>>();
        crate::kill_switch::check_known(&config.http.disabled, &routes)
            .map_err(anyhow::Error::msg)?;
        let admin = app::admin_router(db.clone());
        let workers = config.jobs.in_serve.then(|| (db.clone(), config.clone()));
        let state = AppState::new(db, config)?;
        let readiness = state.readiness.clone();
        let limiter = state.rate_limiter.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                every.tick().await;
                limiter.forget_idle();
            }
        });
        // The dummy hash that makes unknown-account logins as slow as real ones.
        crate::auth::password::warm_up().await;
        Ok(Application {
            api_listener,
            admin_listener,
            api: app::public_router(state, &config.http),
            admin,
            readiness,
            shutdown: config.shutdown.clone(),
            workers,
        })
    }

    pub fn api_addr(&self) -> std::io::Result<SocketAddr> {
        self.api_listener.local_addr()
    }

    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin_listener.local_addr()
    }

    /// Serves until `trigger` resolves, then shuts down gracefully (see [`shutdown`]).
    pub async fn run_until(
        self,
        trigger: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        tracing::info!(api_addr = %self.api_addr()?, admin_addr = %self.admin_addr()?, "listening");
        let stop_accepting = shutdown::sequence(trigger, self.readiness, &self.shutdown);
        // Connection info carries the peer address, the client IP for per-IP limits.
        let api = axum::serve(
            self.api_listener,
            self.api.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop_accepting.clone().cancelled_owned());
        let admin = axum::serve(self.admin_listener, self.admin)
            .with_graceful_shutdown(stop_accepting.clone().cancelled_owned());
        // In-process workers that die take the server down with them (a non-zero exit), rather
        // than leave it serving while no job runs.
        let workers = self.workers.map(|(db, config)| {
            let stop = stop_accepting.clone();
            tokio::spawn(async move {
                let ran = crate::worker::run_background(db, config, stop.clone()).await;
                stop.cancel();
                ran
            })
        });
        let drained = async {
            tokio::try_join!(api.into_future(), admin.into_future())?;
            if let Some(workers) = workers {
                workers
                    .await
                    .map_err(std::io::Error::other)?
                    .map_err(std::io::Error::other)?;
            }
            Ok::<_, std::io::Error>(())
        };
        let grace_over = async {
            stop_accepting.cancelled().await;
            tokio::time::sleep(self.shutdown.grace_period).await;
        };
        tokio::select! {
            result = drained => {
                result.context("server error")?;
                tracing::info!("all requests drained; stopped");
            }
            () = grace_over => {
                tracing::warn!(
                    grace_secs = self.shutdown.grace_period.as_secs(),
                    "grace period over with requests still in flight; stopping anyway"
                );
            }
        }
        Ok(())
    }
}
