//! The import domain: its states, and one CSV row parsed with the same rules as the orders API.

use std::borrow::Cow;
use std::fmt::Write;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;
use validator::ValidationError;

use crate::orders::domain::{Currency, ExternalRef, Note, Quantity, Sku, UnitPrice};
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

/// A row ready for staging. An invalid row is staged too (`valid: false`, with whatever fields
/// parsed) so that its order is rejected when the rows are grouped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagedRow {
    pub row: i32,
    pub external_ref: String,
    pub valid: bool,
    pub currency: Option<String>,
    pub sku: Option<String>,
    pub quantity: Option<i64>,
    pub unit_price_cents: Option<i64>,
    pub note: Option<String>,
}

/// What one data row becomes: a staged row (absent when even its external_ref is unusable,
/// so it belongs to no order) and its errors.
#[derive(Debug, Default)]
pub struct ParsedRow {
    pub staged: Option<StagedRow>,
    pub errors: Vec<RowError>,
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
        // Still staged (as invalid) when it names its order, so that the order is rejected.
        let external_ref = fields
            .first()
            .and_then(|raw| std::str::from_utf8(raw).ok())
            .and_then(|raw| ExternalRef::parse(raw.to_owned()).ok());
        return ParsedRow {
            staged: external_ref.map(|external_ref| StagedRow::invalid(row, external_ref)),
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
    let valid = p.errors.is_empty();
    ParsedRow {
        staged: external_ref.map(|external_ref| StagedRow {
            row,
            external_ref: external_ref.get().clone(),
            valid,
            currency: currency.map(|c| c.get().clone()),
            sku: sku.map(|s| s.get().clone()),
            quantity: quantity.map(|q| *q.get()),
            unit_price_cents: unit_price.map(|u| *u.get()),
            note: note.map(|n| n.get().clone()),
        }),
        errors: p.errors,
    }
}

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
        match std::str::from_utf8(raw) {
            Ok(text) => Some(text.to_owned()),
            Err(_) => {
                self.report(field, invalid("encoding", "is not valid UTF-8"));
                None
            }
        }
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

impl StagedRow {
    fn invalid(row: i32, external_ref: ExternalRef) -> Self {
        StagedRow {
            row,
            external_ref: external_ref.get().clone(),
            valid: false,
            currency: None,
            sku: None,
            quantity: None,
            unit_price_cents: None,
            note: None,
        }
    }

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
        fn number(out: &mut String, value: Option<i64>) {
            out.push('\t');
            match value {
                None => out.push_str("\\N"),
                Some(value) => {
                    let _ = write!(out, "{value}");
                }
            }
        }
        let _ = write!(out, "{import_id}");
        text(out, Some(&self.external_ref));
        let _ = write!(
            out,
            "\t{}\t{}",
            self.row,
            if self.valid { 't' } else { 'f' }
        );
        text(out, self.currency.as_deref());
        text(out, self.sku.as_deref());
        number(out, self.quantity);
        number(out, self.unit_price_cents);
        text(out, self.note.as_deref());
        out.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str, has_note: bool) -> ParsedRow {
        parse_row(7, line.split(',').map(str::as_bytes), has_note)
    }

    #[test]
    fn a_valid_row_is_staged_as_valid() {
        let parsed = parse("PO-1,EUR,BOOK-1,2,1250,gift", true);
        assert!(parsed.errors.is_empty());
        let row = parsed.staged.unwrap();
        assert!(row.valid);
        assert_eq!((row.quantity, row.unit_price_cents), (Some(2), Some(1250)));
        assert_eq!(row.note.as_deref(), Some("gift"));
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
        // Staged as invalid so that the whole order PO-1 is rejected.
        assert!(!parsed.staged.unwrap().valid);
    }

    #[test]
    fn a_row_without_a_usable_reference_belongs_to_no_order() {
        let parsed = parse(",EUR,A,1,1", false);
        assert_eq!(parsed.errors[0].field, "external_ref");
        assert!(parsed.staged.is_none());
        let short = parse("PO-1,EUR,A,1", false);
        assert_eq!(short.errors[0].code, "field_count");
        let staged = short.staged.expect("a short row still rejects its order");
        assert_eq!(
            (staged.external_ref.as_str(), staged.valid),
            ("PO-1", false)
        );
    }

    #[test]
    fn copy_lines_escape_what_the_text_format_reserves() {
        let row = StagedRow {
            row: 3,
            external_ref: "PO\t1".into(),
            valid: true,
            currency: Some("EUR".into()),
            sku: Some("A".into()),
            quantity: Some(1),
            unit_price_cents: None,
            note: Some("a\\b\nc".into()),
        };
        let mut line = String::new();
        row.write_copy_line(Uuid::nil(), &mut line);
        assert_eq!(
            line,
            "00000000-0000-0000-0000-000000000000\tPO\\t1\t3\tt\tEUR\tA\t1\t\\N\ta\\\\b\\nc\n"
        );
    }
}
