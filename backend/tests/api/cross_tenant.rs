//! Broken object-level authorization: every tenant route, generated from the route table, called
//! with another tenant's credentials on this tenant's real objects answers 404 and leaks nothing.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_backend::api::route_table;

use crate::helpers::*;

/// Tenant A: everything a cross-tenant caller could aim at.
struct TenantA {
    admin: Member,
    member: Member,
    token_id: String,
    token: String,
    pipeline: String,
    group: String,
    run_id: String,
    secret: String,
    secret_value: String,
}

/// How to call one route: the path parameters come from [`TenantA`], the rest from here.
struct Case {
    query: &'static str,
    body: Option<Value>,
}

fn token_body() -> Value {
    let expires = (chrono::Utc::now() + chrono::Duration::days(7)).to_rfc3339();
    json!({ "name": "stolen", "expires_at": expires, "groups": ["admins"] })
}

/// A plausible, valid request for every tenant route. A route missing here fails the test: new
/// routes must be added to the matrix.
fn case(method: &str, path: &str, a: &TenantA) -> Option<Case> {
    let tail = path.strip_prefix("/api/v1/t/{tenant}")?;
    let none = |query| Some(Case { query, body: None });
    let with = |body: Value| Some(Case { query: "", body: Some(body) });
    let yaml = PIPELINE.replace("cargo test", "cargo test --hijacked");
    match (method, tail) {
        ("GET", "") => none(""),
        ("GET", "/members") => none(""),
        ("POST", "/members") => {
            with(json!({ "email": "intruder@b.example", "groups": ["admins"], "password": PASSWORD }))
        }
        ("PATCH", "/members/{user_id}") => with(json!({ "groups": [] })),
        ("DELETE", "/members/{user_id}") => none(""),
        ("GET", "/groups") => none(""),
        ("POST", "/groups") => with(json!({ "name": "intruders", "description": "" })),
        ("GET", "/settings") => none(""),
        ("PATCH", "/settings") => with(json!({ "http_allow": ["10.0.0.0/8"] })),
        ("GET", "/tokens") => none(""),
        ("POST", "/tokens") => with(token_body()),
        ("DELETE", "/tokens/{token_id}") => none(""),
        ("GET", "/policies") => none(""),
        ("PUT", "/policies") => with(json!({ "text": "permit (principal, action, resource);", "message": "open up" })),
        ("GET", "/policies/versions") => none(""),
        ("GET", "/policies/versions/{version}") => none(""),
        ("GET", "/pipelines") => none("?include_archived=true"),
        ("POST", "/pipelines") => with(json!({ "name": a.pipeline, "definition": yaml, "message": "mine now" })),
        ("GET", "/pipelines/{pipeline}") => none(""),
        ("PUT", "/pipelines/{pipeline}") => with(json!({ "definition": yaml, "message": "hijack", "base_version": 2 })),
        ("POST", "/pipelines/{pipeline}/archive") => none(""),
        ("GET", "/pipelines/{pipeline}/versions") => none(""),
        ("GET", "/pipelines/{pipeline}/versions/{version}") => none(""),
        ("GET", "/pipelines/{pipeline}/diff") => none("?from=1&to=2"),
        ("POST", "/pipelines/{pipeline}/versions/{version}/restore") => with(json!({ "message": "roll back" })),
        ("GET", "/audit") => none("?limit=200"),
        ("GET", "/audit/verify") => none(""),
        ("GET", "/audit/export") => none(""),
        ("POST", "/pipelines/{pipeline}/runs") => with(json!({ "params": {} })),
        ("GET", "/runs") => none("?limit=200"),
        ("GET", "/runs/{run_id}") => none(""),
        ("POST", "/runs/{run_id}/cancel") => none(""),
        ("POST", "/runs/{run_id}/retry") => none(""),
        ("GET", "/runs/{run_id}/tasks/{task}/logs") => none(""),
        ("GET", "/runs/{run_id}/events") => none(""),
        ("GET", "/events") => none(""),
        ("GET", "/secrets") => none(""),
        ("PUT", "/secrets/{name}") => with(json!({ "value": "overwritten-by-b" })),
        ("GET", "/secrets/{name}") => none(""),
        ("DELETE", "/secrets/{name}") => none(""),
        ("POST", "/pipelines/{pipeline}/webhook") => none(""),
        ("DELETE", "/pipelines/{pipeline}/webhook") => none(""),
        ("GET", "/workers") => none(""),
        _ => None,
    }
}

/// The concrete path of a route template for tenant A; panics on a parameter it cannot fill.
fn concrete(template: &str, a: &TenantA) -> String {
    let mut out = String::new();
    for seg in template.split('/').skip(1) {
        out.push('/');
        let value = match seg {
            "{tenant}" => a.admin.tenant.as_str(),
            "{user_id}" => a.member.user_id.as_str(),
            "{token_id}" => a.token_id.as_str(),
            "{pipeline}" => a.pipeline.as_str(),
            // Versions 1 and 2 exist for both the pipeline and (after setup) the policies.
            "{version}" => "1",
            "{run_id}" => a.run_id.as_str(),
            "{task}" => "quiet",
            "{name}" => a.secret.as_str(),
            s if s.starts_with('{') => panic!("no value for path parameter {s} of {template}"),
            s => s,
        };
        out.push_str(value);
    }
    out
}

/// Strings of tenant A that must never appear in an answer to tenant B.
fn secrets(a: &TenantA) -> Vec<String> {
    vec![
        a.admin.user_id.clone(),
        a.admin.email.clone(),
        a.member.user_id.clone(),
        a.member.email.clone(),
        a.token_id.clone(),
        a.token[..12].to_owned(),
        a.pipeline.clone(),
        a.group.clone(),
        a.run_id.clone(),
        a.secret.clone(),
        a.secret_value.clone(),
        a.admin.tenant.to_uppercase(),
        a.admin.tenant.clone(),
    ]
}

async fn setup_a(app: &TestApp) -> TenantA {
    let t = slug("alpha");
    let admin = app.signup(&t).await;
    let pipeline = format!("confidential-{}", &t[6..]);
    let r = app.create_pipeline(&admin, &pipeline, PIPELINE).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app
        .put(
            &format!("/api/v1/t/{t}/pipelines/{pipeline}"),
            &admin.token,
            json!({ "definition": PIPELINE.replace("cargo build", "cargo build --release"), "base_version": 1 }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let member = app.add_member(&admin, &["editors"]).await;
    let (token_id, token) = app.create_token(&admin, &["admins"]).await;
    let group = format!("hush-{}", &t[6..]);
    let r = app
        .post(&format!("/api/v1/t/{t}/groups"), &admin.token, json!({ "name": group, "description": "A only" }))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    // A second policy version, so that /policies/versions/{1,2} both exist in A.
    let text = sluice_backend::authz::Authorizer::new().unwrap().default_policy_text().to_owned();
    let r = app
        .put(&format!("/api/v1/t/{t}/policies"), &admin.token, json!({ "text": text, "message": "same again" }))
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    // A run, on a pipeline of its own that does nothing observable.
    let quiet = "stages:\n  - id: only\n    tasks:\n      - id: quiet\n        noop: true\n";
    let r = app.create_pipeline(&admin, &format!("{pipeline}-runs"), quiet).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = app.post(&format!("/api/v1/t/{t}/pipelines/{pipeline}-runs/runs"), &admin.token, json!({})).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    let run_id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    // A secret.
    let secret = format!("HUSH_{}", &t[6..]);
    let secret_value = format!("value-{}", uuid::Uuid::new_v4().simple());
    let r = app.put(&format!("/api/v1/t/{t}/secrets/{secret}"), &admin.token, json!({ "value": secret_value })).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    TenantA { admin, member, token_id, token, pipeline, group, run_id, secret, secret_value }
}

async fn json_of(app: &TestApp, path: &str, token: &str) -> Value {
    let r = app.get(path, token).await;
    assert_eq!(r.status(), StatusCode::OK, "GET {path}");
    r.json().await.unwrap()
}

/// A snapshot of A's state as A's admin sees it.
async fn snapshot(app: &TestApp, a: &TenantA) -> Value {
    let t = &a.admin.tenant;
    let tok = &a.admin.token;
    let mut tokens = json_of(app, &format!("/api/v1/t/{t}/tokens"), tok).await;
    for k in tokens.as_array_mut().unwrap() {
        k.as_object_mut().unwrap().remove("last_used_at");
    }
    json!({
        "tenant": json_of(app, &format!("/api/v1/t/{t}"), tok).await,
        "members": json_of(app, &format!("/api/v1/t/{t}/members"), tok).await,
        "groups": json_of(app, &format!("/api/v1/t/{t}/groups"), tok).await,
        "tokens": tokens,
        "policies": json_of(app, &format!("/api/v1/t/{t}/policies/versions"), tok).await,
        "pipelines": json_of(app, &format!("/api/v1/t/{t}/pipelines?include_archived=true"), tok).await,
        "versions": json_of(app, &format!("/api/v1/t/{t}/pipelines/{}/versions", a.pipeline), tok).await,
        "secrets": json_of(app, &format!("/api/v1/t/{t}/secrets"), tok).await,
    })
}

#[actix_web::test]
async fn other_tenants_admin_gets_404_on_every_tenant_route() {
    let app = spawn_app().await;
    let a = setup_a(&app).await;
    let b = app.signup(&slug("bravo")).await;
    let (_, b_token) = app.create_token(&b, &["admins"]).await;
    let before = snapshot(&app, &a).await;
    let audit_before = json_of(&app, &format!("/api/v1/t/{}/audit/verify", a.admin.tenant), &a.admin.token).await;
    assert_eq!(audit_before["ok"], true);

    let secrets = secrets(&a);
    let mut missing = vec![];
    let mut failures = vec![];
    let mut calls = 0;
    for route in route_table().into_iter().filter(|r| r.path.starts_with("/api/v1/t/{tenant}")) {
        let Some(c) = case(route.method.as_str(), route.path, &a) else {
            missing.push(format!("{} {}", route.method, route.path));
            continue;
        };
        let path = format!("{}{}", concrete(route.path, &a), c.query);
        let method = Method::from_bytes(route.method.as_str().as_bytes()).unwrap();
        for (kind, cred) in [("JWT", b.token.as_str()), ("API token", b_token.as_str())] {
            calls += 1;
            let r = app.call(method.clone(), &path, Some(cred), c.body.clone()).await;
            let status = r.status();
            let ct = r.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
            let text = r.text().await.unwrap();
            let what = format!("{} {path} as B's admin ({kind})", route.method);
            if status != StatusCode::NOT_FOUND || !ct.starts_with("application/problem+json") {
                failures.push(format!("{what}: {status} {ct} {text}"));
                continue;
            }
            let body: Value = serde_json::from_str(&text).unwrap();
            if body["type"] != "urn:sluice:problem:not-found" || body["status"] != 404 {
                failures.push(format!("{what}: wrong problem {body}"));
            }
            let lower = text.to_lowercase();
            for s in &secrets {
                if lower.contains(&s.to_lowercase()) {
                    failures.push(format!("{what}: body leaks {s:?}: {text}"));
                }
            }
        }
    }
    assert!(missing.is_empty(), "tenant routes without a cross-tenant case (add them to `case`): {missing:#?}");
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(calls >= 50, "only {calls} calls");

    // Nothing of A changed, and nothing of B's reached A's audit log.
    let after = snapshot(&app, &a).await;
    assert_eq!(before, after);
    assert_eq!(after["pipelines"]["items"][0]["latest_version"], 2);
    assert_eq!(after["pipelines"]["items"][0]["archived_at"], Value::Null);
    assert!(after["members"].as_array().unwrap().iter().any(|m| m["user_id"] == a.member.user_id.as_str()));
    assert_eq!(after["tenant"]["policy_version"], 2);
    let audit_after = json_of(&app, &format!("/api/v1/t/{}/audit/verify", a.admin.tenant), &a.admin.token).await;
    assert_eq!(audit_after["ok"], true);
    assert_eq!(audit_after["events"], audit_before["events"], "B's calls left traces in A's audit log");
    // A's token and A's member still work.
    let r = app.get(&format!("/api/v1/t/{}/pipelines/{}", a.admin.tenant, a.pipeline), &a.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["version"], 2);
    let r = app.get(&format!("/api/v1/t/{}", a.admin.tenant), &a.member.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    // B got nothing either: no pipeline, group or member of those names in B.
    let bp = json_of(&app, &format!("/api/v1/t/{}/pipelines?include_archived=true", b.tenant), &b.token).await;
    assert_eq!(bp["items"], json!([]));
}

#[actix_web::test]
async fn unknown_tenant_and_non_member_answer_alike() {
    let app = spawn_app().await;
    let a = setup_a(&app).await;
    let b = app.signup(&slug("bravo")).await;
    let r1 = app.get(&format!("/api/v1/t/{}/pipelines", a.admin.tenant), &b.token).await;
    let r2 = app.get("/api/v1/t/no-such-tenant-zz/pipelines", &b.token).await;
    assert_eq!(r1.status(), StatusCode::NOT_FOUND);
    assert_eq!(r2.status(), StatusCode::NOT_FOUND);
    let (p1, p2) = (problem(r1).await, problem(r2).await);
    assert_eq!(p1, p2, "a foreign tenant must look exactly like a missing one");
}

#[actix_web::test]
async fn me_never_lists_other_tenants() {
    let app = spawn_app().await;
    let a = setup_a(&app).await;
    let b = app.signup(&slug("bravo")).await;
    let (b_token_id, b_token) = app.create_token(&b, &["viewers"]).await;
    for (kind, cred) in [("JWT", b.token.as_str()), ("API token", b_token.as_str())] {
        let r = app.get("/api/v1/me", cred).await;
        assert_eq!(r.status(), StatusCode::OK, "{kind}");
        let text = r.text().await.unwrap();
        let me: Value = serde_json::from_str(&text).unwrap();
        let tenants: Vec<&str> =
            me["memberships"].as_array().unwrap().iter().map(|m| m["tenant"].as_str().unwrap()).collect();
        assert_eq!(tenants, [b.tenant.as_str()], "{kind}: {me}");
        assert_eq!(me["user_id"], b.user_id.as_str(), "{kind}");
        for s in secrets(&a) {
            assert!(!text.to_lowercase().contains(&s.to_lowercase()), "{kind}: /me leaks {s:?}: {text}");
        }
        if kind == "API token" {
            assert_eq!(me["token_id"], b_token_id.as_str());
            assert_eq!(me["memberships"][0]["groups"], json!(["viewers"]));
        }
    }
    // A's own view lists only A.
    let me = json_of(&app, "/api/v1/me", &a.admin.token).await;
    let tenants: Vec<&str> =
        me["memberships"].as_array().unwrap().iter().map(|m| m["tenant"].as_str().unwrap()).collect();
    assert_eq!(tenants, [a.admin.tenant.as_str()]);
}

#[actix_web::test]
async fn a_token_of_one_tenant_is_useless_in_another_even_for_a_member_of_both() {
    let app = spawn_app().await;
    let a = setup_a(&app).await;
    let b = app.signup(&slug("bravo")).await;
    // B's admin is also made a member of A; B's token must still not reach A.
    let r = app
        .post(
            &format!("/api/v1/t/{}/members", a.admin.tenant),
            &a.admin.token,
            json!({ "email": b.email, "groups": ["admins"] }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    let (_, b_token) = app.create_token(&b, &["admins"]).await;
    let r = app.get(&format!("/api/v1/t/{}/pipelines/{}", a.admin.tenant, a.pipeline), &b_token).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let body = problem(r).await;
    assert_eq!(body["type"], "urn:sluice:problem:not-found");
    // ...while the same person's JWT, now a member of A, does.
    let r = app.get(&format!("/api/v1/t/{}/pipelines/{}", a.admin.tenant, a.pipeline), &b.token).await;
    assert_eq!(r.status(), StatusCode::OK);
}
