//! Helpers shared by the real-process tests: a cluster of `sluice serve` and `sluice worker`
//! processes on PostgreSQL and Redis, each with a database and a Redis key prefix of its own, an
//! API client signed up as a tenant's admin, and direct reads of the database.
//!
//! Needs PostgreSQL at `SLUICE_TEST_POSTGRES_URL` (default postgres://postgres@127.0.0.1:5432) and
//! Redis at `SLUICE_TEST_REDIS_URL` (default redis://127.0.0.1:6379); a test fails when either is
//! unreachable.
#![allow(clippy::unwrap_used, dead_code)]

mod shared_dir;
// (Not every test crate that includes these helpers makes shared folders.)
#[allow(unused_imports)]
pub use shared_dir::SharedDir;

use std::{
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use reqwest::{Client, Method, StatusCode};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, FromQueryResult, JsonValue, Statement};
use serde_json::{Value, json};
use uuid::Uuid;

pub fn postgres_base() -> String {
    std::env::var("SLUICE_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

pub fn redis_url() -> String {
    std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Every Redis key under `prefix` (`prefix:*`), found with SCAN.
pub async fn redis_keys(conn: &mut redis::aio::MultiplexedConnection, prefix: &str) -> Vec<String> {
    let mut cursor: u64 = 0;
    let mut all = vec![];
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(conn)
            .await
            .unwrap();
        all.extend(keys);
        if next == 0 {
            return all;
        }
        cursor = next;
    }
}

/// Deletes every Redis key under `prefix`; returns how many went.
pub async fn delete_redis_keys(prefix: &str) -> usize {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys = redis_keys(&mut conn, prefix).await;
    let n = keys.len();
    if n > 0 {
        redis::cmd("DEL").arg(keys).query_async::<i64>(&mut conn).await.unwrap();
    }
    n
}

/// Drops a test's database and deletes its Redis keys (everything under `prefix`). Called from
/// `Drop`, which runs inside the test's runtime: the work is done on a thread of its own.
pub fn remove_database_and_keys(database: &str, prefix: &str) {
    let (name, prefix) = (database.to_owned(), prefix.to_owned());
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
        rt.block_on(async {
            let admin = Database::connect(format!("{}/postgres", postgres_base())).await.ok()?;
            let sql = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            admin.execute_raw(Statement::from_string(admin.get_database_backend(), sql)).await.ok()?;
            admin.close().await.ok()?;
            delete_redis_keys(&prefix).await;
            Some(())
        })
    })
    .join();
}

/// Base64 of 32 bytes: the test's key for tenant secrets (required on PostgreSQL).
pub const SECRETS_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";

pub const PASSWORD: &str = "correct horse battery staple 42";

/// Statuses a run ends in.
pub const RUN_TERMINAL: [&str; 4] = ["succeeded", "failed", "cancelled", "timed_out"];

/// How a cluster is started.
#[derive(Clone, Debug)]
pub struct Options {
    /// Part of the database and data directory names (which test made them).
    pub name: &'static str,
    /// `sluice worker` processes started with the cluster.
    pub workers: usize,
    /// `SLUICE_LEASE_SECONDS` of every process.
    pub lease_secs: u64,
    /// `SLUICE_REDISPATCH_SECONDS` of every process.
    pub redispatch_secs: u64,
    /// `SLUICE_DB_MAX_CONNECTIONS` of `sluice serve`.
    pub serve_db_connections: u32,
    /// `SLUICE_DB_MAX_CONNECTIONS` of each `sluice worker`.
    pub worker_db_connections: u32,
    /// Further variables for every process.
    pub env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            name: "workers",
            workers: 2,
            lease_secs: 3,
            redispatch_secs: 2,
            serve_db_connections: 8,
            worker_db_connections: 8,
            env: vec![],
        }
    }
}

/// The processes of one test; kills every child process, drops the test database and deletes
/// the test's Redis keys, however the test ends.
pub struct Cluster {
    pub children: Vec<(&'static str, Child)>,
    pub database: String,
    pub database_url: String,
    pub data_dir: PathBuf,
    pub redis_prefix: String,
    /// The API's address, `http://127.0.0.1:<port>`.
    pub base: String,
    /// Environment every process of the cluster starts with.
    pub env: Vec<(String, String)>,
    pub worker_db_connections: u32,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        remove_database_and_keys(&self.database, &self.redis_prefix);
        if std::thread::panicking() {
            eprintln!("logs kept in {}", self.data_dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.data_dir);
        }
    }
}

impl Cluster {
    /// Starts `sluice <role>` with the cluster's environment plus `extra`; its output goes to
    /// `<data dir>/<role>-<index>.log`. Returns its index in `children`.
    pub fn spawn_with(&mut self, role: &'static str, extra: &[(&str, String)]) -> usize {
        let log = std::fs::File::create(self.log_path(self.children.len(), role)).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .arg(role)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env_remove("SLUICE_WITH_WORKER")
            .envs(extra.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting sluice {role}: {e}"));
        self.children.push((role, child));
        self.children.len() - 1
    }

    /// Starts `sluice <role>` with the cluster's environment.
    pub fn spawn(&mut self, role: &'static str) -> usize {
        if role == "worker" {
            let n = self.worker_db_connections.to_string();
            return self.spawn_with(role, &[("SLUICE_DB_MAX_CONNECTIONS", n)]);
        }
        self.spawn_with(role, &[])
    }

    /// Starts one more `sluice worker`.
    pub fn spawn_worker(&mut self) -> usize {
        self.spawn("worker")
    }

    fn log_path(&self, i: usize, role: &str) -> PathBuf {
        self.data_dir.join(format!("{role}-{i}.log"))
    }

    /// The output of child `i` so far.
    pub fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(self.log_path(i, self.children[i].0)).unwrap_or_default()
    }

    pub fn pid(&self, i: usize) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.children[i].1.id() as i32)
    }

    /// Sends `signal` to child `i` (the process only, not its task process groups).
    pub fn signal(&self, i: usize, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(i), signal).unwrap();
    }

    /// SIGKILLs child `i` and reaps it.
    pub fn kill(&mut self, i: usize) {
        let c = &mut self.children[i].1;
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Whether child `i` has exited, and how.
    pub fn try_wait(&mut self, i: usize) -> Option<ExitStatus> {
        self.children[i].1.try_wait().unwrap()
    }

    /// Waits for child `i` to exit, at most `secs` seconds.
    pub async fn wait_exit(&mut self, i: usize, secs: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(s) = self.try_wait(i) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "sluice {} did not exit in {secs} s\n{}",
                self.children[i].0,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The name a `sluice worker` gave itself (from its "worker started" log line), once logged.
    pub fn worker_name(&self, i: usize) -> Option<String> {
        let text = strip_ansi(&self.log_of(i));
        let line = text.lines().find(|l| l.contains("worker started"))?;
        let at = line.find("worker=")? + "worker=".len();
        let name: String = line[at..].chars().take_while(|c| !c.is_whitespace()).collect();
        Some(name.trim_matches('"').to_owned())
    }

    /// Waits until `/readyz` answers 200.
    pub async fn wait_ready(&self, client: &Client, secs: u64) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if client.get(format!("{}/readyz", self.base)).send().await.is_ok_and(|r| r.status().is_success()) {
                return;
            }
            assert!(Instant::now() < deadline, "sluice serve did not become ready\n{}", self.logs());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last 40 lines of every process's output.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&self.data_dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        entries.sort();
        for p in entries {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out.push_str(&format!("--- {}\n", p.display()));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// A new connection to the cluster's database.
    pub async fn db(&self) -> Db {
        Db(Database::connect(&self.database_url).await.unwrap())
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Direct reads of the cluster's database.
#[derive(Clone)]
pub struct Db(pub DatabaseConnection);

impl Db {
    /// Every row of `sql`, as JSON objects (cast columns to simple types in the query).
    pub async fn rows(&self, sql: &str) -> Vec<Value> {
        JsonValue::find_by_statement(Statement::from_string(self.0.get_database_backend(), sql.to_owned()))
            .all(&self.0)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The first column of the first row of `sql`, as an integer (`COUNT(*) AS n` and the like).
    pub async fn count(&self, sql: &str) -> i64 {
        let rows = self.rows(sql).await;
        let row = rows.first().unwrap_or_else(|| panic!("{sql}: no row"));
        row.as_object().unwrap().values().next().and_then(Value::as_i64).unwrap_or_else(|| panic!("{sql}: {row}"))
    }

    /// Task rows not in a final status.
    pub async fn unfinished_tasks(&self) -> i64 {
        self.count(
            "SELECT COUNT(*) AS n FROM task_runs WHERE status NOT IN ('succeeded', 'failed', 'cancelled', 'skipped')",
        )
        .await
    }

    /// How many connections the process named `name` holds (its connections carry the name as
    /// `application_name`; PostgreSQL keeps the first 63 bytes of it).
    pub async fn connections_of(&self, name: &str) -> i64 {
        let mut end = name.len().min(63);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        self.count(&format!(
            "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE application_name = '{}'",
            name[..end].replace('\'', "''")
        ))
        .await
    }

    /// Waits until PostgreSQL has closed every connection of the process named `name`. A process
    /// killed with SIGKILL may have sent statements PostgreSQL has not run yet: its rows are
    /// settled only after this.
    pub async fn wait_disconnected(&self, name: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.connections_of(name).await > 0 {
            assert!(Instant::now() < deadline, "the connections of {name} stayed open 30 s after it exited");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub async fn close(self) {
        self.0.close().await.ok();
    }
}

/// A signed-up tenant admin's view of the API.
#[derive(Clone)]
pub struct Api {
    pub client: Client,
    pub base: String,
    pub token: String,
    pub tenant: String,
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `path` under `/api/v1/t/<tenant>`.
    pub fn tenant_path(&self, path: &str) -> String {
        format!("/api/v1/t/{}{path}", self.tenant)
    }

    pub async fn call(&self, method: Method, path: &str, body: Option<Value>) -> reqwest::Response {
        let mut req = self.client.request(method, self.url(path)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send().await.unwrap()
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.call(Method::POST, path, Some(body)).await
    }

    /// GET of a tenant path answering 200 with JSON.
    pub async fn get_json(&self, path: &str) -> Value {
        let r = self.call(Method::GET, &self.tenant_path(path), None).await;
        let status = r.status();
        let text = r.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "GET {path}: {text}");
        serde_json::from_str(&text).unwrap()
    }

    pub async fn create_pipeline(&self, name: &str, yaml: &str) {
        let r = self
            .post(&self.tenant_path("/pipelines"), json!({ "name": name, "definition": yaml, "message": "test" }))
            .await;
        assert_eq!(r.status(), StatusCode::CREATED, "create {name}: {}", r.text().await.unwrap());
    }

    /// Starts a run of `pipeline`; returns its id.
    pub async fn start(&self, pipeline: &str, body: Value) -> String {
        let r = self.post(&self.tenant_path(&format!("/pipelines/{pipeline}/runs")), body).await;
        assert_eq!(r.status(), StatusCode::CREATED, "start {pipeline}: {}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        v["id"].as_str().unwrap().to_owned()
    }

    pub async fn run(&self, id: &str) -> Value {
        self.get_json(&format!("/runs/{id}")).await
    }

    /// Polls the run until it ends, at most `secs` seconds.
    pub async fn wait(&self, cluster: &Cluster, id: &str, secs: u64) -> Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let v = self.run(id).await;
            if RUN_TERMINAL.contains(&v["status"].as_str().unwrap_or_default()) {
                return v;
            }
            assert!(Instant::now() < deadline, "run did not finish in {secs} s: {v:#}\n{}", cluster.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The text of a task's stored log lines.
    pub async fn log_lines(&self, run: &str, task_key: &str) -> Vec<String> {
        let key = task_key.replace('[', "%5B").replace(']', "%5D");
        let v = self.get_json(&format!("/runs/{run}/tasks/{key}/logs")).await;
        v["lines"].as_array().unwrap().iter().map(|l| l["text"].as_str().unwrap_or_default().to_owned()).collect()
    }

    /// The runs of a pipeline, newest first.
    pub async fn runs_of(&self, pipeline: &str) -> Vec<Value> {
        let v = self.get_json(&format!("/runs?pipeline={pipeline}&limit=200")).await;
        v["items"].as_array().unwrap().clone()
    }
}

/// The task of `run` (a run as the API answers it) with key `key`.
pub fn task_of<'a>(run: &'a Value, key: &str) -> &'a Value {
    run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["key"] == key)
        .unwrap_or_else(|| panic!("no task {key}: {run:#}"))
}

/// A started cluster and a signed-up tenant's API.
pub struct Setup {
    pub cluster: Cluster,
    pub api: Api,
    /// Indexes (in `cluster.children`) of the workers started with it.
    pub workers: Vec<usize>,
}

/// Redis must answer (a plain PING over TCP).
async fn ping_redis() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = redis_url().trim_start_matches("redis://").trim_end_matches('/').to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap_or_else(|e| panic!("Redis at {addr}: {e}"));
    s.write_all(b"PING\r\n").await.unwrap();
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"+PONG\r\n");
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The default cluster: one `sluice serve` and two `sluice worker`, lease 3 s, re-dispatch 2 s.
pub async fn setup() -> Setup {
    start(Options::default()).await
}

/// Creates a database and a Redis prefix of its own, starts `sluice serve` (with
/// `SLUICE_REDIS_URL`, so it executes no task itself) and `opts.workers` workers, and signs up.
pub async fn start(opts: Options) -> Setup {
    ping_redis().await;
    let database = format!("sluice_test_{}_{}", opts.name.replace('-', "_"), Uuid::new_v4().simple());
    {
        let admin = Database::connect(format!("{}/postgres", postgres_base())).await.expect("PostgreSQL is reachable");
        admin
            .execute_raw(Statement::from_string(admin.get_database_backend(), format!("CREATE DATABASE {database}")))
            .await
            .unwrap();
        admin.close().await.ok();
    }
    let data_dir = std::env::temp_dir().join(format!("sluice-{}-{}", opts.name, Uuid::new_v4()));
    std::fs::create_dir_all(&data_dir).unwrap();
    let redis_prefix = format!("sluice-test-{}", Uuid::new_v4().simple());
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let database_url = format!("{}/{database}", postgres_base());
    let mut env: Vec<(String, String)> = [
        ("SLUICE_DATABASE_URL", database_url.clone()),
        ("SLUICE_REDIS_URL", redis_url()),
        ("SLUICE_REDIS_PREFIX", redis_prefix.clone()),
        ("SLUICE_SECRETS_KEY", SECRETS_KEY.into()),
        ("SLUICE_BIND", format!("127.0.0.1:{port}")),
        ("SLUICE_PUBLIC_URL", base.clone()),
        ("SLUICE_DATA_DIR", data_dir.to_string_lossy().into_owned()),
        ("SLUICE_DB_MAX_CONNECTIONS", opts.serve_db_connections.to_string()),
        ("SLUICE_LEASE_SECONDS", opts.lease_secs.to_string()),
        ("SLUICE_REDISPATCH_SECONDS", opts.redispatch_secs.to_string()),
        ("RUST_LOG", "info,sluice_backend::engine=debug".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    env.extend(opts.env.iter().cloned());
    let mut cluster = Cluster {
        children: vec![],
        database,
        database_url,
        data_dir,
        redis_prefix,
        base: base.clone(),
        env,
        worker_db_connections: opts.worker_db_connections,
    };

    cluster.spawn("serve");
    let client = Client::builder().build().unwrap();
    cluster.wait_ready(&client, 60).await;
    let workers = (0..opts.workers).map(|_| cluster.spawn_worker()).collect();
    let api = sign_up(client, base).await;
    Setup { cluster, api, workers }
}

/// `cmd` set up as a `sluice serve` of its own, on SQLite in `data`, at `port`: only `PATH` of
/// the test's environment, task users `uids` (`FIRST-LAST`, of this test alone) with their locks
/// in `data`, and its output in `log`.
pub fn standalone_serve(cmd: &mut Command, data: &std::path::Path, port: u16, uids: &str, log: std::fs::File) {
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("SLUICE_DATA_DIR", data)
        .env("SLUICE_BIND", format!("127.0.0.1:{port}"))
        .env("SLUICE_TASK_UIDS", uids)
        .env("SLUICE_TASK_UID_LOCKS", data.join("locks"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
}

/// Signs a new tenant up at `base` and logs its admin in.
pub async fn sign_up(client: Client, base: String) -> Api {
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
    Api { client, base, token: v["access_token"].as_str().unwrap().into(), tenant }
}

/// Pids of live processes whose command line contains `marker` (this process excluded).
pub fn processes_with(marker: &str) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = vec![];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if String::from_utf8_lossy(&cmdline).contains(marker) {
            out.push(pid);
        }
    }
    out
}

/// Waits until no live process has `marker` in its command line, at most `secs` seconds; returns
/// how long that took.
pub async fn wait_no_process_with(marker: &str, secs: u64) -> Duration {
    let started = Instant::now();
    loop {
        let left = processes_with(marker);
        if left.is_empty() {
            return started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(secs) {
            let described: Vec<String> = left
                .iter()
                .map(|p| {
                    let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
                    format!("{p}: {}", String::from_utf8_lossy(&cmd).replace('\0', " "))
                })
                .collect();
            panic!("processes left after {secs} s: {described:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A pseudo-random number below `n` (uuid v4 randomness; tests need no seeded generator).
pub fn random_below(n: u64) -> u64 {
    (Uuid::new_v4().as_u128() % u128::from(n.max(1))) as u64
}
