//! Counts the SQL statements each request runs, by request id: sqlx reports every statement as
//! a `sqlx::query` event inside the request's span. Used to prove there are no N+1 queries.
//! Also keeps the plans Postgres sends back as notices when `auto_explain` logs at `notice` level
//! (see [`explaining`]), to prove which index each query reads.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use tracing::Subscriber;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

static COUNTS: OnceLock<Mutex<HashMap<String, usize>>> = OnceLock::new();
static PLANS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

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

/// The plans of the statements run by the request with this id, as `auto_explain` printed them.
pub fn plans(request_id: &str) -> Vec<String> {
    PLANS
        .lock()
        .map(|plans| {
            plans
                .iter()
                .filter(|(id, _)| id == request_id)
                .map(|(_, plan)| plan.clone())
                .collect()
        })
        .unwrap_or_default()
}

/// A pool on the same database whose sessions send every statement's plan to the client
/// (`auto_explain`, a module shipped with Postgres; loading it needs a superuser, as in the
/// tests). Sequential and bitmap scans and sorts are priced out, so on a test's few rows the
/// planner still picks what it would on many: a plain index scan in the query's order wherever
/// an index can give one, and a scan or a sort only where none can.
pub async fn explaining(db: &sqlx::PgPool) -> sqlx::PgPool {
    let options = db.connect_options().as_ref().clone().options([
        ("session_preload_libraries", "auto_explain"),
        ("auto_explain.log_min_duration", "0"),
        ("auto_explain.log_level", "notice"),
        ("enable_seqscan", "off"),
        ("enable_bitmapscan", "off"),
        ("enable_sort", "off"),
    ]);
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .connect_with(options)
        .await
        .expect("a pool with auto_explain")
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
        let target = event.metadata().target();
        if target != "sqlx::query" && target != "sqlx::postgres::notice" {
            return;
        }
        let Some(scope) = ctx.event_scope(event) else {
            return;
        };
        for span in scope {
            if let Some(RequestId(id)) = span.extensions().get::<RequestId>() {
                if target == "sqlx::postgres::notice" {
                    let mut message = MessageVisitor(String::new());
                    event.record(&mut message);
                    if message.0.contains("plan:")
                        && let Ok(mut plans) = PLANS.lock()
                    {
                        plans.push((id.clone(), message.0));
                    }
                } else if let Some(Ok(mut counts)) = COUNTS.get().map(Mutex::lock) {
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

struct MessageVisitor(String);

impl Visit for MessageVisitor {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.to_owned();
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}
