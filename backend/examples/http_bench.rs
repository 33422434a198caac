//! Benchmarks run by `cargo xtask bench`:
//!
//! - `http_bench floor --postgres URL`: the machine's commit floor (a timed 4 KiB write + fsync in
//!   the current folder, and a one-row PostgreSQL commit), printed first because the shared disk
//!   here can be many times slower at times.
//! - `http_bench http --db sqlite|postgres --sluice PATH --postgres URL`: starts `sluice serve` as
//!   a child process on loopback, signs up a tenant with 20 pipelines, then 32 concurrent clients
//!   call the authorized `GET /api/v1/t/{tenant}/pipelines` for 10 s. Prints requests per second,
//!   p50/p99 latency, non-2xx count and the server's resident memory.
#![allow(clippy::unwrap_used, missing_docs)]

use std::{
    io::Write,
    net::TcpListener,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use sea_orm::{ConnectionTrait, Database, Statement};
use serde_json::{Value, json};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let pg = arg(&args, "--postgres").unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432".into());
    match args.first().map(String::as_str) {
        Some("floor") => rt.block_on(floor(&pg)),
        Some("http") => {
            let db = arg(&args, "--db").unwrap_or_else(|| "sqlite".into());
            let sluice = arg(&args, "--sluice").expect("--sluice PATH");
            rt.block_on(http(&db, &sluice, &pg));
        }
        _ => eprintln!("usage: http_bench floor|http ..."),
    }
}

async fn floor(pg: &str) {
    let path = std::env::temp_dir().join(format!("sluice-fsync-{}", std::process::id()));
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![7_u8; 4096];
    let mut times = vec![];
    for _ in 0..200 {
        let t = Instant::now();
        f.write_all(&block).unwrap();
        f.sync_data().unwrap();
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(f);
    let _ = std::fs::remove_file(&path);
    times.sort_by(f64::total_cmp);
    println!(
        "commit floor: fsync of 4 KiB p50={:.3} ms p99={:.3} ms (200 samples)",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
    // One connection, so the temporary table stays visible.
    let mut opts = sea_orm::ConnectOptions::new(format!("{pg}/postgres"));
    opts.max_connections(1).sqlx_logging(false);
    match Database::connect(opts).await {
        Ok(db) => {
            let b = db.get_database_backend();
            db.execute_raw(Statement::from_string(b, "CREATE TEMP TABLE floor_probe (id bigint)")).await.unwrap();
            let mut times = vec![];
            for i in 0..200 {
                let t = Instant::now();
                db.execute_raw(Statement::from_string(b, format!("INSERT INTO floor_probe VALUES ({i})")))
                    .await
                    .unwrap();
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "commit floor: PostgreSQL one-row commit p50={:.3} ms p99={:.3} ms (200 samples)",
                percentile(&times, 0.5),
                percentile(&times, 0.99)
            );
        }
        Err(e) => println!("commit floor: PostgreSQL unreachable ({e})"),
    }
}

/// Runs wrk against `url` with 32 connections; `None` when wrk is not installed or fails.
fn wrk(url: &str, token: &str, secs: u64) -> Option<(&'static str, f64, f64, f64, u64)> {
    let out = Command::new("wrk")
        .args(["-t2", "-c32", &format!("-d{secs}s"), "--latency", "-H", &format!("authorization: Bearer {token}"), url])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let ms = |v: &str| -> Option<f64> {
        let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
        let n: f64 = num.parse().ok()?;
        Some(match unit {
            "us" => n / 1000.0,
            "ms" => n,
            "s" => n * 1000.0,
            _ => return None,
        })
    };
    let field = |prefix: &str| text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_owned()));
    let rps: f64 = field("Requests/sec:")?.parse().ok()?;
    let p50 = ms(&field("50%")?)?;
    let p99 = ms(&field("99%")?)?;
    let errors = field("Non-2xx or 3xx responses:").and_then(|v| v.parse().ok()).unwrap_or(0);
    Some(("wrk", rps, p50, p99, errors))
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn http(db: &str, sluice: &str, pg: &str) {
    let data = std::env::temp_dir().join(format!("sluice-bench-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&data).unwrap();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = Command::new(sluice);
    cmd.arg("serve")
        .env("SLUICE_BIND", format!("127.0.0.1:{port}"))
        .env("SLUICE_DATA_DIR", &data)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let mut pg_db = None;
    if db == "postgres" {
        let name = format!("sluice_bench_{}", uuid::Uuid::new_v4().simple());
        let admin = Database::connect(format!("{pg}/postgres")).await.unwrap();
        admin
            .execute_raw(Statement::from_string(admin.get_database_backend(), format!("CREATE DATABASE {name}")))
            .await
            .unwrap();
        cmd.env("SLUICE_DATABASE_URL", format!("{pg}/{name}"))
            .env("SLUICE_DB_MAX_CONNECTIONS", "32")
            // With PostgreSQL the key for tenant secrets must be configured.
            .env("SLUICE_SECRETS_KEY", "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=");
        pg_db = Some((admin, name));
    }
    let server = Server(cmd.spawn().unwrap());
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    let started = Instant::now();
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let signup = json!({ "tenant_slug": "bench", "tenant_name": "Bench", "email": "bench@example.com", "password": "bench-password-1" });
    assert!(client.post(format!("{base}/api/v1/signup")).json(&signup).send().await.unwrap().status().is_success());
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
    for i in 0..20 {
        let def = format!("stages:\n  - id: s\n    tasks:\n      - id: t{i}\n        noop: true\n");
        let r = client
            .post(format!("{base}/api/v1/t/bench/pipelines"))
            .bearer_auth(&token)
            .json(&json!({ "name": format!("pipeline-{i:02}"), "definition": def }))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let url = Arc::new(format!("{base}/api/v1/t/bench/pipelines"));
    let token = Arc::new(token);
    let run = |secs: u64| {
        let (client, url, token) = (client.clone(), url.clone(), token.clone());
        async move {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut tasks = vec![];
            for _ in 0..32 {
                let (client, url, token) = (client.clone(), url.clone(), token.clone());
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(100_000);
                    let mut errors = 0_u64;
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        match client.get(url.as_str()).bearer_auth(token.as_str()).send().await {
                            Ok(r) if r.status().is_success() => {
                                let _ = r.bytes().await;
                            }
                            _ => errors += 1,
                        }
                        lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    }
                    (lat, errors)
                }));
            }
            let mut all = vec![];
            let mut errors = 0;
            for t in tasks {
                let (l, e) = t.await.unwrap();
                all.extend(l);
                errors += e;
            }
            (all, errors)
        }
    };
    let _ = run(2).await;
    let secs = 10;
    // wrk (C, event loop) takes less of the two cores than an async Rust client would, so it is
    // used when installed; the built-in client is the fallback.
    let (client_name, rps, p50, p99, errors) = match wrk(&url, &token, secs) {
        Some(r) => r,
        None => {
            let (mut lat, errors) = run(secs).await;
            lat.sort_by(f64::total_cmp);
            ("built-in", lat.len() as f64 / secs as f64, percentile(&lat, 0.5), percentile(&lat, 0.99), errors)
        }
    };
    let (rss, hwm) = rss_kib(server.0.id());
    println!(
        "http {db}: authorized GET /pipelines, 32 connections ({client_name} client), {secs} s: {rps:.0} req/s, p50={p50:.2} ms, p99={p99:.2} ms, non-2xx={errors}; server RSS {:.1} MiB (peak {:.1} MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    drop(server);
    if let Some((admin, name)) = pg_db {
        let _ = admin
            .execute_raw(Statement::from_string(
                admin.get_database_backend(),
                format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            ))
            .await;
    }
    let _ = std::fs::remove_dir_all(&data);
}
