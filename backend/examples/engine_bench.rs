//! Engine benchmarks run by `cargo xtask bench` (embedded mode: SQLite and the in-process
//! worker), with noop tasks, trigger to done as seen by an API client:
//!
//! - W1: a 40-task chain;
//! - W2: one task, p50 and p99 over 100 runs;
//! - W3: 200 independent tasks then a join; sustained tasks per second and the server's CPU
//!   time per task.
//!
//! `engine_bench --sluice PATH`
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

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

struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    async fn run(&self, pipeline: &str, params: Value) -> Duration {
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
            let v: Value = self
                .client
                .get(format!("{}/api/v1/t/bench/runs/{id}", self.base))
                .bearer_auth(&self.token)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            match v["status"].as_str().unwrap() {
                "succeeded" => return t.elapsed(),
                "failed" | "cancelled" | "timed_out" => panic!("run {id} ended {}", v["status"]),
                _ => tokio::time::sleep(Duration::from_millis(1)).await,
            }
            assert!(t.elapsed() < Duration::from_secs(300), "run {id} did not finish");
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
    let data = std::env::temp_dir().join(format!("sluice-engine-bench-{}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let server = Server(
        Command::new(&sluice)
            .arg("serve")
            .env("SLUICE_BIND", format!("127.0.0.1:{port}"))
            .env("SLUICE_DATA_DIR", &data)
            .env("SLUICE_WORKER_SLOTS", "8")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
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
    let api = Api { client, base, token: login["access_token"].as_str().unwrap().to_owned() };

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
        "engine embedded W1 40-task chain: median {:.1} ms (5 runs, min {:.1}, max {:.1})",
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
        "engine embedded W2 one task: p50 {:.2} ms, p99 {:.2} ms (100 runs)",
        percentile(&w2, 0.5),
        percentile(&w2, 0.99)
    );

    let pid = server.0.id();
    let cpu0 = cpu_seconds(pid);
    let mut w3: Vec<f64> = vec![];
    let t = Instant::now();
    for _ in 0..3 {
        w3.push(api.run("w3", json!({ "items": items })).await.as_secs_f64() * 1000.0);
    }
    let wall = t.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid) - cpu0;
    w3.sort_by(f64::total_cmp);
    let tasks = 3.0 * 201.0;
    println!(
        "engine embedded W3 200 tasks + join: median {:.1} ms (3 runs); {:.0} tasks/s; server CPU {:.2} ms per task",
        percentile(&w3, 0.5),
        tasks / wall,
        cpu * 1000.0 / tasks
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&data);
}
