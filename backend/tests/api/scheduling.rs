//! Scheduling limits: a pipeline's `concurrency` (per rendered key, queue or cancel the new
//! run) and the per-tenant limit on running tasks.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::*;

async fn start(app: &TestApp, m: &Member, pipeline: &str, params: Value) -> String {
    let r = app
        .post(&format!("/api/v1/t/{}/pipelines/{pipeline}/runs", m.tenant), &m.token, json!({ "params": params }))
        .await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    v["id"].as_str().unwrap().to_owned()
}

async fn view(app: &TestApp, m: &Member, id: &str) -> Value {
    app.get(&format!("/api/v1/t/{}/runs/{id}", m.tenant), &m.token).await.json().await.unwrap()
}

fn time(v: &Value, field: &str) -> chrono::DateTime<chrono::Utc> {
    v[field].as_str().unwrap_or_else(|| panic!("no {field} in {v:#}")).parse().unwrap()
}

/// A pipeline `wide` of `n` independent sleeping tasks for each member.
async fn wide(app: &TestApp, members: &[&Member], n: usize, sleep: &str) {
    let mut yaml = String::from("stages:\n  - id: s\n    tasks:\n");
    for i in 0..n {
        yaml.push_str(&format!("      - id: t{i}\n        sleep: {sleep}\n"));
    }
    for m in members {
        assert_eq!(app.create_pipeline(m, "wide", &yaml).await.status(), StatusCode::CREATED);
    }
}

/// Watches runs until all succeed and returns the most tasks each had running at once; `bound`
/// gives each run's allowed maximum, checked at every look.
async fn peak_running(app: &TestApp, runs: &[(&Member, &str)], bound: &[usize]) -> Vec<usize> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut most = vec![0usize; runs.len()];
    loop {
        let mut all_done = true;
        for (i, (m, id)) in runs.iter().enumerate() {
            let v = view(app, m, id).await;
            let running = v["tasks"].as_array().unwrap().iter().filter(|t| t["status"] == "running").count();
            assert!(running <= bound[i], "run {i} has {running} tasks running at once: {v:#}");
            most[i] = most[i].max(running);
            all_done &= v["status"] == "succeeded";
            assert!(Instant::now() < deadline, "runs did not finish: {v:#}");
        }
        if all_done {
            return most;
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

const LIMITED: &str = "params:\n  env: { type: string, required: true }\nconcurrency: { key: \"deploy-{{ params.env }}\", max: 1 }\nstages:\n  - id: s\n    tasks:\n      - id: t\n        sleep: 1s\n";

/// The outcome of a start that queued itself while the last active run's end was being
/// committed (or of two runs ending at once, both handing their slot to the same waiting run):
/// the key has room and a run waits. The reaper starts the oldest waiting run, and only as
/// many as the limit allows.
#[actix_web::test]
async fn the_reaper_starts_a_run_left_waiting_while_its_key_has_room() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("room")).await;
    assert_eq!(app.create_pipeline(&admin, "deploy", LIMITED).await.status(), StatusCode::CREATED);
    let a = start(&app, &admin, "deploy", json!({ "env": "prod" })).await;
    let b = start(&app, &admin, "deploy", json!({ "env": "prod" })).await;
    let c = start(&app, &admin, "deploy", json!({ "env": "prod" })).await;
    assert_eq!(view(&app, &admin, &b).await["status"], "pending");
    // `a` ends without handing its slot on (its task's completion is then refused as late).
    let a_id = uuid::Uuid::parse_str(&a).unwrap();
    app.sql("UPDATE task_runs SET status = 'cancelled' WHERE run_id = $1", vec![a_id.into()]).await;
    app.sql("UPDATE runs SET status = 'cancelled', rev = rev + 1 WHERE id = $1", vec![a_id.into()]).await;
    let v = wait_until(&app, &admin, &b, 15, "the waiting run never started", |v| v["status"] != "pending").await;
    assert_eq!(v["status"], "running", "{v:#}");
    // The limit is 1: `c` waits for `b`, then starts when `b` ends.
    let vc = view(&app, &admin, &c).await;
    assert_eq!(vc["status"], "pending", "{vc:#}");
    let (vb, vc) = (wait_run(&app, &admin, &b, 30).await, wait_run(&app, &admin, &c, 30).await);
    assert_eq!(vb["status"], "succeeded", "{vb:#}");
    assert_eq!(vc["status"], "succeeded", "{vc:#}");
    assert!(time(&vc, "started_at") >= time(&vb, "finished_at"), "{vb:#} {vc:#}");
}

#[actix_web::test]
async fn runs_with_the_same_concurrency_key_queue_and_start_in_order() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("conc")).await;
    assert_eq!(app.create_pipeline(&admin, "deploy", LIMITED).await.status(), StatusCode::CREATED);
    let a = start(&app, &admin, "deploy", json!({ "env": "prod" })).await;
    let b = start(&app, &admin, "deploy", json!({ "env": "prod" })).await;
    let c = start(&app, &admin, "deploy", json!({ "env": "prod" })).await;
    let other = start(&app, &admin, "deploy", json!({ "env": "dev" })).await;
    // The first of each key runs; the others wait, pending, holding nothing.
    assert_eq!(view(&app, &admin, &a).await["status"], "running");
    assert_eq!(view(&app, &admin, &other).await["status"], "running");
    assert_eq!(view(&app, &admin, &other).await["concurrency_key"], "deploy-dev");
    for queued in [&b, &c] {
        let v = view(&app, &admin, queued).await;
        assert_eq!(v["status"], "pending", "{v:#}");
        assert_eq!(v["concurrency_key"], "deploy-prod", "{v:#}");
        assert_eq!(task_of(&v, "t")["status"], "pending");
    }
    let (va, vb, vc) = (
        wait_run(&app, &admin, &a, 30).await,
        wait_run(&app, &admin, &b, 30).await,
        wait_run(&app, &admin, &c, 30).await,
    );
    assert_eq!(wait_run(&app, &admin, &other, 30).await["status"], "succeeded");
    for v in [&va, &vb, &vc] {
        assert_eq!(v["status"], "succeeded", "{v:#}");
    }
    // One at a time, in the order they were started.
    assert!(time(&vb, "started_at") >= time(&va, "finished_at"), "{va:#} {vb:#}");
    assert!(time(&vc, "started_at") >= time(&vb, "finished_at"), "{vb:#} {vc:#}");
    let audit: Value = app
        .get(&format!("/api/v1/t/{}/audit?action=run.create", admin.tenant), &admin.token)
        .await
        .json()
        .await
        .unwrap();
    let outcomes: Vec<String> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["details"]["concurrency"]["outcome"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(outcomes.iter().filter(|o| *o == "queued").count(), 2, "{outcomes:?}");
    assert_eq!(outcomes.iter().filter(|o| *o == "started").count(), 2, "{outcomes:?}");
}

#[actix_web::test]
async fn a_cancelled_queued_run_gives_up_its_place_and_never_starts() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("conc")).await;
    assert_eq!(app.create_pipeline(&admin, "deploy", LIMITED).await.status(), StatusCode::CREATED);
    let a = start(&app, &admin, "deploy", json!({ "env": "prod" })).await;
    let b = start(&app, &admin, "deploy", json!({ "env": "prod" })).await;
    let c = start(&app, &admin, "deploy", json!({ "env": "prod" })).await;
    let r =
        app.call(Method::POST, &format!("/api/v1/t/{}/runs/{b}/cancel", admin.tenant), Some(&admin.token), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "cancelled");
    let va = wait_run(&app, &admin, &a, 30).await;
    let vc = wait_run(&app, &admin, &c, 30).await;
    assert_eq!(vc["status"], "succeeded");
    assert!(time(&vc, "started_at") >= time(&va, "finished_at"));
    let vb = view(&app, &admin, &b).await;
    assert_eq!(vb["status"], "cancelled");
    assert!(vb["started_at"].is_null(), "{vb:#}");
}

#[actix_web::test]
async fn cancel_new_refuses_a_run_over_the_limit() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("conc")).await;
    let yaml = LIMITED.replace("max: 1 }", "max: 1, on_conflict: cancel_new }");
    assert_eq!(app.create_pipeline(&admin, "deploy", &yaml).await.status(), StatusCode::CREATED);
    let a = start(&app, &admin, "deploy", json!({ "env": "prod" })).await;
    let b = start(&app, &admin, "deploy", json!({ "env": "prod" })).await;
    let vb = view(&app, &admin, &b).await;
    assert_eq!(vb["status"], "cancelled", "{vb:#}");
    assert_eq!(task_of(&vb, "t")["status"], "cancelled");
    assert_eq!(wait_run(&app, &admin, &a, 30).await["status"], "succeeded");
    // With the slot free again, a new run starts.
    let c = start(&app, &admin, "deploy", json!({ "env": "prod" })).await;
    assert_eq!(wait_run(&app, &admin, &c, 30).await["status"], "succeeded");
}

#[actix_web::test]
async fn a_concurrency_key_that_does_not_render_is_refused_naming_it() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("conc")).await;
    let yaml = "params:\n  env: { type: string }\nconcurrency: { key: \"deploy-{{ params.env }}\" }\nstages:\n  - id: s\n    tasks:\n      - id: t\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "deploy", yaml).await.status(), StatusCode::CREATED);
    let r = app.post(&format!("/api/v1/t/{}/pipelines/deploy/runs", admin.tenant), &admin.token, json!({})).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let p = problem(r).await;
    assert_eq!(p["errors"][0]["field"], "concurrency.key", "{p:#}");
    let runs: Value = app.get(&format!("/api/v1/t/{}/runs", admin.tenant), &admin.token).await.json().await.unwrap();
    assert!(runs["items"].as_array().unwrap().is_empty(), "nothing half-written: {runs:#}");
}

#[actix_web::test]
async fn a_tenant_never_runs_more_tasks_at_once_than_its_limit() {
    let app = spawn_app_with(|c| {
        c.tenant_max_running_tasks = 2;
        c.worker_slots = 8;
    })
    .await;
    let busy = app.signup(&slug("busy")).await;
    let other = app.signup(&slug("other")).await;
    wide(&app, &[&busy, &other], 6, "500ms").await;
    let a = start(&app, &busy, "wide", json!({})).await;
    let b = start(&app, &other, "wide", json!({})).await;
    let most = peak_running(&app, &[(&busy, &a), (&other, &b)], &[2, 2]).await;
    // Both tenants used their two slots side by side: one tenant's queue does not hold the other.
    assert_eq!(most, [2, 2]);
}

/// Tasks queued by a completion, more than the tenant may run, are not all taken by the
/// worker's free slots: the claims made with the completion stay within the limit.
#[actix_web::test]
async fn a_fan_out_after_a_completion_stays_within_the_tenants_limit() {
    let app = spawn_app_with(|c| {
        c.tenant_max_running_tasks = 2;
        c.worker_slots = 8;
    })
    .await;
    let admin = app.signup(&slug("fan")).await;
    let mut yaml = String::from(
        "stages:\n  - id: first\n    tasks:\n      - id: a\n        sleep: 100ms\n  - id: then\n    needs: [first]\n    tasks:\n",
    );
    for i in 0..5 {
        yaml.push_str(&format!("      - id: b{i}\n        sleep: 400ms\n"));
    }
    assert_eq!(app.create_pipeline(&admin, "fan", &yaml).await.status(), StatusCode::CREATED);
    let id = start(&app, &admin, "fan", json!({})).await;
    let most = peak_running(&app, &[(&admin, &id)], &[2]).await;
    assert_eq!(most, [2]);
}

/// Runs started back to back (each after the last, so each start but the first is written in
/// one round trip on the chain head it left) do not claim more of the worker's free slots than
/// the tenant may run: a start over the limit leaves its tasks queued.
#[actix_web::test]
async fn starts_back_to_back_stay_within_the_tenants_limit() {
    let app = spawn_app_with(|c| {
        c.tenant_max_running_tasks = 2;
        c.worker_slots = 8;
    })
    .await;
    let admin = app.signup(&slug("starts")).await;
    wide(&app, &[&admin], 2, "400ms").await;
    for _ in 0..3 {
        start(&app, &admin, "wide", json!({})).await;
    }
    // The tenant's running tasks and unfinished runs, counted at one instant (views of the runs
    // one after another could count a task that ended and the one that took its place).
    #[derive(sea_orm::FromQueryResult)]
    struct Counts {
        running: i64,
        unfinished: i64,
    }
    let store = app.store();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut most = 0;
    loop {
        let c: Counts = store
            .query_one(
                store.db(),
                "SELECT (SELECT COUNT(*) FROM task_runs t WHERE t.tenant_id = tenants.id AND t.status = 'running') AS running, \
                 (SELECT COUNT(*) FROM runs r WHERE r.tenant_id = tenants.id AND r.status <> 'succeeded') AS unfinished \
                 FROM tenants WHERE slug = $1",
                vec![admin.tenant.clone().into()],
            )
            .await
            .unwrap()
            .unwrap();
        assert!(c.running <= 2, "{} tasks of the tenant running at once", c.running);
        most = most.max(c.running);
        if c.unfinished == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "runs did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(most, 2);
}

#[actix_web::test]
async fn the_embedded_worker_starts_higher_priority_tasks_first() {
    let app = spawn_app_with(|c| c.worker_slots = 1).await;
    let admin = app.signup(&slug("prio")).await;
    // One slot: `first` takes it at once; the other three wait and start by priority (the
    // pipeline's plus the task's), not in the order they were queued.
    let yaml = "priority: 1\nstages:\n  - id: s\n    tasks:\n      - id: first\n        sleep: 300ms\n      - id: low\n        priority: -5\n        sleep: 100ms\n      - id: mid\n        sleep: 100ms\n      - id: high\n        priority: 10\n        sleep: 100ms\n";
    assert_eq!(app.create_pipeline(&admin, "prio", yaml).await.status(), StatusCode::CREATED);
    let id = start(&app, &admin, "prio", json!({})).await;
    let v = wait_run(&app, &admin, &id, 30).await;
    assert_eq!(v["status"], "succeeded", "{v:#}");
    let started = |k: &str| time(task_of(&v, k), "started_at");
    assert!(started("first") < started("high"), "{v:#}");
    assert!(started("high") < started("mid"), "{v:#}");
    assert!(started("mid") < started("low"), "{v:#}");
}

#[actix_web::test]
async fn the_operator_sets_one_tenants_limit_and_it_is_audited() {
    let app = spawn_app_with(|c| {
        c.tenant_max_running_tasks = 0;
        c.worker_slots = 8;
    })
    .await;
    let small = app.signup(&slug("small")).await;
    let free = app.signup(&slug("free")).await;
    let config = &app.state.config;
    assert_eq!(sluice_backend::admin::set_tenant_limit(config, &small.tenant, Some(1)).await.unwrap(), None);
    // Unknown tenants and bad slugs are named.
    let e = sluice_backend::admin::set_tenant_limit(config, "no-such-tenant", Some(1)).await.unwrap_err();
    assert!(e.to_string().contains("no tenant no-such-tenant"), "{e}");
    let e = sluice_backend::admin::set_tenant_limit(config, "Bad Slug", Some(1)).await.unwrap_err();
    assert!(e.to_string().contains("--tenant"), "{e}");
    wide(&app, &[&small, &free], 4, "300ms").await;
    let a = start(&app, &small, "wide", json!({})).await;
    let b = start(&app, &free, "wide", json!({})).await;
    let most = peak_running(&app, &[(&small, &a), (&free, &b)], &[1, 4]).await;
    assert!(most[1] > 1, "the other tenant (no limit) ran its tasks side by side: {most:?}");
    // Back to the default, recorded in the tenant's audit log.
    assert_eq!(sluice_backend::admin::set_tenant_limit(config, &small.tenant, None).await.unwrap(), Some(1));
    let audit: Value = app
        .get(&format!("/api/v1/t/{}/audit?action=tenant.limits", small.tenant), &small.token)
        .await
        .json()
        .await
        .unwrap();
    let changes: Vec<&Value> =
        audit["items"].as_array().unwrap().iter().map(|e| &e["details"]["max_running_tasks"]).collect();
    assert_eq!(changes.len(), 2, "{audit:#}");
    assert!(changes.contains(&&json!({ "from": null, "to": 1 })), "{changes:?}");
    assert!(changes.contains(&&json!({ "from": 1, "to": null })), "{changes:?}");
}
