//! The SQL for orders. Every read of several orders fetches their items in one extra query
//! (`WHERE order_id = ANY($1)`), so a page costs two queries whatever its size. Each function is
//! a client span (`orders.list` …) under the request's trace.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

use super::domain::{NewOrder, OrderStatus};
use crate::pagination::Keyset;

/// The unique index on (owner_id, external_ref).
pub const EXTERNAL_REF_INDEX: &str = "orders_owner_external_ref";

#[derive(Debug, Clone)]
pub struct Order {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub status: OrderStatus,
    pub currency: String,
    pub items: Vec<Item>,
    pub total_cents: i64,
    pub note: Option<String>,
    pub external_ref: Option<String>,
    pub version: i32,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
    pub unit_price_cents: i64,
}

/// An `orders` row before its items are attached.
struct OrderRow {
    id: Uuid,
    owner_id: Uuid,
    status: String,
    currency: String,
    total_cents: i64,
    note: Option<String>,
    external_ref: Option<String>,
    version: i32,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

/// Which orders a list may show: one owner's (customers) or everyone's (admins), optionally
/// of one status.
#[derive(Debug, Clone, Copy)]
pub struct ListFilter {
    pub owner: Option<Uuid>,
    pub status: Option<OrderStatus>,
}

#[tracing::instrument(name = "orders.insert", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn insert(conn: &mut PgConnection, owner: Uuid, order: &NewOrder) -> sqlx::Result<Order> {
    let id = Uuid::now_v7();
    let row = sqlx::query_as!(
        OrderRow,
        "INSERT INTO orders (id, owner_id, currency, total_cents, note, external_ref)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING id, owner_id, status, currency, total_cents, note, external_ref, version, created_at, updated_at",
        id,
        owner,
        order.currency.get(),
        order.total_cents(),
        order.note.as_ref().map(|note| note.get().as_str()),
        order.external_ref.as_ref().map(|external_ref| external_ref.get().as_str()),
    )
    .fetch_one(&mut *conn)
    .await?;

    let positions: Vec<i32> = (1..).take(order.items.len()).collect();
    let skus: Vec<String> = order
        .items
        .iter()
        .map(|item| item.sku.get().clone())
        .collect();
    let quantities: Vec<i64> = order
        .items
        .iter()
        .map(|item| *item.quantity.get())
        .collect();
    let prices: Vec<i64> = order
        .items
        .iter()
        .map(|item| *item.unit_price.get())
        .collect();
    sqlx::query!(
        "INSERT INTO order_items (order_id, position, sku, quantity, unit_price_cents)
         SELECT $1, * FROM UNNEST($2::integer[], $3::text[], $4::bigint[], $5::bigint[])",
        id,
        &positions,
        &skus,
        &quantities,
        &prices,
    )
    .execute(&mut *conn)
    .await?;

    let mut orders = with_items(conn, vec![row]).await?;
    orders.pop().ok_or(sqlx::Error::RowNotFound)
}

#[tracing::instrument(name = "orders.find", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn find(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<Order>> {
    let row = sqlx::query_as!(
        OrderRow,
        "SELECT id, owner_id, status, currency, total_cents, note, external_ref, version, created_at, updated_at
         FROM orders WHERE id = $1",
        id,
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(with_items(conn, row.into_iter().collect()).await?.pop())
}

/// Like [`find`], and locks the row until the transaction ends, so that the checks made on it
/// (owner, version, state) still hold when the update runs.
#[tracing::instrument(name = "orders.find_for_update", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn find_for_update(conn: &mut PgConnection, id: Uuid) -> sqlx::Result<Option<Order>> {
    let row = sqlx::query_as!(
        OrderRow,
        "SELECT id, owner_id, status, currency, total_cents, note, external_ref, version, created_at, updated_at
         FROM orders WHERE id = $1 FOR UPDATE",
        id,
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(with_items(conn, row.into_iter().collect()).await?.pop())
}

/// One page, newest first, strictly after `after`. Each filter combination has its own query
/// so that each is served by its own index (see the orders migration).
#[tracing::instrument(name = "orders.list", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn list(
    conn: &mut PgConnection,
    filter: ListFilter,
    after: Keyset,
    limit: i64,
) -> sqlx::Result<Vec<Order>> {
    let (created_at, id) = (after.created_at, after.id);
    let rows = match (filter.owner, filter.status) {
        (Some(owner), Some(status)) => {
            sqlx::query_as!(
                OrderRow,
                "SELECT id, owner_id, status, currency, total_cents, note, external_ref, version, created_at, updated_at
                 FROM orders WHERE owner_id = $1 AND status = $2 AND (created_at, id) < ($3, $4)
                 ORDER BY created_at DESC, id DESC LIMIT $5",
                owner,
                status.as_str(),
                created_at,
                id,
                limit,
            )
            .fetch_all(&mut *conn)
            .await?
        }
        (Some(owner), None) => {
            sqlx::query_as!(
                OrderRow,
                "SELECT id, owner_id, status, currency, total_cents, note, external_ref, version, created_at, updated_at
                 FROM orders WHERE owner_id = $1 AND (created_at, id) < ($2, $3)
                 ORDER BY created_at DESC, id DESC LIMIT $4",
                owner,
                created_at,
                id,
                limit,
            )
            .fetch_all(&mut *conn)
            .await?
        }
        (None, Some(status)) => {
            sqlx::query_as!(
                OrderRow,
                "SELECT id, owner_id, status, currency, total_cents, note, external_ref, version, created_at, updated_at
                 FROM orders WHERE status = $1 AND (created_at, id) < ($2, $3)
                 ORDER BY created_at DESC, id DESC LIMIT $4",
                status.as_str(),
                created_at,
                id,
                limit,
            )
            .fetch_all(&mut *conn)
            .await?
        }
        (None, None) => {
            sqlx::query_as!(
                OrderRow,
                "SELECT id, owner_id, status, currency, total_cents, note, external_ref, version, created_at, updated_at
                 FROM orders WHERE (created_at, id) < ($1, $2)
                 ORDER BY created_at DESC, id DESC LIMIT $3",
                created_at,
                id,
                limit,
            )
            .fetch_all(&mut *conn)
            .await?
        }
    };
    with_items(conn, rows).await
}

/// Sets the editable fields and bumps the version.
#[tracing::instrument(name = "orders.update_details", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn update_details(
    conn: &mut PgConnection,
    order: Order,
    note: Option<String>,
    external_ref: Option<String>,
) -> sqlx::Result<Order> {
    let row = sqlx::query_as!(
        OrderRow,
        "UPDATE orders SET note = $2, external_ref = $3, version = version + 1, updated_at = now()
         WHERE id = $1
         RETURNING id, owner_id, status, currency, total_cents, note, external_ref, version, created_at, updated_at",
        order.id,
        note,
        external_ref,
    )
    .fetch_one(&mut *conn)
    .await?;
    row.into_order(order.items)
}

/// Moves the order to `status` and bumps the version.
#[tracing::instrument(name = "orders.set_status", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
pub async fn set_status(
    conn: &mut PgConnection,
    order: Order,
    status: OrderStatus,
) -> sqlx::Result<Order> {
    let row = sqlx::query_as!(
        OrderRow,
        "UPDATE orders SET status = $2, version = version + 1, updated_at = now()
         WHERE id = $1
         RETURNING id, owner_id, status, currency, total_cents, note, external_ref, version, created_at, updated_at",
        order.id,
        status.as_str(),
    )
    .fetch_one(&mut *conn)
    .await?;
    row.into_order(order.items)
}

/// Attaches the items of every order in `rows` with one query, keeping the rows' order.
#[tracing::instrument(name = "order_items.select", skip_all, fields(otel.kind = "client", db.system.name = "postgresql"))]
async fn with_items(conn: &mut PgConnection, rows: Vec<OrderRow>) -> sqlx::Result<Vec<Order>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
    let items = sqlx::query!(
        "SELECT order_id, sku, quantity, unit_price_cents FROM order_items
         WHERE order_id = ANY($1) ORDER BY order_id, position",
        &ids,
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut by_order: std::collections::HashMap<Uuid, Vec<Item>> = std::collections::HashMap::new();
    for item in items {
        by_order.entry(item.order_id).or_default().push(Item {
            sku: item.sku,
            quantity: item.quantity,
            unit_price_cents: item.unit_price_cents,
        });
    }
    rows.into_iter()
        .map(|row| {
            let items = by_order.remove(&row.id).unwrap_or_default();
            row.into_order(items)
        })
        .collect()
}

impl OrderRow {
    fn into_order(self, items: Vec<Item>) -> sqlx::Result<Order> {
        // The CHECK constraint admits only known states; anything else is a decoding error.
        let status = OrderStatus::from_stored(&self.status)
            .map_err(|error| sqlx::Error::Decode(error.into()))?;
        Ok(Order {
            id: self.id,
            owner_id: self.owner_id,
            status,
            currency: self.currency,
            items,
            total_cents: self.total_cents,
            note: self.note,
            external_ref: self.external_ref,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}
