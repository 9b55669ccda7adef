//! Idempotency keys (W1): replays, reuse, in-flight duplicates, races, scope, retention.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use service::users::Role;
use sqlx::PgPool;
use tokio::task::JoinSet;

use crate::harness::TestApp;
use crate::orders::{create, order_body};

async fn orders_in_db(db: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(db)
        .await
        .unwrap()
}

#[sqlx::test]
async fn a_retried_create_replays_the_first_response_and_creates_nothing(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let send = || {
        app.call(Method::POST, "/v1/orders", &token)
            .header("idempotency-key", "\"order-42\"")
            .json(&order_body())
            .send()
    };

    let first = send().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let (location, etag) = (
        first.headers()["location"].clone(),
        first.headers()["etag"].clone(),
    );
    let body = first.text().await.unwrap();

    let again = send().await.unwrap();
    assert_eq!(again.status(), StatusCode::CREATED);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["location"], location);
    assert_eq!(again.headers()["etag"], etag);
    assert_eq!(again.text().await.unwrap(), body, "byte for byte");
    assert_eq!(orders_in_db(&app.db).await, 1);

    // The bare and the quoted form are the same key.
    let bare = app
        .call(Method::POST, "/v1/orders", &token)
        .header("idempotency-key", "order-42")
        .json(&order_body())
        .send()
        .await
        .unwrap();
    assert_eq!(bare.headers()["idempotent-replayed"], "true");
}

#[sqlx::test]
async fn the_same_key_with_another_body_is_a_422(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let send = |body: Value| {
        app.call(Method::POST, "/v1/orders", &token)
            .header("idempotency-key", "k")
            .json(&body)
            .send()
    };
    assert_eq!(
        send(order_body()).await.unwrap().status(),
        StatusCode::CREATED
    );
    let mut other = order_body();
    other["note"] = json!("different");
    let reused = send(other).await.unwrap();
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        reused.json::<Value>().await.unwrap()["code"],
        "idempotency_key_reused"
    );

    // Key order and whitespace do not make a request different.
    let reordered = r#"{ "note":"gift", "items":[{"unit_price_cents":1250,"quantity":2,"sku":"BOOK-1"},{"sku":"PEN","quantity":1,"unit_price_cents":99}], "currency":"EUR" }"#;
    let same = app
        .call(Method::POST, "/v1/orders", &token)
        .header("idempotency-key", "k")
        .header("content-type", "application/json")
        .body(reordered)
        .send()
        .await
        .unwrap();
    assert_eq!(same.headers()["idempotent-replayed"], "true");
}

#[sqlx::test]
async fn fifty_concurrent_identical_requests_create_exactly_one_order(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let mut requests = JoinSet::new();
    for _ in 0..50 {
        let request = app
            .call(Method::POST, "/v1/orders", &token)
            .header("idempotency-key", "race")
            .json(&order_body());
        requests.spawn(async move {
            let response = request.send().await.unwrap();
            let status = response.status();
            let replayed = response.headers().contains_key("idempotent-replayed");
            let retry_after = response.headers().get("retry-after").cloned();
            let body: Value = response.json().await.unwrap();
            (status, replayed, retry_after, body)
        });
    }
    let results = requests.join_all().await;
    let created: Vec<_> = results
        .iter()
        .filter(|(status, replayed, ..)| *status == StatusCode::CREATED && !replayed)
        .collect();
    assert_eq!(created.len(), 1, "exactly one request ran the effect");
    let id = &created[0].3["id"];
    for (status, _, retry_after, body) in &results {
        match *status {
            StatusCode::CREATED => assert!(body["id"] == *id, "a replay names the same order"),
            StatusCode::CONFLICT => {
                assert_eq!(body["code"], "idempotency_key_in_use");
                assert_eq!(retry_after.as_ref().unwrap(), "1");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(orders_in_db(&app.db).await, 1);
}

#[sqlx::test]
async fn a_request_with_a_key_still_in_flight_gets_409(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (user, token) = app.token_for(Role::Customer).await;
    // Hold the key's row the way an in-flight request does: an open transaction that inserted it.
    let mut in_flight = app.db.begin().await.unwrap();
    sqlx::query("INSERT INTO idempotency_keys (principal_id, method, route, key, fingerprint) VALUES ($1, 'POST', '/v1/orders', 'slow', '')")
        .bind(user.id)
        .execute(&mut *in_flight)
        .await
        .unwrap();
    let response = app
        .call(Method::POST, "/v1/orders", &token)
        .header("idempotency-key", "slow")
        .json(&order_body())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert_eq!(response.headers()["retry-after"], "1");
    assert_eq!(
        response.json::<Value>().await.unwrap()["code"],
        "idempotency_key_in_use"
    );

    // When the first request fails (rolls back), the key is free again.
    in_flight.rollback().await.unwrap();
    let retried = app
        .call(Method::POST, "/v1/orders", &token)
        .header("idempotency-key", "slow")
        .json(&order_body())
        .send()
        .await
        .unwrap();
    assert_eq!(retried.status(), StatusCode::CREATED);
}

#[sqlx::test]
async fn the_short_wait_covers_only_the_claim_not_the_locks_the_effect_waits_for(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let (order, etag) = create(&app, &token).await;
    let id: uuid::Uuid = order["id"].as_str().unwrap().parse().unwrap();
    // Another transaction holds the order's row for longer than the claim's 100 ms lock timeout.
    let mut holder = app.db.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM orders WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *holder)
        .await
        .unwrap();
    let submit = app
        .call(Method::POST, &format!("/v1/orders/{id}/submit"), &token)
        .header("idempotency-key", "waits")
        .header("if-match", &etag)
        .send();
    // Released only once the submit is waiting for the row, and longer than 100 ms after that.
    let waiter = app.db.clone();
    let release = async move {
        let waiting = async {
            while sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&waiter)
            .await
            .unwrap()
                == 0
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the submit waits for the locked row");
        tokio::time::sleep(Duration::from_millis(300)).await;
        holder.commit().await.unwrap();
    };
    let (submitted, ()) = tokio::join!(submit, release);
    // The submit waited for the row and then ran, instead of failing on the key's lock timeout.
    assert_eq!(submitted.unwrap().status(), StatusCode::OK);
}

#[sqlx::test]
async fn a_replay_returns_the_stored_response_even_after_the_order_changed(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let (order, etag) = create(&app, &token).await;
    let path = format!("/v1/orders/{}", order["id"].as_str().unwrap());
    let submit = || {
        app.call(Method::POST, &format!("{path}/submit"), &token)
            .header("idempotency-key", "submit-1")
            .header("if-match", &etag)
            .send()
    };

    let first = submit().await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let first_body = first.text().await.unwrap();

    // The order moves on; the original If-Match is now stale and the transition illegal.
    app.call(Method::POST, &format!("{path}/cancel"), &token)
        .send()
        .await
        .unwrap();
    let replay = submit().await.unwrap();
    assert_eq!(
        replay.status(),
        StatusCode::OK,
        "the key is checked before preconditions"
    );
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.text().await.unwrap(), first_body);

    // Client errors decided by the handler are stored and replayed too.
    let illegal = || {
        app.call(Method::POST, &format!("{path}/submit"), &token)
            .header("idempotency-key", "submit-2")
            .send()
    };
    assert_eq!(illegal().await.unwrap().status(), StatusCode::CONFLICT);
    let again = illegal().await.unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(
        again.json::<Value>().await.unwrap()["code"],
        "invalid_state_transition"
    );
}

#[sqlx::test]
async fn keys_are_scoped_per_principal_and_rejections_are_not_stored(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, ann) = app.token_for(Role::Customer).await;
    let (_, bob) = app.token_for(Role::Customer).await;
    let send = |token: &str, body: Value| {
        app.call(Method::POST, "/v1/orders", token)
            .header("idempotency-key", "shared")
            .json(&body)
            .send()
    };

    // A validation failure happens before the key is claimed: the key stays free.
    let invalid = send(&ann, json!({"currency": "nope", "items": []}))
        .await
        .unwrap();
    assert_eq!(invalid.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let ann_order: Value = send(&ann, order_body())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    // The same key from another principal is another key: Bob gets his own order, never Ann's.
    let bob_response = send(&bob, order_body()).await.unwrap();
    assert_eq!(bob_response.status(), StatusCode::CREATED);
    assert!(bob_response.headers().get("idempotent-replayed").is_none());
    let bob_order: Value = bob_response.json().await.unwrap();
    assert_ne!(ann_order["id"], bob_order["id"]);
}

#[sqlx::test]
async fn malformed_keys_are_rejected(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    for key in ["", &"k".repeat(256)] {
        let response = app
            .call(Method::POST, "/v1/orders", &token)
            .header("idempotency-key", key)
            .json(&order_body())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{key:?}");
        assert_eq!(
            response.json::<Value>().await.unwrap()["code"],
            "idempotency_key_invalid"
        );
    }
}

#[sqlx::test]
async fn expired_keys_are_purged_and_fresh_ones_kept(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    create(&app, &token).await;
    create(&app, &token).await;
    sqlx::query("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE ctid = (SELECT min(ctid) FROM idempotency_keys)")
        .execute(&app.db)
        .await
        .unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let deleted =
        service::idempotency::purge_expired(&app.db, Duration::from_secs(24 * 3600), &stop)
            .await
            .unwrap();
    assert_eq!(deleted, 1);
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_keys")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(left, 1);
}

#[sqlx::test]
async fn a_412_is_not_stored_so_the_corrected_retry_with_the_same_key_applies(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let (order, etag) = create(&app, &token).await;
    let path = format!("/v1/orders/{}", order["id"].as_str().unwrap());
    let patch = |if_match: &str| {
        app.call(Method::PATCH, &path, &token)
            .header("idempotency-key", "edit-1")
            .header("if-match", if_match)
            .json(&json!({"note": "x"}))
            .send()
    };
    let stale = patch("\"v0\"").await.unwrap();
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(
        stale.headers()["etag"],
        etag.as_str(),
        "the current version"
    );
    let again = patch("\"v0\"").await.unwrap();
    assert_eq!(again.status(), StatusCode::PRECONDITION_FAILED);
    assert!(again.headers().get("idempotent-replayed").is_none());

    // The client re-reads and retries with the same key and the current ETag: it runs.
    let corrected = patch(&etag).await.unwrap();
    assert_eq!(corrected.status(), StatusCode::OK);
    assert!(corrected.headers().get("idempotent-replayed").is_none());
    assert_eq!(corrected.json::<Value>().await.unwrap()["note"], "x");
    // From now on the key holds that success, whatever If-Match a retry sends.
    let replayed = patch(&etag).await.unwrap();
    assert_eq!(replayed.status(), StatusCode::OK);
    assert_eq!(replayed.headers()["idempotent-replayed"], "true");
}

#[sqlx::test]
async fn a_428_for_a_missing_if_match_does_not_claim_the_key(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let (_, token) = app.token_for(Role::Customer).await;
    let (order, etag) = create(&app, &token).await;
    let path = format!("/v1/orders/{}", order["id"].as_str().unwrap());
    let without = app
        .call(Method::PATCH, &path, &token)
        .header("idempotency-key", "edit-2")
        .json(&json!({"note": "y"}))
        .send()
        .await
        .unwrap();
    assert_eq!(without.status(), StatusCode::PRECONDITION_REQUIRED);
    // The 428 did not claim the key.
    let with = app
        .call(Method::PATCH, &path, &token)
        .header("idempotency-key", "edit-3")
        .header("if-match", &etag)
        .json(&json!({"note": "y"}))
        .send()
        .await
        .unwrap();
    assert_eq!(with.status(), StatusCode::OK);
    let free = app
        .call(Method::PATCH, &path, &token)
        .header("idempotency-key", "edit-2")
        .header("if-match", with.headers()["etag"].to_str().unwrap())
        .json(&json!({"note": "y"}))
        .send()
        .await
        .unwrap();
    assert_eq!(free.status(), StatusCode::OK);
    assert!(free.headers().get("idempotent-replayed").is_none());
}

#[sqlx::test]
async fn a_stored_client_error_keeps_nothing_the_effect_wrote_before_it(db: PgPool) {
    use axum::extract::FromRequestParts;
    use service::idempotency::{Idempotency, Outcome};
    use service::problem::{ErrorCode, Problem};

    let principal = uuid::Uuid::now_v7();
    let request = || async {
        let (mut parts, ()) = axum::http::Request::post("/v1/things")
            .header("idempotency-key", "k-1")
            .body(())
            .unwrap()
            .into_parts();
        Idempotency::from_request_parts(&mut parts, &())
            .await
            .unwrap()
    };
    // An effect that breaks its contract: it writes, then decides on a client error.
    let writes_then_refuses = async |conn: &mut sqlx::PgConnection| -> Result<Outcome, Problem> {
        sqlx::query("CREATE TABLE written_by_the_effect (id int)")
            .execute(&mut *conn)
            .await?;
        Err(Problem::new(ErrorCode::InvalidStateTransition, "refused"))
    };
    let refused = request()
        .await
        .run(&db, principal, b"body", writes_then_refuses)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), ErrorCode::InvalidStateTransition);
    let written: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('written_by_the_effect')::text")
            .fetch_one(&db)
            .await
            .unwrap();
    assert_eq!(written, None, "the effect's write was rolled back");

    // The error itself is the key's answer: replayed, and the effect does not run again.
    let replay = request()
        .await
        .run(
            &db,
            principal,
            b"body",
            async |_: &mut sqlx::PgConnection| {
                panic!("a stored answer must be replayed, not recomputed")
            },
        )
        .await
        .unwrap_err();
    assert_eq!(replay.code(), ErrorCode::InvalidStateTransition);
    assert!(
        replay
            .headers()
            .iter()
            .any(|(name, value)| name == "idempotent-replayed" && value == "true")
    );
}
