//! The engine: applies the pure planner's decisions to the database, dispatches ready tasks,
//! runs the embedded worker, and reaps what was lost.
//!
//! Every state change goes through [`Engine::apply`]: one transaction that locks the run, loads
//! its state from the rows, asks `sluice_domain::plan::plan` what happens next, writes back the
//! difference (each task row conditionally on the status and attempt it had), and only after
//! the commit pushes the newly queued tasks to the dispatcher. The queue is a doorbell: a lost
//! message only delays a task until the reaper pushes it again.

mod doorbell;
pub mod state;
mod work;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::Utc;
use sea_orm::{ConnectionTrait, DbBackend, DbErr, FromQueryResult, TransactionTrait};
use sluice_domain::plan::{self, Effect, Event, Millis, TaskOutcome};
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

use crate::store::Store;
pub use doorbell::{ChannelDoorbell, Doorbell, RedisDoorbell, consume_redis, run_worker};
pub use work::{prepare_work_root, spawn_local_workers};

/// How long a claim lasts without a heartbeat.
pub const LEASE: Duration = Duration::from_secs(15);
/// How often a running task's lease is extended.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
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
    store: Store,
    doorbell: Arc<dyn Doorbell>,
    timings: Timings,
    worker_name: String,
    running: Mutex<HashMap<Dispatch, watch::Sender<bool>>>,
    events: broadcast::Sender<RunEvent>,
    plans: state::PlanCache,
    specs: Mutex<HashMap<(Uuid, i64), Arc<sluice_domain::PipelineSpec>>>,
}

/// What an apply did, for the caller.
#[derive(Debug, Default)]
pub struct Applied {
    /// Tasks queued by this change.
    pub dispatched: Vec<Dispatch>,
    /// Whether the run finished with this change.
    pub finished: bool,
    /// What changed, published once the change is committed.
    pub events: Vec<RunEvent>,
}

/// A change of a run, a stage or a task, or new log lines, as streamed to clients.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunEvent {
    /// Tenant of the run.
    #[serde(skip)]
    pub tenant: Uuid,
    /// Run id.
    pub run_id: Uuid,
    /// `run`, `stage`, `task` or `log`.
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
    fn status(tenant: Uuid, run_id: Uuid, kind: &'static str, index: Option<usize>, status: &'static str) -> Self {
        Self { tenant, run_id, kind, index, status: Some(status), attempt: None, lines: vec![], relayed: false }
    }
}

/// A unique worker name for this process: host, pid and a random part.
pub fn worker_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "host".into());
    format!("{host}-{}-{}", std::process::id(), &Uuid::new_v4().simple().to_string()[..8])
}

#[derive(FromQueryResult)]
struct Now {
    now: chrono::DateTime<Utc>,
}

impl Engine {
    /// An engine whose dispatches ring `doorbell`.
    pub fn new(store: Store, doorbell: Arc<dyn Doorbell>) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            store,
            doorbell,
            timings: Timings::from_env(),
            worker_name: worker_name(),
            running: Mutex::new(HashMap::new()),
            events,
            plans: state::PlanCache::default(),
            specs: Mutex::new(HashMap::new()),
        }
    }

    /// Subscribes to the events of every run in this process.
    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.events.subscribe()
    }

    /// Where log lines are published (the embedded worker's log writer holds a clone).
    pub fn event_sender(&self) -> broadcast::Sender<RunEvent> {
        self.events.clone()
    }

    /// A run's compiled plan (cached: plans never change).
    pub async fn plan_of(&self, run: Uuid) -> anyhow::Result<Arc<plan::RunPlan>> {
        if let Some(p) = self.plans.get(run) {
            return Ok(p);
        }
        #[derive(FromQueryResult)]
        struct P {
            plan: String,
        }
        let text: P = self
            .store
            .query_one(self.store.db(), "SELECT plan FROM runs WHERE id = $1", vec![run.into()])
            .await?
            .ok_or_else(|| anyhow::anyhow!("run {run} vanished"))?;
        let p = Arc::new(serde_json::from_str::<plan::RunPlan>(&text.plan)?);
        self.plans.put(run, p.clone());
        Ok(p)
    }

    /// A pipeline version's parsed definition (cached: versions never change).
    pub async fn spec_of(&self, pipeline: Uuid, version: i64) -> anyhow::Result<Arc<sluice_domain::PipelineSpec>> {
        if let Some(s) = self.specs.lock().ok().and_then(|m| m.get(&(pipeline, version)).cloned()) {
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
        if let Ok(mut m) = self.specs.lock() {
            if m.len() >= 1024 {
                m.clear();
            }
            m.insert((pipeline, version), spec.clone());
        }
        Ok(spec)
    }

    /// The lease, heartbeat and re-dispatch timings in use.
    pub fn timings(&self) -> Timings {
        self.timings
    }

    /// This process's worker name.
    pub fn worker_name(&self) -> &str {
        &self.worker_name
    }

    /// The database's clock (leases are always measured on it, never on a worker's clock).
    pub async fn db_now(&self, conn: &impl ConnectionTrait) -> Result<chrono::DateTime<Utc>, DbErr> {
        if self.store.backend() == DbBackend::Postgres {
            let row: Option<Now> = self.store.query_one(conn, "SELECT now() AS now", vec![]).await?;
            Ok(row.map_or_else(Utc::now, |r| r.now))
        } else {
            Ok(Utc::now())
        }
    }

    /// Applies one event to a run inside `conn` (the caller's transaction, which must hold the
    /// write lock) and returns what to do after the commit.
    pub async fn apply_in(&self, conn: &impl ConnectionTrait, run: Uuid, event: Event) -> Result<Applied, DbErr> {
        let Some((row, run_plan, old)) = state::load(&self.store, conn, run, &self.plans).await? else {
            return Ok(Applied::default());
        };
        let now: Millis = state::ms(self.db_now(conn).await?);
        let (new, effects) = plan::plan(&run_plan, &old, event, now);
        let old_wake = row.next_wake_at.map(state::ms);
        // An ignored event (stale or late) changes nothing, the alarm included; any other event
        // ends with the run's one alarm, or none when nothing is due.
        let ignored = new == old && effects.is_empty();
        let mut applied = Applied::default();
        let mut wake = if ignored { old_wake } else { None };
        let mut kills = vec![];
        for e in effects {
            match e {
                Effect::Dispatch { task, attempt } => applied.dispatched.push(Dispatch { run, task, attempt }),
                Effect::Kill { task, attempt } => kills.push(Dispatch { run, task, attempt }),
                Effect::WakeAt { at } => wake = Some(wake.map_or(at, |w: Millis| w.min(at))),
                Effect::Finished { .. } => applied.finished = true,
            }
        }
        state::save(&self.store, conn, run, &old, &new, old_wake, wake).await?;
        let tenant = row.tenant_id;
        for (i, (a, b)) in old.stages.iter().zip(&new.stages).enumerate() {
            if a.status != b.status {
                applied.events.push(RunEvent::status(tenant, run, "stage", Some(i), b.status.as_str()));
            }
        }
        for (i, (a, b)) in old.tasks.iter().zip(&new.tasks).enumerate() {
            if a.status != b.status || a.attempt != b.attempt {
                let mut e = RunEvent::status(tenant, run, "task", Some(i), b.status.as_str());
                e.attempt = Some(b.attempt);
                applied.events.push(e);
            }
        }
        if old.status != new.status {
            applied.events.push(RunEvent::status(tenant, run, "run", None, new.status.as_str()));
        }
        for k in &kills {
            self.store
                .execute(
                    conn,
                    "UPDATE task_runs SET cancel_requested = $4 WHERE run_id = $1 AND idx = $2 AND attempt = $3",
                    vec![run.into(), (k.task as i32).into(), (k.attempt as i32).into(), true.into()],
                )
                .await?;
        }
        // Local cancellation signals are sent at once: a killed attempt's completion is ignored
        // anyway, and the database keeps `cancel_requested` for workers elsewhere.
        if let Ok(running) = self.running.lock() {
            for k in &kills {
                if let Some(tx) = running.get(k) {
                    let _ = tx.send(true);
                }
            }
        }
        Ok(applied)
    }

    /// Pushes dispatches after their transaction committed.
    pub fn after_commit(&self, applied: &Applied) {
        for e in &applied.events {
            // No subscribers is fine: nobody is watching.
            let _ = self.events.send(e.clone());
        }
        for d in &applied.dispatched {
            self.doorbell.ring(*d);
        }
    }

    /// Applies one event in its own transaction, then dispatches.
    pub async fn apply(&self, run: Uuid, event: Event) -> Result<Applied, DbErr> {
        let txn = self.store.write().await?;
        let applied = self.apply_in(&*txn, run, event).await?;
        txn.commit().await?;
        self.after_commit(&applied);
        Ok(applied)
    }

    fn track(&self, d: Dispatch) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        if let Ok(mut running) = self.running.lock() {
            running.insert(d, tx);
        }
        rx
    }

    fn untrack(&self, d: Dispatch) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(&d);
        }
    }

    /// Claims a queued attempt for this worker: the task becomes running with a lease measured
    /// on the database clock. `None` when somebody else has it or it is no longer queued.
    pub async fn claim(&self, d: Dispatch) -> Result<bool, DbErr> {
        let txn = self.store.write().await?;
        // The planner ignores a start for an attempt that is no longer queued; the lease update
        // below then matches no row and the transaction is dropped unapplied.
        let applied = self.apply_in(&*txn, d.run, Event::TaskStarted { task: d.task, attempt: d.attempt }).await?;
        let now = self.db_now(&*txn).await?;
        let n = self
            .store
            .execute(
                &*txn,
                "UPDATE task_runs SET lease_owner = $4, lease_expires_at = $5 \
                 WHERE run_id = $1 AND idx = $2 AND attempt = $3 AND status = 'running'",
                vec![
                    d.run.into(),
                    (d.task as i32).into(),
                    (d.attempt as i32).into(),
                    self.worker_name.clone().into(),
                    (now + chrono::Duration::from_std(self.timings.lease).unwrap_or_default()).into(),
                ],
            )
            .await?;
        if n != 1 {
            return Ok(false);
        }
        txn.commit().await?;
        self.after_commit(&applied);
        Ok(true)
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

    /// Records an attempt's result, if this worker still holds its lease; a late or foreign
    /// completion is logged and ignored, never applied.
    pub async fn complete(
        &self,
        d: Dispatch,
        outcome: TaskOutcome,
        exit_code: Option<i32>,
        message: Option<String>,
        outputs: &std::collections::BTreeMap<String, String>,
    ) -> Result<bool, DbErr> {
        let txn = self.store.write().await?;
        let n = self
            .store
            .execute(
                &*txn,
                "UPDATE task_runs SET exit_code = $5, message = $6, outputs = $7 \
                 WHERE run_id = $1 AND idx = $2 AND attempt = $3 AND status = 'running' AND lease_owner = $4",
                vec![
                    d.run.into(),
                    (d.task as i32).into(),
                    (d.attempt as i32).into(),
                    self.worker_name.clone().into(),
                    exit_code.into(),
                    message.into(),
                    serde_json::to_string(outputs).unwrap_or_else(|_| "{}".into()).into(),
                ],
            )
            .await?;
        if n != 1 {
            tracing::warn!(run = %d.run, task = d.task, attempt = d.attempt, "late completion ignored: the lease is not ours");
            return Ok(false);
        }
        let applied =
            self.apply_in(&*txn, d.run, Event::TaskFinished { task: d.task, attempt: d.attempt, outcome }).await?;
        txn.commit().await?;
        self.after_commit(&applied);
        Ok(true)
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
        for r in due {
            self.apply(r.id, Event::Tick).await?;
        }
        #[derive(FromQueryResult)]
        struct T {
            run_id: Uuid,
            idx: i32,
            attempt: i32,
        }
        let lost: Vec<T> = self
            .store
            .query_all(
                self.store.db(),
                "SELECT run_id, idx, attempt FROM task_runs WHERE status = 'running' AND (lease_expires_at IS NULL OR lease_expires_at < $1)",
                vec![now.into()],
            )
            .await?;
        for t in lost {
            tracing::warn!(run = %t.run_id, task = t.idx, attempt = t.attempt, "lease expired; the attempt is lost");
            let event =
                Event::TaskFinished { task: t.idx as usize, attempt: t.attempt as u32, outcome: TaskOutcome::Lost };
            self.apply(t.run_id, event).await?;
        }
        let stale = now - chrono::Duration::from_std(self.timings.redispatch_after).unwrap_or_default();
        let unclaimed: Vec<T> = self
            .store
            .query_all(
                self.store.db(),
                "SELECT run_id, idx, attempt FROM task_runs WHERE status = 'queued' AND queued_at < $1",
                vec![stale.into()],
            )
            .await?;
        for t in unclaimed {
            self.doorbell.ring(Dispatch { run: t.run_id, task: t.idx as usize, attempt: t.attempt as u32 });
        }
        if let Some(guard) = guard {
            guard.commit().await?;
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
}
