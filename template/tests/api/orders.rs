//! The orders API: validation (V1–V3), state machine (W2), conditional requests (W3, P2),
//! role and object-level authorization (S2).

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use service::users::Role;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::TestApp;

pub fn order_body() -> Value {
    json!({"currency": "EUR", "items": [{"sku": "BOOK-1", "quantity": 2, "unit_price_cents": 1250}, {"sku": "PEN", "quantity": 1, "unit_price_cents": 99}], "note": "gift"})
}

/// Creates an order with a fresh idempotency key; returns its JSON and ETag.
/// A 422's errors as "pointer code" lines, in order.
fn pointers_and_codes(problem: &Value) -> Vec<String> {
    problem["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|error| {
            format!(
                "{} {}",
                error["pointer"].as_str().unwrap(),
                error["code"].as_str().unwrap()
            )
        })
        .collect()
}

pub async fn create(app: &TestApp, token: &str) -> (Value, String) {
    let response = app
        .call(Method::POST, "/v1/orders", token)
        .header("idempotency-key", Uuid::now_v7().to_string())
        .json(&order_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    (response.json().await.unwrap(), etag)
}

#[sqlx::test]
async fn an_order_is_created_as_a_draft_with_location_etag_and_computed_total(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let response = app
        .call(Method::POST, "/v1/orders", &token)
        .header("idempotency-key", "create-1")
        .json(&order_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(response.headers()["etag"], "\"v1\"");
    let order: Value = response.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/orders/{}", order["id"].as_str().unwrap())
    );
    assert_eq!(order["status"], "draft");
    assert_eq!(order["total_cents"], 2 * 1250 + 99);
    assert_eq!(order["items"][1]["sku"], "PEN");
    assert_eq!(order["version"], 1);
    assert!(order.get("owner_id").is_none(), "no internal fields");

    let read = app
        .call(Method::GET, &location, &token)
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(read.headers()["cache-control"], "private, no-cache");
    assert_eq!(read.json::<Value>().await.unwrap(), order);
}

#[sqlx::test]
async fn creating_without_an_idempotency_key_is_a_400(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let response = app
        .call(Method::POST, "/v1/orders", &token)
        .json(&order_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "idempotency_key_required"
    );
}

#[sqlx::test]
async fn every_invalid_field_is_reported_at_once_with_a_json_pointer(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let body = json!({
        "currency": "eur",
        "items": [{"sku": "ok", "quantity": 0, "unit_price_cents": 1}, {"sku": "bad sku", "quantity": 1, "unit_price_cents": 100_000_001}],
        "note": "x".repeat(1001),
        "external_ref": "",
        "status": "approved",
        "total_cents": 1,
        "id": Uuid::now_v7(),
        "colour": "red",
    });
    let response = app
        .call(Method::POST, "/v1/orders", &token)
        .header("idempotency-key", "k")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["code"], "validation_failed");
    let found = pointers_and_codes(&problem);
    assert_eq!(
        found,
        [
            "/colour unknown_field",
            "/currency currency",
            "/external_ref length",
            "/id read_only",
            "/items/0/quantity range",
            "/items/1/sku sku",
            "/items/1/unit_price_cents range",
            "/note length",
            "/status read_only",
            "/total_cents read_only",
        ]
    );

    let no_items = app
        .call(Method::POST, "/v1/orders", &token)
        .header("idempotency-key", "k2")
        .json(&json!({"currency": "EUR", "items": []}))
        .send()
        .await
        .unwrap();
    let problem: Value = no_items.json().await.unwrap();
    assert_eq!(problem["errors"][0]["pointer"], "/items");

    let too_many: Vec<Value> = (0..101)
        .map(|_| json!({"sku": "A", "quantity": 1, "unit_price_cents": 1}))
        .collect();
    let response = app
        .call(Method::POST, "/v1/orders", &token)
        .header("idempotency-key", "k3")
        .json(&json!({"currency": "EUR", "items": too_many}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // Values of the wrong type and missing fields too, beside the rules the rest breaks.
    let wrong_shape = app
        .call(Method::POST, "/v1/orders", &token)
        .header("idempotency-key", "k4")
        .json(&json!({"currency": "eur", "items": [
            {"sku": "A", "quantity": "two", "unit_price_cents": 1},
            {"quantity": 1, "unit_price_cents": 1},
            {"sku": "B", "quantity": 1, "unit_price_cents": -5}
        ]}))
        .send()
        .await
        .unwrap();
    let problem: Value = wrong_shape.json().await.unwrap();
    let found = pointers_and_codes(&problem);
    assert_eq!(
        found,
        [
            "/currency currency",
            "/items/0/quantity invalid_type",
            "/items/1/sku required",
            "/items/2/unit_price_cents range",
        ]
    );
}

#[sqlx::test]
async fn orders_move_through_the_state_machine_and_illegal_moves_name_the_state(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, customer) = app.token_for(Role::Customer).await;
    let (_, admin) = app.token_for(Role::Admin).await;
    let (order, _) = create(&app, &customer).await;
    let id = order["id"].as_str().unwrap();
    let act = |token: &str, action: &str| {
        app.call(Method::POST, &format!("/v1/orders/{id}/{action}"), token)
            .send()
    };

    let approve_draft = act(&admin, "approve").await.unwrap();
    assert_eq!(approve_draft.status(), StatusCode::CONFLICT);
    let problem: Value = approve_draft.json().await.unwrap();
    assert_eq!(problem["code"], "invalid_state_transition");
    assert!(
        problem["detail"].as_str().unwrap().contains("draft"),
        "{problem}"
    );

    let submitted = act(&customer, "submit").await.unwrap();
    assert_eq!(submitted.status(), StatusCode::OK);
    assert_eq!(submitted.headers()["etag"], "\"v2\"");
    assert_eq!(
        submitted.json::<Value>().await.unwrap()["status"],
        "submitted"
    );

    assert_eq!(
        act(&customer, "approve").await.unwrap().status(),
        StatusCode::FORBIDDEN,
        "only admins approve"
    );
    let approved = act(&admin, "approve").await.unwrap();
    assert_eq!(
        approved.json::<Value>().await.unwrap()["status"],
        "approved"
    );

    let cancel_approved = act(&customer, "cancel").await.unwrap();
    assert_eq!(cancel_approved.status(), StatusCode::CONFLICT);
    assert!(
        cancel_approved.json::<Value>().await.unwrap()["detail"]
            .as_str()
            .unwrap()
            .contains("approved")
    );

    let (other, _) = create(&app, &customer).await;
    let cancelled = app
        .call(
            Method::POST,
            &format!("/v1/orders/{}/cancel", other["id"].as_str().unwrap()),
            &customer,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        cancelled.json::<Value>().await.unwrap()["status"],
        "cancelled"
    );
}

#[sqlx::test]
async fn another_customers_order_is_a_404_everywhere_and_admins_see_all(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, owner) = app.token_for(Role::Customer).await;
    let (_, stranger) = app.token_for(Role::Customer).await;
    let (_, admin) = app.token_for(Role::Admin).await;
    let (order, etag) = create(&app, &owner).await;
    let path = format!("/v1/orders/{}", order["id"].as_str().unwrap());
    let missing = format!("/v1/orders/{}", Uuid::now_v7());

    for (method, suffix) in [
        (Method::GET, ""),
        (Method::PATCH, ""),
        (Method::POST, "/submit"),
        (Method::POST, "/cancel"),
    ] {
        for target in [&path, &missing] {
            let response = app
                .call(method.clone(), &format!("{target}{suffix}"), &stranger)
                .header("if-match", &etag)
                .json(&json!({"note": "mine now"}))
                .send()
                .await
                .unwrap();
            assert_eq!(
                response.status(),
                StatusCode::NOT_FOUND,
                "{method} {target}{suffix}"
            );
            let problem: Value = response.json().await.unwrap();
            assert_eq!(
                problem["detail"], "No order with this id.",
                "a stranger's order looks exactly like a missing one"
            );
        }
    }
    let list = app.get_json("/v1/orders", &stranger).await;
    assert_eq!(list["data"], json!([]), "lists show only your own orders");

    assert_eq!(
        app.call(Method::GET, &path, &admin)
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let all = app.get_json("/v1/orders", &admin).await;
    assert_eq!(all["data"].as_array().unwrap().len(), 1);
}

#[sqlx::test]
async fn etags_drive_304_412_and_428(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let (order, etag) = create(&app, &token).await;
    let path = format!("/v1/orders/{}", order["id"].as_str().unwrap());

    let not_modified = app
        .call(Method::GET, &path, &token)
        .header("if-none-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(not_modified.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(not_modified.headers()["etag"], etag.as_str());
    assert!(not_modified.bytes().await.unwrap().is_empty());

    let patch = |if_match: Option<&str>, body: Value| {
        let mut request = app.call(Method::PATCH, &path, &token).json(&body);
        if let Some(tag) = if_match {
            request = request.header("if-match", tag);
        }
        request.send()
    };
    let required = patch(None, json!({"note": "x"})).await.unwrap();
    assert_eq!(required.status(), StatusCode::PRECONDITION_REQUIRED);
    assert_eq!(
        required.json::<Value>().await.unwrap()["code"],
        "precondition_required"
    );

    let updated = patch(Some(&etag), json!({"note": "leave at the door"}))
        .await
        .unwrap();
    assert_eq!(updated.status(), StatusCode::OK);
    let new_etag = updated.headers()["etag"].to_str().unwrap().to_owned();
    assert_ne!(new_etag, etag);
    let body: Value = updated.json().await.unwrap();
    assert_eq!(
        (body["note"].as_str(), body["version"].as_i64()),
        (Some("leave at the door"), Some(2))
    );

    // A second writer holding the old ETag loses instead of overwriting.
    let stale = patch(Some(&etag), json!({"note": "overwrite"}))
        .await
        .unwrap();
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        stale.json::<Value>().await.unwrap()["code"],
        "precondition_failed"
    );

    // `null` clears; absent leaves alone.
    let cleared: Value = patch(
        Some(&new_etag),
        json!({"note": null, "external_ref": "PO-9"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(
        (cleared["note"].clone(), cleared["external_ref"].clone()),
        (Value::Null, json!("PO-9"))
    );

    // Another order of the same owner cannot take the same external_ref.
    let other = app
        .call(Method::POST, "/v1/orders", &token)
        .header("idempotency-key", "second-order")
        .json(&json!({"currency": "EUR", "items": [{"sku": "A", "quantity": 1, "unit_price_cents": 1}], "external_ref": "PO-9"}))
        .send()
        .await
        .unwrap();
    assert_eq!(other.status(), StatusCode::CONFLICT);
    assert_eq!(
        other.json::<Value>().await.unwrap()["code"],
        "external_ref_taken"
    );

    // Transitions honour If-Match when sent.
    let stale_submit = app
        .call(Method::POST, &format!("{path}/submit"), &token)
        .header("if-match", &etag)
        .send()
        .await
        .unwrap();
    assert_eq!(stale_submit.status(), StatusCode::PRECONDITION_FAILED);
    let submit = app
        .call(Method::POST, &format!("{path}/submit"), &token)
        .header("if-match", "\"v3\"")
        .send()
        .await
        .unwrap();
    assert_eq!(submit.status(), StatusCode::OK);

    // Only drafts can be edited.
    let locked = patch(Some("\"v4\""), json!({"note": "late"}))
        .await
        .unwrap();
    assert_eq!(locked.status(), StatusCode::CONFLICT);
    // An empty change too: a client must not read a 200 as "still editable".
    let empty = patch(Some("\"v4\""), json!({})).await.unwrap();
    assert_eq!(empty.status(), StatusCode::CONFLICT);
    assert_eq!(
        empty.json::<Value>().await.unwrap()["code"],
        "invalid_state_transition"
    );
}

#[sqlx::test]
async fn read_only_fields_cannot_be_patched(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let (order, etag) = create(&app, &token).await;
    let response = app
        .call(
            Method::PATCH,
            &format!("/v1/orders/{}", order["id"].as_str().unwrap()),
            &token,
        )
        .header("if-match", etag)
        .json(&json!({"status": "approved", "total_cents": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let problem: Value = response.json().await.unwrap();
    assert_eq!(problem["errors"].as_array().unwrap().len(), 2);
}

#[sqlx::test]
async fn an_empty_patch_changes_nothing_and_keeps_the_etag(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let (order, etag) = create(&app, &token).await;
    let response = app
        .call(
            Method::PATCH,
            &format!("/v1/orders/{}", order["id"].as_str().unwrap()),
            &token,
        )
        .header("if-match", &etag)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["etag"], etag.as_str());
}

#[sqlx::test]
async fn concurrent_transitions_are_serialised_by_the_row_lock(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let (order, _) = create(&app, &token).await;
    let path = format!("/v1/orders/{}/submit", order["id"].as_str().unwrap());
    let mut attempts = tokio::task::JoinSet::new();
    for _ in 0..10 {
        let request = app.call(Method::POST, &path, &token);
        attempts.spawn(async move { request.send().await.unwrap().status() });
    }
    let statuses = attempts.join_all().await;
    assert_eq!(
        statuses
            .iter()
            .filter(|status| **status == StatusCode::OK)
            .count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|status| *status == StatusCode::OK || *status == StatusCode::CONFLICT),
        "{statuses:?}"
    );
    let version: i32 = sqlx::query_scalar("SELECT version FROM orders")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(version, 2, "one transition, one new version");
}
