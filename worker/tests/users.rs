//! Task users (test plan D21, D22): each process task holds a uid of the range for its attempt alone,
//! and nothing that ran as that uid outlives the attempt. Its own test binary: each test uses uids no
//! other test uses, held through its own lock folder. They need root, as a worker that switches users.

mod common;

use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::{TempDir, dump, run, task_user, texts};
use sluice_worker::{
    ExecAction, ExecOutcome, LogLine, Stream, TaskNetwork, TaskRequest, TaskSyscalls, TaskUsers, execute,
};
use tokio::sync::{mpsc, watch};

/// A range of `count` uids from `first` (distinct per test), locked in a folder of the test's own.
fn users(first: u32, count: u32, root: &TempDir) -> Arc<TaskUsers> {
    Arc::new(TaskUsers::new(first, count, root.path().join("locks")).expect("task users"))
}

fn shell(script: &str, root: &TempDir, users: &Arc<TaskUsers>) -> TaskRequest {
    let mut req = TaskRequest::new(ExecAction::Shell(script.to_owned()), root.path().join("work"));
    req.users = Some(users.clone());
    req
}

/// Whether `python3` is on the machine; when not, says that `test` is skipped.
fn has_python3(test: &str) -> bool {
    let found = std::process::Command::new("python3").arg("-V").output().is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("note: {test} skipped: needs python3");
    }
    found
}

/// A task running the Python `program` with `args`, as a task user of `users`, in `root`'s work folder.
fn python(program: &str, args: &[&str], root: &TempDir, users: &Arc<TaskUsers>) -> TaskRequest {
    let argv = ["python3", "-c", program].iter().chain(args).map(|a| (*a).to_owned()).collect();
    let mut req = TaskRequest::new(ExecAction::Run(argv), root.path().join("work"));
    req.users = Some(users.clone());
    req
}

/// Waits for a line starting with `prefix` and returns it.
async fn line_after(rx: &mut mpsc::Receiver<LogLine>, prefix: &str) -> LogLine {
    loop {
        let line = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("line in time").expect("line");
        if line.text.starts_with(prefix) {
            return line;
        }
    }
}

#[tokio::test]
async fn a_process_that_left_the_task_group_dies_with_its_task() {
    let Some(_) = task_user("a_process_that_left_the_task_group_dies_with_its_task") else { return };
    let root = TempDir::new("escape");
    let pool = users(1_650_000_100, 1, &root);
    let marker = "987661";
    let started = std::time::Instant::now();
    let (res, lines) = run(shell(&format!("setsid sleep {marker} & sleep 0.2; id -u"), &root, &pool)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    assert_eq!(texts(&lines, Stream::Stdout), vec!["1650000100".to_owned()]);
    assert!(common::processes_with_cmdline(&["sleep", marker]).is_empty(), "the setsid process outlived its task");
    // Killed at once, it no longer holds the log pipes open (the readers would wait 5 s for it).
    assert!(texts(&lines, Stream::System).is_empty(), "{}", dump(&lines));
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    // Given back cleared, which its lock file says (the next holder need not clear it again).
    let lock = std::fs::read_to_string(root.path().join("locks").join("1650000100")).expect("lock file");
    assert_eq!(lock, "cleared\n");
}

#[tokio::test]
async fn concurrent_tasks_hold_distinct_users_and_cannot_read_each_other() {
    let Some(_) = task_user("concurrent_tasks_hold_distinct_users_and_cannot_read_each_other") else { return };
    let root = TempDir::new("distinct");
    let pool = users(1_650_000_200, 4, &root);
    let mut b = shell(
        r#"echo "$SECRET_B" > "$SLUICE_WORKDIR/data"; echo "who=$$ $(id -u) $SLUICE_WORKDIR"; sleep 30"#,
        &root,
        &pool,
    );
    b.env = vec![("SECRET_B".into(), "b-secret-value".into())];
    let (tx, mut rx) = mpsc::channel(64);
    let (cancel_b, cancel_rx) = watch::channel(false);
    let b = tokio::spawn(execute(b, tx, cancel_rx));
    let who = line_after(&mut rx, "who=").await;
    let mut who = who.text.trim_start_matches("who=").split(' ');
    let (b_pid, b_uid, b_dir) = (who.next().expect("pid"), who.next().expect("uid"), who.next().expect("dir"));

    let script = format!("id -u; cat /proc/{b_pid}/environ; cat '{b_dir}/data'; kill -9 {b_pid}; echo end");
    let (res, lines) = run(shell(&script, &root, &pool)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let out = texts(&lines, Stream::Stdout);
    let a_uid = out.first().expect("uid").clone();
    assert_ne!(a_uid, b_uid, "two running tasks share a uid");
    for uid in [&a_uid, b_uid] {
        let uid: u32 = uid.parse().expect("uid");
        assert!((1_650_000_200..1_650_000_204).contains(&uid), "{uid} is outside the range");
    }
    assert!(!dump(&lines).contains("b-secret-value"), "{}", dump(&lines));
    // B's environment (hidden, or closed) and its work directory are out of reach.
    let refused = |l: &&String| l.contains("ermission denied") || l.contains("No such file");
    assert_eq!(texts(&lines, Stream::Stderr).iter().filter(refused).count(), 2, "{}", dump(&lines));
    assert_eq!(texts(&lines, Stream::Stderr).iter().filter(|l| l.contains("not permitted")).count(), 1);

    cancel_b.send(true).expect("cancel");
    assert_eq!(b.await.expect("task B").outcome, ExecOutcome::Cancelled);
}

/// Where a task user gets a mount namespace, its `/tmp`, `/var/tmp` and `/dev/shm` are its own: a
/// task running at the same time sees nothing it leaves there, not even what it made readable to
/// every user, and nothing of it reaches the machine's folders. They go with the task.
#[tokio::test]
async fn concurrent_tasks_have_temporary_folders_of_their_own() {
    let Some(_) = task_user("concurrent_tasks_have_temporary_folders_of_their_own") else { return };
    if !sluice_worker::own_proc_works() {
        eprintln!("note: concurrent_tasks_have_temporary_folders_of_their_own skipped: no mount namespace here");
        return;
    }
    let root = TempDir::new("owntmp");
    let pool = users(1_650_001_300, 2, &root);
    let tag = format!("sluice-own-{}", std::process::id());
    let folders = ["/tmp", "/var/tmp", "/dev/shm"];
    let a = shell(
        &format!(
            "for d in {}; do echo a > $d/{tag}; chmod 644 $d/{tag}; done; echo written; sleep 30",
            folders.join(" ")
        ),
        &root,
        &pool,
    );
    let (tx, mut rx) = mpsc::channel(64);
    let (cancel_a, cancel_rx) = watch::channel(false);
    let a = tokio::spawn(execute(a, tx, cancel_rx));
    line_after(&mut rx, "written").await;
    for folder in folders {
        assert!(std::fs::symlink_metadata(format!("{folder}/{tag}")).is_err(), "{folder}/{tag} is the machine's");
    }

    let script = format!("for d in {}; do ls -A $d; cat $d/{tag}; done; echo end", folders.join(" "));
    let (res, lines) = run(shell(&script, &root, &pool)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    // Its own folders hold nothing but, in /tmp, the path down to its work directory.
    let top = root.path().file_name().expect("name").to_string_lossy().into_owned();
    assert_eq!(texts(&lines, Stream::Stdout), [top, "end".to_owned()], "{}", dump(&lines));
    let missing = texts(&lines, Stream::Stderr).iter().filter(|l| l.contains("No such file")).count();
    assert_eq!(missing, 3, "{}", dump(&lines));

    cancel_a.send(true).expect("cancel");
    assert_eq!(a.await.expect("task A").outcome, ExecOutcome::Cancelled);
    let left: Vec<_> = std::fs::read_dir(root.path().join("work")).expect("work root").flatten().collect();
    assert!(left.is_empty(), "left in the work root: {left:?}");
}

#[tokio::test]
async fn what_a_task_leaves_in_the_shared_temporary_folders_goes_with_it() {
    let Some(_) = task_user("what_a_task_leaves_in_the_shared_temporary_folders_goes_with_it") else { return };
    let root = TempDir::new("tmpfiles");
    let pool = users(1_650_000_300, 1, &root);
    let tag = format!("sluice-left-{}", std::process::id());
    // Another task user's file in /tmp stays, and so does what the task's links point to.
    let other = std::path::PathBuf::from(format!("/tmp/{tag}-other"));
    std::fs::write(&other, "another task's").expect("write");
    std::os::unix::fs::chown(&other, Some(1_650_000_301), Some(1_650_000_301)).expect("chown");
    let outside = TempDir::new("outside");
    std::fs::write(outside.path().join("kept"), "kept").expect("write");
    let script = format!(
        "echo x > /tmp/{tag}; mkdir -p /var/tmp/{tag}/deep; echo y > /var/tmp/{tag}/deep/f; \
         ln -s {out} /var/tmp/{tag}/deep/link; echo z > /dev/shm/{tag}; ln -s {out} /tmp/{tag}-link; \
         echo w > /run/lock/{tag}; ls -d /tmp/{tag} /var/tmp/{tag} /dev/shm/{tag} /run/lock/{tag}",
        out = outside.path().display()
    );
    let (res, lines) = run(shell(&script, &root, &pool)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    assert_eq!(texts(&lines, Stream::Stdout).len(), 4, "{}", dump(&lines));
    for left in [
        format!("/tmp/{tag}"),
        format!("/var/tmp/{tag}"),
        format!("/dev/shm/{tag}"),
        format!("/tmp/{tag}-link"),
        format!("/run/lock/{tag}"),
    ] {
        assert!(std::fs::symlink_metadata(&left).is_err(), "{left} is still there");
    }
    assert_eq!(std::fs::read_to_string(outside.path().join("kept")).expect("read"), "kept");
    assert_eq!(std::fs::read_to_string(&other).expect("read"), "another task's");
    std::fs::remove_file(&other).expect("remove");
}

#[tokio::test]
async fn a_uid_left_running_by_a_dead_worker_is_cleared_before_it_is_given_out() {
    let Some(_) = task_user("a_uid_left_running_by_a_dead_worker_is_cleared_before_it_is_given_out") else { return };
    let root = TempDir::new("leftover");
    let uid = 1_650_000_400;
    // What a worker killed mid-task leaves: a process of the uid nobody holds any more.
    let mut stray = std::process::Command::new("sleep")
        .arg("987663")
        .uid(uid)
        .gid(uid)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    assert!(stray.try_wait().expect("try_wait").is_none());
    let pool = users(uid, 1, &root);
    // The lock file a worker killed while holding the uid leaves: empty.
    std::fs::write(root.path().join("locks").join(uid.to_string()), "").expect("lock file");
    // Seen from inside the task: the stray is dead (a zombie until this test reaps it) before it starts.
    let script = format!("grep '^State' /proc/{}/status || echo gone", stray.id());
    let (res, lines) = run(shell(&script, &root, &pool)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let state = texts(&lines, Stream::Stdout);
    assert!(state.len() == 1 && (state[0].contains("zombie") || state[0] == "gone"), "{state:?}");
    let status = stray.wait().expect("wait");
    assert!(!status.success(), "the stray process ended on its own: {status}");
    assert!(common::processes_with_cmdline(&["sleep", "987663"]).is_empty());
}

#[tokio::test]
async fn a_task_waits_while_every_task_user_is_held() {
    let Some(_) = task_user("a_task_waits_while_every_task_user_is_held") else { return };
    let root = TempDir::new("wait");
    let pool = users(1_650_000_500, 1, &root);
    let (tx, mut rx) = mpsc::channel(64);
    let (_cancel, cancel_rx) = watch::channel(false);
    let first = tokio::spawn(execute(shell("echo started; sleep 1; echo ending", &root, &pool), tx, cancel_rx));
    line_after(&mut rx, "started").await;

    // While the only uid is held: a task with a short timeout times out waiting, one without waits.
    let mut hurried = shell("echo never", &root, &pool);
    hurried.timeout = Some(Duration::from_millis(200));
    let (res, lines) = run(hurried).await;
    assert_eq!(res.outcome, ExecOutcome::TimedOut, "{}", dump(&lines));
    assert!(!dump(&lines).contains("never"));
    let (res, lines) = run(shell("echo second", &root, &pool)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let system = texts(&lines, Stream::System);
    assert!(system.iter().any(|l| l.contains("waiting for a free task user")), "{system:?}");
    // The second ran only once the first had ended (and given its uid back).
    let ending = line_after(&mut rx, "ending").await.at;
    let second = lines.iter().find(|l| l.text == "second").expect("the second task ran");
    assert!(second.at > ending, "the second task ran before the first ended");
    assert_eq!(first.await.expect("first").outcome, ExecOutcome::Succeeded);
}

#[tokio::test]
async fn a_range_that_holds_a_system_uid_or_nothing_is_refused() {
    let root = TempDir::new("range");
    let locks = root.path().join("locks");
    for (first, count, says) in [
        (1_650_000_600, 0, "empty"),
        (0, 10, "system uid"),
        (65_000, 1000, "system uid"),
        (u32::MAX - 5, 10, "largest uid"),
    ] {
        let e = TaskUsers::new(first, count, &locks).expect_err("refused");
        assert!(e.to_string().contains(says), "{first}+{count}: {e}");
    }
    let ok = TaskUsers::new(1_650_000_600, 10, &locks).expect("accepted");
    assert_eq!(ok.range(), (1_650_000_600, 1_650_000_609));
}

/// A task user gets `no_new_privs`; a task that runs as the worker's own user keeps what it has.
#[tokio::test]
async fn set_user_id_programs_do_not_raise_a_task_user() {
    let Some(_) = task_user("set_user_id_programs_do_not_raise_a_task_user") else { return };
    let root = TempDir::new("nnp");
    let pool = users(1_650_000_700, 1, &root);
    let script = "grep NoNewPrivs /proc/self/status";
    let (res, lines) = run(shell(script, &root, &pool)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    assert_eq!(texts(&lines, Stream::Stdout), vec!["NoNewPrivs:\t1".to_owned()]);
    let (res, lines) = run(TaskRequest::new(ExecAction::Shell(script.into()), root.path().join("work"))).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    assert_eq!(texts(&lines, Stream::Stdout), vec!["NoNewPrivs:\t0".to_owned()]);
}

/// A task user's `/proc` shows its own processes only: not another task's command line (where a secret
/// rendered into argv would be), nor the worker.
#[tokio::test]
async fn a_task_user_sees_only_its_own_processes() {
    let Some(_) = task_user("a_task_user_sees_only_its_own_processes") else { return };
    let root = TempDir::new("hidepid");
    let pool = users(1_650_000_800, 2, &root);
    let secret = format!("argv-secret-{}", std::process::id());
    // Spelled so that the `grep` looking for it does not find its own command line.
    let pattern = secret.replacen("secret", "secre[t]", 1);
    let mut a = TaskRequest::new(
        ExecAction::Run(vec!["/bin/sh".into(), "-c".into(), "echo ready; sleep 30".into(), secret.clone()]),
        root.path().join("work"),
    );
    a.users = Some(pool.clone());
    let (tx, mut rx) = mpsc::channel(64);
    let (cancel_a, cancel_rx) = watch::channel(false);
    let a = tokio::spawn(execute(a, tx, cancel_rx));
    line_after(&mut rx, "ready").await;
    // The other task is visible to this test (root, the host's /proc).
    assert!(!common::processes_with_cmdline(&["/bin/sh", "-c", "echo ready; sleep 30", &secret]).is_empty());

    let script = format!(
        "echo \"pids=$(ls /proc | grep -c '^[0-9]')\"; \
         echo \"secrets=$(cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' ' | grep -c '{pattern}')\"; \
         test -e /proc/{worker} && echo worker-visible; echo \"self=$(cat /proc/self/status | grep -c Uid)\"",
        worker = std::process::id()
    );
    let (res, lines) = run(shell(&script, &root, &pool)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let out = texts(&lines, Stream::Stdout);
    let pids: usize = out.iter().find_map(|l| l.strip_prefix("pids=")).expect("pids").parse().expect("count");
    assert!((1..10).contains(&pids), "the task sees {pids} processes: {out:?}");
    assert!(out.contains(&"secrets=0".to_owned()), "{out:?}");
    assert!(out.contains(&"self=1".to_owned()), "{out:?}");
    assert!(!out.contains(&"worker-visible".to_owned()), "{out:?}");

    cancel_a.send(true).expect("cancel");
    assert_eq!(a.await.expect("task A").outcome, ExecOutcome::Cancelled);
}

/// A process whose first thread has ended shows as a zombie while its other threads run on: it is
/// killed with its task all the same.
#[tokio::test]
async fn a_process_running_on_past_its_first_thread_dies_with_its_task() {
    let Some(_) = task_user("a_process_running_on_past_its_first_thread_dies_with_its_task") else { return };
    if !has_python3("a_process_running_on_past_its_first_thread_dies_with_its_task") {
        return;
    }
    let root = TempDir::new("threads");
    let outer = TempDir::shared("threads");
    let shared = outer.path().join("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    std::fs::set_permissions(&shared, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    let beat = shared.join("beat");
    let pool = users(1_650_000_900, 1, &root);
    // The thread appends to a file every 20 ms; the first thread leaves with exit(2) (not exit_group).
    let program = format!(
        "import ctypes, platform, threading, time\n\
         def beat():\n    while True:\n        open('{beat}', 'a').write('x')\n        time.sleep(0.02)\n\
         threading.Thread(target=beat).start()\n\
         time.sleep(0.1)\n\
         ctypes.CDLL(None).syscall(60 if platform.machine() == 'x86_64' else 93, 0)\n",
        beat = beat.display()
    );
    let script = "setsid python3 -c \"$PROGRAM\" & sleep 0.5; echo done";
    let mut req = shell(script, &root, &pool);
    req.env = vec![("PROGRAM".into(), program)];
    let (res, lines) = run(req).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let size = || std::fs::metadata(&beat).map(|m| m.len()).unwrap_or(0);
    let after = size();
    assert!(after > 5, "the thread never ran: {}", dump(&lines));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(size(), after, "the process's thread still runs after its task");
}

/// A work root the task user cannot pass through is refused at the start, with a hint.
#[tokio::test]
async fn a_work_root_closed_to_task_users_is_refused_with_a_hint() {
    let Some(_) = task_user("a_work_root_closed_to_task_users_is_refused_with_a_hint") else { return };
    let root = TempDir::new("closed");
    let pool = users(1_650_000_950, 1, &root);
    // (In `/tmp`, the work directory would be carried into the task's own `/tmp` past it.)
    let outer = TempDir::shared("closed");
    let closed = outer.path().join("closed");
    std::fs::create_dir(&closed).expect("mkdir");
    std::fs::set_permissions(&closed, std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod");
    let mut req = TaskRequest::new(ExecAction::Shell("echo ran".into()), &closed);
    req.users = Some(pool);
    let (res, lines) = run(req).await;
    match &res.outcome {
        ExecOutcome::Failed { message, .. } => assert!(message.contains("traversable"), "{message}"),
        other => panic!("{other:?}: {}", dump(&lines)),
    }
    assert!(!dump(&lines).contains("ran"));
}

/// Checks, from inside a task, what network it has: its own loopback (a server and a client in the
/// task), the machine's loopback service on the port given, and its interfaces and routes.
const NETWORK_PROBE: &str = r#"
import socket, sys
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
socket.create_connection(server.getsockname(), timeout=5).sendall(b"x")
print("own loopback", server.accept()[0].recv(1).decode())
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
    print("REACHED the machine's service")
except OSError as e:
    print("the machine's service:", e.strerror)
try:
    socket.socket(socket.AF_UNIX).connect(sys.argv[2])
    print("REACHED the machine's socket")
except OSError as e:
    print("the machine's socket:", e.strerror)
import os
print("work directory", "ok" if os.getcwd() == os.environ["SLUICE_WORKDIR"] and os.listdir(".") == ["sluice-output"] else "missing")
print("/run holds", len(os.listdir("/run")))
dev = open("/proc/net/dev").read().splitlines()[2:]
print("interfaces", ",".join(sorted(line.split(":")[0].strip() for line in dev)))
print("routes", len(open("/proc/net/route").read().splitlines()[1:]))
"#;

/// `SLUICE_TASK_NETWORK=none`: a task user's network is its own loopback alone. A service on the
/// machine's loopback (as the database and Redis may be) is out of reach, and there is no route
/// anywhere else; nor is a Unix socket in the machine's `/tmp` (`/run`, `/tmp` and `/var/tmp` are
/// empty ones of the task's own), while its work directory, inside `/tmp` here, is carried over.
/// With `host`, the same task reaches both.
#[tokio::test]
async fn an_isolated_task_reaches_only_its_own_loopback() {
    let Some(_) = task_user("an_isolated_task_reaches_only_its_own_loopback") else { return };
    if !has_python3("an_isolated_task_reaches_only_its_own_loopback") {
        return;
    }
    let root = TempDir::new("network");
    let work = root.path().join("work");
    std::fs::create_dir(&work).expect("work root");
    std::fs::set_permissions(&work, std::os::unix::fs::PermissionsExt::from_mode(0o711)).expect("chmod");
    if let Err(e) = sluice_worker::check_network_isolation(&work) {
        eprintln!("note: an_isolated_task_reaches_only_its_own_loopback skipped: {e}");
        return;
    }
    let pool = users(1_650_001_000, 1, &root);
    let service = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    service.set_nonblocking(true).expect("nonblocking");
    let port = service.local_addr().expect("address").port().to_string();
    // A socket in the machine's `/tmp` (which a task with a mount namespace has its own of, on
    // either network), and one elsewhere, for the task on the machine's network to show it reaches
    // sockets.
    let outer = TempDir::shared("network");
    let socket = |dir: &std::path::Path| {
        let path = dir.join("service.sock");
        let unix = std::os::unix::net::UnixListener::bind(&path).expect("unix listener");
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
        unix.set_nonblocking(true).expect("nonblocking");
        (unix, path.display().to_string())
    };
    let ((unix, in_tmp), (outer_unix, outside)) = (socket(root.path()), socket(outer.path()));
    let probe = |network, socket: &str| {
        let mut req = python(NETWORK_PROBE, &[&port, socket], &root, &pool);
        req.network = network;
        req
    };

    let (res, lines) = run(probe(TaskNetwork::Isolated, &in_tmp)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let out = texts(&lines, Stream::Stdout);
    assert_eq!(
        out,
        [
            "own loopback x",
            "the machine's service: Connection refused",
            "the machine's socket: No such file or directory",
            "work directory ok",
            "/run holds 0",
            "interfaces lo",
            "routes 0"
        ],
        "{}",
        dump(&lines)
    );
    assert!(service.accept().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock), "the service was reached");
    assert!(unix.accept().is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock), "the socket was reached");

    let (res, lines) = run(probe(TaskNetwork::Host, &outside)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let out = texts(&lines, Stream::Stdout);
    for reached in ["REACHED the machine's service", "REACHED the machine's socket", "work directory ok"] {
        assert!(out.contains(&reached.to_owned()), "{}", dump(&lines));
    }
    assert!(service.accept().is_ok(), "the host network's task did not connect");
    assert!(outer_unix.accept().is_ok(), "the host network's task did not reach the socket");
}

/// An isolated network is for a task user only: root, or the worker's own user, could leave it.
#[tokio::test]
async fn an_isolated_network_without_a_task_user_is_refused() {
    let root = TempDir::new("network-no-user");
    let mut req = TaskRequest::new(ExecAction::Shell("echo ran".into()), root.path().join("work"));
    req.network = TaskNetwork::Isolated;
    let (res, lines) = run(req).await;
    match &res.outcome {
        ExecOutcome::Failed { message, .. } => assert!(message.contains("takes a task user"), "{message}"),
        other => panic!("{other:?}: {}", dump(&lines)),
    }
    assert!(!dump(&lines).contains("ran"));
}

#[test]
fn task_network_settings_are_host_or_none() {
    assert_eq!(TaskNetwork::parse("host"), Ok(TaskNetwork::Host));
    assert_eq!(TaskNetwork::parse(" none "), Ok(TaskNetwork::Isolated));
    let e = TaskNetwork::parse("bridge").expect_err("unknown");
    assert!(e.contains("\"bridge\"") && e.contains("host") && e.contains("none"), "{e}");
}

/// A task user is named in its own task: programs that look their user up find it, with the work
/// directory as its home, while the machine's user database stays as it was.
#[tokio::test]
async fn a_task_user_has_a_name_and_a_home_in_its_task() {
    let Some(_) = task_user("a_task_user_has_a_name_and_a_home_in_its_task") else { return };
    let root = TempDir::new("identity");
    let pool = users(1_650_001_100, 1, &root);
    let before = std::fs::read_to_string("/etc/passwd").expect("passwd");
    let script = r#"whoami; id -gn; getent passwd "$(id -u)" | cut -d: -f6; echo "work $SLUICE_WORKDIR"; grep -c root /etc/passwd; ls "$SLUICE_WORKDIR""#;
    let (res, lines) = run(shell(script, &root, &pool)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let out = texts(&lines, Stream::Stdout);
    if !sluice_worker::own_proc_works() {
        eprintln!("note: a task user has no name where the worker cannot give tasks a mount namespace");
        return;
    }
    let line = |i: usize| out.get(i).cloned().unwrap_or_else(|| panic!("no line {i}: {}", dump(&lines)));
    assert_eq!([line(0), line(1)], ["sluice-task", "sluice-task"], "{}", dump(&lines));
    assert_eq!(format!("work {}", line(2)), line(3), "the home is not the work directory: {}", dump(&lines));
    assert_ne!(line(4), "0", "the machine's users are gone from the task's passwd");
    assert_eq!(line(5), "sluice-output", "the user database shows in the work directory: {}", dump(&lines));
    assert_eq!(std::fs::read_to_string("/etc/passwd").expect("passwd"), before);
    // Nothing is left beside the work root's attempts.
    let left: Vec<_> = std::fs::read_dir(root.path().join("work")).expect("work root").flatten().collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Adds a key to the task user's own keyring, or looks for it there (`add` or `find`).
const KEYRING_PROBE: &str = r#"
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
SYS_add_key, SYS_keyctl, KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING = 248, 250, 10, -4
if sys.argv[1] == "add":
    secret = b"tenant-a-secret"
    ok = libc.syscall(SYS_add_key, b"user", b"left-behind", secret, len(secret), KEY_SPEC_USER_KEYRING) > 0
    print("added" if ok else f"add failed {ctypes.get_errno()}")
else:
    found = libc.syscall(SYS_keyctl, KEYCTL_SEARCH, KEY_SPEC_USER_KEYRING, b"user", b"left-behind", 0) > 0
    print("FOUND the key" if found else "not found")
"#;

/// A key a task leaves in its uid's keyring (the kernel keeps it from one process of the uid to
/// the next) is gone before the next task of that uid, maybe another tenant's, starts.
#[tokio::test]
async fn a_key_left_in_the_uids_keyring_does_not_reach_the_next_task() {
    let Some(_) = task_user("a_key_left_in_the_uids_keyring_does_not_reach_the_next_task") else { return };
    if cfg!(not(target_arch = "x86_64")) || !has_python3("a_key_left_in_the_uids_keyring_does_not_reach_the_next_task")
    {
        return;
    }
    let root = TempDir::new("keyring");
    let pool = users(1_650_001_200, 1, &root);
    // (The restricted system calls refuse keyrings outright: the purge is for tasks allowed all.)
    let probe = |what: &str| {
        let mut req = python(KEYRING_PROBE, &[what], &root, &pool);
        req.syscalls = TaskSyscalls::All;
        req
    };
    let (res, lines) = run(probe("add")).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    if texts(&lines, Stream::Stdout).first().is_some_and(|l| l.starts_with("add failed")) {
        eprintln!("note: skipped: this kernel keeps no keys ({})", dump(&lines));
        return;
    }
    assert_eq!(texts(&lines, Stream::Stdout), ["added"], "{}", dump(&lines));
    let (res, lines) = run(probe("find")).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    assert_eq!(texts(&lines, Stream::Stdout), ["not found"], "{}", dump(&lines));
}

/// Tries, from inside a task (x86-64 numbers), system calls the restricted policy refuses, and a
/// fork, which it allows; prints each call's result.
const SYSCALL_PROBE: &str = r#"
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def call(name, nr, *args):
    r = libc.syscall(nr, *args)
    print(name, "ok" if r >= 0 else errno.errorcode.get(ctypes.get_errno(), "?"))
call("clone3", 435, None, 0)
call("add_key", 248, b"user", b"sluice-probe", b"x", 1, -2)
call("io_uring_setup", 425, 1, ctypes.create_string_buffer(120))
call("mount", 165, b"none", b"/tmp", b"tmpfs", 0, None)
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
print("fork ok")
call("unshare", 272, 0x10000000)
"#;

/// A task user's system calls are filtered (`SLUICE_TASK_SYSCALLS=restricted`, the default): no
/// user namespace (which would make it root over one of its own), no keyring, no `io_uring`,
/// `clone3` and `io_uring` answered as absent so that programs fall back, while a plain fork
/// works. With `all`, the same calls reach the kernel.
#[tokio::test]
async fn a_task_users_riskier_system_calls_are_refused() {
    let Some(_) = task_user("a_task_users_riskier_system_calls_are_refused") else { return };
    if cfg!(not(target_arch = "x86_64")) || !has_python3("a_task_users_riskier_system_calls_are_refused") {
        return;
    }
    let root = TempDir::new("syscalls");
    let pool = users(1_650_001_400, 1, &root);
    let probe = |syscalls| {
        let mut req = python(SYSCALL_PROBE, &[], &root, &pool);
        req.syscalls = syscalls;
        req
    };
    let (res, lines) = run(probe(TaskSyscalls::Restricted)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    assert_eq!(
        texts(&lines, Stream::Stdout),
        ["clone3 ENOSYS", "add_key EPERM", "io_uring_setup ENOSYS", "mount EPERM", "fork ok", "unshare EPERM"],
        "{}",
        dump(&lines)
    );

    let (res, lines) = run(probe(TaskSyscalls::All)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let out = texts(&lines, Stream::Stdout);
    // What the kernel itself answers (clone3 with no arguments is invalid; mounting takes root).
    for expected in ["clone3 EINVAL", "add_key ok", "mount EPERM", "fork ok"] {
        assert!(out.contains(&expected.to_owned()), "{}", dump(&lines));
    }
    assert!(!out.contains(&"io_uring_setup ENOSYS".to_owned()), "{}", dump(&lines));
}

#[test]
fn task_syscall_settings_are_restricted_or_all() {
    assert_eq!(TaskSyscalls::parse("restricted"), Ok(TaskSyscalls::Restricted));
    assert_eq!(TaskSyscalls::parse(" all "), Ok(TaskSyscalls::All));
    assert_eq!(TaskSyscalls::default(), TaskSyscalls::Restricted);
    let e = TaskSyscalls::parse("none").expect_err("not a policy");
    assert!(e.contains("\"none\"") && e.contains("restricted") && e.contains("all"), "{e}");
}
