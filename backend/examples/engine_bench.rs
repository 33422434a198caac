//! Engine benchmarks run by `cargo xtask bench`, with noop tasks, trigger to done as seen by an
//! API client (from `POST .../runs` until the run's `succeeded` event arrives on the tenant's
//! event stream):
//!
//! - W1: a 40-task chain;
//! - W2: one task, p50 and p99 over 100 runs;
//! - W3: 200 independent tasks then a join; sustained tasks per second and the CPU time per
//!   task of every Sluice process.
//!
//! `engine_bench --sluice PATH [--mode embedded|redis] [--postgres URL] [--redis URL]`: embedded
//! is `sluice serve` alone on SQLite with its in-process worker; redis is `sluice serve` and one
//! `sluice worker` on PostgreSQL and Redis.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    collections::HashMap,
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use sea_orm::{ConnectionTrait, Database, Statement};

use serde_json::{Value, json};

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// User + system CPU seconds of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx).copied().unwrap_or(f64::NAN)
}

/// Runs that ended, as seen on the tenant's event stream: status and arrival time.
type Ended = Arc<Mutex<HashMap<String, (String, Instant)>>>;

struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
    ended: Ended,
    arrivals: tokio::sync::watch::Receiver<u64>,
}

impl Api {
    /// Follows the tenant's event stream and records each run's end.
    async fn follow(
        client: reqwest::Client,
        url: String,
        token: String,
        ended: Ended,
        tx: tokio::sync::watch::Sender<u64>,
    ) {
        let mut resp = client.get(url).bearer_auth(token).send().await.unwrap();
        assert!(resp.status().is_success(), "event stream: {}", resp.status());
        let mut buf = String::new();
        // The stream ends when the server stops, at the end of the benchmark.
        while let Ok(Some(chunk)) = resp.chunk().await {
            let at = Instant::now();
            buf.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = buf.find("\n\n") {
                let frame: String = buf.drain(..end + 2).collect();
                let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) else { continue };
                let Ok(v) = serde_json::from_str::<Value>(data) else { continue };
                let status = v["status"].as_str().unwrap_or_default();
                if v["kind"] == "run" && ["succeeded", "failed", "cancelled", "timed_out"].contains(&status) {
                    let id = v["run_id"].as_str().unwrap_or_default().to_owned();
                    ended.lock().unwrap().insert(id, (status.to_owned(), at));
                    tx.send_modify(|n| *n += 1);
                }
            }
        }
    }

    async fn run(&mut self, pipeline: &str, params: Value) -> Duration {
        let t = Instant::now();
        let r: Value = self
            .client
            .post(format!("{}/api/v1/t/bench/pipelines/{pipeline}/runs", self.base))
            .bearer_auth(&self.token)
            .json(&json!({ "params": params }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = r["id"].as_str().unwrap().to_owned();
        loop {
            if let Some((status, at)) = self.ended.lock().unwrap().remove(&id) {
                assert_eq!(status, "succeeded", "run {id} ended {status}");
                return at - t;
            }
            let wait = tokio::time::timeout(Duration::from_secs(300), self.arrivals.changed()).await;
            assert!(matches!(wait, Ok(Ok(()))), "run {id} did not finish");
        }
    }

    async fn pipeline(&self, name: &str, definition: &str) {
        let r = self
            .client
            .post(format!("{}/api/v1/t/bench/pipelines", self.base))
            .bearer_auth(&self.token)
            .json(&json!({ "name": name, "definition": definition }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.text().await.unwrap());
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let sluice =
        args.iter().position(|a| a == "--sluice").and_then(|i| args.get(i + 1)).expect("--sluice PATH").clone();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let mode = arg("--mode").unwrap_or_else(|| "embedded".into());
    let pg = arg("--postgres").unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432".into());
    let redis = arg("--redis").unwrap_or_else(|| "redis://127.0.0.1:6379".into());
    let data = std::env::temp_dir().join(format!("sluice-engine-bench-{}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut env: Vec<(&str, String)> = vec![
        ("SLUICE_DATA_DIR", data.to_string_lossy().into_owned()),
        ("SLUICE_WORKER_SLOTS", "8".into()),
        ("RUST_LOG", "warn".into()),
    ];
    let mut pg_db = None;
    if mode == "redis" {
        let name = format!("sluice_bench_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(format!("{pg}/postgres")).await.unwrap();
        admin
            .execute_raw(Statement::from_string(admin.get_database_backend(), format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        env.push(("SLUICE_DATABASE_URL", format!("{pg}/{name}")));
        env.push(("SLUICE_DB_MAX_CONNECTIONS", "16".into()));
        env.push(("SLUICE_REDIS_URL", redis.clone()));
        env.push(("SLUICE_REDIS_PREFIX", format!("sluice-bench-{}", std::process::id())));
        env.push(("SLUICE_SECRETS_KEY", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=".into()));
        pg_db = Some((admin, name));
    } else {
        assert_eq!(mode, "embedded", "--mode is embedded or redis");
    }
    let spawn = |role: &str| {
        let mut cmd = Command::new(&sluice);
        cmd.arg(role).env("SLUICE_BIND", format!("127.0.0.1:{port}")).stdout(Stdio::null());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        Server(cmd.spawn().unwrap())
    };
    let server = spawn("serve");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let signup = json!({ "tenant_slug": "bench", "tenant_name": "Bench", "email": "bench@example.com", "password": "bench-password-1" });
    client.post(format!("{base}/api/v1/signup")).json(&signup).send().await.unwrap();
    let login: Value = client
        .post(format!("{base}/api/v1/auth/login"))
        .json(&json!({ "email": "bench@example.com", "password": "bench-password-1" }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = login["access_token"].as_str().unwrap().to_owned();
    // Workers start once the schema exists (the server migrates it).
    let worker = (mode == "redis").then(|| spawn("worker"));
    let ended: Ended = Arc::default();
    let (tx, arrivals) = tokio::sync::watch::channel(0u64);
    tokio::spawn(Api::follow(
        client.clone(),
        format!("{base}/api/v1/t/bench/events"),
        token.clone(),
        ended.clone(),
        tx,
    ));
    let mut api = Api { client, base, token, ended, arrivals };

    let mut w1 = String::from("stages:\n  - id: s\n    tasks:\n");
    for i in 0..40 {
        w1.push_str(&format!("      - id: t{i}\n        noop: true\n"));
        if i > 0 {
            w1.push_str(&format!("        needs: [t{}]\n", i - 1));
        }
    }
    api.pipeline("w1", &w1).await;
    api.pipeline("w2", "stages:\n  - id: s\n    tasks:\n      - id: t\n        noop: true\n").await;
    api.pipeline(
        "w3",
        "params:\n  items: { type: array, required: true }\nstages:\n  - id: s\n    tasks:\n      - id: each\n        for_each: '{{ params.items }}'\n        noop: true\n      - id: join\n        needs: [each]\n        noop: true\n",
    )
    .await;
    let items: Vec<u32> = (0..200).collect();

    // Warm-up.
    api.run("w2", json!({})).await;
    api.run("w1", json!({})).await;

    let mut w1_times: Vec<f64> = vec![];
    for _ in 0..5 {
        w1_times.push(api.run("w1", json!({})).await.as_secs_f64() * 1000.0);
    }
    w1_times.sort_by(f64::total_cmp);
    println!(
        "engine {mode} W1 40-task chain: median {:.1} ms (5 runs, min {:.1}, max {:.1})",
        percentile(&w1_times, 0.5),
        w1_times[0],
        w1_times[4]
    );

    let mut w2: Vec<f64> = vec![];
    for _ in 0..100 {
        w2.push(api.run("w2", json!({})).await.as_secs_f64() * 1000.0);
    }
    w2.sort_by(f64::total_cmp);
    println!(
        "engine {mode} W2 one task: p50 {:.2} ms, p99 {:.2} ms (100 runs)",
        percentile(&w2, 0.5),
        percentile(&w2, 0.99)
    );

    let pids: Vec<u32> = std::iter::once(server.0.id()).chain(worker.as_ref().map(|w| w.0.id())).collect();
    let cpu_all = || pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>();
    let cpu0 = cpu_all();
    let mut w3: Vec<f64> = vec![];
    let t = Instant::now();
    for _ in 0..3 {
        w3.push(api.run("w3", json!({ "items": items })).await.as_secs_f64() * 1000.0);
    }
    let wall = t.elapsed().as_secs_f64();
    let cpu = cpu_all() - cpu0;
    w3.sort_by(f64::total_cmp);
    let tasks = 3.0 * 201.0;
    println!(
        "engine {mode} W3 200 tasks + join: median {:.1} ms (3 runs); {:.0} tasks/s; CPU {:.2} ms per task",
        percentile(&w3, 0.5),
        tasks / wall,
        cpu * 1000.0 / tasks
    );
    drop(worker);
    drop(server);
    if let Some((admin, name)) = pg_db {
        let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
        let _ = admin.execute_raw(Statement::from_string(admin.get_database_backend(), sql)).await;
        remove_redis_keys(&redis, &format!("sluice-bench-{}", std::process::id())).await;
    }
    let _ = std::fs::remove_dir_all(&data);
}

/// Deletes the keys this benchmark left in Redis (every key under `prefix`).
async fn remove_redis_keys(url: &str, prefix: &str) {
    let Ok(client) = redis::Client::open(url) else { return };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return };
    let mut cursor: u64 = 0;
    loop {
        let Ok((next, keys)): Result<(u64, Vec<String>), _> = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
        else {
            return;
        };
        if !keys.is_empty() {
            let _ = redis::cmd("DEL").arg(keys).query_async::<i64>(&mut conn).await;
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}
