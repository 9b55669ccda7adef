//! Graceful shutdown: fail readiness first, keep serving while load balancers notice, then stop
//! accepting and let in-flight requests finish, within a bounded grace period.
//!
//! Prevents: dropped requests on every deploy. Killing a pod the moment SIGTERM arrives cuts
//! in-flight requests, and so does closing the listener before the load balancer has stopped
//! routing to it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio_util::sync::CancellationToken;

use crate::config::ShutdownConfig;

/// Whether this process should receive traffic. `/readyz` reports it.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    shutting_down: Arc<AtomicBool>,
}

impl Readiness {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }
}

/// Resolves on SIGTERM (orchestrators) or SIGINT/Ctrl-C (terminals). The handlers are installed
/// when this is called, not when the future is first polled: call it before announcing that the
/// process is up, or a SIGTERM arriving in between kills the process without a graceful stop.
#[cfg(unix)]
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let sigterm = signal(SignalKind::terminate());
    let sigint = signal(SignalKind::interrupt());
    async move {
        match (sigterm, sigint) {
            (Ok(mut sigterm), Ok(mut sigint)) => {
                tokio::select! {
                    _ = sigterm.recv() => {}
                    _ = sigint.recv() => {}
                }
            }
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(%error, "cannot listen for shutdown signals; stop the process with SIGKILL");
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(not(unix))]
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Runs the shutdown sequence once `trigger` resolves: readiness fails, then after the readiness
/// delay the returned token is cancelled, which tells the listeners to stop accepting.
pub fn sequence(
    trigger: impl Future<Output = ()> + Send + 'static,
    readiness: Readiness,
    config: &ShutdownConfig,
) -> CancellationToken {
    let stop_accepting = CancellationToken::new();
    let token = stop_accepting.clone();
    let delay = config.readiness_delay;
    tokio::spawn(async move {
        trigger.await;
        readiness.begin_shutdown();
        tracing::info!(
            delay_secs = delay.as_secs(),
            "shutdown requested: readiness now fails"
        );
        tokio::time::sleep(delay).await;
        tracing::info!("no longer accepting connections; draining in-flight requests");
        token.cancel();
    });
    stop_accepting
}
