//! Keyset pagination (P1) and constant query counts per page (P3).

use std::collections::HashSet;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use service::orders::domain::{Currency, LineItem, NewOrder, Quantity, Sku, UnitPrice};
use service::orders::store;
use service::users::Role;
use sqlx::PgPool;
use uuid::Uuid;

use crate::harness::{TestApp, TestUser};
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
