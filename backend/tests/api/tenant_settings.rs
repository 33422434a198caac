//! Tenant settings: the HTTP allow-list, its validation, who may change it, and its effect on
//! `http:` tasks.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

fn settings(m: &Member) -> String {
    format!("/api/v1/t/{}/settings", m.tenant)
}

async fn patch(app: &TestApp, m: &Member, body: Value) -> reqwest::Response {
    app.call(Method::PATCH, &settings(m), Some(&m.token), Some(body)).await
}

async fn allow_list(app: &TestApp, m: &Member) -> Value {
    let r = app.get(&settings(m), &m.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    v["http_allow"].clone()
}

#[actix_web::test]
async fn admins_set_the_allow_list_in_canonical_form_and_the_change_is_audited() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("net")).await;
    assert_eq!(allow_list(&app, &admin).await, json!([]));

    let entries =
        json!(["127.0.0.1", "10.0.0.0/8", "FD00::/8", "127.0.0.1/32", "Build.Corp.Example.", "*.svc.corp.example"]);
    let r = patch(&app, &admin, json!({ "http_allow": entries })).await;
    assert_eq!(r.status(), StatusCode::OK);
    let want = json!(["127.0.0.1/32", "10.0.0.0/8", "fd00::/8", "build.corp.example", "*.svc.corp.example"]);
    assert_eq!(r.json::<Value>().await.unwrap()["http_allow"], want);
    assert_eq!(allow_list(&app, &admin).await, want);
    // Fields left out stay as they are.
    let r = patch(&app, &admin, json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(allow_list(&app, &admin).await, want);

    let r = app.get(&format!("/api/v1/t/{}/audit?action=tenant.update", admin.tenant), &admin.token).await;
    let page: Value = r.json().await.unwrap();
    let events = page["items"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{page:#}");
    assert_eq!(events[0]["outcome"], "allow");
    assert_eq!(events[0]["actor_id"], admin.user_id.as_str());
    assert_eq!(events[0]["details"]["http_allow"], json!({ "from": [], "to": want }));

    // Clearing it.
    let r = patch(&app, &admin, json!({ "http_allow": [] })).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(allow_list(&app, &admin).await, json!([]));
}

#[actix_web::test]
async fn bad_entries_are_refused_naming_the_entry() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("net")).await;
    patch(&app, &admin, json!({ "http_allow": ["192.168.0.0/16"] })).await;
    for (entry, says) in [
        ("intranet_example.com", "is not an IP address, CIDR or host name"),
        ("*.com", "top-level domain"),
        ("http://10.0.0.1/", "not an IP address"),
        ("10.1.2.3/8", "the network is `10.0.0.0/8`"),
        ("10.0.0.0/33", "1 to 32"),
        ("0.0.0.0/0", "every address"),
        ("10.0.0.1 ", "spaces"),
        ("", "empty"),
    ] {
        let r = patch(&app, &admin, json!({ "http_allow": ["127.0.0.1", entry] })).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{entry:?}");
        let p = problem(r).await;
        assert_eq!(p["errors"][0]["field"], "http_allow[1]", "{p}");
        let message = p["errors"][0]["message"].as_str().unwrap();
        assert!(message.contains(says), "{entry:?}: {message}");
        if !entry.is_empty() {
            assert!(message.contains(&format!("`{entry}`")), "{message}");
        }
    }
    let many: Vec<String> = (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
    let r = patch(&app, &admin, json!({ "http_allow": many })).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem(r).await["errors"][0]["field"], "http_allow");
    // Wrong shapes and unknown fields are not silently ignored.
    let r = patch(&app, &admin, json!({ "http_allow": "10.0.0.0/8" })).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = patch(&app, &admin, json!({ "http_alow": ["10.0.0.0/8"] })).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Nothing changed.
    assert_eq!(allow_list(&app, &admin).await, json!(["192.168.0.0/16"]));
}

#[actix_web::test]
async fn members_read_it_only_admins_change_it_and_other_tenants_see_nothing() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("net")).await;
    patch(&app, &admin, json!({ "http_allow": ["10.20.0.0/16"] })).await;
    let editor = app.add_member(&admin, &["editors"]).await;
    let (_, editor_token) = app.create_token(&admin, &["editors"]).await;

    // Pipeline authors see what their HTTP tasks may reach.
    assert_eq!(allow_list(&app, &editor).await, json!(["10.20.0.0/16"]));
    let r = patch(&app, &editor, json!({ "http_allow": ["10.0.0.0/8"] })).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = app.call(Method::PATCH, &settings(&editor), Some(&editor_token), Some(json!({ "http_allow": [] }))).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = app.get(&format!("/api/v1/t/{}/audit?action=tenant.update&outcome=deny", admin.tenant), &admin.token).await;
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 2, "{page:#}");

    // Another tenant's admin: 404, on reading and on changing.
    let other = app.signup(&slug("other")).await;
    let foreign = format!("/api/v1/t/{}/settings", admin.tenant);
    let r = app.get(&foreign, &other.token).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let r = app.call(Method::PATCH, &foreign, Some(&other.token), Some(json!({ "http_allow": ["10.0.0.0/8"] }))).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(!r.text().await.unwrap().contains("10.20.0.0"));
    assert_eq!(allow_list(&app, &admin).await, json!(["10.20.0.0/16"]));
    assert_eq!(allow_list(&app, &other).await, json!([]));
}

/// A loopback HTTP server that answers every request with `200 pong`; returns its port.
async fn loopback_server() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    actix_web::rt::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            actix_web::rt::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\npong")
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

#[actix_web::test]
async fn an_http_task_reaches_a_loopback_address_only_once_the_tenant_allow_lists_it() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("net")).await;
    let port = loopback_server().await;
    let yaml = format!(
        "stages:\n  - id: s\n    tasks:\n      - id: call\n        http: {{ method: GET, url: \"http://127.0.0.1:{port}/ping\", expect_status: [200] }}\n"
    );
    assert_eq!(app.create_pipeline(&admin, "ping", &yaml).await.status(), StatusCode::CREATED);
    let runs = format!("/api/v1/t/{}/pipelines/ping/runs", admin.tenant);
    let start = || async {
        let r = app.post(&runs, &admin.token, json!({})).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let v: Value = r.json().await.unwrap();
        wait_run(&app, &admin, v["id"].as_str().unwrap(), 60).await
    };

    let refused = start().await;
    assert_eq!(refused["status"], "failed", "{refused:#}");
    let message = task_of(&refused, "call")["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("127.0.0.1") && message.contains("refused"), "{message}");

    // Allow-listing another loopback network is not enough.
    assert_eq!(patch(&app, &admin, json!({ "http_allow": ["127.0.0.2/32"] })).await.status(), StatusCode::OK);
    assert_eq!(start().await["status"], "failed");

    assert_eq!(patch(&app, &admin, json!({ "http_allow": ["127.0.0.1/32"] })).await.status(), StatusCode::OK);
    let allowed = start().await;
    assert_eq!(allowed["status"], "succeeded", "{allowed:#}");
    assert_eq!(task_of(&allowed, "call")["status"], "succeeded");

    // Another tenant's allow-list does not apply here.
    let other = app.signup(&slug("other")).await;
    assert_eq!(app.create_pipeline(&other, "ping", &yaml).await.status(), StatusCode::CREATED);
    let r = app.post(&format!("/api/v1/t/{}/pipelines/ping/runs", other.tenant), &other.token, json!({})).await;
    let v: Value = r.json().await.unwrap();
    let done = wait_run(&app, &other, v["id"].as_str().unwrap(), 60).await;
    assert_eq!(done["status"], "failed", "{done:#}");
}
