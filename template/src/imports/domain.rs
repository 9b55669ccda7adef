//! The import domain: its states, and one CSV row parsed with the same rules as the orders API.

use std::borrow::Cow;
use std::fmt::Write;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;
use validator::ValidationError;

use crate::orders::domain::{Currency, ExternalRef, Note, Quantity, Sku, UnitPrice};

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
pub fn parse_row<'a>(row: i32, fields: impl Iterator<Item = &'a [u8]>, has_note: bool) -> ParsedRow {
    let fields: Vec<&[u8]> = fields.collect();
    let expected = if has_note { 6 } else { 5 };
    let mut parsed = ParsedRow::default();
    let mut error = |field: &'static str, code: Cow<'static, str>, message: Cow<'static, str>| {
        parsed.errors.push(RowError { row, field, code, message });
    };
    if fields.len() != expected {
        error(
            "row",
            "field_count".into(),
            format!("has {} fields; the header has {expected}", fields.len()).into(),
        );
        return parsed;
    }
    let mut text = |index: usize, field: &'static str| match std::str::from_utf8(fields[index]) {
        Ok(value) => Some(value.to_owned()),
        Err(_) => {
            error(field, "encoding".into(), "is not valid UTF-8".into());
            None
        }
    };
    let external_ref = text(0, "external_ref");
    let currency = text(1, "currency");
    let sku = text(2, "sku");
    let quantity = text(3, "quantity");
    let unit_price = text(4, "unit_price_cents");
    let note = if has_note { text(5, "note") } else { None };
    drop(text);

    let mut errors = Vec::new();
    let mut check = |field: &'static str, result: Result<(), ValidationError>| {
        if let Err(invalid) = result {
            errors.push((field, invalid));
        }
    };
    let integer = |raw: &str| raw.trim().parse::<i64>().map_err(|_| {
        let mut invalid = ValidationError::new("type");
        invalid.message = Some("must be an integer".into());
        invalid
    });
    let external_ref = external_ref.and_then(|raw| {
        let parsed = ExternalRef::parse(raw.clone());
        check("external_ref", parsed.as_ref().map(drop).map_err(Clone::clone));
        parsed.ok().map(|_| raw)
    });
    let currency = currency.and_then(|raw| {
        check("currency", Currency::parse(raw.clone()).map(drop));
        Some(raw)
    });
    let sku = sku.and_then(|raw| {
        check("sku", Sku::parse(raw.clone()).map(drop));
        Some(raw)
    });
    let quantity = quantity.and_then(|raw| match integer(&raw) {
        Ok(value) => {
            check("quantity", Quantity::parse(value).map(drop));
            Some(value)
        }
        Err(invalid) => {
            check("quantity", Err(invalid));
            None
        }
    });
    let unit_price_cents = unit_price.and_then(|raw| match integer(&raw) {
        Ok(value) => {
            check("unit_price_cents", UnitPrice::parse(value).map(drop));
            Some(value)
        }
        Err(invalid) => {
            check("unit_price_cents", Err(invalid));
            None
        }
    });
    let note = note.filter(|note| !note.is_empty()).and_then(|raw| {
        check("note", Note::parse(raw.clone()).map(drop));
        Some(raw)
    });
    for (field, invalid) in errors {
        let message = invalid.message.unwrap_or(Cow::Borrowed("is invalid"));
        error(field, invalid.code, message);
    }
    let valid = parsed.errors.is_empty();
    parsed.staged = external_ref.map(|external_ref| StagedRow {
        row,
        external_ref,
        valid,
        currency,
        sku,
        quantity,
        unit_price_cents,
        note,
    });
    parsed
}

impl StagedRow {
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
        let _ = write!(out, "\t{}\t{}", self.row, if self.valid { 't' } else { 'f' });
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
        let fields: Vec<_> = parsed.errors.iter().map(|e| (e.field, e.code.as_ref())).collect();
        assert_eq!(
            fields,
            [("currency", "currency"), ("sku", "sku"), ("quantity", "range"), ("unit_price_cents", "type")]
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
