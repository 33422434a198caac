//! Function-level authorization (BFLA), policy changes taking effect at once, policy validation
//! and escalation attempts, and mass assignment.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

fn default_policies() -> String {
    sluice_backend::authz::Authorizer::new().unwrap().default_policy_text().to_owned()
}

fn expires() -> String {
    (chrono::Utc::now() + chrono::Duration::days(7)).to_rfc3339()
}

async fn json_ok(r: reqwest::Response) -> Value {
    let status = r.status();
    let text = r.text().await.unwrap();
    assert!(status.is_success(), "{status}: {text}");
    serde_json::from_str(&text).unwrap()
}

async fn assert_forbidden(r: reqwest::Response, what: &str) {
    assert_eq!(r.status(), StatusCode::FORBIDDEN, "{what}");
    let p = problem(r).await;
    assert_eq!(p["type"], "urn:sluice:problem:forbidden", "{what}: {p}");
    assert_eq!(p["status"], 403);
}

/// Audit events of the tenant matching `query`, oldest first.
async fn audit(app: &TestApp, admin: &Member, query: &str) -> Vec<Value> {
    let r = app.get(&format!("/api/v1/t/{}/audit?limit=200&{query}", admin.tenant), &admin.token).await;
    let mut items = json_ok(r).await["items"].as_array().unwrap().clone();
    items.reverse();
    items
}

/// The admin routes with a valid body and the action each is denied as.
fn admin_routes(t: &str, member_id: &str, token_id: &str) -> Vec<(Method, String, Option<Value>, &'static str)> {
    vec![
        (Method::GET, format!("/api/v1/t/{t}/members"), None, "member.list"),
        (
            Method::POST,
            format!("/api/v1/t/{t}/members"),
            Some(json!({ "email": "new@x.example", "groups": ["admins"], "password": PASSWORD })),
            "member.add",
        ),
        (
            Method::PATCH,
            format!("/api/v1/t/{t}/members/{member_id}"),
            Some(json!({ "groups": ["admins"] })),
            "member.update",
        ),
        (Method::DELETE, format!("/api/v1/t/{t}/members/{member_id}"), None, "member.remove"),
        (Method::GET, format!("/api/v1/t/{t}/groups"), None, "group.list"),
        (Method::POST, format!("/api/v1/t/{t}/groups"), Some(json!({ "name": "escalated" })), "group.create"),
        (Method::GET, format!("/api/v1/t/{t}/tokens"), None, "token.list"),
        (
            Method::POST,
            format!("/api/v1/t/{t}/tokens"),
            Some(json!({ "name": "x", "expires_at": expires(), "groups": ["viewers"] })),
            "token.create",
        ),
        (Method::DELETE, format!("/api/v1/t/{t}/tokens/{token_id}"), None, "token.revoke"),
        (Method::GET, format!("/api/v1/t/{t}/policies"), None, "policy.read"),
        (
            Method::PUT,
            format!("/api/v1/t/{t}/policies"),
            Some(json!({ "text": "permit (principal, action, resource);", "message": "mine" })),
            "policy.update",
        ),
        (Method::GET, format!("/api/v1/t/{t}/policies/versions"), None, "policy.read"),
        (Method::GET, format!("/api/v1/t/{t}/policies/versions/1"), None, "policy.read"),
        (Method::GET, format!("/api/v1/t/{t}/audit"), None, "audit.read"),
        (Method::GET, format!("/api/v1/t/{t}/audit/verify"), None, "audit.read"),
        (Method::GET, format!("/api/v1/t/{t}/audit/export"), None, "audit.export"),
    ]
}

#[actix_web::test]
async fn viewers_are_refused_every_admin_route_and_each_refusal_is_audited() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("bfla")).await;
    let t = admin.tenant.clone();
    let viewer = app.add_member(&admin, &["viewers"]).await;
    let victim = app.add_member(&admin, &["editors"]).await;
    let (victim_token_id, victim_token) = app.create_token(&admin, &["editors"]).await;
    let (viewer_token_id, viewer_token) = app.create_token(&admin, &["viewers"]).await;
    let policy_version =
        json_ok(app.get(&format!("/api/v1/t/{t}"), &admin.token).await).await["policy_version"].clone();

    let routes = admin_routes(&t, &victim.user_id, &victim_token_id);
    for (who, cred, actor_id) in
        [("viewer JWT", &viewer.token, &viewer.user_id), ("viewer token", &viewer_token, &viewer_token_id)]
    {
        for (method, path, body, _) in &routes {
            let r = app.call(method.clone(), path, Some(cred), body.clone()).await;
            assert_forbidden(r, &format!("{who}: {method} {path}")).await;
        }
        let denied = audit(&app, &admin, &format!("outcome=deny&actor={actor_id}")).await;
        let actions: Vec<&str> = denied.iter().map(|e| e["action"].as_str().unwrap()).collect();
        let expected: Vec<&str> = routes.iter().map(|r| r.3).collect();
        assert_eq!(actions, expected, "{who}");
        for e in &denied {
            assert_eq!(e["outcome"], "deny");
            assert_eq!(e["actor_id"], actor_id.as_str());
            assert_eq!(e["actor_type"], if who == "viewer JWT" { "user" } else { "token" });
            assert_eq!(e["details"]["policy_version"], policy_version);
            // Nothing permits these; the only forbid that can apply is the one that keeps tokens
            // from minting tokens.
            let expected = if who == "viewer token" && e["action"] == "token.create" {
                json!(["tokens-never-mint-tokens"])
            } else {
                json!([])
            };
            assert_eq!(e["policy_ids"], expected, "{e}");
        }
    }
    // Nothing happened: the victim is still an editor, their token works, no group or member
    // or token was added, the policies are unchanged.
    let members = json_ok(app.get(&format!("/api/v1/t/{t}/members"), &admin.token).await).await;
    assert_eq!(members.as_array().unwrap().len(), 3);
    let v = members.as_array().unwrap().iter().find(|m| m["user_id"] == victim.user_id.as_str()).unwrap();
    assert_eq!(v["groups"], json!(["editors"]));
    let groups = json_ok(app.get(&format!("/api/v1/t/{t}/groups"), &admin.token).await).await;
    assert!(!groups.to_string().contains("escalated"));
    let tokens = json_ok(app.get(&format!("/api/v1/t/{t}/tokens"), &admin.token).await).await;
    assert_eq!(tokens.as_array().unwrap().len(), 2);
    assert!(tokens.as_array().unwrap().iter().all(|k| k["revoked_at"].is_null()));
    let r = app.get(&format!("/api/v1/t/{t}"), &victim_token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let versions = json_ok(app.get(&format!("/api/v1/t/{t}/policies/versions"), &admin.token).await).await;
    assert_eq!(versions.as_array().unwrap().len(), 1);
}

#[actix_web::test]
async fn viewers_read_pipelines_but_cannot_change_them() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("view")).await;
    let t = admin.tenant.clone();
    assert_eq!(app.create_pipeline(&admin, "build", PIPELINE).await.status(), StatusCode::CREATED);
    let viewer = app.add_member(&admin, &["viewers"]).await;
    let (_, viewer_token) = app.create_token(&admin, &["viewers"]).await;
    for cred in [&viewer.token, &viewer_token] {
        let list = json_ok(app.get(&format!("/api/v1/t/{t}/pipelines"), cred).await).await;
        assert_eq!(list["items"][0]["name"], "build");
        let p = json_ok(app.get(&format!("/api/v1/t/{t}/pipelines/build"), cred).await).await;
        assert_eq!(p["version"], 1);
        json_ok(app.get(&format!("/api/v1/t/{t}/pipelines/build/versions"), cred).await).await;
        json_ok(app.get(&format!("/api/v1/t/{t}/pipelines/build/versions/1"), cred).await).await;
        json_ok(app.get(&format!("/api/v1/t/{t}/pipelines/build/diff?from=1&to=1"), cred).await).await;
        json_ok(app.get(&format!("/api/v1/t/{t}"), cred).await).await;

        let r = app
            .post(&format!("/api/v1/t/{t}/pipelines"), cred, json!({ "name": "mine", "definition": PIPELINE }))
            .await;
        assert_forbidden(r, "viewer creates").await;
        let r = app
            .put(&format!("/api/v1/t/{t}/pipelines/build"), cred, json!({ "definition": PIPELINE, "base_version": 1 }))
            .await;
        assert_forbidden(r, "viewer updates").await;
        let r = app.post(&format!("/api/v1/t/{t}/pipelines/build/versions/1/restore"), cred, json!({})).await;
        assert_forbidden(r, "viewer restores").await;
        let r = app.post(&format!("/api/v1/t/{t}/pipelines/build/archive"), cred, json!({})).await;
        assert_forbidden(r, "viewer archives").await;
    }
    let p = json_ok(app.get(&format!("/api/v1/t/{t}/pipelines/build"), &admin.token).await).await;
    assert_eq!((p["latest_version"].as_i64(), p["archived"].as_bool()), (Some(1), Some(false)));
    let denied = audit(&app, &admin, "outcome=deny").await;
    let actions: Vec<&str> = denied.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(actions, ["pipeline.create", "pipeline.update", "pipeline.update", "pipeline.archive"].repeat(2));
    assert_eq!(denied[1]["resource_id"], "build");
    assert_eq!(denied[1]["resource_type"], "Pipeline");
}

#[actix_web::test]
async fn editors_manage_pipelines_but_not_the_tenant() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("edit")).await;
    let t = admin.tenant.clone();
    let editor = app.add_member(&admin, &["editors"]).await;
    let (_, editor_token) = app.create_token(&admin, &["editors"]).await;
    for (i, cred) in [&editor.token, &editor_token].into_iter().enumerate() {
        let name = format!("by-editor-{i}");
        let r =
            app.post(&format!("/api/v1/t/{t}/pipelines"), cred, json!({ "name": name, "definition": PIPELINE })).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let r = app
            .put(
                &format!("/api/v1/t/{t}/pipelines/{name}"),
                cred,
                json!({ "definition": PIPELINE.replace("cargo test", "cargo test -q"), "base_version": 1 }),
            )
            .await;
        assert_eq!(json_ok(r).await["version"], 2);
        let r = app.post(&format!("/api/v1/t/{t}/pipelines/{name}/versions/1/restore"), cred, json!({})).await;
        assert_eq!(json_ok(r).await["version"], 3);
        let r = app.post(&format!("/api/v1/t/{t}/pipelines/{name}/archive"), cred, json!({})).await;
        assert!(json_ok(r).await["archived_at"].is_string());
        for (method, path, body, _) in admin_routes(&t, &editor.user_id, "00000000-0000-0000-0000-000000000000") {
            if path.contains("/tokens/") {
                continue; // no such token: 404 before authorization
            }
            let r = app.call(method.clone(), &path, Some(cred), body).await;
            assert_forbidden(r, &format!("editor {i}: {method} {path}")).await;
        }
    }
    let members = json_ok(app.get(&format!("/api/v1/t/{t}/members"), &admin.token).await).await;
    assert_eq!(members.as_array().unwrap().len(), 2);
}

#[actix_web::test]
async fn permission_removal_takes_effect_on_the_next_request() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("revoke")).await;
    let t = admin.tenant.clone();
    let viewer = app.add_member(&admin, &["viewers"]).await;
    let (_, viewer_token) = app.create_token(&admin, &["viewers"]).await;
    let other = app.add_member(&admin, &["viewers"]).await;
    let list = format!("/api/v1/t/{t}/pipelines");
    for cred in [&viewer.token, &viewer_token, &other.token] {
        assert_eq!(app.get(&list, cred).await.status(), StatusCode::OK);
    }
    // Drop one member's groups: their very next request is refused, the other viewer's is not.
    let r = app
        .call(
            Method::PATCH,
            &format!("/api/v1/t/{t}/members/{}", other.user_id),
            Some(&admin.token),
            Some(json!({ "groups": [] })),
        )
        .await;
    assert_eq!(json_ok(r).await["groups"], json!([]));
    assert_forbidden(app.get(&list, &other.token).await, "member without groups").await;
    assert_eq!(app.get(&list, &viewer.token).await.status(), StatusCode::OK);

    // Remove the viewers rule: every viewer credential is refused at once.
    let text = default_policies();
    let start = text.find("@id(\"viewers-read\")").unwrap();
    let end = start + text[start..].find(";\n").unwrap() + 2;
    let without = format!("{}{}", &text[..start], &text[end..]);
    assert!(!without.contains("viewers"));
    let r = app
        .put(&format!("/api/v1/t/{t}/policies"), &admin.token, json!({ "text": without, "message": "no more viewers" }))
        .await;
    assert_eq!(json_ok(r).await["version"], 2);
    assert_forbidden(app.get(&list, &viewer.token).await, "viewer JWT after policy change").await;
    assert_forbidden(app.get(&list, &viewer_token).await, "viewer token after policy change").await;
    let denied = audit(&app, &admin, "outcome=deny&action=pipeline.list").await;
    assert_eq!(denied.last().unwrap()["details"]["policy_version"], 2);
    // Putting it back restores access, again immediately.
    let r = app
        .put(&format!("/api/v1/t/{t}/policies"), &admin.token, json!({ "text": text, "message": "viewers again" }))
        .await;
    assert_eq!(json_ok(r).await["version"], 3);
    assert_eq!(app.get(&list, &viewer_token).await.status(), StatusCode::OK);
}

#[actix_web::test]
async fn invalid_policies_are_rejected_with_position_and_nothing_is_stored() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("cedar")).await;
    let t = admin.tenant.clone();
    let defaults = default_policies();
    let cases: Vec<(&str, String)> = vec![
        ("syntax error", "permit (principal, action, resource)\nwhen { true ;".to_owned()),
        ("unknown entity type", "permit (\n  principal == Uzer::\"x\",\n  action,\n  resource\n);".to_owned()),
        ("unknown action", "permit (\n  principal,\n  action == Action::\"pipeline.delete_everything\",\n  resource\n);".to_owned()),
        ("wrong attribute type", "permit (\n  principal,\n  action == Action::\"pipeline.read\",\n  resource\n) when { resource.name && true };".to_owned()),
        ("string vs long", "permit (\n  principal is User,\n  action == Action::\"pipeline.list\",\n  resource\n) when { principal.email < 5 };".to_owned()),
        ("other tenant", format!("{defaults}\n@id(\"escalate\")\npermit (\n  principal,\n  action,\n  resource in Tenant::\"other-tenant\"\n);\n")),
    ];
    for (what, text) in &cases {
        let r =
            app.put(&format!("/api/v1/t/{t}/policies"), &admin.token, json!({ "text": text, "message": what })).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{what}");
        let p = problem(r).await;
        assert_eq!(p["type"], "urn:sluice:problem:validation", "{what}: {p}");
        let e = &p["errors"][0];
        assert_eq!(e["field"], "text", "{what}: {p}");
        let message = e["message"].as_str().unwrap();
        assert!(!message.is_empty(), "{what}: {p}");
        assert!(p["detail"].as_str().unwrap().contains(message), "{what}: {p}");
        let (line, column) = (e["line"].as_u64(), e["column"].as_u64());
        assert!(line.is_some_and(|l| l >= 1) && column.is_some_and(|c| c >= 1), "{what}: no position: {p}");
        let lines = text.lines().count() as u64;
        assert!(line.unwrap() <= lines.max(1), "{what}: line {line:?} outside the text: {p}");
        match *what {
            "unknown entity type" => assert!(message.contains("Uzer"), "{p}"),
            "unknown action" => assert!(message.contains("pipeline.delete_everything"), "{p}"),
            "other tenant" => {
                assert!(message.contains("other-tenant"), "{p}");
                assert!(line.unwrap() > defaults.lines().count() as u64, "{p}");
            }
            // The offending expression is on line 2 or later, not at the start of the text.
            "wrong attribute type" | "string vs long" => assert!(line.unwrap() >= 2, "{p}"),
            _ => {}
        }
    }
    // Nothing was stored: still one version, still policy version 1, defaults in force.
    let versions = json_ok(app.get(&format!("/api/v1/t/{t}/policies/versions"), &admin.token).await).await;
    assert_eq!(versions.as_array().unwrap().len(), 1);
    let tenant = json_ok(app.get(&format!("/api/v1/t/{t}"), &admin.token).await).await;
    assert_eq!(tenant["policy_version"], 1);
    let current = json_ok(app.get(&format!("/api/v1/t/{t}/policies"), &admin.token).await).await;
    assert_eq!(current["text"], defaults.as_str());
    let r = app.get(&format!("/api/v1/t/{t}/policies/versions/2"), &admin.token).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // Every rejected attempt is in the audit log.
    let attempts = audit(&app, &admin, "action=policy.update").await;
    assert_eq!(attempts.len(), cases.len(), "{attempts:#?}");
    for (e, (what, _)) in attempts.iter().zip(&cases) {
        assert_eq!(e["outcome"], "error", "{what}");
        assert_eq!(e["actor"], admin.email.as_str());
        assert!(e["details"]["rejected"].as_str().is_some_and(|m| !m.is_empty()), "{what}: {e}");
        assert!(e["details"]["line"].is_u64(), "{what}: {e}");
    }
    assert!(attempts[5]["details"]["rejected"].as_str().unwrap().contains("other-tenant"));
    // And a bad message is refused before anything else.
    let r =
        app.put(&format!("/api/v1/t/{t}/policies"), &admin.token, json!({ "text": defaults, "message": "  " })).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem(r).await["errors"][0]["field"], "message");
}

#[actix_web::test]
async fn valid_policy_put_creates_a_version_and_concurrent_puts_conflict() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("polv")).await;
    let t = admin.tenant.clone();
    let defaults = default_policies();
    let v1 = json_ok(app.get(&format!("/api/v1/t/{t}/policies"), &admin.token).await).await;
    assert_eq!(v1["version"], 1);
    let text2 = format!(
        "{defaults}\n@id(\"approvers-list-runs\")\npermit (principal in Group::\"approvers\", action == Action::\"run.list\", resource);\n"
    );
    let r = app.put(&format!("/api/v1/t/{t}/policies"), &admin.token, json!({ "text": text2, "message": "v2" })).await;
    let v2 = json_ok(r).await;
    assert_eq!(v2["version"], 2);
    assert_eq!(v2["author"], admin.email.as_str());
    let got = json_ok(app.get(&format!("/api/v1/t/{t}/policies/versions/2"), &admin.token).await).await;
    assert_eq!(got["text"], text2.as_str());
    assert_eq!(got["message"], "v2");
    assert_eq!(got["sha256"], v2["sha256"]);
    let old = json_ok(app.get(&format!("/api/v1/t/{t}/policies/versions/1"), &admin.token).await).await;
    assert_eq!(old["text"], defaults.as_str());
    let list = json_ok(app.get(&format!("/api/v1/t/{t}/policies/versions"), &admin.token).await).await;
    let nums: Vec<i64> = list.as_array().unwrap().iter().map(|v| v["version"].as_i64().unwrap()).collect();
    assert_eq!(nums, [2, 1]);
    let ev = audit(&app, &admin, "action=policy.update&outcome=allow").await;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["resource_version"], 2);
    assert_eq!(ev[0]["details"]["previous_version"], 1);

    // A save from a stale base is refused and stores nothing.
    let r = app
        .put(
            &format!("/api/v1/t/{t}/policies"),
            &admin.token,
            json!({ "text": defaults, "message": "stale", "base_version": 1 }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(problem(r).await["type"], "urn:sluice:problem:conflict");
    let tenant = json_ok(app.get(&format!("/api/v1/t/{t}"), &admin.token).await).await;
    assert_eq!(tenant["policy_version"], 2);

    // Two admins save from the same version at the same time: one wins, one gets 409.
    let other = app.add_member(&admin, &["admins"]).await;
    for round in 0..3 {
        let current =
            json_ok(app.get(&format!("/api/v1/t/{t}"), &admin.token).await).await["policy_version"].as_i64().unwrap();
        let a = format!("{defaults}\n// round {round} a\n");
        let b = format!("{defaults}\n// round {round} b\n");
        let path = format!("/api/v1/t/{t}/policies");
        let (ra, rb) = tokio::join!(
            app.put(&path, &admin.token, json!({ "text": a, "message": "a", "base_version": current })),
            app.put(&path, &other.token, json!({ "text": b, "message": "b", "base_version": current }))
        );
        let mut statuses = [ra.status(), rb.status()];
        statuses.sort();
        let (ta, tb) = (ra.text().await.unwrap(), rb.text().await.unwrap());
        assert_eq!(statuses, [StatusCode::OK, StatusCode::CONFLICT], "round {round}: {ta} / {tb}");
        let loser: Value = serde_json::from_str(if ta.contains("urn:sluice:problem") { &ta } else { &tb }).unwrap();
        assert_eq!(loser["type"], "urn:sluice:problem:conflict");
        let now =
            json_ok(app.get(&format!("/api/v1/t/{t}"), &admin.token).await).await["policy_version"].as_i64().unwrap();
        assert_eq!(now, current + 1, "round {round}");
    }
    let list = json_ok(app.get(&format!("/api/v1/t/{t}/policies/versions"), &admin.token).await).await;
    assert_eq!(list.as_array().unwrap().len(), 5);
}

#[actix_web::test]
async fn mass_assignment_is_ignored() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("mass")).await;
    let t = admin.tenant.clone();
    let victim = app.signup(&slug("victim")).await;
    let victim_before = json_ok(app.get(&format!("/api/v1/t/{}/members", victim.tenant), &victim.token).await).await;
    let forged_id = "11111111-2222-3333-4444-555555555555";
    let extra = |mut body: Value| {
        let o = body.as_object_mut().unwrap();
        o.insert("tenant_id".into(), json!(victim.tenant));
        o.insert("tenant".into(), json!(victim.tenant));
        o.insert("created_by".into(), json!(victim.user_id));
        o.insert("author".into(), json!(victim.email));
        o.insert("id".into(), json!(forged_id));
        o.insert("user_id".into(), json!(forged_id));
        o.insert("latest_version".into(), json!(99));
        body
    };

    // A pipeline lands in the caller's tenant, authored by the caller.
    let r = app
        .post(
            &format!("/api/v1/t/{t}/pipelines"),
            &admin.token,
            extra(json!({ "name": "assigned", "definition": PIPELINE })),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["author"], admin.email.as_str());
    assert_eq!(p["version"], 1);
    assert_eq!(p["latest_version"], 1);
    let got = json_ok(app.get(&format!("/api/v1/t/{t}/pipelines/assigned"), &admin.token).await).await;
    assert_eq!(got["author"], admin.email.as_str());
    let r = app.get(&format!("/api/v1/t/{}/pipelines/assigned", victim.tenant), &victim.token).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let ev = audit(&app, &admin, "action=pipeline.create").await;
    assert_eq!(ev[0]["actor_id"], admin.user_id.as_str());

    // A member lands in the caller's tenant, with a fresh user id.
    let email = format!("mass-{}@x.example", uuid::Uuid::new_v4().simple());
    let r = app
        .post(
            &format!("/api/v1/t/{t}/members"),
            &admin.token,
            extra(json!({ "email": email, "groups": ["viewers"], "password": PASSWORD })),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let m: Value = r.json().await.unwrap();
    assert_ne!(m["user_id"], forged_id);
    assert_ne!(m["user_id"], victim.user_id.as_str());
    assert_eq!(m["email"], email.as_str());
    let mine = json_ok(app.get(&format!("/api/v1/t/{t}/members"), &admin.token).await).await;
    assert!(mine.as_array().unwrap().iter().any(|x| x["email"] == email.as_str()));
    let victim_after = json_ok(app.get(&format!("/api/v1/t/{}/members", victim.tenant), &victim.token).await).await;
    assert_eq!(victim_before, victim_after);
    let newbie = app.login(&t, &email, PASSWORD).await;
    let me = json_ok(app.get("/api/v1/me", &newbie.token).await).await;
    let tenants: Vec<&str> =
        me["memberships"].as_array().unwrap().iter().map(|x| x["tenant"].as_str().unwrap()).collect();
    assert_eq!(tenants, [t.as_str()]);

    // A token lands in the caller's tenant, owned by the caller, with a fresh id.
    let r = app
        .post(
            &format!("/api/v1/t/{t}/tokens"),
            &admin.token,
            extra(json!({ "name": "mass", "expires_at": expires(), "groups": ["viewers"] })),
        )
        .await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let k: Value = r.json().await.unwrap();
    assert_ne!(k["id"], forged_id);
    assert_eq!(k["created_by"], admin.email.as_str());
    let secret = k["token"].as_str().unwrap();
    assert_eq!(app.get(&format!("/api/v1/t/{t}/pipelines"), secret).await.status(), StatusCode::OK);
    assert_eq!(
        app.get(&format!("/api/v1/t/{}/pipelines", victim.tenant), secret).await.status(),
        StatusCode::NOT_FOUND
    );
    let tokens = json_ok(app.get(&format!("/api/v1/t/{t}/tokens"), &admin.token).await).await;
    assert_eq!(tokens[0]["created_by"], admin.email.as_str());
    let victim_tokens = json_ok(app.get(&format!("/api/v1/t/{}/tokens", victim.tenant), &victim.token).await).await;
    assert_eq!(victim_tokens, json!([]));
}
