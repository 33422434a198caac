//! The embedded worker: takes dispatches from the in-process queue, claims them, executes them
//! with `sluice-worker`, streams their logs into the database, heartbeats, and completes them.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use sea_orm::FromQueryResult;
use serde_json::Value;
use sluice_domain::{
    plan::TaskOutcome,
    spec::{TaskAction, TaskSpec},
    template::{self, Context, Template},
};
use sluice_worker::{
    ExecAction, ExecOutcome, HttpCall, HttpPolicy, Limits, LogLine, Stream, TaskNetwork, TaskRequest, TaskSyscalls,
    TaskUsers,
};
use tokio::sync::{Semaphore, mpsc};
use uuid::Uuid;

use super::{Dispatch, Engine};
use crate::{
    secrets::{Sealed, SecretsKey},
    store::Store,
};

/// Most log text kept per task attempt.
pub const MAX_LOG_BYTES: usize = 10 * 1024 * 1024;

/// Where and as whom this process's tasks run.
#[derive(Debug)]
pub struct Sandbox {
    /// The folder each attempt's work directory is made in.
    pub work_root: PathBuf,
    /// The uids process tasks run as, one each (`None`: this process is not root, and tasks run
    /// as its own user).
    pub users: Option<Arc<TaskUsers>>,
    /// The network process tasks reach.
    pub network: TaskNetwork,
    /// The system calls process tasks of a task user may make.
    pub syscalls: TaskSyscalls,
}

/// Prepares the work root (see [`prepare_work_root`]) and, when this process is root, the task
/// users of `SLUICE_TASK_UIDS`. A worker told to isolate its tasks' network
/// (`SLUICE_TASK_NETWORK=none`) that cannot refuses to start: it would run them on the machine's.
pub fn prepare_sandbox(config: &crate::config::Config) -> anyhow::Result<Arc<Sandbox>> {
    use anyhow::Context as _;
    let work_root = prepare_work_root(&config.data_dir)?;
    let users = if sluice_worker::can_switch_users() {
        let (first, count) = config.task_uids;
        let users = TaskUsers::new(first, count, &config.task_uid_locks)
            .context("preparing the task users (SLUICE_TASK_UIDS, SLUICE_TASK_UID_LOCKS)")?;
        Some(Arc::new(users))
    } else {
        None
    };
    if config.task_network == TaskNetwork::Isolated {
        anyhow::ensure!(
            users.is_some(),
            "SLUICE_TASK_NETWORK=none takes a worker running as root (which runs each process task as a \
             task user in a network of its own)"
        );
        sluice_worker::check_network_isolation(&work_root).map_err(|e| {
            anyhow::anyhow!("SLUICE_TASK_NETWORK=none: this worker cannot give tasks a network of their own: {e}")
        })?;
    }
    Ok(Arc::new(Sandbox { work_root, users, network: config.task_network, syscalls: config.task_syscalls }))
}

/// Creates `<data dir>/work` and returns its absolute path (tasks run inside their own work
/// directory, so a relative path would point nowhere from there). A data folder this creates
/// and the work root are mode 0711: tasks running as another user can reach their own work
/// directory but list neither folder.
pub fn prepare_work_root(data_dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    use anyhow::Context as _;
    let work_root = data_dir.join("work");
    create_folder(&work_root)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&work_root, std::fs::Permissions::from_mode(0o711))
            .with_context(|| format!("securing {}", work_root.display()))?;
    }
    std::fs::canonicalize(&work_root).with_context(|| format!("resolving {}", work_root.display()))
}

/// Says at start as whom tasks run: when this process is not root it cannot switch users, so
/// tasks run as its own user and can read whatever it can, its data folder, keys and environment
/// included.
pub fn announce_task_users(sandbox: &Sandbox) {
    match &sandbox.users {
        Some(users) => {
            let (first, last) = users.range();
            let network = match sandbox.network {
                TaskNetwork::Host => "the machine's",
                TaskNetwork::Isolated => "none but their own loopback",
            };
            let syscalls = match sandbox.syscalls {
                TaskSyscalls::Restricted if sluice_worker::syscall_filter_supported() => {
                    "restricted (namespaces, mounts, keyrings, bpf, io_uring and the like refused)"
                }
                TaskSyscalls::Restricted => {
                    tracing::warn!(
                        "SLUICE_TASK_SYSCALLS=restricted: this worker has no system call filter for this \
                         architecture (x86-64 and AArch64 only), so tasks may make any the kernel lets them"
                    );
                    "all (no filter for this architecture)"
                }
                TaskSyscalls::All => "all",
            };
            tracing::info!(first, last, network, syscalls, "process tasks run as task users, one uid each");
        }
        None => tracing::warn!(
            "this worker is not running as root, so tasks run as its own user and can read what it can \
             (data folder, keys, environment): run workers as root (each task then runs as a uid of \
             SLUICE_TASK_UIDS of its own), or only trusted pipelines"
        ),
    }
}

/// Creates a folder (and its parents) that does not exist yet, mode 0711 on Unix: other users
/// may pass through it but not list it. An existing folder is left as it is.
pub fn create_folder(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o711);
    builder.create(dir).with_context(|| format!("creating {}", dir.display()))
}

/// The embedded worker of `sluice serve` (in-process dispatch), as started by
/// [`spawn_local_workers`]; [`LocalWorker::drain`] stops it.
pub struct LocalWorker {
    engine: Arc<Engine>,
    stop: tokio::sync::watch::Sender<bool>,
    permits: Arc<Semaphore>,
    slots: u32,
}

impl LocalWorker {
    /// Takes no new dispatch, lets the executions in flight finish for up to `grace`, then gives
    /// back those still running (see [`super::Core::release_in_flight`]); returns once every
    /// result is committed (or, after a bounded wait, given up on). Dispatches not started stay
    /// queued in the database, rung again when the server starts.
    pub async fn drain(&self, grace: Duration) {
        let _ = self.stop.send(true);
        self.engine.close_handoffs();
        let settled = async {
            let _all = self.permits.acquire_many(self.slots).await;
            self.engine.all_recorded().await;
        };
        self.engine.settle(grace, &mut std::pin::pin!(settled)).await;
        self.permits.close();
    }
}

/// The worker inside `sluice serve`, drained when the server stops.
pub enum EmbeddedWorker {
    /// Fed in-process.
    Local(Arc<LocalWorker>),
    /// Consuming from Redis ([`super::consume_redis`], stopped by `stop`).
    Redis {
        /// The engine it executes for.
        engine: Arc<Engine>,
        /// Stops it.
        stop: Arc<tokio::sync::Notify>,
        /// The consumer.
        consumer: tokio::task::JoinHandle<anyhow::Result<()>>,
    },
}

impl EmbeddedWorker {
    /// Drains it for up to `grace` (see [`LocalWorker::drain`] and [`super::drain_consumer`]).
    pub async fn drain(self, grace: Duration) {
        match self {
            Self::Local(local) => local.drain(grace).await,
            Self::Redis { engine, stop, consumer } => {
                if let Err(e) = super::drain_consumer(&engine, &stop, consumer, grace).await {
                    tracing::error!(error = %e, "the embedded Redis worker stopped");
                }
            }
        }
    }
}

/// Starts `slots` concurrent executions fed by `rx`, highest priority first (see `ReadyQueue`).
/// A dispatch this worker cannot serve (labels, owner, or larger than its whole capacity) is
/// left queued; one that fits waits for its CPU and memory to be free before it is claimed.
pub fn spawn_local_workers(
    engine: Arc<Engine>,
    store: Store,
    mut rx: mpsc::UnboundedReceiver<Dispatch>,
    gate: Arc<super::registry::Gate>,
    sandbox: Arc<Sandbox>,
    secrets_key: SecretsKey,
) -> Arc<LocalWorker> {
    announce_task_users(&sandbox);
    let slots = gate.profile.slots.max(1);
    let permits = Arc::new(Semaphore::new(slots));
    spawn_handed(engine.clone(), store.clone(), gate.clone(), permits.clone(), sandbox.clone(), secrets_key.clone());
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let local = Arc::new(LocalWorker {
        engine: engine.clone(),
        stop,
        permits: permits.clone(),
        slots: u32::try_from(slots).unwrap_or(u32::MAX),
    });
    tokio::spawn(async move {
        let mut ready = ReadyQueue::default();
        let mut open = true;
        loop {
            if ready.is_empty() {
                tokio::select! {
                    biased;
                    _ = stopped.changed() => break,
                    d = rx.recv() => match d {
                        Some(d) => enqueue(&mut ready, &gate, &engine, d).await,
                        None => break,
                    },
                }
            }
            while let Ok(d) = rx.try_recv() {
                enqueue(&mut ready, &gate, &engine, d).await;
            }
            // A slot, taking in new dispatches while none is free.
            let permit = tokio::select! {
                biased;
                _ = stopped.changed() => break,
                p = permits.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
                d = rx.recv(), if open => {
                    match d {
                        Some(d) => enqueue(&mut ready, &gate, &engine, d).await,
                        None => open = false,
                    }
                    continue;
                }
            };
            while let Ok(d) = rx.try_recv() {
                enqueue(&mut ready, &gate, &engine, d).await;
            }
            let Some((d, priority)) = ready.pop() else { continue };
            gate.unwait(priority);
            // Claimed meanwhile by a slot passed on.
            if engine.answered(&d) {
                continue;
            }
            let (engine, store, sandbox, key) = (engine.clone(), store.clone(), sandbox.clone(), secrets_key.clone());
            let gate = gate.clone();
            tokio::spawn(async move {
                let need = match gate.judge(&engine, d).await {
                    Ok(need) => need,
                    Err(skip) => {
                        gate.skipped(d, skip);
                        return;
                    }
                };
                let reserved = gate.capacity.reserve(need).await;
                let room = super::Room { slot: permit, reserved };
                if let Err(e) = run_one(&engine, &store, d, sandbox, &key, room).await {
                    tracing::warn!(run = %d.run, task = d.task, attempt = d.attempt, error = %e, "task execution failed");
                }
            });
            if !open && ready.is_empty() {
                break;
            }
        }
    });
    local
}

/// Adds a dispatch to the ready queue, counted as waiting for a slot, unless it was answered
/// already (see [`Engine::answered`]).
async fn enqueue(ready: &mut ReadyQueue, gate: &super::registry::Gate, engine: &Engine, d: Dispatch) {
    if engine.answered(&d) {
        return;
    }
    let priority = priority_of(engine, d).await;
    gate.wait(priority);
    ready.push(d, priority, now_ms());
}

/// A task's scheduling priority (the pipeline's plus its own); 0 when its plan cannot be read.
pub(super) async fn priority_of(engine: &Engine, d: Dispatch) -> i32 {
    engine.plan_of(d.run).await.ok().and_then(|p| p.tasks.get(d.task).map(|t| t.priority)).unwrap_or(0)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// How long a waiting dispatch takes to gain one point of priority.
pub(super) const AGING_MS: i64 = 1_000;

/// Dispatches waiting for a slot of the embedded worker: highest priority first, and among
/// equals the oldest first. Every second of waiting counts as one point of priority, so a task
/// is passed over by later ones of higher priority for at most (difference × 1 s): nothing
/// starves. (The order of two waiting dispatches never changes as they wait, so a static key
/// does: priority × 1 s − the time it arrived.)
#[derive(Default)]
pub struct ReadyQueue {
    heap: std::collections::BinaryHeap<Ready>,
    seq: u64,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Ready {
    key: i64,
    /// Earlier arrivals first among equal keys.
    order: std::cmp::Reverse<u64>,
    d: Dispatch,
    priority: i32,
}

impl ReadyQueue {
    /// Adds a dispatch of `priority` that arrived at `now_ms`.
    pub fn push(&mut self, d: Dispatch, priority: i32, now_ms: i64) {
        self.seq += 1;
        let key = i64::from(priority).saturating_mul(AGING_MS).saturating_sub(now_ms);
        self.heap.push(Ready { key, order: std::cmp::Reverse(self.seq), d, priority });
    }

    /// The dispatch to start next, with its priority.
    pub fn pop(&mut self) -> Option<(Dispatch, i32)> {
        self.heap.pop().map(|r| (r.d, r.priority))
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

/// Executes the tasks the engine claims for this worker's free slots in the transaction that
/// queues them (see `Engine::accept_handoffs`).
pub(super) fn spawn_handed(
    engine: Arc<Engine>,
    store: Store,
    gate: Arc<super::registry::Gate>,
    slots: Arc<Semaphore>,
    sandbox: Arc<Sandbox>,
    secrets_key: SecretsKey,
) {
    let mut handed = engine.accept_handoffs(gate, slots);
    tokio::spawn(async move {
        while let Some(h) = handed.recv().await {
            let (engine, store, sandbox, key) = (engine.clone(), store.clone(), sandbox.clone(), secrets_key.clone());
            tokio::spawn(async move {
                let super::Handed { d, claimed, room, .. } = h;
                if let Err(e) = run_claimed(&engine, &store, d, claimed, sandbox, &key, room).await {
                    tracing::warn!(run = %d.run, task = d.task, attempt = d.attempt, error = %e, "task execution failed");
                }
            });
        }
    });
}

#[derive(FromQueryResult)]
struct Outputs {
    task_id: String,
    outputs: String,
}

struct Ctx<'a> {
    params: &'a serde_json::Map<String, Value>,
    outputs: &'a BTreeMap<String, BTreeMap<String, String>>,
    run_id: String,
    item: Option<&'a Value>,
    /// The decrypted secrets the task lists, and only those.
    secrets: &'a BTreeMap<String, String>,
}

impl Context for Ctx<'_> {
    fn param(&self, name: &str) -> Option<&Value> {
        self.params.get(name)
    }
    fn output(&self, task: &str, key: &str) -> Option<&str> {
        self.outputs.get(task).and_then(|o| o.get(key)).map(String::as_str)
    }
    fn run_id(&self) -> &str {
        &self.run_id
    }
    fn secret(&self, name: &str) -> Option<&str> {
        self.secrets.get(name).map(String::as_str)
    }
    fn item(&self) -> Option<&Value> {
        self.item
    }
}

fn render(text: &str, ctx: &Ctx<'_>) -> anyhow::Result<String> {
    Template::parse(text).map_err(|e| anyhow::anyhow!("{e}"))?.render(ctx).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Builds what to execute from the task's definition; templates are rendered into argv
/// elements, environment values, and HTTP fields — never into a shell script.
fn request(spec: &TaskSpec, ctx: &Ctx<'_>, sandbox: &Sandbox, run: Uuid, attempt: u32) -> anyhow::Result<TaskRequest> {
    let action = match &spec.action {
        TaskAction::Run(argv) => ExecAction::Run(template::render_argv(argv, ctx).map_err(|e| anyhow::anyhow!("{e}"))?),
        TaskAction::Shell(script) => ExecAction::Shell(script.clone()),
        TaskAction::Http(h) => ExecAction::Http(HttpCall {
            method: format!("{:?}", h.method).to_uppercase(),
            url: render(&h.url, ctx)?,
            headers: h.headers.iter().map(|(k, v)| Ok((k.clone(), render(v, ctx)?))).collect::<anyhow::Result<_>>()?,
            body: h.body.as_deref().map(|b| render(b, ctx)).transpose()?,
            expect_status: h.expect_status.clone(),
            timeout: h.timeout.map(|d| d.to_std()),
        }),
        TaskAction::Sleep(d) => ExecAction::Sleep(d.to_std()),
        TaskAction::Noop => ExecAction::Noop,
    };
    let mut env: Vec<(String, String)> =
        spec.env.iter().map(|(k, v)| Ok((k.clone(), render(v, ctx)?))).collect::<anyhow::Result<_>>()?;
    env.push(("SLUICE_RUN_ID".into(), run.to_string()));
    env.push(("SLUICE_TASK_ID".into(), spec.id.to_string()));
    env.push(("SLUICE_ATTEMPT".into(), attempt.to_string()));
    Ok(TaskRequest {
        action,
        env,
        timeout: spec.timeout.map(|d| d.to_std()),
        work_root: sandbox.work_root.clone(),
        // The declared memory is also the task's limit (its address space).
        limits: Limits { memory_bytes: spec.resources.and_then(|r| r.memory).map(|m| m.bytes()), ..Limits::default() },
        secrets: ctx.secrets.values().cloned().collect(),
        max_log_bytes: MAX_LOG_BYTES,
        http: HttpPolicy::default(),
        run_as: None,
        users: sandbox.users.clone(),
        network: sandbox.network,
        syscalls: sandbox.syscalls,
    })
}

pub(super) async fn run_one(
    engine: &Engine,
    store: &Store,
    d: Dispatch,
    sandbox: Arc<Sandbox>,
    secrets_key: &SecretsKey,
    room: super::Room,
) -> anyhow::Result<()> {
    let Some(claimed) = engine.claim(d).await? else {
        return Ok(());
    };
    run_claimed(engine, store, d, claimed, sandbox, secrets_key, room).await
}

/// Executes an attempt this worker holds the lease of, in `room` (its slot, CPU and memory),
/// and records its result; the completion passes the room on (see [`Engine::complete`]).
pub(super) async fn run_claimed(
    engine: &Engine,
    store: &Store,
    d: Dispatch,
    claimed: super::Claimed,
    sandbox: Arc<Sandbox>,
    secrets_key: &SecretsKey,
    room: super::Room,
) -> anyhow::Result<()> {
    // Counted until the result is committed or given up on (see `Core::in_hand`).
    let _in_hand = engine.in_hand();
    let cancel = engine.track(d);
    let result = execute(engine, store, d, claimed, sandbox, secrets_key, cancel).await;
    engine.untrack(d);
    let (outcome, exit_code, message, outputs) = match result {
        Ok(r) => r,
        Err(e) => (TaskOutcome::Failed, None, Some(format!("{e:#}")), BTreeMap::new()),
    };
    // A database that fails for a moment (a restart, a failover, a dropped connection) does
    // not cost the attempt: the completion is tried again, with backoff, for one heartbeat
    // period. The lease, extended a period ago at most, outlasts that; a completion that did
    // commit before its error is answered as late the second time, and changes nothing.
    let give_up = tokio::time::Instant::now() + engine.timings.heartbeat;
    let mut room = Some(room);
    let mut delay = Duration::from_millis(50);
    loop {
        match engine.complete(d, outcome, exit_code, message.clone(), &outputs, room.take()).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() + delay < give_up => {
                tracing::warn!(run = %d.run, task = d.task, attempt = d.attempt, error = %e, "recording the task's result failed; trying again");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

type Finished = (TaskOutcome, Option<i32>, Option<String>, BTreeMap<String, String>);

async fn execute(
    engine: &Engine,
    store: &Store,
    d: Dispatch,
    run: super::Claimed,
    sandbox: Arc<Sandbox>,
    secrets_key: &SecretsKey,
    mut cancel: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Finished> {
    let plan = engine.plan_of(d.run).await?;
    let planned = plan.tasks.get(d.task).ok_or_else(|| anyhow::anyhow!("no task {} in the plan", d.task))?;
    let spec = engine.spec_of(run.pipeline, run.version).await?;
    let (si, ti) = planned.spec_index;
    let task = spec
        .stages
        .get(si)
        .and_then(|s| s.tasks.get(ti))
        .ok_or_else(|| anyhow::anyhow!("task {si}/{ti} not in the definition"))?;
    // Earlier tasks' outputs are read only for a task whose templates use them.
    let refs = references(task);
    let rows: Vec<Outputs> = if refs.iter().any(|r| matches!(r, template::Reference::TaskOutput { .. })) {
        store
            .query_all(
                store.db(),
                "SELECT task_id, outputs FROM task_runs WHERE tenant_id = $1 AND run_id = $2 AND status = 'succeeded'",
                vec![run.tenant.into(), d.run.into()],
            )
            .await?
    } else {
        vec![]
    };
    let outputs: BTreeMap<String, BTreeMap<String, String>> =
        rows.into_iter().map(|r| (r.task_id, serde_json::from_str(&r.outputs).unwrap_or_default())).collect();
    check_secret_references(task, &refs)?;
    let secrets = load_secrets(store, secrets_key, run.tenant, task).await?;
    let ctx = Ctx {
        params: &plan.params,
        outputs: &outputs,
        run_id: d.run.to_string(),
        item: planned.item.as_ref(),
        secrets: &secrets,
    };
    let mut req = request(task, &ctx, &sandbox, d.run, d.attempt)?;
    // Only HTTP tasks connect anywhere: the tenant's allow-list is read for them alone.
    if matches!(task.action, TaskAction::Http(_)) {
        (req.http.allow, req.http.allow_hosts) = crate::service::settings::http_allow_policy(store, run.tenant).await?;
    }

    let (log_tx, log_rx) = mpsc::channel::<LogLine>(1024);
    let tenant = run.tenant;
    let logs = tokio::spawn(write_logs(store.clone(), d, log_rx, tenant, engine.event_sender()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let exec = tokio::spawn(sluice_worker::execute(req, log_tx, stop_rx));
    // The first heartbeat is due one period from now. (`interval`'s immediate first tick would
    // go through the timer, which rounds up to its next millisecond: a noop task would take a
    // millisecond longer.)
    let period = engine.timings.heartbeat;
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tokio::pin!(exec);
    let result = loop {
        tokio::select! {
            r = &mut exec => break r?,
            _ = beat.tick() => {
                if engine.heartbeat(d).await.unwrap_or(false) {
                    let _ = stop_tx.send(true);
                }
            }
            changed = cancel.changed() => {
                if changed.is_ok() && *cancel.borrow() {
                    let _ = stop_tx.send(true);
                }
            }
        }
    };
    let _ = logs.await;
    Ok(match result.outcome {
        ExecOutcome::Succeeded => (TaskOutcome::Succeeded, Some(0), None, result.outputs),
        ExecOutcome::Failed { exit_code, message } => (TaskOutcome::Failed, exit_code, Some(message), result.outputs),
        ExecOutcome::TimedOut => (TaskOutcome::TimedOut, None, Some("timed out".into()), result.outputs),
        // Stopped because its worker is giving it back (a drain whose grace ran out): lost, so
        // it runs again elsewhere without using a retry.
        ExecOutcome::Cancelled if engine.releasing() => (
            TaskOutcome::Lost,
            None,
            Some("released: its worker stopped and the drain's grace ran out".into()),
            result.outputs,
        ),
        ExecOutcome::Cancelled => (TaskOutcome::Failed, None, Some("cancelled".into()), result.outputs),
    })
}

/// The templates of a task that are rendered: argv, environment values, HTTP fields.
fn templates(task: &TaskSpec) -> Vec<&str> {
    let mut templates: Vec<&str> = task.env.values().map(String::as_str).collect();
    match &task.action {
        TaskAction::Run(argv) => templates.extend(argv.iter().map(String::as_str)),
        TaskAction::Http(h) => {
            templates.push(&h.url);
            templates.extend(h.headers.values().map(String::as_str));
            templates.extend(h.body.as_deref());
        }
        TaskAction::Shell(_) | TaskAction::Sleep(_) | TaskAction::Noop => {}
    }
    templates
}

/// What the task's rendered templates refer to. A template that does not parse is left out: it
/// fails later, when it is rendered, with its own message.
fn references(task: &TaskSpec) -> Vec<template::Reference> {
    templates(task)
        .into_iter()
        .filter_map(|t| Template::parse(t).ok())
        .flat_map(|t| t.references().cloned().collect::<Vec<_>>())
        .collect()
}

/// Every template of the task that is rendered (argv, environment values, HTTP fields) may only
/// name secrets the task lists in `secrets:`; a task that names another fails before it starts.
fn check_secret_references(task: &TaskSpec, refs: &[template::Reference]) -> anyhow::Result<()> {
    for r in refs {
        if let template::Reference::Secret(name) = r
            && !task.secrets.iter().any(|s| s == name)
        {
            anyhow::bail!(
                "task `{}` uses `{{{{ secrets.{name} }}}}` but does not list `{name}` in its `secrets:`",
                task.id
            );
        }
    }
    Ok(())
}

#[derive(FromQueryResult)]
struct SecretRow {
    version: i64,
    nonce: String,
    ciphertext: String,
}

/// Loads and decrypts exactly the secrets the task lists, from the run's tenant.
async fn load_secrets(
    store: &Store,
    key: &SecretsKey,
    tenant: Uuid,
    task: &TaskSpec,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for name in &task.secrets {
        let row: SecretRow = store
            .query_one(
                store.db(),
                "SELECT version, nonce, ciphertext FROM secrets WHERE tenant_id = $1 AND name = $2",
                vec![tenant.into(), name.clone().into()],
            )
            .await?
            .ok_or_else(|| {
                anyhow::anyhow!("task `{}` lists secret `{name}`, which is not defined in this tenant", task.id)
            })?;
        let sealed = Sealed { nonce: row.nonce, ciphertext: row.ciphertext };
        let value = key
            .open(tenant, name, row.version, &sealed)
            .map_err(|e| anyhow::anyhow!("secret `{name}` could not be decrypted: {e}"))?;
        out.insert(name.clone(), value);
    }
    Ok(out)
}

/// Stores log lines in chunks of up to 200 lines, at least every 250 ms while lines arrive.
async fn write_logs(
    store: Store,
    d: Dispatch,
    mut rx: mpsc::Receiver<LogLine>,
    tenant: Uuid,
    events: tokio::sync::broadcast::Sender<super::RunEvent>,
) {
    // Where this attempt's chunks continue (after an earlier attempt's), read when the first
    // line arrives: most tasks of a busy pipeline print nothing.
    let mut next: Option<(i64, i64)> = None;
    let mut buf: Vec<String> = vec![];
    let mut open = true;
    while open {
        let deadline = tokio::time::sleep(std::time::Duration::from_millis(250));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                line = rx.recv() => match line {
                    Some(l) => {
                        let stream = match l.stream { Stream::Stdout => "out", Stream::Stderr => "err", Stream::System => "sys" };
                        buf.push(serde_json::json!({ "at": l.at, "stream": stream, "text": l.text }).to_string());
                        if buf.len() >= 200 { break; }
                    }
                    None => { open = false; break; }
                },
                () = &mut deadline => break,
            }
        }
        if buf.is_empty() {
            continue;
        }
        let (chunk, line_no) = match next {
            Some(p) => p,
            None => last_chunk(&store, d).await,
        };
        let n = buf.len() as i64;
        let body = buf.join("\n");
        let lines: Vec<serde_json::Value> = buf.drain(..).filter_map(|l| serde_json::from_str(&l).ok()).collect();
        let written = async {
            let txn = store.write().await?;
            store
                .execute(
                    &*txn,
                    "INSERT INTO task_logs (run_id, task_idx, chunk, tenant_id, attempt, first_line, lines, body, created_at) \
                     SELECT $1, $2, $3, tenant_id, $4, $5, $6, $7, $8 FROM runs WHERE id = $1",
                    vec![
                        d.run.into(),
                        (d.task as i32).into(),
                        chunk.into(),
                        (d.attempt as i32).into(),
                        line_no.into(),
                        (n as i32).into(),
                        body.into(),
                        chrono::Utc::now().into(),
                    ],
                )
                .await?;
            txn.commit().await
        }
        .await;
        match written {
            Ok(()) => {
                let _ = events.send(super::RunEvent {
                    tenant,
                    run_id: d.run,
                    kind: "log",
                    index: Some(d.task),
                    status: None,
                    attempt: Some(d.attempt),
                    lines,
                    relayed: false,
                });
            }
            Err(e) => tracing::warn!(run = %d.run, task = d.task, error = %e, "storing log lines failed"),
        }
        next = Some((chunk + 1, line_no + n));
    }
}

/// The next chunk number and line number of a task's log.
async fn last_chunk(store: &Store, d: Dispatch) -> (i64, i64) {
    #[derive(FromQueryResult)]
    struct Last {
        chunk: Option<i64>,
        lines: Option<i64>,
    }
    let last: Option<Last> = store
        .query_one(
            store.db(),
            "SELECT MAX(chunk) AS chunk, SUM(lines) AS lines FROM task_logs WHERE run_id = $1 AND task_idx = $2",
            vec![d.run.into(), (d.task as i32).into()],
        )
        .await
        .ok()
        .flatten();
    (last.as_ref().and_then(|l| l.chunk).map_or(0, |c| c + 1), last.and_then(|l| l.lines).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(task: usize) -> Dispatch {
        Dispatch { run: Uuid::nil(), task, attempt: 1 }
    }

    #[test]
    fn higher_priority_first_then_oldest_and_nothing_starves() {
        let mut q = ReadyQueue::default();
        q.push(d(0), 0, 1_000);
        q.push(d(1), 5, 1_000);
        q.push(d(2), 0, 1_000);
        q.push(d(3), -5, 1_000);
        let order: Vec<usize> = std::iter::from_fn(|| q.pop()).map(|(d, _)| d.task).collect();
        assert_eq!(order, vec![1, 0, 2, 3]);
        // A low-priority task that has waited long enough goes before a later high one...
        q.push(d(4), 0, 0);
        q.push(d(5), 10, 11_000);
        assert_eq!(q.pop().map(|(d, _)| d.task), Some(4));
        // ...but not before it has waited (difference × 1 s).
        q.push(d(6), 0, 5_000);
        q.push(d(7), 10, 11_000);
        assert_eq!(q.pop().map(|(d, _)| d.task), Some(5));
        assert_eq!(q.pop().map(|(d, _)| d.task), Some(7));
        assert_eq!(q.pop().map(|(d, _)| d.task), Some(6));
        assert!(q.is_empty());
    }
}
