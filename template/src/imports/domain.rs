//! The import domain: its states, one CSV row parsed with the orders API's rules, the rules over
//! an order's rows (`OrderRows`), and a staged row's COPY line.

use std::borrow::Cow;
use std::fmt::Write;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;
use validator::ValidationError;

use crate::orders::domain::{
    Currency, ExternalRef, LineItem, MAX_ITEMS, NewOrder, Note, Quantity, Sku, UnitPrice,
};
use crate::validation::invalid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImportStatus {
    Queued,
    Running,
    Succeeded,
    CompletedWithErrors,
    Failed,
}

impl ImportStatus {
    pub fn from_stored(value: &str) -> anyhow::Result<Self> {
        Ok(match value {
            "queued" => ImportStatus::Queued,
            "running" => ImportStatus::Running,
            "succeeded" => ImportStatus::Succeeded,
            "completed_with_errors" => ImportStatus::CompletedWithErrors,
            "failed" => ImportStatus::Failed,
            other => anyhow::bail!("unknown import status {other:?} in imports.status"),
        })
    }

    pub fn is_finished(self) -> bool {
        !matches!(self, ImportStatus::Queued | ImportStatus::Running)
    }
}

/// One error of one data row (`row` counts data rows from 1, the header excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowError {
    pub row: i32,
    pub field: &'static str,
    pub code: Cow<'static, str>,
    pub message: Cow<'static, str>,
}

/// One data row that names its order (whether it is staged or written straight away). `line` is
/// `None` when the row has an error: its order is then rejected as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyedRow {
    pub row: i32,
    pub external_ref: ExternalRef,
    pub line: Option<RowLine>,
}

/// What a valid row adds to its order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowLine {
    pub currency: Currency,
    pub item: LineItem,
    pub note: Option<Note>,
}

/// What one data row becomes: a keyed row (absent when even its external_ref is unusable, so it
/// belongs to no order) and its errors.
#[derive(Debug, Default)]
pub struct ParsedRow {
    pub keyed: Option<KeyedRow>,
    pub errors: Vec<RowError>,
}

/// The order a row belongs to, from its first field: the same rule [`parse_row`] applies.
pub fn order_key(raw: &[u8]) -> Option<ExternalRef> {
    ExternalRef::parse(decode(raw).ok()?.to_owned()).ok()
}

/// A field as text: UTF-8, without NUL (which Postgres cannot store in `text`, and which would
/// fail a whole batch instead of one row).
fn decode(raw: &[u8]) -> Result<&str, ValidationError> {
    match std::str::from_utf8(raw) {
        Ok(text) if !text.contains('\0') => Ok(text),
        Ok(_) => Err(invalid("encoding", "contains a NUL character")),
        Err(_) => Err(invalid("encoding", "is not valid UTF-8")),
    }
}

/// Parses one data row. `fields` are the raw bytes of its fields; `has_note` says whether the
/// header has the `note` column.
pub fn parse_row<'a>(
    row: i32,
    fields: impl Iterator<Item = &'a [u8]>,
    has_note: bool,
) -> ParsedRow {
    let fields: Vec<&[u8]> = fields.collect();
    let expected = if has_note { 6 } else { 5 };
    let mut p = RowParser {
        row,
        errors: Vec::new(),
    };
    if fields.len() != expected {
        p.report(
            "row",
            invalid(
                "field_count",
                format!("has {} fields; the header has {expected}", fields.len()),
            ),
        );
        // Still keyed (as invalid) when it names its order, so that the order is rejected, on
        // either way.
        return ParsedRow {
            keyed: fields
                .first()
                .and_then(|raw| order_key(raw))
                .map(|external_ref| KeyedRow {
                    row,
                    external_ref,
                    line: None,
                }),
            errors: p.errors,
        };
    }
    let external_ref = p
        .text("external_ref", fields[0])
        .and_then(|raw| p.check("external_ref", ExternalRef::parse(raw)));
    let currency = p
        .text("currency", fields[1])
        .and_then(|raw| p.check("currency", Currency::parse(raw)));
    let sku = p
        .text("sku", fields[2])
        .and_then(|raw| p.check("sku", Sku::parse(raw)));
    let quantity = p
        .integer("quantity", fields[3])
        .and_then(|n| p.check("quantity", Quantity::parse(n)));
    let unit_price = p
        .integer("unit_price_cents", fields[4])
        .and_then(|n| p.check("unit_price_cents", UnitPrice::parse(n)));
    let note = match fields.get(5) {
        Some(raw) if !raw.is_empty() => p
            .text("note", raw)
            .and_then(|raw| p.check("note", Note::parse(raw))),
        _ => None,
    };
    let line = match (currency, sku, quantity, unit_price) {
        // Not when `note` had an error, though a note is optional.
        (Some(currency), Some(sku), Some(quantity), Some(unit_price)) if p.errors.is_empty() => {
            Some(RowLine {
                currency,
                item: LineItem {
                    sku,
                    quantity,
                    unit_price,
                },
                note,
            })
        }
        _ => None,
    };
    ParsedRow {
        keyed: external_ref.map(|external_ref| KeyedRow {
            row,
            external_ref,
            line,
        }),
        errors: p.errors,
    }
}

/// The rows of one order, added in row order; [`OrderRows::close`] says whether the order is
/// created. The rules that need an order's rows together live here, beside the row rules, and
/// hold the same whether the rows come straight from the file or sorted from staging:
/// every row valid, one currency (the first valid row's), at most [`MAX_ITEMS`] items.
/// Only the lines of an order that can still be created are kept, so an order with a million
/// rows holds at most `MAX_ITEMS` of them.
#[derive(Debug)]
pub struct OrderRows {
    external_ref: ExternalRef,
    currency: Option<Currency>,
    items: Vec<LineItem>,
    note: Option<Note>,
    valid_rows: usize,
    rejected: bool,
    errors: Vec<RowError>,
}

/// An order whose rows have all been seen: the order to create (`None`: rejected) and the errors
/// its rows broke together (each row's own errors were reported when it was parsed).
#[derive(Debug)]
pub struct ClosedOrder {
    pub order: Option<NewOrder>,
    pub errors: Vec<RowError>,
}

impl OrderRows {
    pub fn new(external_ref: ExternalRef) -> Self {
        OrderRows {
            external_ref,
            currency: None,
            items: Vec::new(),
            note: None,
            valid_rows: 0,
            rejected: false,
            errors: Vec::new(),
        }
    }

    pub fn external_ref(&self) -> &ExternalRef {
        &self.external_ref
    }

    pub fn push(&mut self, row: KeyedRow) {
        let Some(line) = row.line else {
            self.rejected = true;
            return;
        };
        self.valid_rows += 1;
        let currency = self.currency.get_or_insert_with(|| line.currency.clone());
        if line.currency != *currency {
            self.reject(row.row, "currency", "currency_mismatch", CURRENCY_MISMATCH);
        } else if self.valid_rows > MAX_ITEMS {
            // Counted over every valid row, those with another currency too.
            self.reject(row.row, "external_ref", "too_many_items", TOO_MANY_ITEMS);
        } else if !self.rejected {
            self.note = self.note.take().or(line.note);
            self.items.push(line.item);
        }
    }

    /// Rejects the order for a rule `row` broke; the messages are static, so a rejected order
    /// of a million rows costs one small error each, no text.
    fn reject(&mut self, row: i32, field: &'static str, code: &'static str, message: &'static str) {
        self.rejected = true;
        self.items = Vec::new();
        self.errors.push(RowError {
            row,
            field,
            code: Cow::Borrowed(code),
            message: Cow::Borrowed(message),
        });
    }

    pub fn close(self) -> ClosedOrder {
        let order = match self.currency {
            Some(currency) if !self.rejected && !self.items.is_empty() => Some(NewOrder {
                currency,
                items: self.items,
                note: self.note,
                external_ref: Some(self.external_ref),
            }),
            _ => None,
        };
        ClosedOrder {
            order,
            errors: self.errors,
        }
    }
}

const CURRENCY_MISMATCH: &str = "differs from the currency of the first row of this order";
/// Says [`MAX_ITEMS`]; a unit test holds the two together.
const TOO_MANY_ITEMS: &str = "an order has at most 100 items";

/// Collects the errors of one row; each step yields `None` for a field that failed.
struct RowParser {
    row: i32,
    errors: Vec<RowError>,
}

impl RowParser {
    fn report(&mut self, field: &'static str, error: ValidationError) {
        self.errors.push(RowError {
            row: self.row,
            field,
            code: error.code,
            message: error.message.unwrap_or(Cow::Borrowed("is invalid")),
        });
    }

    fn text(&mut self, field: &'static str, raw: &[u8]) -> Option<String> {
        self.check(field, decode(raw)).map(str::to_owned)
    }

    fn integer(&mut self, field: &'static str, raw: &[u8]) -> Option<i64> {
        let text = self.text(field, raw)?;
        match text.trim().parse() {
            Ok(number) => Some(number),
            Err(_) => {
                self.report(field, invalid("type", "must be an integer"));
                None
            }
        }
    }

    /// The domain newtype's own rule, the same the API applies.
    fn check<T>(&mut self, field: &'static str, parsed: Result<T, ValidationError>) -> Option<T> {
        parsed.map_err(|error| self.report(field, error)).ok()
    }
}

/// A staged row as `import_rows` holds it: what [`KeyedRow::write_copy_line`] wrote.
#[derive(Debug, Clone)]
pub struct StoredRow {
    pub row_no: i32,
    pub external_ref: String,
    pub valid: bool,
    pub currency: Option<String>,
    pub sku: Option<String>,
    pub quantity: Option<i64>,
    pub unit_price_cents: Option<i64>,
    pub note: Option<String>,
}

impl TryFrom<StoredRow> for KeyedRow {
    type Error = ValidationError;

    /// Parsed again by the same newtypes: what reaches an order is checked where it is used,
    /// whatever the table holds.
    fn try_from(stored: StoredRow) -> Result<KeyedRow, ValidationError> {
        let external_ref = ExternalRef::parse(stored.external_ref)?;
        let line = match stored {
            StoredRow {
                valid: true,
                currency: Some(currency),
                sku: Some(sku),
                quantity: Some(quantity),
                unit_price_cents: Some(unit_price),
                note,
                ..
            } => Some(RowLine {
                currency: Currency::parse(currency)?,
                item: LineItem {
                    sku: Sku::parse(sku)?,
                    quantity: Quantity::parse(quantity)?,
                    unit_price: UnitPrice::parse(unit_price)?,
                },
                note: note.map(Note::parse).transpose()?,
            }),
            StoredRow { valid: true, .. } => {
                return Err(invalid("incomplete", "a valid staged row lacks a field"));
            }
            StoredRow { valid: false, .. } => None,
        };
        Ok(KeyedRow {
            row: stored.row_no,
            external_ref,
            line,
        })
    }
}

impl KeyedRow {
    /// Appends the row as one line of COPY's text format (tab-separated, `\N` for NULL).
    pub fn write_copy_line(&self, import_id: Uuid, out: &mut String) {
        fn text(out: &mut String, value: Option<&str>) {
            out.push('\t');
            match value {
                None => out.push_str("\\N"),
                Some(value) => {
                    for c in value.chars() {
                        match c {
                            '\\' => out.push_str("\\\\"),
                            '\t' => out.push_str("\\t"),
                            '\n' => out.push_str("\\n"),
                            '\r' => out.push_str("\\r"),
                            c => out.push(c),
                        }
                    }
                }
            }
        }
        let _ = write!(out, "{import_id}");
        text(out, Some(self.external_ref.get()));
        match &self.line {
            None => {
                let _ = write!(out, "\t{}\tf\t\\N\t\\N\t\\N\t\\N\t\\N", self.row);
            }
            Some(line) => {
                let _ = write!(out, "\t{}\tt", self.row);
                text(out, Some(line.currency.get()));
                text(out, Some(line.item.sku.get()));
                let _ = write!(
                    out,
                    "\t{}\t{}",
                    line.item.quantity.get(),
                    line.item.unit_price.get()
                );
                text(out, line.note.as_ref().map(|note| note.get().as_str()));
            }
        }
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str, has_note: bool) -> ParsedRow {
        parse_row(7, line.split(',').map(str::as_bytes), has_note)
    }

    fn keyed(row: i32, line: &str) -> KeyedRow {
        parse_row(row, line.split(',').map(str::as_bytes), false)
            .keyed
            .unwrap()
    }

    #[test]
    fn a_valid_row_has_a_line() {
        let parsed = parse("PO-1,EUR,BOOK-1,2,1250,gift", true);
        assert!(parsed.errors.is_empty());
        let line = parsed.keyed.unwrap().line.unwrap();
        assert_eq!(
            (*line.item.quantity.get(), *line.item.unit_price.get()),
            (2, 1250)
        );
        assert_eq!(line.note.unwrap().get(), "gift");
    }

    #[test]
    fn every_bad_field_is_reported_with_the_api_codes() {
        let parsed = parse("PO-1,eur,has space,0,abc", false);
        let fields: Vec<_> = parsed
            .errors
            .iter()
            .map(|e| (e.field, e.code.as_ref()))
            .collect();
        assert_eq!(
            fields,
            [
                ("currency", "currency"),
                ("sku", "sku"),
                ("quantity", "range"),
                ("unit_price_cents", "type")
            ]
        );
        assert!(parsed.errors.iter().all(|e| e.row == 7));
        // Still keyed, without a line, so that the whole order PO-1 is rejected.
        assert_eq!(parsed.keyed.unwrap().line, None);
        let bad_note = parse(&format!("PO-1,EUR,A,1,1,{}", "n".repeat(1001)), true);
        assert_eq!(bad_note.keyed.unwrap().line, None);
    }

    #[test]
    fn text_postgres_cannot_store_is_a_row_error() {
        let parsed = parse("PO-1,EUR,A,1,1,a\0b", true);
        assert_eq!(
            (parsed.errors[0].field, parsed.errors[0].code.as_ref()),
            ("note", "encoding")
        );
        assert_eq!(parsed.keyed.unwrap().line, None);
        assert!(order_key(b"PO\0").is_none());
    }

    #[test]
    fn a_row_without_a_usable_reference_belongs_to_no_order() {
        let parsed = parse(",EUR,A,1,1", false);
        assert_eq!(parsed.errors[0].field, "external_ref");
        assert!(parsed.keyed.is_none());
        let short = parse("PO-1,EUR,A,1", false);
        assert_eq!(short.errors[0].code, "field_count");
        let staged = short.keyed.expect("a short row still rejects its order");
        assert_eq!(
            (staged.external_ref.get().as_str(), staged.line),
            ("PO-1", None)
        );
    }

    #[test]
    fn an_order_is_created_from_its_rows_in_row_order() {
        let mut order = OrderRows::new(ExternalRef::parse("PO-1".into()).unwrap());
        order.push(keyed(1, "PO-1,EUR,A,2,100"));
        order.push(keyed(4, "PO-1,EUR,B,1,50"));
        let closed = order.close();
        assert!(closed.errors.is_empty());
        let order = closed.order.unwrap();
        let skus: Vec<_> = order.items.iter().map(|i| i.sku.get().as_str()).collect();
        assert_eq!((skus, order.total_cents()), (vec!["A", "B"], 250));
    }

    #[test]
    fn one_bad_row_rejects_its_order_and_the_order_rules_report_each_row() {
        let mut invalid = OrderRows::new(ExternalRef::parse("PO-1".into()).unwrap());
        invalid.push(keyed(1, "PO-1,EUR,A,1,100"));
        invalid.push(keyed(2, "PO-1,EUR,B,0,100"));
        let closed = invalid.close();
        assert!(closed.order.is_none());
        assert!(closed.errors.is_empty(), "the row reported its own error");

        let mut mixed = OrderRows::new(ExternalRef::parse("PO-2".into()).unwrap());
        mixed.push(keyed(1, "PO-2,EUR,A,1,100"));
        mixed.push(keyed(2, "PO-2,USD,B,1,100"));
        mixed.push(keyed(3, "PO-2,USD,C,1,100"));
        let closed = mixed.close();
        assert!(closed.order.is_none());
        let rows: Vec<_> = closed
            .errors
            .iter()
            .map(|e| (e.row, e.code.as_ref()))
            .collect();
        assert_eq!(rows, [(2, "currency_mismatch"), (3, "currency_mismatch")]);

        let mut long = OrderRows::new(ExternalRef::parse("PO-3".into()).unwrap());
        for row in 1..=MAX_ITEMS as i32 + 2 {
            long.push(keyed(row, "PO-3,EUR,A,1,100"));
        }
        let closed = long.close();
        assert!(closed.order.is_none());
        let rows: Vec<_> = closed.errors.iter().map(|e| (e.row, e.field)).collect();
        assert_eq!(rows, [(101, "external_ref"), (102, "external_ref")]);
        assert!(closed.errors[0].message.contains(&MAX_ITEMS.to_string()));
    }

    #[test]
    fn staged_rows_round_trip_and_copy_lines_escape_what_the_text_format_reserves() {
        let row = parse_row(
            3,
            ["PO\t1", "EUR", "A", "1", "2", "a\\b\nc"]
                .into_iter()
                .map(str::as_bytes),
            true,
        )
        .keyed
        .unwrap();
        let mut line = String::new();
        row.write_copy_line(Uuid::nil(), &mut line);
        assert_eq!(
            line,
            "00000000-0000-0000-0000-000000000000\tPO\\t1\t3\tt\tEUR\tA\t1\t2\ta\\\\b\\nc\n"
        );
        let stored = StoredRow {
            row_no: 3,
            external_ref: "PO\t1".into(),
            valid: true,
            currency: Some("EUR".into()),
            sku: Some("A".into()),
            quantity: Some(1),
            unit_price_cents: Some(2),
            note: Some("a\\b\nc".into()),
        };
        assert_eq!(KeyedRow::try_from(stored.clone()).unwrap(), row);
        let incomplete = StoredRow {
            sku: None,
            ..stored
        };
        assert!(KeyedRow::try_from(incomplete).is_err());
    }
}
