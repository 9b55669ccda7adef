//! Idempotency keys (IETF draft-ietf-httpapi-idempotency-key-header, with Stripe's practice).
//!
//! Prevents: double orders when a client retries after a timeout, a network blip or a crash. The
//! key and the response are stored in Postgres in the same transaction as the effect, so either
//! both exist or neither does; a primary key on (principal, method, route, key), not an in-process
//! lock, decides which of several racing duplicates runs, so any number of instances behave as
//! one. The rules (see `docs/idempotency.md`):
//! - same key, same request → the stored status, headers and body again, with
//!   `Idempotent-Replayed: true`, even if the resource has changed since;
//! - same key, different request (method, path, body) → 422 `idempotency_key_reused`;
//! - same key while the first is still running → 409 `idempotency_key_in_use` with `Retry-After`;
//! - rejections before the handler (401, 403, 413, 415, 422 validation), a missing or stale
//!   `If-Match` (428, 412), 429 and 5xx are not stored: the client may retry with the same key;
//! - keys are scoped per principal, kept `IDEMPOTENCY_RETENTION_HOURS` (≥ 24), then purged by the
//!   worker ([`purge_expired`]).

use std::time::Duration;

use aws_lc_rs::digest;
use axum::body::Body;
use axum::extract::{FromRequestParts, MatchedPath};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use sqlx::{Acquire, PgConnection, PgPool};
use uuid::Uuid;

use crate::problem::{ErrorCode, Problem};

pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The metric counting replayed responses.
pub const REPLAYS: &str = "idempotency_replays_total";

/// A request's idempotency context: its key (if sent) and what scopes and fingerprints it.
#[derive(Debug, Clone)]
pub struct Idempotency {
    key: Option<String>,
    method: String,
    route: String,
    path: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Idempotency {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let key = parts
            .headers
            .get(IDEMPOTENCY_KEY)
            .map(parse_key)
            .transpose()?;
        let route = parts.extensions.get::<MatchedPath>().map_or_else(
            || parts.uri.path().to_owned(),
            |route| route.as_str().to_owned(),
        );
        Ok(Idempotency {
            key,
            method: parts.method.as_str().to_owned(),
            route,
            path: parts.uri.path().to_owned(),
        })
    }
}

/// Accepts the bare form (`abc`) and the structured-field string form (`"abc"`): 1–255 printable
/// ASCII characters.
fn parse_key(value: &HeaderValue) -> Result<String, Problem> {
    let invalid = || {
        Problem::new(
            ErrorCode::IdempotencyKeyInvalid,
            "`Idempotency-Key` must be 1-255 printable ASCII characters.",
        )
    };
    let raw = value.to_str().map_err(|_| invalid())?;
    let key = raw
        .strip_prefix('"')
        .and_then(|inner| inner.strip_suffix('"'))
        .unwrap_or(raw);
    let printable = key.bytes().all(|byte| (0x20..=0x7e).contains(&byte));
    if (1..=255).contains(&key.len()) && printable {
        Ok(key.to_owned())
    } else {
        Err(invalid())
    }
}

/// The result of a write, in a form that can be stored and replayed byte for byte.
#[derive(Debug, Clone)]
pub struct Outcome {
    status: StatusCode,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Vec<u8>,
}

impl Outcome {
    pub fn json(status: StatusCode, body: &impl Serialize) -> Result<Self, Problem> {
        Ok(Outcome {
            status,
            headers: Vec::new(),
            body: serde_json::to_vec(body).map_err(Problem::internal)?,
        })
    }

    /// The body as it will be sent and stored, e.g. for an ETag of the representation.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    pub fn header(mut self, name: HeaderName, value: &str) -> Result<Self, Problem> {
        self.headers.push((
            name,
            HeaderValue::from_str(value).map_err(Problem::internal)?,
        ));
        Ok(self)
    }
}

impl IntoResponse for Outcome {
    fn into_response(self) -> Response {
        let mut response = (self.status, Body::from(self.body)).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        for (name, value) in self.headers {
            response.headers_mut().insert(name, value);
        }
        response
    }
}

/// What is stored for a key: a success, or a client error the handler decided on.
#[derive(Debug, Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Stored {
    Success {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    },
    /// Field errors are not kept: handlers decide only on whole-request errors (409, 412, 404);
    /// validation failures happen before the key is claimed.
    Problem {
        code: String,
        detail: String,
        headers: Vec<(String, String)>,
    },
}

/// Which handler outcomes are stored and replayed: successes and the client errors the handler
/// decided on. Server errors are not (the client should retry them), nor is a 429 (it says "later",
/// not "never"), nor a missing `If-Match` (428), which rejects the request's form like validation
/// does, nor a stale one (412): it changed nothing, and the client's next step, re-reading and
/// retrying with the new ETag, is the same request by the fingerprint and must run.
fn is_replayable(problem: &Problem) -> bool {
    let status = problem.code().status();
    !status.is_server_error()
        && status != StatusCode::TOO_MANY_REQUESTS
        && problem.code() != ErrorCode::PreconditionRequired
        && problem.code() != ErrorCode::PreconditionFailed
}

fn header_pairs(headers: &[(HeaderName, HeaderValue)]) -> Vec<(String, String)> {
    headers
        .iter()
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_owned())))
        .collect()
}

impl Idempotency {
    /// 400 `idempotency_key_required` unless a key was sent.
    pub fn require_key(&self) -> Result<(), Problem> {
        match self.key {
            Some(_) => Ok(()),
            None => Err(Problem::new(
                ErrorCode::IdempotencyKeyRequired,
                "This operation needs an `Idempotency-Key` header.",
            )),
        }
    }

    /// Runs `effect` in a transaction. With a key: claims it first (replaying or rejecting as
    /// the rules say), and stores a success in the same transaction. A client error the effect
    /// decides on is stored too, after its transaction is rolled back (see below). Keys are
    /// scoped to `principal_id`, whoever your callers are. `effect` should evaluate
    /// preconditions (`If-Match`) itself, so that a replay wins over a precondition that has
    /// since become false.
    pub async fn run(
        self,
        db: &PgPool,
        principal_id: Uuid,
        body_digest: &[u8],
        effect: impl AsyncFnOnce(&mut PgConnection) -> Result<Outcome, Problem>,
    ) -> Result<Response, Problem> {
        let Some(key) = &self.key else {
            let mut tx = db.begin().await?;
            let outcome = effect(&mut tx).await?;
            tx.commit().await?;
            return Ok(outcome.into_response());
        };
        // One connection for both transactions below: a client error already decided must not
        // wait for the pool again, or turn into a 503 when the pool is busy.
        let mut conn = db.acquire().await?;
        let mut tx = conn.begin().await?;
        let fingerprint = self.fingerprint(body_digest);
        if let Some(replay) = self.claim(&mut tx, principal_id, key, &fingerprint).await? {
            return Ok(replay);
        }
        let result = effect(&mut tx).await;
        let stored = match &result {
            Ok(outcome) => Stored::Success {
                status: outcome.status.as_u16(),
                headers: header_pairs(&outcome.headers),
                body: String::from_utf8_lossy(&outcome.body).into_owned(),
            },
            // Not stored: the whole transaction, key included, rolls back, and the client may
            // retry with the same key.
            Err(problem) if !is_replayable(problem) => {
                return result.map(IntoResponse::into_response);
            }
            // Whatever the effect wrote before it failed is undone with the whole transaction,
            // and the key is claimed again, in a transaction of its own, to store the error. (A
            // savepoint after the claim would keep the key instead, at the cost of one more round
            // trip on every keyed request that succeeds.)
            Err(problem) => {
                tx.rollback().await?;
                tx = conn.begin().await?;
                match self.claim(&mut tx, principal_id, key, &fingerprint).await {
                    Ok(None) => {}
                    // A duplicate ran in the moment between and stored its answer: the key's
                    // answer is that one (a stored client error comes back as `Err`, below).
                    Ok(Some(replay)) => return Ok(replay),
                    // A duplicate is running now and will store its own answer.
                    Err(in_use) if in_use.code() == ErrorCode::IdempotencyKeyInUse => {
                        return result.map(IntoResponse::into_response);
                    }
                    Err(other) => return Err(other),
                }
                Stored::Problem {
                    code: problem.code().as_str().to_owned(),
                    detail: problem.detail().to_owned(),
                    headers: header_pairs(problem.headers()),
                }
            }
        };
        let stored = serde_json::to_value(&stored).map_err(Problem::internal)?;
        sqlx::query!(
            "UPDATE idempotency_keys SET response = $5
             WHERE principal_id = $1 AND method = $2 AND route = $3 AND key = $4",
            principal_id,
            self.method,
            self.route,
            key,
            stored,
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        result.map(IntoResponse::into_response)
    }

    /// Same method, same path (so the same target resource), same canonical body. Not
    /// `If-Match`: a client that lost the answer may re-read the order and retry with the new
    /// ETag, and must get the stored answer, not a 422 (preconditions come after the key).
    fn fingerprint(&self, body_digest: &[u8]) -> Vec<u8> {
        let message = [
            self.method.as_bytes(),
            b"\n",
            self.path.as_bytes(),
            b"\n",
            body_digest,
        ]
        .concat();
        digest::digest(&digest::SHA256, &message).as_ref().to_vec()
    }

    /// Inserts the key, or explains why this request must not run: `Some(replay)` for a finished
    /// duplicate, an error for a reused or in-flight key. An in-flight duplicate holds the key's
    /// unique-index entry until its transaction ends; the claim waits for it only 100 ms
    /// (`claim_idempotency_key`'s own lock timeout, in `migrations/`), because the point is to tell
    /// the client to come back, not to hold a connection. The timeout aborts the transaction,
    /// which is what we want then.
    #[tracing::instrument(name = "idempotency.claim", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
    async fn claim(
        &self,
        conn: &mut PgConnection,
        principal_id: Uuid,
        key: &str,
        fingerprint: &[u8],
    ) -> Result<Option<Response>, Problem> {
        let inserted = sqlx::query_scalar!(
            r#"SELECT claim_idempotency_key($1, $2, $3, $4, $5) AS "inserted!""#,
            principal_id,
            self.method,
            self.route,
            key,
            fingerprint,
        )
        .fetch_one(&mut *conn)
        .await;
        match inserted {
            Ok(true) => return Ok(None),
            Ok(false) => {}
            Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("55P03") => {
                return Err(in_use());
            }
            Err(error) => return Err(error.into()),
        }

        let existing = sqlx::query!(
            "SELECT fingerprint, response FROM idempotency_keys
             WHERE principal_id = $1 AND method = $2 AND route = $3 AND key = $4",
            principal_id,
            self.method,
            self.route,
            key,
        )
        .fetch_optional(&mut *conn)
        .await?;
        // Gone between the insert and the select: purged or rolled back; the client may retry.
        let Some(existing) = existing else {
            return Err(in_use());
        };
        if existing.fingerprint != fingerprint {
            return Err(Problem::new(
                ErrorCode::IdempotencyKeyReused,
                "This `Idempotency-Key` was used for a different request; use a new key for a new request.",
            ));
        }
        let Some(response) = existing.response else {
            return Err(in_use());
        };
        let stored: Stored = serde_json::from_value(response).map_err(Problem::internal)?;
        Ok(Some(replay(stored)?))
    }
}

fn in_use() -> Problem {
    Problem::new(
        ErrorCode::IdempotencyKeyInUse,
        "A request with this `Idempotency-Key` is still in progress.",
    )
    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
}

fn replay(stored: Stored) -> Result<Response, Problem> {
    metrics::counter!(REPLAYS).increment(1);
    let replayed = HeaderValue::from_static("true");
    let parse = |name: String, value: String| -> Result<(HeaderName, HeaderValue), Problem> {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(Problem::internal)?;
        Ok((
            name,
            HeaderValue::from_str(&value).map_err(Problem::internal)?,
        ))
    };
    match stored {
        Stored::Success {
            status,
            headers,
            body,
        } => {
            let status = StatusCode::from_u16(status).map_err(Problem::internal)?;
            let headers = headers
                .into_iter()
                .map(|(name, value)| parse(name, value))
                .collect::<Result<_, _>>()?;
            let mut response = Outcome {
                status,
                headers,
                body: body.into_bytes(),
            }
            .into_response();
            response.headers_mut().insert(IDEMPOTENT_REPLAYED, replayed);
            Ok(response)
        }
        Stored::Problem {
            code,
            detail,
            headers,
        } => {
            let code = ErrorCode::from_name(&code).ok_or_else(|| {
                Problem::internal(anyhow::anyhow!("unknown stored error code {code}"))
            })?;
            let mut problem = Problem::new(code, detail).with_header(IDEMPOTENT_REPLAYED, replayed);
            for (name, value) in headers {
                let (name, value) = parse(name, value)?;
                problem = problem.with_header(name, value);
            }
            Err(problem)
        }
    }
}

/// Deletes keys older than `retention`, in batches so that no single statement holds locks for
/// long, stopping between batches once `stop` is cancelled (a shutting-down worker finishes the
/// batch it is in, then stops). Returns how many were deleted. Called on a schedule by the worker.
pub async fn purge_expired(
    db: &PgPool,
    retention: Duration,
    stop: &tokio_util::sync::CancellationToken,
) -> sqlx::Result<u64> {
    const BATCH: i64 = 5_000;
    let mut deleted = 0;
    loop {
        let done = sqlx::query!(
            "DELETE FROM idempotency_keys WHERE (principal_id, method, route, key) IN (
                 SELECT principal_id, method, route, key FROM idempotency_keys
                 WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)",
            retention.as_secs_f64(),
            BATCH,
        )
        .execute(db)
        .await?;
        deleted += done.rows_affected();
        if done.rows_affected() < BATCH as u64 || stop.is_cancelled() {
            return Ok(deleted);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_bare_or_quoted_printable_ascii_up_to_255() {
        let parse = |raw: &str| parse_key(&HeaderValue::from_str(raw).unwrap());
        assert_eq!(parse("abc-123").unwrap(), "abc-123");
        assert_eq!(parse("\"abc 123\"").unwrap(), "abc 123");
        assert_eq!(parse(&"k".repeat(255)).unwrap().len(), 255);
        for bad in ["", "\"\"", &"k".repeat(256)] {
            assert_eq!(
                parse(bad).unwrap_err().code(),
                ErrorCode::IdempotencyKeyInvalid,
                "{bad:?}"
            );
        }
        let non_ascii = HeaderValue::from_bytes("clé".as_bytes()).unwrap();
        assert!(parse_key(&non_ascii).is_err());
    }
}
