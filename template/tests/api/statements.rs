//! Counts the SQL statements each request runs, by request id: sqlx reports every statement as
//! a `sqlx::query` event inside the request's span. Used to prove there are no N+1 queries.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

static COUNTS: OnceLock<Mutex<HashMap<String, usize>>> = OnceLock::new();

/// Installs the counter as the test binary's global subscriber (once).
pub fn install() {
    COUNTS.get_or_init(|| {
        let subscriber = tracing_subscriber::registry().with(StatementCounter);
        // Another test may have installed it first; either way counting is on.
        let _ = tracing::subscriber::set_global_default(subscriber);
        Mutex::new(HashMap::new())
    });
}

/// Statements run so far by the request with this id.
pub fn count(request_id: &str) -> usize {
    COUNTS
        .get()
        .and_then(|counts| counts.lock().ok()?.get(request_id).copied())
        .unwrap_or(0)
}

struct RequestId(String);

struct StatementCounter;

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for StatementCounter {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        if attrs.metadata().name() != "request" {
            return;
        }
        let mut visitor = RequestIdVisitor(None);
        attrs.record(&mut visitor);
        if let (Some(request_id), Some(span)) = (visitor.0, ctx.span(id)) {
            span.extensions_mut().insert(RequestId(request_id));
        }
    }

    fn on_event(&self, event: &tracing::Event<'_>, ctx: Context<'_, S>) {
        if event.metadata().target() != "sqlx::query" {
            return;
        }
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            if let Some(RequestId(id)) = span.extensions().get::<RequestId>() {
                if let Some(Ok(mut counts)) = COUNTS.get().map(Mutex::lock) {
                    *counts.entry(id.clone()).or_default() += 1;
                }
                return;
            }
        }
    }
}

struct RequestIdVisitor(Option<String>);

impl Visit for RequestIdVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "request_id" {
            self.0 = Some(value.to_owned());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "request_id" {
            self.0 = Some(format!("{value:?}").trim_matches('"').to_owned());
        }
    }
}
