//! The README's walk-through, end to end.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::*;

#[actix_web::test]
async fn signup_login_pipeline_versions_diff_token_audit() {
    let app = spawn_app().await;
    let t = slug("acme");
    let admin = app.signup(&t).await;

    let r = app.create_pipeline(&admin, "deploy-api", PIPELINE).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let v1: Value = r.json().await.unwrap();
    assert_eq!(v1["version"], 1);

    let v2_yaml = PIPELINE.replace("cargo test", "cargo test --all");
    let r = app
        .put(
            &format!("/api/v1/t/{t}/pipelines/deploy-api"),
            &admin.token,
            json!({ "definition": v2_yaml, "message": "test everything", "base_version": 1 }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let v2: Value = r.json().await.unwrap();
    assert_eq!(v2["version"], 2);
    assert_ne!(v1["sha256"], v2["sha256"]);

    let r = app.get(&format!("/api/v1/t/{t}/pipelines/deploy-api/diff?from=1&to=2"), &admin.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let d: Value = r.json().await.unwrap();
    assert!(d["unified"].as_str().unwrap().contains("+        shell: \"cargo test --all\""), "{d}");
    assert_eq!(d["tasks"]["changed"], json!(["test"]));

    let (_, token) = app.create_token(&admin, &["viewers"]).await;
    assert!(token.starts_with("slc_") && token.len() == 42);
    let r = app.get(&format!("/api/v1/t/{t}/pipelines"), &token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let list: Value = r.json().await.unwrap();
    assert_eq!(list["items"][0]["name"], "deploy-api");

    let r = app.get(&format!("/api/v1/t/{t}/audit"), &admin.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let audit: Value = r.json().await.unwrap();
    let actions: Vec<&str> = audit["items"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["token.create", "pipeline.update", "pipeline.create", "auth.login", "tenant.create"]);
    let r = app.get(&format!("/api/v1/t/{t}/audit/verify"), &admin.token).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["events"], 5);
}
