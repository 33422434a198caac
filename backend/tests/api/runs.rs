//! Runs executed by the embedded worker: a real engine, real processes, real database.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use sea_orm::ConnectionTrait;
use serde_json::{Value, json};

use crate::helpers::*;
use crate::shared_dir::SharedDir;

async fn start(app: &TestApp, m: &Member, pipeline: &str, body: Value) -> Value {
    let r = app.post(&format!("/api/v1/t/{}/pipelines/{pipeline}/runs", m.tenant), &m.token, body).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    r.json().await.unwrap()
}

async fn logs(app: &TestApp, m: &Member, run: &str, task: &str) -> Vec<String> {
    let r = app.get(&format!("/api/v1/t/{}/runs/{run}/tasks/{task}/logs", m.tenant), &m.token).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    v["lines"].as_array().unwrap().iter().map(|l| l["text"].as_str().unwrap_or_default().to_owned()).collect()
}

#[actix_web::test]
async fn a_chain_passes_outputs_and_params_and_succeeds() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("runs")).await;
    let yaml = r#"
params:
  greeting: { type: string, required: true }
stages:
  - id: build
    tasks:
      - id: make
        shell: 'echo "digest=sha-123" >> "$SLUICE_OUTPUT"; echo built'
      - id: show
        needs: [make]
        run: ["/bin/echo", "{{ tasks.make.outputs.digest }}", "{{ params.greeting }}"]
  - id: after
    needs: [build]
    tasks:
      - id: done
        noop: true
"#;
    assert_eq!(app.create_pipeline(&admin, "chain", yaml).await.status(), StatusCode::CREATED);
    let run = start(&app, &admin, "chain", json!({ "params": { "greeting": "hello; touch /tmp/x" } })).await;
    assert_eq!(run["version"], 1);
    let id = run["id"].as_str().unwrap();
    let done = wait_run(&app, &admin, id, 60).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(task_of(&done, "make")["outputs"], json!({ "digest": "sha-123" }));
    for key in ["make", "show", "done"] {
        assert_eq!(task_of(&done, key)["status"], "succeeded");
        assert_eq!(task_of(&done, key)["attempt"], 1);
    }
    assert_eq!(logs(&app, &admin, id, "make").await, vec!["built"]);
    // The parameter arrives as one argv element, untouched by any shell.
    assert_eq!(logs(&app, &admin, id, "show").await, vec!["sha-123 hello; touch /tmp/x"]);
}

#[actix_web::test]
async fn params_are_checked_and_idempotency_keys_return_the_same_run() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("runs")).await;
    let yaml = "params:\n  version: { type: string, required: true }\nstages:\n  - id: s\n    tasks:\n      - id: t\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "pp", yaml).await.status(), StatusCode::CREATED);
    let path = format!("/api/v1/t/{}/pipelines/pp/runs", admin.tenant);
    let r = app.post(&path, &admin.token, json!({})).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let p = problem(r).await;
    assert_eq!(p["errors"][0]["field"], "params.version", "{p}");
    let r = app.post(&path, &admin.token, json!({ "params": { "version": 3 } })).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let send = || {
        app.client
            .post(app.url(&path))
            .bearer_auth(&admin.token)
            .header("Idempotency-Key", "deploy-42")
            .json(&json!({ "params": { "version": "1.2.3" } }))
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let first: Value = first.json().await.unwrap();
    let again = send().await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let again: Value = again.json().await.unwrap();
    assert_eq!(first["id"], again["id"]);
    let list: Value =
        app.get(&format!("/api/v1/t/{}/runs?pipeline=pp", admin.tenant), &admin.token).await.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);

    // The key answers for that pipeline and that user only: the same key on another pipeline,
    // or from another member, starts a run of its own (never hands back somebody else's).
    assert_eq!(app.create_pipeline(&admin, "other", yaml).await.status(), StatusCode::CREATED);
    let editor = app.add_member(&admin, &["editors"]).await;
    let keyed = |m: &Member, pipeline: &str| {
        app.client
            .post(app.url(&format!("/api/v1/t/{}/pipelines/{pipeline}/runs", m.tenant)))
            .bearer_auth(&m.token)
            .header("Idempotency-Key", "deploy-42")
            .json(&json!({ "params": { "version": "9" } }))
            .send()
    };
    for (m, pipeline) in [(&admin, "other"), (&editor, "pp")] {
        let r = keyed(m, pipeline).await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{pipeline}");
        let v: Value = r.json().await.unwrap();
        assert_ne!(v["id"], first["id"], "{pipeline}");
    }
}

#[actix_web::test]
async fn retries_with_backoff_then_failure_skips_downstream() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("runs")).await;
    let yaml = r#"
stages:
  - id: s
    tasks:
      - id: flaky
        run: ["/bin/false"]
        retries: { max: 2, backoff: exponential, initial: 100ms }
      - id: next
        needs: [flaky]
        noop: true
      - id: cleanup
        needs: [flaky]
        when: on_failure
        noop: true
"#;
    assert_eq!(app.create_pipeline(&admin, "flaky", yaml).await.status(), StatusCode::CREATED);
    let run = start(&app, &admin, "flaky", json!({})).await;
    let done = wait_run(&app, &admin, run["id"].as_str().unwrap(), 60).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(task_of(&done, "flaky")["status"], "failed");
    assert_eq!(task_of(&done, "flaky")["attempt"], 3);
    assert_eq!(task_of(&done, "flaky")["exit_code"], 1);
    assert_eq!(task_of(&done, "next")["status"], "skipped");
    assert_eq!(task_of(&done, "cleanup")["status"], "succeeded");
}

#[actix_web::test]
async fn cancel_and_timeout_stop_running_tasks() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("runs")).await;
    let yaml = "stages:\n  - id: s\n    tasks:\n      - id: long\n        shell: 'sleep 300 & sleep 300'\n      - id: bounded\n        run: [\"/bin/sleep\", \"300\"]\n        timeout: 1s\n";
    assert_eq!(app.create_pipeline(&admin, "long", yaml).await.status(), StatusCode::CREATED);
    let run = start(&app, &admin, "long", json!({})).await;
    let id = run["id"].as_str().unwrap().to_owned();
    // The bounded task times out by itself.
    let bounded_failed = |v: &Value| task_of(v, "bounded")["status"] == "failed";
    let v = wait_until(&app, &admin, &id, 30, "the timeout did not fire", bounded_failed).await;
    assert_eq!(task_of(&v, "bounded")["message"], "timed out");
    assert_eq!(task_of(&v, "long")["status"], "running");
    let started = Instant::now();
    let r =
        app.call(Method::POST, &format!("/api/v1/t/{}/runs/{id}/cancel", admin.tenant), Some(&admin.token), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "cancelled");
    assert_eq!(task_of(&v, "long")["status"], "cancelled");
    assert!(started.elapsed() < Duration::from_secs(5));
    let audit: Value = app
        .get(&format!("/api/v1/t/{}/audit?action=run.cancel", admin.tenant), &admin.token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(audit["items"].as_array().unwrap().len(), 1);
}

#[actix_web::test]
async fn a_forty_task_chain_and_a_two_hundred_task_fan_out_with_a_join() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("runs")).await;
    let mut chain = String::from("stages:\n  - id: s\n    tasks:\n");
    for i in 0..40 {
        chain.push_str(&format!("      - id: t{i}\n        noop: true\n"));
        if i > 0 {
            chain.push_str(&format!("        needs: [t{}]\n", i - 1));
        }
    }
    assert_eq!(app.create_pipeline(&admin, "chain40", &chain).await.status(), StatusCode::CREATED);
    let fan = "params:\n  targets: { type: array, required: true }\nstages:\n  - id: s\n    tasks:\n      - id: each\n        for_each: '{{ params.targets }}'\n        noop: true\n      - id: join\n        needs: [each]\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "fan200", fan).await.status(), StatusCode::CREATED);
    let r1 = start(&app, &admin, "chain40", json!({})).await;
    let targets: Vec<String> = (0..200).map(|i| format!("host-{i}")).collect();
    let r2 = start(&app, &admin, "fan200", json!({ "params": { "targets": targets } })).await;
    let d1 = wait_run(&app, &admin, r1["id"].as_str().unwrap(), 120).await;
    assert_eq!(d1["status"], "succeeded");
    assert_eq!(d1["tasks"].as_array().unwrap().len(), 40);
    let d2 = wait_run(&app, &admin, r2["id"].as_str().unwrap(), 120).await;
    assert_eq!(d2["status"], "succeeded");
    let tasks = d2["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 201);
    assert!(tasks.iter().all(|t| t["status"] == "succeeded" && t["attempt"] == 1));
    let join = task_of(&d2, "join");
    let time = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
    let last_each = tasks.iter().filter(|t| t["task_id"] == "each").map(|t| time(&t["finished_at"])).max().unwrap();
    assert!(time(&join["started_at"]) >= last_each, "the join started before every instance finished");
}

#[actix_web::test]
async fn viewers_read_runs_but_cannot_start_or_cancel_them() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("runs")).await;
    let viewer = app.add_member(&admin, &["viewers"]).await;
    let yaml = "stages:\n  - id: s\n    tasks:\n      - id: t\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "pp", yaml).await.status(), StatusCode::CREATED);
    let t = &admin.tenant;
    let r = app.post(&format!("/api/v1/t/{t}/pipelines/pp/runs"), &viewer.token, json!({})).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let run = start(&app, &admin, "pp", json!({})).await;
    let id = run["id"].as_str().unwrap();
    assert_eq!(app.get(&format!("/api/v1/t/{t}/runs/{id}"), &viewer.token).await.status(), StatusCode::OK);
    assert_eq!(app.get(&format!("/api/v1/t/{t}/runs"), &viewer.token).await.status(), StatusCode::OK);
    let r = app.call(Method::POST, &format!("/api/v1/t/{t}/runs/{id}/cancel"), Some(&viewer.token), None).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = app.get(&format!("/api/v1/t/{t}/runs/00000000-0000-0000-0000-000000000000"), &viewer.token).await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

/// Reads server-sent events until `done` says stop (or 30 s pass); returns (event, data) pairs.
async fn read_events(mut r: reqwest::Response, done: impl Fn(&str, &Value) -> bool) -> Vec<(String, Value)> {
    let mut buf = String::new();
    let mut out = vec![];
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let Ok(Ok(Some(chunk))) = tokio::time::timeout(Duration::from_secs(30), r.chunk()).await else { break };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let frame: String = buf.drain(..end + 2).collect();
            let mut name = String::new();
            let mut data = Value::Null;
            for line in frame.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = n.to_owned();
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).unwrap();
                }
            }
            if name.is_empty() {
                continue;
            }
            let stop = done(&name, &data);
            out.push((name, data));
            if stop {
                return out;
            }
        }
    }
    out
}

#[actix_web::test]
async fn run_events_stream_status_changes_and_log_lines_live() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("events")).await;
    let yaml = "stages:\n  - id: s\n    tasks:\n      - id: talk\n        shell: 'sleep 1; echo hello from the task'\n      - id: after\n        needs: [talk]\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "chatty", yaml).await.status(), StatusCode::CREATED);
    let t = admin.tenant.clone();
    // The tenant stream sees every run of the tenant.
    let all = app.client.get(app.url(&format!("/api/v1/t/{t}/events"))).bearer_auth(&admin.token).send().await.unwrap();
    assert_eq!(all.status(), StatusCode::OK);
    let run = start(&app, &admin, "chatty", json!({})).await;
    let id = run["id"].as_str().unwrap().to_owned();
    let r = app
        .client
        .get(app.url(&format!("/api/v1/t/{t}/runs/{id}/events")))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let events = read_events(r, |name, data| name == "run" && data["status"] == "succeeded").await;
    assert_eq!(events[0].0, "snapshot");
    assert_eq!(events[0].1["run_id"], id.as_str());
    let log = events.iter().find(|(n, _)| n == "log").expect("a log event");
    assert_eq!(log.1["lines"][0]["text"], "hello from the task");
    assert!(events.iter().any(|(n, d)| n == "task" && d["index"] == 1 && d["status"] == "succeeded"));
    assert_eq!(events.last().unwrap().1["status"], "succeeded");
    let tenant_events = read_events(all, |name, data| name == "run" && data["status"] == "succeeded").await;
    assert!(tenant_events.iter().all(|(_, d)| d["run_id"] == id.as_str()));
    assert!(tenant_events.iter().any(|(n, d)| n == "run" && d["status"] == "running"));
    // A finished run answers its snapshot and ends.
    let r = app
        .client
        .get(app.url(&format!("/api/v1/t/{t}/runs/{id}/events")))
        .bearer_auth(&admin.token)
        .send()
        .await
        .unwrap();
    let body = r.text().await.unwrap();
    assert!(body.starts_with("event: snapshot\n") && body.contains("\"succeeded\""), "{body}");
}

async fn retry(app: &TestApp, m: &Member, id: &str) -> reqwest::Response {
    app.call(Method::POST, &format!("/api/v1/t/{}/runs/{id}/retry", m.tenant), Some(&m.token), None).await
}

#[actix_web::test]
async fn retrying_a_failed_run_carries_over_what_succeeded_and_runs_the_rest() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("retry")).await;
    let shared = SharedDir::new("retry");
    let marker = shared.path().join("marker");
    let m = marker.display();
    // `b` fails the first time (leaving the marker behind) and succeeds the second; templates are
    // rendered into argv elements only, so the shell reads them as positional parameters.
    let yaml = format!(
        r#"
params:
  who: {{ type: string, default: world }}
stages:
  - id: s
    tasks:
      - id: a
        shell: 'echo "x=from-a" >> "$SLUICE_OUTPUT"; echo a ran'
      - id: b
        needs: [a]
        run: ["/bin/sh", "-c", 'test -f "$0" || {{ touch "$0"; exit 1; }}; echo "got $1 $2"', "{m}", "{{{{ tasks.a.outputs.x }}}}", "{{{{ params.who }}}}"]
"#
    );
    assert_eq!(app.create_pipeline(&admin, "flaky-b", &yaml).await.status(), StatusCode::CREATED);
    let run = start(&app, &admin, "flaky-b", json!({ "params": { "who": "there" } })).await;
    let id = run["id"].as_str().unwrap().to_owned();
    let first = wait_run(&app, &admin, &id, 60).await;
    assert_eq!(first["status"], "failed", "{first:#}");
    assert_eq!(task_of(&first, "a")["status"], "succeeded");
    assert_eq!(task_of(&first, "b")["status"], "failed");
    assert_eq!(first["retry_of"], Value::Null);

    let r = retry(&app, &admin, &id).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    let second: Value = r.json().await.unwrap();
    let id2 = second["id"].as_str().unwrap().to_owned();
    assert_ne!(id2, id);
    assert_eq!(second["retry_of"], id.as_str());
    assert_eq!(second["trigger"], "retry");
    assert_eq!(second["version"], first["version"]);
    assert_eq!(second["params"], json!({ "who": "there" }));
    let done = wait_run(&app, &admin, &id2, 60).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    // `a` was carried over, not run again.
    let (a1, a2) = (task_of(&first, "a"), task_of(&done, "a"));
    assert_eq!(a2["status"], "succeeded");
    for field in ["attempt", "started_at", "finished_at", "exit_code", "outputs"] {
        assert_eq!(a2[field], a1[field], "{field}");
    }
    assert_eq!(a2["outputs"], json!({ "x": "from-a" }));
    assert_eq!(logs(&app, &admin, &id2, "a").await, Vec::<String>::new());
    assert_eq!(logs(&app, &admin, &id, "a").await, vec!["a ran"]);
    // `b` ran again, from attempt 1, and saw `a`'s output and the original params.
    assert_eq!(task_of(&done, "b")["status"], "succeeded");
    assert_eq!(task_of(&done, "b")["attempt"], 1);
    assert_eq!(logs(&app, &admin, &id2, "b").await, vec!["got from-a there"]);
    // The original run is untouched.
    let again: Value =
        app.get(&format!("/api/v1/t/{}/runs/{id}", admin.tenant), &admin.token).await.json().await.unwrap();
    assert_eq!(again["status"], "failed");
    assert_eq!(task_of(&again, "b")["status"], "failed");
    // Audited as run.retry.
    let audit: Value = app
        .get(&format!("/api/v1/t/{}/audit?action=run.retry", admin.tenant), &admin.token)
        .await
        .json()
        .await
        .unwrap();
    let items = audit["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{audit:#}");
    assert_eq!(items[0]["resource_id"], id2.as_str());
    assert_eq!(items[0]["details"]["retry_of"], id.as_str());
    assert_eq!(items[0]["details"]["carried_over"], json!(["a"]));
    // The retry succeeded: it cannot be retried; the original (failed) still can.
    let r = retry(&app, &admin, &id2).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let list: Value =
        app.get(&format!("/api/v1/t/{}/runs?trigger=retry", admin.tenant), &admin.token).await.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    assert_eq!(list["items"][0]["retry_of"], id.as_str());
}

#[actix_web::test]
async fn only_finished_unsuccessful_runs_can_be_retried_and_only_by_those_allowed() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("retry")).await;
    let viewer = app.add_member(&admin, &["viewers"]).await;
    let t = &admin.tenant;
    let ok = "stages:\n  - id: s\n    tasks:\n      - id: t\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "ok", ok).await.status(), StatusCode::CREATED);
    let long = "stages:\n  - id: s\n    tasks:\n      - id: t\n        run: [\"/bin/sleep\", \"300\"]\n";
    assert_eq!(app.create_pipeline(&admin, "long", long).await.status(), StatusCode::CREATED);
    // Succeeded → 409.
    let run = start(&app, &admin, "ok", json!({})).await;
    let done = wait_run(&app, &admin, run["id"].as_str().unwrap(), 60).await;
    assert_eq!(done["status"], "succeeded");
    let r = retry(&app, &admin, run["id"].as_str().unwrap()).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(problem(r).await["status"], 409);
    // Still going → 409.
    let run = start(&app, &admin, "long", json!({})).await;
    let id = run["id"].as_str().unwrap().to_owned();
    assert_eq!(retry(&app, &admin, &id).await.status(), StatusCode::CONFLICT);
    // Viewers may not retry, whatever the status.
    assert_eq!(retry(&app, &viewer, &id).await.status(), StatusCode::FORBIDDEN);
    let r = app.call(Method::POST, &format!("/api/v1/t/{t}/runs/{id}/cancel"), Some(&admin.token), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(retry(&app, &viewer, &id).await.status(), StatusCode::FORBIDDEN);
    // A cancelled run can be retried; nothing succeeded, so everything runs again.
    let r = retry(&app, &admin, &id).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let second: Value = r.json().await.unwrap();
    assert_eq!(second["retry_of"], id.as_str());
    assert!(["queued", "running"].contains(&task_of(&second, "t")["status"].as_str().unwrap()), "{second:#}");
    let id2 = second["id"].as_str().unwrap();
    let r = app.call(Method::POST, &format!("/api/v1/t/{t}/runs/{id2}/cancel"), Some(&admin.token), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    // No such run → 404.
    let r = retry(&app, &admin, "00000000-0000-0000-0000-000000000000").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
}

#[actix_web::test]
async fn outputs_work_with_a_relative_data_folder() {
    // The default data folder is relative (`./sluice-data`); tasks run in their own directory.
    let target = std::env::temp_dir().join(format!("sluice-rel-{}", uuid::Uuid::new_v4().simple()));
    let cwd = std::env::current_dir().unwrap();
    let up = "../".repeat(cwd.components().count().saturating_sub(1));
    let relative = std::path::PathBuf::from(format!("{up}{}", target.display().to_string().trim_start_matches('/')));
    assert!(relative.is_relative());
    let app = spawn_app_with(move |c| c.data_dir = relative).await;
    let admin = app.signup(&slug("relative")).await;
    let yaml =
        "stages:\n  - id: s\n    tasks:\n      - id: out\n        shell: 'echo \"answer=42\" >> \"$SLUICE_OUTPUT\"'\n";
    assert_eq!(app.create_pipeline(&admin, "rel", yaml).await.status(), StatusCode::CREATED);
    let run = start(&app, &admin, "rel", json!({})).await;
    let done = wait_run(&app, &admin, run["id"].as_str().unwrap(), 30).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(task_of(&done, "out")["outputs"], json!({ "answer": "42" }));
    let _ = std::fs::remove_dir_all(target);
}

#[actix_web::test]
async fn run_list_filters_with_unknown_values_are_refused_naming_the_field() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("runs")).await;
    for (query, field) in [("status=finished", "status"), ("trigger=manual", "trigger")] {
        let r = app.get(&format!("/api/v1/t/{}/runs?{query}", admin.tenant), &admin.token).await;
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{query}");
        let p = problem(r).await;
        assert_eq!(p["errors"][0]["field"], field, "{p:#}");
    }
    let r = app.get(&format!("/api/v1/t/{}/runs?status=succeeded&trigger=cron", admin.tenant), &admin.token).await;
    assert_eq!(r.status(), StatusCode::OK);
}

#[actix_web::test]
async fn watchers_are_told_when_events_may_have_been_missed() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("gaps")).await;
    let t = admin.tenant.clone();
    #[derive(sea_orm::FromQueryResult)]
    struct Id {
        id: uuid::Uuid,
    }
    let store = &app.state.store;
    let tenant: Id = store
        .query_one(store.db(), "SELECT id FROM tenants WHERE slug = $1", vec![t.clone().into()])
        .await
        .unwrap()
        .unwrap();
    let open = || app.client.get(app.url(&format!("/api/v1/t/{t}/events"))).bearer_auth(&admin.token).send();
    let events = app.state.engine.event_sender();

    // The relay between server processes was interrupted.
    let r = open().await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    events.send(sluice_backend::engine::RunEvent::gap()).unwrap();
    let got = read_events(r, |name, _| name == "lagged").await;
    assert_eq!(
        got.last().map(|(n, d)| (n.as_str(), d["reason"].as_str())),
        Some(("lagged", Some("relay_interrupted")))
    );

    // This client fell behind: more events than the server keeps for a slow reader.
    let r = open().await.unwrap();
    let event = sluice_backend::engine::RunEvent {
        lines: vec![json!({ "at": "2026-01-01T00:00:00Z", "stream": "out", "text": "x" })],
        index: Some(0),
        attempt: Some(1),
        ..sluice_backend::engine::RunEvent::gap()
    };
    for _ in 0..10_000 {
        let _ = events.send(sluice_backend::engine::RunEvent {
            tenant: tenant.id,
            kind: "log",
            relayed: false,
            ..event.clone()
        });
    }
    let got = read_events(r, |name, _| name == "lagged").await;
    let (name, data) = got.last().unwrap();
    assert_eq!((name.as_str(), data["reason"].as_str()), ("lagged", Some("slow_client")), "{got:?}");
    assert!(data["missed"].as_u64().is_some_and(|n| n > 0), "{data}");
}

#[actix_web::test]
async fn concurrent_starts_with_one_idempotency_key_make_one_run() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("idem")).await;
    let yaml = "stages:\n  - id: s\n    tasks:\n      - id: t\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "pp", yaml).await.status(), StatusCode::CREATED);
    let path = format!("/api/v1/t/{}/pipelines/pp/runs", admin.tenant);
    let send = || {
        app.client
            .post(app.url(&path))
            .bearer_auth(&admin.token)
            .header("Idempotency-Key", "same")
            .json(&json!({}))
            .send()
    };
    let answers = futures_util::future::join_all((0..8).map(|_| send())).await;
    let mut created = 0;
    let mut ids = std::collections::HashSet::new();
    for r in answers {
        let r = r.unwrap();
        match r.status() {
            StatusCode::CREATED => created += 1,
            StatusCode::OK => {}
            other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
        }
        let v: Value = r.json().await.unwrap();
        ids.insert(v["id"].as_str().unwrap().to_owned());
    }
    assert_eq!((created, ids.len()), (1, 1), "{ids:?}");
    let list: Value =
        app.get(&format!("/api/v1/t/{}/runs?pipeline=pp", admin.tenant), &admin.token).await.json().await.unwrap();
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
}

/// A database that refuses writes for a moment as a task ends (a restart, a failover) does not
/// cost the attempt: the worker records the result once the database answers again, and the
/// task is not executed a second time.
#[actix_web::test]
async fn a_completion_the_database_refuses_for_a_moment_is_recorded_once_it_answers() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("blip")).await;
    let yaml = "stages:\n  - id: s\n    tasks:\n      - id: t\n        sleep: 1s\n";
    assert_eq!(app.create_pipeline(&admin, "blip", yaml).await.status(), StatusCode::CREATED);
    // While refusing, no task may be recorded as succeeded.
    app.refuse_writes("UPDATE ON task_runs", Some("NEW.status = 'succeeded'")).await;
    let run = start(&app, &admin, "blip", json!({})).await;
    let id = run["id"].as_str().unwrap().to_owned();
    wait_until(&app, &admin, &id, 30, "the task never ran", |v| task_of(v, "t")["status"] == "running").await;
    // Refused from before the task ends (after 1 s) until 0.5 s after.
    app.refusing(true).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    app.refusing(false).await;
    let v = wait_run(&app, &admin, &id, 30).await;
    assert_eq!(v["status"], "succeeded", "{v:#}");
    let t = task_of(&v, "t");
    assert_eq!(t["attempt"], 1, "the task ran again: {v:#}");
    // Recorded after the refusal ended, so the first tries were indeed refused.
    let at = |f: &str| chrono::DateTime::parse_from_rfc3339(t[f].as_str().unwrap()).unwrap();
    assert!(at("finished_at") - at("started_at") >= chrono::Duration::milliseconds(1300), "{v:#}");
}

/// When the worker runs as root, each process task runs as a uid of the task range of its own,
/// and nothing it started outlives it, a process that left its process group included.
#[actix_web::test]
async fn process_tasks_run_as_task_users_of_their_own_and_leave_nothing_running() {
    let Some(app) = app_that_switches_users().await else { return };
    let admin = app.signup(&slug("uids")).await;
    let marker = format!("98{}", rand_digits());
    let task = |id: &str| {
        format!(
            "      - id: {id}\n        shell: 'setsid sleep {marker} & sleep 0.5; echo \"uid=$(id -u)\" >> \"$SLUICE_OUTPUT\"'\n"
        )
    };
    let yaml = format!("stages:\n  - id: s\n    tasks:\n{}{}", task("a"), task("b"));
    assert_eq!(app.create_pipeline(&admin, "uids", &yaml).await.status(), StatusCode::CREATED);
    let run = start(&app, &admin, "uids", json!({})).await;
    let done = wait_run(&app, &admin, run["id"].as_str().unwrap(), 30).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let uid = |t: &str| task_of(&done, t)["outputs"]["uid"].as_str().unwrap().parse::<u32>().unwrap();
    let (a, b) = (uid("a"), uid("b"));
    let (first, count) = sluice_backend::config::DEFAULT_TASK_UIDS;
    for u in [a, b] {
        assert!((first..first + count).contains(&u), "uid {u} is outside the task range");
    }
    // The two ran at the same time (0.5 s each, 4 slots), each as its own user.
    let at = |t: &str, f: &str| chrono::DateTime::parse_from_rfc3339(task_of(&done, t)[f].as_str().unwrap()).unwrap();
    assert!(at("a", "started_at") < at("b", "finished_at") && at("b", "started_at") < at("a", "finished_at"));
    assert_ne!(a, b);
    let left: Vec<_> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == format!("sleep\0{marker}\0").as_bytes()))
        .collect();
    assert!(left.is_empty(), "{} processes a task started still run", left.len());
}

/// D22 through the whole platform: two tenants' tasks on one shared worker at the same time. The
/// one cannot read the other's work directory, environment or command line, where the other's
/// secret is.
#[actix_web::test]
async fn d22_a_tenants_task_cannot_reach_another_tenants_task_on_a_shared_worker() {
    let Some(app) = app_that_switches_users().await else { return };
    let (a, b) = (app.signup(&slug("d22a")).await, app.signup(&slug("d22b")).await);
    let shared = SharedDir::new("d22");
    let dir = shared.path().display().to_string();
    let secret = format!("b-secret-{}", rand_digits());
    let r = app.put(&format!("/api/v1/t/{}/secrets/TOKEN", b.tenant), &b.token, json!({ "value": secret })).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    // B's task holds the secret in its environment, its argv and a file of its work directory,
    // and says where they are.
    let hold = format!(
        r#"stages:
  - id: s
    tasks:
      - id: hold
        run: ["/bin/sh", "-c", 'echo "$TOKEN" > "$SLUICE_WORKDIR/data"; umask 0; echo "$SLUICE_WORKDIR $$" > {dir}/b.tmp; mv {dir}/b.tmp {dir}/b; sleep 3', "{{{{ secrets.TOKEN }}}}"]
        env: {{ TOKEN: "{{{{ secrets.TOKEN }}}}" }}
        secrets: [TOKEN]
"#
    );
    assert_eq!(app.create_pipeline(&b, "hold", &hold).await.status(), StatusCode::CREATED);
    let probe = format!(
        r#"stages:
  - id: s
    tasks:
      - id: probe
        shell: 'while [ ! -f {dir}/b ]; do sleep 0.05; done; read d p < {dir}/b; cat "$d/data"; cat /proc/$p/environ; cat /proc/[0-9]*/cmdline | tr "\0" " "; echo; ls "$d"; echo probed'
"#
    );
    assert_eq!(app.create_pipeline(&a, "probe", &probe).await.status(), StatusCode::CREATED);
    let held = start(&app, &b, "hold", json!({})).await;
    let probed = start(&app, &a, "probe", json!({})).await;
    let probed_id = probed["id"].as_str().unwrap();
    let done = wait_run(&app, &a, probed_id, 30).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let lines = logs(&app, &a, probed_id, "probe").await;
    assert!(lines.iter().any(|l| l == "probed"), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains(&secret)), "A read B's secret: {lines:?}");
    let refused = lines.iter().filter(|l| l.contains("ermission denied") || l.contains("No such file")).count();
    assert!(refused >= 3, "{lines:?}");
    // B's task was running all along, and ends well.
    let b_done = wait_run(&app, &b, held["id"].as_str().unwrap(), 30).await;
    assert_eq!(b_done["status"], "succeeded", "{b_done:#}");
    let at = |v: &Value, t: &str| {
        chrono::DateTime::parse_from_rfc3339(task_of(v, t)["finished_at"].as_str().unwrap()).unwrap()
    };
    assert!(at(&done, "probe") < at(&b_done, "hold"), "B had ended before A probed");
}

/// An app whose worker runs tasks as task users, or `None` (with a note) when the tests do not
/// run as root.
async fn app_that_switches_users() -> Option<TestApp> {
    if !sluice_worker::can_switch_users() {
        eprintln!("note: skipped: the worker switches users only when it runs as root");
        return None;
    }
    Some(spawn_app().await)
}

/// A few random digits, for a command line no other test uses.
fn rand_digits() -> String {
    format!("{:06}", uuid::Uuid::new_v4().as_u128() % 1_000_000)
}

/// Tasks may run as another user (a task user, when the worker runs as root): the database file
/// with its WAL, and the listing of the work root, are closed to other users.
#[cfg(unix)]
#[actix_web::test]
async fn the_database_and_the_work_root_are_closed_to_other_users() {
    use std::os::unix::fs::PermissionsExt;
    let app = spawn_app().await;
    // Something written, so that the WAL exists.
    app.signup(&slug("files")).await;
    let mode = |name: &str| std::fs::metadata(app.data_dir.join(name)).unwrap().permissions().mode() & 0o777;
    if app.store().backend() == sea_orm::DbBackend::Sqlite {
        for file in ["sluice.db", "sluice.db-wal", "sluice.db-shm"] {
            assert_eq!(mode(file), 0o600, "{file}");
        }
    }
    assert_eq!(mode("work"), 0o711);
}

/// `SLUICE_TASK_NETWORK=none` through the whole platform: a process task cannot reach a service on
/// the machine's loopback (here the API server itself, as the database or Redis could be), which
/// the same task reaches with the default, `host`.
#[actix_web::test]
async fn with_task_network_none_a_task_reaches_no_service_of_the_machine() {
    if !sluice_worker::can_switch_users() {
        eprintln!("note: skipped: tasks get a network of their own only from a worker running as root");
        return;
    }
    async fn probe(app: &TestApp) -> Value {
        let admin = app.signup(&slug("net")).await;
        let port = app.base.rsplit(':').next().unwrap();
        let yaml = format!(
            r#"stages:
  - id: s
    tasks:
      - id: probe
        run: ["/bin/bash", "-c", 'if (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null; then r=reached; else r=unreachable; fi; echo "api=$r" >> "$SLUICE_OUTPUT"']
"#
        );
        assert_eq!(app.create_pipeline(&admin, "net", &yaml).await.status(), StatusCode::CREATED);
        let run = start(app, &admin, "net", json!({})).await;
        let done = wait_run(app, &admin, run["id"].as_str().unwrap(), 30).await;
        assert_eq!(done["status"], "succeeded", "{done:#}");
        task_of(&done, "probe")["outputs"]["api"].clone()
    }
    let isolated = spawn_app_with(|c| c.task_network = sluice_worker::TaskNetwork::Isolated).await;
    assert_eq!(probe(&isolated).await, "unreachable");
    assert_eq!(probe(&spawn_app().await).await, "reached");
}

/// `SLUICE_TASK_SYSCALLS` through the whole platform: by default (`restricted`) a task user cannot
/// make a user namespace (which would make it root over one of its own); with `all` it can, where
/// the kernel lets unprivileged users.
#[actix_web::test]
async fn a_task_users_system_calls_are_restricted_unless_all_are_allowed() {
    use std::os::unix::process::CommandExt;
    if !sluice_worker::can_switch_users() || !sluice_worker::syscall_filter_supported() {
        eprintln!(
            "note: skipped: tasks are filtered only as task users, from a worker running as root on x86-64 or AArch64"
        );
        return;
    }
    async fn probe(app: &TestApp) -> Value {
        let admin = app.signup(&slug("sys")).await;
        let yaml = r#"stages:
  - id: s
    tasks:
      - id: probe
        shell: 'if unshare --user true 2>/dev/null; then r=made; else r=refused; fi; echo "userns=$r" >> "$SLUICE_OUTPUT"'
"#;
        assert_eq!(app.create_pipeline(&admin, "sys", yaml).await.status(), StatusCode::CREATED);
        let run = start(app, &admin, "sys", json!({})).await;
        let done = wait_run(app, &admin, run["id"].as_str().unwrap(), 30).await;
        assert_eq!(done["status"], "succeeded", "{done:#}");
        task_of(&done, "probe")["outputs"]["userns"].clone()
    }
    assert_eq!(probe(&spawn_app().await).await, "refused");
    // Whether this kernel lets an unprivileged user make one at all.
    let kernel_allows = std::process::Command::new("unshare")
        .args(["--user", "true"])
        .uid(65534)
        .gid(65534)
        .status()
        .is_ok_and(|s| s.success());
    let all = spawn_app_with(|c| c.task_syscalls = sluice_worker::TaskSyscalls::All).await;
    let made = probe(&all).await;
    if kernel_allows {
        assert_eq!(made, "made");
    } else {
        eprintln!("note: this kernel refuses unprivileged user namespaces; with all, the task got {made}");
    }
}

/// Changes task `key` of `run` as another process would (`set` is the SQL assignment), with
/// the run's revision, which every change of a task's state changes.
async fn changed_elsewhere(app: &TestApp, run: uuid::Uuid, key: &str, set: &str) {
    let sql = format!("UPDATE task_runs SET {set} WHERE run_id = $1 AND key = $2");
    assert_eq!(app.sql(&sql, vec![run.into(), key.into()]).await, 1, "task {key} is not in run {run}");
    app.sql("UPDATE runs SET rev = rev + 1 WHERE id = $1", vec![run.into()]).await;
}

/// The worker knows a run's state from its own writes; when another process changes the run
/// while a task runs, the task's completion is applied to the run as that process left it, not
/// to the state this worker knew.
#[actix_web::test]
async fn a_completion_sees_what_another_process_changed_while_its_task_ran() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("meanwhile")).await;
    // `wait` stays queued (no worker has its label); `work` runs for a moment.
    let yaml = "stages:\n  - id: s\n    tasks:\n      - id: work\n        sleep: 700ms\n      - id: wait\n        runs_on: [nowhere]\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "meanwhile", yaml).await.status(), StatusCode::CREATED);
    let v = start(&app, &admin, "meanwhile", json!({})).await;
    let id = v["id"].as_str().unwrap().to_owned();
    wait_until(&app, &admin, &id, 10, "the task never started", |v| task_of(v, "work")["status"] == "running").await;
    // Another process skips the waiting task.
    let run = uuid::Uuid::parse_str(&id).unwrap();
    changed_elsewhere(&app, run, "wait", "status = 'skipped', finished_at = CURRENT_TIMESTAMP").await;
    // With `work` done, nothing is left to wait for: the run ends.
    let v = wait_until(&app, &admin, &id, 15, "the run never ended", |v| v["status"] == "succeeded").await;
    assert_eq!(task_of(&v, "work")["status"], "succeeded", "{v:#}");
    assert_eq!(task_of(&v, "wait")["status"], "skipped", "{v:#}");
}

/// A claim of a task that another process queued, while this process still knows the task as
/// pending, is decided on the run as it is, not as it was known here.
#[actix_web::test]
async fn a_claim_of_a_task_another_process_queued_succeeds() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("queued-elsewhere")).await;
    let yaml = "stages:\n  - id: first\n    tasks:\n      - id: work\n        sleep: 2s\n  - id: then\n    needs: [first]\n    tasks:\n      - id: later\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "elsewhere", yaml).await.status(), StatusCode::CREATED);
    let v = start(&app, &admin, "elsewhere", json!({})).await;
    let id = v["id"].as_str().unwrap().to_owned();
    wait_until(&app, &admin, &id, 10, "the task never started", |v| task_of(v, "work")["status"] == "running").await;
    // Another process queues `later` (as a reaper would a retry that became due).
    let run = uuid::Uuid::parse_str(&id).unwrap();
    changed_elsewhere(&app, run, "later", "status = 'queued', attempt = 1, queued_at = CURRENT_TIMESTAMP").await;
    let d = sluice_backend::engine::Dispatch { run, task: 1, attempt: 1 };
    let claimed = app.state.engine.claim(d).await.unwrap();
    assert!(claimed.is_some(), "the queued task was not claimed");
    let v: Value = app.get(&format!("/api/v1/t/{}/runs/{id}", admin.tenant), &admin.token).await.json().await.unwrap();
    assert_eq!(task_of(&v, "later")["status"], "running", "{v:#}");
}

/// A process that read a run once (as a worker does to judge whether a task fits it) claims a
/// task of it as the run is when it claims: not after another process cancelled the run
/// meanwhile, and as the lease holder when nothing changed.
#[actix_web::test]
async fn a_claim_after_the_run_was_read_is_decided_on_the_run_as_it_is_then() {
    let app = spawn_app().await;
    let admin = app.signup(&slug("read-then-claim")).await;
    // No worker of this server has the label: the task stays queued for the other process.
    let yaml = "stages:\n  - id: s\n    tasks:\n      - id: a\n        runs_on: [elsewhere]\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "read-then-claim", yaml).await.status(), StatusCode::CREATED);
    let other = other_process(&app);
    // A new run, once its task is queued, read by the other process: its id and the task's
    // dispatch.
    let read_by_other = || async {
        let v = start(&app, &admin, "read-then-claim", json!({})).await;
        let id = v["id"].as_str().unwrap().to_owned();
        let queued = |v: &Value| task_of(v, "a")["status"] == "queued";
        let v = wait_until(&app, &admin, &id, 10, "the task was never queued", queued).await;
        let attempt = task_of(&v, "a")["attempt"].as_u64().unwrap() as u32;
        let run = uuid::Uuid::parse_str(&id).unwrap();
        other.plan_of(run).await.unwrap();
        (id, sluice_backend::engine::Dispatch { run, task: 0, attempt })
    };

    // Cancelled between the read and the claim: not claimed.
    let (id, d) = read_by_other().await;
    cancelled(&app, &admin, &id).await;
    assert!(other.claim(d).await.unwrap().is_none(), "a task of a cancelled run was claimed");
    let v: Value = app.get(&format!("/api/v1/t/{}/runs/{id}", admin.tenant), &admin.token).await.json().await.unwrap();
    assert_eq!(task_of(&v, "a")["status"], "cancelled", "{v:#}");

    // Unchanged since the read: claimed, and held by the other process.
    let (_, d) = read_by_other().await;
    let run = d.run;
    assert!(other.claim(d).await.unwrap().is_some(), "the queued task was not claimed");
    let held = app
        .sql(
            "UPDATE task_runs SET lost = lost WHERE run_id = $1 AND idx = 0 AND status = 'running' AND lease_owner = 'other-worker'",
            vec![run.into()],
        )
        .await;
    assert_eq!(held, 1, "the task is not running under the other process's lease");
    // Its lease is measured on the database's clock (a full lease from now, give or take).
    if app.store().backend() == sea_orm::DbBackend::Postgres {
        let lease = sluice_backend::engine::LEASE.as_secs() as i32;
        let measured = app
            .sql(
                "UPDATE task_runs SET lost = lost WHERE run_id = $1 AND idx = 0 \
                 AND lease_expires_at BETWEEN now() + make_interval(secs => $2 - 2) AND now() + make_interval(secs => $2)",
                vec![run.into(), lease.into()],
            )
            .await;
        assert_eq!(measured, 1, "the lease does not end a lease from now");
    }
}

/// Cancels run `id` and returns it once it is cancelled.
async fn cancelled(app: &TestApp, admin: &Member, id: &str) -> Value {
    let r = app.post(&format!("/api/v1/t/{}/runs/{id}/cancel", admin.tenant), &admin.token, json!({})).await;
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    wait_until(app, admin, id, 10, "the run was never cancelled", |v| v["status"] == "cancelled").await
}

/// The engine of another process on the test server's database (worker name `other-worker`;
/// what it rings goes nowhere).
fn other_process(app: &TestApp) -> sluice_backend::engine::Engine {
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let doorbell = std::sync::Arc::new(sluice_backend::engine::ChannelDoorbell(tx));
    sluice_backend::engine::Engine::named(app.store().clone(), doorbell, "other-worker".into())
}

/// A pipeline whose task `done` runs here and whose task `wait` stays queued (no worker of a
/// test server has its label), so that a run of it goes on.
const DONE_AND_WAITING: &str = "stages:\n  - id: s\n    tasks:\n      - id: done\n        noop: true\n      - id: wait\n        runs_on: [nowhere]\n        noop: true\n";

/// A server with a run of [`DONE_AND_WAITING`] (pipeline and tenant named after `name`) whose
/// task `done` succeeded: the server, the member, the run's id and the run as then read.
async fn a_run_past_done(name: &str) -> (TestApp, Member, String, Value) {
    let app = spawn_app().await;
    let admin = app.signup(&slug(name)).await;
    assert_eq!(app.create_pipeline(&admin, name, DONE_AND_WAITING).await.status(), StatusCode::CREATED);
    let v = start(&app, &admin, name, json!({})).await;
    let id = v["id"].as_str().unwrap().to_owned();
    let v =
        wait_until(&app, &admin, &id, 10, "the task never ran", |v| task_of(v, "done")["status"] == "succeeded").await;
    (app, admin, id, v)
}

/// Claims `d` for `engine` while another transaction holds its run (on SQLite, the database's
/// write lock); `None` when the claim did not answer within 2 s.
async fn claim_while_the_run_is_held(
    app: &TestApp,
    engine: &sluice_backend::engine::Engine,
    d: sluice_backend::engine::Dispatch,
) -> Option<Option<sluice_backend::engine::Claimed>> {
    let store = app.store();
    let txn = store.write().await.unwrap();
    store.execute(&*txn, "UPDATE runs SET rev = rev WHERE id = $1", vec![d.run.into()]).await.unwrap();
    let claimed = tokio::time::timeout(Duration::from_secs(2), engine.claim(d)).await;
    drop(txn);
    claimed.ok().map(Result::unwrap)
}

/// A claim of an attempt that this process knows has left its queue (it ran here) is refused
/// at once, without the database: it does not wait for the run's lock, which another
/// transaction holds. So is a claim of any task of a run that ended.
#[actix_web::test]
async fn a_claim_of_an_attempt_known_to_be_past_its_queue_needs_no_database() {
    let (app, admin, id, v) = a_run_past_done("stale-claim").await;
    let attempt = task_of(&v, "done")["attempt"].as_u64().unwrap() as u32;
    let run = uuid::Uuid::parse_str(&id).unwrap();
    let d = sluice_backend::engine::Dispatch { run, task: 0, attempt };
    let claimed =
        claim_while_the_run_is_held(&app, &app.state.engine, d).await.expect("the claim waited for the database");
    assert!(claimed.is_none(), "a finished attempt was claimed");

    // Once the run ended, no task of it is claimed, whatever its attempt was.
    let v = cancelled(&app, &admin, &id).await;
    let attempt = task_of(&v, "wait")["attempt"].as_u64().unwrap() as u32;
    let d = sluice_backend::engine::Dispatch { run, task: 1, attempt };
    let claimed = claim_while_the_run_is_held(&app, &app.state.engine, d)
        .await
        .expect("the claim of an ended run waited for the database");
    assert!(claimed.is_none(), "a task of an ended run was claimed");
}

/// A process that reads a run for the first time after it ended (a worker to which rings of it
/// come late) knows it ended: the rings that still come for its tasks are answered without the
/// database (PostgreSQL; elsewhere a first read brings only the plan).
#[actix_web::test]
async fn rings_of_a_run_first_read_after_it_ended_need_no_database() {
    if !use_postgres() {
        return;
    }
    let (app, admin, id, _) = a_run_past_done("ended-then-read").await;
    let v = cancelled(&app, &admin, &id).await;
    let attempt = task_of(&v, "wait")["attempt"].as_u64().unwrap() as u32;
    let run = uuid::Uuid::parse_str(&id).unwrap();
    let other = other_process(&app);
    other.plan_of(run).await.unwrap();
    let d = sluice_backend::engine::Dispatch { run, task: 1, attempt };
    let claimed = claim_while_the_run_is_held(&app, &other, d).await.expect("the claim waited for the database");
    assert!(claimed.is_none(), "a task of an ended run was claimed");
}

/// A start whose caller stops waiting for it while its write waits for the database (a request
/// whose client went away) still hands its task to the worker once written: the run goes on at
/// once, with no attempt lost (SQLite, where another connection can hold the write lock).
#[actix_web::test]
async fn a_start_whose_caller_went_away_still_runs_its_task() {
    if use_postgres() {
        return;
    }
    let app = spawn_app().await;
    let admin = app.signup(&slug("went-away")).await;
    let yaml = "stages:\n  - id: s\n    tasks:\n      - id: a\n        noop: true\n";
    assert_eq!(app.create_pipeline(&admin, "went-away", yaml).await.status(), StatusCode::CREATED);
    // A first start, so that the process knows the tenant's chain head.
    let first = start(&app, &admin, "went-away", json!({})).await;
    let first = first["id"].as_str().unwrap().to_owned();
    assert_eq!(wait_run(&app, &admin, &first, 10).await["status"], "succeeded");

    #[derive(sea_orm::FromQueryResult)]
    struct Id {
        id: uuid::Uuid,
    }
    let store = app.store();
    let tenant: Id = store
        .query_one(store.db(), "SELECT id FROM tenants WHERE slug = $1", vec![admin.tenant.clone().into()])
        .await
        .unwrap()
        .unwrap();
    let state = &app.state;
    let pipeline = sluice_backend::service::runs::find_pipeline(state, tenant.id, "went-away").await.unwrap();
    let actor = sluice_backend::audit::Actor { kind: "system", id: None, label: "test".into() };
    let (source, params) = (sluice_backend::audit::Source::default(), serde_json::Map::new());
    let req = sluice_backend::service::runs::StartRun {
        tenant: tenant.id,
        pipeline: &pipeline,
        version: None,
        params: &params,
        trigger: "api",
        initiator: None,
        actor: &actor,
        source: &source,
        policy_ids: &[],
        idempotency_key: None,
        retry: None,
    };
    // Another connection holds SQLite's write lock: the start's write waits for it.
    let other = hold_sqlite_write_lock(&app).await;
    let start = sluice_backend::service::runs::start_run(state, req);
    assert!(tokio::time::timeout(Duration::from_millis(300), start).await.is_err(), "the start did not wait");
    other.execute_unprepared("COMMIT").await.unwrap();

    let second: Id = loop {
        let run: Option<Id> = store
            .query_one(
                store.db(),
                "SELECT id FROM runs WHERE tenant_id = $1 AND id <> $2",
                vec![tenant.id.into(), uuid::Uuid::parse_str(&first).unwrap().into()],
            )
            .await
            .unwrap();
        if let Some(run) = run {
            break run;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let v = wait_run(&app, &admin, &second.id.to_string(), 5).await;
    assert_eq!(v["status"], "succeeded", "{v:#}");
    assert_eq!(task_of(&v, "a")["attempt"], 1, "{v:#}");
}

/// A change that did not commit leaves nothing of itself in what the process knows of the run:
/// after a cancel that failed, the run's queued task is still claimed.
#[actix_web::test]
async fn a_change_that_failed_leaves_the_run_as_it_was_known() {
    let (app, admin, id, v) = a_run_past_done("rolled-back").await;
    let attempt = task_of(&v, "wait")["attempt"].as_u64().unwrap() as u32;
    // The cancel's audit event, written after the run's change, fails: its transaction rolls
    // back.
    app.refuse_writes("INSERT ON audit_events", Some("NEW.action = 'run.cancel'")).await;
    app.refusing(true).await;
    let r = app.post(&format!("/api/v1/t/{}/runs/{id}/cancel", admin.tenant), &admin.token, json!({})).await;
    assert!(r.status().is_server_error(), "{}", r.status());
    app.refusing(false).await;
    let run = uuid::Uuid::parse_str(&id).unwrap();
    let d = sluice_backend::engine::Dispatch { run, task: 1, attempt };
    assert!(app.state.engine.claim(d).await.unwrap().is_some(), "the queued task was not claimed");
    let v: Value = app.get(&format!("/api/v1/t/{}/runs/{id}", admin.tenant), &admin.token).await.json().await.unwrap();
    assert_eq!(v["status"], "running", "{v:#}");
    assert_eq!(task_of(&v, "wait")["status"], "running", "{v:#}");
}
