//! D21: a fork bomb is stopped by the process limit; the worker and another tenant's task are unaffected.
//! Its own test binary, so no other test's processes of the task uid disturb the count.

mod common;

use std::time::Duration;

use common::{TempDir, dump, run, task_user};
use sluice_worker::{ExecAction, ExecOutcome, TaskRequest, execute, live_group_members};
use tokio::sync::{mpsc, watch};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn d21_fork_bomb_stopped_by_process_limit() {
    let Some(user) = task_user("d21_fork_bomb_stopped_by_process_limit") else { return };
    let root = TempDir::new("bomb");
    let limit = 48;
    let mut req = TaskRequest::new(
        ExecAction::Shell("echo pgid=$$; bomb() { bomb | bomb & }; bomb; sleep 30".into()),
        root.path(),
    );
    req.run_as = Some(user);
    req.limits.processes = limit;
    req.timeout = Some(Duration::from_secs(4));
    let (tx, mut rx) = mpsc::channel(100_000);
    let (_cancel_tx, cancel_rx) = watch::channel(false);
    let bomb = tokio::spawn(execute(req, tx, cancel_rx));

    let pgid = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("starts").expect("line");
        if let Some(p) = line.text.strip_prefix("pgid=") {
            break p.parse::<i32>().expect("pgid");
        }
    };
    let mut max_seen = 0;
    let mut other_tenant = None;
    while !bomb.is_finished() {
        max_seen = max_seen.max(common::processes_of_uid(user.0));
        if other_tenant.is_none() {
            // Another tenant's task (another uid) runs normally meanwhile.
            let mut other = TaskRequest::new(ExecAction::Shell("echo other-ok".into()), root.path());
            other.run_as = Some((65533, 65533));
            other_tenant = Some(tokio::spawn(run(other)));
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let res = bomb.await.expect("bomb task");
    let mut stderr = Vec::new();
    while let Ok(l) = rx.try_recv() {
        stderr.push(l.text);
    }
    // Either the timeout ends it, or the task's own shell cannot fork `sleep` under the cap and
    // exits non-zero first; both are a contained bomb (CI has seen the second).
    assert!(
        matches!(res.outcome, ExecOutcome::TimedOut | ExecOutcome::Failed { exit_code: Some(_), .. }),
        "{:?}",
        res.outcome
    );
    // The bomb hit the cap: forks failed (dash says "Cannot fork"), and it collapsed.
    assert!(stderr.iter().any(|l| l.to_lowercase().contains("fork")), "no failed fork: {stderr:?}");
    assert!(max_seen <= usize::try_from(limit).unwrap_or(usize::MAX), "{max_seen} processes > limit {limit}");
    assert!(live_group_members(pgid).is_empty(), "left: {:?}", live_group_members(pgid));

    let (other_res, other_lines) = other_tenant.expect("started").await.expect("other");
    assert_eq!(other_res.outcome, ExecOutcome::Succeeded, "{}", dump(&other_lines));
    assert!(other_lines.iter().any(|l| l.text == "other-ok"));

    // The worker is healthy afterwards.
    let (after, _) = run(TaskRequest::new(ExecAction::Run(vec!["true".into()]), root.path())).await;
    assert_eq!(after.outcome, ExecOutcome::Succeeded);
}
