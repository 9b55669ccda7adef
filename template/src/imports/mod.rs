//! The imports API: upload a CSV of order lines, follow the import's progress, read its row errors.
//!
//! The request only stores the file and enqueues a job (202 in milliseconds, whatever the file's
//! size); the rows are processed by the worker process (`job`, whose steps are in `pipeline`).
//! Rules for one row are the orders API's own (`domain`), SQL lives in `store`, the CSV reader in
//! `csv`.

pub mod csv;
pub mod domain;
pub mod job;
mod pipeline;
pub mod store;
mod upload;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;

use crate::app::AppState;
use crate::auth::Principal;
use crate::conditional::{self, IfNoneMatch};
use crate::extract::{Path, Query};
use crate::idempotency::{Idempotency, Outcome};
use crate::pagination::{Keyset, Page, PageParams, Position, split_page};
use crate::problem::{ErrorCode, Problem};
use crate::request_id::REQUEST_ID_HEADER;
use domain::ImportStatus;
use job::ImportJob;
use store::{Import, StoredError};

/// How soon a client polling an unfinished import should ask again.
const POLL_AFTER_SECONDS: HeaderValue = HeaderValue::from_static("2");

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_import, list_imports))
        .routes(routes!(get_import))
        .routes(routes!(list_import_errors))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImportView {
    pub id: Uuid,
    pub status: ImportStatus,
    /// Data rows in the file (the header excluded).
    pub total_rows: i32,
    /// Rows read and validated so far.
    pub processed_rows: i32,
    /// Orders created (or found already created by an earlier import of the same rows).
    pub imported_orders: i32,
    /// Orders left out because at least one of their rows is invalid.
    pub rejected_orders: i32,
    /// Rows with at least one error (see `/v1/imports/{id}/errors`).
    pub failed_rows: i32,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

impl From<Import> for ImportView {
    fn from(import: Import) -> Self {
        ImportView {
            id: import.id,
            status: import.status,
            total_rows: import.total_rows,
            processed_rows: import.processed_rows,
            imported_orders: import.imported_orders,
            rejected_orders: import.rejected_orders,
            failed_rows: import.failed_rows,
            created_at: import.created_at,
            started_at: import.started_at,
            finished_at: import.finished_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ImportErrorView {
    /// 1-based data row (the header is row 0).
    #[schema(example = 3)]
    pub row: i32,
    #[schema(example = "quantity")]
    pub field: String,
    #[schema(example = "range")]
    pub code: String,
    #[schema(example = "must be between 1 and 10000")]
    pub message: String,
}

/// The documented shapes of the two lists.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ImportPage {
    data: Vec<ImportView>,
    /// Pass as `cursor` to get the next page. Always present: `null` on the last page.
    #[schema(required = true)]
    next_cursor: Option<String>,
}

#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ImportErrorPage {
    data: Vec<ImportErrorView>,
    /// Pass as `cursor` to get the next page. Always present: `null` on the last page.
    #[schema(required = true)]
    next_cursor: Option<String>,
}

/// A position in the errors list, ordered by row, then by the order they were found in.
#[derive(Debug, Clone, Copy)]
struct ErrorPosition {
    row: i32,
    id: i64,
}

impl Position for ErrorPosition {
    fn start() -> Self {
        ErrorPosition { row: 0, id: 0 }
    }

    fn to_bytes(&self) -> Vec<u8> {
        [&self.row.to_be_bytes()[..], &self.id.to_be_bytes()].concat()
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let (row, id) = bytes.split_at_checked(4)?;
        Some(ErrorPosition {
            row: i32::from_be_bytes(row.try_into().ok()?),
            id: i64::from_be_bytes(id.try_into().ok()?),
        })
    }
}

/// The import, if it exists and `principal` may see it; another customer's import is reported
/// exactly like a missing one.
fn visible_to(import: Option<Import>, principal: &Principal) -> Result<Import, Problem> {
    import
        .filter(|import| principal.is_admin() || import.owner_id == principal.user_id)
        .ok_or_else(|| Problem::new(ErrorCode::NotFound, "No import with this id."))
}

fn is_csv(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("text/csv"))
}

/// Start an import: upload a CSV file of order lines.
///
/// The body is the file (`Content-Type: text/csv`). The header row must be
/// `external_ref,currency,sku,quantity,unit_price_cents`, optionally followed by `note`. Rows with
/// the same `external_ref` become one draft order; an order with any invalid row is not created.
/// The file is stored and the rows are processed in the background: poll the `Location`.
#[utoipa::path(
    post,
    path = "/v1/imports",
    tag = "imports",
    request_body(content = String, content_type = "text/csv", description = "The CSV file, at most `IMPORT_MAX_BYTES` (20 MiB by default).",
        example = "external_ref,currency,sku,quantity,unit_price_cents,note\nPO-1001,EUR,BOOK-1,2,1250,gift wrap\nPO-1001,EUR,PEN-7,10,199,\n"),
    params(("Idempotency-Key" = String, Header, description = "1-255 printable ASCII characters; required.")),
    responses(
        (status = ACCEPTED, description = "Stored and queued.", body = ImportView,
            headers(("Location" = String, description = "The import's URL."), ("ETag" = String, description = "The import as it is now; poll with `If-None-Match`."))),
        (status = BAD_REQUEST, description = "`idempotency_key_required`, `idempotency_key_invalid`, or `malformed_body` (a row longer than 64 KiB).", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = CONFLICT, description = "`idempotency_key_in_use`, with `Retry-After`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = PAYLOAD_TOO_LARGE, description = "`payload_too_large`: over the size or row-count cap.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = UNSUPPORTED_MEDIA_TYPE, description = "`unsupported_media_type`: not `text/csv`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = UNPROCESSABLE_ENTITY, description = "`invalid_csv_header` or `idempotency_key_reused`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = TOO_MANY_REQUESTS, description = "`too_many_imports`: as many imports queued or running as allowed; or `rate_limited`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
    ),
)]
pub async fn create_import(
    State(state): State<AppState>,
    principal: Principal,
    idempotency: Idempotency,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Problem> {
    if !is_csv(&headers) {
        return Err(Problem::new(
            ErrorCode::UnsupportedMediaType,
            "An import's body must be `text/csv`.",
        ));
    }
    idempotency.require_key()?;
    let id = Uuid::now_v7();
    let request_id = headers
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let upload = match upload::receive(
        &state.db,
        id,
        body,
        state.imports.max_bytes,
        state.imports.max_rows,
    )
    .await
    {
        Ok(upload) => upload,
        Err(problem) => {
            discard_upload(&state, id).await;
            return Err(problem);
        }
    };
    let mut created = false;
    let response = idempotency
        .run(&state.db, principal.user_id, &upload.digest, async |conn| {
            store::lock_owner(conn, principal.user_id).await?;
            if store::count_active(conn, principal.user_id).await?
                >= state.imports.max_active_per_user
            {
                return Err(Problem::new(
                    ErrorCode::TooManyImports,
                    format!(
                        "At most {} imports may be queued or running at once.",
                        state.imports.max_active_per_user
                    ),
                )
                .with_header(header::RETRY_AFTER, POLL_AFTER_SECONDS));
            }
            let import = store::insert(
                conn,
                id,
                principal.user_id,
                upload.size_bytes,
                upload.rows,
                request_id.as_deref(),
            )
            .await?;
            let job = ImportJob {
                import_id: id,
                request_id: request_id.clone(),
            };
            crate::jobs::enqueue(conn, job::QUEUE, &job, state.jobs.max_attempts)
                .await
                .map_err(Problem::internal)?;
            created = true;
            let outcome = Outcome::json(StatusCode::ACCEPTED, &ImportView::from(import))?;
            let etag = conditional::etag_of(outcome.body());
            outcome
                .header(header::LOCATION, &format!("/v1/imports/{id}"))?
                .header(header::ETAG, &etag)
        })
        .await;
    if !created {
        // A replay or a refusal: the file just stored belongs to no import. (After a failed
        // commit the import may exist after all; the worker's cleanup removes the file if not.)
        discard_upload(&state, id).await;
    }
    response
}

async fn discard_upload(state: &AppState, id: Uuid) {
    if let Err(error) = store::delete_upload(&state.db, id).await {
        tracing::warn!(%error, import_id = %id, "could not remove an unused upload; the worker's cleanup will");
    }
}

/// Your imports, newest first.
#[utoipa::path(
    get,
    path = "/v1/imports",
    tag = "imports",
    params(PageParams),
    responses(
        (status = OK, description = "One page. When there is a next page, `Link: <url>; rel=\"next\"` points to it.", body = ImportPage),
        (status = BAD_REQUEST, description = "`invalid_cursor` or `invalid_parameter`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
    ),
)]
pub async fn list_imports(
    State(state): State<AppState>,
    principal: Principal,
    Query(page): Query<PageParams>,
) -> Result<Response, Problem> {
    let binding = format!("imports|{}", principal.user_id);
    let request = state.cursors.request::<Keyset>(&page, &binding)?;
    let mut conn = state.db.acquire().await?;
    let rows = store::list(
        &mut conn,
        principal.user_id,
        request.after,
        request.limit + 1,
    )
    .await?;
    let (imports, last) = split_page(rows, request.limit, |import| Keyset {
        created_at: import.created_at,
        id: import.id,
    });
    let next = last.map(|position| state.cursors.encode(position, &binding));
    Page {
        data: imports
            .into_iter()
            .map(ImportView::from)
            .collect::<Vec<_>>(),
        next_cursor: next,
    }
    .into_response_with_link(&format!("/v1/imports?limit={}", request.limit))
}

/// One import and its progress. While it is `queued` or `running`, `Retry-After` says when to
/// poll again; send `If-None-Match` with the `ETag` to get 304 while nothing has moved.
#[utoipa::path(
    get,
    path = "/v1/imports/{id}",
    tag = "imports",
    params(("id" = Uuid, Path, description = "Import id.")),
    responses(
        (status = OK, description = "The import.", body = ImportView,
            headers(("ETag" = String, description = "Changes whenever the import's progress does."),
                ("Retry-After" = String, description = "Seconds until the next poll, while the import is not finished."))),
        (status = NOT_MODIFIED, description = "Unchanged since the `ETag` in `If-None-Match`.",
            headers(("ETag" = String), ("Retry-After" = String, description = "As for 200."))),
    ),
)]
pub async fn get_import(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    if_none_match: IfNoneMatch,
) -> Result<Response, Problem> {
    let mut conn = state.db.acquire().await?;
    let import = visible_to(store::find(&mut conn, id).await?, &principal)?;
    let finished = import.status.is_finished();
    // Clients poll this until the import finishes: most polls change nothing and get a 304.
    let body = serde_json::to_vec(&ImportView::from(import)).map_err(Problem::internal)?;
    let etag = conditional::etag_of(&body);
    let mut response = match if_none_match.not_modified(&etag) {
        Some(not_modified) => not_modified,
        None => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ),
                (
                    header::ETAG,
                    HeaderValue::from_str(&etag).map_err(Problem::internal)?,
                ),
                (header::CACHE_CONTROL, conditional::REVALIDATE),
            ],
            body,
        )
            .into_response(),
    };
    if !finished {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, POLL_AFTER_SECONDS);
    }
    Ok(response)
}

/// The import's row errors, by row.
#[utoipa::path(
    get,
    path = "/v1/imports/{id}/errors",
    tag = "imports",
    params(("id" = Uuid, Path, description = "Import id."), PageParams),
    responses(
        (status = OK, description = "One page of errors.", body = ImportErrorPage),
        (status = BAD_REQUEST, description = "`invalid_cursor` or `invalid_parameter`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
    ),
)]
pub async fn list_import_errors(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    Query(page): Query<PageParams>,
) -> Result<Response, Problem> {
    let binding = format!("import-errors|{id}|{}", principal.user_id);
    let request = state.cursors.request::<ErrorPosition>(&page, &binding)?;
    let mut conn = state.db.acquire().await?;
    visible_to(store::find(&mut conn, id).await?, &principal)?;
    let after = (request.after.row, request.after.id);
    let rows = store::errors(&mut conn, id, after, request.limit + 1).await?;
    let (errors, last) = split_page(rows, request.limit, |error: &StoredError| ErrorPosition {
        row: error.row,
        id: error.id,
    });
    let next = last.map(|position| state.cursors.encode(position, &binding));
    let data = errors
        .into_iter()
        .map(|error| ImportErrorView {
            row: error.row,
            field: error.field,
            code: error.code,
            message: error.message,
        })
        .collect();
    Page {
        data,
        next_cursor: next,
    }
    .into_response_with_link(&format!("/v1/imports/{id}/errors?limit={}", request.limit))
}
