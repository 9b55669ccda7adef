//! JSON request bodies parsed into typed, validated values, with every problem reported at once.
//!
//! Prevents: clients fixing one field per round trip, mass assignment, and invalid data reaching
//! the domain. A body goes through three checks and all their findings are returned together in
//! one 422, each located by a JSON Pointer:
//! 1. fields the request type does not have (read-only ones such as `status` are named as such),
//!    collected by `serde_ignored` instead of failing on the first;
//! 2. the shape and types (`serde_path_to_error` gives the pointer of a type error or missing
//!    field; the value is replaced by a stand-in and the body read again, to find the next);
//!    integer fields read through [`whole_number`], so `2.0` is the integer the document says it is;
//! 3. the rules declared with `validator`, whose custom checks call the domain newtypes' own
//!    parsers, so each rule is written once.

use std::borrow::Cow;

use aws_lc_rs::digest;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;
use serde_json::Value;
use validator::{Validate, ValidationErrors, ValidationErrorsKind};

use crate::extract::Json;
use crate::problem::{FieldError, Problem};

/// Fields that the service sets and a client may never write.
const READ_ONLY_FIELDS: &[&str] = &[
    "id",
    "status",
    "total_cents",
    "owner",
    "owner_id",
    "version",
    "created_at",
    "updated_at",
];

/// A JSON body that parsed into `T` and passed `T`'s validation, with the SHA-256 of its canonical
/// form (keys sorted, no whitespace) for idempotency fingerprints.
#[derive(Debug)]
pub struct Valid<T> {
    pub value: T,
    pub digest: [u8; 32],
}

impl<S, T> FromRequest<S> for Valid<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Validate,
{
    type Rejection = Problem;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        let Json(body) = Json::<Value>::from_request(request, state).await?;
        // serde_json's map is ordered by key, so this serialisation is canonical.
        let canonical = serde_json::to_vec(&body).map_err(Problem::internal)?;
        let digest = digest::digest(&digest::SHA256, &canonical);
        let value = parse(body)?;
        let mut bytes = [0; 32];
        bytes.copy_from_slice(digest.as_ref());
        Ok(Valid {
            value,
            digest: bytes,
        })
    }
}

/// Parses and validates `body` as `T`, or returns a 422 listing every failing field.
pub fn parse<T: DeserializeOwned + Validate>(body: Value) -> Result<T, Problem> {
    // serde's derived structs also accept a JSON array of their fields in order; a request body
    // is an object, with named fields, or nothing at all.
    if !body.is_object() {
        return Err(Problem::validation(vec![FieldError {
            pointer: String::new(),
            code: Cow::Borrowed("invalid_type"),
            message: Cow::Borrowed("the body must be a JSON object"),
        }]));
    }
    let mut body = body;
    let mut errors: Vec<FieldError> = Vec::new();
    // Where a stand-in value replaced what the client sent (or did not send), and which one.
    let mut stand_ins: Vec<(String, usize)> = Vec::new();
    let mut value = None;
    // serde stops at the first missing field or value of the wrong type. To report them all,
    // each is recorded and replaced by a stand-in of some JSON type, and the body is read again:
    // a bounded number of times, since every attempt reads the whole body.
    for _ in 0..MAX_ATTEMPTS {
        let mut unknown = Vec::new();
        let mut on_unknown = |path: serde_ignored::Path| unknown.push(ignored_pointer(&path));
        let parsed: Result<T, _> = serde_path_to_error::deserialize(
            serde_ignored::Deserializer::new(body.clone(), &mut on_unknown),
        );
        for (pointer, name) in unknown {
            if !errors.iter().any(|error| error.pointer == pointer) {
                errors.push(unknown_field(pointer, &name));
            }
        }
        let error = match parsed {
            Ok(parsed) => {
                value = Some(parsed);
                break;
            }
            Err(error) => error,
        };
        let at = typed_pointer(error.path());
        let message = error.into_inner().to_string();
        let missing = missing_field(&message).map(str::to_owned);
        // serde locates a missing field at its parent object: point at the field itself.
        let pointer = match &missing {
            Some(field) => format!("{at}/{}", escape(field)),
            None => at.clone(),
        };
        let tried = match stand_ins.iter_mut().find(|(at, _)| *at == pointer) {
            Some((_, tried)) => {
                *tried += 1;
                *tried
            }
            None => {
                errors.push(match missing {
                    Some(_) => FieldError {
                        pointer: pointer.clone(),
                        code: Cow::Borrowed("required"),
                        message: Cow::Borrowed("is required"),
                    },
                    None => FieldError {
                        pointer: pointer.clone(),
                        code: Cow::Borrowed("invalid_type"),
                        message: Cow::Owned(crate::extract::bounded(message)),
                    },
                });
                stand_ins.push((pointer.clone(), 0));
                0
            }
        };
        let Some(stand_in) = STAND_INS.get(tried) else {
            break;
        };
        let slot = match &missing {
            Some(field) => body
                .pointer_mut(&at)
                .and_then(Value::as_object_mut)
                .map(|parent| parent.entry(field.as_str()).or_insert(Value::Null)),
            None => body.pointer_mut(&at),
        };
        let Some(slot) = slot else {
            break;
        };
        *slot = stand_in();
    }
    // Without a value, every reading that failed recorded an error (or tried another stand-in
    // for one): `errors` is not empty.
    if let Some(value) = value {
        if let Err(invalid) = value.validate() {
            let mut rules = Vec::new();
            collect(&invalid, "", &mut rules);
            // A stand-in's own rule failures say nothing about what the client sent.
            rules.retain(|rule| {
                !stand_ins.iter().any(|(at, _)| {
                    rule.pointer
                        .strip_prefix(at.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
                })
            });
            errors.extend(rules);
        }
        if errors.is_empty() {
            return Ok(value);
        }
    }
    errors.sort_by(|a, b| a.pointer.cmp(&b.pointer));
    Err(Problem::validation(errors))
}

/// How many times a body with shape errors is read again; each reading finds one more.
const MAX_ATTEMPTS: usize = 24;

/// Values of each JSON type, tried in turn where the client's value did not fit.
const STAND_INS: &[fn() -> Value] = &[
    || Value::String(String::new()),
    || Value::from(0),
    || Value::Bool(false),
    || Value::Array(Vec::new()),
    || Value::Object(serde_json::Map::new()),
];

fn unknown_field(pointer: String, name: &str) -> FieldError {
    let read_only = READ_ONLY_FIELDS.contains(&name);
    FieldError {
        pointer,
        code: Cow::Borrowed(if read_only {
            "read_only"
        } else {
            "unknown_field"
        }),
        message: Cow::Borrowed(if read_only {
            "is set by the service and cannot be written"
        } else {
            "is not a field of this request"
        }),
    }
}

/// Flattens validator's nested errors into one entry per failing field.
fn collect(errors: &ValidationErrors, prefix: &str, out: &mut Vec<FieldError>) {
    for (field, kind) in errors.errors() {
        let pointer = format!("{prefix}/{}", escape(field));
        match kind {
            ValidationErrorsKind::Field(failures) => {
                for failure in failures {
                    out.push(FieldError {
                        pointer: pointer.clone(),
                        code: failure.code.clone(),
                        message: failure
                            .message
                            .clone()
                            .unwrap_or_else(|| failure.code.clone()),
                    });
                }
            }
            ValidationErrorsKind::Struct(inner) => collect(inner, &pointer, out),
            ValidationErrorsKind::List(items) => {
                for (index, inner) in items {
                    collect(inner, &format!("{pointer}/{index}"), out);
                }
            }
        }
    }
}

/// The JSON Pointer of an ignored field, and the field's own name.
fn ignored_pointer(path: &serde_ignored::Path) -> (String, String) {
    fn walk(path: &serde_ignored::Path, out: &mut String) {
        use serde_ignored::Path;
        match path {
            Path::Root => {}
            Path::Seq { parent, index } => {
                walk(parent, out);
                out.push_str(&format!("/{index}"));
            }
            Path::Map { parent, key } => {
                walk(parent, out);
                out.push('/');
                out.push_str(&escape(key));
            }
            Path::Some { parent }
            | Path::NewtypeStruct { parent }
            | Path::NewtypeVariant { parent } => walk(parent, out),
        }
    }
    let mut pointer = String::new();
    walk(path, &mut pointer);
    let name = match path {
        serde_ignored::Path::Map { key, .. } => key.clone(),
        _ => String::new(),
    };
    (pointer, name)
}

fn typed_pointer(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|segment| match segment {
            Segment::Seq { index } => Some(format!("/{index}")),
            Segment::Map { key } => Some(format!("/{}", escape(key))),
            Segment::Enum { .. } | Segment::Unknown => None,
        })
        .collect()
}

/// The field named by serde's `missing_field` error, whose message is "missing field `name`".
fn missing_field(message: &str) -> Option<&str> {
    let (field, _) = message.strip_prefix("missing field `")?.split_once('`')?;
    Some(field)
}

/// RFC 6901 escaping of one reference token.
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

/// For `#[serde(deserialize_with = "whole_number")]` on an `i64` field. JSON Schema, and so the
/// OpenAPI document, calls a number an integer when its fraction is zero however it is written:
/// `2.0` and `2e3` are integers to every client and generator that follows the document, and
/// serde's own `i64` would refuse them. A fraction, or a float too large to be exact, still fails.
pub fn whole_number<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    use serde::de::{Error, Unexpected, Visitor};

    struct Whole;
    impl Visitor<'_> for Whole {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an integer")
        }
        fn visit_i64<E: Error>(self, value: i64) -> Result<i64, E> {
            Ok(value)
        }
        fn visit_u64<E: Error>(self, value: u64) -> Result<i64, E> {
            i64::try_from(value).map_err(|_| E::invalid_value(Unexpected::Unsigned(value), &self))
        }
        fn visit_f64<E: Error>(self, value: f64) -> Result<i64, E> {
            // 2^53: beyond it a float no longer tells neighbouring integers apart.
            const EXACT: f64 = 9_007_199_254_740_992.0;
            if value.fract() == 0.0 && value.abs() <= EXACT {
                Ok(value as i64)
            } else {
                Err(E::invalid_type(Unexpected::Float(value), &self))
            }
        }
    }
    deserializer.deserialize_i64(Whole)
}

/// A `validator` error with a code and a message for the client.
pub fn invalid(
    code: &'static str,
    message: impl Into<Cow<'static, str>>,
) -> validator::ValidationError {
    validator::ValidationError::new(code).with_message(message.into())
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use serde_json::json;
    use validator::Validate;

    use super::*;

    #[test]
    fn an_integer_may_be_written_with_a_zero_fraction_but_not_with_a_fraction() {
        #[derive(Debug, Deserialize)]
        struct Count {
            #[serde(deserialize_with = "whole_number")]
            n: i64,
        }
        let read = |body: Value| serde_json::from_value::<Count>(body).map(|count| count.n);
        assert_eq!(read(json!({"n": 1285})).unwrap(), 1285);
        assert_eq!(read(json!({"n": 1285.0})).unwrap(), 1285);
        assert_eq!(read(json!({"n": -3e3})).unwrap(), -3000);
        assert_eq!(
            serde_json::from_str::<Count>(r#"{"n": 2e3}"#).unwrap().n,
            2000
        );
        for bad in [
            json!({"n": 1.5}),
            json!({"n": 1e300}),
            json!({"n": "1"}),
            json!({"n": u64::MAX}),
        ] {
            assert!(read(bad.clone()).is_err(), "{bad}");
        }
    }

    fn check_positive(value: i64) -> Result<(), validator::ValidationError> {
        if value > 0 {
            Ok(())
        } else {
            Err(invalid("range", "must be positive"))
        }
    }

    #[derive(Debug, Deserialize, Validate)]
    struct Line {
        #[validate(custom(function = "check_positive"))]
        quantity: i64,
    }

    #[derive(Debug, Deserialize, Validate)]
    struct Body {
        #[validate(length(min = 1, max = 3, code = "length"))]
        name: String,
        #[validate(nested)]
        lines: Vec<Line>,
    }

    fn pointers(problem: Problem) -> Vec<String> {
        let json = serde_json::to_value(problem.field_errors()).unwrap();
        json.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e["pointer"].as_str().unwrap(),
                    e["code"].as_str().unwrap()
                )
            })
            .collect()
    }

    #[test]
    fn every_failing_field_is_reported_at_once_with_its_pointer() {
        let body = json!({"name": "toolong", "lines": [{"quantity": 1}, {"quantity": 0, "extra": 1}], "status": "approved"});
        let problem = parse::<Body>(body).unwrap_err();
        assert_eq!(
            pointers(problem),
            [
                "/lines/1/extra unknown_field",
                "/lines/1/quantity range",
                "/name length",
                "/status read_only"
            ]
        );
    }

    #[test]
    fn a_type_error_is_located_and_reported_with_the_unknown_fields() {
        let body = json!({"name": "ok", "lines": [{"quantity": "many"}], "id": 3});
        let problem = parse::<Body>(body).unwrap_err();
        assert_eq!(
            pointers(problem),
            ["/id read_only", "/lines/0/quantity invalid_type"]
        );
    }

    #[test]
    fn a_missing_field_is_located_at_the_field_itself() {
        let body = json!({"name": "ok", "lines": [{"quantity": 1}, {}]});
        let problem = parse::<Body>(body).unwrap_err();
        assert_eq!(pointers(problem), ["/lines/1/quantity required"]);
        let problem = parse::<Body>(json!({"lines": []})).unwrap_err();
        assert_eq!(pointers(problem), ["/name required"]);
    }

    #[test]
    fn every_missing_field_and_wrong_type_is_reported_with_the_rules_of_the_rest() {
        let body = json!({"lines": [{"quantity": "two"}, {}, {"quantity": 0}], "id": 1});
        let problem = parse::<Body>(body).unwrap_err();
        assert_eq!(
            pointers(problem),
            [
                "/id read_only",
                "/lines/0/quantity invalid_type",
                "/lines/1/quantity required",
                "/lines/2/quantity range",
                "/name required",
            ]
        );
        let problem = parse::<Body>(json!({})).unwrap_err();
        assert_eq!(pointers(problem), ["/lines required", "/name required"]);
    }

    #[test]
    fn a_body_must_be_an_object_not_the_fields_in_order() {
        let problem = parse::<Body>(json!(["ok", [{"quantity": 2}]])).unwrap_err();
        assert_eq!(pointers(problem), [" invalid_type"]);
    }

    #[test]
    fn a_valid_body_parses() {
        let body = parse::<Body>(json!({"name": "ok", "lines": [{"quantity": 2}]})).unwrap();
        assert_eq!(body.lines[0].quantity, 2);
    }
}
