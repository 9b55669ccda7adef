//! The orders API: create, read, list, edit drafts, and move orders through their state machine.
//!
//! Handlers read like the contract: extract (authenticated principal, validated body, headers) →
//! call the domain inside [`Idempotency::run`] → map to a response. Rules live in `domain`, SQL in
//! `store`.

pub mod domain;
pub mod store;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use sqlx::PgConnection;
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use uuid::Uuid;
use validator::{Validate, ValidationError};

use crate::app::AppState;
use crate::auth::Principal;
use crate::conditional::{self, IfMatch, IfNoneMatch};
use crate::extract::{Path, Query};
use crate::idempotency::{Idempotency, Outcome};
use crate::pagination::{Keyset, Page, PageParams, split_page};
use crate::problem::{ErrorCode, Problem};
use crate::validation::Valid;
use domain::{
    Action, Currency, ExternalRef, LineItem, NewOrder, Note, OrderStatus, Quantity, Sku, UnitPrice,
};
use store::{ListFilter, Order};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create_order, list_orders))
        .routes(routes!(get_order, update_order))
        .routes(routes!(submit_order))
        .routes(routes!(approve_order))
        .routes(routes!(cancel_order))
}

// ---- Request and response types -------------------------------------------------------------

#[derive(Debug, Serialize, Deserialize, Validate, ToSchema)]
#[schema(example = json!({"currency": "EUR", "items": [{"sku": "BOOK-1", "quantity": 2, "unit_price_cents": 1250}], "note": "gift wrap", "external_ref": "PO-1001"}))]
pub struct CreateOrderRequest {
    /// ISO 4217 code, three upper-case letters.
    #[validate(custom(function = "check_currency"))]
    #[schema(pattern = "^[A-Z]{3}$")]
    currency: String,
    /// 1 to 100 items.
    #[validate(
        length(
            min = 1,
            max = 100,
            code = "length",
            message = "must have 1 to 100 items"
        ),
        nested
    )]
    #[schema(min_items = 1, max_items = 100)]
    items: Vec<LineItemInput>,
    /// At most 1000 characters.
    #[validate(custom(function = "check_note"))]
    #[schema(max_length = 1000)]
    note: Option<String>,
    /// Your own reference, 1 to 64 characters.
    #[validate(custom(function = "check_external_ref"))]
    #[schema(min_length = 1, max_length = 64)]
    external_ref: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, Validate, ToSchema)]
pub struct LineItemInput {
    #[validate(custom(function = "check_sku"))]
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    sku: String,
    #[validate(custom(function = "check_quantity"))]
    #[schema(minimum = 1, maximum = 10000)]
    #[serde(deserialize_with = "crate::validation::whole_number")]
    quantity: i64,
    #[validate(custom(function = "check_unit_price"))]
    #[schema(minimum = 0, maximum = 100000000)]
    #[serde(deserialize_with = "crate::validation::whole_number")]
    unit_price_cents: i64,
}

impl CreateOrderRequest {
    /// The domain value; the checks already passed in validation, so a failure here would be a
    /// disagreement between the two and is reported the same way.
    fn into_domain(self) -> Result<NewOrder, Problem> {
        let invalid = |error: ValidationError| {
            Problem::new(
                ErrorCode::ValidationFailed,
                error.message.map(|m| m.into_owned()).unwrap_or_default(),
            )
        };
        let items = self
            .items
            .into_iter()
            .map(|item| {
                Ok(LineItem {
                    sku: Sku::parse(item.sku).map_err(invalid)?,
                    quantity: Quantity::parse(item.quantity).map_err(invalid)?,
                    unit_price: UnitPrice::parse(item.unit_price_cents).map_err(invalid)?,
                })
            })
            .collect::<Result<Vec<_>, Problem>>()?;
        Ok(NewOrder {
            currency: Currency::parse(self.currency).map_err(invalid)?,
            items,
            note: self.note.map(Note::parse).transpose().map_err(invalid)?,
            external_ref: self
                .external_ref
                .map(ExternalRef::parse)
                .transpose()
                .map_err(invalid)?,
        })
    }
}

/// `PATCH` body: absent fields stay as they are, `null` clears a field.
#[derive(Debug, Deserialize, Validate, ToSchema)]
#[schema(example = json!({"note": "leave at the door"}))]
pub struct UpdateOrderRequest {
    #[serde(default, deserialize_with = "present")]
    #[validate(custom(function = "check_note"))]
    #[schema(value_type = Option<String>, max_length = 1000)]
    note: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[validate(custom(function = "check_external_ref"))]
    #[schema(value_type = Option<String>, min_length = 1, max_length = 64)]
    external_ref: Option<Option<String>>,
}

/// Distinguishes a field sent as `null` (`Some(None)`) from one not sent at all (`None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

// `validator` adapters: each runs the domain newtype's own parser, so the rule lives there.
// `&impl AsRef<str>` accepts both `Option<String>` (validated as `&String`) and the PATCH body's
// `Option<Option<String>>` (validated as `&&String`).
fn check_currency(value: &impl AsRef<str>) -> Result<(), ValidationError> {
    Currency::parse(value.as_ref().to_owned()).map(drop)
}

fn check_sku(value: &impl AsRef<str>) -> Result<(), ValidationError> {
    Sku::parse(value.as_ref().to_owned()).map(drop)
}

fn check_quantity(value: i64) -> Result<(), ValidationError> {
    Quantity::parse(value).map(drop)
}

fn check_unit_price(value: i64) -> Result<(), ValidationError> {
    UnitPrice::parse(value).map(drop)
}

fn check_note(value: &impl AsRef<str>) -> Result<(), ValidationError> {
    Note::parse(value.as_ref().to_owned()).map(drop)
}

fn check_external_ref(value: &impl AsRef<str>) -> Result<(), ValidationError> {
    ExternalRef::parse(value.as_ref().to_owned()).map(drop)
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OrderView {
    pub id: Uuid,
    pub status: OrderStatus,
    #[schema(example = "EUR")]
    pub currency: String,
    pub items: Vec<LineItemView>,
    /// Sum of quantity × unit price, computed by the service.
    #[schema(example = 2500)]
    pub total_cents: i64,
    pub note: Option<String>,
    pub external_ref: Option<String>,
    /// Increments on every change; the `ETag` is derived from it.
    #[schema(example = 1)]
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct LineItemView {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

impl From<Order> for OrderView {
    fn from(order: Order) -> Self {
        OrderView {
            id: order.id,
            status: order.status,
            currency: order.currency,
            items: order
                .items
                .into_iter()
                .map(|item| LineItemView {
                    sku: item.sku,
                    quantity: item.quantity,
                    unit_price_cents: item.unit_price_cents,
                })
                .collect(),
            total_cents: order.total_cents,
            note: order.note,
            external_ref: order.external_ref,
            version: order.version,
            created_at: order.created_at,
            updated_at: order.updated_at,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StatusFilter {
    /// Only orders in this state.
    status: Option<OrderStatus>,
}

/// The documented shape of a page of orders.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct OrderPage {
    data: Vec<OrderView>,
    /// Pass as `cursor` to get the next page. Always present: `null` on the last page.
    #[schema(required = true)]
    next_cursor: Option<String>,
}

// ---- Shared steps -----------------------------------------------------------------------------

/// The order, if it exists and `principal` may see it. Another customer's order is reported
/// exactly like a missing one.
fn visible_to(order: Option<Order>, principal: &Principal) -> Result<Order, Problem> {
    order
        .filter(|order| principal.is_admin() || order.owner_id == principal.user_id)
        .ok_or_else(|| Problem::new(ErrorCode::NotFound, "No order with this id."))
}

/// The representation of a single order, with its `ETag`.
fn order_outcome(status: StatusCode, order: Order) -> Result<Outcome, Problem> {
    let etag = conditional::etag(order.version);
    let location = format!("/v1/orders/{}", order.id);
    let outcome = Outcome::json(status, &OrderView::from(order))?.header(header::ETAG, &etag)?;
    if status == StatusCode::CREATED {
        outcome.header(header::LOCATION, &location)
    } else {
        Ok(outcome)
    }
}

/// Locks the order, checks visibility, `If-Match` and the transition, then applies it.
async fn transition(
    conn: &mut PgConnection,
    principal: &Principal,
    id: Uuid,
    if_match: &IfMatch,
    action: Action,
) -> Result<Outcome, Problem> {
    let order = visible_to(store::find_for_update(conn, id).await?, principal)?;
    if_match.check(&conditional::etag(order.version))?;
    let next = order.status.apply(action).map_err(|illegal| {
        let detail = format!(
            "Cannot {} an order that is {}.",
            illegal.action, illegal.from
        );
        Problem::new(ErrorCode::InvalidStateTransition, detail)
    })?;
    let order = store::set_status(conn, order, next).await?;
    order_outcome(StatusCode::OK, order)
}

/// Orders are keyed by (owner, external_ref) (imports rely on it): the unique index answers a
/// reference that another of the owner's orders already has.
fn external_ref_conflict(error: sqlx::Error) -> Problem {
    match &error {
        sqlx::Error::Database(database)
            if database.constraint() == Some(store::EXTERNAL_REF_INDEX) =>
        {
            Problem::new(
                ErrorCode::ExternalRefTaken,
                "Another of your orders already has this external_ref.",
            )
        }
        _ => error.into(),
    }
}

const IDEMPOTENCY_DOC: &str = "Repeating a request with the same `Idempotency-Key` within the retention period \
    (24 h by default) returns the first response again with `Idempotent-Replayed: true`; the same key with a different request is 422 \
    `idempotency_key_reused`; while the first is running, 409 `idempotency_key_in_use`.";

// ---- Handlers ---------------------------------------------------------------------------------

/// Create a draft order.
///
/// `Idempotency-Key` is required. Repeating the request with the same key within 24 h returns
/// the first response again (`Idempotent-Replayed: true`); the same key with another body is 422
/// `idempotency_key_reused`; while the first is still running, 409 `idempotency_key_in_use`.
#[utoipa::path(
    post,
    path = "/v1/orders",
    tag = "orders",
    request_body = CreateOrderRequest,
    params(("Idempotency-Key" = String, Header, description = "1-255 printable ASCII characters; required.")),
    responses(
        (status = CREATED, description = "Created.", body = OrderView,
            headers(("Location" = String, description = "The new order's URL."), ("ETag" = String, description = "The order's version."))),
        (status = BAD_REQUEST, description = "`idempotency_key_required` or `idempotency_key_invalid`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = CONFLICT, description = "`external_ref_taken`, or `idempotency_key_in_use` with `Retry-After`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = UNPROCESSABLE_ENTITY, description = "`validation_failed` (every failing field) or `idempotency_key_reused`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
    ),
)]
pub async fn create_order(
    State(state): State<AppState>,
    principal: Principal,
    idempotency: Idempotency,
    body: Valid<CreateOrderRequest>,
) -> Result<Response, Problem> {
    idempotency.require_key()?;
    let new_order = body.value.into_domain()?;
    idempotency
        .run(&state.db, principal.user_id, &body.digest, async |conn| {
            let order = store::insert(conn, principal.user_id, &new_order)
                .await
                .map_err(external_ref_conflict)?;
            order_outcome(StatusCode::CREATED, order)
        })
        .await
}

/// List orders, newest first: customers see their own, admins everyone's.
#[utoipa::path(
    get,
    path = "/v1/orders",
    tag = "orders",
    params(PageParams, StatusFilter),
    responses(
        (status = OK, description = "One page. When there is a next page, `Link: <url>; rel=\"next\"` points to it.", body = OrderPage),
        (status = BAD_REQUEST, description = "`invalid_cursor` or `invalid_parameter` (`limit` below 1 or not an integer, unknown `status`).", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
    ),
)]
pub async fn list_orders(
    State(state): State<AppState>,
    principal: Principal,
    Query(page): Query<PageParams>,
    Query(filter): Query<StatusFilter>,
) -> Result<Response, Problem> {
    let filter = ListFilter {
        owner: (!principal.is_admin()).then_some(principal.user_id),
        status: filter.status,
    };
    let binding = format!(
        "orders|{}|{}",
        principal.user_id,
        filter.status.map_or("", OrderStatus::as_str)
    );
    let request = state.cursors.request(&page, &binding)?;

    let mut conn = state.db.acquire().await?;
    let rows = store::list(&mut conn, filter, request.after, request.limit + 1).await?;
    let (orders, last) = split_page(rows, request.limit, |order| Keyset {
        created_at: order.created_at,
        id: order.id,
    });
    let mut list_url = format!("/v1/orders?limit={}", request.limit);
    if let Some(status) = filter.status {
        list_url.push_str(&format!("&status={status}"));
    }
    Page {
        data: orders.into_iter().map(OrderView::from).collect::<Vec<_>>(),
        next_cursor: last.map(|position| state.cursors.encode(position, &binding)),
    }
    .into_response_with_link(&list_url)
}

/// Get one order. Send `If-None-Match` with its `ETag` to get 304 when it is unchanged.
#[utoipa::path(
    get,
    path = "/v1/orders/{id}",
    tag = "orders",
    params(("id" = Uuid, Path, description = "Order id.")),
    responses(
        (status = OK, description = "The order.", body = OrderView, headers(("ETag" = String, description = "The order's version."))),
        (status = NOT_MODIFIED, description = "Unchanged since the `ETag` in `If-None-Match`."),
    ),
)]
pub async fn get_order(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    if_none_match: IfNoneMatch,
) -> Result<Response, Problem> {
    let mut conn = state.db.acquire().await?;
    let order = visible_to(store::find(&mut conn, id).await?, &principal)?;
    let etag = conditional::etag(order.version);
    if let Some(not_modified) = if_none_match.not_modified(&etag) {
        return Ok(not_modified);
    }
    let mut response = order_outcome(StatusCode::OK, order)?.into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, conditional::REVALIDATE);
    Ok(response)
}

/// Change a draft's `note` or `external_ref`. `If-Match` is required.
#[utoipa::path(
    patch,
    path = "/v1/orders/{id}",
    tag = "orders",
    request_body = UpdateOrderRequest,
    params(
        ("id" = Uuid, Path, description = "Order id."),
        ("If-Match" = String, Header, description = "The `ETag` last read; required."),
        ("Idempotency-Key" = Option<String>, Header, description = IDEMPOTENCY_DOC),
    ),
    responses(
        (status = OK, description = "Updated.", body = OrderView, headers(("ETag" = String, description = "The new version."))),
        (status = CONFLICT, description = "`invalid_state_transition`: only drafts can be edited; `external_ref_taken`; or `idempotency_key_in_use`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = PRECONDITION_FAILED, description = "`precondition_failed`: the order changed since you read it.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = PRECONDITION_REQUIRED, description = "`precondition_required`: `If-Match` is missing.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
    ),
)]
pub async fn update_order(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    if_match: IfMatch,
    idempotency: Idempotency,
    body: Valid<UpdateOrderRequest>,
) -> Result<Response, Problem> {
    let change = body.value;
    idempotency
        .run(&state.db, principal.user_id, &body.digest, async |conn| {
            // After the key is claimed, so a replay wins; a 428 is not stored.
            if_match.require()?;
            let order = visible_to(store::find_for_update(conn, id).await?, &principal)?;
            if_match.check(&conditional::etag(order.version))?;
            if order.status != OrderStatus::Draft {
                return Err(Problem::new(
                    ErrorCode::InvalidStateTransition,
                    format!(
                        "Only draft orders can be edited; the order is {}.",
                        order.status
                    ),
                ));
            }
            if change.note.is_none() && change.external_ref.is_none() {
                // Nothing to change: no new version, so other clients' ETags stay valid.
                return order_outcome(StatusCode::OK, order);
            }
            let note = change.note.unwrap_or_else(|| order.note.clone());
            let external_ref = change
                .external_ref
                .unwrap_or_else(|| order.external_ref.clone());
            let order = store::update_details(conn, order, note, external_ref)
                .await
                .map_err(external_ref_conflict)?;
            order_outcome(StatusCode::OK, order)
        })
        .await
}

/// Submit a draft (owner or admin).
#[utoipa::path(
    post,
    path = "/v1/orders/{id}/submit",
    tag = "orders",
    params(
        ("id" = Uuid, Path, description = "Order id."),
        ("If-Match" = Option<String>, Header, description = "Honoured when sent."),
        ("Idempotency-Key" = Option<String>, Header, description = IDEMPOTENCY_DOC),
    ),
    responses(
        (status = OK, description = "Submitted.", body = OrderView, headers(("ETag" = String, description = "The new version."))),
        (status = CONFLICT, description = "`invalid_state_transition` naming the current state, or `idempotency_key_in_use`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = PRECONDITION_FAILED, description = "`precondition_failed`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
    ),
)]
pub async fn submit_order(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    if_match: IfMatch,
    idempotency: Idempotency,
) -> Result<Response, Problem> {
    idempotency
        .run(&state.db, principal.user_id, &[], async |conn| {
            transition(conn, &principal, id, &if_match, Action::Submit).await
        })
        .await
}

/// Approve a submitted order (admins only).
#[utoipa::path(
    post,
    path = "/v1/orders/{id}/approve",
    tag = "orders",
    params(
        ("id" = Uuid, Path, description = "Order id."),
        ("If-Match" = Option<String>, Header, description = "Honoured when sent."),
        ("Idempotency-Key" = Option<String>, Header, description = IDEMPOTENCY_DOC),
    ),
    responses(
        (status = OK, description = "Approved.", body = OrderView, headers(("ETag" = String, description = "The new version."))),
        (status = FORBIDDEN, description = "`forbidden`: only admins approve.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = CONFLICT, description = "`invalid_state_transition` naming the current state, or `idempotency_key_in_use`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = PRECONDITION_FAILED, description = "`precondition_failed`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
    ),
)]
pub async fn approve_order(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    if_match: IfMatch,
    idempotency: Idempotency,
) -> Result<Response, Problem> {
    principal.require_admin()?;
    idempotency
        .run(&state.db, principal.user_id, &[], async |conn| {
            transition(conn, &principal, id, &if_match, Action::Approve).await
        })
        .await
}

/// Cancel a draft or submitted order (owner or admin).
#[utoipa::path(
    post,
    path = "/v1/orders/{id}/cancel",
    tag = "orders",
    params(
        ("id" = Uuid, Path, description = "Order id."),
        ("If-Match" = Option<String>, Header, description = "Honoured when sent."),
        ("Idempotency-Key" = Option<String>, Header, description = IDEMPOTENCY_DOC),
    ),
    responses(
        (status = OK, description = "Cancelled.", body = OrderView, headers(("ETag" = String, description = "The new version."))),
        (status = CONFLICT, description = "`invalid_state_transition` naming the current state, or `idempotency_key_in_use`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
        (status = PRECONDITION_FAILED, description = "`precondition_failed`.", body = crate::problem::ProblemDocument, content_type = "application/problem+json"),
    ),
)]
pub async fn cancel_order(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<Uuid>,
    if_match: IfMatch,
    idempotency: Idempotency,
) -> Result<Response, Problem> {
    idempotency
        .run(&state.db, principal.user_id, &[], async |conn| {
            transition(conn, &principal, id, &if_match, Action::Cancel).await
        })
        .await
}
