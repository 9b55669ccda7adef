//! CSV records read incrementally, from whatever chunks the bytes arrive in.
//!
//! Prevents: holding a whole upload in memory to parse it. `csv-core` parses from byte slices and
//! keeps its state between them, so the same reader serves the request (body frames) and the
//! worker (stored chunks). A record longer than [`MAX_RECORD_BYTES`] is refused rather than
//! buffered without bound.

use csv_core::{ReadRecordResult, Reader};

/// The longest row accepted: a valid row is far shorter (a 1000-character note is the bulk).
pub const MAX_RECORD_BYTES: usize = 64 * 1024;
/// The most fields a row may have; a valid one has six.
const MAX_FIELDS: usize = 1024;
/// Spreadsheet programs start UTF-8 files with a byte-order mark; it is not part of the data.
const BOM: &[u8] = b"\xEF\xBB\xBF";

/// The columns, in this order; `note` may be left out.
pub const HEADER: [&str; 5] = [
    "external_ref",
    "currency",
    "sku",
    "quantity",
    "unit_price_cents",
];
pub const NOTE: &str = "note";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `input` is used up; call again with the next chunk.
    NeedInput,
    /// A record is complete: read it with [`Records::fields`].
    Record,
    /// The file has ended.
    End,
}

#[derive(Debug, thiserror::Error)]
#[error("a row is longer than {MAX_RECORD_BYTES} bytes or has more than {MAX_FIELDS} fields")]
pub struct RecordTooLong;

pub struct Records {
    reader: Reader,
    output: Vec<u8>,
    output_len: usize,
    ends: Vec<usize>,
    ends_len: usize,
    complete: bool,
    /// Bytes seen so far, up to the length of a BOM, to strip one at the start of the file.
    seen: usize,
}

impl Default for Records {
    fn default() -> Self {
        Records {
            reader: Reader::new(),
            output: vec![0; 4096],
            output_len: 0,
            ends: vec![0; 16],
            ends_len: 0,
            complete: false,
            seen: 0,
        }
    }
}

impl Records {
    /// Parses from `input`, advancing it, until a record is complete or `input` is used up.
    /// `at_end`: `input` is the last of the file (possibly empty).
    pub fn read(&mut self, input: &mut &[u8], at_end: bool) -> Result<Step, RecordTooLong> {
        // csv-core takes an empty input for the end of the file.
        if input.is_empty() && !at_end {
            return Ok(Step::NeedInput);
        }
        // A BOM is skipped before csv-core sees it (it would otherwise be data, and make a quoted
        // first header field unreadable). The file's first bytes may arrive one at a time.
        // (A file starting with part of a BOM loses that part too: it is not UTF-8 text anyway.)
        while self.seen < BOM.len() && !input.is_empty() {
            if input[0] != BOM[self.seen] {
                self.seen = BOM.len();
                break;
            }
            self.seen += 1;
            *input = &input[1..];
        }
        if input.is_empty() && !at_end {
            return Ok(Step::NeedInput);
        }
        if self.complete {
            self.output_len = 0;
            self.ends_len = 0;
            self.complete = false;
        }
        loop {
            let (result, read, written, ended) = self.reader.read_record(
                input,
                &mut self.output[self.output_len..],
                &mut self.ends[self.ends_len..],
            );
            // Field ends count from the start of the record, across calls.
            *input = &input[read..];
            self.output_len += written;
            self.ends_len += ended;
            match result {
                // The last input is used up: go round once more with it empty, which tells
                // csv-core that the file has ended.
                ReadRecordResult::InputEmpty if at_end => {}
                ReadRecordResult::InputEmpty => return Ok(Step::NeedInput),
                ReadRecordResult::OutputFull => {
                    if self.output.len() >= MAX_RECORD_BYTES {
                        return Err(RecordTooLong);
                    }
                    let doubled = self.output.len() * 2;
                    self.output.resize(doubled, 0);
                }
                ReadRecordResult::OutputEndsFull => {
                    if self.ends.len() >= MAX_FIELDS {
                        return Err(RecordTooLong);
                    }
                    let doubled = self.ends.len() * 2;
                    self.ends.resize(doubled, 0);
                }
                ReadRecordResult::Record => {
                    self.complete = true;
                    return Ok(Step::Record);
                }
                ReadRecordResult::End => return Ok(Step::End),
            }
        }
    }

    /// The fields of the record just completed.
    pub fn fields(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends[..self.ends_len].iter().map(move |&end| {
            let field = &self.output[start..end];
            start = end;
            field
        })
    }

    pub fn field_count(&self) -> usize {
        self.ends_len
    }
}

/// Whether `fields` is the header row the contract asks for; returns whether it has `note`.
pub fn check_header<'a>(fields: impl Iterator<Item = &'a [u8]>) -> Option<bool> {
    let names: Vec<&[u8]> = fields.map(<[u8]>::trim_ascii).collect();
    let required = HEADER.map(str::as_bytes);
    match names.as_slice() {
        names if names == required => Some(false),
        [columns @ .., note] if *columns == required && *note == NOTE.as_bytes() => Some(true),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `data` in chunks of `size` bytes and collects every record.
    fn parse_in_chunks(data: &[u8], size: usize) -> Vec<Vec<String>> {
        let mut records = Records::default();
        let mut rows = Vec::new();
        let mut chunks = data.chunks(size).peekable();
        let mut input: &[u8] = chunks.next().unwrap_or(&[]);
        loop {
            let at_end = chunks.peek().is_none();
            match records.read(&mut input, at_end).unwrap() {
                Step::NeedInput => input = chunks.next().expect("more input after the end"),
                Step::Record => rows.push(
                    records
                        .fields()
                        .map(|f| String::from_utf8(f.to_vec()).unwrap())
                        .collect(),
                ),
                Step::End => return rows,
            }
        }
    }

    #[test]
    fn records_are_the_same_whatever_the_chunk_boundaries() {
        let data = b"external_ref,currency,sku,quantity,unit_price_cents,note\r\nPO-1,EUR,A,1,100,\"a, \"\"quoted\"\"\nnote\"\nPO-1,EUR,B,2,250,\nPO-2,USD,C,3,5";
        let whole = parse_in_chunks(data, data.len());
        assert_eq!(whole.len(), 4);
        assert_eq!(whole[1][5], "a, \"quoted\"\nnote");
        assert_eq!(whole[3], ["PO-2", "USD", "C", "3", "5"]);
        for size in 1..16 {
            assert_eq!(parse_in_chunks(data, size), whole, "chunks of {size}");
        }
    }

    #[test]
    fn the_header_must_name_the_columns_in_order() {
        let header = |line: &str| check_header(line.split(',').map(str::as_bytes));
        assert_eq!(
            header("external_ref,currency,sku,quantity,unit_price_cents"),
            Some(false)
        );
        assert_eq!(
            header("external_ref,currency,sku,quantity,unit_price_cents,note"),
            Some(true)
        );
        assert_eq!(
            header("currency,external_ref,sku,quantity,unit_price_cents"),
            None
        );
        assert_eq!(header("external_ref,currency,sku,quantity"), None);
        assert_eq!(
            header("external_ref,currency,sku,quantity,unit_price_cents,extra"),
            None
        );
    }

    #[test]
    fn a_byte_order_mark_is_not_data_even_before_a_quote() {
        let data =
            "\u{feff}\"external_ref\",currency,sku,quantity,unit_price_cents\nPO-1,EUR,A,1,1\n";
        for size in 1..8 {
            let rows = parse_in_chunks(data.as_bytes(), size);
            assert_eq!(rows[0][0], "external_ref", "chunks of {size}");
            assert_eq!(rows.len(), 2);
        }
    }

    #[test]
    fn an_endless_row_is_refused_not_buffered() {
        let mut records = Records::default();
        let long = vec![b'x'; MAX_RECORD_BYTES * 2];
        let mut input = &long[..];
        assert!(records.read(&mut input, false).is_err());
    }
}
