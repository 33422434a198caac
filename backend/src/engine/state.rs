//! Loading a run's state from its rows and writing back what the planner changed.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use chrono::{DateTime, TimeZone, Utc};
use sea_orm::{ConnectionTrait, DbErr, FromQueryResult};
use sluice_domain::plan::{
    Millis, Prepared, RunPlan, RunState, RunStatus, StageState, StageStatus, TaskState, TaskStatus,
};
use uuid::Uuid;

use crate::store::{Changed, Store};

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
    /// Revision of the run's state: a new random value on every write.
    pub rev: i64,
    /// The rendered key of the pipeline's concurrency limit, if it has one.
    pub concurrency_key: Option<String>,
    /// The database clock and the tenant's load, read along to spare round trips.
    #[sea_orm(nested)]
    pub load: TenantLoad,
}

impl RunRow {
    /// The row of a run just inserted (pending, revision 0), as the inserting transaction knows it.
    pub fn new(
        id: Uuid,
        tenant_id: Uuid,
        pipeline_id: Uuid,
        version: i64,
        concurrency_key: Option<String>,
        load: TenantLoad,
    ) -> Self {
        Self {
            id,
            tenant_id,
            pipeline_id,
            version,
            status: "pending".into(),
            next_wake_at: None,
            started_at: None,
            finished_at: None,
            rev: 0,
            concurrency_key,
            load,
        }
    }
}

#[derive(Debug, FromQueryResult, serde::Deserialize)]
struct StateRow {
    /// 0: a stage, 1: a task.
    kind: i32,
    status: String,
    attempt: Option<i32>,
    /// A stage's gate deadline, a task's `not_before`.
    at: Option<DateTime<Utc>>,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    lease_owner: Option<String>,
    lost: Option<i32>,
}

fn parse<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, DbErr> {
    s.parse().map_err(|_| DbErr::Custom(format!("stored {what} status {s:?} is not known")))
}

/// A small bounded map of values that never change once written (a run's plan, a pipeline
/// version's definition), or that carry their own validity check (a run's state and its
/// revision). It is emptied when full.
pub struct Memo<K, V> {
    map: Mutex<HashMap<K, V>>,
    capacity: usize,
}

impl<K: std::hash::Hash + Eq, V: Clone> Memo<K, V> {
    /// An empty memo holding at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self { map: Mutex::new(HashMap::new()), capacity }
    }

    /// Whether a value is held under `key` (without copying it).
    pub fn contains(&self, key: &K) -> bool {
        self.map.lock().is_ok_and(|m| m.contains_key(key))
    }

    /// What `f` makes of the value under `key` (without copying it).
    pub fn with<R>(&self, key: &K, f: impl FnOnce(&V) -> R) -> Option<R> {
        self.map.lock().ok().and_then(|m| m.get(key).map(f))
    }

    /// The value under `key`.
    pub fn get(&self, key: &K) -> Option<V> {
        self.map.lock().ok().and_then(|m| m.get(key).cloned())
    }

    /// Stores `value` under `key`.
    pub fn put(&self, key: K, value: V) {
        if let Ok(mut m) = self.map.lock() {
            if m.len() >= self.capacity {
                m.clear();
            }
            m.insert(key, value);
        }
    }

    /// Forgets `key`.
    pub fn forget(&self, key: &K) {
        if let Ok(mut m) = self.map.lock() {
            m.remove(key);
        }
    }
}

/// Parsed plans of runs, with their planning order, by run id. A run's plan never changes.
pub type PlanCache = Memo<Uuid, Arc<Prepared>>;

/// A run's compiled plan, read and parsed once per process (a run's plan never changes).
pub async fn plan_of(
    store: &Store,
    conn: &impl ConnectionTrait,
    run: Uuid,
    plans: &PlanCache,
) -> Result<Arc<Prepared>, DbErr> {
    if let Some(p) = plans.get(&run) {
        return Ok(p);
    }
    #[derive(FromQueryResult)]
    struct P {
        plan: String,
    }
    let text: P = store
        .query_one(conn, "SELECT plan FROM runs WHERE id = $1", vec![run.into()])
        .await?
        .ok_or_else(|| DbErr::Custom(format!("run {run} vanished")))?;
    let p = Arc::new(parse_plan(run, &text.plan)?);
    plans.put(run, p.clone());
    Ok(p)
}

/// The stored plan of `run`, parsed.
fn parse_plan(run: Uuid, text: &str) -> Result<Prepared, DbErr> {
    let p: RunPlan = serde_json::from_str(text).map_err(|e| DbErr::Custom(format!("stored plan of run {run}: {e}")))?;
    Ok(Prepared::new(p))
}

/// A run's state as last written by this process, valid while the run row's `rev` matches.
#[derive(Debug, Clone)]
pub struct CachedState {
    /// The revision this state was written (or read) at.
    pub rev: i64,
    /// The state.
    pub state: RunState,
    /// Each task's lease holder.
    pub leases: Vec<Option<String>>,
    /// The run's row at that revision, once this process has read or written it.
    pub row: Option<Box<RunRow>>,
    /// PostgreSQL's clock as this process last read it along with the run.
    pub clock: Option<Clock>,
}

/// A reading of PostgreSQL's clock (the transaction's `now()`), and this process's instant as
/// it arrived, from which the database's time is estimated without asking it. The estimate
/// runs behind by at most the time between the transaction's start and that instant (well
/// under a millisecond when nothing stalls), and is always re-anchored by the next locked read.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// The database's time.
    pub db: DateTime<Utc>,
    /// This process's instant then.
    pub at: std::time::Instant,
}

impl Clock {
    /// The clock a change is planned on without reading the database: on SQLite this
    /// process's (SQLite runs in it); on PostgreSQL the database's, estimated from `reading`
    /// while that is at most [`super::CLOCK_READING_LASTS`] old (after that, the locked way
    /// reads it again, so a step of that clock, or a drift from this process's, lasts no
    /// longer). `None` when there is no such clock.
    pub fn usable(backend: sea_orm::DbBackend, reading: Option<Clock>) -> Option<Clock> {
        match backend {
            sea_orm::DbBackend::Sqlite => Some(Clock { db: Utc::now(), at: std::time::Instant::now() }),
            _ => reading.filter(|c| c.at.elapsed() <= super::CLOCK_READING_LASTS),
        }
    }

    /// The database's time now, estimated.
    pub fn now(&self) -> DateTime<Utc> {
        self.db + chrono::Duration::from_std(self.at.elapsed()).unwrap_or_default()
    }
}

/// Run states by run id.
pub type StateCache = Memo<Uuid, CachedState>;

/// A run as loaded for an event: its row (locked on PostgreSQL), plan, state and leases.
pub struct Loaded {
    /// The run row.
    pub row: RunRow,
    /// The compiled plan.
    pub plan: Arc<Prepared>,
    /// The state.
    pub state: RunState,
    /// Each task's lease holder.
    pub leases: Vec<Option<String>>,
}

/// The columns of [`TenantLoad`] (`db_now`, `tenant_running`, `tenant_max`):
/// PostgreSQL's clock, and the load of the tenant whose id is `tenant` (an SQL expression);
/// without `count`, the running tasks are left unread (`NULL`).
pub fn tenant_load_columns(store: &Store, tenant: &str, count: bool) -> String {
    let running = if count { format!("({})", running_tasks_sql(tenant)) } else { "CAST(NULL AS BIGINT)".to_owned() };
    format!(
        "{} AS db_now, {running} AS tenant_running, \
         (SELECT max_running_tasks FROM tenants WHERE tenants.id = {tenant}) AS tenant_max",
        if store.backend() == sea_orm::DbBackend::Postgres { "now()" } else { "NULL" },
    )
}

/// The query counting the running tasks of the tenant whose id is `tenant` (an SQL expression).
pub(super) fn running_tasks_sql(tenant: &str) -> String {
    format!("SELECT COUNT(*) FROM task_runs t WHERE t.tenant_id = {tenant} AND t.status = 'running'")
}

/// The number a `SELECT COUNT(*) ...` query answers.
async fn count(
    store: &Store,
    conn: &impl ConnectionTrait,
    sql: &str,
    values: Vec<sea_orm::Value>,
) -> Result<i64, DbErr> {
    #[derive(FromQueryResult)]
    struct N {
        n: i64,
    }
    let n: Option<N> = store.query_one(conn, &format!("SELECT ({sql}) AS n"), values).await?;
    Ok(n.map_or(0, |n| n.n))
}

/// How many tasks of `tenant` are running, as a new statement of `conn` sees it.
pub async fn tenant_running(store: &Store, conn: &impl ConnectionTrait, tenant: Uuid) -> Result<i64, DbErr> {
    count(store, conn, &running_tasks_sql("$1"), vec![tenant.into()]).await
}

/// Runs of a pipeline with a concurrency key that hold a slot (started and not ended), counted
/// after taking the pipeline's row lock (on PostgreSQL; SQLite has one writer), which serializes
/// every decision to start a run of the pipeline that waits for its key.
pub async fn active_runs(store: &Store, conn: &impl ConnectionTrait, pipeline: Uuid, key: &str) -> Result<i64, DbErr> {
    let lock = format!("SELECT id FROM pipelines WHERE id = $1{}", store.for_update());
    store.execute(conn, &lock, vec![pipeline.into()]).await?;
    let active: Vec<String> = RunStatus::ALL
        .iter()
        .filter(|s| **s != RunStatus::Pending && !s.is_terminal())
        .map(|s| format!("'{}'", s.as_str()))
        .collect();
    let sql = format!(
        "SELECT COUNT(*) FROM runs WHERE pipeline_id = $1 AND concurrency_key = $2 AND status IN ({})",
        active.join(", ")
    );
    count(store, conn, &sql, vec![pipeline.into(), key.into()]).await
}

/// What [`tenant_load_columns`] reads.
#[derive(Debug, Clone, FromQueryResult)]
pub struct TenantLoad {
    /// PostgreSQL's clock for this transaction; `None` on SQLite, whose clock is this process's.
    pub db_now: Option<DateTime<Utc>>,
    /// How many tasks of the tenant are running, as this transaction sees it (`None`: not read).
    pub tenant_running: Option<i64>,
    /// The operator's override of the tenant's running-task limit.
    pub tenant_max: Option<i64>,
}

/// A run to load: by its id, or a new run that the caller's transaction inserts once its first
/// event is planned, in the state that event leaves it in (see [`NewRows`]).
pub enum RunRef {
    /// Read the row.
    Id(Uuid),
    /// A new run, all pending at revision 0, whose plan is cached: nothing is read, and nothing
    /// is written but the rows handed back.
    New(Box<RunRow>),
    /// A run whose state this process holds, as it took it from its cache: nothing is read, and
    /// the change is written by one statement outside any transaction that applies only if the
    /// run is still at that revision (see [`Store::execute_guarded`]).
    Known(Box<Known>),
}

/// A run's state as this process holds it, with its row and a reading of the database's clock
/// (a [`CachedState`] that has both).
pub struct Known {
    /// The run's row at the state's revision.
    pub row: RunRow,
    /// The state.
    pub state: RunState,
    /// Each task's lease holder.
    pub leases: Vec<Option<String>>,
    /// The reading the database's time is estimated from.
    pub clock: Clock,
}

/// Loads (and on PostgreSQL locks) a run with its plan and state. The stage and task rows are
/// read only when `states` holds no state of the run at its current revision; for a new run or
/// one whose state is known, nothing is read that the plan cache holds.
pub async fn load(
    store: &Store,
    conn: &impl ConnectionTrait,
    run: RunRef,
    plans: &PlanCache,
    states: &StateCache,
) -> Result<Option<Loaded>, DbErr> {
    let run = match run {
        RunRef::New(row) => {
            let plan = plan_of(store, conn, row.id, plans).await?;
            let (state, leases) = (RunState::new(&plan), vec![None; plan.tasks.len()]);
            return Ok(Some(Loaded { row: *row, plan, state, leases }));
        }
        RunRef::Known(k) => {
            let Known { row, state, leases, .. } = *k;
            let plan = plan_of(store, conn, row.id, plans).await?;
            return Ok(Some(Loaded { row, plan, state, leases }));
        }
        RunRef::Id(run) => run,
    };
    // The tenant's load comes along for claims (the per-tenant limit), and PostgreSQL's clock
    // for leases: one round trip instead of three.
    let select = format!(
        "SELECT id, tenant_id, pipeline_id, version, status, next_wake_at, started_at, finished_at, rev, \
         concurrency_key, {} FROM runs WHERE id = $1{}",
        tenant_load_columns(store, "runs.tenant_id", true),
        store.for_update()
    );
    if store.backend() != sea_orm::DbBackend::Postgres || states.contains(&run) {
        let Some(row): Option<RunRow> = store.query_one(conn, &select, vec![run.into()]).await? else {
            return Ok(None);
        };
        return load_state(store, conn, row, None, plans, states).await.map(Some);
    }
    // A run this process holds no state of (a worker's first claim of it, say): on PostgreSQL
    // its state rows (and its plan, if not known either) come in the same round trip. They are
    // read as the statement began, before it waited for the run's lock: if another transaction
    // changed the run meanwhile (the revision read with them is not the locked row's), they are
    // read again, now that the lock is held. Every write of a task's or stage's state changes
    // the run's revision, in the same transaction.
    let sql = format!(
        "WITH locked AS ({select}) SELECT locked.*, CAST({} AS TEXT) AS plan, \
         (SELECT rev FROM runs WHERE id = $1) AS seen_rev, {} FROM locked",
        if plans.contains(&run) { "NULL" } else { "(SELECT plan FROM runs WHERE id = $1)" },
        joined_states(),
    );
    let Some(j): Option<Joined> = store.query_one(conn, &sql, vec![run.into()]).await? else {
        return Ok(None);
    };
    let (row, rows) = j.parts(plans)?;
    load_state(store, conn, row, rows, plans, states).await.map(Some)
}

/// A run's state rows as one JSON array, column `states` (see [`STATE_ROWS`]).
fn joined_states() -> String {
    format!("(SELECT CAST(json_agg(s ORDER BY s.kind, s.idx) AS TEXT) FROM ({STATE_ROWS}) s) AS states")
}

/// A run's row read with its state rows, and its plan when asked for: one round trip.
#[derive(FromQueryResult)]
struct Joined {
    #[sea_orm(nested)]
    row: RunRow,
    plan: Option<String>,
    /// The run's revision as the state rows were read.
    seen_rev: Option<i64>,
    states: Option<String>,
}

impl Joined {
    /// The row, and the state rows when they were read at the row's revision. A plan read
    /// along goes to `plans`.
    fn parts(self, plans: &PlanCache) -> Result<(RunRow, Option<Vec<StateRow>>), DbErr> {
        let run = self.row.id;
        if let Some(text) = self.plan {
            plans.put(run, Arc::new(parse_plan(run, &text)?));
        }
        let rows = match (self.seen_rev == Some(self.row.rev), self.states) {
            (true, Some(text)) => Some(
                serde_json::from_str::<Vec<StateRow>>(&text)
                    .map_err(|e| DbErr::Custom(format!("state rows of run {run}: {e}")))?,
            ),
            // No rows at all (json_agg of nothing is NULL) cannot match a plan; read again to
            // say so.
            _ => None,
        };
        Ok((self.row, rows))
    }
}

/// On PostgreSQL, reads a run's row, plan and state in one statement, without locking
/// anything, and keeps them here with that statement's clock (unless this process holds a
/// state of the run already), so that this process's next claim or completion of the run is
/// applied the unlocked way (see [`save_unlocked`]): a worker that sees a run for the first
/// time decides whether a task fits it and claims the task in two round trips, not five (the
/// plan, then BEGIN, the locked read, the write, COMMIT). The state is as of the statement;
/// should another transaction change the run before the claim, the claim's statement is
/// refused and the claim takes the locked way. Elsewhere, only the plan is read. Also tells
/// whether the run was found ended (an ended run never changes again).
pub async fn peek(
    store: &Store,
    conn: &impl ConnectionTrait,
    run: Uuid,
    plans: &PlanCache,
    states: &StateCache,
) -> Result<(Arc<Prepared>, bool), DbErr> {
    if let Some(p) = plans.get(&run) {
        return Ok((p, false));
    }
    if store.backend() != sea_orm::DbBackend::Postgres || states.contains(&run) {
        return Ok((plan_of(store, conn, run, plans).await?, false));
    }
    let sql = format!(
        "SELECT id, tenant_id, pipeline_id, version, status, next_wake_at, started_at, finished_at, rev, \
         concurrency_key, {}, CAST(plan AS TEXT) AS plan, rev AS seen_rev, {} FROM runs WHERE id = $1",
        tenant_load_columns(store, "runs.tenant_id", false),
        joined_states(),
    );
    let Some(j): Option<Joined> = store.query_one(conn, &sql, vec![run.into()]).await? else {
        return Err(DbErr::Custom(format!("run {run} vanished")));
    };
    let at = std::time::Instant::now();
    let (row, rows) = j.parts(plans)?;
    let db = row.load.db_now;
    let Loaded { row, plan, state, leases } = load_state(store, conn, row, rows, plans, states).await?;
    let ended = state.status.is_terminal();
    if let Some(db) = db
        && !ended
        && !states.contains(&run)
    {
        let rev = row.rev;
        let row = Some(Box::new(row));
        states.put(run, CachedState { rev, state, leases, row, clock: Some(Clock { db, at }) });
    }
    Ok((plan, ended))
}

/// A run's stage and task rows: stages first (kind 0, then tasks, kind 1), each in index order.
const STATE_ROWS: &str = "SELECT 0 AS kind, idx, status, NULL AS attempt, gate_deadline AS at, NULL AS started_at, \
     NULL AS finished_at, NULL AS lease_owner, NULL AS lost FROM stage_runs WHERE run_id = $1 \
     UNION ALL SELECT 1, idx, status, attempt, not_before, started_at, finished_at, lease_owner, lost \
     FROM task_runs WHERE run_id = $1";

/// The plan and state of the run whose row is `row`; `rows`, when given, are its state rows
/// as read at the row's revision.
async fn load_state(
    store: &Store,
    conn: &impl ConnectionTrait,
    row: RunRow,
    rows: Option<Vec<StateRow>>,
    plans: &PlanCache,
    states: &StateCache,
) -> Result<Loaded, DbErr> {
    let run = row.id;
    let plan = plan_of(store, conn, run, plans).await?;
    if let Some(c) = states.get(&run).filter(|c| c.rev == row.rev) {
        return Ok(Loaded { row, plan, state: c.state, leases: c.leases });
    }
    let rows: Vec<StateRow> = match rows {
        Some(rows) => rows,
        None => store.query_all(conn, &format!("{STATE_ROWS} ORDER BY 1, 2"), vec![run.into()]).await?,
    };
    let (stages, tasks): (Vec<StateRow>, Vec<StateRow>) = rows.into_iter().partition(|r| r.kind == 0);
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
            .map(|s| Ok(StageState { status: parse::<StageStatus>(&s.status, "stage")?, gate_deadline: s.at.map(ms) }))
            .collect::<Result<_, DbErr>>()?,
        tasks: tasks
            .iter()
            .map(|t| {
                Ok(TaskState {
                    status: parse::<TaskStatus>(&t.status, "task")?,
                    attempt: t.attempt.and_then(|a| u32::try_from(a).ok()).unwrap_or_default(),
                    not_before: t.at.map(ms),
                    started_at: t.started_at.map(ms),
                    finished_at: t.finished_at.map(ms),
                    lost: t.lost.and_then(|l| u32::try_from(l).ok()).unwrap_or_default(),
                })
            })
            .collect::<Result<_, DbErr>>()?,
    };
    if state.stages.len() != plan.stages.len() || state.tasks.len() != plan.tasks.len() {
        return Err(DbErr::Custom(format!("run {run}: rows do not match its plan")));
    }
    let leases = tasks.into_iter().map(|t| t.lease_owner).collect();
    Ok(Loaded { row, plan, state, leases })
}

/// Rows per multi-row `INSERT`.
pub const INSERT_CHUNK: usize = 100;

/// A new run's rows as they are first written: its own state columns, and the statements that
/// insert its stages and tasks (to be executed with [`Store::execute_together`], after the run's
/// own row). They are inserted in the state the run's first event left them in, so a start is
/// one write.
#[derive(Debug, Clone)]
pub struct NewRows {
    /// The run's status.
    pub status: RunStatus,
    /// When it started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Its alarm.
    pub next_wake_at: Option<DateTime<Utc>>,
    /// Its revision.
    pub rev: i64,
    /// The inserts of its stage and task rows.
    pub inserts: Vec<(String, Vec<sea_orm::Value>)>,
}

impl NewRows {
    /// The rows of `run`, to be inserted in state `state` at revision `rev`, with alarm `wake`;
    /// `writes` are leases taken (a new run has no results yet). Tasks in the same state and
    /// with the same lease share an insert of up to [`INSERT_CHUNK`] rows.
    pub fn new(
        tenant: Uuid,
        run: Uuid,
        plan: &RunPlan,
        state: &RunState,
        wake: Option<Millis>,
        writes: &HashMap<usize, TaskWrite>,
        rev: i64,
    ) -> Self {
        let mut inserts = vec![];
        let stages: Vec<(usize, &sluice_domain::plan::PlannedStage)> = plan.stages.iter().enumerate().collect();
        for chunk in stages.chunks(INSERT_CHUNK) {
            let mut sql = String::from(
                "INSERT INTO stage_runs (run_id, tenant_id, idx, stage_id, status, gate_deadline) VALUES ",
            );
            let mut values: Vec<sea_orm::Value> = vec![run.into(), tenant.into()];
            for (n, (i, s)) in chunk.iter().enumerate() {
                sql.push_str(&values_row(n, "$1, $2", values.len() + 1, 4));
                let st = state.stages.get(*i).copied().unwrap_or_default();
                values.push((*i as i32).into());
                values.push(s.id.clone().into());
                values.push(st.status.as_str().into());
                values.push(opt_at(st.gate_deadline).into());
            }
            inserts.push((sql, values));
        }
        let lease = |i: usize| writes.get(&i).and_then(|w| w.lease.as_ref());
        // (state, lease) and the tasks in it.
        type Group<'a> = ((TaskState, Option<&'a (String, DateTime<Utc>)>), Vec<usize>);
        let mut groups: Vec<Group<'_>> = vec![];
        for i in 0..plan.tasks.len() {
            let t = state.tasks.get(i).copied().unwrap_or_default();
            match groups.iter_mut().find(|((gt, gl), _)| *gt == t && *gl == lease(i)) {
                Some(g) => g.1.push(i),
                None => groups.push(((t, lease(i)), vec![i])),
            }
        }
        let now = Utc::now();
        for ((t, lease), idx) in groups {
            for chunk in idx.chunks(INSERT_CHUNK) {
                let queued = t.status == TaskStatus::Queued;
                let mut sql = String::from(
                    "INSERT INTO task_runs (run_id, tenant_id, cancel_requested, status, attempt, not_before, \
                     started_at, finished_at, lost, queued_at, rung_at, lease_owner, lease_expires_at, outputs, \
                     idx, key, task_id, stage_idx) VALUES ",
                );
                let mut values: Vec<sea_orm::Value> = vec![
                    run.into(),
                    tenant.into(),
                    false.into(),
                    t.status.as_str().into(),
                    (t.attempt as i32).into(),
                    opt_at(t.not_before).into(),
                    opt_at(t.started_at).into(),
                    opt_at(t.finished_at).into(),
                    (t.lost as i32).into(),
                    queued.then_some(now).into(),
                    lease.map(|l| l.0.clone()).into(),
                    lease.map(|l| l.1).into(),
                ];
                for (n, i) in chunk.iter().enumerate() {
                    let shared = "$1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $10, $11, $12, '{}'";
                    sql.push_str(&values_row(n, shared, values.len() + 1, 4));
                    let task = &plan.tasks[*i];
                    values.push((*i as i32).into());
                    values.push(task.key.clone().into());
                    values.push(task.task_id.clone().into());
                    values.push((task.stage as i32).into());
                }
                inserts.push((sql, values));
            }
        }
        Self {
            status: state.status,
            started_at: opt_at(state.started_at),
            finished_at: opt_at(state.finished_at),
            next_wake_at: opt_at(wake),
            rev,
            inserts,
        }
    }

    /// The rows of a run that has not started: everything pending, revision 0.
    pub fn pending(tenant: Uuid, run: Uuid, plan: &RunPlan) -> Self {
        Self::new(tenant, run, plan, &RunState::new(plan), None, &HashMap::new(), 0)
    }
}

/// The `n`-th row of a multi-row `VALUES` (a comma before all but the first): the placeholders
/// all rows share, `shared`, then `count` of its own from `$first`.
fn values_row(n: usize, shared: &str, first: usize, count: usize) -> String {
    let own: Vec<String> = (first..first + count).map(|i| format!("${i}")).collect();
    format!("{}({shared}, {})", if n > 0 { ", " } else { "" }, own.join(", "))
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

/// What a task row gets besides its new state.
#[derive(Debug, Default, Clone)]
pub struct TaskWrite {
    /// A new lease: holder and expiry.
    pub lease: Option<(String, DateTime<Utc>)>,
    /// An attempt's result: exit code, message, outputs (JSON object).
    pub result: Option<(Option<i32>, Option<String>, String)>,
}

/// The alarm before and after a change.
#[derive(Debug, Clone, Copy)]
pub struct Wake {
    /// The run's alarm as stored.
    pub old: Option<Millis>,
    /// The run's alarm from now on.
    pub new: Option<Millis>,
}

/// A new random revision, other than `rev`.
pub fn next_rev(rev: i64) -> i64 {
    loop {
        let r = (Uuid::new_v4().as_u64_pair().0 >> 1) as i64;
        if r != rev {
            return r;
        }
    }
}

/// Writes every difference between `old` and `new`, and returns the run's new revision (the
/// old one when nothing was written). Each task update is conditional on the status and
/// attempt the task had, so a concurrent writer can never be overwritten silently. Tasks that
/// change the same way (say, 200 tasks queued at once) are written by one statement.
pub async fn save(store: &Store, conn: &impl ConnectionTrait, change: &Change<'_>) -> Result<i64, DbErr> {
    match changes(change) {
        Some((next_rev, writes)) => {
            execute_all(store, conn, writes).await?;
            Ok(next_rev)
        }
        None => Ok(change.rev),
    }
}

/// A change of a run's state, to be written.
pub struct Change<'a> {
    /// The run.
    pub run: Uuid,
    /// Its revision as the change was planned on it.
    pub rev: i64,
    /// The state then.
    pub old: &'a RunState,
    /// The state now.
    pub new: &'a RunState,
    /// Its alarm then and now.
    pub wake: Wake,
    /// What tasks get besides their new state.
    pub writes: &'a HashMap<usize, TaskWrite>,
}

/// What [`save_unlocked`] checks before it writes a change.
pub struct Guard {
    /// Tasks the change claims for the tenant `tenant` (0: no check of its limit).
    pub claims: u64,
    /// The tenant.
    pub tenant: Uuid,
    /// The configured limit of running tasks per tenant (0: none), unless the tenant has its own.
    pub default_limit: i64,
}

impl Guard {
    /// Adds to the `WHERE` of an update (with `values` for its placeholders) the condition that
    /// the tenant's running tasks plus those claimed stay within its limit, if anything is
    /// claimed.
    pub fn restrict(&self, sql: &mut String, values: &mut Vec<sea_orm::Value>) {
        if self.claims == 0 {
            return;
        }
        values.push(self.tenant.into());
        let t = values.len();
        values.push(self.default_limit.into());
        let d = values.len();
        values.push((self.claims as i64).into());
        let k = values.len();
        let limit = format!("COALESCE((SELECT max_running_tasks FROM tenants WHERE id = ${t}), ${d})");
        let running = running_tasks_sql(&format!("${t}"));
        sql.push_str(&format!(" AND ({limit} <= 0 OR ({running}) + ${k} <= {limit})"));
    }
}

/// Writes a change like [`save`], in one round trip of its own (see [`Store::execute_guarded`]),
/// applied only if the run is still at revision `rev` and, when the change claims tasks, its
/// tenant stays within its running-task limit (counted as the write begins); otherwise nothing
/// is written. Returns the new revision, or `None` when nothing was written because the run or
/// the tenant's load was not as expected (the caller then applies the change the locked way).
pub async fn save_unlocked(store: &Store, change: &Change<'_>, guard: Guard) -> Result<Option<i64>, DbErr> {
    let rev = change.rev;
    // A change that writes nothing (a claim of a task not queued, a completion found late) was
    // decided on the state known here, which nothing then checks: the locked way decides it.
    let Some((next_rev, mut writes)) = changes(change) else { return Ok(None) };
    if writes.len() > crate::store::COMBINE {
        return Ok(None);
    }
    // The run's update is the first: it carries the conditions.
    let first = &mut writes[0];
    first.values.push(rev.into());
    first.sql.push_str(&format!(" AND rev = ${}", first.values.len()));
    guard.restrict(&mut first.sql, &mut first.values);
    let parts = writes.into_iter().map(|w| (w.sql, w.values, Some(w.expect))).collect();
    Ok(store.execute_guarded(parts).await?.then_some(next_rev))
}

/// The writes of every difference between `old` and `new`, and the new revision; `None` when
/// nothing changed.
fn changes(change: &Change<'_>) -> Option<(i64, Vec<Write>)> {
    let &Change { run, rev, old, new, wake, writes } = change;
    if old == new && wake.old == wake.new && writes.is_empty() {
        return None;
    }
    let next_rev = next_rev(rev);
    // Only the columns that change are set: a database rewrites the index entries of every
    // column an update sets, changed or not (on SQLite, each such index page is written and
    // synced with the commit), and most changes of a run only move its revision.
    let mut set = vec![];
    let mut values: Vec<sea_orm::Value> = vec![run.into(), next_rev.into()];
    let mut assign = |column: &str, value: sea_orm::Value| {
        values.push(value);
        set.push(format!(", {column} = ${}", values.len()));
    };
    if old.status != new.status {
        assign("status", new.status.as_str().into());
    }
    if old.started_at != new.started_at {
        assign("started_at", opt_at(new.started_at).into());
    }
    if old.finished_at != new.finished_at {
        assign("finished_at", opt_at(new.finished_at).into());
    }
    if wake.old != wake.new {
        assign("next_wake_at", opt_at(wake.new).into());
    }
    let mut writes_sql: Vec<Write> = vec![Write {
        sql: format!("UPDATE runs SET rev = $2{} WHERE id = $1", set.concat()),
        values,
        expect: 1,
        what: Target::Run(run),
    }];
    for (i, (a, b)) in old.stages.iter().zip(&new.stages).enumerate() {
        if a != b {
            writes_sql.push(Write {
                sql: "UPDATE stage_runs SET status = $3, gate_deadline = $4 WHERE run_id = $1 AND idx = $2".into(),
                values: vec![run.into(), (i as i32).into(), b.status.as_str().into(), opt_at(b.gate_deadline).into()],
                expect: 1,
                what: Target::Stage(run, i),
            });
        }
    }
    // Changed tasks without a result of their own, grouped by (old, new) state and new lease
    // (claims made together share their lease), one statement per group.
    let now = Utc::now();
    type Group<'a> = ((&'a TaskState, &'a TaskState, Option<&'a TaskWrite>), Vec<i32>);
    fn lease(w: Option<&TaskWrite>) -> Option<&(String, DateTime<Utc>)> {
        w.and_then(|w| w.lease.as_ref())
    }
    let mut groups: Vec<Group<'_>> = vec![];
    for (i, (a, b)) in old.tasks.iter().zip(&new.tasks).enumerate() {
        let write = writes.get(&i);
        if a == b && write.is_none() {
            continue;
        }
        if write.is_some_and(|w| w.result.is_some()) {
            writes_sql.push(write_task(run, &[i as i32], a, b, write, now));
        } else if let Some(g) =
            groups.iter_mut().find(|((ga, gb, gw), _)| *ga == a && *gb == b && lease(*gw) == lease(write))
        {
            g.1.push(i as i32);
        } else {
            groups.push(((a, b, write), vec![i as i32]));
        }
    }
    for ((a, b, write), idx) in groups {
        for chunk in idx.chunks(INSERT_CHUNK) {
            writes_sql.push(write_task(run, chunk, a, b, write, now));
        }
    }
    Some((next_rev, writes_sql))
}

/// One conditional write of a change: a statement with its own `$1..` placeholders, and how
/// many rows it must change (fewer means another writer changed them first).
struct Write {
    sql: String,
    values: Vec<sea_orm::Value>,
    expect: u64,
    what: Target,
}

/// What a write changes, named only when it found rows changed by another writer.
#[derive(Clone, Copy)]
enum Target {
    Run(Uuid),
    Stage(Uuid, usize),
    /// The first task index and how many tasks.
    Tasks(Uuid, i32, usize),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Run(run) => write!(f, "run {run}"),
            Self::Stage(run, i) => write!(f, "stage {i} of run {run}"),
            Self::Tasks(run, first, n) => write!(f, "{n} task(s) from index {first} of run {run}"),
        }
    }
}

/// Executes the writes of one change, many per round trip ([`Store::execute_each`]). Each write
/// must change exactly the rows it expects; on SQLite only the total is known, but each write
/// changes at most the rows it expects, so the total falls short exactly when one of them does.
async fn execute_all(store: &Store, conn: &impl ConnectionTrait, writes: Vec<Write>) -> Result<(), DbErr> {
    let (parts, expected): (Vec<_>, Vec<_>) =
        writes.into_iter().map(|w| ((w.sql, w.values), (w.expect, w.what))).unzip();
    match store.execute_each(conn, parts).await? {
        Changed::Each(each) => {
            if let Some((_, what)) = expected.iter().zip(&each).find(|((e, _), n)| e != *n).map(|(w, _)| w) {
                return Err(DbErr::Custom(format!("{what} changed concurrently")));
            }
        }
        Changed::Total(n) => {
            if n != expected.iter().map(|(e, _)| e).sum::<u64>() {
                let targets: Vec<String> = expected.iter().map(|(_, what)| what.to_string()).collect();
                return Err(DbErr::Custom(format!("one of {} changed concurrently", targets.join(", "))));
            }
        }
    }
    Ok(())
}

/// Moves the tasks `idx` (all in state `a`) to state `b`.
fn write_task(
    run: Uuid,
    idx: &[i32],
    a: &TaskState,
    b: &TaskState,
    write: Option<&TaskWrite>,
    now: DateTime<Utc>,
) -> Write {
    let queued_now = b.status == TaskStatus::Queued && a.status != TaskStatus::Queued;
    let mut values: Vec<sea_orm::Value> = vec![
        run.into(),
        a.status.as_str().into(),
        (a.attempt as i32).into(),
        b.status.as_str().into(),
        (b.attempt as i32).into(),
        opt_at(b.not_before).into(),
        opt_at(b.started_at).into(),
        opt_at(b.finished_at).into(),
    ];
    let mut sql = String::from(
        "UPDATE task_runs SET status = $4, attempt = $5, not_before = $6, started_at = $7, finished_at = $8",
    );
    if a.lost != b.lost {
        sql.push_str(&format!(", lost = {}", b.lost));
    }
    let mut push = |sql: &mut String, column: &str, v: sea_orm::Value| {
        values.push(v);
        sql.push_str(&format!(", {column} = ${}", values.len()));
    };
    if queued_now {
        push(&mut sql, "queued_at", now.into());
        push(&mut sql, "rung_at", now.into());
        sql.push_str(", rings = 0");
    }
    match write.and_then(|w| w.lease.clone()) {
        Some((owner, expires)) => {
            push(&mut sql, "lease_owner", owner.into());
            push(&mut sql, "lease_expires_at", expires.into());
        }
        None if b.status != TaskStatus::Running => {
            sql.push_str(", lease_owner = NULL, lease_expires_at = NULL");
        }
        None => {}
    }
    if let Some((exit_code, message, outputs)) = write.and_then(|w| w.result.clone()) {
        push(&mut sql, "exit_code", exit_code.into());
        push(&mut sql, "message", message.into());
        push(&mut sql, "outputs", outputs.into());
    }
    sql.push_str(" WHERE run_id = $1 AND status = $2 AND attempt = $3 AND idx IN (");
    for (n, i) in idx.iter().enumerate() {
        values.push((*i).into());
        sql.push_str(&format!("{}${}", if n > 0 { ", " } else { "" }, values.len()));
    }
    sql.push(')');
    Write {
        sql,
        values,
        expect: idx.len() as u64,
        what: Target::Tasks(run, idx.first().copied().unwrap_or_default(), idx.len()),
    }
}
