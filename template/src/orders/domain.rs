//! The order domain: its state machine and the types that make invalid orders unrepresentable.
//!
//! Every value that reaches this module has been parsed into a newtype whose constructor holds
//! the rule (`Sku::parse`, `Quantity::parse`, …); the request types in `orders` call the same
//! constructors from their `validator` checks, so a rule is written once.

use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use validator::ValidationError;

use crate::validation::invalid;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Draft,
    Submitted,
    Approved,
    Cancelled,
}

/// The explicit intents a client can express; each is its own endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Submit,
    Approve,
    Cancel,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Draft => "draft",
            OrderStatus::Submitted => "submitted",
            OrderStatus::Approved => "approved",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    pub fn from_stored(value: &str) -> anyhow::Result<Self> {
        match value {
            "draft" => Ok(OrderStatus::Draft),
            "submitted" => Ok(OrderStatus::Submitted),
            "approved" => Ok(OrderStatus::Approved),
            "cancelled" => Ok(OrderStatus::Cancelled),
            other => anyhow::bail!("unknown order status {other:?} in orders.status"),
        }
    }

    /// The state machine: draft → submitted → approved, and draft or submitted → cancelled.
    pub fn apply(self, action: Action) -> Result<OrderStatus, IllegalTransition> {
        match (self, action) {
            (OrderStatus::Draft, Action::Submit) => Ok(OrderStatus::Submitted),
            (OrderStatus::Submitted, Action::Approve) => Ok(OrderStatus::Approved),
            (OrderStatus::Draft | OrderStatus::Submitted, Action::Cancel) => {
                Ok(OrderStatus::Cancelled)
            }
            (from, action) => Err(IllegalTransition { from, action }),
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} an order that is {from}")]
pub struct IllegalTransition {
    pub from: OrderStatus,
    pub action: Action,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Submit => "submit",
            Action::Approve => "approve",
            Action::Cancel => "cancel",
        })
    }
}

/// Declares a newtype over a value with a parse function holding its rule.
macro_rules! parsed {
    ($(#[$doc:meta])* $name:ident($inner:ty), |$raw:ident| $rule:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name($inner);

        impl $name {
            pub fn parse($raw: $inner) -> Result<Self, ValidationError> {
                $rule.map(|()| $name($raw))
            }

            pub fn get(&self) -> &$inner {
                &self.0
            }
        }
    };
}

fn is_code_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

parsed!(
    /// ISO 4217 currency code: three upper-case letters.
    Currency(String),
    |raw| if raw.len() == 3 && raw.chars().all(|c| c.is_ascii_uppercase()) { Ok(()) } else { Err(invalid("currency", "must be three upper-case letters (ISO 4217)")) }
);
parsed!(
    /// Stock-keeping unit: 1–64 characters of `[A-Za-z0-9._-]`.
    Sku(String),
    |raw| if (1..=64).contains(&raw.len()) && raw.chars().all(is_code_char) { Ok(()) } else { Err(invalid("sku", "must be 1-64 characters of A-Z, a-z, 0-9, '.', '_' or '-'")) }
);
parsed!(
    /// 1–10 000 units.
    Quantity(i64),
    |raw| if (1..=10_000).contains(&raw) { Ok(()) } else { Err(invalid("range", "must be between 1 and 10000")) }
);
parsed!(
    /// Price of one unit in minor units (cents): 0–100 000 000.
    UnitPrice(i64),
    |raw| if (0..=100_000_000).contains(&raw) { Ok(()) } else { Err(invalid("range", "must be between 0 and 100000000")) }
);
parsed!(
    /// Free text up to 1000 characters.
    Note(String),
    |raw| if raw.chars().count() <= 1000 { Ok(()) } else { Err(invalid("length", "must be at most 1000 characters")) }
);
parsed!(
    /// The client's own reference for the order: 1–64 characters.
    ExternalRef(String),
    |raw| if (1..=64).contains(&raw.chars().count()) { Ok(()) } else { Err(invalid("length", "must be 1-64 characters")) }
);

pub const MAX_ITEMS: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineItem {
    pub sku: Sku,
    pub quantity: Quantity,
    pub unit_price: UnitPrice,
}

/// A valid order about to be created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub currency: Currency,
    /// 1 to [`MAX_ITEMS`] items.
    pub items: Vec<LineItem>,
    pub note: Option<Note>,
    pub external_ref: Option<ExternalRef>,
}

impl NewOrder {
    /// Sum of quantity × unit price. Cannot overflow: 100 items × 10 000 × 100 000 000 < 2^63.
    pub fn total_cents(&self) -> i64 {
        self.items
            .iter()
            .map(|item| item.quantity.get() * item.unit_price.get())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_machine_allows_exactly_the_documented_transitions() {
        use Action::*;
        use OrderStatus::*;
        let all = [Draft, Submitted, Approved, Cancelled];
        let mut allowed = Vec::new();
        for from in all {
            for action in [Submit, Approve, Cancel] {
                if let Ok(to) = from.apply(action) {
                    allowed.push((from, action, to));
                }
            }
        }
        assert_eq!(
            allowed,
            [
                (Draft, Submit, Submitted),
                (Draft, Cancel, Cancelled),
                (Submitted, Approve, Approved),
                (Submitted, Cancel, Cancelled)
            ]
        );
        let error = Approved.apply(Cancel).unwrap_err();
        assert_eq!(error.to_string(), "cannot cancel an order that is approved");
    }

    #[test]
    fn newtypes_hold_the_contract_rules() {
        assert!(Currency::parse("EUR".into()).is_ok());
        for bad in ["eur", "EU", "EURO", "E1R"] {
            assert!(Currency::parse(bad.into()).is_err(), "{bad}");
        }
        assert!(Sku::parse("A-1_b.2".into()).is_ok());
        assert!(Sku::parse(String::new()).is_err());
        assert!(Sku::parse("has space".into()).is_err());
        assert!(Sku::parse("x".repeat(65)).is_err());
        assert!(
            Quantity::parse(0).is_err()
                && Quantity::parse(10_001).is_err()
                && Quantity::parse(10_000).is_ok()
        );
        assert!(
            UnitPrice::parse(-1).is_err()
                && UnitPrice::parse(0).is_ok()
                && UnitPrice::parse(100_000_001).is_err()
        );
        assert!(Note::parse("é".repeat(1000)).is_ok() && Note::parse("x".repeat(1001)).is_err());
        assert!(
            ExternalRef::parse(String::new()).is_err()
                && ExternalRef::parse("x".repeat(64)).is_ok()
        );
    }

    #[test]
    fn the_total_is_the_sum_of_the_lines() {
        let item = |quantity, price| LineItem {
            sku: Sku::parse("A".into()).unwrap(),
            quantity: Quantity::parse(quantity).unwrap(),
            unit_price: UnitPrice::parse(price).unwrap(),
        };
        let order = NewOrder {
            currency: Currency::parse("EUR".into()).unwrap(),
            items: vec![item(2, 150), item(1, 99)],
            note: None,
            external_ref: None,
        };
        assert_eq!(order.total_cents(), 399);
    }
}
