//! Distributed workers, with real processes: one `sluice serve` and two `sluice worker` on
//! PostgreSQL and Redis. Needs both (CI has them): PostgreSQL at `SLUICE_TEST_POSTGRES_URL`
//! (default postgres://postgres@127.0.0.1:5432) and Redis at `SLUICE_TEST_REDIS_URL` (default
//! redis://127.0.0.1:6379); the test fails when either is unreachable.
#![allow(clippy::unwrap_used)]

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use reqwest::{Client, StatusCode};
use sea_orm::{ConnectionTrait, Database, FromQueryResult, Statement};
use serde_json::{Value, json};
use uuid::Uuid;

fn postgres_base() -> String {
    std::env::var("SLUICE_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Base64 of 32 bytes: the test's key for tenant secrets (required on PostgreSQL).
const SECRETS_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

const PASSWORD: &str = "correct horse battery staple 42";

/// Kills every child process and drops the test database, however the test ends.
struct Cluster {
    children: Vec<(&'static str, Child)>,
    database: String,
    data_dir: PathBuf,
    redis_prefix: String,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let name = self.database.clone();
        let prefix = self.redis_prefix.clone();
        // Drop runs inside the test's runtime: drop the database from a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async {
                let admin = Database::connect(format!("{}/postgres", postgres_base())).await.ok()?;
                let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
                admin.execute_raw(Statement::from_string(admin.get_database_backend(), sql)).await.ok()?;
                admin.close().await.ok()?;
                // This test's Redis keys.
                let client = redis::Client::open(redis_url()).ok()?;
                let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                let keys: Vec<String> =
                    redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await.ok()?;
                if !keys.is_empty() {
                    redis::cmd("DEL").arg(keys).query_async::<i64>(&mut conn).await.ok()?;
                }
                Some(())
            })
        })
        .join();
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.data_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

impl Cluster {
    fn spawn(&mut self, role: &'static str, env: &[(String, String)]) -> usize {
        let log = std::fs::File::create(self.data_dir.join(format!("{role}-{}.log", self.children.len()))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg(role)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env_remove("SLUICE_WITH_WORKER")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting sluice {role}: {e}"));
        self.children.push((role, child));
        self.children.len() - 1
    }

    fn pid(&self, i: usize) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.children[i].1.id() as i32)
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(&self.data_dir).into_iter().flatten().flatten() {
            let p = entry.path();
            if p.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                out.push_str(&format!("--- {}\n", p.display()));
                for l in tail.into_iter().rev() {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }
}

struct Api {
    client: Client,
    base: String,
    token: String,
    tenant: String,
}

impl Api {
    async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.client.post(format!("{}{path}", self.base)).bearer_auth(&self.token).json(&body).send().await.unwrap()
    }

    async fn create_pipeline(&self, name: &str, yaml: &str) {
        let r = self
            .post(
                &format!("/api/v1/t/{}/pipelines", self.tenant),
                json!({ "name": name, "definition": yaml, "message": "test" }),
            )
            .await;
        assert_eq!(r.status(), StatusCode::CREATED, "create {name}: {}", r.text().await.unwrap());
    }

    async fn start(&self, pipeline: &str, body: Value) -> String {
        let r = self.post(&format!("/api/v1/t/{}/pipelines/{pipeline}/runs", self.tenant), body).await;
        assert_eq!(r.status(), StatusCode::CREATED, "start {pipeline}: {}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        v["id"].as_str().unwrap().to_owned()
    }

    async fn run(&self, id: &str) -> Value {
        let r = self
            .client
            .get(format!("{}/api/v1/t/{}/runs/{id}", self.base, self.tenant))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        r.json().await.unwrap()
    }

    async fn wait(&self, cluster: &Cluster, id: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.run(id).await;
            if ["succeeded", "failed", "cancelled", "timed_out"].contains(&v["status"].as_str().unwrap_or_default()) {
                return v;
            }
            assert!(Instant::now() < deadline, "run did not finish in {secs} s: {v:#}\n{}", cluster.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[derive(FromQueryResult)]
struct Count {
    n: i64,
}

/// A started cluster (one `sluice serve`, two `sluice worker`) and a signed-up tenant's API.
struct Setup {
    cluster: Cluster,
    api: Api,
    database_url: String,
    data_dir: PathBuf,
    w1: usize,
    w2: usize,
}

/// Creates a database and a Redis prefix of its own, starts the processes and signs up.
async fn setup() -> Setup {
    // Redis must answer (a plain PING over TCP).
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = redis_url().trim_start_matches("redis://").trim_end_matches('/').to_owned();
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap_or_else(|e| panic!("Redis at {addr}: {e}"));
        s.write_all(b"PING\r\n").await.unwrap();
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"+PONG\r\n");
    }
    let database = format!("sluice_test_workers_{}", Uuid::new_v4().simple());
    {
        let admin = Database::connect(format!("{}/postgres", postgres_base())).await.expect("PostgreSQL is reachable");
        admin
            .execute_raw(Statement::from_string(admin.get_database_backend(), format!("CREATE DATABASE {database}")))
            .await
            .unwrap();
        admin.close().await.ok();
    }
    let data_dir = std::env::temp_dir().join(format!("sluice-workers-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&data_dir).unwrap();
    let redis_prefix = format!("sluice-test-{}", Uuid::new_v4().simple());
    let mut cluster = Cluster {
        children: vec![],
        database: database.clone(),
        data_dir: data_dir.clone(),
        redis_prefix: redis_prefix.clone(),
    };

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let base = format!("http://127.0.0.1:{port}");
    let database_url = format!("{}/{database}", postgres_base());
    let env: Vec<(String, String)> = [
        ("SLUICE_DATABASE_URL", database_url.clone()),
        ("SLUICE_REDIS_URL", redis_url()),
        ("SLUICE_REDIS_PREFIX", redis_prefix.clone()),
        ("SLUICE_SECRETS_KEY", SECRETS_KEY.into()),
        ("SLUICE_BIND", format!("127.0.0.1:{port}")),
        ("SLUICE_PUBLIC_URL", base.clone()),
        ("SLUICE_DATA_DIR", data_dir.to_string_lossy().into_owned()),
        ("SLUICE_DB_MAX_CONNECTIONS", "8".into()),
        ("SLUICE_LEASE_SECONDS", "3".into()),
        ("SLUICE_REDISPATCH_SECONDS", "2".into()),
        ("RUST_LOG", "info,sluice_backend::engine=debug".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    cluster.spawn("serve", &env);
    let client = Client::builder().build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if client.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(Instant::now() < deadline, "sluice serve did not become ready\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let w1 = cluster.spawn("worker", &env);
    let w2 = cluster.spawn("worker", &env);

    let tenant = format!("w{}", &Uuid::new_v4().simple().to_string()[..10]);
    let email = format!("admin@{tenant}.example");
    let r = client
        .post(format!("{base}/api/v1/signup"))
        .json(&json!({ "tenant_slug": tenant, "tenant_name": "Workers", "email": email, "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "signup: {}", r.text().await.unwrap());
    let r = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({ "email": email, "password": PASSWORD }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.unwrap();
    let api = Api { client, base, token: v["access_token"].as_str().unwrap().into(), tenant };
    Setup { cluster, api, database_url, data_dir, w1, w2 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_over_redis_survive_a_killed_worker() {
    let Setup { mut cluster, api, database_url, data_dir, w1, w2 } = setup().await;

    // A 40-task chain: every hop is a dispatch through Redis to one of the workers.
    let mut chain = String::from("stages:\n  - id: s\n    tasks:\n");
    for i in 0..40 {
        chain.push_str(&format!("      - id: t{i}\n        noop: true\n"));
        if i > 0 {
            chain.push_str(&format!("        needs: [t{}]\n", i - 1));
        }
    }
    api.create_pipeline("chain40", &chain).await;
    let fan = "params:\n  targets: { type: array, required: true }\nstages:\n  - id: s\n    tasks:\n      - id: each\n        for_each: '{{ params.targets }}'\n        noop: true\n      - id: join\n        needs: [each]\n        noop: true\n";
    api.create_pipeline("fan50", fan).await;

    let started = Instant::now();
    let chain_run = api.start("chain40", json!({})).await;
    let done = api.wait(&cluster, &chain_run, 120).await;
    let chain_time = started.elapsed();
    assert_eq!(done["status"], "succeeded", "{done:#}");
    assert_eq!(done["tasks"].as_array().unwrap().len(), 40);
    eprintln!(
        "40-task chain over Redis with 2 workers: {:?} ({:?} per task, dispatch + claim + complete)",
        chain_time,
        chain_time / 40
    );

    let started = Instant::now();
    let targets: Vec<String> = (0..50).map(|i| format!("host-{i}")).collect();
    let fan_run = api.start("fan50", json!({ "params": { "targets": targets } })).await;
    let done = api.wait(&cluster, &fan_run, 120).await;
    eprintln!("50-task fan-out + join: {:?}", started.elapsed());
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let tasks = done["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 51);
    assert!(tasks.iter().all(|t| t["status"] == "succeeded"), "{done:#}");

    let received = |i: usize| {
        let text = std::fs::read_to_string(data_dir.join(format!("worker-{i}.log"))).unwrap_or_default();
        text.matches("dispatch received").count()
    };
    eprintln!("dispatches received: worker 1: {}, worker 2: {}", received(w1), received(w2));
    // Twenty 300 ms sleeps; one worker is killed with SIGKILL while it runs some of them. Their
    // leases expire (3 s here), the reaper retries them, and the other worker finishes the run.
    let mut sleeps = String::from("stages:\n  - id: s\n    tasks:\n");
    for i in 0..20 {
        sleeps.push_str(&format!(
            "      - id: z{i}\n        sleep: 300ms\n        retries: {{ max: 3, backoff: exponential, initial: 100ms }}\n"
        ));
    }
    api.create_pipeline("sleep20", &sleeps).await;
    let before = received(w1);
    let sleep_run = api.start("sleep20", json!({})).await;
    // Kill worker 1 once it is executing some of them.
    let deadline = Instant::now() + Duration::from_secs(30);
    while received(w1) == before {
        assert!(Instant::now() < deadline, "worker 1 took none of the sleeps\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    cluster.children[w1].1.kill().unwrap();
    cluster.children[w1].1.wait().unwrap();
    let killed_at = Instant::now();
    let done = api.wait(&cluster, &sleep_run, 120).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", cluster.logs());
    let retried = done["tasks"].as_array().unwrap().iter().filter(|t| t["attempt"].as_u64() > Some(1)).count();
    eprintln!("sleep20 finished {:?} after the SIGKILL; {retried} task(s) needed another attempt", killed_at.elapsed());
    assert!(retried >= 1, "the killed worker's tasks were retried: {done:#}");

    for id in [&chain_run, &fan_run, &sleep_run] {
        assert_eq!(api.run(id).await["status"], "succeeded");
    }
    let db = Database::connect(&database_url).await.unwrap();
    let left = Count::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        "SELECT COUNT(*) AS n FROM task_runs WHERE status NOT IN ('succeeded', 'failed', 'cancelled', 'skipped')",
    ))
    .one(&db)
    .await
    .unwrap()
    .unwrap();
    assert_eq!(left.n, 0, "tasks left non-terminal");
    db.close().await.ok();

    // SIGTERM while a task runs: the surviving worker takes no new work, lets the task finish
    // (its completion is recorded, first attempt), and exits 0.
    api.create_pipeline("slow", "stages:\n  - id: s\n    tasks:\n      - id: slow\n        sleep: 2s\n").await;
    let slow_run = api.start("slow", json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while api.run(&slow_run).await["tasks"][0]["status"] != "running" {
        assert!(Instant::now() < deadline, "the slow task did not start\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let signalled = Instant::now();
    nix::sys::signal::kill(cluster.pid(w2), nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(35);
    let status = loop {
        if let Some(s) = cluster.children[w2].1.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the worker did not exit after SIGTERM\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "worker exit after SIGTERM: {status}\n{}", cluster.logs());
    eprintln!("the worker exited {:?} after SIGTERM", signalled.elapsed());
    let done = api.wait(&cluster, &slow_run, 10).await;
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", cluster.logs());
    assert_eq!(done["tasks"][0]["attempt"], 1, "{done:#}");
}

/// Deletes every Redis key under `prefix` (SCAN + DEL), as an empty Redis restart would for this
/// test (the shared server itself keeps running for the other tests). Returns how many went.
async fn wipe_redis_prefix(prefix: &str) -> usize {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cursor: u64 = 0;
    let mut deleted = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            deleted += keys.len();
            redis::cmd("DEL").arg(keys).query_async::<i64>(&mut conn).await.unwrap();
        }
        if next == 0 {
            return deleted;
        }
        cursor = next;
    }
}

/// A05: Redis restarted empty mid-run (simulated by deleting every key under this test's prefix,
/// twice, while sleeps are in flight and queued): the reaper re-dispatches from the database, the
/// workers keep fetching, and every run still finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_finish_after_redis_loses_its_keys() {
    let Setup { cluster, api, database_url, .. } = setup().await;
    // 30 sleeps: a 20-way fan-out with a join, beside a 9-task chain.
    let mut yaml = String::from(
        "params:\n  targets: { type: array, required: true }\nstages:\n  - id: s\n    tasks:\n      - id: each\n        for_each: '{{ params.targets }}'\n        sleep: 200ms\n      - id: join\n        needs: [each]\n        sleep: 200ms\n",
    );
    for i in 0..9 {
        yaml.push_str(&format!("      - id: c{i}\n        sleep: 200ms\n"));
        if i > 0 {
            yaml.push_str(&format!("        needs: [c{}]\n", i - 1));
        }
    }
    api.create_pipeline("mixed30", &yaml).await;
    let targets: Vec<String> = (0..20).map(|i| format!("host-{i}")).collect();
    let body = json!({ "params": { "targets": targets } });
    let first = api.start("mixed30", body.clone()).await;

    // First wipe once some sleeps are running (the rest sit queued in Redis).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !api.run(&first).await["tasks"].as_array().unwrap().iter().any(|t| t["status"] == "running") {
        assert!(Instant::now() < deadline, "no sleep started\n{}", cluster.logs());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wiped = Instant::now();
    let n = wipe_redis_prefix(&cluster.redis_prefix).await;
    eprintln!("first wipe: {n} Redis key(s) deleted");
    // The second as soon as keys are back (workers registered again, dispatches pushed again).
    let deadline = Instant::now() + Duration::from_secs(30);
    let n = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let n = wipe_redis_prefix(&cluster.redis_prefix).await;
        if n > 0 {
            break n;
        }
        assert!(Instant::now() < deadline, "no Redis key came back after the wipe\n{}", cluster.logs());
    };
    eprintln!("second wipe: {n} Redis key(s) deleted, {:?} after the first", wiped.elapsed());
    // A run started after the wipes goes through the emptied Redis from the start.
    let second = api.start("mixed30", body).await;

    for id in [&first, &second] {
        let done = api.wait(&cluster, id, 60).await;
        assert_eq!(done["status"], "succeeded", "{done:#}\n{}", cluster.logs());
        let tasks = done["tasks"].as_array().unwrap();
        assert_eq!(tasks.len(), 30, "{done:#}");
        assert!(tasks.iter().all(|t| t["status"] == "succeeded"), "{done:#}");
    }
    eprintln!("both runs finished {:?} after the first wipe", wiped.elapsed());
    let db = Database::connect(&database_url).await.unwrap();
    let left = Count::find_by_statement(Statement::from_string(
        db.get_database_backend(),
        "SELECT COUNT(*) AS n FROM task_runs WHERE status NOT IN ('succeeded', 'failed', 'cancelled', 'skipped')",
    ))
    .one(&db)
    .await
    .unwrap()
    .unwrap();
    assert_eq!(left.n, 0, "tasks left non-terminal");
    db.close().await.ok();
}
