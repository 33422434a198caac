//! Task execution for Sluice workers.
//!
//! [`execute`] runs one attempt of one task: a process (`Run`, argv only, never through a shell), a shell
//! script (`Shell`), an SSRF-guarded HTTP call (`Http`), a `Sleep` or a `Noop`. It streams the task's log
//! lines (secrets masked, control characters escaped, total size capped) to a channel and returns the
//! outcome plus the task's declared outputs.
//!
//! # Sandbox (process tasks)
//! * a fresh per-attempt work directory (mode 0700, owned by the task user) inside `work_root`, removed
//!   afterwards; `work_root` must be traversable (`--x`) by the task user — when `execute` creates it, it
//!   is created with mode 0711;
//! * environment cleared; only the declared variables plus `PATH`, `HOME`, `SLUICE_WORKDIR`,
//!   `SLUICE_OUTPUT`;
//! * own process group, killed as a whole (`kill(-pgid, SIGKILL)`) on timeout, cancel, and after the
//!   main process exits (no left-over background processes);
//! * rlimits: CPU, address space, file size, processes, open files, core dumps = 0;
//! * when [`TaskRequest::users`] is set (the worker runs as root), a uid of that range held by this attempt
//!   alone (its own gid, supplementary groups dropped): tasks cannot read each other's `/proc/<pid>/environ`
//!   or files, `RLIMIT_NPROC` counts this task's processes only, and once the attempt ends every process
//!   of the uid is killed (also those that left the process group with `setsid`) and what it left at the
//!   top of `/tmp`, `/var/tmp`, `/dev/shm`, `/run/lock` and `/dev/mqueue`, and its System V IPC objects,
//!   are removed, and its kernel keyrings emptied (see [`TaskUsers`]). Where the worker may (root with `CAP_SYS_ADMIN`, Linux 5.8), the task also
//!   gets a mount namespace whose `/proc` has `hidepid=invisible`: it sees its own processes only, so not the
//!   command lines of other tasks (a secret rendered into argv) or the worker's; and, where it has a mount
//!   namespace, its own `/tmp` and `/var/tmp` (folders beside its work directory) and `/dev/shm` (a fresh
//!   `tmpfs`), so no task running at the same time sees what it leaves there, and its own `/etc/passwd` and
//!   `/etc/group` naming it [`TASK_USER_NAME`] (home: the work directory), so programs that look their user
//!   up (`whoami`, `ssh`, `git`) find it. Elsewhere the uid has no passwd entry, and they cannot;
//! * else, when [`TaskRequest::run_as`] is set, setgid/setuid to it, supplementary groups dropped;
//! * as another user, `no_new_privs`: no set-user-id program or file capability raises the task;
//! * with [`TaskNetwork::Isolated`], a network namespace of its own with only its loopback up, and empty
//!   `/run`, `/tmp`, `/var/tmp` and `/dev/shm` of its own (where the machine's Unix sockets are);
//! * descriptors the worker inherited without close-on-exec are closed (Linux 5.11);
//! * as another user, with [`TaskSyscalls::Restricted`] (the default), a seccomp filter installed last
//!   refuses namespaces, mounts, keyrings, `bpf`, `io_uring` and the like (see [`TaskSyscalls`]).
//!
//! Known limits of this sandbox (no pid namespace, landlock or cgroup isolation yet; seccomp only refuses
//! the calls listed): with
//! [`TaskNetwork::Host`] the task reaches whatever the machine does; it can read what the machine lets
//! every user read (without a `/proc` of its own, other processes' command lines included), and files it leaves deeper in
//! other world-writable folders stay. `RLIMIT_NPROC` is not enforced for root, so it only works with a
//! task user.

mod http;
mod logs;
mod outputs;
mod process;
mod seccomp;
mod ssrf;
mod users;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

pub use logs::MIN_SECRET_LEN;
pub use process::{TASK_USER_NAME, check_network_isolation, live_group_members, own_proc_works};
pub use seccomp::filter_supported as syscall_filter_supported;
pub use ssrf::{ip_is_public, ip_permitted};
pub use users::{DEFAULT_LOCK_DIR, TaskUsers};

/// What a task does.
#[derive(Clone, Debug)]
pub enum ExecAction {
    /// Execute `argv[0]` (looked up in the fixed `PATH` when it has no `/`) with the arguments as given;
    /// no shell is involved, so arguments are never re-interpreted.
    Run(Vec<String>),
    /// Run the script with `/bin/sh -c`.
    Shell(String),
    /// An HTTP request with SSRF protection (see [`HttpCall`] and [`HttpPolicy`]).
    Http(HttpCall),
    /// Wait (cancellable).
    Sleep(Duration),
    /// Succeed at once.
    Noop,
}

/// An HTTP request made by an `Http` task.
#[derive(Clone)]
pub struct HttpCall {
    /// Method, e.g. `GET` (case-insensitive).
    pub method: String,
    /// Absolute `http` or `https` URL; other schemes are refused.
    pub url: String,
    /// Request headers.
    pub headers: Vec<(String, String)>,
    /// Request body.
    pub body: Option<String>,
    /// Accepted response statuses; empty means any 2xx.
    pub expect_status: Vec<u16>,
    /// Timeout of the whole call (all redirect hops, body included); falls back to [`TaskRequest::timeout`]
    /// (the smaller one wins when both are set).
    pub timeout: Option<Duration>,
}

impl fmt::Debug for HttpCall {
    /// Header values and the body may carry credentials: only names are shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpCall")
            .field("method", &self.method)
            .field("url", &self.url)
            .field("headers", &self.headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .field("body", &self.body.as_ref().map(|b| format!("<{} bytes>", b.len())))
            .field("expect_status", &self.expect_status)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Resource limits applied (as rlimits, soft = hard) to a process task and everything it starts.
///
/// A limit above the worker's own hard limit is lowered to it. Core dumps are always disabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// `RLIMIT_CPU` in seconds of CPU time (per process); `None` = inherit.
    pub cpu_seconds: Option<u64>,
    /// `RLIMIT_AS` (virtual address space) in bytes; `None` = inherit. Runtimes that reserve large
    /// virtual ranges (JVM, Go) need a generous value.
    pub memory_bytes: Option<u64>,
    /// `RLIMIT_FSIZE`: largest file the task may write.
    pub file_size_bytes: u64,
    /// `RLIMIT_NPROC`: processes (threads included) of the task uid. Only effective with `run_as`.
    pub processes: u64,
    /// `RLIMIT_NOFILE`: open file descriptors per process.
    pub open_files: u64,
}

impl Default for Limits {
    /// No CPU or memory limit, 1 GiB files, 256 processes, 1024 open files.
    fn default() -> Self {
        Limits { cpu_seconds: None, memory_bytes: None, file_size_bytes: 1 << 30, processes: 256, open_files: 1024 }
    }
}

/// Network policy of `Http` tasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpPolicy {
    /// CIDRs (`(network, prefix length)`) the tenant allow-listed: addresses inside them are permitted even
    /// when they are loopback/private/link-local etc. An IPv4 entry also matches the IPv4-mapped IPv6 form.
    pub allow: Vec<(IpAddr, u8)>,
    /// Host names the tenant allow-listed: the private addresses (not loopback or link-local)
    /// they resolve to are permitted for them (see [`sluice_domain::network`]).
    pub allow_hosts: Vec<sluice_domain::network::AllowedHost>,
    /// Response body bytes read at most; the rest is not read (a System line says so).
    pub max_body_bytes: usize,
    /// Redirects followed at most (each hop is re-checked against the policy).
    pub max_redirects: usize,
}

impl Default for HttpPolicy {
    /// No allow-list, 1 MiB bodies, 5 redirects.
    fn default() -> Self {
        HttpPolicy { allow: Vec::new(), allow_hosts: Vec::new(), max_body_bytes: 1 << 20, max_redirects: 5 }
    }
}

/// One attempt of one task.
#[derive(Clone)]
pub struct TaskRequest {
    /// What to do.
    pub action: ExecAction,
    /// Environment of a process task: the declared variables and the `SLUICE_*` ones. `PATH`, `HOME`,
    /// `SLUICE_WORKDIR` and `SLUICE_OUTPUT` are set by the executor and override entries here; names that
    /// are empty or contain `=` or NUL are skipped (with a System log line).
    pub env: Vec<(String, String)>,
    /// Overall timeout; `None` = none.
    pub timeout: Option<Duration>,
    /// Directory inside which the per-attempt work directory is created.
    pub work_root: PathBuf,
    /// Resource limits of process tasks.
    pub limits: Limits,
    /// Secret values masked in logs and outputs (see [`MIN_SECRET_LEN`]).
    pub secrets: Vec<String>,
    /// Log text forwarded at most (bytes); then one `[log truncated after N bytes]` System line.
    pub max_log_bytes: usize,
    /// Network policy of `Http` tasks.
    pub http: HttpPolicy,
    /// `(uid, gid)` the task runs as (the worker must be root); `None` = the worker's own user.
    pub run_as: Option<(u32, u32)>,
    /// Uids a process task takes one of for its attempt alone (the worker must be root); overrides
    /// `run_as`. See [`TaskUsers`].
    pub users: Option<Arc<TaskUsers>>,
    /// The network a process task reaches.
    pub network: TaskNetwork,
    /// The system calls a process task of another user may make.
    pub syscalls: TaskSyscalls,
}

/// The system calls a process task may make (`SLUICE_TASK_SYSCALLS`), when it runs as another
/// user than the worker (a task user, or [`TaskRequest::run_as`]): a task running as the worker's
/// own user is never filtered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TaskSyscalls {
    /// Namespaces (user namespaces included), mounts, the kernel's keyrings, `bpf`,
    /// `perf_event_open`, `userfaultfd`, `io_uring`, and the machine's own business (modules,
    /// `kexec`, `reboot`, the kernel's log) refused by a seccomp filter (`restricted`), where the
    /// worker has one ([`syscall_filter_supported`]: x86-64 and AArch64).
    #[default]
    Restricted,
    /// Whatever the kernel lets the task's user make (`all`): for pipelines that need user
    /// namespaces (rootless containers, a browser's own sandbox) or `io_uring`.
    All,
}

impl TaskSyscalls {
    /// The setting's values: `restricted` and `all`.
    ///
    /// # Errors
    /// Any other value, with what is accepted.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value.trim() {
            "restricted" => Ok(Self::Restricted),
            "all" => Ok(Self::All),
            other => Err(format!(
                "{other:?} is not a system call policy: use restricted (namespaces, mounts, keyrings, bpf, \
                 io_uring and the like refused) or all"
            )),
        }
    }
}

/// The network a process task reaches (`SLUICE_TASK_NETWORK`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TaskNetwork {
    /// The machine's network, as the worker has it (`host`).
    #[default]
    Host,
    /// A network namespace of the task's own with only its loopback up (`none`): the task reaches
    /// itself on `127.0.0.1` and `::1` and nothing else, so not the machine's loopback services
    /// (the database, Redis), its networks, the cloud's metadata address or the internet. Its
    /// `/run`, `/tmp`, `/var/tmp` and `/dev/shm` are empty ones of its own, since Unix
    /// sockets with a path are not bound to a network. It takes a task user ([`TaskRequest::users`] or
    /// [`TaskRequest::run_as`], not root: root could leave the namespace again), from a worker that
    /// [can](check_network_isolation).
    Isolated,
}

impl TaskNetwork {
    /// The setting's values: `host` and `none`.
    ///
    /// # Errors
    /// Any other value, with what is accepted.
    pub fn parse(value: &str) -> Result<Self, String> {
        match value.trim() {
            "host" => Ok(Self::Host),
            "none" => Ok(Self::Isolated),
            other => Err(format!(
                "{other:?} is not a task network: use host (the machine's network) or none (only the task's own loopback)"
            )),
        }
    }
}

impl TaskRequest {
    /// A request with defaults: no env, no timeout, default limits, no secrets, 10 MiB of logs, default
    /// HTTP policy, same user as the worker.
    pub fn new(action: ExecAction, work_root: impl Into<PathBuf>) -> Self {
        TaskRequest {
            action,
            env: Vec::new(),
            timeout: None,
            work_root: work_root.into(),
            limits: Limits::default(),
            secrets: Vec::new(),
            max_log_bytes: 10 << 20,
            http: HttpPolicy::default(),
            run_as: None,
            users: None,
            network: TaskNetwork::Host,
            syscalls: TaskSyscalls::Restricted,
        }
    }
}

impl fmt::Debug for TaskRequest {
    /// Secret values and environment values are never shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskRequest")
            .field("action", &self.action)
            .field("env", &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
            .field("timeout", &self.timeout)
            .field("work_root", &self.work_root)
            .field("limits", &self.limits)
            .field("secrets", &format!("<{} values>", self.secrets.len()))
            .field("max_log_bytes", &self.max_log_bytes)
            .field("http", &self.http)
            .field("run_as", &self.run_as)
            .field("users", &self.users.as_ref().map(|u| u.range()))
            .field("network", &self.network)
            .field("syscalls", &self.syscalls)
            .finish()
    }
}

/// Origin of a log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// The task's standard output (or an HTTP response body).
    Stdout,
    /// The task's standard error.
    Stderr,
    /// A message of the executor itself.
    System,
}

/// One log line: no newline inside, secrets masked, control characters (except tab) escaped as `\u{..}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogLine {
    /// Where it came from.
    pub stream: Stream,
    /// When the worker read it.
    pub at: chrono::DateTime<chrono::Utc>,
    /// The text.
    pub text: String,
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecOutcome {
    /// Exit code 0, HTTP status accepted, sleep done, or no-op.
    Succeeded,
    /// Anything else; `exit_code` is set for a process that exited normally.
    Failed {
        /// Exit code of the process, when it exited (not killed by a signal).
        exit_code: Option<i32>,
        /// Human-readable reason (secrets masked).
        message: String,
    },
    /// The timeout elapsed (the process group was killed).
    TimedOut,
    /// The cancel signal was raised (the process group was killed).
    Cancelled,
}

/// Result of [`execute`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecResult {
    /// How it ended.
    pub outcome: ExecOutcome,
    /// `key=value` pairs the task wrote to `$SLUICE_OUTPUT` (secrets masked); for `Http`, `status`.
    pub outputs: BTreeMap<String, String>,
    /// Bytes of log text sent to the channel (System lines included).
    pub log_bytes: u64,
    /// Whether the log was cut at `max_log_bytes`.
    pub log_truncated: bool,
}

/// Runs one attempt of a task.
///
/// Log lines go to `logs` (the sender waits when the channel is full, which in turn slows the task down;
/// a dropped receiver is tolerated). Setting `cancel` to `true` stops the task (outcome `Cancelled`).
/// Never panics on task-provided data.
pub async fn execute(req: TaskRequest, logs: mpsc::Sender<LogLine>, cancel: watch::Receiver<bool>) -> ExecResult {
    let sink = Arc::new(logs::LogSink::new(logs, &req.secrets, req.max_log_bytes));
    let deadline = req.timeout.map(|t| Instant::now() + t);
    let mut cancel = cancel;
    let (outcome, outputs) = match &req.action {
        ExecAction::Noop => (ExecOutcome::Succeeded, BTreeMap::new()),
        ExecAction::Sleep(d) => (sleep(*d, deadline, &mut cancel).await, BTreeMap::new()),
        ExecAction::Run(argv) => process::run(argv.clone(), &req, sink.clone(), deadline, &mut cancel).await,
        ExecAction::Shell(script) => {
            let argv = vec!["/bin/sh".to_owned(), "-c".to_owned(), script.clone()];
            process::run(argv, &req, sink.clone(), deadline, &mut cancel).await
        }
        ExecAction::Http(call) => http::run(call, &req, sink.clone(), deadline, &mut cancel).await,
    };
    let outcome = match outcome {
        ExecOutcome::Failed { exit_code, message } => ExecOutcome::Failed { exit_code, message: sink.mask(&message) },
        o => o,
    };
    let (log_bytes, log_truncated) = sink.totals();
    ExecResult { outcome, outputs, log_bytes, log_truncated }
}

/// Whether this process can run tasks as other users (it runs as root).
pub fn can_switch_users() -> bool {
    nix::unistd::geteuid().is_root()
}

/// `nobody` (from the user database, else 65534/65534), for a [`TaskRequest::run_as`] shared by the
/// tasks that set it; `None` when the worker is not root (it cannot switch users then). Tasks of
/// different tenants should have uids of their own instead: see [`TaskRequest::users`].
pub fn unprivileged_user() -> Option<(u32, u32)> {
    // Looked up once per process: the user database does not change under a running worker.
    static USER: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    *USER.get_or_init(|| {
        if !can_switch_users() {
            return None;
        }
        match nix::unistd::User::from_name("nobody") {
            Ok(Some(u)) => Some((u.uid.as_raw(), u.gid.as_raw())),
            _ => Some((65534, 65534)),
        }
    })
}

async fn sleep(d: Duration, deadline: Option<Instant>, cancel: &mut watch::Receiver<bool>) -> ExecOutcome {
    let end = Instant::now() + d;
    tokio::select! {
        _ = tokio::time::sleep_until(end) => ExecOutcome::Succeeded,
        _ = deadline_reached(deadline) => ExecOutcome::TimedOut,
        _ = cancelled(cancel) => ExecOutcome::Cancelled,
    }
}

/// Completes when the deadline (if any) has passed.
pub(crate) async fn deadline_reached(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Completes when the cancel flag is (or becomes) `true`; never when the sender is dropped first.
pub(crate) async fn cancelled(rx: &mut watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            if *rx.borrow() {
                return;
            }
            std::future::pending::<()>().await;
        }
    }
}
