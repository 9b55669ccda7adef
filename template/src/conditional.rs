//! Conditional requests (RFC 9110 §13): strong ETags, `If-None-Match` → 304, `If-Match` → 412,
//! and 428 where a write must be conditional.
//!
//! Prevents: lost updates. Two clients read version 3, both write, and the second silently
//! overwrites the first. With `If-Match` the second write fails with 412 and the client re-reads.
//! It also saves bandwidth on re-reads: an unchanged resource answers 304 with no body.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::problem::{ErrorCode, Problem};

/// The strong ETag of a resource at `version`: changes on every write.
pub fn etag(version: i32) -> String {
    format!("\"v{version}\"")
}

/// The strong ETag of a representation with no version column (an import's progress): a digest
/// of the bytes the client reads, so it changes exactly when they do.
pub fn etag_of(representation: &[u8]) -> String {
    use base64::Engine;
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, representation);
    let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12]);
    format!("\"{tag}\"")
}

/// Reads are cacheable only by the client, and only after revalidation with the ETag.
pub const REVALIDATE: HeaderValue = HeaderValue::from_static("private, no-cache");

/// A parsed `If-Match` or `If-None-Match` header.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tags {
    /// `*`: matches any current representation.
    Any,
    /// `(weak, opaque-tag including quotes)` for each listed tag.
    List(Vec<(bool, String)>),
}

impl Tags {
    fn from_headers(headers: &HeaderMap, name: &HeaderName) -> Option<Tags> {
        let mut tags = Vec::new();
        for value in headers.get_all(name) {
            // A header that is not ASCII cannot match anything; it still counts as present.
            let value = value.to_str().unwrap_or_default();
            for tag in value
                .split(',')
                .map(str::trim)
                .filter(|tag| !tag.is_empty())
            {
                if tag == "*" {
                    return Some(Tags::Any);
                }
                match tag.strip_prefix("W/") {
                    Some(opaque) => tags.push((true, opaque.to_owned())),
                    None => tags.push((false, tag.to_owned())),
                }
            }
        }
        headers.contains_key(name).then_some(Tags::List(tags))
    }

    /// Strong comparison: both tags strong and identical.
    fn matches_strongly(&self, current: &str) -> bool {
        match self {
            Tags::Any => true,
            Tags::List(tags) => tags.iter().any(|(weak, tag)| !weak && tag == current),
        }
    }

    /// Weak comparison: identical opaque tags, weak or not.
    fn matches_weakly(&self, current: &str) -> bool {
        match self {
            Tags::Any => true,
            Tags::List(tags) => tags.iter().any(|(_, tag)| tag == current),
        }
    }
}

/// The request's `If-Match`, if any. Evaluate it after authentication, validation and the
/// idempotency check, right before the write.
#[derive(Debug, Clone)]
pub struct IfMatch(Option<Tags>);

impl IfMatch {
    /// 412 unless the header is absent or matches `current`.
    pub fn check(&self, current: &str) -> Result<(), Problem> {
        match &self.0 {
            Some(tags) if !tags.matches_strongly(current) => Err(Problem::new(
                ErrorCode::PreconditionFailed,
                format!("The resource has changed; its current ETag is {current}."),
            )
            .with_header(
                header::ETAG,
                HeaderValue::from_str(current).unwrap_or(HeaderValue::from_static("\"\"")),
            )),
            _ => Ok(()),
        }
    }

    /// 428 when the header is missing, for writes that must be conditional.
    pub fn require(&self) -> Result<(), Problem> {
        match self.0 {
            Some(_) => Ok(()),
            None => Err(Problem::new(
                ErrorCode::PreconditionRequired,
                "Send `If-Match` with the ETag you last read, so that you do not overwrite a newer version.",
            )),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(IfMatch(Tags::from_headers(
            &parts.headers,
            &header::IF_MATCH,
        )))
    }
}

/// The request's `If-None-Match`, if any.
#[derive(Debug, Clone)]
pub struct IfNoneMatch(Option<Tags>);

impl IfNoneMatch {
    /// `Some(304 response)` when the client's copy is current.
    pub fn not_modified(&self, current: &str) -> Option<Response> {
        let tags = self.0.as_ref()?;
        tags.matches_weakly(current).then(|| {
            let etag = HeaderValue::from_str(current).unwrap_or(HeaderValue::from_static("\"\""));
            (
                StatusCode::NOT_MODIFIED,
                [(header::ETAG, etag), (header::CACHE_CONTROL, REVALIDATE)],
            )
                .into_response()
        })
    }
}

impl<S: Send + Sync> FromRequestParts<S> for IfNoneMatch {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(IfNoneMatch(Tags::from_headers(
            &parts.headers,
            &header::IF_NONE_MATCH,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(name: HeaderName, value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(name, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn if_match_uses_strong_comparison() {
        let current = etag(3);
        let check = |value: &str| {
            IfMatch(Tags::from_headers(
                &headers(header::IF_MATCH, value),
                &header::IF_MATCH,
            ))
            .check(&current)
        };
        assert!(check("\"v3\"").is_ok());
        assert!(check("\"v1\", \"v3\"").is_ok());
        assert!(check("*").is_ok());
        assert_eq!(
            check("\"v2\"").unwrap_err().code(),
            ErrorCode::PreconditionFailed
        );
        assert!(check("W/\"v3\"").is_err(), "weak tags never match strongly");
        assert!(IfMatch(None).check(&current).is_ok());
        assert_eq!(
            IfMatch(None).require().unwrap_err().code(),
            ErrorCode::PreconditionRequired
        );
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let current = etag(3);
        let check = |value: &str| {
            IfNoneMatch(Tags::from_headers(
                &headers(header::IF_NONE_MATCH, value),
                &header::IF_NONE_MATCH,
            ))
            .not_modified(&current)
            .is_some()
        };
        assert!(check("\"v3\""));
        assert!(check("W/\"v3\""));
        assert!(check("*"));
        assert!(!check("\"v2\""));
        assert!(IfNoneMatch(None).not_modified(&current).is_none());
    }
}
