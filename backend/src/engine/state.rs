//! Loading a run's state from its rows and writing back what the planner changed.

use chrono::{DateTime, TimeZone, Utc};
use sea_orm::{ConnectionTrait, DbErr, FromQueryResult};
use sluice_domain::plan::{Millis, RunPlan, RunState, RunStatus, StageState, StageStatus, TaskState, TaskStatus};
use uuid::Uuid;

use crate::store::Store;

/// Milliseconds since the epoch.
pub fn ms(t: DateTime<Utc>) -> Millis {
    t.timestamp_millis()
}

/// A time from milliseconds since the epoch.
pub fn at(ms: Millis) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

fn opt_at(v: Option<Millis>) -> Option<DateTime<Utc>> {
    v.map(at)
}

/// The run row as the engine needs it.
#[derive(Debug, Clone, FromQueryResult)]
pub struct RunRow {
    /// Run id.
    pub id: Uuid,
    /// Tenant.
    pub tenant_id: Uuid,
    /// Pipeline id.
    pub pipeline_id: Uuid,
    /// Pinned version.
    pub version: i64,
    /// Run status.
    pub status: String,
    /// When the reaper should next wake the run.
    pub next_wake_at: Option<DateTime<Utc>>,
    /// Started.
    pub started_at: Option<DateTime<Utc>>,
    /// Finished.
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, FromQueryResult)]
struct StageRow {
    status: String,
    gate_deadline: Option<DateTime<Utc>>,
}

#[derive(Debug, FromQueryResult)]
struct TaskRow {
    status: String,
    attempt: i32,
    not_before: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

fn parse<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, DbErr> {
    s.parse().map_err(|_| DbErr::Custom(format!("stored {what} status {s:?} is not known")))
}

/// Parsed plans of runs, by run id. A run's plan never changes, so it is read and parsed once
/// per process instead of on every event.
#[derive(Default)]
pub struct PlanCache(std::sync::Mutex<std::collections::HashMap<Uuid, std::sync::Arc<RunPlan>>>);

/// Most plans kept; the cache is emptied when full.
const PLAN_CACHE_CAPACITY: usize = 4096;

impl PlanCache {
    pub(crate) fn get(&self, run: Uuid) -> Option<std::sync::Arc<RunPlan>> {
        self.0.lock().ok().and_then(|m| m.get(&run).cloned())
    }

    pub(crate) fn put(&self, run: Uuid, plan: std::sync::Arc<RunPlan>) {
        if let Ok(mut m) = self.0.lock() {
            if m.len() >= PLAN_CACHE_CAPACITY {
                m.clear();
            }
            m.insert(run, plan);
        }
    }
}

/// Loads (and on PostgreSQL locks) a run with its plan and state.
pub async fn load(
    store: &Store,
    conn: &impl ConnectionTrait,
    run: Uuid,
    plans: &PlanCache,
) -> Result<Option<(RunRow, std::sync::Arc<RunPlan>, RunState)>, DbErr> {
    let sql = format!(
        "SELECT id, tenant_id, pipeline_id, version, status, next_wake_at, started_at, finished_at FROM runs WHERE id = $1{}",
        store.for_update()
    );
    let Some(row): Option<RunRow> = store.query_one(conn, &sql, vec![run.into()]).await? else {
        return Ok(None);
    };
    let plan = match plans.get(run) {
        Some(p) => p,
        None => {
            #[derive(FromQueryResult)]
            struct P {
                plan: String,
            }
            let text: P = store
                .query_one(conn, "SELECT plan FROM runs WHERE id = $1", vec![run.into()])
                .await?
                .ok_or_else(|| DbErr::Custom(format!("run {run} vanished")))?;
            let p: RunPlan = serde_json::from_str(&text.plan)
                .map_err(|e| DbErr::Custom(format!("stored plan of run {run}: {e}")))?;
            let p = std::sync::Arc::new(p);
            plans.put(run, p.clone());
            p
        }
    };
    let stages: Vec<StageRow> = store
        .query_all(
            conn,
            "SELECT status, gate_deadline FROM stage_runs WHERE run_id = $1 ORDER BY idx",
            vec![run.into()],
        )
        .await?;
    let tasks: Vec<TaskRow> = store
        .query_all(
            conn,
            "SELECT status, attempt, not_before, started_at, finished_at FROM task_runs WHERE run_id = $1 ORDER BY idx",
            vec![run.into()],
        )
        .await?;
    let started_at = row.started_at.map(ms);
    let state = RunState {
        status: parse::<RunStatus>(&row.status, "run")?,
        started_at,
        deadline: match (started_at, plan.run_timeout_ms) {
            (Some(s), Some(t)) => Some(s + t),
            _ => None,
        },
        finished_at: row.finished_at.map(ms),
        stages: stages
            .iter()
            .map(|s| {
                Ok(StageState {
                    status: parse::<StageStatus>(&s.status, "stage")?,
                    gate_deadline: s.gate_deadline.map(ms),
                })
            })
            .collect::<Result<_, DbErr>>()?,
        tasks: tasks
            .iter()
            .map(|t| {
                Ok(TaskState {
                    status: parse::<TaskStatus>(&t.status, "task")?,
                    attempt: u32::try_from(t.attempt).unwrap_or_default(),
                    not_before: t.not_before.map(ms),
                    started_at: t.started_at.map(ms),
                    finished_at: t.finished_at.map(ms),
                })
            })
            .collect::<Result<_, DbErr>>()?,
    };
    if state.stages.len() != plan.stages.len() || state.tasks.len() != plan.tasks.len() {
        return Err(DbErr::Custom(format!("run {run}: rows do not match its plan")));
    }
    Ok(Some((row, plan, state)))
}

/// Inserts the rows of a new run's stages and tasks.
pub async fn insert_rows(
    store: &Store,
    conn: &impl ConnectionTrait,
    tenant: Uuid,
    run: Uuid,
    plan: &RunPlan,
) -> Result<(), DbErr> {
    for (i, s) in plan.stages.iter().enumerate() {
        store
            .execute(
                conn,
                "INSERT INTO stage_runs (run_id, idx, tenant_id, stage_id, status, gate_deadline) VALUES ($1, $2, $3, $4, $5, NULL)",
                vec![run.into(), (i as i32).into(), tenant.into(), s.id.clone().into(), "pending".into()],
            )
            .await?;
    }
    for (i, t) in plan.tasks.iter().enumerate() {
        store
            .execute(
                conn,
                "INSERT INTO task_runs (run_id, idx, tenant_id, key, task_id, stage_idx, status, attempt, outputs, cancel_requested) \
                 VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, '{}', $7)",
                vec![
                    run.into(),
                    (i as i32).into(),
                    tenant.into(),
                    t.key.clone().into(),
                    t.task_id.clone().into(),
                    (t.stage as i32).into(),
                    false.into(),
                ],
            )
            .await?;
    }
    Ok(())
}

/// A task of an earlier run that succeeded and is carried over, as succeeded, into a retry.
#[derive(Debug, Clone, FromQueryResult)]
pub struct CarriedTask {
    /// Index into the plan's tasks (the same in the retry, which has the same plan).
    pub idx: i32,
    /// Task key, checked against the retry's plan.
    pub key: String,
    /// The attempt that succeeded.
    pub attempt: i32,
    /// When it was queued.
    pub queued_at: Option<DateTime<Utc>>,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Its exit code.
    pub exit_code: Option<i32>,
    /// Its outputs (JSON object).
    pub outputs: String,
}

/// Marks the carried-over tasks of a new (not yet started) run `succeeded`, copying the
/// original attempt, times, exit code and outputs. A task whose index or key does not match the
/// plan is an error: the retry would not be the same run.
pub async fn carry_over(
    store: &Store,
    conn: &impl ConnectionTrait,
    run: Uuid,
    plan: &RunPlan,
    carried: &[CarriedTask],
) -> Result<(), DbErr> {
    for t in carried {
        let matches = usize::try_from(t.idx).ok().and_then(|i| plan.tasks.get(i)).is_some_and(|p| p.key == t.key);
        if !matches {
            return Err(DbErr::Custom(format!("run {run}: carried task {} ({}) is not in its plan", t.idx, t.key)));
        }
        store
            .execute(
                conn,
                "UPDATE task_runs SET status = 'succeeded', attempt = $3, queued_at = $4, started_at = $5, finished_at = $6, \
                 exit_code = $7, outputs = $8 WHERE run_id = $1 AND idx = $2 AND status = 'pending'",
                vec![
                    run.into(),
                    t.idx.into(),
                    t.attempt.into(),
                    t.queued_at.into(),
                    t.started_at.into(),
                    t.finished_at.into(),
                    t.exit_code.into(),
                    t.outputs.clone().into(),
                ],
            )
            .await?;
    }
    Ok(())
}

/// Writes every difference between `old` and `new`. Each task update is conditional on the
/// status and attempt it had, so a concurrent writer can never be overwritten silently.
pub async fn save(
    store: &Store,
    conn: &impl ConnectionTrait,
    run: Uuid,
    old: &RunState,
    new: &RunState,
    old_wake: Option<Millis>,
    wake: Option<Millis>,
) -> Result<(), DbErr> {
    // One write of the run row, and only when something in it changed.
    let run_changed =
        old.status != new.status || old.started_at != new.started_at || old.finished_at != new.finished_at;
    if run_changed || old_wake != wake {
        store
            .execute(
                conn,
                "UPDATE runs SET status = $2, started_at = $3, finished_at = $4, next_wake_at = $5 WHERE id = $1",
                vec![
                    run.into(),
                    new.status.as_str().into(),
                    opt_at(new.started_at).into(),
                    opt_at(new.finished_at).into(),
                    opt_at(wake).into(),
                ],
            )
            .await?;
    }
    for (i, (a, b)) in old.stages.iter().zip(&new.stages).enumerate() {
        if a != b {
            store
                .execute(
                    conn,
                    "UPDATE stage_runs SET status = $3, gate_deadline = $4 WHERE run_id = $1 AND idx = $2",
                    vec![run.into(), (i as i32).into(), b.status.as_str().into(), opt_at(b.gate_deadline).into()],
                )
                .await?;
        }
    }
    for (i, (a, b)) in old.tasks.iter().zip(&new.tasks).enumerate() {
        if a == b {
            continue;
        }
        let queued_now = b.status == TaskStatus::Queued && a.status != TaskStatus::Queued;
        let leaves_running = a.status == TaskStatus::Running && b.status != TaskStatus::Running;
        let n = store
            .execute(
                conn,
                "UPDATE task_runs SET status = $5, attempt = $6, not_before = $7, started_at = $8, finished_at = $9, \
                 queued_at = CASE WHEN $10 THEN $11 ELSE queued_at END, \
                 lease_owner = CASE WHEN $12 THEN NULL ELSE lease_owner END, \
                 lease_expires_at = CASE WHEN $12 THEN NULL ELSE lease_expires_at END \
                 WHERE run_id = $1 AND idx = $2 AND status = $3 AND attempt = $4",
                vec![
                    run.into(),
                    (i as i32).into(),
                    a.status.as_str().into(),
                    (a.attempt as i32).into(),
                    b.status.as_str().into(),
                    (b.attempt as i32).into(),
                    opt_at(b.not_before).into(),
                    opt_at(b.started_at).into(),
                    opt_at(b.finished_at).into(),
                    queued_now.into(),
                    Utc::now().into(),
                    leaves_running.into(),
                ],
            )
            .await?;
        if n != 1 {
            return Err(DbErr::Custom(format!("task {i} of run {run} changed concurrently")));
        }
    }
    Ok(())
}
