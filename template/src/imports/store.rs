//! The SQL for imports: the stored upload, the import row and its counters, staged rows, row
//! errors, and the batches of orders an import creates. Each job step commits its
//! effects together with the counters and checkpoint that describe them.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use super::domain::{ImportStatus, KeyedRow, RowError, StoredRow};
use crate::orders::domain::{LineItem, NewOrder};
use crate::pagination::Keyset;

#[derive(Debug, Clone)]
pub struct Import {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub status: ImportStatus,
    pub size_bytes: i64,
    pub total_rows: i32,
    pub processed_rows: i32,
    pub imported_orders: i32,
    pub rejected_orders: i32,
    pub failed_rows: i32,
    pub rows_together: Option<bool>,
    pub staged: bool,
    pub grouped_through: Option<String>,
    pub request_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

struct ImportRow {
    id: Uuid,
    owner_id: Uuid,
    status: String,
    size_bytes: i64,
    total_rows: i32,
    processed_rows: i32,
    imported_orders: i32,
    rejected_orders: i32,
    failed_rows: i32,
    rows_together: Option<bool>,
    staged: bool,
    grouped_through: Option<String>,
    request_id: Option<String>,
    created_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl TryFrom<ImportRow> for Import {
    type Error = sqlx::Error;

    fn try_from(row: ImportRow) -> sqlx::Result<Import> {
        let status = ImportStatus::from_stored(&row.status)
            .map_err(|error| sqlx::Error::Decode(error.into()))?;
        Ok(Import {
            id: row.id,
            owner_id: row.owner_id,
            status,
            size_bytes: row.size_bytes,
            total_rows: row.total_rows,
            processed_rows: row.processed_rows,
            imported_orders: row.imported_orders,
            rejected_orders: row.rejected_orders,
            failed_rows: row.failed_rows,
            rows_together: row.rows_together,
            staged: row.staged,
            grouped_through: row.grouped_through,
            request_id: row.request_id,
            created_at: row.created_at,
            started_at: row.started_at,
            finished_at: row.finished_at,
        })
    }
}

// ---- The upload -------------------------------------------------------------------------------

#[tracing::instrument(name = "import_files.insert", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn insert_chunk(db: &PgPool, import_id: Uuid, seq: i32, data: &[u8]) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO import_files (import_id, seq, data) VALUES ($1, $2, $3)",
        import_id,
        seq,
        data,
    )
    .execute(db)
    .await?;
    Ok(())
}

#[tracing::instrument(name = "import_files.read", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn chunk(db: &PgPool, import_id: Uuid, seq: i32) -> sqlx::Result<Option<Vec<u8>>> {
    sqlx::query_scalar!(
        "SELECT data FROM import_files WHERE import_id = $1 AND seq = $2",
        import_id,
        seq,
    )
    .fetch_optional(db)
    .await
}

pub async fn delete_upload(db: &PgPool, import_id: Uuid) -> sqlx::Result<()> {
    sqlx::query!("DELETE FROM import_files WHERE import_id = $1", import_id)
        .execute(db)
        .await?;
    Ok(())
}

// ---- Imports ----------------------------------------------------------------------------------

/// Serialises the imports of one owner until the transaction ends, so that two uploads finishing
/// together cannot both pass the cap on active imports.
pub async fn lock_owner(conn: &mut PgConnection, owner: Uuid) -> sqlx::Result<()> {
    sqlx::query!(
        "SELECT pg_advisory_xact_lock(hashtextextended('imports:' || $1::uuid::text, 0))",
        owner,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn count_active(conn: &mut PgConnection, owner: Uuid) -> sqlx::Result<i64> {
    let count = sqlx::query_scalar!(
        r#"SELECT count(*) AS "count!" FROM imports
           WHERE owner_id = $1 AND status IN ('queued', 'running')"#,
        owner,
    )
    .fetch_one(conn)
    .await?;
    Ok(count)
}

#[tracing::instrument(name = "imports.insert", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn insert(
    conn: &mut PgConnection,
    id: Uuid,
    owner: Uuid,
    size_bytes: i64,
    total_rows: i32,
    request_id: Option<&str>,
) -> sqlx::Result<Import> {
    sqlx::query_as!(
        ImportRow,
        "INSERT INTO imports (id, owner_id, size_bytes, total_rows, request_id)
         VALUES ($1, $2, $3, $4, $5)
         RETURNING id, owner_id, status, size_bytes, total_rows, processed_rows, imported_orders,
                   rejected_orders, failed_rows, rows_together, staged, grouped_through, request_id,
                   created_at, started_at, finished_at",
        id,
        owner,
        size_bytes,
        total_rows,
        request_id,
    )
    .fetch_one(conn)
    .await?
    .try_into()
}

#[tracing::instrument(name = "imports.find", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn find(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<Import>> {
    sqlx::query_as!(
        ImportRow,
        "SELECT id, owner_id, status, size_bytes, total_rows, processed_rows, imported_orders,
                rejected_orders, failed_rows, rows_together, staged, grouped_through, request_id,
                created_at, started_at, finished_at
         FROM imports WHERE id = $1",
        id,
    )
    .fetch_optional(conn)
    .await?
    .map(Import::try_from)
    .transpose()
}

/// One page of `owner`'s imports, newest first, strictly after `after`.
#[tracing::instrument(name = "imports.list", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn list(
    conn: &mut PgConnection,
    owner: Uuid,
    after: Keyset,
    limit: i64,
) -> sqlx::Result<Vec<Import>> {
    sqlx::query_as!(
        ImportRow,
        "SELECT id, owner_id, status, size_bytes, total_rows, processed_rows, imported_orders,
                rejected_orders, failed_rows, rows_together, staged, grouped_through, request_id,
                created_at, started_at, finished_at
         FROM imports WHERE owner_id = $1 AND (created_at, id) < ($2, $3)
         ORDER BY created_at DESC, id DESC LIMIT $4",
        owner,
        after.created_at,
        after.id,
        limit,
    )
    .fetch_all(conn)
    .await?
    .into_iter()
    .map(Import::try_from)
    .collect()
}

/// A row error as served by `GET /v1/imports/{id}/errors`, with its position in that list.
#[derive(Debug, Clone)]
pub struct StoredError {
    pub id: i64,
    pub row: i32,
    pub field: String,
    pub code: String,
    pub message: String,
}

/// One page of an import's row errors in (row, id) order, strictly after `after`.
#[tracing::instrument(name = "import_errors.list", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn errors(
    conn: &mut PgConnection,
    import_id: Uuid,
    after: (i32, i64),
    limit: i64,
) -> sqlx::Result<Vec<StoredError>> {
    sqlx::query_as!(
        StoredError,
        r#"SELECT id, row_no AS "row", field, code, message FROM import_errors
           WHERE import_id = $1 AND (row_no, id) > ($2, $3)
           ORDER BY row_no, id LIMIT $4"#,
        import_id,
        after.0,
        after.1,
        limit,
    )
    .fetch_all(conn)
    .await
}

// ---- The job's steps --------------------------------------------------------------------------

/// Marks the import running (again, after a crash or retry) and returns it; `None` when it is
/// already finished, so a job that runs twice does nothing the second time.
pub async fn mark_running(db: &PgPool, id: Uuid) -> sqlx::Result<Option<Import>> {
    sqlx::query_as!(
        ImportRow,
        "UPDATE imports SET status = 'running', started_at = coalesce(started_at, now())
         WHERE id = $1 AND status IN ('queued', 'running')
         RETURNING id, owner_id, status, size_bytes, total_rows, processed_rows, imported_orders,
                   rejected_orders, failed_rows, rows_together, staged, grouped_through, request_id,
                   created_at, started_at, finished_at",
        id,
    )
    .fetch_optional(db)
    .await?
    .map(Import::try_from)
    .transpose()
}

/// Locks the import's row until the transaction ends and returns its checkpoints
/// (`processed_rows`, `grouped_through`), or `None` once the import is no longer running (a
/// run that was given up on). Two runs of one import can overlap (a worker presumed dead that
/// was only slow, and its successor); each step checks under this lock that the checkpoint is
/// still where it started, so only one of them commits a given step.
/// `NO KEY UPDATE`, the lock an `UPDATE` of the row takes anyway: it lets other transactions
/// still take the key-share lock that inserting an import error takes for its foreign key.
pub async fn lock_checkpoints(
    conn: &mut PgConnection,
    import_id: Uuid,
) -> sqlx::Result<Option<(i32, Option<String>)>> {
    let row = sqlx::query!(
        "SELECT processed_rows, grouped_through FROM imports
         WHERE id = $1 AND status = 'running' FOR NO KEY UPDATE",
        import_id,
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.map(|row| (row.processed_rows, row.grouped_through)))
}

/// Records whether the file lists each order's rows together, unless a run already has; returns
/// the recorded answer, so that every run of an import takes the same way.
pub async fn record_rows_together(
    db: &PgPool,
    import_id: Uuid,
    together: bool,
) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"UPDATE imports
           SET rows_together = coalesce(
                   rows_together,
                   -- A run of an older version that only stages has begun meanwhile.
                   CASE WHEN staged OR processed_rows > 0 OR grouped_through IS NOT NULL
                        THEN false ELSE $2 END)
           WHERE id = $1
           RETURNING rows_together AS "together!""#,
        import_id,
        together,
    )
    .fetch_one(db)
    .await
}

/// Where a committed batch leaves the import: the last row read from the file
/// (`processed_rows`), or the last external_ref grouped from the staged rows (`grouped_through`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint<S> {
    Row(i32),
    Grouped(S),
}

impl Checkpoint<String> {
    pub fn as_deref(&self) -> Checkpoint<&str> {
        match self {
            Checkpoint::Row(row) => Checkpoint::Row(*row),
            Checkpoint::Grouped(through) => Checkpoint::Grouped(through),
        }
    }
}

impl Checkpoint<&str> {
    pub fn into_owned(self) -> Checkpoint<String> {
        match self {
            Checkpoint::Row(row) => Checkpoint::Row(row),
            Checkpoint::Grouped(through) => Checkpoint::Grouped(through.to_owned()),
        }
    }
}

/// What one batch adds to the import's counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub imported_orders: i32,
    pub rejected_orders: i32,
    pub failed_rows: i32,
}

/// Stages one batch of rows with COPY, records its row errors, and moves `processed_rows` to
/// `through_row`: all in the caller's transaction, so a batch is either wholly done or not at all.
#[tracing::instrument(name = "import_rows.stage", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn stage_batch(
    conn: &mut PgConnection,
    import_id: Uuid,
    rows: &[KeyedRow],
    errors: &[RowError],
    counts: Counts,
    through_row: i32,
) -> sqlx::Result<()> {
    if !rows.is_empty() {
        let mut copy = conn
            .copy_in_raw(
                "COPY import_rows (import_id, external_ref, row_no, valid, currency, sku, quantity, \
                 unit_price_cents, note) FROM STDIN",
            )
            .await?;
        let mut text = String::with_capacity(rows.len() * 64);
        for row in rows {
            row.write_copy_line(import_id, &mut text);
        }
        copy.send(text.into_bytes()).await?;
        copy.finish().await?;
    }
    insert_errors(conn, import_id, errors).await?;
    advance(conn, import_id, counts, Checkpoint::Row(through_row)).await
}

/// Creates one batch of orders with their items (an order whose (owner, external_ref) exists
/// already is left as it is: importing the same rows again creates nothing) and records the row
/// errors, in the caller's transaction; [`advance`] then moves the counters and the checkpoint
/// in the same one.
///
/// One statement for all the orders and items of a batch, from arrays: the import's hot path.
#[tracing::instrument(name = "imports.write_orders", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn write_orders(
    conn: &mut PgConnection,
    import_id: Uuid,
    owner: Uuid,
    orders: &[NewOrder],
    errors: &[RowError],
) -> sqlx::Result<()> {
    if !orders.is_empty() {
        // UUIDv7, as for orders created through the API: ids that grow append to the indexes.
        let ids: Vec<Uuid> = orders.iter().map(|_| Uuid::now_v7()).collect();
        let currencies: Vec<&str> = orders.iter().map(|o| o.currency.get().as_str()).collect();
        let totals: Vec<i64> = orders.iter().map(NewOrder::total_cents).collect();
        let notes: Vec<Option<&str>> = orders
            .iter()
            .map(|o| o.note.as_ref().map(|note| note.get().as_str()))
            .collect();
        let refs: Vec<Option<&str>> = orders
            .iter()
            .map(|o| o.external_ref.as_ref().map(|r| r.get().as_str()))
            .collect();
        // Each item with its order's id and its 1-based position.
        let items: Vec<(Uuid, i32, &LineItem)> = ids
            .iter()
            .zip(orders)
            .flat_map(|(id, order)| (1..).zip(&order.items).map(|(n, item)| (*id, n, item)))
            .collect();
        let item_orders: Vec<Uuid> = items.iter().map(|(id, _, _)| *id).collect();
        let positions: Vec<i32> = items.iter().map(|(_, n, _)| *n).collect();
        let skus: Vec<&str> = items.iter().map(|(_, _, i)| i.sku.get().as_str()).collect();
        let quantities: Vec<i64> = items.iter().map(|(_, _, i)| *i.quantity.get()).collect();
        let prices: Vec<i64> = items.iter().map(|(_, _, i)| *i.unit_price.get()).collect();
        sqlx::query!(
            "WITH created AS (
                 INSERT INTO orders (id, owner_id, currency, total_cents, note, external_ref)
                 SELECT id, $1, currency, total_cents, note, external_ref
                 FROM UNNEST($2::uuid[], $3::text[], $4::bigint[], $5::text[], $6::text[])
                      AS o (id, currency, total_cents, note, external_ref)
                 -- Keys locked in one order within a statement: two statements of one owner
                 -- that share references wait for each other instead of deadlocking.
                 ORDER BY external_ref
                 ON CONFLICT (owner_id, external_ref) WHERE external_ref IS NOT NULL DO NOTHING
                 RETURNING id
             )
             INSERT INTO order_items (order_id, position, sku, quantity, unit_price_cents)
             SELECT i.order_id, i.position, i.sku, i.quantity, i.unit_price_cents
             FROM UNNEST($7::uuid[], $8::integer[], $9::text[], $10::bigint[], $11::bigint[])
                  AS i (order_id, position, sku, quantity, unit_price_cents)
             WHERE i.order_id IN (SELECT id FROM created)",
            owner,
            &ids,
            &currencies as &[&str],
            &totals,
            &notes as &[Option<&str>],
            &refs as &[Option<&str>],
            &item_orders,
            &positions,
            &skus as &[&str],
            &quantities,
            &prices,
        )
        .execute(&mut *conn)
        .await?;
    }
    insert_errors(conn, import_id, errors).await
}

async fn insert_errors(
    conn: &mut PgConnection,
    import_id: Uuid,
    errors: &[RowError],
) -> sqlx::Result<()> {
    if errors.is_empty() {
        return Ok(());
    }
    let rows: Vec<i32> = errors.iter().map(|e| e.row).collect();
    let fields: Vec<&str> = errors.iter().map(|e| e.field).collect();
    let codes: Vec<&str> = errors.iter().map(|e| e.code.as_ref()).collect();
    let messages: Vec<&str> = errors.iter().map(|e| e.message.as_ref()).collect();
    sqlx::query!(
        "INSERT INTO import_errors (import_id, row_no, field, code, message)
         SELECT $1, * FROM UNNEST($2::integer[], $3::text[], $4::text[], $5::text[])",
        import_id,
        &rows,
        &fields as &[&str],
        &codes as &[&str],
        &messages as &[&str],
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Adds `counts` to the import's counters and moves its checkpoint, in the caller's transaction.
pub async fn advance(
    conn: &mut PgConnection,
    import_id: Uuid,
    counts: Counts,
    checkpoint: Checkpoint<&str>,
) -> sqlx::Result<()> {
    let (row, grouped) = match checkpoint {
        Checkpoint::Row(row) => (Some(row), None),
        Checkpoint::Grouped(through) => (None, Some(through)),
    };
    sqlx::query!(
        "UPDATE imports SET imported_orders = imported_orders + $2,
                            rejected_orders = rejected_orders + $3,
                            failed_rows = failed_rows + $4,
                            processed_rows = coalesce($5, processed_rows),
                            grouped_through = coalesce($6, grouped_through)
         WHERE id = $1",
        import_id,
        counts.imported_orders,
        counts.rejected_orders,
        counts.failed_rows,
        row,
        grouped,
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn mark_staged(db: &PgPool, import_id: Uuid) -> sqlx::Result<()> {
    sqlx::query!("UPDATE imports SET staged = true WHERE id = $1", import_id)
        .execute(db)
        .await?;
    Ok(())
}

/// Refreshes the planner's statistics of `import_rows` (autovacuum catches up only later).
pub async fn analyze_staged_rows(db: &PgPool) -> sqlx::Result<()> {
    sqlx::query("ANALYZE import_rows").execute(db).await?;
    Ok(())
}

/// The last external_ref of the next range of up to `orders` orders after `after` (from the
/// first order when `after` is `None`), or `None` when every order has been grouped.
pub async fn next_range(
    db: &PgPool,
    import_id: Uuid,
    after: Option<&str>,
    orders: i64,
) -> sqlx::Result<Option<String>> {
    sqlx::query_scalar!(
        "SELECT max(external_ref) FROM (
             SELECT DISTINCT external_ref FROM import_rows
             WHERE import_id = $1 AND external_ref > coalesce($2, '')
             ORDER BY external_ref LIMIT $3
         ) AS range_",
        import_id,
        after,
        orders,
    )
    .fetch_one(db)
    .await
}

/// The staged rows with external_ref in (`after`, `through`], each order's rows together and in
/// row order (the primary key's order), as a stream: one order may have any number of rows.
pub fn staged_rows<'a>(
    db: &'a PgPool,
    import_id: Uuid,
    after: Option<&'a str>,
    through: &'a str,
) -> futures::stream::BoxStream<'a, sqlx::Result<StoredRow>> {
    sqlx::query_as!(
        StoredRow,
        "SELECT row_no, external_ref, valid, currency, sku, quantity, unit_price_cents, note
         FROM import_rows
         WHERE import_id = $1 AND external_ref > coalesce($2, '') AND external_ref <= $3
         ORDER BY external_ref, row_no",
        import_id,
        after,
        through,
    )
    .fetch(db)
}

/// The final state, committed with whatever must happen exactly once after it (the caller's
/// transaction also enqueues the notification). `None` when the import is no longer running:
/// another run finished it, or it was given up.
#[tracing::instrument(name = "imports.finish", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn finish(conn: &mut PgConnection, import_id: Uuid) -> sqlx::Result<Option<Import>> {
    sqlx::query_as!(
        ImportRow,
        "UPDATE imports
         SET status = CASE WHEN failed_rows = 0 THEN 'succeeded' ELSE 'completed_with_errors' END,
             finished_at = now()
         WHERE id = $1 AND status = 'running'
         RETURNING id, owner_id, status, size_bytes, total_rows, processed_rows, imported_orders,
                   rejected_orders, failed_rows, rows_together, staged, grouped_through, request_id,
                   created_at, started_at, finished_at",
        import_id,
    )
    .fetch_optional(conn)
    .await?
    .map(Import::try_from)
    .transpose()
}

/// Gives up on an import whose job has run out of attempts.
pub async fn fail(conn: &mut PgConnection, import_id: Uuid) -> sqlx::Result<Option<Import>> {
    sqlx::query_as!(
        ImportRow,
        "UPDATE imports SET status = 'failed', finished_at = now()
         WHERE id = $1 AND status IN ('queued', 'running')
         RETURNING id, owner_id, status, size_bytes, total_rows, processed_rows, imported_orders,
                   rejected_orders, failed_rows, rows_together, staged, grouped_through, request_id,
                   created_at, started_at, finished_at",
        import_id,
    )
    .fetch_optional(conn)
    .await?
    .map(Import::try_from)
    .transpose()
}

/// Rows deleted per statement, so that removing a large import's leftovers never runs into the
/// statement timeout or holds locks for long.
const DELETE_BATCH: i64 = 20_000;

/// Removes what finished imports no longer need (their staged rows and files) and uploads whose
/// request never created an import (older than `orphan_age`), in batches. Safe to run at any time
/// and from several workers.
pub async fn clean_up(db: &PgPool, orphan_age: std::time::Duration) -> sqlx::Result<u64> {
    let mut deleted = 0;
    loop {
        let staged = sqlx::query!(
            "DELETE FROM import_rows WHERE ctid = ANY(ARRAY(
                 SELECT r.ctid FROM import_rows r JOIN imports i ON i.id = r.import_id
                 WHERE i.status NOT IN ('queued', 'running') LIMIT $1))",
            DELETE_BATCH,
        )
        .execute(db)
        .await?
        .rows_affected();
        let files = sqlx::query!(
            "DELETE FROM import_files WHERE ctid = ANY(ARRAY(
                 SELECT f.ctid FROM import_files f LEFT JOIN imports i ON i.id = f.import_id
                 WHERE (i.id IS NULL AND f.created_at < now() - make_interval(secs => $2))
                    OR i.status NOT IN ('queued', 'running')
                 LIMIT $1))",
            DELETE_BATCH,
            orphan_age.as_secs_f64(),
        )
        .execute(db)
        .await?
        .rows_affected();
        deleted += staged + files;
        let batch = DELETE_BATCH.unsigned_abs();
        if staged < batch && files < batch {
            return Ok(deleted);
        }
    }
}

/// Removes one finished import's staged rows and file right away, in batches.
pub async fn discard_work(db: &PgPool, import_id: Uuid) -> sqlx::Result<()> {
    loop {
        let deleted = sqlx::query!(
            "DELETE FROM import_rows WHERE ctid = ANY(ARRAY(
                 SELECT ctid FROM import_rows WHERE import_id = $1 LIMIT $2))",
            import_id,
            DELETE_BATCH,
        )
        .execute(db)
        .await?
        .rows_affected();
        if deleted == 0 {
            return delete_upload(db, import_id).await;
        }
    }
}

/// Imports that are queued or running but have no job that will run them: their job was lost
/// (a run that stopped because another was ahead, and that other run then died; a failure to
/// record a final state). The worker's cleanup enqueues a fresh job for each.
pub async fn without_job(db: &PgPool, older_than: std::time::Duration) -> sqlx::Result<Vec<Uuid>> {
    sqlx::query_scalar!(
        r#"SELECT i.id FROM imports i
           WHERE i.status IN ('queued', 'running')
             AND i.created_at < now() - make_interval(secs => $1)
             AND NOT EXISTS (
                 SELECT 1 FROM apalis.jobs j
                 WHERE j.job_type = 'imports'
                   AND convert_from(j.job, 'UTF8')::jsonb ->> 'import_id' = i.id::text
                   AND (j.status IN ('Pending', 'Queued', 'Running')
                        OR (j.status = 'Failed' AND j.attempts < j.max_attempts)))"#,
        older_than.as_secs_f64(),
    )
    .fetch_all(db)
    .await
}
