//! Users: roles, normalised unique e-mails, argon2id hashes (S3).

use service::auth::password::Password;
use service::users::{self, CreateUserError, Email, Role};
use sqlx::PgPool;
use tokio::task::JoinSet;

use crate::harness::{TEST_PASSWORD, TestApp};

#[sqlx::test]
async fn a_created_user_has_its_role_and_an_argon2id_hash(db: PgPool) {
    let app = TestApp::spawn(db).await;
    for role in [Role::Customer, Role::Admin] {
        let user = app.create_user(role).await;
        let (email, stored_role, hash): (String, String, String) =
            sqlx::query_as("SELECT email, role, password_hash FROM users WHERE id = $1")
                .bind(user.id)
                .fetch_one(&app.db)
                .await
                .unwrap();
        assert_eq!(email, user.email.as_str());
        assert_eq!(stored_role, user.role.as_str());
        assert!(hash.starts_with("$argon2id$") && !hash.contains(TEST_PASSWORD));
    }
}

#[sqlx::test]
async fn concurrent_creates_of_one_email_make_exactly_one_user(db: PgPool) {
    // Spellings that normalise to one address, racing: the unique constraint, not a prior
    // SELECT, decides the winner.
    let mut attempts = JoinSet::new();
    for spelling in [
        "race@example.com",
        "RACE@example.com",
        " Race@Example.com",
        "race@EXAMPLE.com",
    ]
    .repeat(3)
    {
        let db = db.clone();
        attempts.spawn(async move {
            let email = Email::parse(spelling).unwrap();
            users::create(
                &db,
                &email,
                Role::Customer,
                Password::parse(TEST_PASSWORD.into()).unwrap(),
            )
            .await
        });
    }
    let outcomes = attempts.join_all().await;
    let created = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
    let taken = outcomes
        .iter()
        .filter(|outcome| matches!(outcome, Err(CreateUserError::EmailTaken(_))))
        .count();
    assert_eq!((created, taken), (1, 11));

    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM users")
        .fetch_one(&db)
        .await
        .unwrap();
    assert_eq!(count, 1);
}
