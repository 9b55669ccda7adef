//! The OpenAPI 3.1 document, generated from the code, and the interactive docs served from the
//! binary.
//!
//! Prevents: a hand-written spec that drifts from the routes, and docs that need the internet.
//! Routes register themselves through utoipa-axum's `OpenApiRouter`, so a route cannot exist
//! without its operation; the responses every route shares (problem documents for malformed
//! bodies, unknown ids, panics …) are added here once instead of on every handler. The committed
//! `openapi.json` is compared with this document by a test.

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use utoipa::OpenApi;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, Deprecated, Ref, ResponseBuilder};
use utoipa_swagger_ui::{Config, SwaggerUi};

use crate::problem::{ErrorCode, FieldError, PROBLEM_JSON, ProblemDocument};

#[derive(OpenApi)]
#[openapi(
    info(description = "Every error is an RFC 9457 problem document (`application/problem+json`) \
        with a stable `code` and the `request_id`; the codes are listed at `/docs/errors`. \
        Unknown routes answer 404 and known routes called with another method answer 405 with \
        `Allow`, both as problem documents. Every `/v1` response carries `RateLimit-Policy` and \
        `RateLimit` headers (draft-ietf-httpapi-ratelimit-headers); past a limit the answer is 429 \
        `rate_limited` with `Retry-After` in seconds."),
    tags(
        (name = "operations", description = "Health probes for orchestrators and load balancers."),
        (name = "auth", description = "Exchange credentials for a short-lived bearer token."),
        (name = "orders", description = "Orders and their lifecycle: draft → submitted → approved, or cancelled."),
        (name = "imports", description = "CSV files of order lines, imported into draft orders in the background."),
    ),
    servers((url = "/", description = "This service; the paths are relative to where it is served.")),
    components(schemas(ProblemDocument, FieldError, ErrorCode)),
)]
struct ApiDoc;

/// The document's skeleton, before routes add their operations.
pub fn base() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    // utoipa fills these from Cargo.toml (`authors`, `license`); a published contract should say
    // who to contact on purpose, so a team sets them here when it publishes the API.
    doc.info.contact = None;
    doc.info.license = None;
    doc
}

/// Completes the document once every route has added its operation: the bearer scheme and a
/// 401 on every operation outside `auth::PUBLIC_ROUTES`, deprecation marks, and the problem
/// responses every operation can produce without saying so itself.
pub fn finish(doc: &mut utoipa::openapi::OpenApi) {
    let components = doc.components.get_or_insert_with(Default::default);
    components.security_schemes.insert(
        BEARER.to_owned(),
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("JWT")
                .build(),
        )
        .into(),
    );
    // Request bodies reject unknown fields (`validation::Valid`); say so, so that clients and
    // contract tests do not send them.
    for (name, schema) in components.schemas.iter_mut() {
        if let utoipa::openapi::RefOr::T(utoipa::openapi::Schema::Object(object)) = schema
            && (name.ends_with("Request") || name.ends_with("Input"))
        {
            object.additional_properties = Some(Box::new(AdditionalProperties::FreeForm(false)));
        }
    }
    for (path, item) in doc.paths.paths.iter_mut() {
        let operations = [
            ("GET", &mut item.get),
            ("PUT", &mut item.put),
            ("POST", &mut item.post),
            ("DELETE", &mut item.delete),
            ("PATCH", &mut item.patch),
        ];
        for (method, operation) in operations {
            let Some(operation) = operation else { continue };
            if crate::auth::PUBLIC_ROUTES.contains(&path.as_str()) {
                operation.security = Some(Vec::new());
            } else {
                operation.security =
                    Some(vec![SecurityRequirement::new(BEARER, Vec::<String>::new())]);
                add_problem(operation, ErrorCode::Unauthenticated);
            }
            if let Some(entry) = crate::deprecation::find(method, path) {
                operation.deprecated = Some(Deprecated::True);
                let note = format!(
                    "**Deprecated**: use `{}`. Responses carry `Deprecation`, `Sunset` and `Link; rel=\"deprecation\"`.",
                    entry.replacement
                );
                operation.description = Some(match operation.description.take() {
                    Some(description) => format!("{note}\n\n{description}"),
                    None => note,
                });
            }
            if let Some(key) = operation
                .parameters
                .iter_mut()
                .flatten()
                .find_map(|parameter| match parameter {
                    utoipa::openapi::RefOr::T(p)
                        if p.name.eq_ignore_ascii_case("Idempotency-Key") =>
                    {
                        Some(p)
                    }
                    _ => None,
                })
            {
                key.schema = Some(
                    ObjectBuilder::new()
                        .schema_type(Type::String)
                        .min_length(Some(1))
                        .max_length(Some(255))
                        .pattern(Some("^[\\x20-\\x7E]+$"))
                        .into(),
                );
                add_problem(operation, ErrorCode::IdempotencyKeyInvalid);
                add_problem(operation, ErrorCode::IdempotencyKeyInUse);
                add_problem(operation, ErrorCode::IdempotencyKeyReused);
            }
            let takes_body = operation.request_body.is_some();
            let takes = |place: ParameterIn| {
                operation.parameters.iter().flatten().any(
                    |parameter| matches!(parameter, utoipa::openapi::RefOr::T(p) if p.parameter_in == place),
                )
            };
            let takes_path_parameters = takes(ParameterIn::Path);
            // `extract::Query` refuses a value it cannot parse, or a query string over its cap.
            let takes_query_parameters = takes(ParameterIn::Query);
            if takes_body {
                add_problem(operation, ErrorCode::MalformedBody);
                add_problem(operation, ErrorCode::PayloadTooLarge);
                add_problem(operation, ErrorCode::UnsupportedMediaType);
                add_problem(operation, ErrorCode::ValidationFailed);
            }
            if takes_path_parameters || takes_query_parameters {
                add_problem(operation, ErrorCode::InvalidParameter);
            }
            if takes_path_parameters {
                add_problem(operation, ErrorCode::NotFound);
            }
            if path.starts_with("/v1/") {
                add_problem(operation, ErrorCode::RateLimited);
            }
            add_problem(operation, ErrorCode::InternalError);
            add_problem(operation, ErrorCode::ServiceUnavailable);
        }
    }
}

const BEARER: &str = "bearer";

/// Adds a response for `code`'s status unless the operation documents that status already; when
/// two codes share a status, the first added describes it and the second is appended.
fn add_problem(operation: &mut Operation, code: ErrorCode) {
    let status = code.status().as_u16().to_string();
    let line = format!("`{}`: {}", code.as_str(), code.meaning());
    let responses = &mut operation.responses.responses;
    match responses.get_mut(&status) {
        Some(utoipa::openapi::RefOr::T(existing)) => {
            if !existing.description.contains(code.as_str()) {
                existing.description = format!("{}\n\n{line}", existing.description);
            }
        }
        Some(utoipa::openapi::RefOr::Ref(_)) => {}
        None => {
            let response = ResponseBuilder::new()
                .description(line)
                .content(
                    PROBLEM_JSON,
                    Content::new(Some(Ref::from_schema_name("ProblemDocument"))),
                )
                .build();
            responses.insert(status, response.into());
        }
    }
}

/// `/openapi.json`, `/docs` (Swagger UI, assets inside the binary) and `/docs/errors`.
pub fn docs_routes(doc: utoipa::openapi::OpenApi) -> Router {
    // Without `validator_url("none")` the page sends the whole spec to swagger.io.
    let config = Config::new(["/openapi.json"]).validator_url("none");
    let swagger: Router = SwaggerUi::new("/docs")
        .url("/openapi.json", doc)
        .config(config)
        .into();
    let swagger = swagger.layer(axum::middleware::map_response(allow_docs_page_assets));
    Router::new()
        .route("/docs/errors", get(error_catalogue))
        .route("/docs/deprecations", get(crate::deprecation::policy_page))
        .merge(swagger)
}

/// Swagger UI loads its own scripts, styles and inline images, which the API-wide content policy
/// forbids.
async fn allow_docs_page_assets(
    mut response: axum::response::Response,
) -> axum::response::Response {
    response.headers_mut().insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'",
        ),
    );
    response
}

/// The error catalogue that every problem's `type` links to, built from [`ErrorCode`] so it can
/// never list a code the service does not have.
async fn error_catalogue() -> impl IntoResponse {
    let mut rows = String::new();
    for code in ErrorCode::ALL {
        rows.push_str(&format!(
            "<tr id=\"{id}\"><td>{status}</td><td><code>{id}</code></td><td>{title}</td><td>{meaning}</td></tr>\n",
            id = code.as_str(),
            status = code.status().as_u16(),
            title = code.title(),
            meaning = code.meaning().replace('`', ""),
        ));
    }
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Error codes</title></head><body>\
         <h1>Error codes</h1><p>Every error response is an RFC 9457 problem document whose <code>code</code> is one of these.</p>\
         <table><thead><tr><th>Status</th><th>Code</th><th>Title</th><th>Meaning</th></tr></thead><tbody>\n{rows}</tbody></table></body></html>"
    ))
}
