//! Keyset pagination (P1) and constant query counts per page (P3).

use std::collections::HashSet;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use service::orders::domain::{Currency, LineItem, NewOrder, Quantity, Sku, UnitPrice};
use service::orders::store;
use service::users::Role;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::{TestApp, TestUser, with_job_queue};
use crate::statements;

/// Inserts `count` orders for `owner` straight through the store (fast set-up).
async fn seed(app: &TestApp, owner: &TestUser, count: usize, items_each: usize) {
    let mut conn = app.db.acquire().await.unwrap();
    let item = LineItem {
        sku: Sku::parse("SKU-1".into()).unwrap(),
        quantity: Quantity::parse(1).unwrap(),
        unit_price: UnitPrice::parse(100).unwrap(),
    };
    let order = NewOrder {
        currency: Currency::parse("EUR".into()).unwrap(),
        items: vec![item; items_each],
        note: None,
        external_ref: None,
    };
    for _ in 0..count {
        store::insert(&mut conn, owner.id, &order).await.unwrap();
    }
}

async fn page(app: &TestApp, token: &str, query: &str) -> (StatusCode, Option<String>, Value) {
    let response = app
        .call(Method::GET, &format!("/v1/orders{query}"), token)
        .send()
        .await
        .unwrap();
    let link = response
        .headers()
        .get("link")
        .map(|value| value.to_str().unwrap().to_owned());
    (response.status(), link, response.json().await.unwrap())
}

fn ids(body: &Value) -> Vec<String> {
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|order| order["id"].as_str().unwrap().to_owned())
        .collect()
}

#[sqlx::test]
async fn walking_every_page_while_rows_are_inserted_skips_and_repeats_nothing(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let user = app.create_user(Role::Customer).await;
    let token = app.login(&user).await;
    seed(&app, &user, 45, 1).await;
    let existing: HashSet<String> = ids(&page(&app, &token, "?limit=100").await.2)
        .into_iter()
        .collect();
    assert_eq!(existing.len(), 45);

    let mut seen = Vec::new();
    let mut query = "?limit=10".to_owned();
    let mut pages = 0;
    loop {
        let (status, link, body) = page(&app, &token, &query).await;
        assert_eq!(status, StatusCode::OK);
        pages += 1;
        seen.extend(ids(&body));
        // Others keep creating orders while we page.
        seed(&app, &user, 2, 1).await;
        match body["next_cursor"].as_str() {
            Some(cursor) => {
                let link = link.expect("a next page has a Link header");
                assert_eq!(
                    link,
                    format!("</v1/orders?limit=10&cursor={cursor}>; rel=\"next\"")
                );
                query = format!("?limit=10&cursor={cursor}");
            }
            None => {
                assert!(
                    body.get("next_cursor").is_some(),
                    "next_cursor is present, as null, on the last page"
                );
                assert!(link.is_none(), "no Link on the last page");
                break;
            }
        }
    }
    let unique: HashSet<_> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "no order appeared twice");
    assert!(
        existing.is_subset(&unique),
        "every order that existed when the walk began was seen"
    );
    assert_eq!(pages, 5);
}

#[sqlx::test]
async fn limits_default_to_20_clamp_at_100_and_reject_nonsense(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let user = app.create_user(Role::Customer).await;
    let token = app.login(&user).await;
    seed(&app, &user, 105, 1).await;
    assert_eq!(ids(&page(&app, &token, "").await.2).len(), 20);
    assert_eq!(ids(&page(&app, &token, "?limit=1000").await.2).len(), 100);
    for bad in ["?limit=0", "?limit=-5", "?limit=abc", "?status=shipped"] {
        let (status, _, body) = page(&app, &token, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
        assert_eq!(body["code"], "invalid_parameter", "{bad}");
    }
    // Unknown parameters are ignored, but not at any length (checklist V3).
    let padded = format!("?limit=5&padding={}", "a".repeat(2048));
    let (status, _, body) = page(&app, &token, &padded).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["code"], "invalid_parameter");
    let (status, _, _) = page(&app, &token, &padded[..2000]).await;
    assert_eq!(status, StatusCode::OK);
}

#[sqlx::test]
async fn cursors_cannot_be_tampered_with_or_reused_by_others_or_with_other_filters(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let ann = app.create_user(Role::Customer).await;
    let ann_token = app.login(&ann).await;
    let (_, bob_token) = app.token_for(Role::Customer).await;
    seed(&app, &ann, 3, 1).await;
    let cursor = page(&app, &ann_token, "?limit=1").await.2["next_cursor"]
        .as_str()
        .unwrap()
        .to_owned();

    assert_eq!(
        page(&app, &ann_token, &format!("?limit=1&cursor={cursor}"))
            .await
            .0,
        StatusCode::OK
    );
    let mut tampered = cursor.clone().into_bytes();
    tampered[5] = if tampered[5] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    for (token, query) in [
        (&bob_token, format!("?cursor={cursor}")),
        (&ann_token, format!("?cursor={cursor}&status=draft")),
        (&ann_token, format!("?cursor={tampered}")),
        (&ann_token, "?cursor=not-a-cursor".to_owned()),
    ] {
        let (status, _, body) = page(&app, token, &query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}");
        assert_eq!(body["code"], "invalid_cursor", "{query}");
    }
}

#[sqlx::test]
async fn the_status_filter_pages_within_its_own_orders(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let user = app.create_user(Role::Customer).await;
    let token = app.login(&user).await;
    seed(&app, &user, 3, 1).await;
    let first = ids(&page(&app, &token, "").await.2)[0].clone();
    app.call(Method::POST, &format!("/v1/orders/{first}/submit"), &token)
        .send()
        .await
        .unwrap();
    let (_, _, submitted) = page(&app, &token, "?status=submitted").await;
    assert_eq!(ids(&submitted), [first]);
    let (_, _, drafts) = page(&app, &token, "?status=draft&limit=1").await;
    let cursor = drafts["next_cursor"].as_str().unwrap();
    let (status, _, next) = page(
        &app,
        &token,
        &format!("?status=draft&limit=1&cursor={cursor}"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(next["data"][0]["status"], "draft");
}

#[sqlx::test]
async fn a_page_of_orders_with_items_costs_the_same_queries_whatever_its_size(db: PgPool) {
    statements::install();
    let app = TestApp::spawn(db).await;
    let (_, admin) = app.token_for(Role::Admin).await;
    let customer = app.create_user(Role::Customer).await;
    seed(&app, &customer, 30, 5).await;

    let mut counts = Vec::new();
    for limit in [1, 5, 30] {
        let request_id = Uuid::now_v7().to_string();
        let response = app
            .call(Method::GET, &format!("/v1/orders?limit={limit}"), &admin)
            .header("x-request-id", &request_id)
            .send()
            .await
            .unwrap();
        let body: Value = response.json().await.unwrap();
        assert_eq!(ids(&body).len(), limit);
        assert!(
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|order| order["items"].as_array().unwrap().len() == 5)
        );
        counts.push(statements::count(&request_id));
    }
    assert_eq!(
        counts,
        [2, 2, 2],
        "one query for the page, one for all its items"
    );
}

#[sqlx::test]
async fn every_list_query_reads_an_index_in_its_order(db: PgPool) {
    // A list without an index behind it is fast in development and a sequential scan plus a sort
    // of the whole table in production. Postgres' own plans say which: every list, first page and
    // next, for a customer and for an admin, with and without a filter.
    statements::install();
    let db = with_job_queue(db).await;
    let app = TestApp::spawn(statements::explaining(&db).await).await;
    let customer = app.create_user(Role::Customer).await;
    let token = app.login(&customer).await;
    let (_, admin) = app.token_for(Role::Admin).await;
    // Another customer with most of the orders, older and newer than this one's, and
    // statistics: the planner sees what it would in production.
    let other = app.create_user(Role::Customer).await;
    seed(&app, &other, 50, 1).await;
    seed(&app, &customer, 3, 1).await;
    seed(&app, &other, 50, 1).await;
    // Statuses mixed, so that a status filter is worth an index of its own to the planner.
    sqlx::query(
        "UPDATE orders SET status = 'submitted' \
         WHERE id IN (SELECT id FROM orders WHERE owner_id = $1 ORDER BY id LIMIT 1) \
            OR id IN (SELECT id FROM orders WHERE owner_id = $2 ORDER BY id LIMIT 60)",
    )
    .bind(customer.id)
    .bind(other.id)
    .execute(&app.db)
    .await
    .unwrap();
    sqlx::query("ANALYZE").execute(&app.db).await.unwrap();
    let csv = "external_ref,currency,sku,quantity,unit_price_cents\nPO-1,EUR,A,1,100\n";
    let import: Value = app
        .call(Method::POST, "/v1/imports", &token)
        .header("idempotency-key", "explain")
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let errors = format!("/v1/imports/{}/errors", import["id"].as_str().unwrap());

    let mut lists = Vec::new();
    for (token, path) in [
        (&token, "/v1/orders"),
        (&token, "/v1/orders?status=draft"),
        (&admin, "/v1/orders"),
        (&admin, "/v1/orders?status=draft"),
        (&token, "/v1/imports"),
        (&token, &errors),
    ] {
        let separator = if path.contains('?') { '&' } else { '?' };
        let first = format!("{path}{separator}limit=1");
        let (body, plans) = explained(&app, token, &first).await;
        lists.extend(plans.into_iter().map(|plan| (first.clone(), plan)));
        if let Some(cursor) = body["next_cursor"].as_str() {
            let next = format!("{first}&cursor={cursor}");
            let (_, plans) = explained(&app, token, &next).await;
            lists.extend(plans.into_iter().map(|plan| (next.clone(), plan)));
        }
    }
    assert!(lists.len() >= 10, "{lists:#?}");
    for (request, plan) in lists {
        assert!(
            plan.contains("Index Scan") || plan.contains("Index Only Scan"),
            "{request}: {plan}"
        );
        // No sort of what was read, and nothing read only to be filtered out: the index holds
        // the page's rows in order and every condition is one of its conditions.
        assert!(
            !plan.contains("Seq Scan") && !plan.contains("Sort") && !plan.contains("Filter:"),
            "{request}: {plan}"
        );
    }
}

/// The body of a list request, and the plans of its statements that read a page (`LIMIT`).
async fn explained(app: &TestApp, token: &str, path: &str) -> (Value, Vec<String>) {
    let request_id = Uuid::now_v7().to_string();
    let response = app
        .call(Method::GET, path, token)
        .header("x-request-id", &request_id)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK, "{path}");
    let body = response.json().await.unwrap();
    let plans = statements::plans(&request_id)
        .into_iter()
        .filter(|plan| plan.contains("Limit"))
        .collect();
    (body, plans)
}

#[sqlx::test]
async fn orders_created_in_the_same_instant_are_paged_by_id(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let user = app.create_user(Role::Customer).await;
    let token = app.login(&user).await;
    // One transaction: now() is the same for every row, so only the id orders them.
    let mut tx = app.db.begin().await.unwrap();
    let item = LineItem {
        sku: Sku::parse("SKU-1".into()).unwrap(),
        quantity: Quantity::parse(1).unwrap(),
        unit_price: UnitPrice::parse(1).unwrap(),
    };
    let order = NewOrder {
        currency: Currency::parse("EUR".into()).unwrap(),
        items: vec![item],
        note: None,
        external_ref: None,
    };
    for _ in 0..25 {
        store::insert(&mut tx, user.id, &order).await.unwrap();
    }
    tx.commit().await.unwrap();

    let mut seen = Vec::new();
    let mut query = "?limit=10".to_owned();
    loop {
        let (_, _, body) = page(&app, &token, &query).await;
        seen.extend(ids(&body));
        match body["next_cursor"].as_str() {
            Some(cursor) => query = format!("?limit=10&cursor={cursor}"),
            None => break,
        }
    }
    let unique: HashSet<_> = seen.iter().collect();
    assert_eq!((seen.len(), unique.len()), (25, 25));
}
