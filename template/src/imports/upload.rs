//! Receiving an upload: the body streams into `import_files` in chunks while its CSV structure is
//! checked, so neither a large file nor a slow client holds much memory or a database connection.

use aws_lc_rs::digest;
use axum::body::Body;
use futures::TryStreamExt;
use sqlx::PgPool;
use uuid::Uuid;

use super::csv::{Records, Step, check_header};
use super::store;
use crate::problem::{ErrorCode, Problem};

/// Size of a stored chunk. A connection is taken only to write a full chunk, never while waiting
/// for the client.
const CHUNK_BYTES: usize = 1024 * 1024;

#[derive(Debug)]
pub struct Upload {
    pub size_bytes: i64,
    /// Data rows, header excluded.
    pub rows: i32,
    /// SHA-256 of the bytes, for the idempotency fingerprint.
    pub digest: [u8; 32],
}

/// Streams `body` into storage under `import_id`. Refuses a wrong header (422), more than
/// `max_rows` rows or `max_bytes` bytes (413), and a row that is not CSV (400). On an error the
/// chunks already written stay behind; the caller removes them.
pub async fn receive(
    db: &PgPool,
    import_id: Uuid,
    body: Body,
    max_bytes: usize,
    max_rows: u32,
) -> Result<Upload, Problem> {
    let mut stream = body.into_data_stream();
    let mut records = Records::default();
    let mut sha = digest::Context::new(&digest::SHA256);
    let mut buffer = Vec::with_capacity(CHUNK_BYTES);
    let (mut seq, mut size, mut rows, mut header_seen) = (0, 0_i64, 0_i64, false);
    loop {
        let frame = stream.try_next().await.map_err(read_error)?;
        let at_end = frame.is_none();
        let bytes = frame.unwrap_or_default();
        sha.update(&bytes);
        size += i64::try_from(bytes.len()).unwrap_or(i64::MAX);
        if size > i64::try_from(max_bytes).unwrap_or(i64::MAX) {
            return Err(too_large());
        }
        let mut input = &bytes[..];
        loop {
            match records.read(&mut input, at_end).map_err(not_csv)? {
                Step::NeedInput | Step::End => break,
                Step::Record if !header_seen => {
                    check_header(records.fields()).ok_or_else(wrong_header)?;
                    header_seen = true;
                }
                Step::Record => {
                    rows += 1;
                    if rows > i64::from(max_rows) {
                        return Err(Problem::new(
                            ErrorCode::PayloadTooLarge,
                            format!("An import holds at most {max_rows} rows."),
                        ));
                    }
                }
            }
        }
        buffer.extend_from_slice(&bytes);
        if buffer.len() >= CHUNK_BYTES || (at_end && !buffer.is_empty()) {
            store::insert_chunk(db, import_id, seq, &buffer).await?;
            seq += 1;
            buffer.clear();
        }
        if at_end {
            break;
        }
    }
    if !header_seen {
        return Err(wrong_header());
    }
    let mut digest = [0; 32];
    digest.copy_from_slice(sha.finish().as_ref());
    Ok(Upload {
        size_bytes: size,
        rows: i32::try_from(rows).unwrap_or(i32::MAX),
        digest,
    })
}

fn too_large() -> Problem {
    Problem::new(
        ErrorCode::PayloadTooLarge,
        "The file is larger than the service accepts.",
    )
}

fn wrong_header() -> Problem {
    Problem::new(
        ErrorCode::InvalidCsvHeader,
        "The first row must be `external_ref,currency,sku,quantity,unit_price_cents`, optionally followed by `note`.",
    )
}

fn not_csv(error: super::csv::RecordTooLong) -> Problem {
    Problem::new(
        ErrorCode::MalformedBody,
        format!("The body is not CSV: {error}."),
    )
}

/// Reading the body fails when the client goes away or sends more than the limit.
fn read_error(error: axum::Error) -> Problem {
    let too_large = std::iter::successors(
        Some(&error as &(dyn std::error::Error + 'static)),
        |error| error.source(),
    )
    .any(|cause| cause.is::<http_body_util::LengthLimitError>());
    if too_large {
        self::too_large()
    } else {
        Problem::new(ErrorCode::MalformedBody, "The upload was interrupted.")
    }
}
