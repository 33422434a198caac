//! The worker registry and `GET /workers`: registration and duplicate names, status on the
//! database clock, tenant isolation, tenant-owned worker tokens, and what the embedded worker
//! accepts (labels, resources, the declared memory as a limit).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use sea_orm::FromQueryResult;
use serde_json::{Value, json};
use sluice_backend::{
    config::WorkerConfig,
    engine::{
        Timings,
        registry::{self, Registration, TenantOwner, WorkerProfile},
    },
};
use uuid::Uuid;

use crate::helpers::*;

fn workers_path(m: &Member) -> String {
    format!("/api/v1/t/{}/workers", m.tenant)
}

async fn list(app: &TestApp, m: &Member) -> Vec<Value> {
    let r = app.get(&workers_path(m), &m.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    r.json::<Value>().await.unwrap().as_array().unwrap().clone()
}

fn find<'a>(list: &'a [Value], name: &str) -> Option<&'a Value> {
    list.iter().find(|w| w["name"] == name)
}

fn profile(name: &str, labels: &[&str], tenant: Option<TenantOwner>) -> WorkerProfile {
    let config = WorkerConfig {
        labels: labels.iter().map(|l| (*l).to_owned()).collect(),
        cpu_millis: 2500,
        memory_bytes: 3 << 30,
        ..Default::default()
    };
    WorkerProfile::new(&config, name.to_owned(), tenant, 3, "worker")
}

async fn register(app: &TestApp, p: &WorkerProfile) -> anyhow::Result<Registration> {
    registry::register(app.store(), p, None, Timings::from_env()).await
}

async fn tenant_id(app: &TestApp, slug: &str) -> Uuid {
    #[derive(FromQueryResult)]
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

fn name(prefix: &str) -> String {
    format!("{prefix}-{}", &Uuid::new_v4().simple().to_string()[..8])
}

#[actix_web::test]
async fn the_embedded_worker_is_listed_alive_with_its_labels_and_capacity() {
    let embedded = name("embedded");
    let app = spawn_app_with(|c| {
        c.worker.name = Some(embedded.clone());
        c.worker.labels = vec!["linux".into(), "ssd".into()];
        c.worker.cpu_millis = 1500;
        c.worker.memory_bytes = 2 << 30;
        c.worker_slots = 3;
    })
    .await;
    let admin = app.signup(&slug("wk")).await;
    let list = list(&app, &admin).await;
    let w = find(&list, &embedded).unwrap_or_else(|| panic!("{list:?}"));
    assert_eq!(w["status"], "alive");
    assert_eq!(w["owner"], "shared");
    assert_eq!(w["mode"], "serve");
    assert_eq!(w["labels"], json!(["linux", "ssd"]));
    assert_eq!(w["capacity"], json!({ "cpu": 1.5, "memory_bytes": 2u64 << 30, "slots": 3 }));
    assert_eq!(w["load"], json!({ "running": 0, "cpu": 0.0, "memory_bytes": 0 }));
    assert_eq!(w["stopped_at"], Value::Null);
    assert!(w["version"].as_str().is_some_and(|v| !v.is_empty()));
    // Hosts and pids are the operator's business, not the tenants'.
    assert!(w.get("host").is_none() && w.get("pid").is_none(), "{w}");
    // Members read it (viewers included); without credentials it is 401.
    let viewer = app.add_member(&admin, &["viewers"]).await;
    assert!(find(&list_of(&app, &viewer).await, &embedded).is_some());
    let r = app.call(Method::GET, &workers_path(&admin), None, None).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    // The heartbeat moves on while the worker lives.
    let first = w["last_heartbeat_at"].as_str().unwrap().to_owned();
    let beat = app.state.engine.timings().heartbeat;
    tokio::time::sleep(beat + Duration::from_millis(500)).await;
    let again = list_of(&app, &admin).await;
    let later = find(&again, &embedded).unwrap()["last_heartbeat_at"].as_str().unwrap().to_owned();
    assert!(later > first, "{first} then {later}");
}

async fn list_of(app: &TestApp, m: &Member) -> Vec<Value> {
    list(app, m).await
}

#[actix_web::test]
async fn a_tenants_own_worker_is_visible_to_that_tenant_only() {
    let app = spawn_app().await;
    let a = app.signup(&slug("wka")).await;
    let b = app.signup(&slug("wkb")).await;
    let a_id = tenant_id(&app, &a.tenant).await;
    let own = name("a-own");
    let shared = name("shared");
    let _own =
        register(&app, &profile(&own, &["gpu"], Some(TenantOwner { id: a_id, slug: a.tenant.clone() }))).await.unwrap();
    let _shared = register(&app, &profile(&shared, &[], None)).await.unwrap();

    let seen_by_a = list(&app, &a).await;
    let w = find(&seen_by_a, &own).unwrap_or_else(|| panic!("{seen_by_a:?}"));
    assert_eq!(w["owner"], "tenant");
    assert_eq!(w["labels"], json!(["gpu", "self-hosted"]));
    assert_eq!(w["capacity"], json!({ "cpu": 2.5, "memory_bytes": 3u64 << 30, "slots": 3 }));
    assert!(find(&seen_by_a, &shared).is_some());

    let r = app.get(&workers_path(&b), &b.token).await;
    let text = r.text().await.unwrap();
    assert!(!text.contains(&own), "B sees A's worker: {text}");
    let seen_by_b: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert_eq!(find(&seen_by_b, &shared).unwrap()["owner"], "shared");
    assert!(seen_by_b.iter().all(|w| w["owner"] == "shared"), "{seen_by_b:?}");
    // B's credentials on A's path: 404, like any other tenant route.
    let r = app.get(&workers_path(&a), &b.token).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[actix_web::test]
async fn status_is_alive_lost_or_stopped_on_the_database_clock() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("wks")).await;
    let (alive, lost, stopped) = (name("alive"), name("lost"), name("stopped"));
    let _alive = register(&app, &profile(&alive, &[], None)).await.unwrap();
    let _lost = register(&app, &profile(&lost, &[], None)).await.unwrap();
    let gone = register(&app, &profile(&stopped, &[], None)).await.unwrap();
    gone.stop().await.unwrap();
    // Silent for longer than the lease.
    let lease = app.state.engine.timings().lease;
    let old = chrono::Utc::now() - chrono::Duration::from_std(lease).unwrap() - chrono::Duration::seconds(2);
    app.sql("UPDATE workers SET last_heartbeat_at = $1 WHERE name = $2", vec![old.into(), lost.clone().into()]).await;
    let list = list(&app, &admin).await;
    assert_eq!(find(&list, &alive).unwrap()["status"], "alive");
    assert_eq!(find(&list, &lost).unwrap()["status"], "lost");
    let s = find(&list, &stopped).unwrap();
    assert_eq!(s["status"], "stopped");
    assert!(s["stopped_at"].is_string());
}

#[actix_web::test]
async fn a_live_name_is_refused_and_a_dead_ones_is_taken_over() {
    let app = spawn_app().await;
    let n = name("dup");
    let first = register(&app, &profile(&n, &[], None)).await.unwrap();
    let e = register(&app, &profile(&n, &[], None)).await.err().expect("a second live worker of the same name");
    let msg = format!("{e:#}");
    assert!(msg.contains(&n) && msg.contains("already in use by a live worker"), "{msg}");
    // Its row, silent for longer than the lease: the name is free, and the first process learns
    // at its next heartbeat that it lost it.
    let lease = app.state.engine.timings().lease;
    let old = chrono::Utc::now() - chrono::Duration::from_std(lease).unwrap() - chrono::Duration::seconds(1);
    app.sql("UPDATE workers SET last_heartbeat_at = $1 WHERE name = $2", vec![old.into(), n.clone().into()]).await;
    let second = register(&app, &profile(&n, &["x"], None)).await.unwrap();
    assert!(!first.beat(registry::Load::default()).await.unwrap(), "the old process must see it was replaced");
    assert!(second.beat(registry::Load::default()).await.unwrap());
    // A clean stop frees the name at once.
    second.stop().await.unwrap();
    register(&app, &profile(&n, &[], None)).await.unwrap();
}

#[actix_web::test]
async fn only_a_token_allowed_worker_register_registers_a_tenants_worker() {
    let app = spawn_app().await;
    let a = app.signup(&slug("wkt")).await;
    let b = app.signup(&slug("wku")).await;
    let store = app.store();
    let (_, admin_token) = app.create_token(&a, &["admins"]).await;
    let (_, editor_token) = app.create_token(&a, &["editors"]).await;
    let (_, b_token) = app.create_token(&b, &["admins"]).await;

    let grant = registry::authorize_tenant_worker(store, &a.tenant, &admin_token, "farm-1").await.unwrap();
    assert_eq!(grant.owner, TenantOwner { id: tenant_id(&app, &a.tenant).await, slug: a.tenant.clone() });

    let e = registry::authorize_tenant_worker(store, &a.tenant, &editor_token, "farm-2").await.err().unwrap();
    assert!(format!("{e:#}").contains("worker.register"), "{e:#}");
    for (token, what) in [(b_token.as_str(), "another tenant's token"), ("slc_not-a-token", "garbage")] {
        let e = registry::authorize_tenant_worker(store, &a.tenant, token, "farm-3").await.err().unwrap();
        assert!(format!("{e:#}").contains("not a valid, unexpired API token of tenant"), "{what}: {e:#}");
    }
    // The registration and the refusal are in A's audit log.
    let p = profile("farm-1", &[], Some(grant.owner.clone()));
    let _r = registry::register(store, &p, Some(&grant), Timings::from_env()).await.unwrap();
    let r = app.get(&format!("/api/v1/t/{}/audit?limit=50", a.tenant), &a.token).await;
    let events: Value = r.json().await.unwrap();
    let of = |outcome: &str, id: &str| {
        events["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "worker.register" && e["outcome"] == outcome && e["resource_id"] == id)
    };
    assert!(of("allow", "farm-1") && of("deny", "farm-2"), "{events:#}");
    let r = app.get(&format!("/api/v1/t/{}/audit/verify", a.tenant), &a.token).await;
    assert_eq!(r.json::<Value>().await.unwrap()["ok"], true);
}

async fn start(app: &TestApp, m: &Member, pipeline: &str) -> String {
    let r = app.post(&format!("/api/v1/t/{}/pipelines/{pipeline}/runs", m.tenant), &m.token, json!({})).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
}

async fn run_view(app: &TestApp, m: &Member, id: &str) -> Value {
    app.get(&format!("/api/v1/t/{}/runs/{id}", m.tenant), &m.token).await.json().await.unwrap()
}

#[actix_web::test]
async fn the_embedded_worker_takes_only_what_its_labels_and_capacity_allow() {
    let app = spawn_app_with(|c| {
        c.worker.labels = vec!["linux".into()];
        c.worker.cpu_millis = 1000;
        c.worker.memory_bytes = 512 << 20;
        c.worker_slots = 4;
    })
    .await;
    let admin = app.signup(&slug("wkl")).await;
    let yaml = "stages:\n  - id: s\n    tasks:\n\
      \x20     - id: on-linux\n        runs_on: [linux]\n        shell: \"ulimit -v\"\n        resources: { memory: 64MiB }\n\
      \x20     - id: on-gpu\n        runs_on: [gpu]\n        noop: true\n\
      \x20     - id: too-big\n        resources: { cpu: 2 }\n        noop: true\n\
      \x20     - id: hosted\n        runs_on: [self-hosted]\n        noop: true\n";
    let r = app.create_pipeline(&admin, "placed", yaml).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    let id = start(&app, &admin, "placed").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let v = run_view(&app, &admin, &id).await;
        if task_of(&v, "on-linux")["status"] == "succeeded" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{v:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The declared memory is the task's address-space limit (ulimit -v is in KiB).
    let r = app.get(&format!("/api/v1/t/{}/runs/{id}/tasks/on-linux/logs", admin.tenant), &admin.token).await;
    let logs: Value = r.json().await.unwrap();
    assert_eq!(logs["lines"][0]["text"], "65536", "{logs}");
    // What this worker cannot serve stays queued: never claimed, never failed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = run_view(&app, &admin, &id).await;
    for key in ["on-gpu", "too-big", "hosted"] {
        assert_eq!(task_of(&v, key)["status"], "queued", "{key}: {v:#}");
    }
    assert_eq!(v["status"], "running");
    #[derive(FromQueryResult)]
    struct Owner {
        lease_owner: Option<String>,
    }
    let owners: Vec<Owner> = app
        .store()
        .query_all(
            app.store().db(),
            "SELECT lease_owner FROM task_runs WHERE run_id = $1 AND status = 'queued'",
            vec![Uuid::parse_str(&id).unwrap().into()],
        )
        .await
        .unwrap();
    assert_eq!(owners.len(), 3);
    assert!(owners.iter().all(|o| o.lease_owner.is_none()));
    let r =
        app.call(Method::POST, &format!("/api/v1/t/{}/runs/{id}/cancel", admin.tenant), Some(&admin.token), None).await;
    assert!(r.status().is_success());
}

#[actix_web::test]
async fn tasks_wait_for_free_cpu_before_they_are_claimed() {
    let app = spawn_app_with(|c| {
        c.worker.cpu_millis = 1000;
        c.worker_slots = 4;
    })
    .await;
    let admin = app.signup(&slug("wkc")).await;
    // Two tasks of one CPU each on a one-CPU worker with free slots: one after the other.
    let yaml = "stages:\n  - id: s\n    tasks:\n\
      \x20     - id: a\n        resources: { cpu: 1 }\n        sleep: 700ms\n\
      \x20     - id: b\n        resources: { cpu: 1 }\n        sleep: 700ms\n\
      \x20     - id: c\n        sleep: 700ms\n";
    let r = app.create_pipeline(&admin, "cpu-bound", yaml).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    let id = start(&app, &admin, "cpu-bound").await;
    let v = wait_run(&app, &admin, &id, 20).await;
    assert_eq!(v["status"], "succeeded", "{v:#}");
    let at = |k: &str, f: &str| chrono::DateTime::parse_from_rfc3339(task_of(&v, k)[f].as_str().unwrap()).unwrap();
    let (first, second) = if at("a", "started_at") < at("b", "started_at") { ("a", "b") } else { ("b", "a") };
    assert!(at(second, "started_at") >= at(first, "finished_at"), "{v:#}");
    // The task that declares nothing ran alongside.
    assert!(at("c", "started_at") < at(first, "finished_at"), "{v:#}");
}
