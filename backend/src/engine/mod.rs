//! The engine: applies the pure planner's decisions to the database, dispatches ready tasks,
//! runs the embedded worker, and reaps what was lost.
//!
//! Every state change is an event applied to a run in a transaction that locks the run, loads
//! its state, asks `sluice_domain::plan::plan` what happens next, writes back the difference
//! (each task row conditionally on the status and attempt it had), and only after the commit
//! pushes the newly queued tasks to the dispatcher. The queue is a doorbell: a lost message only
//! delays a task until the reaper pushes it again.
//!
//! Claims, completions and the reaper's events go through one committer per process (group
//! commit): whatever arrived while the previous transaction was committing is applied in the
//! next one, each run loaded once for all of its events. An idle engine commits each event at
//! once; a busy one commits many per disk flush. A run's state is kept in memory under the
//! run's revision (a new random value on every write), so the stage and task rows are read
//! again only when another process (or a rolled-back transaction) changed them.

mod backlog;
pub mod bus;
mod doorbell;
pub mod registry;
pub mod state;
mod work;

use std::{
    collections::HashMap,
    collections::VecDeque,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use chrono::Utc;
use sea_orm::{ConnectionTrait, DbBackend, DbErr, FromQueryResult, TransactionTrait};
use sluice_domain::plan::{self, Effect, Event, Millis, TaskOutcome};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use uuid::Uuid;

use crate::store::Store;
pub use doorbell::{
    ChannelDoorbell, Doorbell, RedisDoorbell, consume_redis, drain_consumer, run_worker, shutdown_signal,
};
pub use work::{
    EmbeddedWorker, LocalWorker, Sandbox, create_folder, prepare_sandbox, prepare_work_root, spawn_local_workers,
};

/// How long a claim lasts without a heartbeat.
pub const LEASE: Duration = Duration::from_secs(15);
/// How often a running task's lease is extended.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a worker whose drain ran out waits at least for the tasks it gave back to be
/// stopped and recorded as lost (a task's process group is killed within seconds; a result's
/// commit is retried for up to a heartbeat period, and the wait is at least that plus 5 s).
pub const RELEASE_WAIT: Duration = Duration::from_secs(15);
/// How long a queued task may wait unclaimed before it is pushed again.
pub const REDISPATCH_AFTER: Duration = Duration::from_secs(10);
/// How often the reaper looks.
pub const REAPER_PERIOD: Duration = Duration::from_secs(1);

/// Lease, heartbeat and re-dispatch timings; the defaults are the constants above, and
/// `SLUICE_LEASE_SECONDS` (heartbeat: a third of it) and `SLUICE_REDISPATCH_SECONDS` shorten them
/// (tests that kill workers use this).
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// How long a claim lasts without a heartbeat.
    pub lease: Duration,
    /// How often a running task's lease is extended.
    pub heartbeat: Duration,
    /// How long a queued task may wait unclaimed before it is pushed again.
    pub redispatch_after: Duration,
}

impl Timings {
    /// The defaults, overridden by the environment.
    pub fn from_env() -> Self {
        let secs = |name: &str| std::env::var(name).ok().and_then(|v| v.trim().parse::<u64>().ok()).filter(|s| *s > 0);
        let lease = secs("SLUICE_LEASE_SECONDS").map_or(LEASE, Duration::from_secs);
        let heartbeat = if lease == LEASE { HEARTBEAT } else { lease / 3 };
        let redispatch_after = secs("SLUICE_REDISPATCH_SECONDS").map_or(REDISPATCH_AFTER, Duration::from_secs);
        Self { lease, heartbeat, redispatch_after }
    }
}

/// One task attempt to execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
pub struct Dispatch {
    /// Run.
    pub run: Uuid,
    /// Task index in the run's plan.
    pub task: usize,
    /// Attempt number.
    pub attempt: u32,
}

/// Orchestration shared by the API, the embedded worker and the reaper.
pub struct Engine {
    core: Arc<Core>,
    committer: OnceLock<mpsc::UnboundedSender<Op>>,
    /// The runtime the engine was made on, which runs its committer: in `sluice serve` the
    /// first step may come from a request, whose runtime (an HTTP worker's) ends with the HTTP
    /// server, before the engine's work is done.
    runtime: Option<tokio::runtime::Handle>,
}

/// The engine's state, shared with its committer task.
pub struct Core {
    store: Store,
    doorbell: Arc<dyn Doorbell>,
    timings: Timings,
    worker_name: String,
    running: Mutex<HashMap<Dispatch, watch::Sender<bool>>>,
    events: broadcast::Sender<RunEvent>,
    plans: state::PlanCache,
    specs: state::Memo<(Uuid, i64), Arc<sluice_domain::PipelineSpec>>,
    /// Runs' tenants (a run's tenant never changes).
    tenants: state::Memo<Uuid, Uuid>,
    states: state::StateCache,
    /// Runs being read for their plan, one read at a time per run (see [`Engine::plan_of`]).
    reading: Mutex<HashMap<Uuid, Arc<tokio::sync::Mutex<()>>>>,
    /// Runs known to have ended (an ended run never queues a task again).
    ended: state::Memo<Uuid, ()>,
    /// Most tasks of one tenant running at once (0: no limit).
    tenant_task_limit: AtomicUsize,
    /// Claims refused by the tenant limit, by tenant, rung again as that tenant's tasks end.
    throttled: Mutex<HashMap<Uuid, VecDeque<Dispatch>>>,
    /// This process's worker, when it takes newly queued tasks directly.
    handoff: OnceLock<Handoff>,
    /// Rung attempts this process claimed without their ring, whose rings are dropped on arrival.
    answered: Mutex<Answered>,
    /// Attempts this process claimed that have not reported their result yet, with when.
    unreported: Mutex<HashMap<Dispatch, std::time::Instant>>,
    /// How many attempts this process is executing or recording the result of (see
    /// [`Engine::in_hand`]).
    in_hand: Arc<watch::Sender<usize>>,
    /// Whether this process's worker gives back whatever it executes (set under `running`'s
    /// lock, so an attempt is either told by [`Core::release_in_flight`] or by `track`).
    releasing: std::sync::atomic::AtomicBool,
}

/// An attempt this process executes, counted from its start until its result is committed or
/// given up on (see [`Engine::in_hand`]).
pub struct InHand(Arc<watch::Sender<usize>>);

impl Drop for InHand {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Most answered rings remembered.
const ANSWERED_CAP: usize = 8192;

/// How long a reading of the database's clock is used to estimate its time, for unlocked
/// changes of a run (see [`Core::unlocked`]) and unlocked starts.
pub const CLOCK_READING_LASTS: std::time::Duration = std::time::Duration::from_secs(30);

/// Attempts this process claimed without taking their ring (a completion passed its slot on
/// to a task that had been rung): when such a ring arrives, it is dropped without a claim. A
/// claimed attempt is never queued again (a retry is a new attempt), so the ring can only be
/// stale. An attempt is recorded once its claim committed; the oldest are forgotten first,
/// and a forgotten one only costs its ring a claim that finds the task taken.
#[derive(Default)]
struct Answered {
    set: std::collections::HashSet<Dispatch>,
    order: VecDeque<Dispatch>,
}

impl Answered {
    fn insert(&mut self, d: Dispatch) {
        if self.set.insert(d) {
            self.order.push_back(d);
        }
        while self.order.len() > ANSWERED_CAP {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    /// Whether `d` was answered; it is forgotten then (one ring per dispatch is expected).
    fn take(&mut self, d: &Dispatch) -> bool {
        self.set.remove(d)
    }

    /// Whether `d` was answered, which is remembered for its ring.
    fn contains(&self, d: &Dispatch) -> bool {
        self.set.contains(d)
    }
}

impl std::ops::Deref for Engine {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
}

/// What an apply did, for the caller.
#[derive(Debug, Default)]
pub struct Applied {
    /// Tasks queued by this change.
    pub dispatched: Vec<Dispatch>,
    /// Running attempts to stop.
    pub kills: Vec<Dispatch>,
    /// Tenants with tasks that stopped running, one entry per task.
    pub freed: Vec<Uuid>,
    /// Tasks claimed for this process's own free slots, started after the commit.
    pub handed: Vec<Handed>,
    /// Slots of this process's worker given back by this change, released after the commit.
    /// (A change not committed releases them when dropped; a draining worker waits for the
    /// results in hand as well, see [`Core::in_hand`].)
    pub spent: Vec<tokio::sync::OwnedSemaphorePermit>,
    /// Whether the run finished with this change.
    pub finished: bool,
    /// What changed, published once the change is committed.
    pub events: Vec<RunEvent>,
    /// The rows of a new run ([`state::RunRef::New`]), for its caller to insert.
    new_rows: Option<state::NewRows>,
    /// Runs' states as this change leaves them, kept once it is committed (a state kept
    /// before would outlive a rollback).
    states: Vec<(Uuid, state::CachedState)>,
    /// Runs this change ends, known as ended once it is committed.
    ended: Vec<Uuid>,
    /// An unlocked change ([`state::RunRef::Known`]) was not written (the run or its tenant's
    /// load was not as this process knew it, or the change needs the locked way): nothing of
    /// it holds, and it is to be applied again the locked way.
    refused: bool,
}

/// What a worker learns when its claim succeeds.
#[derive(Debug, Clone, Copy)]
pub struct Claimed {
    /// Tenant of the run.
    pub tenant: Uuid,
    /// Pipeline of the run.
    pub pipeline: Uuid,
    /// The pipeline version the run pins.
    pub version: i64,
}

/// A free slot (and the CPU and memory the task declares) of this process's worker.
pub struct Room {
    /// The slot.
    pub slot: tokio::sync::OwnedSemaphorePermit,
    /// The CPU and memory.
    pub reserved: registry::Reservation,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room").finish_non_exhaustive()
    }
}

/// A task claimed in the transaction that queued it, for this process's worker.
pub struct Handed {
    /// The attempt.
    pub d: Dispatch,
    /// Whether the attempt was queued before the change that claimed it, so that a ring for it
    /// is out (or will be) and is answered already.
    pub rung: bool,
    /// What the claim returned.
    pub claimed: Claimed,
    /// Its slot and resources, held until it ends.
    pub room: Room,
}

impl std::fmt::Debug for Handed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handed").field("d", &self.d).finish_non_exhaustive()
    }
}

/// Where this process's worker takes tasks handed to it directly.
struct Handoff {
    gate: Arc<registry::Gate>,
    slots: Arc<tokio::sync::Semaphore>,
    tx: mpsc::UnboundedSender<Handed>,
    open: std::sync::atomic::AtomicBool,
}

/// One change to a run, as the committer applies it.
#[derive(Debug)]
enum Step {
    /// A worker claims a queued attempt.
    Claim(Dispatch),
    /// The lease holder reports an attempt's result. The slot (and room) it frees, when given,
    /// takes another queued task of the run in the same transaction.
    Complete {
        d: Dispatch,
        outcome: TaskOutcome,
        exit_code: Option<i32>,
        message: Option<String>,
        outputs: String,
        room: Mutex<Option<Room>>,
    },
    /// Any other planner event (ticks, lost leases).
    Event(Event),
}

/// The result of one step.
#[derive(Debug, Clone, Copy)]
enum Done {
    Claim(Option<Claimed>),
    Complete(bool),
    Event,
}

/// A step waiting for the committer, with where its result goes.
struct Op {
    run: Uuid,
    step: Step,
    reply: oneshot::Sender<Result<Done, String>>,
}

/// Most steps applied in one transaction.
const MAX_BATCH: usize = 256;

/// How long after claiming an attempt the committer expects its result soon: while attempts
/// claimed that recently have not reported, a batch is held open for them (for at most this
/// long), so short tasks that run side by side report in one commit rather than in a stream
/// of small ones. An attempt that takes longer delays a commit by at most this once.
const LINGER: Duration = Duration::from_millis(1);

/// The queued attempts last rung (or queued) before `$1`, for the reaper. The status is spelled
/// as the literal of the partial index `task_runs_queued`, which a planner uses only then.
const UNCLAIMED: &str = "SELECT run_id, idx, attempt, rung_at, queued_at, rings FROM task_runs \
     WHERE status = 'queued' AND (rung_at IS NULL OR rung_at < $1)";

/// The running attempts whose lease ended before `$1`, for the reaper (partial index
/// `task_runs_running`).
const EXPIRED_LEASES: &str = "SELECT run_id, idx, attempt FROM task_runs \
     WHERE status = 'running' AND (lease_expires_at IS NULL OR lease_expires_at < $1)";

/// A change of a run, a stage or a task, or new log lines, as streamed to clients.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunEvent {
    /// Tenant of the run.
    #[serde(skip)]
    pub tenant: Uuid,
    /// Run id.
    pub run_id: Uuid,
    /// `run`, `stage`, `task` or `log`; or `gap`: events of any run may have been missed
    /// (the relay between processes was interrupted), so watchers should re-read what they show.
    pub kind: &'static str,
    /// For stages and tasks: the index; for logs: the task index.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// New status (runs, stages, tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<&'static str>,
    /// Attempt (tasks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Log lines (`{at, stream, text}` objects).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lines: Vec<serde_json::Value>,
    /// Whether the event came from another process (through the event bus); such events are
    /// delivered to this process's subscribers and never published again.
    #[serde(skip)]
    pub relayed: bool,
}

impl RunEvent {
    /// The notice that events may have been lost on their way between processes.
    pub fn gap() -> Self {
        Self {
            tenant: Uuid::nil(),
            run_id: Uuid::nil(),
            kind: "gap",
            index: None,
            status: None,
            attempt: None,
            lines: vec![],
            relayed: true,
        }
    }

    fn status(tenant: Uuid, run_id: Uuid, kind: &'static str, index: Option<usize>, status: &'static str) -> Self {
        Self { tenant, run_id, kind, index, status: Some(status), attempt: None, lines: vec![], relayed: false }
    }
}

/// A unique worker name for this process: host, pid and a random part.
pub fn worker_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "host".into());
    format!("{host}-{}-{}", std::process::id(), &Uuid::new_v4().simple().to_string()[..8])
}

impl Engine {
    /// An engine whose dispatches ring `doorbell`, with a new unique worker name.
    pub fn new(store: Store, doorbell: Arc<dyn Doorbell>) -> Self {
        Self::named(store, doorbell, worker_name())
    }

    /// An engine whose dispatches ring `doorbell` and whose leases are held as `name`.
    pub fn named(store: Store, doorbell: Arc<dyn Doorbell>, name: String) -> Self {
        let (events, _) = broadcast::channel(4096);
        let core = Core {
            store,
            doorbell,
            timings: Timings::from_env(),
            worker_name: name,
            running: Mutex::new(HashMap::new()),
            events,
            plans: state::PlanCache::new(4096),
            specs: state::Memo::new(1024),
            tenants: state::Memo::new(4096),
            states: state::StateCache::new(4096),
            ended: state::Memo::new(65_536),
            reading: Mutex::default(),
            tenant_task_limit: AtomicUsize::new(0),
            throttled: Mutex::new(HashMap::new()),
            handoff: OnceLock::new(),
            answered: Mutex::default(),
            unreported: Mutex::default(),
            in_hand: Arc::new(watch::Sender::new(0)),
            releasing: std::sync::atomic::AtomicBool::new(false),
        };
        Self { core: Arc::new(core), committer: OnceLock::new(), runtime: tokio::runtime::Handle::try_current().ok() }
    }

    /// Hands a step to the committer (started on first use, on the engine's runtime) and waits
    /// for its result.
    async fn submit(&self, run: Uuid, step: Step) -> Result<Done, DbErr> {
        let tx = self.committer.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let committing = committer(self.core.clone(), rx);
            match &self.runtime {
                Some(runtime) => drop(runtime.spawn(committing)),
                None => drop(tokio::spawn(committing)),
            }
            tx
        });
        let (reply, rx) = oneshot::channel();
        tx.send(Op { run, step, reply }).map_err(|_| DbErr::Custom("the engine's committer stopped".into()))?;
        rx.await.map_err(|_| DbErr::Custom("the engine's committer stopped".into()))?.map_err(DbErr::Custom)
    }

    /// Runs `write` and, if it wrote (true), does what `applied` asks ([`Core::after_commit`]),
    /// in a task of its own: both happen even when the caller stops waiting (a request whose
    /// client went away). Left between the two, tasks claimed by the write for this process's
    /// worker would wait, running in name only, until their lease ran out, and attempts to stop
    /// would wait for their heartbeat. Returns what `write` returned.
    pub async fn write_then_apply(
        &self,
        write: impl Future<Output = Result<bool, DbErr>> + Send + 'static,
        mut applied: Applied,
    ) -> Result<bool, DbErr> {
        let core = self.core.clone();
        tokio::spawn(async move {
            let written = write.await?;
            if written {
                core.after_commit(&mut applied);
            }
            Ok(written)
        })
        .await
        .map_err(|e| DbErr::Custom(format!("a write stopped: {e}")))?
    }

    /// Commits `txn`, then does what `applied` asks, whatever becomes of the caller (see
    /// [`Engine::write_then_apply`]).
    pub async fn commit_applied(&self, txn: crate::store::WriteTxn, applied: Applied) -> Result<(), DbErr> {
        self.write_then_apply(async move { txn.commit().await.map(|()| true) }, applied).await.map(|_| ())
    }

    /// Limits how many tasks of one tenant run at once (0: no limit). A claim over the limit is
    /// refused and the task stays queued; it is rung again when a task of its tenant ends here,
    /// or by the reaper. Each process counts the tenant's running tasks in the database when it
    /// claims, so processes claiming at the same instant, which do not see each other's claims,
    /// can together pass the limit by what the others claim at that instant.
    pub fn set_tenant_task_limit(&self, limit: usize) {
        self.tenant_task_limit.store(limit, Ordering::Relaxed);
    }

    /// Applies one event to a run in its own (group-committed) transaction, then dispatches.
    pub async fn apply(&self, run: Uuid, event: Event) -> Result<(), DbErr> {
        self.submit(run, Step::Event(event)).await.map(|_| ())
    }

    /// Claims a queued attempt for this worker: the task becomes running with a lease measured
    /// on the database clock. `None` when somebody else has it or it is no longer queued.
    pub async fn claim(&self, d: Dispatch) -> Result<Option<Claimed>, DbErr> {
        // An attempt is queued once (a task queued again is a new attempt): one that the state
        // known here shows past its queue, at any revision, is never claimable again.
        let gone = |c: &state::CachedState| {
            c.state.tasks.get(d.task).is_some_and(|t| {
                t.attempt > d.attempt || (t.attempt == d.attempt && t.status != plan::TaskStatus::Queued)
            })
        };
        if self.ended.contains(&d.run) || self.states.with(&d.run, gone) == Some(true) {
            return Ok(None);
        }
        match self.submit(d.run, Step::Claim(d)).await? {
            Done::Claim(c) => Ok(c),
            _ => Ok(None),
        }
    }

    /// Records an attempt's result, if this worker still holds its lease; a late or foreign
    /// completion is logged and ignored, never applied. `room` is the slot (and CPU and memory)
    /// the attempt held: in the same transaction it claims the next queued task of the run this
    /// worker may execute (highest priority first), which is then handed over like a task
    /// queued with a free slot (see [`Core::accept_handoffs`]); otherwise it is released.
    pub async fn complete(
        &self,
        d: Dispatch,
        outcome: TaskOutcome,
        exit_code: Option<i32>,
        message: Option<String>,
        outputs: &std::collections::BTreeMap<String, String>,
        room: Option<Room>,
    ) -> Result<bool, DbErr> {
        let outputs = serde_json::to_string(outputs).unwrap_or_else(|_| "{}".into());
        let room = Mutex::new(room);
        // Before the step reaches the committer, which may be holding its batch open for it.
        if let Ok(mut u) = self.unreported.lock() {
            u.remove(&d);
        }
        match self.submit(d.run, Step::Complete { d, outcome, exit_code, message, outputs, room }).await? {
            Done::Complete(ok) => Ok(ok),
            _ => Ok(false),
        }
    }

    /// Pushes queued tasks nobody claimed again: a task is rung again `redispatch_after` after
    /// it was queued, then after twice that, four times, ... (up to 32 times that), so a backlog
    /// that workers are simply busy with is not multiplied in the queue, while a ring lost with
    /// Redis is soon made good.
    async fn ring_unclaimed(&self, now: chrono::DateTime<Utc>) -> Result<(), DbErr> {
        #[derive(FromQueryResult)]
        struct Q {
            run_id: Uuid,
            idx: i32,
            attempt: i32,
            rung_at: Option<chrono::DateTime<Utc>>,
            queued_at: Option<chrono::DateTime<Utc>>,
            rings: i32,
        }
        let base = chrono::Duration::from_std(self.timings.redispatch_after).unwrap_or_default();
        let candidates: Vec<Q> = self.store.query_all(self.store.db(), UNCLAIMED, vec![(now - base).into()]).await?;
        let due: Vec<Q> = candidates
            .into_iter()
            .filter(|q| {
                let last = q.rung_at.or(q.queued_at).unwrap_or(now);
                last + base * (1 << q.rings.clamp(0, 5)) <= now
            })
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        let txn = self.store.write().await?;
        let mut rung = vec![];
        for q in &due {
            let n = self
                .store
                .execute(
                    &*txn,
                    "UPDATE task_runs SET rung_at = $4, rings = rings + 1 \
                     WHERE run_id = $1 AND idx = $2 AND attempt = $3 AND status = 'queued'",
                    vec![q.run_id.into(), q.idx.into(), q.attempt.into(), now.into()],
                )
                .await?;
            if n == 1 {
                rung.push(Dispatch { run: q.run_id, task: q.idx as usize, attempt: q.attempt as u32 });
            }
        }
        txn.commit().await?;
        for d in rung {
            self.doorbell.ring(d);
        }
        Ok(())
    }

    /// Rings every queued task: at the start of a process whose rings go through its memory,
    /// the rings of tasks queued before it (by a process that stopped, or whose drain queued
    /// them again) were lost with that process. Each counts as rung now, so the reaper's first
    /// pass does not ring it again.
    pub async fn ring_queued(&self) -> Result<(), DbErr> {
        #[derive(FromQueryResult)]
        struct Q {
            run_id: Uuid,
            idx: i32,
            attempt: i32,
        }
        let txn = self.store.write().await?;
        let now = self.db_now(&*txn).await?;
        let queued: Vec<Q> = self
            .store
            .query_all(
                &*txn,
                "UPDATE task_runs SET rung_at = $1 WHERE status = 'queued' RETURNING run_id, idx, attempt",
                vec![now.into()],
            )
            .await?;
        txn.commit().await?;
        for q in queued {
            self.doorbell.ring(Dispatch { run: q.run_id, task: q.idx as usize, attempt: q.attempt as u32 });
        }
        Ok(())
    }

    /// Runs the reaper until the process ends.
    pub fn spawn_reaper(self: &Arc<Self>) {
        let engine = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REAPER_PERIOD);
            loop {
                tick.tick().await;
                if let Err(e) = engine.reap().await {
                    tracing::warn!(error = %e, "reaper pass failed");
                }
            }
        });
    }

    /// One pass of the reaper: due wake-ups (retries, gate and run timeouts), expired leases,
    /// and queued tasks nobody claimed. On PostgreSQL only one process reaps at a time.
    pub async fn reap(&self) -> Result<(), DbErr> {
        // On PostgreSQL an advisory lock, held as long as this transaction, makes one reaper
        // active at a time across processes. SQLite is one process.
        let guard = if self.store.backend() == DbBackend::Postgres {
            #[derive(FromQueryResult)]
            struct Locked {
                locked: bool,
            }
            let txn = self.store.db().begin().await?;
            let l: Option<Locked> =
                self.store.query_one(&txn, "SELECT pg_try_advisory_xact_lock(7231001) AS locked", vec![]).await?;
            if !l.is_some_and(|l| l.locked) {
                return Ok(());
            }
            Some(txn)
        } else {
            None
        };
        let now = self.db_now(self.store.db()).await?;
        #[derive(FromQueryResult)]
        struct R {
            id: Uuid,
        }
        let due: Vec<R> = self
            .store
            .query_all(
                self.store.db(),
                "SELECT id FROM runs WHERE next_wake_at IS NOT NULL AND next_wake_at <= $1",
                vec![now.into()],
            )
            .await?;
        let mut pending = vec![];
        for r in due {
            pending.push(self.submit(r.id, Step::Event(Event::Tick)));
        }
        #[derive(FromQueryResult)]
        struct T {
            run_id: Uuid,
            idx: i32,
            attempt: i32,
        }
        let lost: Vec<T> = self.store.query_all(self.store.db(), EXPIRED_LEASES, vec![now.into()]).await?;
        for t in lost {
            tracing::warn!(run = %t.run_id, task = t.idx, attempt = t.attempt, "lease expired; the attempt is lost");
            let event =
                Event::TaskFinished { task: t.idx as usize, attempt: t.attempt as u32, outcome: TaskOutcome::Lost };
            pending.push(self.submit(t.run_id, Step::Event(event)));
        }
        // All of them are submitted before any is awaited, so they share transactions.
        for r in futures_util::future::join_all(pending).await {
            r?;
        }
        self.ring_unclaimed(now).await?;
        self.start_queued_runs().await?;
        if let Some(guard) = guard {
            guard.commit().await?;
        }
        Ok(())
    }

    /// Starts runs queued behind a pipeline's concurrency limit while their key has room. A run
    /// that ends hands its slot to the oldest waiting run in its own transaction, which leaves
    /// room unused in two races on PostgreSQL: a start that counts a run as active while that
    /// run's end is being committed queues itself after the end looked for waiting runs, and
    /// two runs that end at once both hand their slot to the same waiting run. This pass decides
    /// as a start does, under the pipeline's row lock, so it never admits more than the limit.
    async fn start_queued_runs(&self) -> Result<(), DbErr> {
        #[derive(FromQueryResult)]
        struct Key {
            pipeline_id: Uuid,
            concurrency_key: String,
        }
        #[derive(FromQueryResult)]
        struct Waiting {
            id: Uuid,
            version: i64,
        }
        let keys: Vec<Key> = self
            .store
            .query_all(
                self.store.db(),
                "SELECT DISTINCT pipeline_id, concurrency_key FROM runs \
                 WHERE status = 'pending' AND concurrency_key IS NOT NULL",
                vec![],
            )
            .await?;
        for key in keys {
            let txn = self.store.write().await?;
            let active = state::active_runs(&self.store, &*txn, key.pipeline_id, &key.concurrency_key).await?;
            let waiting: Vec<Waiting> = self
                .store
                .query_all(
                    &*txn,
                    "SELECT id, version FROM runs WHERE pipeline_id = $1 AND concurrency_key = $2 \
                     AND status = 'pending' ORDER BY created_at, id",
                    vec![key.pipeline_id.into(), key.concurrency_key.clone().into()],
                )
                .await?;
            let Some(first) = waiting.first() else { continue };
            // The limit of the oldest waiting run's version, as its start judged it.
            let max = match self.spec_of(key.pipeline_id, first.version).await {
                Ok(spec) => spec.concurrency.as_ref().map_or(0, |c| i64::from(c.max)),
                Err(e) => {
                    tracing::warn!(pipeline = %key.pipeline_id, error = %e, "cannot read a waiting run's concurrency limit");
                    continue;
                }
            };
            let room = usize::try_from(max - active).unwrap_or(0);
            if room == 0 {
                continue;
            }
            let mut applied = Applied::default();
            let mut running = HashMap::new();
            for w in waiting.iter().take(room) {
                tracing::info!(run = %w.id, key = %key.concurrency_key, "starting a run that waited while its concurrency key had room");
                let start = [&Step::Event(Event::Start)];
                self.steps(&*txn, state::RunRef::Id(w.id), &start, &mut None, &mut applied, &mut running).await?;
            }
            txn.commit().await?;
            self.after_commit(&mut applied);
        }
        Ok(())
    }
}

impl Core {
    /// Subscribes to the events of every run in this process.
    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.events.subscribe()
    }

    /// Where log lines are published (the embedded worker's log writer holds a clone).
    pub fn event_sender(&self) -> broadcast::Sender<RunEvent> {
        self.events.clone()
    }

    /// A run's compiled plan (cached: plans never change). A run first seen here is read with
    /// its state (see [`state::peek`]), which its first claim here then needs no lock for.
    pub async fn plan_of(&self, run: Uuid) -> anyhow::Result<Arc<plan::Prepared>> {
        if let Some(p) = self.plans.get(&run) {
            return Ok(p);
        }
        // The rings of a new run come several at a time: one reads it, the others wait for that
        // read and find the plan known.
        let reading = match self.reading.lock() {
            Ok(mut r) => r.entry(run).or_default().clone(),
            Err(_) => Arc::default(),
        };
        let read = {
            let _turn = reading.lock().await;
            state::peek(&self.store, self.store.db(), run, &self.plans, &self.states).await
        };
        if let Ok(mut r) = self.reading.lock() {
            r.remove(&run);
        }
        let (plan, ended) = read?;
        // Its rings that still come are then answered here (see `Engine::claim`).
        if ended {
            self.ended.put(run, ());
        }
        Ok(plan)
    }

    /// The tenant of a run (cached: it never changes).
    pub async fn tenant_of(&self, run: Uuid) -> anyhow::Result<Uuid> {
        if let Some(t) = self.tenants.get(&run) {
            return Ok(t);
        }
        let tenant = registry::run_tenant(&self.store, run).await?;
        self.tenants.put(run, tenant);
        Ok(tenant)
    }

    /// A pipeline version's parsed definition (cached: versions never change).
    pub async fn spec_of(&self, pipeline: Uuid, version: i64) -> anyhow::Result<Arc<sluice_domain::PipelineSpec>> {
        if let Some(s) = self.specs.get(&(pipeline, version)) {
            return Ok(s);
        }
        #[derive(FromQueryResult)]
        struct D {
            definition: String,
        }
        let d: D = self
            .store
            .query_one(
                self.store.db(),
                "SELECT definition FROM pipeline_versions WHERE pipeline_id = $1 AND version = $2",
                vec![pipeline.into(), version.into()],
            )
            .await?
            .ok_or_else(|| anyhow::anyhow!("pipeline version vanished"))?;
        let spec = Arc::new(
            sluice_domain::parse_definition(&d.definition).map_err(|e| anyhow::anyhow!("stored definition: {e}"))?,
        );
        self.specs.put((pipeline, version), spec.clone());
        Ok(spec)
    }

    /// The lease, heartbeat and re-dispatch timings in use.
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// The configured limit of running tasks per tenant (0: none), for tenants without their own.
    pub fn tenant_task_limit(&self) -> usize {
        self.tenant_task_limit.load(Ordering::Relaxed)
    }

    /// This process's worker name.
    pub fn worker_name(&self) -> &str {
        &self.worker_name
    }

    /// The database's clock (leases are always measured on it, never on a worker's clock).
    pub async fn db_now(&self, conn: &impl ConnectionTrait) -> Result<chrono::DateTime<Utc>, DbErr> {
        self.store.now(conn).await
    }

    /// Lets this process's worker take tasks the moment they are queued, in the same
    /// transaction, whenever it has a free slot (and the room the task declares): `gate` judges
    /// them as for a ring, `slots` are the worker's slots. Returns where they arrive.
    pub fn accept_handoffs(
        &self,
        gate: Arc<registry::Gate>,
        slots: Arc<tokio::sync::Semaphore>,
    ) -> mpsc::UnboundedReceiver<Handed> {
        let (tx, rx) = mpsc::unbounded_channel();
        let open = std::sync::atomic::AtomicBool::new(true);
        if self.handoff.set(Handoff { gate, slots, tx, open }).is_err() {
            tracing::warn!("a second local worker asked for handed tasks; it gets none");
        }
        rx
    }

    /// Whether a ring for `d` is stale because this process claimed the attempt without it (see
    /// `Answered`); a ring answered so is forgotten, as one ring is expected.
    pub fn answered(&self, d: &Dispatch) -> bool {
        self.answered.lock().is_ok_and(|mut a| a.take(d))
    }

    /// Whether this process claimed `d` without its ring, which is still to come (and is then
    /// dropped by [`Engine::answered`]): for a sighting of `d` that is not its ring, such as its
    /// entry in a queue's backlog.
    pub fn answered_already(&self, d: &Dispatch) -> bool {
        self.answered.lock().is_ok_and(|a| a.contains(d))
    }

    /// Records an attempt this process claims; it is forgotten when it reports its result
    /// ([`Engine::complete`]). Recorded as the claim is made: should the transaction roll back,
    /// the entry only holds one batch open for at most [`LINGER`].
    fn claimed(&self, d: Dispatch) {
        if let Ok(mut u) = self.unreported.lock() {
            let now = std::time::Instant::now();
            u.insert(d, now);
            // An attempt whose result never comes (its execution was lost) is let go here.
            if u.len() > 4 * MAX_BATCH {
                u.retain(|_, at| now.duration_since(*at) < LINGER);
            }
        }
    }

    /// Whether an attempt claimed here within [`LINGER`] has not reported its result yet.
    fn expecting(&self) -> bool {
        self.unreported.lock().is_ok_and(|u| u.values().any(|at| at.elapsed() < LINGER))
    }

    /// Stops handing tasks to this process's worker (it is draining).
    pub fn close_handoffs(&self) {
        if let Some(h) = self.handoff.get() {
            h.open.store(false, Ordering::Relaxed);
        }
    }

    /// Counts an attempt of this process's worker as in hand until the guard is dropped, once
    /// its result is committed (or given up on). A draining worker waits for its free slots
    /// and then for [`Core::all_recorded`]: a slot alone does not tell, since a completion
    /// whose commit is retried (its unlocked write refused, its batch failed) frees its slot
    /// before the retry commits.
    pub fn in_hand(&self) -> InHand {
        self.in_hand.send_modify(|n| *n += 1);
        InHand(self.in_hand.clone())
    }

    /// Waits until no attempt is in hand (see [`Core::in_hand`]).
    pub async fn all_recorded(&self) {
        let mut counted = self.in_hand.subscribe();
        // The sender lives as long as `self`: waiting cannot fail.
        let _ = counted.wait_for(|n| *n == 0).await;
    }

    /// Gives back every attempt this process's worker is executing (a drain whose grace ran
    /// out): each is stopped (its process group killed) and reported as lost, so it runs again
    /// at once, on another worker, without using a retry (while the task was lost fewer than
    /// [`sluice_domain::plan::MAX_LOST`] times). So is every attempt that starts afterwards.
    /// Returns how many were told.
    pub fn release_in_flight(&self) -> usize {
        let Ok(running) = self.running.lock() else { return 0 };
        self.releasing.store(true, Ordering::Relaxed);
        for stop in running.values() {
            let _ = stop.send(true);
        }
        running.len()
    }

    /// The end of a drain: waits up to `grace` for `settled` (every slot free and every result
    /// committed); then gives back what still runs ([`Core::release_in_flight`]) and waits for
    /// `settled` again, for as long as a result's commit may be retried (at least
    /// [`RELEASE_WAIT`]). `None` when it did not settle.
    pub(crate) async fn settle<F: std::future::Future + Unpin>(
        &self,
        grace: Duration,
        settled: &mut F,
    ) -> Option<F::Output> {
        if let Ok(done) = tokio::time::timeout(grace, &mut *settled).await {
            return Some(done);
        }
        let released = self.release_in_flight();
        tracing::warn!(released, "tasks still running after {} s; giving them back", grace.as_secs());
        let wait = RELEASE_WAIT.max(self.timings.heartbeat + Duration::from_secs(5));
        let done = tokio::time::timeout(wait, settled).await.ok();
        if done.is_none() {
            tracing::warn!(
                "tasks given back not recorded after another {} s; their leases will expire",
                wait.as_secs()
            );
        }
        done
    }

    /// Whether this process's worker gives back what it executes (see
    /// [`Core::release_in_flight`]): an attempt stopped meanwhile was stopped to be given back.
    /// (A run's cancel or a lost lease stops an attempt too, but the result of such an attempt
    /// is ignored whatever it says: its task is no longer running under this lease.)
    fn releasing(&self) -> bool {
        self.releasing.load(Ordering::Relaxed)
    }

    /// A free slot and room of this process's worker for a task just queued, if it has them,
    /// may execute the task, and its tenant is under its limit.
    fn room_for(
        &self,
        run_plan: &plan::RunPlan,
        row: &state::RunRow,
        d: Dispatch,
        running: &mut HashMap<Uuid, (i64, i64)>,
    ) -> Option<Room> {
        let h = self.handoff.get().filter(|h| h.open.load(Ordering::Relaxed))?;
        let need = h.gate.profile.judge(run_plan.tasks.get(d.task)?, row.tenant_id).ok()?;
        let (n, limit) = self.tenant_load(row, running);
        if limit > 0 && n >= limit {
            return None;
        }
        let slot = h.slots.clone().try_acquire_owned().ok()?;
        h.gate.capacity.try_reserve(need).map(|reserved| Room { slot, reserved })
    }

    /// The claim a slot freed by a completion makes: the queued task of the run (not claimed
    /// already in this transaction) with the highest priority, lowest index first, that this
    /// process's worker may execute and has room for once the finished attempt's room is
    /// released, unless a dispatch of higher priority waits for a slot. The slot comes back
    /// (to be released after the commit) when there is none or handing over is off.
    fn pass_on(
        &self,
        run_plan: &plan::RunPlan,
        row: &state::RunRow,
        state: &plan::RunState,
        local: &VecDeque<(Step, Room)>,
        room: Room,
    ) -> Result<(Step, Room), tokio::sync::OwnedSemaphorePermit> {
        let Room { slot, reserved } = room;
        drop(reserved);
        let Some(h) = self.handoff.get().filter(|h| h.open.load(Ordering::Relaxed)) else { return Err(slot) };
        let taken = |i: usize| local.iter().any(|(s, _)| matches!(s, Step::Claim(c) if c.task == i));
        let mut queued: Vec<(usize, &plan::PlannedTask, u32)> = state
            .tasks
            .iter()
            .enumerate()
            .filter(|(i, t)| t.status == plan::TaskStatus::Queued && !taken(*i))
            .filter_map(|(i, t)| run_plan.tasks.get(i).map(|p| (i, p, t.attempt)))
            .collect();
        queued.sort_by_key(|(i, p, _)| (std::cmp::Reverse(p.priority), *i));
        // A dispatch of higher priority waiting for a slot of this worker (of another run, or
        // rung earlier) gets the slot instead.
        let best_waiting = h.gate.best_waiting();
        for (i, task, attempt) in queued {
            if best_waiting.is_some_and(|w| w > task.priority) {
                break;
            }
            let Ok(need) = h.gate.profile.judge(task, row.tenant_id) else { continue };
            if let Some(reserved) = h.gate.capacity.try_reserve(need) {
                return Ok((Step::Claim(Dispatch { run: row.id, task: i, attempt }), Room { slot, reserved }));
            }
        }
        Err(slot)
    }

    /// How many tasks of the run's tenant are running, and its limit (0: none): as the run's
    /// load read them (the count, and the operator's override of the configured limit) for the
    /// first run of the tenant in this transaction, then kept up to date in `running` as claims
    /// succeed. (`steps` reads the count before any claim when the row came without it.)
    fn tenant_load(&self, row: &state::RunRow, running: &mut HashMap<Uuid, (i64, i64)>) -> (i64, i64) {
        *running.entry(row.tenant_id).or_insert_with(|| {
            let default = self.tenant_task_limit() as i64;
            (row.load.tenant_running.unwrap_or_default(), row.load.tenant_max.unwrap_or(default))
        })
    }

    /// Applies one event to a run inside `conn` (the caller's transaction, which must hold the
    /// write lock) and returns what to do after the commit ([`Core::after_commit`]).
    pub async fn apply_in(&self, conn: &impl ConnectionTrait, run: Uuid, event: Event) -> Result<Applied, DbErr> {
        let mut applied = Applied::default();
        let run = state::RunRef::Id(run);
        self.steps(conn, run, &[&Step::Event(event)], &mut None, &mut applied, &mut HashMap::new()).await?;
        Ok(applied)
    }

    /// Plans the first event of a new run, whose row (pending, revision 0) and plan the caller
    /// passes: nothing is read, and the rows are not written but returned, in the state the
    /// event leaves them in, for the caller's transaction to insert with the run's own row
    /// ([`state::NewRows`]). The plan is kept for the run's later events.
    pub async fn start_new(
        &self,
        conn: &impl ConnectionTrait,
        row: state::RunRow,
        run_plan: Arc<plan::Prepared>,
        event: Event,
    ) -> Result<(Applied, state::NewRows), DbErr> {
        self.plans.put(row.id, run_plan);
        let mut applied = Applied::default();
        let run = state::RunRef::New(Box::new(row));
        self.steps(conn, run, &[&Step::Event(event)], &mut None, &mut applied, &mut HashMap::new()).await?;
        let rows = applied.new_rows.take().ok_or_else(|| DbErr::Custom("a new run was not planned".into()))?;
        Ok((applied, rows))
    }

    /// Applies `steps`, in order, to one run inside `conn`: the run is loaded once, each step is
    /// planned on the state the previous one left, and the difference is written once. `clock` is
    /// the database clock when the transaction already read it (else it comes with the run, and
    /// is left there for the next run of the transaction).
    async fn steps(
        &self,
        conn: &impl ConnectionTrait,
        run: state::RunRef,
        steps: &[&Step],
        clock: &mut Option<chrono::DateTime<Utc>>,
        applied: &mut Applied,
        running: &mut HashMap<Uuid, (i64, i64)>,
    ) -> Result<Vec<Done>, DbErr> {
        let none = |s: &&Step| match s {
            Step::Claim(_) => Done::Claim(None),
            Step::Complete { .. } => Done::Complete(false),
            Step::Event(_) => Done::Event,
        };
        let new = matches!(run, state::RunRef::New(_));
        let unlocked = match &run {
            state::RunRef::Known(k) => Some(k.clock),
            _ => None,
        };
        let Some(loaded) = state::load(&self.store, conn, run, &self.plans, &self.states).await? else {
            return Ok(steps.iter().map(none).collect());
        };
        let state::Loaded { mut row, plan: run_plan, state: old, mut leases } = loaded;
        let run = row.id;
        // A row passed in may come without the tenant's running tasks (see `service::runs`):
        // they are counted now, in a statement of their own, if this transaction may claim.
        let may_claim = self.handoff.get().is_some() || steps.iter().any(|s| matches!(s, Step::Claim(_)));
        if row.load.tenant_running.is_none() && may_claim && !running.contains_key(&row.tenant_id) {
            row.load.tenant_running = Some(state::tenant_running(&self.store, conn, row.tenant_id).await?);
        }
        let now = match clock.or(row.load.db_now) {
            Some(now) => now,
            None => self.db_now(conn).await?,
        };
        *clock = Some(now);
        // The clock kept with the run's state: an unlocked change keeps the reading it was
        // estimated from; a locked one (on PostgreSQL) gives a new one.
        let reading =
            unlocked.or_else(|| row.load.db_now.map(|_| state::Clock { db: now, at: std::time::Instant::now() }));
        // (The clock was read when the transaction began, or with another run: a transaction
        // that committed to this run meanwhile may have recorded a later time, which the
        // planner then applies the events at.)
        let now_ms = state::ms(now);
        let lease_until = now + chrono::Duration::from_std(self.timings.lease).unwrap_or_default();
        let old_wake = row.next_wake_at.map(state::ms);
        let mut wake = old_wake;
        let mut cur = old.clone();
        let mut writes: HashMap<usize, state::TaskWrite> = HashMap::new();
        let mut dispatched = vec![];
        let mut done = Vec::with_capacity(steps.len());
        // Claims of tasks queued by these steps that this process's own free slots take at once,
        // in this same transaction: no ring, no second commit.
        let mut local: VecDeque<(Step, Room)> = VecDeque::new();
        let mut i = 0;
        loop {
            let owned: Step;
            let mut room: Option<Room> = None;
            let step: &Step = if let Some(s) = steps.get(i) {
                s
            } else if let Some((s, r)) = local.pop_front() {
                owned = s;
                room = Some(r);
                &owned
            } else {
                break;
            };
            let given = i < steps.len();
            i += 1;
            let event = match step {
                Step::Claim(d) => {
                    let (n, limit) = self.tenant_load(&row, running);
                    if limit > 0 {
                        let queued = cur
                            .tasks
                            .get(d.task)
                            .is_some_and(|t| t.status == plan::TaskStatus::Queued && t.attempt == d.attempt);
                        if queued && n >= limit {
                            if let Ok(mut t) = self.throttled.lock() {
                                t.entry(row.tenant_id).or_default().push_back(*d);
                            }
                            if given {
                                done.push(Done::Claim(None));
                            }
                            applied.spent.extend(room.take().map(|r| r.slot));
                            continue;
                        }
                    }
                    Event::TaskStarted { task: d.task, attempt: d.attempt }
                }
                Step::Complete { d, outcome, .. } => {
                    let holds = cur
                        .tasks
                        .get(d.task)
                        .is_some_and(|t| t.status == plan::TaskStatus::Running && t.attempt == d.attempt)
                        && leases.get(d.task).and_then(Option::as_deref) == Some(self.worker_name.as_str());
                    if !holds {
                        tracing::warn!(run = %d.run, task = d.task, attempt = d.attempt, "late completion ignored: the lease is not ours");
                        done.push(Done::Complete(false));
                        continue;
                    }
                    Event::TaskFinished { task: d.task, attempt: d.attempt, outcome: *outcome }
                }
                Step::Event(e) => *e,
            };
            let (new, effects) = plan::plan_prepared(&run_plan, &cur, event, now_ms);
            // An ignored event (stale or late) changes nothing, the alarm included; any other
            // event ends with the run's one alarm, or none when nothing is due.
            if !(new == cur && effects.is_empty()) {
                wake = None;
            }
            let mut fresh = vec![];
            for e in effects {
                match e {
                    Effect::Dispatch { task, attempt } => fresh.push(Dispatch { run, task, attempt }),
                    Effect::Kill { task, attempt } => applied.kills.push(Dispatch { run, task, attempt }),
                    Effect::WakeAt { at } => wake = Some(wake.map_or(at, |w: Millis| w.min(at))),
                    Effect::Finished { .. } => applied.finished = true,
                }
            }
            for d in fresh {
                match self.room_for(&run_plan, &row, d, running) {
                    Some(room) => local.push_back((Step::Claim(d), room)),
                    None => dispatched.push(d),
                }
            }
            let result = match step {
                Step::Claim(d) => {
                    let was_queued = cur.tasks.get(d.task).is_some_and(|t| t.status == plan::TaskStatus::Queued);
                    let started = new
                        .tasks
                        .get(d.task)
                        .is_some_and(|t| t.status == plan::TaskStatus::Running && t.attempt == d.attempt);
                    if was_queued && started {
                        if let Some((n, _)) = running.get_mut(&row.tenant_id) {
                            *n += 1;
                        }
                        leases[d.task] = Some(self.worker_name.clone());
                        self.claimed(*d);
                        writes.entry(d.task).or_default().lease = Some((self.worker_name.clone(), lease_until));
                        Done::Claim(Some(Claimed {
                            tenant: row.tenant_id,
                            pipeline: row.pipeline_id,
                            version: row.version,
                        }))
                    } else {
                        Done::Claim(None)
                    }
                }
                Step::Complete { d, exit_code, message, outputs, room: freed, .. } => {
                    writes.entry(d.task).or_default().result = Some((*exit_code, message.clone(), outputs.clone()));
                    // The slot this attempt held takes the next queued task of the run.
                    let freed = freed.lock().ok().and_then(|mut r| r.take());
                    match freed.map(|r| self.pass_on(&run_plan, &row, &new, &local, r)) {
                        Some(Ok(next)) => local.push_back(next),
                        Some(Err(slot)) => applied.spent.push(slot),
                        None => {}
                    }
                    Done::Complete(true)
                }
                Step::Event(_) => Done::Event,
            };
            if given {
                done.push(result);
            } else if let (Step::Claim(d), Done::Claim(claimed)) = (step, result) {
                match (claimed, room.take()) {
                    (Some(claimed), Some(room)) => {
                        let rung = old
                            .tasks
                            .get(d.task)
                            .is_some_and(|t| t.status == plan::TaskStatus::Queued && t.attempt == d.attempt);
                        applied.handed.push(Handed { d: *d, rung, claimed, room });
                    }
                    (_, room) => {
                        applied.spent.extend(room.map(|r| r.slot));
                        dispatched.push(*d);
                    }
                }
            }
            cur = new;
        }
        for (i, t) in cur.tasks.iter().enumerate() {
            if t.status != plan::TaskStatus::Running {
                leases[i] = None;
            }
            if old.tasks[i].status == plan::TaskStatus::Running && t.status != plan::TaskStatus::Running {
                applied.freed.push(row.tenant_id);
            }
        }
        // Only what is still queued at the end is rung.
        dispatched.retain(|d: &Dispatch| {
            cur.tasks.get(d.task).is_some_and(|t| t.status == plan::TaskStatus::Queued && t.attempt == d.attempt)
        });
        applied.dispatched.extend(dispatched);
        let ended = old.status != plan::RunStatus::Pending && !old.status.is_terminal() && cur.status.is_terminal();
        let change = state::Change {
            run,
            rev: row.rev,
            old: &old,
            new: &cur,
            wake: state::Wake { old: old_wake, new: wake },
            writes: &writes,
        };
        let rev = if new {
            // Nothing of a new run ran yet, so there is nothing to kill; its rows are the caller's
            // to insert.
            let rev = state::next_rev(row.rev);
            applied.new_rows = Some(state::NewRows::new(row.tenant_id, run, &run_plan, &cur, wake, &writes, rev));
            rev
        } else if unlocked.is_some() {
            // Kills and a concurrency slot passed on take more than one statement: the locked way.
            let more = applied.kills.iter().any(|k| k.run == run) || (ended && row.concurrency_key.is_some());
            let guard = state::Guard {
                claims: writes.values().filter(|w| w.lease.is_some()).count() as u64,
                tenant: row.tenant_id,
                default_limit: self.tenant_task_limit() as i64,
            };
            let saved = if more { None } else { state::save_unlocked(&self.store, &change, guard).await? };
            match saved {
                Some(rev) => rev,
                None => {
                    applied.refused = true;
                    return Ok(vec![]);
                }
            }
        } else {
            state::save(&self.store, conn, &change).await?
        };
        for k in applied.kills.iter().filter(|k| k.run == run) {
            self.store
                .execute(
                    conn,
                    "UPDATE task_runs SET cancel_requested = $4 WHERE run_id = $1 AND idx = $2 AND attempt = $3",
                    vec![run.into(), (k.task as i32).into(), (k.attempt as i32).into(), true.into()],
                )
                .await?;
        }
        let tenant = row.tenant_id;
        for (i, (a, b)) in old.stages.iter().zip(&cur.stages).enumerate() {
            if a.status != b.status {
                applied.events.push(RunEvent::status(tenant, run, "stage", Some(i), b.status.as_str()));
            }
        }
        for (i, (a, b)) in old.tasks.iter().zip(&cur.tasks).enumerate() {
            if a.status != b.status || a.attempt != b.attempt {
                let mut e = RunEvent::status(tenant, run, "task", Some(i), b.status.as_str());
                e.attempt = Some(b.attempt);
                applied.events.push(e);
            }
        }
        if old.status != cur.status {
            applied.events.push(RunEvent::status(tenant, run, "run", None, cur.status.as_str()));
        }
        // The state is kept once the change is committed (`after_commit`): claims refused on
        // it (see `Engine::claim`) trust it whatever the row's revision. A revision is random,
        // so a state kept can only ever match the row it was written to.
        if cur.status.is_terminal() {
            applied.ended.push(run);
        } else {
            let mut kept = row.clone();
            kept.status = cur.status.as_str().to_owned();
            kept.started_at = cur.started_at.map(state::at);
            kept.finished_at = cur.finished_at.map(state::at);
            kept.next_wake_at = wake.map(state::at);
            kept.rev = rev;
            let row = Some(Box::new(kept));
            applied.states.push((run, state::CachedState { rev, state: cur, leases, row, clock: reading }));
        }
        // A run that held a slot of its pipeline's concurrency limit gives it to the oldest run
        // queued for the same key, in the same transaction.
        if ended && let Some(key) = &row.concurrency_key {
            #[derive(FromQueryResult)]
            struct Next {
                id: Uuid,
            }
            let next: Option<Next> = self
                .store
                .query_one(
                    conn,
                    "SELECT id FROM runs WHERE pipeline_id = $1 AND concurrency_key = $2 AND status = 'pending' \
                     ORDER BY created_at, id LIMIT 1",
                    vec![row.pipeline_id.into(), key.clone().into()],
                )
                .await?;
            if let Some(next) = next {
                Box::pin(self.steps(
                    conn,
                    state::RunRef::Id(next.id),
                    &[&Step::Event(Event::Start)],
                    &mut Some(now),
                    applied,
                    running,
                ))
                .await?;
            }
        }
        Ok(done)
    }

    /// Publishes events and rings dispatches after their transaction committed.
    pub fn after_commit(&self, applied: &mut Applied) {
        // What is known of the runs first: the claims of the tasks rung below read it.
        for (run, state) in applied.states.drain(..) {
            self.states.put(run, state);
        }
        // An ended run never queues a task again: the rings that still come for it are
        // answered here (see `Engine::claim`).
        for run in applied.ended.drain(..) {
            self.states.forget(&run);
            self.ended.put(run, ());
        }
        // Events first: a task handed or rung now may end (and publish its own events) before
        // this function returns.
        for e in &applied.events {
            // No subscribers is fine: nobody is watching.
            let _ = self.events.send(e.clone());
        }
        if let Some(h) = self.handoff.get() {
            if let Ok(mut answered) = self.answered.lock() {
                for handed in applied.handed.iter().filter(|h| h.rung) {
                    answered.insert(handed.d);
                }
            }
            for handed in applied.handed.drain(..) {
                let d = handed.d;
                if h.tx.send(handed).is_err() {
                    // The worker stopped: the lease runs out and the reaper retries the task.
                    tracing::warn!(run = %d.run, task = d.task, "the local worker stopped; the task waits for its lease to expire");
                }
            }
        }
        for d in &applied.dispatched {
            self.doorbell.ring(*d);
        }
        applied.spent.clear();
        // The database keeps `cancel_requested` for workers elsewhere; attempts running here
        // are told at once.
        if let Ok(running) = self.running.lock() {
            for k in &applied.kills {
                if let Some(tx) = running.get(k) {
                    let _ = tx.send(true);
                }
            }
        }
        // Each task that stopped running frees a slot of its tenant: the oldest claim refused
        // for that tenant's limit is rung again.
        if !applied.freed.is_empty()
            && let Ok(mut throttled) = self.throttled.lock()
        {
            for tenant in &applied.freed {
                if let Some(q) = throttled.get_mut(tenant) {
                    if let Some(d) = q.pop_front() {
                        self.doorbell.ring(d);
                    }
                    if q.is_empty() {
                        throttled.remove(tenant);
                    }
                }
            }
        }
    }

    /// Applies a batch of steps in one transaction (or, see [`Core::unlocked`], in one statement).
    async fn batch(&self, ops: &[(Uuid, &Step)]) -> Result<(Vec<Done>, Applied), DbErr> {
        if let Some(done) = self.unlocked(ops).await? {
            return Ok(done);
        }
        let txn = self.store.write().await?;
        // Steps grouped by run, runs in order of first appearance, steps in arrival order.
        let mut runs: Vec<(Uuid, Vec<usize>)> = vec![];
        for (i, (run, _)) in ops.iter().enumerate() {
            match runs.iter_mut().find(|(r, _)| r == run) {
                Some((_, v)) => v.push(i),
                None => runs.push((*run, vec![i])),
            }
        }
        let mut applied = Applied::default();
        let mut running = HashMap::new();
        let mut done = vec![Done::Event; ops.len()];
        // The clock is read with the first run (PostgreSQL's `now()` is the transaction's start,
        // the same for every statement in it).
        let mut now = None;
        for (run, idx) in &runs {
            let steps: Vec<&Step> = idx.iter().map(|&i| ops[i].1).collect();
            let results =
                self.steps(&*txn, state::RunRef::Id(*run), &steps, &mut now, &mut applied, &mut running).await?;
            for (&i, r) in idx.iter().zip(results) {
                done[i] = r;
            }
        }
        txn.commit().await?;
        Ok((done, applied))
    }

    /// Claims and completions of one run whose state (and row) this process holds are applied
    /// without reading anything: planned on that state, at the database time
    /// ([`state::Clock::usable`]), and written in one round trip that applies only while the
    /// run is still at the revision known here (and its tenant within its limit, if tasks are
    /// claimed), see [`crate::store::Store::execute_guarded`]: one round trip instead of four
    /// (BEGIN, the locked read, the write, COMMIT). `None` when the batch is not such a one, or
    /// the run was changed by another transaction meanwhile: then nothing of it was written,
    /// and it is applied the locked way. (A slot a completion passed on in the refused attempt
    /// is freed, so the locked way rings the run's next task instead of passing the slot.)
    async fn unlocked(&self, ops: &[(Uuid, &Step)]) -> Result<Option<(Vec<Done>, Applied)>, DbErr> {
        let Some(&(run, _)) = ops.first() else { return Ok(None) };
        if ops.iter().any(|(r, s)| *r != run || matches!(s, Step::Event(_))) {
            return Ok(None);
        }
        let Some(state::CachedState { state, leases, row: Some(row), clock, .. }) = self.states.get(&run) else {
            return Ok(None);
        };
        let Some(clock) = state::Clock::usable(self.store.backend(), clock) else { return Ok(None) };
        // The tenant's limit is left to the statement: the planner sees none.
        let load = state::TenantLoad { db_now: Some(clock.now()), tenant_running: Some(0), tenant_max: Some(0) };
        let row = state::RunRow { load, ..*row };
        let steps: Vec<&Step> = ops.iter().map(|(_, s)| *s).collect();
        let mut applied = Applied::default();
        let known = state::RunRef::Known(Box::new(state::Known { row, state, leases, clock }));
        let done = self.steps(self.store.db(), known, &steps, &mut None, &mut applied, &mut HashMap::new()).await?;
        if applied.refused {
            self.states.forget(&run);
            return Ok(None);
        }
        Ok(Some((done, applied)))
    }

    fn track(&self, d: Dispatch) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        if let Ok(mut running) = self.running.lock() {
            // An attempt that starts once this worker gives its tasks back is given back too.
            if self.releasing() {
                let _ = tx.send(true);
            }
            running.insert(d, tx);
        }
        rx
    }

    fn untrack(&self, d: Dispatch) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&d);
        }
    }

    /// Extends this worker's lease; returns whether the attempt should stop (cancelled, or the
    /// lease is no longer ours).
    pub async fn heartbeat(&self, d: Dispatch) -> Result<bool, DbErr> {
        let txn = self.store.write().await?;
        let now = self.db_now(&*txn).await?;
        let n = self
            .store
            .execute(
                &*txn,
                "UPDATE task_runs SET lease_expires_at = $5 WHERE run_id = $1 AND idx = $2 AND attempt = $3 \
                 AND status = 'running' AND lease_owner = $4 AND cancel_requested = $6",
                vec![
                    d.run.into(),
                    (d.task as i32).into(),
                    (d.attempt as i32).into(),
                    self.worker_name.clone().into(),
                    (now + chrono::Duration::from_std(self.timings.lease).unwrap_or_default()).into(),
                    false.into(),
                ],
            )
            .await?;
        txn.commit().await?;
        Ok(n != 1)
    }
}

/// The committer: applies whatever steps are waiting in one transaction, then the next batch.
/// When a batch fails as a whole, its steps are applied one by one, so one bad step fails
/// alone.
async fn committer(core: Arc<Core>, mut rx: mpsc::UnboundedReceiver<Op>) {
    let drain = |rx: &mut mpsc::UnboundedReceiver<Op>, ops: &mut Vec<Op>| {
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
    };
    while let Some(first) = rx.recv().await {
        let mut ops = vec![first];
        drain(&mut rx, &mut ops);
        let until = tokio::time::Instant::now() + LINGER;
        while ops.len() < MAX_BATCH && core.expecting() {
            tokio::select! {
                op = rx.recv() => match op {
                    Some(op) => ops.push(op),
                    None => break,
                },
                () = tokio::time::sleep_until(until) => break,
            }
            drain(&mut rx, &mut ops);
        }
        let steps: Vec<(Uuid, &Step)> = ops.iter().map(|o| (o.run, &o.step)).collect();
        match core.batch(&steps).await {
            Ok((done, mut applied)) => {
                core.after_commit(&mut applied);
                for (op, d) in ops.into_iter().zip(done) {
                    let _ = op.reply.send(Ok(d));
                }
            }
            Err(e) => {
                for (run, _) in &steps {
                    core.states.forget(run);
                }
                if ops.len() == 1 {
                    for op in ops {
                        let _ = op.reply.send(Err(e.to_string()));
                    }
                    continue;
                }
                tracing::debug!(error = %e, steps = ops.len(), "a batch failed; applying its steps one by one");
                for op in ops {
                    let r = core.batch(&[(op.run, &op.step)]).await;
                    if r.is_err() {
                        core.states.forget(&op.run);
                    }
                    let r = r.map(|(done, mut applied)| {
                        core.after_commit(&mut applied);
                        done.first().copied().unwrap_or(Done::Event)
                    });
                    let _ = op.reply.send(r.map_err(|e| e.to_string()));
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn d(task: usize, attempt: u32) -> Dispatch {
        Dispatch { run: Uuid::nil(), task, attempt }
    }

    /// The reaper's lookups and the tenant's running count read the partial task indexes, not
    /// the whole table: a query whose status is not the index's literal would scan every task
    /// ever run.
    #[tokio::test]
    async fn task_lookups_by_status_read_the_partial_indexes() {
        let dir = std::env::temp_dir().join(format!("sluice-index-test-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::connect(&crate::store::sqlite_url(&dir), 2, "test").await.unwrap();
        store.migrate().await.unwrap();
        let now = Utc::now();
        for (sql, values, index) in [
            (UNCLAIMED.to_owned(), vec![now.into()], "task_runs_queued"),
            (EXPIRED_LEASES.to_owned(), vec![now.into()], "task_runs_running"),
            (state::running_tasks_sql("$1"), vec![Uuid::new_v4().into()], "task_runs_running"),
        ] {
            #[derive(FromQueryResult)]
            struct Step {
                detail: String,
            }
            let plan: Vec<Step> =
                store.query_all(store.db(), &format!("EXPLAIN QUERY PLAN {sql}"), values).await.unwrap();
            let plan: Vec<String> = plan.into_iter().map(|s| s.detail).collect();
            assert!(plan.iter().any(|d| d.contains(index)), "{sql}: {plan:?}");
            // (A scan of the whole table reads "SCAN task_runs", without an index.)
            assert!(!plan.iter().any(|d| d == "SCAN task_runs" || d == "SCAN t"), "{sql}: {plan:?}");
        }
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_answered_ring_is_dropped_once_and_only_for_its_attempt() {
        let mut a = Answered::default();
        a.insert(d(3, 1));
        assert!(!a.take(&d(3, 2)), "a later attempt of the task is a real ring");
        assert!(!a.take(&d(4, 1)));
        assert!(a.take(&d(3, 1)));
        assert!(!a.take(&d(3, 1)), "a second ring of the attempt costs a claim, as before");
    }

    #[test]
    fn a_sighting_of_an_answered_attempt_leaves_it_answered_for_its_ring() {
        let mut a = Answered::default();
        a.insert(d(3, 1));
        // Its backlog entry, seen first.
        assert!(a.contains(&d(3, 1)));
        assert!(!a.contains(&d(3, 2)));
        // Its ring, after: still dropped.
        assert!(a.take(&d(3, 1)));
    }

    #[test]
    fn answered_rings_are_forgotten_oldest_first_beyond_the_cap() {
        let mut a = Answered::default();
        for i in 0..ANSWERED_CAP + 10 {
            a.insert(d(i, 1));
        }
        assert_eq!(a.set.len(), ANSWERED_CAP);
        assert_eq!(a.order.len(), ANSWERED_CAP);
        assert!(!a.take(&d(9, 1)));
        assert!(a.take(&d(10, 1)));
        assert!(a.take(&d(ANSWERED_CAP + 9, 1)));
    }
}
