//! API-wide conventions: body limits, problem documents, request ids, health, authentication
//! challenge and pagination.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

fn pipelines(member: &Member) -> String {
    format!("/api/v1/t/{}/pipelines", member.tenant)
}

async fn assert_problem(r: reqwest::Response, status: StatusCode, kind: &str) -> Value {
    assert_eq!(r.status(), status);
    let p = problem(r).await;
    assert_eq!(p["type"], format!("urn:sluice:problem:{kind}"), "{p}");
    assert_eq!(p["status"], status.as_u16(), "{p}");
    assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
    assert!(p["detail"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
    p
}

#[actix_web::test]
async fn oversized_bodies_are_refused_with_413() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("big")).await;
    // A 2 MiB definition inside a valid JSON body.
    let big = format!("{PIPELINE}#{}", "x".repeat(2 * 1024 * 1024));
    let r = app.post(&pipelines(&admin), &admin.token, json!({ "name": "big", "definition": big })).await;
    let p = assert_problem(r, StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large").await;
    assert!(p["detail"].as_str().unwrap().contains("1048576"), "{p}");
    // A 10 MiB body, on a JSON route and on a raw-bytes route (restore).
    let huge = format!("{{\"name\":\"huge\",\"definition\":\"{}\"}}", "y".repeat(10 * 1024 * 1024));
    let r = app
        .client
        .post(app.url(&pipelines(&admin)))
        .bearer_auth(&admin.token)
        .header("content-type", "application/json")
        .body(huge.clone())
        .send()
        .await
        .unwrap();
    assert_problem(r, StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large").await;
    let r = app.create_pipeline(&admin, "small", PIPELINE).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .client
        .post(app.url(&format!("{}/small/versions/1/restore", pipelines(&admin))))
        .bearer_auth(&admin.token)
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_problem(r, StatusCode::PAYLOAD_TOO_LARGE, "payload-too-large").await;
    // Nothing was stored.
    let r = app.get(&pipelines(&admin), &admin.token).await;
    let list: Value = r.json().await.unwrap();
    let names: Vec<&str> = list["items"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["small"]);
    let r = app.get(&format!("{}/small", pipelines(&admin)), &admin.token).await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["latest_version"], 1);
}

#[actix_web::test]
async fn malformed_json_and_wrong_types_are_400() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("bad")).await;
    let raw = |body: &'static str| {
        app.client
            .post(app.url(&pipelines(&admin)))
            .bearer_auth(&admin.token)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = raw("{\"name\": \"x\", \"definition\": ").await.unwrap();
    let p = assert_problem(r, StatusCode::BAD_REQUEST, "bad-request").await;
    assert!(p["detail"].as_str().unwrap().contains("JSON"), "{p}");
    let r = raw("not json at all").await.unwrap();
    assert_problem(r, StatusCode::BAD_REQUEST, "bad-request").await;
    // A missing field is named.
    let r = app.post(&pipelines(&admin), &admin.token, json!({ "name": "ok-name" })).await;
    let p = assert_problem(r, StatusCode::BAD_REQUEST, "bad-request").await;
    assert!(p.to_string().contains("definition"), "{p}");
    // Wrong type in the query string.
    let r = app.get(&format!("{}?limit=lots", pipelines(&admin)), &admin.token).await;
    assert_problem(r, StatusCode::BAD_REQUEST, "bad-request").await;
    // Nothing was created by the bad requests.
    let list: Value = app.get(&pipelines(&admin), &admin.token).await.json().await.unwrap();
    assert_eq!(list["items"], json!([]), "{list}");
}

#[actix_web::test]
async fn wrong_json_type_names_the_field() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("typ")).await;
    let r = app.create_pipeline(&admin, "p1", PIPELINE).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let restore = format!("{}/p1/versions/1/restore", pipelines(&admin));
    for (path, body, field) in [
        (pipelines(&admin), json!({ "name": "ok-name", "definition": 42 }), "definition"),
        (pipelines(&admin), json!({ "name": ["a"], "definition": PIPELINE }), "name"),
        (restore, json!({ "message": 5 }), "message"),
    ] {
        let r = app.post(&path, &admin.token, body.clone()).await;
        let p = assert_problem(r, StatusCode::BAD_REQUEST, "bad-request").await;
        let named = p["errors"].as_array().is_some_and(|es| es.iter().any(|e| e["field"] == field))
            || p["detail"].as_str().unwrap().contains(&format!("`{field}`"))
            || p["detail"].as_str().unwrap().contains(&format!("{field}:"));
        assert!(named, "{body}: the problem does not name `{field}`: {p}");
    }
    let r = app.get(&format!("{}/p1", pipelines(&admin)), &admin.token).await;
    assert_eq!(r.json::<Value>().await.unwrap()["latest_version"], 1);
}

#[actix_web::test]
async fn unknown_routes_are_404_problems() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("nf")).await;
    for (method, path) in [
        (Method::GET, "/api/v1/nope".to_owned()),
        (Method::GET, "/".to_owned()),
        (Method::POST, "/api/v2/t/x/pipelines".to_owned()),
        (Method::GET, format!("/api/v1/t/{}/nothing-here", admin.tenant)),
    ] {
        let r = app.call(method.clone(), &path, Some(&admin.token), None).await;
        assert!(r.headers().contains_key("x-request-id"), "{method} {path}");
        assert_problem(r, StatusCode::NOT_FOUND, "not-found").await;
    }
    // A path parameter of the wrong shape is a 404 too, not a 400 or 500.
    let r = app
        .call(Method::DELETE, &format!("/api/v1/t/{}/members/not-a-uuid", admin.tenant), Some(&admin.token), None)
        .await;
    assert_problem(r, StatusCode::NOT_FOUND, "not-found").await;
}

#[actix_web::test]
async fn request_ids() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("rid")).await;
    let mut seen = std::collections::HashSet::new();
    for (method, path, token) in [
        (Method::GET, "/healthz".to_owned(), None),
        (Method::GET, "/api/v1/nope".to_owned(), None),
        (Method::GET, pipelines(&admin), None),
        (Method::GET, pipelines(&admin), Some(admin.token.as_str())),
        (Method::POST, pipelines(&admin), Some(admin.token.as_str())),
    ] {
        let r = app.call(method.clone(), &path, token, None).await;
        let id = r
            .headers()
            .get("x-request-id")
            .unwrap_or_else(|| panic!("{method} {path}: no x-request-id"))
            .to_str()
            .unwrap()
            .to_owned();
        assert!(!id.is_empty() && id.len() <= 64, "{id}");
        assert!(seen.insert(id.clone()), "request id {id} reused");
    }
    // A sane incoming id is echoed and lands in the audit log; an insane one is replaced.
    let r = app
        .client
        .post(app.url(&pipelines(&admin)))
        .bearer_auth(&admin.token)
        .header("x-request-id", "trace-abc_123")
        .json(&json!({ "name": "traced", "definition": PIPELINE }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.headers()["x-request-id"], "trace-abc_123");
    let audit: Value = app
        .get(&format!("/api/v1/t/{}/audit?action=pipeline.create", admin.tenant), &admin.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(audit["items"][0]["request_id"], "trace-abc_123", "{audit}");
    let bad = "x".repeat(65);
    for insane in [bad.as_str(), "has space", "semi;colon"] {
        let r = app.client.get(app.url("/healthz")).header("x-request-id", insane).send().await.unwrap();
        let got = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        assert_ne!(got, insane);
        assert!(!got.is_empty());
    }
}

#[actix_web::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let r = app.call(Method::GET, "/healthz", None, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "status": "ok" }));
    let r = app.call(Method::GET, "/readyz", None, None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({ "status": "ready" }));
}

#[actix_web::test]
async fn tenant_routes_without_credentials_are_401_with_bearer_challenge() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("anon")).await;
    let t = &admin.tenant;
    for (method, path) in [
        (Method::GET, format!("/api/v1/t/{t}")),
        (Method::GET, format!("/api/v1/t/{t}/pipelines")),
        (Method::POST, format!("/api/v1/t/{t}/pipelines")),
        (Method::GET, format!("/api/v1/t/{t}/audit/export")),
        (Method::GET, "/api/v1/t/no-such-tenant/pipelines".to_owned()),
        (Method::GET, "/api/v1/me".to_owned()),
    ] {
        let r = app.call(method.clone(), &path, None, None).await;
        assert_eq!(r.headers().get("www-authenticate").map(|v| v.to_str().unwrap()), Some("Bearer"), "{method} {path}");
        assert_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
    }
    // A garbage credential is the same 401.
    let r = app.get(&format!("/api/v1/t/{t}/pipelines"), "garbage").await;
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_problem(r, StatusCode::UNAUTHORIZED, "unauthorized").await;
}

#[actix_web::test]
async fn limit_and_cursor_are_validated() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("page")).await;
    let t = &admin.tenant;
    for path in [format!("/api/v1/t/{t}/pipelines"), format!("/api/v1/t/{t}/audit")] {
        for bad in ["0", "201"] {
            let r = app.get(&format!("{path}?limit={bad}"), &admin.token).await;
            let p = assert_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation").await;
            assert_eq!(p["errors"][0]["field"], "limit", "{p}");
        }
        for bad in ["!!!", "%E2%82%AC", "_w"] {
            let r = app.get(&format!("{path}?cursor={bad}"), &admin.token).await;
            let p = assert_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation").await;
            assert_eq!(p["errors"][0]["field"], "cursor", "{path} cursor={bad}: {p}");
        }
        for ok in ["1", "200"] {
            let r = app.get(&format!("{path}?limit={ok}"), &admin.token).await;
            assert_eq!(r.status(), StatusCode::OK);
        }
    }
    // A well-formed base64 cursor that is not a sequence number is refused by the audit log.
    let r = app.get(&format!("/api/v1/t/{t}/audit?cursor=YWJj"), &admin.token).await;
    let p = assert_problem(r, StatusCode::UNPROCESSABLE_ENTITY, "validation").await;
    assert_eq!(p["errors"][0]["field"], "cursor");
}

#[actix_web::test]
async fn pagination_returns_every_pipeline_once_in_order() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("pages")).await;
    let names = ["echo", "alpha", "delta", "bravo", "charlie"];
    for n in names {
        let r = app.create_pipeline(&admin, n, PIPELINE).await;
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let mut got: Vec<String> = vec![];
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = cursor.as_ref().map_or(String::new(), |c| format!("&cursor={c}"));
        let r = app.get(&format!("{}?limit=2{q}", pipelines(&admin)), &admin.token).await;
        assert_eq!(r.status(), StatusCode::OK);
        let page: Value = r.json().await.unwrap();
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2, "{page}");
        got.extend(items.iter().map(|p| p["name"].as_str().unwrap().to_owned()));
        pages += 1;
        assert!(pages <= 5, "pagination does not end: {got:?}");
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(got, ["alpha", "bravo", "charlie", "delta", "echo"]);
    assert_eq!(pages, 3);
    // Exactly a page's worth: no dangling cursor to an empty page.
    let r = app.get(&format!("{}?limit=5", pipelines(&admin)), &admin.token).await;
    let page: Value = r.json().await.unwrap();
    assert_eq!(page["items"].as_array().unwrap().len(), 5);
    assert_eq!(page["next_cursor"], Value::Null);
}
