//! Logging, tracing and error reporting set-up: JSON lines on stdout for log shippers (or a
//! readable format for a terminal), OpenTelemetry traces over OTLP when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and Sentry for 5xx errors and panics when `SENTRY_DSN` is
//! set.
//!
//! Prevents: logs that cannot be searched by field, and server errors nobody hears about. Each
//! line is one JSON object; lines written during a request carry the request's span
//! (`request_id`, `method`, `route`). Sentry events carry the same request id and the release,
//! and are sent from the one place 500s are rendered (`problem::Render`).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, fmt};

use crate::config::{Environment, LogConfig, LogFormat};

/// Installs logging and tracing (exported when `OTEL_EXPORTER_OTLP_ENDPOINT` is set). Returns the
/// tracer provider to shut down (and so flush) before the process exits.
pub fn init(config: &LogConfig) -> SdkTracerProvider {
    // The filter was validated when the configuration was read.
    let filter = EnvFilter::try_new(&config.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = tracer_provider(config);
    // W3C `traceparent` in (and out, for any call that injects it).
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    // Always installed, so every request has a trace id (the caller's, or a new one) in its logs
    // and problems; spans leave the process only when an exporter is configured.
    let traces =
        tracing_opentelemetry::layer().with_tracer(provider.tracer(env!("CARGO_PKG_NAME")));
    let registry = tracing_subscriber::registry().with(filter).with(traces);
    let result = match config.format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    // The list keeps the request span's fields on events logged inside nested spans.
                    .with_span_list(true),
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
    provider
}

fn tracer_provider(config: &LogConfig) -> SdkTracerProvider {
    let resource = Resource::builder()
        .with_service_name(env!("CARGO_PKG_NAME"))
        .build();
    let builder = SdkTracerProvider::builder().with_resource(resource);
    let Some(endpoint) = config.otlp_endpoint.as_deref() else {
        return builder.build();
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{endpoint}/v1/traces"))
        .with_timeout(config.outbound_timeout)
        .build();
    match exporter {
        Ok(exporter) => builder.with_batch_exporter(exporter).build(),
        Err(error) => {
            eprintln!(
                "cannot set up trace export to {endpoint}: {error}; traces stay in the process"
            );
            builder.build()
        }
    }
}

/// The current request's trace id.
pub fn current_trace_id() -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let context = tracing::Span::current().context();
    let span_context = context.span().span_context().clone();
    span_context
        .is_valid()
        .then(|| span_context.trace_id().to_string())
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
