//! Workers with real processes: names (test plan A02, A03: one name, one live worker) and
//! routing (tasks with `runs_on` labels or `self-hosted` wait for a worker that serves them). Needs
//! PostgreSQL at `SLUICE_TEST_POSTGRES_URL` (default postgres://postgres@127.0.0.1:5432) and Redis
//! at `SLUICE_TEST_REDIS_URL` (default redis://127.0.0.1:6379).
//!
//! The rule: a worker whose row was heartbeaten within the lease and not stopped is live, and a
//! second process with its name exits non-zero at once, naming it. A worker that was SIGKILLed
//! is still live for up to a lease, so a restart within a second is refused too; its claims
//! expire with the lease, the reaper recovers them, and a restart after the lease takes the
//! name over.
#![allow(clippy::unwrap_used)]

mod common;

use std::{
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use common::{SECRETS_KEY, postgres_base, redis_url};
use reqwest::{Client, StatusCode};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, FromQueryResult, Statement};
use serde_json::{Value, json};
use uuid::Uuid;

const LEASE_SECS: u64 = 3;

/// The processes and database of one test, cleaned up however it ends.
struct Procs {
    children: Vec<Child>,
    logs: Vec<PathBuf>,
    env: Vec<(String, String)>,
    database: String,
    data_dir: PathBuf,
    base: String,
    redis_prefix: String,
}

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        common::remove_database_and_keys(&self.database, &self.redis_prefix);
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.data_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

impl Procs {
    async fn new() -> Self {
        let database = format!("sluice_test_names_{}", Uuid::new_v4().simple());
        let admin = Database::connect(format!("{}/postgres", postgres_base())).await.expect("PostgreSQL is reachable");
        admin
            .execute_raw(Statement::from_string(admin.get_database_backend(), format!("CREATE DATABASE {database}")))
            .await
            .unwrap();
        admin.close().await.ok();
        let data_dir = std::env::temp_dir().join(format!("sluice-names-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&data_dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let base = format!("http://127.0.0.1:{port}");
        let redis_prefix = format!("sluice-test-{}", Uuid::new_v4().simple());
        let env = [
            ("SLUICE_DATABASE_URL", format!("{}/{database}", postgres_base())),
            ("SLUICE_REDIS_URL", redis_url()),
            ("SLUICE_REDIS_PREFIX", redis_prefix.clone()),
            ("SLUICE_SECRETS_KEY", SECRETS_KEY.into()),
            ("SLUICE_BIND", format!("127.0.0.1:{port}")),
            ("SLUICE_PUBLIC_URL", base.clone()),
            ("SLUICE_DATA_DIR", data_dir.to_string_lossy().into_owned()),
            ("SLUICE_LEASE_SECONDS", LEASE_SECS.to_string()),
            ("SLUICE_REDISPATCH_SECONDS", "1".into()),
            ("SLUICE_DB_MAX_CONNECTIONS", "4".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let mut p = Self { children: vec![], logs: vec![], env, database, data_dir, base, redis_prefix };
        // The schema, as an operator would create it.
        let i = p.spawn("migrate", &[]);
        let status = p.wait_exit(i, Duration::from_secs(60)).await.expect("sluice migrate finishes");
        assert!(status.success(), "sluice migrate: {}", p.log(i));
        p
    }

    fn spawn(&mut self, role: &str, extra: &[(&str, &str)]) -> usize {
        self.spawn_args(&[role], extra)
    }

    fn spawn_args(&mut self, args: &[&str], extra: &[(&str, &str)]) -> usize {
        let role = args[0];
        let path = self.data_dir.join(format!("{role}-{}.log", self.children.len()));
        let log = std::fs::File::create(&path).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(args)
            .env_remove("SLUICE_WITH_WORKER")
            .env_remove("SLUICE_WORKER_NAME")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting sluice {role}: {e}"));
        self.children.push(child);
        self.logs.push(path);
        self.children.len() - 1
    }

    fn log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.logs[i]).unwrap_or_default()
    }

    /// The exit status of child `i` if it exits within `within`.
    async fn wait_exit(&mut self, i: usize, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.children[i].try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn db(&self) -> DatabaseConnection {
        Database::connect(&self.env[0].1).await.unwrap()
    }
}

#[derive(FromQueryResult)]
struct WorkerRow {
    stopped: bool,
    pid: i64,
}

async fn worker_row(db: &DatabaseConnection, name: &str) -> Option<WorkerRow> {
    let sql = "SELECT stopped_at IS NOT NULL AS stopped, pid FROM workers WHERE name = $1";
    let stmt = Statement::from_sql_and_values(db.get_database_backend(), sql, vec![name.into()]);
    let row = db.query_one_raw(stmt).await.unwrap()?;
    Some(WorkerRow::from_query_result(&row, "").unwrap())
}

/// Waits until worker `name` is registered by the process with `pid`.
async fn wait_registered(p: &Procs, db: &DatabaseConnection, name: &str, pid: u32, i: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !worker_row(db, name).await.is_some_and(|w| !w.stopped && w.pid == i64::from(pid)) {
        assert!(Instant::now() < deadline, "worker {name} did not register: {}", p.log(i));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn assert_refused(status: Option<ExitStatus>, log: &str, name: &str) {
    let status = status.unwrap_or_else(|| panic!("the second worker {name} still runs after 2 s: {log}"));
    assert!(!status.success(), "the second worker {name} exited successfully: {log}");
    assert!(log.contains(name) && log.contains("already in use by a live worker"), "unclear error: {log}");
}

#[tokio::test]
async fn a03_a_second_worker_with_a_live_name_exits_non_zero_within_two_seconds() {
    let mut p = Procs::new().await;
    let db = p.db().await;
    let name = format!("builder-{}", &Uuid::new_v4().simple().to_string()[..6]);
    let first = p.spawn("worker", &[("SLUICE_WORKER_NAME", &name)]);
    wait_registered(&p, &db, &name, p.children[first].id(), first).await;

    let started = Instant::now();
    let second = p.spawn("worker", &[("SLUICE_WORKER_NAME", &name)]);
    let status = p.wait_exit(second, Duration::from_secs(2)).await;
    assert_refused(status, &p.log(second), &name);
    assert!(started.elapsed() < Duration::from_secs(2));
    // The first one is untouched: still running, still the row's owner. `--name` is the same.
    assert!(p.children[first].try_wait().unwrap().is_none(), "{}", p.log(first));
    let flag = p.spawn_args(&["worker", "--name", &name], &[]);
    let status = p.wait_exit(flag, Duration::from_secs(2)).await;
    assert_refused(status, &p.log(flag), &name);
    let row = worker_row(&db, &name).await.unwrap();
    assert!(!row.stopped && row.pid == i64::from(p.children[first].id()));
    // A clean stop frees the name at once.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(p.children[first].id() as i32), nix::sys::signal::SIGTERM)
        .unwrap();
    let status = p.wait_exit(first, Duration::from_secs(10)).await.expect("SIGTERM stops the worker");
    assert!(status.success(), "{}", p.log(first));
    assert!(worker_row(&db, &name).await.unwrap().stopped);
    let again = p.spawn("worker", &[("SLUICE_WORKER_NAME", &name)]);
    wait_registered(&p, &db, &name, p.children[again].id(), again).await;
    db.close().await.ok();
}

#[derive(FromQueryResult)]
struct TaskRow {
    status: String,
    attempt: i32,
    lease_owner: Option<String>,
}

async fn task_row(db: &DatabaseConnection) -> Option<TaskRow> {
    let sql = "SELECT status, attempt, lease_owner FROM task_runs WHERE key = 'slow'";
    let row = db.query_one_raw(Statement::from_string(db.get_database_backend(), sql)).await.unwrap()?;
    Some(TaskRow::from_query_result(&row, "").unwrap())
}

#[tokio::test]
async fn a02_a_worker_killed_and_restarted_at_once_under_its_name_is_refused_and_its_task_recovered() {
    let mut p = Procs::new().await;
    let db = p.db().await;
    let serve = p.spawn("serve", &[]);
    let client = Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client.get(format!("{}/readyz", p.base)).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "serve not ready: {}", p.log(serve));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let name = format!("runner-{}", &Uuid::new_v4().simple().to_string()[..6]);
    let first = p.spawn("worker", &[("SLUICE_WORKER_NAME", &name)]);
    wait_registered(&p, &db, &name, p.children[first].id(), first).await;

    let tenant = format!("n{}", &Uuid::new_v4().simple().to_string()[..10]);
    let (email, password) = (format!("admin@{tenant}.example"), "correct horse battery staple 42");
    let r = client
        .post(format!("{}/api/v1/signup", p.base))
        .json(&json!({ "tenant_slug": tenant, "tenant_name": "Names", "email": email, "password": password }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = client
        .post(format!("{}/api/v1/auth/login", p.base))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap();
    let token = r.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned();
    let yaml = "stages:\n  - id: s\n    tasks:\n      - id: slow\n        sleep: 3s\n        retries: { max: 2, initial: 100ms }\n";
    let r = client
        .post(format!("{}/api/v1/t/{tenant}/pipelines", p.base))
        .bearer_auth(&token)
        .json(&json!({ "name": "slow", "definition": yaml }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = client
        .post(format!("{}/api/v1/t/{tenant}/pipelines/slow/runs", p.base))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let run = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !task_row(&db).await.is_some_and(|t| t.status == "running" && t.lease_owner.as_deref() == Some(&name)) {
        assert!(Instant::now() < deadline, "the task never ran on {name}: {}", p.log(first));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // SIGKILL, and the same name again within a second: its row is still live, so refused.
    p.children[first].kill().unwrap();
    p.children[first].wait().unwrap();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let restarted = p.spawn("worker", &[("SLUICE_WORKER_NAME", &name)]);
    let status = p.wait_exit(restarted, Duration::from_secs(2)).await;
    assert_refused(status, &p.log(restarted), &name);

    // The orphan: its lease expires and the reaper gives the attempt up, within the lease and
    // a few seconds.
    let deadline = killed + Duration::from_secs(LEASE_SECS + 3);
    loop {
        let t = task_row(&db).await.unwrap();
        if t.attempt > 1 || t.status != "running" {
            break;
        }
        assert!(Instant::now() < deadline, "orphan not recovered {} s after the kill", killed.elapsed().as_secs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once the lease has passed, the name is free: the restart takes it over and runs the retry.
    let again = p.spawn("worker", &[("SLUICE_WORKER_NAME", &name)]);
    wait_registered(&p, &db, &name, p.children[again].id(), again).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r =
            client.get(format!("{}/api/v1/t/{tenant}/runs/{run}", p.base)).bearer_auth(&token).send().await.unwrap();
        let v: Value = r.json().await.unwrap();
        if v["status"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "run not finished: {v:#}\n{}", p.log(again));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t = task_row(&db).await.unwrap();
    assert_eq!(t.status, "succeeded");
    assert!(t.attempt >= 2);
    // No task is left in flight.
    let stmt = Statement::from_string(
        db.get_database_backend(),
        "SELECT COUNT(*) AS n FROM task_runs WHERE status IN ('queued', 'running')",
    );
    let n: i64 = db.query_one_raw(stmt).await.unwrap().unwrap().try_get("", "n").unwrap();
    assert_eq!(n, 0);
    // The listing shows the worker alive again.
    let r = client.get(format!("{}/api/v1/t/{tenant}/workers", p.base)).bearer_auth(&token).send().await.unwrap();
    let list: Vec<Value> = r.json().await.unwrap();
    let w = list.iter().find(|w| w["name"] == name.as_str()).unwrap();
    assert_eq!(w["status"], "alive");
    db.close().await.ok();
}

/// The status of every task of a run, by key.
async fn statuses(client: &Client, base: &str, tenant: &str, token: &str, run: &str) -> Value {
    let r = client.get(format!("{base}/api/v1/t/{tenant}/runs/{run}")).bearer_auth(token).send().await.unwrap();
    let v: Value = r.json().await.unwrap();
    let mut out = serde_json::Map::new();
    for t in v["tasks"].as_array().unwrap() {
        out.insert(t["key"].as_str().unwrap().to_owned(), t["status"].clone());
    }
    Value::Object(out)
}

async fn wait_statuses(client: &Client, p: &Procs, tenant: &str, token: &str, run: &str, want: Value) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = statuses(client, &p.base, tenant, token, run).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "tasks {got} instead of {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn labelled_and_self_hosted_tasks_wait_for_a_worker_that_serves_them() {
    let mut p = Procs::new().await;
    let serve = p.spawn("serve", &[]);
    let client = Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !client.get(format!("{}/readyz", p.base)).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "serve not ready: {}", p.log(serve));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let tenant = format!("r{}", &Uuid::new_v4().simple().to_string()[..10]);
    let (email, password) = (format!("admin@{tenant}.example"), "correct horse battery staple 42");
    let r = client
        .post(format!("{}/api/v1/signup", p.base))
        .json(&json!({ "tenant_slug": tenant, "tenant_name": "Routes", "email": email, "password": password }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = client
        .post(format!("{}/api/v1/auth/login", p.base))
        .json(&json!({ "email": email, "password": password }))
        .send()
        .await
        .unwrap();
    let token = r.json::<Value>().await.unwrap()["access_token"].as_str().unwrap().to_owned();
    let expires = (chrono::Utc::now() + chrono::Duration::days(1)).to_rfc3339();
    let r = client
        .post(format!("{}/api/v1/t/{tenant}/tokens", p.base))
        .bearer_auth(&token)
        .json(&json!({ "name": "farm", "groups": ["admins"], "expires_at": expires }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let worker_token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
    let yaml = "stages:\n  - id: s\n    tasks:\n      - id: plain\n        noop: true\n      - id: gpu\n        runs_on: [gpu]\n        noop: true\n      - id: own\n        runs_on: [self-hosted]\n        noop: true\n      - id: arm\n        runs_on: [arm64]\n        noop: true\n";
    let r = client
        .post(format!("{}/api/v1/t/{tenant}/pipelines", p.base))
        .bearer_auth(&token)
        .json(&json!({ "name": "routed", "definition": yaml }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = client
        .post(format!("{}/api/v1/t/{tenant}/pipelines/routed/runs", p.base))
        .bearer_auth(&token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    let run = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();

    // A shared worker without labels: only the plain task.
    p.spawn("worker", &[]);
    let q = "queued";
    wait_statuses(&client, &p, &tenant, &token, &run, json!({ "plain": "succeeded", "gpu": q, "own": q, "arm": q }))
        .await;
    // A shared worker with the gpu label.
    p.spawn("worker", &[("SLUICE_WORKER_LABELS", "gpu,linux")]);
    wait_statuses(
        &client,
        &p,
        &tenant,
        &token,
        &run,
        json!({ "plain": "succeeded", "gpu": "succeeded", "own": q, "arm": q }),
    )
    .await;
    // The tenant's own worker, registered with an admin token of the tenant.
    let own = p.spawn_args(&["worker", "--tenant", &tenant], &[("SLUICE_WORKER_TOKEN", &worker_token)]);
    let done = "succeeded";
    wait_statuses(&client, &p, &tenant, &token, &run, json!({ "plain": done, "gpu": done, "own": done, "arm": q }))
        .await;
    // Nobody has arm64: it stays queued. The workers are listed with their labels.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(statuses(&client, &p.base, &tenant, &token, &run).await["arm"], q, "{}", p.log(own));
    let r = client.get(format!("{}/api/v1/t/{tenant}/workers", p.base)).bearer_auth(&token).send().await.unwrap();
    let list: Vec<Value> = r.json().await.unwrap();
    let mut seen: Vec<(String, Value)> = list
        .iter()
        .filter(|w| w["mode"] == "worker")
        .map(|w| (w["owner"].as_str().unwrap().to_owned(), w["labels"].clone()))
        .collect();
    seen.sort_by_key(|(_, labels)| labels.as_array().map_or(0, Vec::len));
    assert_eq!(
        seen,
        [
            ("shared".to_owned(), json!([])),
            ("tenant".to_owned(), json!(["self-hosted"])),
            ("shared".to_owned(), json!(["gpu", "linux"])),
        ]
    );
    // An editor's token may not register a worker of the tenant.
    let r = client
        .post(format!("{}/api/v1/t/{tenant}/tokens", p.base))
        .bearer_auth(&token)
        .json(&json!({ "name": "ci", "groups": ["editors"], "expires_at": expires }))
        .send()
        .await
        .unwrap();
    let editor_token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
    let refused = p.spawn_args(&["worker", "--tenant", &tenant], &[("SLUICE_WORKER_TOKEN", &editor_token)]);
    let status = p.wait_exit(refused, Duration::from_secs(5)).await.expect("refused at start");
    assert!(!status.success());
    assert!(p.log(refused).contains("may not register workers"), "{}", p.log(refused));
}
