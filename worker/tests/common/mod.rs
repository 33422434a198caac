//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

#[path = "../../../tests/common/shared_dir.rs"]
mod shared_dir;
pub use shared_dir::shared_root;
use sluice_worker::{ExecResult, LogLine, Stream, TaskRequest, execute};
use tokio::sync::{mpsc, watch};

/// A temporary directory (mode 0711 so that a task user can traverse it), removed on drop.
pub struct TempDir(PathBuf);

static N: AtomicUsize = AtomicUsize::new(0);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        Self::inside(&std::env::temp_dir(), tag)
    }

    /// One that tasks of a task user see (see [`shared_root`]).
    pub fn shared(tag: &str) -> Self {
        Self::inside(&shared_root(), tag)
    }

    fn inside(parent: &Path, tag: &str) -> Self {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = parent.join(format!("sluice-worker-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o711)).expect("chmod temp dir");
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a request to its end and returns the result with every log line.
pub async fn run(req: TaskRequest) -> (ExecResult, Vec<LogLine>) {
    let (tx, mut rx) = mpsc::channel(1024);
    let (_cancel_tx, cancel_rx) = watch::channel(false);
    let collector = tokio::spawn(async move {
        let mut lines = Vec::new();
        while let Some(l) = rx.recv().await {
            lines.push(l);
        }
        lines
    });
    let result = execute(req, tx, cancel_rx).await;
    let lines = collector.await.expect("collector");
    (result, lines)
}

/// Texts of the lines of one stream.
pub fn texts(lines: &[LogLine], stream: Stream) -> Vec<String> {
    lines.iter().filter(|l| l.stream == stream).map(|l| l.text.clone()).collect()
}

/// All log text, one line per record, for diagnostics.
pub fn dump(lines: &[LogLine]) -> String {
    lines.iter().map(|l| format!("{:?}: {}", l.stream, l.text)).collect::<Vec<_>>().join("\n")
}

/// The task user for sandbox tests, or `None` (with a note) when the tests do not run as root.
pub fn task_user(test: &str) -> Option<(u32, u32)> {
    let user = sluice_worker::unprivileged_user();
    if user.is_none() {
        eprintln!("note: {test} skipped: needs root to run the task as an unprivileged user");
    }
    user
}

/// Resident set size of this process in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Non-zombie processes whose command line is exactly `argv`.
pub fn processes_with_cmdline(argv: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain(std::iter::once(0))).collect();
    let mut pids = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else { return pids };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        if cmdline == want {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().next().map(str::to_owned));
            if state.as_deref() != Some("Z") {
                pids.push(pid);
            }
        }
    }
    pids
}

/// Processes (non-zombie) owned by `uid`.
pub fn processes_of_uid(uid: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0 };
    entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())))
        .filter(|e| {
            let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
            let uid_ok = status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .is_some_and(|u| u == uid.to_string());
            let zombie = status.lines().any(|l| l.starts_with("State:") && l.contains('Z'));
            uid_ok && !zombie
        })
        .count()
}
