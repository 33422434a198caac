//! `sluice` as PID 1, as in a container started without an init: it stays the init of its pid
//! namespace, reaps what a task leaves behind, and passes SIGTERM on. Needs root (a pid namespace
//! of its own, made with `unshare`).
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{RUN_TERMINAL, sign_up, standalone_serve};
use serde_json::json;

/// `(pid, parent pid, state)` of every process of the machine.
fn processes() -> Vec<(i32, i32, char)> {
    let mut all = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).unwrap_or("");
        let ppid = field("PPid:").parse().unwrap_or(0);
        let state = field("State:").chars().next().unwrap_or('?');
        all.push((pid, ppid, state));
    }
    all
}

fn children_of(pid: i32) -> Vec<(i32, char)> {
    processes().into_iter().filter(|&(_, ppid, _)| ppid == pid).map(|(p, _, s)| (p, s)).collect()
}

/// A child killed however the test ends.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `check` holds, for at most `secs` seconds.
async fn until(secs: u64, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < Duration::from_secs(secs), "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn as_pid_1_sluice_reaps_what_its_tasks_leave_and_drains_on_sigterm() {
    let namespaces = Command::new("unshare")
        .args(["--pid", "--kill-child", "--mount-proc", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !nix::unistd::geteuid().is_root() || !namespaces {
        eprintln!("note: skipped: takes root, allowed to make a pid namespace with unshare --kill-child");
        return;
    }
    let data = std::env::temp_dir().join(format!("sluice-init-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o711)).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let log = std::fs::File::create(data.join("sluice.log")).unwrap();
    // `--kill-child`: whatever happens to the test, the namespace ends with `unshare`.
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--kill-child", "--mount-proc", env!("CARGO_BIN_EXE_sluice"), "serve"]);
    standalone_serve(&mut cmd, &data, port, "1650002000-1650002009", log);
    let mut unshare = Stopped(cmd.spawn().unwrap());
    let logs = || std::fs::read_to_string(data.join("sluice.log")).unwrap_or_default();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let started = Instant::now();
    while client.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(60), "sluice did not start:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // PID 1 of the namespace (the init) is unshare's child; sluice proper is the init's child.
    let init = children_of(unshare.0.id() as i32)[0].0;
    let serving = children_of(init);
    assert_eq!(serving.len(), 1, "the init runs one sluice: {serving:?}");

    let api = sign_up(client, base).await;
    // Five processes leave the task; the worker kills them once the task ended, and they were
    // re-parented to the init.
    let definition = "stages:\n  - id: s\n    tasks:\n      - id: leave\n        shell: 'for i in 1 2 3 4 5; do setsid sleep 1000 & done; sleep 0.2'\n";
    api.create_pipeline("leave", definition).await;
    let id = api.start("leave", json!({ "params": {} })).await;
    let started = Instant::now();
    loop {
        let run = api.run(&id).await;
        if RUN_TERMINAL.contains(&run["status"].as_str().unwrap()) {
            assert_eq!(run["status"], "succeeded", "{run:#}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the run did not end: {run:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing the task left is running, nor left unreaped.
    until(10, "processes the task left are still there under the init", || {
        children_of(init).iter().all(|&(pid, _)| serving.iter().any(|&(s, _)| s == pid))
    })
    .await;
    assert!(children_of(init).iter().all(|&(_, state)| state != 'Z'), "{:?}", children_of(init));

    // SIGTERM reaches sluice through the init: it drains and exits 0, and so does the init.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(init), nix::sys::signal::Signal::SIGTERM).unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = unshare.0.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(40), "sluice did not stop:\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}:\n{}", logs());
    assert!(logs().contains("Sluice is running"), "{}", logs());
    let _ = std::fs::remove_dir_all(&data);
}
