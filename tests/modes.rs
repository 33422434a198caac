//! The run features, end to end in production mode: PostgreSQL, Redis, one `sluice serve` that
//! executes no task itself (it is started with `SLUICE_REDIS_URL`), and two `sluice worker`
//! processes. One cluster; the scenarios run concurrently, each on a pipeline and runs of its own.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use chrono::Utc;
use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sluice_backend::triggers::webhook;

fn time(v: &Value) -> chrono::DateTime<chrono::FixedOffset> {
    chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a time: {v}"))).unwrap()
}

fn tasks(run: &Value) -> &Vec<Value> {
    run["tasks"].as_array().unwrap()
}

/// A 40-task chain: every hop is a dispatch through Redis; each task starts after the previous
/// one finished.
async fn chain_of_forty(c: &Cluster, api: &Api) {
    let mut chain = String::from("stages:\n  - id: s\n    tasks:\n");
    for i in 0..40 {
        chain.push_str(&format!("      - id: t{i}\n        noop: true\n"));
        if i > 0 {
            chain.push_str(&format!("        needs: [t{}]\n", i - 1));
        }
    }
    api.create_pipeline("chain40", &chain).await;
    let started = Instant::now();
    let id = api.start("chain40", json!({})).await;
    let done = api.wait(c, &id, 180).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(tasks(&done).len(), 40);
    for i in 1..40 {
        let (prev, this) = (task_of(&done, &format!("t{}", i - 1)), task_of(&done, &format!("t{i}")));
        assert_eq!(this["status"], "succeeded");
        assert_eq!(this["attempt"], 1);
        assert!(time(&this["started_at"]) >= time(&prev["finished_at"]), "t{i} started before t{} ended", i - 1);
    }
    eprintln!("chain of 40: {:?}", started.elapsed());
}

/// A 200-way fan-out over a list param, then a join that starts after every instance ended.
async fn fan_out_of_two_hundred(c: &Cluster, api: &Api) {
    let fan = "params:\n  targets: { type: array, required: true }\nstages:\n  - id: s\n    tasks:\n      - id: each\n        for_each: '{{ params.targets }}'\n        noop: true\n      - id: join\n        needs: [each]\n        noop: true\n";
    api.create_pipeline("fan200", fan).await;
    let targets: Vec<String> = (0..200).map(|i| format!("host-{i}")).collect();
    let started = Instant::now();
    let id = api.start("fan200", json!({ "params": { "targets": targets } })).await;
    let done = api.wait(c, &id, 240).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let all = tasks(&done);
    assert_eq!(all.len(), 201);
    assert!(all.iter().all(|t| t["status"] == "succeeded" && t["attempt"] == 1), "{done:#}");
    for i in [0, 99, 199] {
        task_of(&done, &format!("each[{i}]"));
    }
    let last_each = all.iter().filter(|t| t["task_id"] == "each").map(|t| time(&t["finished_at"])).max().unwrap();
    assert!(time(&task_of(&done, "join")["started_at"]) >= last_each, "the join started before every instance ended");
    eprintln!("fan-out of 200 + join: {:?}", started.elapsed());
}

/// `when:` on_success / on_failure / always, after a failure and after a success; everything
/// downstream of the failure (tasks and a later stage) is skipped.
async fn when_conditions(c: &Cluster, api: &Api) {
    let yaml = r#"
stages:
  - id: s
    tasks:
      - id: bad
        run: ["/bin/false"]
      - id: next
        needs: [bad]
        noop: true
      - id: after-next
        needs: [next]
        noop: true
      - id: rescue
        needs: [bad]
        when: on_failure
        noop: true
      - id: finally
        needs: [bad]
        when: always
        noop: true
      - id: good
        noop: true
      - id: no-rescue
        needs: [good]
        when: on_failure
        noop: true
      - id: good-always
        needs: [good]
        when: always
        noop: true
      - id: good-next
        needs: [good]
        noop: true
  - id: later
    needs: [s]
    tasks:
      - id: deploy
        noop: true
"#;
    api.create_pipeline("when", yaml).await;
    let id = api.start("when", json!({})).await;
    let done = api.wait(c, &id, 120).await;
    assert_eq!(done["status"], "failed", "{done:#}");
    let expected = [
        ("bad", "failed"),
        ("next", "skipped"),
        ("after-next", "skipped"),
        ("rescue", "succeeded"),
        ("finally", "succeeded"),
        ("good", "succeeded"),
        ("no-rescue", "skipped"),
        ("good-always", "succeeded"),
        ("good-next", "succeeded"),
        ("deploy", "skipped"),
    ];
    for (key, status) in expected {
        assert_eq!(task_of(&done, key)["status"], status, "{key}: {done:#}");
    }
    assert_eq!(task_of(&done, "bad")["exit_code"], 1);
}

/// A task that fails twice and then succeeds (it counts its attempts in a file under a directory
/// given as a param), with exponential backoff between attempts.
async fn retries_with_backoff(c: &Cluster, api: &Api, dir: &SharedDir) {
    let yaml = r#"
params:
  dir: { type: string, required: true }
stages:
  - id: s
    tasks:
      - id: flaky
        shell: 'umask 0; n=$(cat "$DIR/count" 2>/dev/null || echo 0); n=$((n+1)); echo "$n" > "$DIR/count"; date +%s%N >> "$DIR/times"; echo "attempt $SLUICE_ATTEMPT try $n"; [ "$n" -ge 3 ]'
        env: { DIR: "{{ params.dir }}" }
        retries: { max: 3, backoff: exponential, initial: 500ms }
      - id: after
        needs: [flaky]
        noop: true
"#;
    api.create_pipeline("flaky", yaml).await;
    let sub = dir.path().join("retries");
    std::fs::create_dir(&sub).unwrap();
    std::fs::set_permissions(&sub, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let id = api.start("flaky", json!({ "params": { "dir": sub.to_string_lossy() } })).await;
    let done = api.wait(c, &id, 120).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", c.logs());
    let flaky = task_of(&done, "flaky");
    assert_eq!(flaky["attempt"], 3, "{done:#}");
    assert_eq!(task_of(&done, "after")["status"], "succeeded");
    assert_eq!(std::fs::read_to_string(sub.join("count")).unwrap().trim(), "3");
    let times: Vec<u128> =
        std::fs::read_to_string(sub.join("times")).unwrap().lines().map(|l| l.trim().parse().unwrap()).collect();
    assert_eq!(times.len(), 3, "{times:?}");
    let gaps_ms: Vec<u128> = times.windows(2).map(|w| (w[1] - w[0]) / 1_000_000).collect();
    // Exponential: 500 ms after the first failure, 1 s after the second.
    assert!(gaps_ms[0] >= 500 && gaps_ms[1] >= 1000, "backoff not respected: {gaps_ms:?} ms");
    let lines = api.log_lines(&id, "flaky").await;
    assert!(lines.iter().any(|l| l == "attempt 3 try 3"), "{lines:?}");
}

/// A shell script that starts background `sleep`s (grandchildren, one level deeper through
/// another shell) and a task timeout: the whole process group dies, nothing is left behind.
async fn timeout_kills_grandchildren(c: &Cluster, api: &Api) {
    let marker = format!("3000.{:06}", random_below(1_000_000));
    let yaml = format!(
        r#"
stages:
  - id: s
    tasks:
      - id: bounded
        shell: 'sleep {marker} & sh -c "sleep {marker}; true" & sleep {marker} & echo spawned; sleep {marker}'
        timeout: 4s
      - id: next
        needs: [bounded]
        noop: true
"#
    );
    api.create_pipeline("timeout", &yaml).await;
    let id = api.start("timeout", json!({})).await;
    // The children are seen alive before the timeout fires.
    let deadline = Instant::now() + Duration::from_secs(60);
    while processes_with(&marker).len() < 5 {
        assert!(Instant::now() < deadline, "the task's processes never appeared\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = api.wait(c, &id, 60).await;
    assert_eq!(done["status"], "failed", "{done:#}");
    let bounded = task_of(&done, "bounded");
    assert_eq!(bounded["status"], "failed");
    assert_eq!(bounded["message"], "timed out", "{done:#}");
    assert_eq!(task_of(&done, "next")["status"], "skipped");
    let took = wait_no_process_with(&marker, 10).await;
    eprintln!("timeout: no process left {took:?} after the run ended");
}

/// Cancelling a run while a task (with background grandchildren) runs on a worker: the run and
/// its tasks are cancelled and the task's processes die within 5 s.
async fn cancel_mid_run(c: &Cluster, api: &Api) {
    let marker = format!("3001.{:06}", random_below(1_000_000));
    let yaml = format!(
        r#"
stages:
  - id: s
    tasks:
      - id: long
        shell: 'sleep {marker} & sh -c "sleep {marker}; true" & echo started; sleep {marker}'
      - id: after
        needs: [long]
        noop: true
"#
    );
    api.create_pipeline("cancel", &yaml).await;
    let id = api.start("cancel", json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while processes_with(&marker).len() < 4 || task_of(&api.run(&id).await, "long")["status"] != "running" {
        assert!(Instant::now() < deadline, "the long task did not start\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cancelled_at = Instant::now();
    let r = api.call(Method::POST, &api.tenant_path(&format!("/runs/{id}/cancel")), None).await;
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["status"], "cancelled", "{v:#}");
    let took = wait_no_process_with(&marker, 5).await;
    eprintln!("cancel: the task's processes were gone {:?} after the cancel", cancelled_at.elapsed());
    let _ = took;
    let done = api.run(&id).await;
    assert_eq!(done["status"], "cancelled");
    assert_eq!(task_of(&done, "long")["status"], "cancelled");
    assert_eq!(task_of(&done, "after")["status"], "cancelled");
    // Stored logs of the attempt are kept.
    let lines = api.log_lines(&id, "long").await;
    assert!(lines.iter().any(|l| l == "started"), "{lines:?}");
}

/// Outputs (`key=value` lines in `$SLUICE_OUTPUT`) and params reach later tasks through
/// templates, as argv elements and as environment values; the tasks ran in a worker process.
async fn outputs_and_params(c: &Cluster, api: &Api, workers: &[i32], serve: i32) {
    let yaml = r#"
params:
  greeting: { type: string, required: true }
stages:
  - id: build
    tasks:
      - id: make
        shell: 'echo "digest=sha-$SLUICE_RUN_ID" >> "$SLUICE_OUTPUT"; echo "ppid=$PPID" >> "$SLUICE_OUTPUT"; echo built'
  - id: use
    needs: [build]
    tasks:
      - id: show
        run: ["/bin/echo", "{{ tasks.make.outputs.digest }}", "{{ params.greeting }}"]
      - id: via-env
        needs: [show]
        shell: 'echo "got $D for $G"'
        env: { D: "{{ tasks.make.outputs.digest }}", G: "{{ params.greeting }}" }
"#;
    api.create_pipeline("outputs", yaml).await;
    let greeting = "hello; touch /tmp/sluice-injected $(id)";
    let id = api.start("outputs", json!({ "params": { "greeting": greeting } })).await;
    let done = api.wait(c, &id, 120).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let outputs = &task_of(&done, "make")["outputs"];
    assert_eq!(outputs["digest"], format!("sha-{id}"), "{done:#}");
    let ppid: i32 = outputs["ppid"].as_str().unwrap().parse().unwrap();
    assert!(workers.contains(&ppid), "the task ran under pid {ppid}, not a worker ({workers:?}; serve {serve})");
    assert_eq!(api.log_lines(&id, "make").await, ["built"]);
    assert_eq!(api.log_lines(&id, "show").await, [format!("sha-{id} {greeting}")]);
    assert_eq!(api.log_lines(&id, "via-env").await, [format!("got sha-{id} for {greeting}")]);
}

/// A secret given to a task through `env:` is masked in its stored logs and never stored.
async fn secret_masked(c: &Cluster, api: &Api) {
    let value = format!("s3cr3t-{}", uuid::Uuid::new_v4().simple());
    let r = api.call(Method::PUT, &api.tenant_path("/secrets/API_TOKEN"), Some(json!({ "value": value }))).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    let yaml = r#"
stages:
  - id: s
    tasks:
      - id: leak
        shell: 'echo "$TOKEN"; echo "token is $TOKEN here"; echo "tok=$TOKEN" >> "$SLUICE_OUTPUT"'
        env: { TOKEN: "{{ secrets.API_TOKEN }}" }
        secrets: [API_TOKEN]
      - id: argv
        run: ["/bin/echo", "bearer {{ secrets.API_TOKEN }}"]
        secrets: [API_TOKEN]
"#;
    api.create_pipeline("secret", yaml).await;
    let id = api.start("secret", json!({})).await;
    let done = api.wait(c, &id, 120).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(api.log_lines(&id, "leak").await, ["***", "token is *** here"]);
    assert_eq!(api.log_lines(&id, "argv").await, ["bearer ***"]);
    assert_eq!(task_of(&done, "leak")["outputs"], json!({ "tok": "***" }));
    assert!(!done.to_string().contains(&value), "the run shows the secret");
    let db = c.db().await;
    let bodies = db.rows("SELECT body FROM task_logs").await;
    assert!(!bodies.is_empty());
    for b in &bodies {
        assert!(!b.to_string().contains(&value), "a stored log holds the secret: {b}");
    }
    db.close().await;
}

/// A cron trigger (`* * * * *`: schedules have minutes as their finest unit) fires at the next
/// minute with its params, and the run executes on a worker.
async fn cron_fires(c: &Cluster, api: &Api) {
    let yaml = r#"
params:
  who: { type: string, required: true }
triggers:
  - cron: "* * * * *"
    params: { who: from-cron }
stages:
  - id: only
    tasks:
      - id: greet
        run: ["/bin/echo", "{{ params.who }}"]
"#;
    api.create_pipeline("cron", yaml).await;
    let created = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(150);
    let run = loop {
        if let Some(r) = api.runs_of("cron").await.into_iter().last() {
            break r;
        }
        assert!(Instant::now() < deadline, "the cron trigger did not fire\n{}", c.logs());
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!("cron: fired {:?} after the pipeline was created", created.elapsed());
    // Stop further firings.
    let r = api.post(&api.tenant_path("/pipelines/cron/archive"), json!({})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let id = run["id"].as_str().unwrap().to_owned();
    let done = api.wait(c, &id, 120).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["trigger"], "cron");
    assert_eq!(done["params"], json!({ "who": "from-cron" }));
    assert_eq!(api.log_lines(&id, "greet").await, ["from-cron"]);
    // Scheduled on a whole minute.
    let db = c.db().await;
    let keys = db.rows(&format!("SELECT idempotency_key FROM runs WHERE id = '{id}'")).await;
    let key = keys[0]["idempotency_key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("cron:") && key.ends_with(":00Z"), "{key}");
    db.close().await;
}

/// A webhook call with a bad signature (wrong key, or a body other than the signed one) is
/// refused with 401 and starts nothing; a well-signed one starts a run that a worker executes.
async fn webhook_signatures(c: &Cluster, api: &Api) {
    let yaml = "params:\n  who: { type: string, required: true }\nstages:\n  - id: only\n    tasks:\n      - id: greet\n        run: [\"/bin/echo\", \"{{ params.who }}\"]\n";
    api.create_pipeline("hooked", yaml).await;
    let r = api.call(Method::POST, &api.tenant_path("/pipelines/hooked/webhook"), None).await;
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    let (url, secret) = (v["url"].as_str().unwrap().to_owned(), v["secret"].as_str().unwrap().to_owned());
    let body = r#"{"params":{"who":"hooked"}}"#;
    let send = |key: String, signed: &'static str, delivery: &'static str| {
        let ts = Utc::now().timestamp().to_string();
        api.client
            .post(&url)
            .header("content-type", "application/json")
            .header("X-Sluice-Timestamp", &ts)
            .header("X-Sluice-Signature", webhook::sign(&key, &ts, Some(delivery), signed.as_bytes()))
            .header("X-Sluice-Delivery", delivery)
            .body(body)
            .send()
    };
    let r = send("whsec_not-the-secret".into(), body, "bad-1").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = send(secret.clone(), r#"{"params":{"who":"other"}}"#, "bad-2").await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = api.client.post(&url).body(body).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "unsigned");
    assert!(api.runs_of("hooked").await.is_empty());
    let r = send(secret.clone(), body, "good-1").await.unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED, "{}", r.text().await.unwrap());
    let v: Value = r.json().await.unwrap();
    let id = v["run_id"].as_str().unwrap().to_owned();
    let done = api.wait(c, &id, 120).await;
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["trigger"], "webhook");
    assert_eq!(api.log_lines(&id, "greet").await, ["hooked"]);
    assert_eq!(api.runs_of("hooked").await.len(), 1);
}

/// Live events cross processes: the tasks run in the worker processes, yet a client of
/// `sluice serve` watching the run sees its task changes, its log lines and its end.
async fn events_reach_the_servers_clients(c: &Cluster, api: &Api) {
    api.create_pipeline(
        "watched",
        "stages:\n  - id: s\n    tasks:\n      - id: talk\n        shell: 'sleep 1; echo hello-from-a-worker'\n",
    )
    .await;
    let id = api.start("watched", json!({})).await;
    let mut resp = api.call(Method::GET, &api.tenant_path(&format!("/runs/{id}/events")), None).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut text = String::new();
    let mut frames: Vec<(String, Value)> = vec![];
    let mut ended = false;
    while !ended {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = tokio::time::timeout(left, resp.chunk()).await;
        let Ok(Ok(Some(chunk))) = chunk else {
            break;
        };
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            let kind = frame.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or_default().to_owned();
            let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
            let v: Value = serde_json::from_str(data).unwrap();
            ended |= kind == "run" && v["status"] == "succeeded";
            frames.push((kind, v));
        }
    }
    assert!(ended, "the run's end never reached the server's client: {frames:?}\n{}", c.logs());
    let task_statuses: Vec<&str> =
        frames.iter().filter(|(k, _)| k == "task").filter_map(|(_, v)| v["status"].as_str()).collect();
    // (Its `running` may come before the client subscribed; its end cannot: the task sleeps 1 s.)
    assert!(task_statuses.contains(&"succeeded"), "{frames:?}");
    let logged = frames
        .iter()
        .filter(|(k, _)| k == "log")
        .flat_map(|(_, v)| v["lines"].as_array().cloned().unwrap_or_default())
        .any(|l| l["text"] == "hello-from-a-worker");
    assert!(logged, "the worker's log line never reached the server's client: {frames:?}");
    // Each change arrives once, not echoed back by the bus.
    let runs_ended = frames.iter().filter(|(k, v)| k == "run" && v["status"] == "succeeded").count();
    assert_eq!(runs_ended, 1, "{frames:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_features_with_redis_and_separate_workers() {
    let Setup { cluster, api, workers } = start(Options { name: "modes", ..Options::default() }).await;
    let dir = SharedDir::new("modes");
    let worker_pids: Vec<i32> = workers.iter().map(|&w| cluster.pid(w).as_raw()).collect();
    let serve_pid = cluster.pid(0).as_raw();
    let started = Instant::now();
    let c = &cluster;
    let api = &api;
    // The cron scenario waits for the next whole minute: everything else runs meanwhile.
    tokio::join!(
        cron_fires(c, api),
        async {
            chain_of_forty(c, api).await;
            fan_out_of_two_hundred(c, api).await;
        },
        when_conditions(c, api),
        retries_with_backoff(c, api, &dir),
        timeout_kills_grandchildren(c, api),
        cancel_mid_run(c, api),
        outputs_and_params(c, api, &worker_pids, serve_pid),
        secret_masked(c, api),
        webhook_signatures(c, api),
        events_reach_the_servers_clients(c, api),
    );
    // `sluice serve` took no dispatch: the workers executed everything.
    assert!(!cluster.log_of(0).contains("dispatch received"), "sluice serve executed tasks");
    for &w in &workers {
        assert!(cluster.log_of(w).contains("dispatch received"), "worker {w} took no dispatch\n{}", cluster.logs());
    }
    let db = cluster.db().await;
    assert_eq!(db.unfinished_tasks().await, 0, "tasks left unfinished");
    db.close().await;
    eprintln!("all scenarios: {:?}", started.elapsed());
}
