//! `sluice serve` with its embedded worker (SQLite, in-process dispatch) stopped by SIGTERM:
//! the worker drains like `sluice worker` does, and what it gave back runs at the next start.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{Db, RUN_TERMINAL, free_port, processes_with, sign_up, standalone_serve, task_of, wait_no_process_with};
use serde_json::json;

/// A child process killed (if still running) when the test ends, however it ends.
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `sluice serve` on `data` (SQLite, in-process dispatch) at `port`, with a 3 s drain.
fn serve(data: &Path, port: u16, log: &str) -> Stopped {
    let log = std::fs::File::create(data.join(log)).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.arg("serve");
    standalone_serve(&mut cmd, data, port, "1650003000-1650003009", log);
    Stopped(cmd.env("SLUICE_WORKER_DRAIN_SECONDS", "3").spawn().unwrap())
}

async fn wait_ready(client: &reqwest::Client, base: &str, logs: impl Fn() -> String) {
    let started = Instant::now();
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "sluice did not start:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGTERM with two tasks in flight: the one that ends within the drain is recorded as done on
/// its first attempt; the one that outlasts it is killed and given back as lost (no retry used);
/// the server exits 0. Started again, it runs the given-back task at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_worker_drains_on_sigterm_and_what_it_gave_back_runs_at_the_next_start() {
    let data = std::env::temp_dir().join(format!("sluice-drain-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o711)).unwrap();
    let logs = || {
        ["serve-1.log", "serve-2.log"]
            .iter()
            .map(|l| format!("--- {l}\n{}", std::fs::read_to_string(data.join(l)).unwrap_or_default()))
            .collect::<String>()
    };
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut first = serve(&data, port, "serve-1.log");
    let client = reqwest::Client::new();
    wait_ready(&client, &base, logs).await;
    let api = sign_up(client.clone(), base.clone()).await;
    let marker = format!("drain-{}", uuid::Uuid::new_v4().simple());
    api.create_pipeline(
        "two",
        &format!(
            "stages:\n  - id: s\n    tasks:\n      - id: short\n        shell: 'sleep 1'\n      - id: long\n        shell: ': {marker}; if [ \"$SLUICE_ATTEMPT\" = 1 ]; then sleep 300; fi'\n"
        ),
    )
    .await;
    let id = api.start("two", json!({})).await;
    let started = Instant::now();
    loop {
        let run = api.run(&id).await;
        if ["short", "long"].iter().all(|t| task_of(&run, t)["status"] == "running") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the tasks never ran together: {run:#}\n{}", logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // (A task is `running` from its claim; its process starts a moment later.)
    while processes_with(&marker).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(30), "the long task's process never started\n{}", logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let signalled = Instant::now();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.0.id() as i32), nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = loop {
        if let Some(status) = first.0.try_wait().unwrap() {
            break status;
        }
        assert!(signalled.elapsed() < Duration::from_secs(40), "sluice did not stop:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stopped = signalled.elapsed();
    assert!(status.success(), "{status}:\n{}", logs());
    assert!(stopped >= Duration::from_secs(3), "the server did not wait for its drain: {stopped:?}\n{}", logs());
    wait_no_process_with(&marker, 10).await;
    // What the stopped server left: the short task done, the long one given back.
    let db = Db(sea_orm::Database::connect(sluice_backend::store::sqlite_url(&data)).await.unwrap());
    let rows = db.rows("SELECT task_id, attempt, lost, status, message FROM task_runs ORDER BY task_id").await;
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let (long, short) = (&rows[0], &rows[1]);
    assert_eq!((&short["status"], &short["attempt"]), (&json!("succeeded"), &json!(1)), "{rows:#?}");
    assert_eq!(long["lost"], 1, "{rows:#?}");
    assert_ne!(long["status"], "running", "{rows:#?}");
    assert!(long["message"].as_str().is_some_and(|m| m.contains("released")), "{rows:#?}");
    db.0.close().await.unwrap();

    // Started again, the server runs the given-back task at once, without using a retry.
    let _second = serve(&data, port, "serve-2.log");
    wait_ready(&client, &base, logs).await;
    let restarted = Instant::now();
    let done = loop {
        let run = api.run(&id).await;
        if RUN_TERMINAL.contains(&run["status"].as_str().unwrap()) {
            break run;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "the run did not end after the restart: {run:#}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(done["status"], "succeeded", "{done:#}\n{}", logs());
    assert_eq!(task_of(&done, "long")["attempt"], 2, "{done:#}");
    assert_eq!(task_of(&done, "short")["attempt"], 1, "{done:#}");
    eprintln!(
        "the server stopped {stopped:?} after SIGTERM; the run ended {:?} after the restart",
        restarted.elapsed()
    );
    drop(_second);
    let _ = std::fs::remove_dir_all(&data);
}
