//! Logging and error reporting set-up: JSON lines on stdout for log shippers (or a readable
//! format for a terminal), and Sentry for 5xx errors and panics when `SENTRY_DSN` is set.
//!
//! Prevents: logs that cannot be searched by field, and server errors nobody hears about. Each
//! line is one JSON object; lines written during a request carry the request's span
//! (`request_id`, `method`, `route`). Sentry events carry the same request id and the release,
//! and are sent from the one place 500s are rendered (`problem::render`).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, fmt};

use crate::config::{Environment, LogConfig, LogFormat};

pub fn init(config: &LogConfig) {
    // The filter was validated when the configuration was read.
    let filter = EnvFilter::try_new(&config.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match config.format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Pretty => registry.with(fmt::layer()).try_init(),
    };
    if let Err(error) = result {
        eprintln!("logging was already initialised: {error}");
    }
    // A panic is reported as a log line inside the current request's span (so it carries the
    // request id), instead of plain text on stderr. `CatchPanicLayer` then answers 500.
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(panic = %info, "panic");
    }));
}

/// Starts the Sentry client when a DSN is configured; keep the guard alive for the process'
/// lifetime (dropping it flushes pending events). Without a DSN nothing is sent.
pub fn init_sentry(
    config: &LogConfig,
    environment: Environment,
) -> Option<sentry::ClientInitGuard> {
    let dsn = config.sentry_dsn.as_ref()?;
    let options = sentry::ClientOptions::new()
        .dsn(secrecy::ExposeSecret::expose_secret(dsn))
        .release(concat!(
            env!("CARGO_PKG_NAME"),
            "@",
            env!("CARGO_PKG_VERSION")
        ))
        .environment(match environment {
            Environment::Production => "production",
            Environment::Development => "development",
        });
    Some(sentry::init(options))
}
