//! The hash-chained audit log: verification, tamper detection (by editing the database behind
//! the server's back), export, filters and pagination.

use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_backend::{
    admin::audit_verify,
    audit::{GENESIS, event_hash},
    store::entities::audit_event,
};
use uuid::Uuid;

use crate::helpers::*;

async fn json_ok(r: reqwest::Response) -> Value {
    let status = r.status();
    let text = r.text().await.unwrap();
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn verify(app: &TestApp, admin: &Member) -> Value {
    json_ok(app.get(&format!("/api/v1/t/{}/audit/verify", admin.tenant), &admin.token).await).await
}

/// Every event of the tenant, newest first, walking the cursor with `limit`.
async fn all_events(app: &TestApp, admin: &Member, query: &str, limit: u32) -> Vec<Value> {
    let mut out = vec![];
    let mut cursor = String::new();
    for _ in 0..500 {
        let page = json_ok(
            app.get(&format!("/api/v1/t/{}/audit?limit={limit}{query}{cursor}", admin.tenant), &admin.token).await,
        )
        .await;
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= limit as usize);
        out.extend(items.iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
    panic!("audit pagination does not end");
}

async fn tenant_id(app: &TestApp, slug: &str) -> Uuid {
    #[derive(sea_orm::FromQueryResult)]
    struct T {
        id: Uuid,
    }
    let t: T = app
        .store()
        .query_one(app.store().db(), "SELECT id FROM tenants WHERE slug = $1", vec![slug.into()])
        .await
        .unwrap()
        .unwrap();
    t.id
}

/// A tenant with a mix of events: allowed changes, a denial, a rejected policy, logins.
async fn busy_tenant(app: &TestApp) -> (Member, Member) {
    let admin = app.signup(&slug("audit")).await;
    let t = admin.tenant.clone();
    assert_eq!(app.create_pipeline(&admin, "deploy", PIPELINE).await.status(), StatusCode::CREATED);
    let r = app
        .put(
            &format!("/api/v1/t/{t}/pipelines/deploy"),
            &admin.token,
            json!({ "definition": PIPELINE.replace("cargo test", "cargo test --all"), "base_version": 1 }),
        )
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let viewer = app.add_member(&admin, &["viewers"]).await;
    let r = app
        .post(&format!("/api/v1/t/{t}/pipelines"), &viewer.token, json!({ "name": "nope", "definition": PIPELINE }))
        .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = app
        .put(&format!("/api/v1/t/{t}/policies"), &admin.token, json!({ "text": "permit (", "message": "broken" }))
        .await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let r = app.post(&format!("/api/v1/t/{t}/groups"), &admin.token, json!({ "name": "ops" })).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    app.create_token(&admin, &["viewers"]).await;
    let r = app.post(&format!("/api/v1/t/{t}/pipelines/deploy/archive"), &admin.token, json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    (admin, viewer)
}

/// A fresh app with a busy tenant whose chain verifies; returns the number of events.
async fn intact() -> (TestApp, Member, i64) {
    let app = spawn_app().await;
    let (admin, _) = busy_tenant(&app).await;
    let v = verify(&app, &admin).await;
    assert_eq!(v["ok"], true, "{v}");
    let n = v["events"].as_i64().unwrap();
    assert!(n >= 10, "{v}");
    assert!(audit_verify(&app.state.config, Some(&admin.tenant)).await.unwrap());
    (app, admin, n)
}

const TENANT: &str = "(SELECT id FROM tenants WHERE slug = $1)";

async fn assert_broken_at(app: &TestApp, admin: &Member, seq: i64) -> Value {
    let v = verify(app, admin).await;
    assert_eq!(v["ok"], false, "tampering not detected: {v}");
    assert_eq!(v["first_broken_seq"], seq, "{v}");
    assert!(v["reason"].as_str().is_some_and(|r| !r.is_empty()), "{v}");
    assert!(!audit_verify(&app.state.config, Some(&admin.tenant)).await.unwrap(), "the CLI misses it");
    assert!(!audit_verify(&app.state.config, None).await.unwrap(), "the CLI (all tenants) misses it");
    v
}

#[actix_web::test]
async fn chain_verifies_after_a_mix_of_actions() {
    let app = spawn_app().await;
    let (admin, viewer) = busy_tenant(&app).await;
    let other = app.signup(&slug("other")).await;
    assert_eq!(app.create_pipeline(&other, "xx", PIPELINE).await.status(), StatusCode::CREATED);
    // A failed login for an unknown email goes to the platform chain.
    let r = app
        .call(
            Method::POST,
            "/api/v1/auth/login",
            None,
            Some(json!({ "email": "ghost@nowhere.example", "password": "wrong-password-1" })),
        )
        .await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let v = verify(&app, &admin).await;
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["first_broken_seq"], Value::Null);
    let events = all_events(&app, &admin, "", 200).await;
    assert_eq!(v["events"], events.len() as i64);
    let mut actions: Vec<&str> = events.iter().map(|e| e["action"].as_str().unwrap()).collect();
    actions.reverse();
    for a in [
        "tenant.create",
        "pipeline.create",
        "pipeline.update",
        "member.add",
        "pipeline.create",
        "policy.update",
        "group.create",
        "token.create",
        "pipeline.archive",
    ] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
    let outcomes: std::collections::BTreeSet<&str> = events.iter().map(|e| e["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes.into_iter().collect::<Vec<_>>(), ["allow", "deny", "error"]);
    assert!(events.iter().any(|e| e["actor_id"] == viewer.user_id.as_str()));
    assert!(audit_verify(&app.state.config, Some(&admin.tenant)).await.unwrap());
    assert!(audit_verify(&app.state.config, Some(&other.tenant)).await.unwrap());
    assert!(audit_verify(&app.state.config, None).await.unwrap());
    assert!(audit_verify(&app.state.config, Some("no-such-tenant")).await.is_err());
}

#[actix_web::test]
async fn edited_event_is_detected() {
    let (app, admin, _) = intact().await;
    app.sql(
        &format!("UPDATE audit_events SET details = $2 WHERE tenant_id = {TENANT} AND seq = 3"),
        vec![admin.tenant.clone().into(), "{\"message\":\"nothing to see\"}".into()],
    )
    .await;
    let v = assert_broken_at(&app, &admin, 3).await;
    assert_eq!(v["events"], 2);

    let (app, admin, _) = intact().await;
    let n = app
        .sql(
            &format!("UPDATE audit_events SET action = 'pipeline.read' WHERE tenant_id = {TENANT} AND seq = 5"),
            vec![admin.tenant.clone().into()],
        )
        .await;
    assert_eq!(n, 1);
    assert_broken_at(&app, &admin, 5).await;
}

#[actix_web::test]
async fn deleted_middle_event_is_detected() {
    let (app, admin, _) = intact().await;
    let n = app
        .sql(
            &format!("DELETE FROM audit_events WHERE tenant_id = {TENANT} AND seq = 4"),
            vec![admin.tenant.clone().into()],
        )
        .await;
    assert_eq!(n, 1);
    assert_broken_at(&app, &admin, 4).await;
}

#[actix_web::test]
async fn reordered_events_are_detected() {
    let (app, admin, _) = intact().await;
    let swap = [(4, -4), (5, 4), (-4, 5)];
    for (from, to) in swap {
        let n = app
            .sql(
                &format!("UPDATE audit_events SET seq = $3 WHERE tenant_id = {TENANT} AND seq = $2"),
                vec![admin.tenant.clone().into(), i64::from(from).into(), i64::from(to).into()],
            )
            .await;
        assert_eq!(n, 1);
    }
    assert_broken_at(&app, &admin, 4).await;
}

async fn last_event(app: &TestApp, admin: &Member) -> audit_event::Model {
    app.store()
        .query_one(
            app.store().db(),
            &format!("SELECT * FROM audit_events WHERE tenant_id = {TENANT} ORDER BY seq DESC LIMIT 1"),
            vec![admin.tenant.clone().into()],
        )
        .await
        .unwrap()
        .unwrap()
}

async fn insert(app: &TestApp, m: &audit_event::Model) {
    use sea_orm::{EntityTrait, IntoActiveModel};
    audit_event::Entity::insert(m.clone().into_active_model()).exec(app.store().db()).await.unwrap();
}

fn forged(last: &audit_event::Model) -> audit_event::Model {
    audit_event::Model {
        seq: last.seq + 1,
        occurred_at: last.occurred_at,
        action: "member.remove".into(),
        resource_type: "Member".into(),
        resource_id: Some(Uuid::new_v4().to_string()),
        resource_version: None,
        outcome: "allow".into(),
        details: "{}".into(),
        prev_hash: last.hash.clone(),
        hash: "0".repeat(64),
        ..last.clone()
    }
}

#[actix_web::test]
async fn forged_event_with_a_wrong_hash_is_detected() {
    let (app, admin, n) = intact().await;
    let last = last_event(&app, &admin).await;
    assert_eq!(last.seq, n);
    insert(&app, &forged(&last)).await;
    assert_broken_at(&app, &admin, n + 1).await;
}

#[actix_web::test]
async fn forged_event_with_a_recomputed_hash_is_caught_by_the_head() {
    let (app, admin, n) = intact().await;
    let last = last_event(&app, &admin).await;
    let mut m = forged(&last);
    m.hash = event_hash(&m);
    insert(&app, &m).await;
    // The event itself chains perfectly; only the head (not updated) gives it away.
    let v = assert_broken_at(&app, &admin, n + 1).await;
    assert!(v["reason"].as_str().unwrap().contains("head"), "{v}");
}

#[actix_web::test]
async fn truncation_is_caught_by_the_head() {
    let (app, admin, n) = intact().await;
    let deleted = app
        .sql(
            &format!("DELETE FROM audit_events WHERE tenant_id = {TENANT} AND seq = $2"),
            vec![admin.tenant.clone().into(), n.into()],
        )
        .await;
    assert_eq!(deleted, 1);
    let v = assert_broken_at(&app, &admin, n).await;
    assert_eq!(v["events"], n - 1);
    assert!(v["reason"].as_str().unwrap().contains("head"), "{v}");
}

#[actix_web::test]
async fn tampering_one_tenant_does_not_break_another() {
    let (app, admin, _) = intact().await;
    let other = app.signup(&slug("clean")).await;
    app.sql(
        &format!("UPDATE audit_events SET details = '{{}}' WHERE tenant_id = {TENANT} AND seq = 2"),
        vec![admin.tenant.clone().into()],
    )
    .await;
    assert_broken_at(&app, &admin, 2).await;
    assert_eq!(verify(&app, &other).await["ok"], true);
    assert!(audit_verify(&app.state.config, Some(&other.tenant)).await.unwrap());
}

#[actix_web::test]
async fn export_is_json_lines_oldest_first_and_chained() {
    let app = spawn_app().await;
    let (admin, _) = busy_tenant(&app).await;
    let r = app.get(&format!("/api/v1/t/{}/audit/export", admin.tenant), &admin.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/x-ndjson"));
    let disposition = r.headers()["content-disposition"].to_str().unwrap().to_owned();
    assert!(disposition.contains(&format!("{}-audit.jsonl", admin.tenant)), "{disposition}");
    let body = r.text().await.unwrap();
    assert!(body.ends_with('\n'));
    let lines: Vec<Value> =
        body.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let v = verify(&app, &admin).await;
    assert_eq!(lines.len() as i64, v["events"].as_i64().unwrap());
    let tid = tenant_id(&app, &admin.tenant).await;
    let mut prev = GENESIS.to_owned();
    for (i, e) in lines.iter().enumerate() {
        assert_eq!(e["seq"], i as i64 + 1);
        assert_eq!(e["prev_hash"], prev.as_str(), "line {}", i + 1);
        // Anyone holding the export can recompute every hash.
        let m = audit_event::Model {
            tenant_id: tid,
            seq: e["seq"].as_i64().unwrap(),
            occurred_at: e["time"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap(),
            actor_type: e["actor_type"].as_str().unwrap().into(),
            actor_id: e["actor_id"].as_str().map(Into::into),
            actor_label: e["actor"].as_str().unwrap().into(),
            action: e["action"].as_str().unwrap().into(),
            resource_type: e["resource_type"].as_str().unwrap().into(),
            resource_id: e["resource_id"].as_str().map(Into::into),
            resource_version: e["resource_version"].as_i64(),
            outcome: e["outcome"].as_str().unwrap().into(),
            policy_ids: e["policy_ids"].to_string(),
            source_ip: e["source_ip"].as_str().map(Into::into),
            user_agent: e["user_agent"].as_str().map(Into::into),
            request_id: e["request_id"].as_str().map(Into::into),
            details: e["details"].to_string(),
            prev_hash: prev.clone(),
            hash: String::new(),
        };
        assert_eq!(event_hash(&m), e["hash"].as_str().unwrap(), "line {} does not hash to its `hash`: {e}", i + 1);
        prev = e["hash"].as_str().unwrap().to_owned();
    }
    // The same events as the paginated listing, in the opposite order.
    let mut listed = all_events(&app, &admin, "", 3).await;
    listed.reverse();
    assert_eq!(lines, listed);
}

#[actix_web::test]
async fn filters_and_pagination() {
    let app = spawn_app().await;
    let (admin, viewer) = busy_tenant(&app).await;
    let t = admin.tenant.clone();
    let all = all_events(&app, &admin, "", 200).await;
    let n = all.len();
    // Pagination with every page size gives the same events exactly once, newest first.
    for limit in [1, 2, 5] {
        let paged = all_events(&app, &admin, "", limit).await;
        assert_eq!(paged, all, "limit {limit}");
    }
    let seqs: Vec<i64> = all.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, (1..=n as i64).rev().collect::<Vec<_>>());

    let check = |query: &'static str, pred: Box<dyn Fn(&Value) -> bool>| {
        let expected: Vec<Value> = all.iter().filter(|e| pred(e)).cloned().collect();
        (query, expected)
    };
    let admin_id = admin.user_id.clone();
    let viewer_id = viewer.user_id.clone();
    let admin_email = admin.email.clone();
    let cases = vec![
        check("&action=pipeline.create", Box::new(|e| e["action"] == "pipeline.create")),
        check("&outcome=deny", Box::new(|e| e["outcome"] == "deny")),
        check("&outcome=error", Box::new(|e| e["outcome"] == "error")),
        check("&resource_id=deploy", Box::new(|e| e["resource_id"] == "deploy")),
        check(
            "&resource_type=Pipeline&outcome=allow",
            Box::new(|e| e["resource_type"] == "Pipeline" && e["outcome"] == "allow"),
        ),
    ];
    for (query, expected) in cases {
        assert!(!expected.is_empty(), "{query}: the fixture has no such event");
        assert_eq!(all_events(&app, &admin, query, 2).await, expected, "{query}");
    }
    for (actor, pred) in [
        (
            admin_id.clone(),
            Box::new(move |e: &Value| e["actor_id"] == admin_id.as_str()) as Box<dyn Fn(&Value) -> bool>,
        ),
        (viewer_id.clone(), Box::new(move |e: &Value| e["actor_id"] == viewer_id.as_str())),
        (admin_email.clone(), Box::new(move |e: &Value| e["actor"] == admin_email.as_str())),
    ] {
        let expected: Vec<Value> = all.iter().filter(|e| pred(e)).cloned().collect();
        assert!(!expected.is_empty());
        let got = all_events(&app, &admin, &format!("&actor={}", actor.replace('@', "%40")), 2).await;
        assert_eq!(got, expected, "actor {actor}");
    }
    let denied = all_events(&app, &admin, "&outcome=deny", 200).await;
    assert_eq!(denied.len(), 1);
    assert_eq!(denied[0]["action"], "pipeline.create");
    assert_eq!(denied[0]["actor_id"], viewer.user_id.as_str());

    // since / until split the log at an event's time.
    let pivot = &all[n / 2];
    let time = pivot["time"].as_str().unwrap();
    let at: DateTime<Utc> = time.parse().unwrap();
    let since = all_events(&app, &admin, &format!("&since={time}"), 200).await;
    let until = all_events(&app, &admin, &format!("&until={time}"), 200).await;
    let exp_since: Vec<Value> =
        all.iter().filter(|e| e["time"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap() >= at).cloned().collect();
    let exp_until: Vec<Value> =
        all.iter().filter(|e| e["time"].as_str().unwrap().parse::<DateTime<Utc>>().unwrap() < at).cloned().collect();
    assert!(since.contains(pivot));
    assert_eq!(since, exp_since);
    assert_eq!(until, exp_until);
    assert_eq!(since.len() + until.len(), n);
    let future = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(all_events(&app, &admin, &format!("&since={future}"), 50).await, Vec::<Value>::new());

    // Bad filters are refused.
    let r = app.get(&format!("/api/v1/t/{t}/audit?outcome=maybe"), &admin.token).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(problem(r).await["errors"][0]["field"], "outcome");
    let r = app.get(&format!("/api/v1/t/{t}/audit?since=yesterday"), &admin.token).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[actix_web::test]
async fn denials_record_the_determining_policies() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("deny")).await;
    let t = admin.tenant.clone();
    let viewer = app.add_member(&admin, &["viewers"]).await;
    let defaults = sluice_backend::authz::Authorizer::new().unwrap().default_policy_text().to_owned();
    let text = format!(
        "{defaults}\n@id(\"no-listing-for-this-viewer\")\nforbid (principal == User::\"{}\", action == Action::\"pipeline.list\", resource);\n",
        viewer.user_id
    );
    let r = app
        .put(&format!("/api/v1/t/{t}/policies"), &admin.token, json!({ "text": text, "message": "forbid one" }))
        .await;
    assert_eq!(r.status(), StatusCode::OK, "{}", r.text().await.unwrap());
    // Forbidden by a named policy.
    let r = app.get(&format!("/api/v1/t/{t}/pipelines"), &viewer.token).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Denied by default: nothing permits it.
    let r = app.get(&format!("/api/v1/t/{t}/tokens"), &viewer.token).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Allowed: the permitting policy is recorded.
    assert_eq!(app.create_pipeline(&admin, "pp", PIPELINE).await.status(), StatusCode::CREATED);

    let denied = all_events(&app, &admin, "&outcome=deny", 50).await;
    assert_eq!(denied.len(), 2, "{denied:#?}");
    let (tokens, listing) = (&denied[0], &denied[1]);
    assert_eq!(listing["action"], "pipeline.list");
    assert_eq!(listing["policy_ids"], json!(["no-listing-for-this-viewer"]));
    assert_eq!(listing["details"]["policy_version"], 2);
    assert_eq!(listing["actor_id"], viewer.user_id.as_str());
    assert_eq!(tokens["action"], "token.list");
    assert_eq!(tokens["policy_ids"], json!([]));
    let created = all_events(&app, &admin, "&action=pipeline.create", 50).await;
    assert_eq!(created[0]["outcome"], "allow");
    assert_eq!(created[0]["policy_ids"], json!(["admins-all"]));
    assert_eq!(verify(&app, &admin).await["ok"], true);
}

/// A server writes a start in one round trip once it knows the tenant's audit chain head from
/// its own last start. Whatever moved the head on since (another audited
/// change, or another start at the same moment), every start is recorded once, in an intact
/// chain, and its run is there.
/// A run too large for the one-round-trip start (its rows need more statements than go in one)
/// starts the locked way, right after a start that left the chain's head known.
#[actix_web::test]
async fn a_start_too_large_for_one_round_trip_is_written_whole_the_locked_way() {
    let app = spawn_app_with(|c| c.with_worker = false).await;
    let admin = app.signup(&slug("big-start")).await;
    let small = "stages:\n  - id: s\n    tasks:\n      - id: a\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "small", small).await.status(), StatusCode::CREATED);
    let big = "params:\n  items: { type: array, required: true }\nstages:\n  - id: s\n    tasks:\n      - id: each\n        for_each: '{{ params.items }}'\n        noop: true\n      - id: join\n        needs: [each]\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "big", big).await.status(), StatusCode::CREATED);
    let start = |pipeline: &'static str, body: Value| {
        let app = &app;
        let admin = &admin;
        async move {
            let r =
                app.post(&format!("/api/v1/t/{}/pipelines/{pipeline}/runs", admin.tenant), &admin.token, body).await;
            assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
            let v: Value = r.json().await.unwrap();
            v["id"].as_str().unwrap().to_owned()
        }
    };
    let first = start("small", json!({})).await;
    // 3,300 tasks: 34 inserts of 100 rows at least, more than one round trip takes.
    let items: Vec<u32> = (0..3300).collect();
    let big_run = start("big", json!({ "params": { "items": items } })).await;
    let after = start("small", json!({})).await;
    let r = app.get(&format!("/api/v1/t/{}/runs/{big_run}", admin.tenant), &admin.token).await;
    let v: Value = r.json().await.unwrap();
    let tasks = v["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 3301);
    assert!(tasks.iter().filter(|t| t["key"] != "join").all(|t| t["status"] == "queued"), "{:#}", tasks[0]);
    let v = verify(&app, &admin).await;
    assert_eq!(v["ok"], true, "{v:#}");
    let events = all_events(&app, &admin, "&action=run.create", 100).await;
    let mut recorded: Vec<String> = events.iter().map(|e| e["resource_id"].as_str().unwrap().to_owned()).collect();
    recorded.sort();
    let mut started = vec![first, big_run, after];
    started.sort();
    assert_eq!(recorded, started, "each start is recorded once");
}

#[actix_web::test]
async fn starts_record_one_event_each_in_an_intact_chain_whatever_moved_the_head() {
    let app = spawn_app_with(|c| c.with_worker = false).await;
    let admin = app.signup(&slug("chain-starts")).await;
    let yaml = "stages:\n  - id: s\n    tasks:\n      - id: a\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "chained", yaml).await.status(), StatusCode::CREATED);
    let start = || async {
        let r = app.post(&format!("/api/v1/t/{}/pipelines/chained/runs", admin.tenant), &admin.token, json!({})).await;
        assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        v["id"].as_str().unwrap().to_owned()
    };
    let mut started = vec![];
    for round in 0..3 {
        // Back to back: the second knows the head the first left.
        started.push(start().await);
        started.push(start().await);
        // The head moves on by another audited change.
        let other = format!("other-{round}");
        assert_eq!(app.create_pipeline(&admin, &other, yaml).await.status(), StatusCode::CREATED);
        started.push(start().await);
        // Several at once: each finds the head another of them moved on.
        let together = futures_util::future::join_all((0..4).map(|_| start())).await;
        started.extend(together);
    }
    let v = verify(&app, &admin).await;
    assert_eq!(v["ok"], true, "{v:#}");
    let events = all_events(&app, &admin, "&action=run.create", 100).await;
    let mut recorded: Vec<String> = events.iter().map(|e| e["resource_id"].as_str().unwrap().to_owned()).collect();
    recorded.sort();
    started.sort();
    assert_eq!(recorded, started, "each start is recorded once");
    for id in &started {
        let r = app.get(&format!("/api/v1/t/{}/runs/{id}", admin.tenant), &admin.token).await;
        assert_eq!(r.status(), StatusCode::OK);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["status"], "running", "{v:#}");
        assert_eq!(v["tasks"][0]["status"], "queued", "{v:#}");
    }
}
