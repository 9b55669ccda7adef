//! Keyset pagination with opaque, signed cursors.
//!
//! Prevents: pages that skip or repeat rows while others are inserted (OFFSET does both), list
//! queries that get slower the deeper a client pages, unbounded page sizes, and cursors that a
//! client can forge or replay under someone else's identity or other filters. A cursor is the
//! last row's sort key plus an HMAC over it, the caller and the filters.

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::problem::{ErrorCode, Problem};

pub const DEFAULT_LIMIT: i64 = 20;
pub const MAX_LIMIT: i64 = 100;

/// A position in `ORDER BY created_at DESC, id DESC`: a page holds the rows strictly after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keyset {
    pub created_at: DateTime<Utc>,
    pub id: Uuid,
}

/// A sort key a cursor can carry: fixed-size bytes, and the key before every row.
pub trait Position: Sized {
    /// The first page starts here.
    fn start() -> Self;
    fn to_bytes(&self) -> Vec<u8>;
    /// `None` when the bytes do not decode (never after a valid signature, but still checked).
    fn from_bytes(bytes: &[u8]) -> Option<Self>;
}

impl Position for Keyset {
    /// Before every row: newer than anything that can exist.
    fn start() -> Keyset {
        let far_future = Utc
            .with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
            .single()
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        Keyset {
            created_at: far_future,
            id: Uuid::max(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(8 + 16);
        bytes.extend_from_slice(&self.created_at.timestamp_micros().to_be_bytes());
        bytes.extend_from_slice(self.id.as_bytes());
        bytes
    }

    fn from_bytes(bytes: &[u8]) -> Option<Keyset> {
        let (micros, id) = bytes.split_at_checked(8)?;
        Some(Keyset {
            created_at: DateTime::from_timestamp_micros(i64::from_be_bytes(
                micros.try_into().ok()?,
            ))?,
            id: Uuid::from_slice(id).ok()?,
        })
    }
}

/// The query parameters of every list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Page size: default 20, values above 100 are treated as 100.
    #[param(minimum = 1, example = 20)]
    pub limit: Option<i64>,
    /// The `next_cursor` of the previous page; omit for the first page.
    #[param(min_length = 1)]
    pub cursor: Option<String>,
}

/// A validated page request: the size and where to start.
#[derive(Debug, Clone)]
pub struct PageRequest<P = Keyset> {
    pub limit: i64,
    pub after: P,
}

/// Signs and checks cursors. `binding` names whatever the cursor must not be reused with: the
/// caller and the list's filters.
pub struct Cursors {
    key: hmac::Key,
}

impl std::fmt::Debug for Cursors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cursors")
    }
}

const MAC_LEN: usize = 32;

impl Cursors {
    pub fn new(key: &[u8]) -> Self {
        Cursors {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    pub fn encode(&self, position: impl Position, binding: &str) -> String {
        let mut bytes = position.to_bytes();
        let mac = hmac::sign(&self.key, &signed_message(&bytes, binding));
        bytes.extend_from_slice(mac.as_ref());
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The page a request asks for: `limit` defaulted and clamped, `cursor` verified against the
    /// caller and filters it was issued for (`binding`).
    pub fn request<P: Position>(
        &self,
        params: &PageParams,
        binding: &str,
    ) -> Result<PageRequest<P>, Problem> {
        let limit = match params.limit {
            None => DEFAULT_LIMIT,
            Some(limit) if limit < 1 => {
                return Err(Problem::new(
                    ErrorCode::InvalidParameter,
                    "`limit` must be at least 1.",
                ));
            }
            Some(limit) => limit.min(MAX_LIMIT),
        };
        let after = match &params.cursor {
            None => P::start(),
            Some(cursor) => self.decode(cursor, binding)?,
        };
        Ok(PageRequest { limit, after })
    }

    fn decode<P: Position>(&self, cursor: &str, binding: &str) -> Result<P, Problem> {
        let invalid = || {
            Problem::new(
                ErrorCode::InvalidCursor,
                "The cursor is not valid for this list; start again without one.",
            )
        };
        let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| invalid())?;
        let position_len = bytes.len().checked_sub(MAC_LEN).ok_or_else(invalid)?;
        let (position, mac) = bytes.split_at(position_len);
        hmac::verify(&self.key, &signed_message(position, binding), mac).map_err(|_| invalid())?;
        P::from_bytes(position).ok_or_else(invalid)
    }
}

fn signed_message(position: &[u8], binding: &str) -> Vec<u8> {
    [position, b"\n", binding.as_bytes()].concat()
}

/// One page of a list, with the cursor of the next page (`null` on the last).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

impl<T: Serialize> Page<T> {
    /// The page as a response, with `Link: <next>; rel="next"` when there is a next page.
    /// `list_url` is the list's path and query without `cursor` (`/v1/orders?limit=20`). A
    /// relative reference (RFC 8288 §3.1) resolves against the request URL, so it needs no trust
    /// in the Host header.
    pub fn into_response_with_link(self, list_url: &str) -> Result<Response, Problem> {
        let link = self
            .next_cursor
            .as_ref()
            .map(|cursor| format!("<{list_url}&cursor={cursor}>; rel=\"next\""));
        let mut response = axum::Json(self).into_response();
        if let Some(link) = link {
            response
                .headers_mut()
                .insert(header::LINK, link.parse().map_err(Problem::internal)?);
        }
        Ok(response)
    }
}

/// Cuts a fetched `limit + 1` rows down to the page, returning the key of its last row when there
/// is a next page.
pub fn split_page<T, P>(
    mut rows: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> P,
) -> (Vec<T>, Option<P>) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() > limit {
        rows.truncate(limit);
        let last = rows.last().map(&key);
        (rows, last)
    } else {
        (rows, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursors() -> Cursors {
        Cursors::new(&[1; 32])
    }

    fn position() -> Keyset {
        Keyset {
            created_at: DateTime::from_timestamp_micros(1_767_225_599_123_456).unwrap(),
            id: Uuid::now_v7(),
        }
    }

    #[test]
    fn a_cursor_round_trips_for_its_binding_only() {
        let cursor = cursors().encode(position(), "user:a|status=");
        let params = PageParams {
            limit: None,
            cursor: Some(cursor),
        };
        assert_eq!(
            cursors()
                .request::<Keyset>(&params, "user:a|status=")
                .unwrap()
                .after
                .id,
            position_id(&params)
        );
        let foreign = cursors()
            .request::<Keyset>(&params, "user:b|status=")
            .unwrap_err();
        assert_eq!(foreign.code(), ErrorCode::InvalidCursor);
        let other_filter = cursors()
            .request::<Keyset>(&params, "user:a|status=draft")
            .unwrap_err();
        assert_eq!(other_filter.code(), ErrorCode::InvalidCursor);
    }

    fn position_id(params: &PageParams) -> Uuid {
        let bytes = URL_SAFE_NO_PAD
            .decode(params.cursor.as_ref().unwrap())
            .unwrap();
        Uuid::from_slice(&bytes[8..24]).unwrap()
    }

    #[test]
    fn a_tampered_cursor_is_rejected() {
        let cursor = cursors().encode(position(), "b");
        let mut bytes = URL_SAFE_NO_PAD.decode(&cursor).unwrap();
        bytes[3] ^= 1;
        for tampered in [
            URL_SAFE_NO_PAD.encode(&bytes),
            "garbage".into(),
            String::new(),
            format!("{cursor}A"),
        ] {
            let params = PageParams {
                limit: None,
                cursor: Some(tampered),
            };
            assert_eq!(
                cursors()
                    .request::<Keyset>(&params, "b")
                    .unwrap_err()
                    .code(),
                ErrorCode::InvalidCursor
            );
        }
    }

    #[test]
    fn the_limit_defaults_clamps_and_rejects_zero() {
        let limit = |limit| {
            cursors()
                .request::<Keyset>(
                    &PageParams {
                        limit,
                        cursor: None,
                    },
                    "b",
                )
                .map(|page| page.limit)
        };
        assert_eq!(limit(None).unwrap(), 20);
        assert_eq!(limit(Some(1000)).unwrap(), 100);
        assert_eq!(
            limit(Some(0)).unwrap_err().code(),
            ErrorCode::InvalidParameter
        );
    }

    #[test]
    fn a_page_knows_whether_another_follows() {
        let key = |n: &i64| Keyset {
            created_at: DateTime::from_timestamp_micros(*n).unwrap(),
            id: Uuid::nil(),
        };
        let (page, next) = split_page(vec![5, 4, 3], 2, key);
        assert_eq!(page, [5, 4]);
        assert_eq!(next.unwrap().created_at.timestamp_micros(), 4);
        assert!(split_page(vec![5, 4], 2, key).1.is_none());
    }
}
