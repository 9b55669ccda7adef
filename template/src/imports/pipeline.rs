//! The import pipeline: the steps of one run of an import, between the job's start and finish.
//!
//! Prevents: an import that, after a crash, loses rows, writes them twice, or splits an order.
//! Every step commits its effects together with the progress counters and the checkpoint that
//! describe them:
//! 1. [`rows_are_together`] reads the stored file once: the row count is checked before anything
//!    is written, and whether each order's rows are next to each other decides the way (the job
//!    records the answer, so a resumed import goes on the way it started).
//! 2. If they are, [`write_in_file_order`] reads the file again and writes each order as soon as
//!    its last row has gone by, a batch of orders with their row errors and `processed_rows` per
//!    transaction. Otherwise [`stage`] validates the rows and COPYs them into `import_rows` in
//!    batches (with their errors and `processed_rows`), and [`group`] reads them back sorted by
//!    order and writes a range of external_refs at a time, with `grouped_through`. Either way a
//!    rerun skips what the checkpoint counts, and orders are keyed by (owner, external_ref), so
//!    even a repeated batch creates nothing twice. Rows are validated with the orders API's
//!    rules, and the rules over an order's rows ([`OrderRows`]) are the same on both ways.

use std::collections::VecDeque;

use futures::TryStreamExt;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::task::JoinHandle;
use tracing::Instrument;
use uuid::Uuid;

use super::csv::{Records, Step, check_header};
use super::domain::{KeyedRow, OrderRows, ParsedRow, RowError, order_key, parse_row};
use super::job::Context;
use super::store::{self, Checkpoint, Counts, Import};
use crate::jobs::{JobError, Released};
use crate::orders::domain::{ExternalRef, NewOrder};

/// Rows per staging transaction: large enough that COPY dominates, small enough that progress
/// moves every fraction of a second and a crash repeats little.
const STAGE_BATCH_ROWS: usize = 5_000;
/// Orders per transaction when orders are written: one statement writes them all, with their
/// items (5 000 measured no faster: docs/benchmarks.md).
const BATCH_ORDERS: usize = 2_000;
/// Row errors per transaction on the direct way: a file whose rows name no order has no orders
/// to end a batch, and would otherwise hold every error in memory and commit no progress.
const BATCH_ERRORS: usize = 5_000;

/// Another run of the same import committed this step first, or the import was given up; this
/// run stops and leaves the rest to the other.
#[derive(Debug, thiserror::Error)]
#[error("another run of this import is ahead of this one, or the import was given up")]
pub(super) struct Superseded;

/// Whether each order's rows are next to each other in the file (as a file exported from another
/// system usually lists them), after checking that the stored file has the rows the upload
/// counted. If they are, the orders can be written while the file is read, each as soon as its
/// last row has gone by. Reading the stored file once more costs far less than staging and
/// sorting it. A row that names no usable order ends the order before it here, as it does when
/// the orders are written.
///
/// Consecutive rows are compared by their full external_ref; an order seen earlier in the file
/// is remembered only as a 64-bit hash of its external_ref (a hash set: 10–20 bytes per order). Two
/// external_refs with the same hash can only make a file look scattered, which sends it the
/// slower way, never the wrong one.
pub(super) async fn rows_are_together(
    context: &Context,
    import: &Import,
) -> Result<bool, JobError> {
    use std::hash::BuildHasher;
    let hasher = std::hash::BuildHasherDefault::<std::hash::DefaultHasher>::default();
    let (mut file, _) = open_file(context, import).await?;
    let mut current: Option<ExternalRef> = None;
    let mut seen = std::collections::HashSet::new();
    let mut together = true;
    let mut rows = 0;
    while let Some(record) = file.next_record().await? {
        rows += 1;
        if !together {
            continue;
        }
        let next = record.fields().next().and_then(order_key);
        if current == next {
            continue;
        }
        if let Some(previous) = std::mem::replace(&mut current, next) {
            seen.insert(hasher.hash_one(previous.get()));
        }
        together = !current
            .as_ref()
            .is_some_and(|now| seen.contains(&hasher.hash_one(now.get())));
        if !together {
            // Only the row count is left to check.
            seen = Default::default();
        }
    }
    // Before anything is written: a stored file that is not the upload imports nothing.
    check_row_count(import, rows)?;
    Ok(together)
}

/// The stored file, read past its header, and whether the header has the `note` column.
async fn open_file<'a>(
    context: &'a Context,
    import: &Import,
) -> Result<(StoredFile<'a>, bool), JobError> {
    let mut file = StoredFile::new(&context.db, import.id);
    let header = file
        .next_record()
        .await?
        .ok_or("the stored file is empty")?;
    let has_note = check_header(header.fields()).ok_or("the stored file has no header")?;
    Ok((file, has_note))
}

/// The upload counted the rows; another count means the stored file is not the one that was
/// uploaded. Fail loudly rather than import part of it.
fn check_row_count(import: &Import, rows: i32) -> Result<(), JobError> {
    if rows == import.total_rows {
        return Ok(());
    }
    Err(format!(
        "the stored file has {rows} rows, the upload had {}",
        import.total_rows
    )
    .into())
}

/// Step 2 for a file whose orders' rows are together: each order is written as its last row
/// goes by, a batch of orders per transaction. A batch always ends with a whole order, so its
/// checkpoint (`processed_rows`) never splits one.
pub(super) async fn write_in_file_order(
    context: &Context,
    import: &Import,
) -> Result<(), JobError> {
    let (mut file, has_note) = open_file(context, import).await?;
    let mut writer = Writer::after(context, import, Checkpoint::Row(import.processed_rows));
    let mut batch = OrderBatch::default();
    let mut open = OpenOrder::default();
    let mut row = 0;
    while let Some(record) = file.next_record().await? {
        row += 1;
        // Rows up to the checkpoint were written by an earlier run.
        if row <= import.processed_rows {
            continue;
        }
        let parsed = parse_row(row, record.fields(), has_note);
        let next = parsed.keyed.as_ref().map(|keyed| &keyed.external_ref);
        if open.close_unless_continued(next, &mut batch) && batch.is_full() {
            // Every row before this one is done: a checkpoint here splits no order.
            let full = std::mem::take(&mut batch);
            writer.write(full, Checkpoint::Row(row - 1)).await?;
        }
        if let Some(keyed) = parsed.keyed {
            open.push(keyed);
        }
        batch.add_row_errors(parsed.errors);
    }
    check_row_count(import, row)?;
    open.close_unless_continued(None, &mut batch);
    writer.write(batch, Checkpoint::Row(row)).await?;
    writer.finish().await
}

/// Step 2 for any other file, part 1: validate every row not yet staged and stage it, a batch
/// per transaction. Part 2 ([`group`]) reads the staged rows back sorted by order.
pub(super) async fn stage(context: &Context, import: &Import) -> Result<(), JobError> {
    let (mut file, has_note) = open_file(context, import).await?;
    let mut batch = Staging::after(import.processed_rows);
    let mut row = 0;
    while let Some(record) = file.next_record().await? {
        row += 1;
        // Rows up to the checkpoint were staged by an earlier run.
        if row > import.processed_rows {
            batch.add(parse_row(row, record.fields(), has_note));
            if batch.rows == STAGE_BATCH_ROWS {
                batch.commit(context, import.id, row).await?;
            }
        }
    }
    check_row_count(import, row)?;
    batch.commit(context, import.id, row).await
}

/// The stored upload, read back chunk by chunk as CSV records.
struct StoredFile<'a> {
    db: &'a PgPool,
    import_id: Uuid,
    records: Records,
    chunk: Vec<u8>,
    position: usize,
    next_seq: i32,
    at_end: bool,
}

impl<'a> StoredFile<'a> {
    fn new(db: &'a PgPool, import_id: Uuid) -> Self {
        StoredFile {
            db,
            import_id,
            records: Records::default(),
            chunk: Vec::new(),
            position: 0,
            next_seq: 0,
            at_end: false,
        }
    }

    /// The next complete record, fetching chunks as needed; `None` at the end of the file.
    async fn next_record(&mut self) -> Result<Option<&Records>, JobError> {
        loop {
            let mut input = &self.chunk[self.position..];
            let step = self.records.read(&mut input, self.at_end)?;
            self.position = self.chunk.len() - input.len();
            match step {
                Step::Record => return Ok(Some(&self.records)),
                Step::End => return Ok(None),
                Step::NeedInput if self.at_end => return Err("the stored file ended twice".into()),
                Step::NeedInput => {
                    match store::chunk(self.db, self.import_id, self.next_seq).await? {
                        Some(data) => self.chunk = data,
                        None => {
                            self.chunk.clear();
                            self.at_end = true;
                        }
                    }
                    self.position = 0;
                    self.next_seq += 1;
                }
            }
        }
    }
}

/// Rows parsed since the last staging commit, and the checkpoint that commit left.
struct Staging {
    staged: Vec<KeyedRow>,
    errors: Vec<RowError>,
    counts: Counts,
    rows: usize,
    committed_through: i32,
}

impl Staging {
    fn after(committed_through: i32) -> Self {
        Staging {
            staged: Vec::with_capacity(STAGE_BATCH_ROWS),
            errors: Vec::new(),
            counts: Counts::default(),
            rows: 0,
            committed_through,
        }
    }

    fn add(&mut self, parsed: ParsedRow) {
        self.staged.extend(parsed.keyed);
        if !parsed.errors.is_empty() {
            self.counts.failed_rows += 1;
            self.errors.extend(parsed.errors);
        }
        self.rows += 1;
    }

    /// Stages the batch and moves the checkpoint to `through_row`, in one transaction, if the
    /// checkpoint is still where this run left it; then stops if the worker is shutting down.
    async fn commit(
        &mut self,
        context: &Context,
        import_id: Uuid,
        through_row: i32,
    ) -> Result<(), JobError> {
        let mut tx = context.db.begin().await?;
        still_at(&mut tx, import_id, Checkpoint::Row(self.committed_through)).await?;
        store::stage_batch(
            &mut tx,
            import_id,
            &self.staged,
            &self.errors,
            self.counts,
            through_row,
        )
        .await?;
        tx.commit().await?;
        self.staged.clear();
        self.errors.clear();
        self.counts = Counts::default();
        self.rows = 0;
        self.committed_through = through_row;
        stop_if_asked(context)
    }
}

/// The order whose rows are being read. Rows come grouped by order (the file's rows together,
/// or staged rows sorted), so an order is complete when a row of another order, or a row that
/// belongs to none, comes by.
#[derive(Default)]
struct OpenOrder(Option<OrderRows>);

impl OpenOrder {
    /// Closes the open order into `batch` unless the next row (`next`: its order, if it has one)
    /// belongs to it. True when every row before the next one is done.
    fn close_unless_continued(
        &mut self,
        next: Option<&ExternalRef>,
        batch: &mut OrderBatch,
    ) -> bool {
        match (&self.0, next) {
            (Some(open), Some(next)) if open.external_ref() == next => false,
            _ => {
                if let Some(done) = self.0.take() {
                    batch.add(done);
                }
                true
            }
        }
    }

    fn push(&mut self, row: KeyedRow) {
        self.0
            .get_or_insert_with(|| OrderRows::new(row.external_ref.clone()))
            .push(row);
    }
}

/// Orders closed since the last batch, with the row errors of the rows they cover.
#[derive(Default)]
struct OrderBatch {
    orders: Vec<NewOrder>,
    errors: Vec<RowError>,
    counts: Counts,
}

impl OrderBatch {
    fn add(&mut self, rows: OrderRows) {
        let closed = rows.close();
        // Order rules fall only on rows valid on their own, one error each: each is one more
        // failed row, none counted twice.
        self.counts.failed_rows += i32::try_from(closed.errors.len()).unwrap_or(i32::MAX);
        self.errors.extend(closed.errors);
        match closed.order {
            Some(order) => {
                self.counts.imported_orders += 1;
                self.orders.push(order);
            }
            None => self.counts.rejected_orders += 1,
        }
    }

    /// The errors of one row.
    fn add_row_errors(&mut self, errors: Vec<RowError>) {
        if !errors.is_empty() {
            self.counts.failed_rows += 1;
            self.errors.extend(errors);
        }
    }

    /// Enough orders, or enough row errors (a file of rows that name no order has no orders).
    fn is_full(&self) -> bool {
        let orders = self.orders.len() + usize::try_from(self.counts.rejected_orders).unwrap_or(0);
        orders >= BATCH_ORDERS || self.errors.len() >= BATCH_ERRORS
    }
}

/// Batches of orders written at once, each on its own connection: Postgres runs a statement on
/// one core, and the next batch is read while the last is written. Two, the reference machine's
/// cores (docs/benchmarks.md); each one more is a connection more per import (the pool size in
/// docs/background-jobs.md).
const WRITERS: usize = 2;

/// Writes batches of orders, up to [`WRITERS`] at once, and commits them in order, each with the
/// counters and the checkpoint it reaches: the checkpoint stays a prefix of the work, whichever
/// write ends first. A batch written but not committed when the run dies is rolled back.
struct Writer<'a> {
    context: &'a Context,
    import: &'a Import,
    /// Where the last commit left the import (this run's start, before the first).
    committed: Checkpoint<String>,
    in_flight: VecDeque<InFlight>,
}

/// A batch being written in its own transaction, not yet committed.
struct InFlight {
    written: JoinHandle<sqlx::Result<Transaction<'static, Postgres>>>,
    counts: Counts,
    through: Checkpoint<String>,
}

impl<'a> Writer<'a> {
    fn after(context: &'a Context, import: &'a Import, committed: Checkpoint<String>) -> Self {
        Writer {
            context,
            import,
            committed,
            in_flight: VecDeque::with_capacity(WRITERS),
        }
    }

    /// Starts writing `batch`, which ends at `through`, once fewer than `WRITERS` are in flight.
    /// Batches already written are committed first: a written transaction left open holds its
    /// orders' keys, which another import of the same owner may be waiting for.
    async fn write(
        &mut self,
        batch: OrderBatch,
        through: Checkpoint<&str>,
    ) -> Result<(), JobError> {
        while self
            .in_flight
            .front()
            .is_some_and(|oldest| oldest.written.is_finished())
        {
            self.commit_oldest().await?;
        }
        if self.in_flight.len() == WRITERS {
            self.commit_oldest().await?;
        }
        let db = self.context.db.clone();
        let (import_id, owner) = (self.import.id, self.import.owner_id);
        let written = tokio::spawn(
            async move {
                let mut tx = db.begin().await?;
                store::write_orders(&mut tx, import_id, owner, &batch.orders, &batch.errors)
                    .await?;
                Ok(tx)
            }
            .in_current_span(),
        );
        self.in_flight.push_back(InFlight {
            written,
            counts: batch.counts,
            through: through.into_owned(),
        });
        Ok(())
    }

    /// Commits the oldest batch in flight with its checkpoint, if the checkpoint is still where
    /// this run left it; then stops if the worker is shutting down.
    async fn commit_oldest(&mut self) -> Result<(), JobError> {
        let Some(batch) = self.in_flight.pop_front() else {
            return Ok(());
        };
        let mut tx = batch.written.await??;
        still_at(&mut tx, self.import.id, self.committed.as_deref()).await?;
        let through = batch.through.as_deref();
        store::advance(&mut tx, self.import.id, batch.counts, through).await?;
        tx.commit().await?;
        self.committed = batch.through;
        stop_if_asked(self.context)
    }

    /// Commits every batch still in flight.
    async fn finish(mut self) -> Result<(), JobError> {
        while !self.in_flight.is_empty() {
            self.commit_oldest().await?;
        }
        Ok(())
    }
}

impl Drop for Writer<'_> {
    /// A run that stops early (an error, a shutdown) stops the writes it has not committed: their
    /// transactions roll back (once the statement running on the server ends).
    fn drop(&mut self) {
        for batch in &self.in_flight {
            batch.written.abort();
        }
    }
}

/// Locks the import's row and checks that its checkpoint is still `committed`, where this run
/// left it, and that the import is still running: otherwise another run is ahead, or the import
/// was given up, and this run stops ([`Superseded`]).
async fn still_at(
    tx: &mut sqlx::PgConnection,
    import_id: Uuid,
    committed: Checkpoint<&str>,
) -> Result<(), JobError> {
    let unchanged = match store::lock_checkpoints(tx, import_id).await? {
        None => false,
        Some((row, grouped)) => match committed {
            Checkpoint::Row(committed) => row == committed,
            // No range grouped yet is the empty reference: every real one is longer.
            Checkpoint::Grouped(committed) => grouped.as_deref().unwrap_or_default() == committed,
        },
    };
    if unchanged {
        Ok(())
    } else {
        Err(Superseded.into())
    }
}

/// After a commit: a worker that is shutting down hands the import on from here.
fn stop_if_asked(context: &Context) -> Result<(), JobError> {
    if context.stop.is_cancelled() {
        return Err(Released.into());
    }
    Ok(())
}

/// Step 2 for any other file, part 2: the staged rows, read back sorted by order, become
/// orders, a range of external_refs per transaction.
pub(super) async fn group(context: &Context, import: &Import) -> Result<(), JobError> {
    let db = &context.db;
    let mut after = import.grouped_through.clone();
    let committed = Checkpoint::Grouped(after.clone().unwrap_or_default());
    let mut writer = Writer::after(context, import, committed);
    while let Some(through) =
        store::next_range(db, import.id, after.as_deref(), BATCH_ORDERS as i64).await?
    {
        let mut batch = OrderBatch::default();
        let mut open = OpenOrder::default();
        let mut rows = store::staged_rows(db, import.id, after.as_deref(), &through);
        while let Some(stored) = rows.try_next().await? {
            let staged = KeyedRow::try_from(stored)
                .map_err(|error| format!("a staged row does not parse: {error}"))?;
            open.close_unless_continued(Some(&staged.external_ref), &mut batch);
            open.push(staged);
        }
        drop(rows);
        open.close_unless_continued(None, &mut batch);
        writer.write(batch, Checkpoint::Grouped(&through)).await?;
        after = Some(through);
    }
    writer.finish().await
}
