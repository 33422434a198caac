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
    /// The compiled plan (JSON).
    pub plan: String,
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

/// Loads (and on PostgreSQL locks) a run with its plan and state.
pub async fn load(
    store: &Store,
    conn: &impl ConnectionTrait,
    run: Uuid,
) -> Result<Option<(RunRow, RunPlan, RunState)>, DbErr> {
    let sql = format!(
        "SELECT id, tenant_id, pipeline_id, version, status, plan, started_at, finished_at FROM runs WHERE id = $1{}",
        store.for_update()
    );
    let Some(row): Option<RunRow> = store.query_one(conn, &sql, vec![run.into()]).await? else {
        return Ok(None);
    };
    let plan: RunPlan =
        serde_json::from_str(&row.plan).map_err(|e| DbErr::Custom(format!("stored plan of run {run}: {e}")))?;
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

/// Writes every difference between `old` and `new`. Each task update is conditional on the
/// status and attempt it had, so a concurrent writer can never be overwritten silently.
pub async fn save(
    store: &Store,
    conn: &impl ConnectionTrait,
    run: Uuid,
    old: &RunState,
    new: &RunState,
    wake: Option<Millis>,
) -> Result<(), DbErr> {
    if old.status != new.status || old.started_at != new.started_at || old.finished_at != new.finished_at {
        store
            .execute(
                conn,
                "UPDATE runs SET status = $2, started_at = $3, finished_at = $4 WHERE id = $1",
                vec![
                    run.into(),
                    new.status.as_str().into(),
                    opt_at(new.started_at).into(),
                    opt_at(new.finished_at).into(),
                ],
            )
            .await?;
    }
    store
        .execute(conn, "UPDATE runs SET next_wake_at = $2 WHERE id = $1", vec![run.into(), opt_at(wake).into()])
        .await?;
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
