//! The OpenAPI document, its committed copy, and the offline docs page (C1, C2).

use reqwest::StatusCode;
use serde_json::Value;
use sqlx::PgPool;

use crate::harness::TestApp;

#[test]
fn the_committed_openapi_json_matches_the_code() {
    let generated = service::app::openapi_document().to_pretty_json().unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json");
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed.trim_end() == generated.trim_end(),
        "openapi.json is out of date; regenerate it with `cargo run -- openapi > openapi.json` and commit it"
    );
}

#[test]
fn every_operation_documents_its_error_responses() {
    let doc: Value = serde_json::to_value(service::app::openapi_document()).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.contains_key("/livez") && paths.contains_key("/readyz"));
    for (path, item) in paths {
        for (method, operation) in item.as_object().unwrap() {
            let responses = operation["responses"].as_object().unwrap();
            let takes_body = operation.get("requestBody").is_some();
            let has_path_id = operation["parameters"]
                .as_array()
                .is_some_and(|parameters| parameters.iter().any(|p| p["in"] == "path"));
            // Public operations carry `security: []`, protected ones the bearer scheme.
            let protected = operation["security"]
                .as_array()
                .is_some_and(|schemes| !schemes.is_empty());
            let expected = [
                ("500", true),
                ("503", true),
                ("429", path.starts_with("/v1/")),
                ("400", takes_body || has_path_id),
                ("413", takes_body),
                ("415", takes_body),
                ("422", takes_body),
                ("404", has_path_id),
                ("401", protected),
            ];
            for (status, _) in expected.into_iter().filter(|(_, when)| *when) {
                if path == "/readyz" && status == "503" {
                    continue; // Its 503 is the health report, not a problem.
                }
                let schema = &responses
                    .get(status)
                    .unwrap_or_else(|| panic!("{method} {path} documents no {status}"))["content"]
                    ["application/problem+json"]["schema"]["$ref"];
                assert_eq!(
                    schema, "#/components/schemas/ProblemDocument",
                    "{method} {path} {status}"
                );
            }
        }
    }
    // Protected operations are the ones `auth::PUBLIC_ROUTES` leaves out.
    assert_eq!(
        paths["/v1/orders"]["get"]["security"][0]["bearer"],
        serde_json::json!([])
    );
    assert_eq!(
        paths["/v1/auth/token"]["post"]["security"],
        serde_json::json!([])
    );
}

#[sqlx::test]
async fn the_served_document_is_the_generated_one(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let served: Value = app.get("/openapi.json").await.json().await.unwrap();
    assert_eq!(
        served,
        serde_json::to_value(service::app::openapi_document()).unwrap()
    );
}

#[sqlx::test]
async fn the_docs_page_works_without_the_internet(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let page = app.get("/docs/").await;
    assert_eq!(page.status(), StatusCode::OK);
    let html = page.text().await.unwrap();

    // Every asset the page references is served by the binary itself.
    for asset in [
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "swagger-initializer.js",
    ] {
        assert!(html.contains(asset), "{asset} referenced");
        let response = app.get(&format!("/docs/{asset}")).await;
        assert_eq!(response.status(), StatusCode::OK, "{asset} served");
    }
    let initializer = app
        .get("/docs/swagger-initializer.js")
        .await
        .text()
        .await
        .unwrap();
    assert!(initializer.contains("/openapi.json"));
    assert!(
        initializer.contains(r#""validatorUrl": "none""#)
            || initializer.contains(r#""validatorUrl":"none""#),
        "{initializer}"
    );
    assert!(
        !html.contains("https://") && !initializer.contains("https://"),
        "no external URLs"
    );
}

#[sqlx::test]
async fn every_error_code_has_a_catalogue_entry(db: PgPool) {
    let app = TestApp::spawn(db).await;
    let page = app.get("/docs/errors").await.text().await.unwrap();
    for code in service::problem::ErrorCode::ALL {
        assert!(
            page.contains(&format!("id=\"{}\"", code.as_str())),
            "{code:?}"
        );
    }
}

#[test]
fn the_readme_catalogue_lists_every_error_code() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for code in service::problem::ErrorCode::ALL {
        let row = format!("| {} | `{}` |", code.status().as_u16(), code.as_str());
        assert!(readme.contains(&row), "README.md's error table lacks {row}");
    }
}
