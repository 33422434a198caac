//! Process and shell tasks: argv handling, sandbox, kill, outputs, logs (test plan A16, B06, C09, C12,
//! D21, D22, D23). Sandbox cases that need a second user run only as root (CI runs as root).

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use common::{TempDir, dump, run, task_user, texts};
use sluice_worker::{ExecAction, ExecOutcome, LogLine, Stream, TaskRequest, execute, live_group_members};
use tokio::sync::{mpsc, watch};

fn shell(script: &str, root: &TempDir) -> TaskRequest {
    TaskRequest::new(ExecAction::Shell(script.to_owned()), root.path())
}

/// C12: parameters are argv elements, never shell text.
#[tokio::test]
async fn c12_argv_is_never_interpreted_by_a_shell() {
    let root = TempDir::new("c12");
    let canary = root.path().join("canary");
    let c = canary.display().to_string();
    let hostile = [
        format!("$(touch {c})"),
        format!("; touch {c}"),
        format!("`touch {c}`"),
        format!("x\ntouch {c}"),
        format!("--flag=$(touch {c})"),
        format!("| touch {c}"),
        format!("&& touch {c}"),
    ];
    let mut argv = vec!["printf".to_owned(), "[%s]\\n".to_owned()];
    argv.extend(hostile.iter().cloned());
    let (res, lines) = run(TaskRequest::new(ExecAction::Run(argv), root.path())).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let out = texts(&lines, Stream::Stdout);
    assert!(out.contains(&format!("[$(touch {c})]")), "{out:?}");
    assert!(out.contains(&format!("[--flag=$(touch {c})]")), "{out:?}");

    // `--flag` values reach the program as data, not options of something else.
    let (res, lines) = run(TaskRequest::new(
        ExecAction::Run(vec!["/bin/echo".into(), "--".into(), "--help".into(), format!("--output={c}")]),
        root.path(),
    ))
    .await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);
    assert_eq!(texts(&lines, Stream::Stdout), vec![format!("-- --help --output={c}")]);

    // Parameters passed as environment to a script are data too, when the script quotes them.
    let mut req = shell("printf '%s\\n' \"$P1\" \"$P2\"", &root);
    req.env = vec![("P1".into(), hostile[0].clone()), ("P2".into(), hostile[3].clone())];
    let (res, _) = run(req).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);

    assert!(!canary.exists(), "the canary file was created");
}

#[tokio::test]
async fn run_missing_program_and_exit_codes() {
    let root = TempDir::new("exit");
    let (res, _) = run(TaskRequest::new(ExecAction::Run(vec!["/nonexistent/program".into()]), root.path())).await;
    assert!(matches!(res.outcome, ExecOutcome::Failed { exit_code: None, .. }), "{:?}", res.outcome);
    let (res, _) = run(TaskRequest::new(ExecAction::Run(vec![]), root.path())).await;
    assert!(matches!(res.outcome, ExecOutcome::Failed { .. }));
    let (res, _) = run(shell("echo bye; exit 3", &root)).await;
    assert_eq!(res.outcome, ExecOutcome::Failed { exit_code: Some(3), message: "exited with code 3".into() });
    let (res, _) = run(shell("kill -9 $$", &root)).await;
    assert!(matches!(&res.outcome, ExecOutcome::Failed { exit_code: None, message } if message.contains("SIGKILL")));
    let (res, _) = run(TaskRequest::new(ExecAction::Noop, root.path())).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);
}

/// D21 (env part): the task sees exactly its declared environment plus the executor's variables.
#[tokio::test]
async fn environment_is_cleared() {
    let root = TempDir::new("env");
    let mut req = TaskRequest::new(ExecAction::Run(vec!["env".into()]), root.path());
    req.env = vec![("DECLARED".into(), "yes".into()), ("SLUICE_RUN_ID".into(), "r1".into())];
    let (res, lines) = run(req).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let out = texts(&lines, Stream::Stdout);
    let keys: BTreeSet<&str> = out.iter().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    let expected: BTreeSet<&str> =
        ["DECLARED", "SLUICE_RUN_ID", "PATH", "HOME", "SLUICE_WORKDIR", "SLUICE_OUTPUT"].into_iter().collect();
    assert_eq!(keys, expected);
    for (k, _) in std::env::vars() {
        if !expected.contains(k.as_str()) {
            assert!(!keys.contains(k.as_str()), "worker variable {k} leaked");
        }
    }
    assert!(out.contains(&"DECLARED=yes".to_owned()));
    let home = out.iter().find_map(|l| l.strip_prefix("HOME=")).unwrap_or_default().to_owned();
    assert!(home.starts_with(&root.path().display().to_string()), "HOME={home}");
    assert!(!std::path::Path::new(&home).exists(), "the work directory is removed afterwards");
}

/// D21: as the task user, the worker's environment and files outside the work directory are out of reach.
#[tokio::test]
async fn d21_sandbox_denies_worker_env_and_outside_writes() {
    let Some(user) = task_user("d21_sandbox_denies_worker_env_and_outside_writes") else { return };
    let root = TempDir::new("d21");
    let script = format!(
        r#"
        if cat /proc/{pid}/environ; then echo "READ worker environ"; fi
        if cat /proc/1/environ; then echo "READ init environ"; fi
        for p in "$SLUICE_WORKDIR/../escape" /etc/sluice-escape /root/sluice-escape "{manifest}/sluice-escape"; do
          if (echo x > "$p") 2>/dev/null; then echo "WROTE $p"; fi
        done
        if ls "$SLUICE_WORKDIR/.." >/dev/null 2>&1; then echo "LISTED work root"; fi
        echo inside > "$SLUICE_WORKDIR/file" && echo inside-ok
        id -u
        "#,
        pid = std::process::id(),
        manifest = env!("CARGO_MANIFEST_DIR"),
    );
    let mut req = shell(&script, &root);
    req.run_as = Some(user);
    let (res, lines) = run(req).await;
    let out = texts(&lines, Stream::Stdout);
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    assert!(!out.iter().any(|l| l.contains("READ") || l.contains("WROTE") || l.contains("LISTED")), "{out:?}");
    assert!(out.contains(&"inside-ok".to_owned()), "{out:?}");
    assert!(out.contains(&user.0.to_string()), "{out:?}");
    assert!(!out.iter().any(|l| l.contains("CARGO") || l.contains("RUST")), "worker env leaked: {out:?}");
    assert!(!root.path().join("escape").exists());
    assert!(!std::path::Path::new("/etc/sluice-escape").exists());
}

/// A descriptor the worker inherited without close-on-exec (from a supervisor or a wrapper) does
/// not reach a task: a socket among them would be a way around the task's sandbox.
#[tokio::test]
async fn descriptors_the_worker_inherited_do_not_reach_tasks() {
    use std::os::fd::{AsFd, AsRawFd};
    let root = TempDir::new("inherited");
    let inherited = std::fs::File::open("/dev/null").expect("open");
    nix::fcntl::fcntl(inherited.as_fd(), nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty())).expect("fcntl");
    let fd = inherited.as_raw_fd();
    let script = format!("if [ -e /proc/$$/fd/{fd} ]; then echo inherited; else echo closed; fi");
    let (res, lines) = run(shell(&script, &root)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    assert_eq!(texts(&lines, Stream::Stdout), ["closed"], "{}", dump(&lines));
    drop(inherited);
}

/// D22: two tasks with distinct uids cannot read each other's work directory.
#[tokio::test]
async fn d22_cross_task_workdir_denied() {
    let Some(_) = task_user("d22_cross_task_workdir_denied") else { return };
    let root = TempDir::new("d22");
    let (tx, mut rx) = mpsc::channel(64);
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let mut req_b = shell("echo topsecret > \"$SLUICE_WORKDIR/data\"; echo ready; sleep 30", &root);
    req_b.run_as = Some((65534, 65534));
    let b = tokio::spawn(execute(req_b, tx, cancel_rx));
    loop {
        let line = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("B starts").expect("line");
        if line.text == "ready" {
            break;
        }
    }
    let dirs: Vec<_> = std::fs::read_dir(root.path()).expect("list").flatten().map(|e| e.path()).collect();
    assert_eq!(dirs.len(), 1);
    let b_dir = &dirs[0];
    let meta = std::fs::metadata(b_dir).expect("stat");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (65534, 0o700));

    let script = format!("cat '{d}/data'; ls '{d}'; echo end", d = b_dir.display());
    let mut req_a = shell(&script, &root);
    req_a.run_as = Some((65533, 65533));
    let (res, lines) = run(req_a).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);
    assert!(!lines.iter().any(|l| l.text.contains("topsecret")), "{}", dump(&lines));
    assert!(texts(&lines, Stream::Stderr).iter().any(|l| l.contains("Permission denied")), "{}", dump(&lines));

    let _ = cancel_tx.send(true);
    let res_b = b.await.expect("B");
    assert_eq!(res_b.outcome, ExecOutcome::Cancelled);
    assert!(!b_dir.exists());
}

/// Starts a task that forks 50 background `sleep`s and reports its process group; returns the pgid.
async fn start_grandchildren(
    root: &TempDir,
    marker: &str,
    timeout: Option<Duration>,
) -> (tokio::task::JoinHandle<sluice_worker::ExecResult>, watch::Sender<bool>, i32, mpsc::Receiver<LogLine>) {
    let script = format!("for i in $(seq 50); do sleep {marker} & done; echo \"pgid=$$\"; wait");
    let mut req = shell(&script, root);
    req.timeout = timeout;
    req.run_as = sluice_worker::unprivileged_user();
    let (tx, mut rx) = mpsc::channel(64);
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let handle = tokio::spawn(execute(req, tx, cancel_rx));
    let pgid = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("task starts").expect("line");
        if let Some(p) = line.text.strip_prefix("pgid=") {
            break p.parse::<i32>().expect("pgid");
        }
    };
    // Every sleep is running in the task's group.
    let deadline = Instant::now() + Duration::from_secs(5);
    while common::processes_with_cmdline(&["sleep", marker]).len() < 50 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(common::processes_with_cmdline(&["sleep", marker]).len(), 50);
    assert!(live_group_members(pgid).len() >= 51);
    (handle, cancel_tx, pgid, rx)
}

/// A16 (timeout): the whole process group, grandchildren included, is killed.
#[tokio::test]
async fn a16_timeout_kills_grandchildren() {
    let root = TempDir::new("a16t");
    let marker = "987651";
    let start = Instant::now();
    let (handle, _cancel, pgid, _rx) = start_grandchildren(&root, marker, Some(Duration::from_secs(2))).await;
    let res = handle.await.expect("task");
    assert_eq!(res.outcome, ExecOutcome::TimedOut);
    assert!(start.elapsed() < Duration::from_secs(7), "took {:?}", start.elapsed());
    assert!(live_group_members(pgid).is_empty(), "left: {:?}", live_group_members(pgid));
    assert!(common::processes_with_cmdline(&["sleep", marker]).is_empty());
}

/// A16 (cancel): cancelling mid-run kills the whole process group within 5 s.
#[tokio::test]
async fn a16_cancel_kills_grandchildren() {
    let root = TempDir::new("a16c");
    let marker = "987652";
    let (handle, cancel, pgid, _rx) = start_grandchildren(&root, marker, None).await;
    let start = Instant::now();
    cancel.send(true).expect("cancel");
    let res = handle.await.expect("task");
    assert_eq!(res.outcome, ExecOutcome::Cancelled);
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    assert!(live_group_members(pgid).is_empty(), "left: {:?}", live_group_members(pgid));
    assert!(common::processes_with_cmdline(&["sleep", marker]).is_empty());
}

/// Background jobs do not outlive a task that exits normally (and do not hold its log open).
#[tokio::test]
async fn background_jobs_killed_after_normal_exit() {
    let root = TempDir::new("bg");
    let marker = "987653";
    let start = Instant::now();
    let (res, _) = run(shell(&format!("sleep {marker} & echo done"), &root)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(common::processes_with_cmdline(&["sleep", marker]).is_empty());
}

#[tokio::test]
async fn sleep_noop_timeout_and_cancel() {
    let root = TempDir::new("sleep");
    let (res, _) = run(TaskRequest::new(ExecAction::Sleep(Duration::from_millis(20)), root.path())).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);
    let mut req = TaskRequest::new(ExecAction::Sleep(Duration::from_secs(60)), root.path());
    req.timeout = Some(Duration::from_millis(100));
    let (res, _) = run(req).await;
    assert_eq!(res.outcome, ExecOutcome::TimedOut);

    let (tx, _rx) = mpsc::channel(4);
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let h =
        tokio::spawn(execute(TaskRequest::new(ExecAction::Sleep(Duration::from_secs(60)), root.path()), tx, cancel_rx));
    tokio::time::sleep(Duration::from_millis(50)).await;
    cancel_tx.send(true).expect("cancel");
    let res = tokio::time::timeout(Duration::from_secs(2), h).await.expect("prompt").expect("task");
    assert_eq!(res.outcome, ExecOutcome::Cancelled);

    // Already cancelled before the start.
    let (tx, _rx) = mpsc::channel(4);
    let (_cancel_tx, cancel_rx) = watch::channel(true);
    let res = execute(shell("sleep 60", &root), tx, cancel_rx).await;
    assert_eq!(res.outcome, ExecOutcome::Cancelled);
}

#[tokio::test]
async fn outputs_file_is_parsed() {
    let root = TempDir::new("out");
    let script = r#"printf 'a=1\nnot a pair\nb=x=y z\n9bad=1\n' > "$SLUICE_OUTPUT"; printf 'c=%s\n' "$TOKEN" >> "$SLUICE_OUTPUT""#;
    let mut req = shell(script, &root);
    req.env = vec![("TOKEN".into(), "tok-secret-value".into())];
    req.secrets = vec!["tok-secret-value".into()];
    req.run_as = sluice_worker::unprivileged_user();
    let (res, lines) = run(req).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let expected: Vec<(&str, &str)> = vec![("a", "1"), ("b", "x=y z"), ("c", "***")];
    assert_eq!(res.outputs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>(), expected);
    let system = texts(&lines, Stream::System);
    assert_eq!(system.iter().filter(|l| l.contains("invalid, ignored")).count(), 2, "{system:?}");
}

/// An invalid line is reported masked, though the secret in it lies past what is shown of it.
#[tokio::test]
async fn an_invalid_outputs_line_never_shows_part_of_a_secret() {
    let root = TempDir::new("outmask");
    let secret = format!("tok-{}", "s".repeat(300));
    let script = r#"printf 'export TOKEN=%s
' "$TOKEN" > "$SLUICE_OUTPUT""#;
    let mut req = shell(script, &root);
    req.env = vec![("TOKEN".into(), secret.clone())];
    req.secrets = vec![secret.clone()];
    req.run_as = sluice_worker::unprivileged_user();
    let (res, lines) = run(req).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    let system = texts(&lines, Stream::System);
    let line = system.iter().find(|l| l.contains("invalid, ignored")).expect("the line is reported");
    assert!(line.ends_with("export TOKEN=***"), "{line}");
    assert!(!dump(&lines).contains("tok-sss"), "{}", dump(&lines));
}

/// The outputs file is task-controlled: a symlink to a file the task cannot read is not followed.
#[tokio::test]
async fn outputs_symlink_not_followed() {
    let root = TempDir::new("outlink");
    let secret = root.path().join("root-only");
    std::fs::write(&secret, "stolen=yes\n").expect("write");
    let mut req = shell(&format!("rm -f \"$SLUICE_OUTPUT\"; ln -s '{}' \"$SLUICE_OUTPUT\"", secret.display()), &root);
    req.run_as = sluice_worker::unprivileged_user();
    let (res, lines) = run(req).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);
    assert!(res.outputs.is_empty(), "{:?}", res.outputs);
    assert!(texts(&lines, Stream::System).iter().any(|l| l.contains("outputs file")), "{}", dump(&lines));
}

fn percent_encode(s: &str, lower_hex: bool) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                char::from(b).to_string()
            } else if lower_hex {
                format!("%{b:02x}")
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// D23: a secret printed raw, base64 (standard and URL-safe, with and without padding), URL-encoded and
/// split over two writes is masked in every stored line.
#[tokio::test]
async fn d23_secrets_masked_in_all_forms() {
    let root = TempDir::new("d23");
    let secret = "hunter2-S3cr3t/v@lue?&=x";
    let forms = [
        secret.to_owned(),
        STANDARD.encode(secret),
        STANDARD_NO_PAD.encode(secret),
        URL_SAFE.encode(secret),
        URL_SAFE_NO_PAD.encode(secret),
        percent_encode(secret, false),
        percent_encode(secret, true),
    ];
    let script = r#"
        printf 'raw: %s\n' "$API_KEY"
        printf 'to stderr: %s\n' "$API_KEY" >&2
        printf 'b64: %s\n' "$(printf %s "$API_KEY" | base64 -w0)"
        printf 'b64url: %s\n' "$(printf %s "$API_KEY" | base64 -w0 | tr '+/' '-_')"
        printf 'b64url-nopad: %s\n' "$(printf %s "$API_KEY" | base64 -w0 | tr '+/' '-_' | tr -d =)"
        printf 'b64-nopad: %s\n' "$(printf %s "$API_KEY" | base64 -w0 | tr -d =)"
        printf 'url: https://x/?k=%s\n' "$URLENC"
        printf 'url-lower: %s\n' "$URLENC_LOWER"
        printf 'split: %s' "$(printf %s "$API_KEY" | cut -c1-9)"
        sleep 0.2
        printf '%s end\n' "$(printf %s "$API_KEY" | cut -c10-)"
        printf 'no newline at the end %s' "$API_KEY"
    "#;
    let mut req = shell(script, &root);
    req.env = vec![
        ("API_KEY".into(), secret.into()),
        ("URLENC".into(), forms[5].clone()),
        ("URLENC_LOWER".into(), forms[6].clone()),
    ];
    req.secrets = vec![secret.into()];
    let (res, lines) = run(req).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    assert_eq!(lines.len(), 10, "{}", dump(&lines));
    let all = dump(&lines);
    for form in &forms {
        assert!(!all.contains(form.as_str()), "form {form} leaked:\n{all}");
    }
    for prefix in ["raw: ", "b64: ", "b64url: ", "b64url-nopad: ", "b64-nopad: ", "url-lower: "] {
        assert!(lines.iter().any(|l| l.text == format!("{prefix}***")), "{prefix}\n{all}");
    }
    assert!(texts(&lines, Stream::Stderr).contains(&"to stderr: ***".to_owned()));
    assert!(lines.iter().any(|l| l.text == "url: https://x/?k=***"), "{all}");
    assert!(lines.iter().any(|l| l.text == "split: *** end"), "{all}");
    assert!(lines.iter().any(|l| l.text == "no newline at the end ***"), "{all}");
}

/// D23 known limitations (documented on `Masker`): transforms other than base64/percent-encoding, such as
/// hex, are NOT masked, nor are secrets shorter than `MIN_SECRET_LEN` or base64 of a longer string that
/// contains the secret. This test pins that behaviour so a change is noticed.
#[tokio::test]
async fn d23_known_limitations_not_masked() {
    let root = TempDir::new("d23lim");
    let secret = "hunter2-S3cr3t";
    let hex: String = secret.bytes().map(|b| format!("{b:02x}")).collect();
    let basic = STANDARD.encode(format!("user:{secret}"));
    let script = r#"
        printf 'hex: %s\n' "$(printf %s "$API_KEY" | od -An -tx1 -v | tr -d ' \n')"
        printf 'basic: %s\n' "$(printf 'user:%s' "$API_KEY" | base64 -w0)"
        printf 'short: %s\n' "$PIN"
    "#;
    let mut req = shell(script, &root);
    req.env = vec![("API_KEY".into(), secret.into()), ("PIN".into(), "123".into())];
    req.secrets = vec![secret.into(), "123".into()];
    const { assert!(sluice_worker::MIN_SECRET_LEN > 3) };
    let (res, lines) = run(req).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);
    let out = texts(&lines, Stream::Stdout);
    assert!(out.contains(&format!("hex: {hex}")), "{out:?}");
    assert!(out.contains(&format!("basic: {basic}")), "{out:?}");
    assert!(out.contains(&"short: 123".to_owned()), "{out:?}");
}

/// C09: invalid UTF-8, NULs, ANSI escapes and CR cannot forge a record: every line is escaped.
#[tokio::test]
async fn c09_forging_characters_escaped() {
    let root = TempDir::new("c09");
    let script = r#"printf 'ok\r\n{"audit":"forged"}\r{"audit":"forged2"}\n\033[31mred\033[0m\000nul\n\377\376bad utf8\n\342\200\256rtl\n'"#;
    let (res, lines) = run(shell(script, &root)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);
    for l in &lines {
        assert!(!l.text.chars().any(|c| (c.is_control() && c != '\t') || c == '\u{202e}'), "unescaped: {:?}", l.text);
    }
    let out = texts(&lines, Stream::Stdout);
    assert_eq!(
        out,
        vec![
            "ok".to_owned(),
            "{\"audit\":\"forged\"}\\u{d}{\"audit\":\"forged2\"}".to_owned(),
            "\\u{1b}[31mred\\u{1b}[0m\\u{0}nul".to_owned(),
            "\u{fffd}\u{fffd}bad utf8".to_owned(),
            "\\u{202e}rtl".to_owned(),
        ]
    );
    assert!(lines.iter().all(|l| l.stream == Stream::Stdout));
}

/// B06 (short form): a task writing ~50 MB as fast as it can: the log stops at the cap with one marker, the
/// task is not blocked, and the worker's memory does not grow with the output.
#[tokio::test]
async fn b06_log_cap_and_bounded_memory() {
    let root = TempDir::new("b06");
    let rss_before = common::rss_kib();
    let start = Instant::now();
    let cap = 1 << 20;
    let mut req =
        shell("yes 'a line of load test output 0123456789abcdefghijklmnopqrstuvwxyz' | head -c 50000000", &root);
    req.max_log_bytes = cap;
    let (res, lines) = run(req).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);
    assert!(res.log_truncated);
    let markers: Vec<_> = lines.iter().filter(|l| l.text.starts_with("[log truncated after ")).collect();
    assert_eq!(markers.len(), 1);
    assert_eq!(markers[0].stream, Stream::System);
    let stdout_bytes: usize = lines.iter().filter(|l| l.stream == Stream::Stdout).map(|l| l.text.len()).sum();
    assert!(stdout_bytes <= cap && stdout_bytes > cap - 200, "{stdout_bytes}");
    assert!(res.log_bytes <= u64::try_from(cap + 100).unwrap_or(u64::MAX));
    assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());

    // One huge line without newline (and NULs, which expand when escaped) is split and capped too.
    let mut req = shell("head -c 20000000 /dev/zero", &root);
    req.max_log_bytes = cap;
    let (res, lines) = run(req).await;
    assert!(res.log_truncated);
    assert!(lines.iter().all(|l| l.text.len() <= 64 * 1024 * 6));
    let grown = common::rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
}

/// Long lines are split at 64 KiB.
#[tokio::test]
async fn long_lines_split() {
    let root = TempDir::new("long");
    let (res, lines) = run(shell("head -c 200000 /dev/zero | tr '\\0' a; echo; echo next", &root)).await;
    assert_eq!(res.outcome, ExecOutcome::Succeeded);
    let lens: Vec<usize> = texts(&lines, Stream::Stdout).iter().map(String::len).collect();
    assert_eq!(lens, vec![65536, 65536, 65536, 200000 - 3 * 65536, 4]);
}

/// A task starts with no signal blocked, whatever the worker's thread had blocked (exec keeps the
/// mask): a program waiting for SIGTERM gets it.
#[test]
fn a_task_starts_with_no_signal_blocked() {
    let root = TempDir::new("sigmask");
    let blocked = std::thread::spawn(move || {
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGTERM);
        set.add(nix::sys::signal::Signal::SIGUSR1);
        set.thread_block().expect("block");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let argv = ["grep", "SigBlk", "/proc/self/status"].map(str::to_owned).to_vec();
        runtime.block_on(run(TaskRequest::new(ExecAction::Run(argv), root.path())))
    });
    let (res, lines) = blocked.join().expect("thread");
    assert_eq!(res.outcome, ExecOutcome::Succeeded, "{}", dump(&lines));
    assert_eq!(texts(&lines, Stream::Stdout), ["SigBlk:\t0000000000000000"], "{}", dump(&lines));
}
