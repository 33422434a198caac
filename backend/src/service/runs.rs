//! Starting a run, whoever asks: the API, a webhook, a cron schedule, a retry.

use chrono::Utc;
use serde_json::{Map, Value};
use sluice_domain::{
    plan::{self, Event},
    spec::OnConflict,
    template::{MapContext, render_text},
};
use uuid::Uuid;

use crate::{
    AppState,
    audit::{self, Actor, NewEvent, Outcome, Source},
    engine::{
        Applied,
        state::{
            CarriedTask, Clock, Guard, Memo, NewRows, RunRow, TenantLoad, active_runs, carry_over, tenant_load_columns,
        },
    },
    error::{ApiError, ApiResult, FieldError, OrNotFound},
    store::is_unique_violation,
};

/// The pipeline a run is started for.
#[derive(Debug, Clone, sea_orm::FromQueryResult)]
pub struct PipelineRef {
    /// Id.
    pub id: Uuid,
    /// Name.
    pub name: String,
    /// Latest version.
    pub latest_version: i64,
    /// Archived, if it is.
    pub archived_at: Option<chrono::DateTime<Utc>>,
}

/// Loads a pipeline of a tenant by name.
pub async fn find_pipeline(state: &AppState, tenant: Uuid, name: &str) -> ApiResult<PipelineRef> {
    state
        .store
        .query_one(
            state.store.db(),
            "SELECT id, name, latest_version, archived_at FROM pipelines WHERE tenant_id = $1 AND name = $2",
            vec![tenant.into(), name.into()],
        )
        .await?
        .or_not_found("pipeline")
}

/// Loads a pipeline of a tenant by id.
pub async fn find_pipeline_by_id(state: &AppState, tenant: Uuid, id: Uuid) -> ApiResult<PipelineRef> {
    state
        .store
        .query_one(
            state.store.db(),
            "SELECT id, name, latest_version, archived_at FROM pipelines WHERE tenant_id = $1 AND id = $2",
            vec![tenant.into(), id.into()],
        )
        .await?
        .or_not_found("pipeline")
}

/// Everything needed to start a run.
pub struct StartRun<'a> {
    /// Tenant.
    pub tenant: Uuid,
    /// Pipeline.
    pub pipeline: &'a PipelineRef,
    /// Version to pin (default: latest).
    pub version: Option<i64>,
    /// Parameters as given.
    pub params: &'a Map<String, Value>,
    /// `api`, `webhook`, `cron` or `retry`.
    pub trigger: &'a str,
    /// The user who started it, if a user did.
    pub initiator: Option<Uuid>,
    /// Who, for the audit log and the run record.
    pub actor: &'a Actor,
    /// Where from.
    pub source: &'a Source,
    /// Cedar policies that allowed it.
    pub policy_ids: &'a [String],
    /// A key that makes a repeated request return the same run.
    pub idempotency_key: Option<&'a str>,
    /// Set when the run retries an earlier one.
    pub retry: Option<Retry<'a>>,
}

/// What a retry takes over from the run it retries.
pub struct Retry<'a> {
    /// The run retried (stored as `retry_of`).
    pub of: Uuid,
    /// Its succeeded tasks: inserted as `succeeded` (with their outputs) before the new run
    /// starts, so the planner never dispatches them again.
    pub carry_over: &'a [CarriedTask],
}

/// A run that exists now.
pub struct Started {
    /// Run id.
    pub id: Uuid,
    /// False when the idempotency key named a run started earlier.
    pub created: bool,
}

/// The run started earlier with this idempotency key, if any.
pub async fn existing_run(state: &AppState, tenant: Uuid, key: &str) -> ApiResult<Option<Uuid>> {
    #[derive(sea_orm::FromQueryResult)]
    struct R {
        id: Uuid,
    }
    let r: Option<R> = state
        .store
        .query_one(
            state.store.db(),
            "SELECT id FROM runs WHERE tenant_id = $1 AND idempotency_key = $2",
            vec![tenant.into(), key.into()],
        )
        .await?;
    Ok(r.map(|r| r.id))
}

/// Pins the version, checks the params, records the run, its stages and tasks and its audit
/// event, and starts it — all in one transaction; the first tasks are dispatched after commit.
pub async fn start_run(state: &AppState, req: StartRun<'_>) -> ApiResult<Started> {
    if req.pipeline.archived_at.is_some() {
        return Err(ApiError::conflict("the pipeline is archived"));
    }
    if let Some(k) = req.idempotency_key
        && let Some(id) = existing_run(state, req.tenant, k).await?
    {
        return Ok(Started { id, created: false });
    }
    let store = &state.store;
    let version = req.version.unwrap_or(req.pipeline.latest_version);
    // Versions run from 1 to the latest; each is parsed once per process (versions never change).
    if !(1..=req.pipeline.latest_version).contains(&version) {
        return Err(ApiError::NotFound("pipeline version"));
    }
    let spec = state.engine.spec_of(req.pipeline.id, version).await?;
    let run_plan = plan::compile(&spec, req.params).map_err(|e| ApiError::Validation {
        detail: format!("the run cannot start: {e}"),
        errors: e.errors().iter().map(|x| FieldError::new(x.path.clone(), x.message.clone())).collect(),
    })?;
    let id = Uuid::now_v7();
    let concurrency = match &spec.concurrency {
        Some(c) => {
            let ctx = MapContext { params: run_plan.params.clone(), run_id: id.to_string(), ..MapContext::default() };
            let key = render_text(&c.key, &ctx).map_err(|e| ApiError::Validation {
                detail: format!("the run cannot start: its concurrency key does not render: {e}"),
                errors: vec![FieldError::new("concurrency.key", e.to_string())],
            })?;
            Some((key, c.max, c.on_conflict))
        }
        None => None,
    };
    let params_text = serde_json::to_string(&run_plan.params).map_err(anyhow::Error::from)?;
    let plan_text = serde_json::to_string(&run_plan).map_err(anyhow::Error::from)?;
    let mut details = serde_json::json!({
        "pipeline": req.pipeline.name, "version": version, "trigger": req.trigger, "params": run_plan.params,
    });
    if let Some(r) = &req.retry {
        details["retry_of"] = r.of.to_string().into();
        details["carried_over"] = r.carry_over.iter().map(|t| t.key.clone()).collect::<Vec<_>>().into();
    }
    let prep = Prep {
        id,
        version,
        params_text,
        plan_text,
        run_plan: std::sync::Arc::new(sluice_domain::plan::Prepared::new(run_plan)),
        concurrency,
        details,
    };
    if let Some(started) = start_unlocked(state, &req, &prep).await? {
        return Ok(started);
    }
    let txn = store.write().await?;
    // With a concurrency limit, starts of the pipeline are serialized (the pipeline row is
    // locked on PostgreSQL; SQLite has one writer), so two starts never both take the last slot.
    let mut start = Event::Start;
    if let Some((key, max, on_conflict)) = &prep.concurrency {
        let active = active_runs(store, &*txn, req.pipeline.id, key).await?;
        if active >= i64::from(*max) {
            start = match on_conflict {
                OnConflict::Queue => Event::Tick,
                OnConflict::CancelNew => Event::Cancel,
            };
        }
    }
    // The tenant's audit chain head (locked until the commit), with what the engine needs to
    // start the run without reading it back: the database clock and the tenant's load. On
    // PostgreSQL the statement's snapshot predates the wait for the lock, so a count of the
    // tenant's running tasks read here could miss the claims of a start that held the lock
    // before: the engine counts them itself, after the lock, if the start claims anything.
    // SQLite's write lock is held by the whole transaction, so its count here is current.
    #[derive(sea_orm::FromQueryResult)]
    struct Context {
        #[sea_orm(nested)]
        head: audit::Head,
        #[sea_orm(nested)]
        load: TenantLoad,
    }
    let count = store.backend() == sea_orm::DbBackend::Sqlite;
    let head = audit::head_sql(store, &tenant_load_columns(store, "$1", count));
    let ctx: Context = store
        .query_one(&*txn, &head, vec![req.tenant.into()])
        .await?
        .ok_or_else(|| anyhow::anyhow!("audit chain of tenant {} missing", req.tenant))?;
    if let Some(db) = ctx.load.db_now {
        state.starts.anchor(Clock { db, at: std::time::Instant::now() });
    }
    let w = start_statements(state, &req, &prep, &*txn, ctx.head, ctx.load, start).await?;
    match store.execute_together(&*txn, w.inserts).await {
        Ok(changed) => audit::check_appended(req.tenant, changed, w.inserted)?,
        Err(e) if is_unique_violation(&e) && req.idempotency_key.is_some() => {
            // The same key won a race: that run is the answer.
            drop(txn);
            let key = req.idempotency_key.unwrap_or_default();
            let existing = existing_run(state, req.tenant, key).await?.or_not_found("run")?;
            return Ok(Started { id: existing, created: false });
        }
        Err(e) => return Err(e.into()),
    }
    // A queued run stays `pending` (a tick does nothing to it) until a run of its key ends.
    let applied = match w.planned {
        Some(applied) => applied,
        None => {
            let carried = req.retry.as_ref().map_or(&[][..], |r| r.carry_over);
            carry_over(store, &*txn, id, &prep.run_plan, carried).await?;
            state.engine.apply_in(&*txn, id, start).await?
        }
    };
    state.engine.commit_applied(txn, applied).await?;
    state.starts.learned(req.tenant, w.head);
    Ok(Started { id, created: true })
}

/// A start as worked out before anything is written.
struct Prep {
    id: Uuid,
    version: i64,
    params_text: String,
    plan_text: String,
    run_plan: std::sync::Arc<sluice_domain::plan::Prepared>,
    /// The rendered concurrency key, its limit and what a start over it does.
    concurrency: Option<(String, u32, OnConflict)>,
    /// The audit event's details (the concurrency outcome is added once known).
    details: Value,
}

/// The statements that write a start.
struct StartWrites {
    /// A new run's first event, planned (a retry's is applied once its rows are in).
    planned: Option<Applied>,
    /// The run's row, its stages' and tasks' rows, the audit event and the chain's new head
    /// (the last statement).
    inserts: Vec<(String, Vec<sea_orm::Value>)>,
    /// How many rows the inserts of the run, its stages and its tasks insert.
    inserted: u64,
    /// The tenant's audit chain head once they are applied.
    head: audit::Head,
}

/// Plans a start on the tenant's audit chain `head` and `load`, and builds what writes it.
/// `start` is the run's first event: `Start`, or what its concurrency limit made of it.
async fn start_statements(
    state: &AppState,
    req: &StartRun<'_>,
    prep: &Prep,
    conn: &impl sea_orm::ConnectionTrait,
    head: audit::Head,
    load: TenantLoad,
    start: Event,
) -> ApiResult<StartWrites> {
    let Prep { id, version, run_plan, .. } = prep;
    let (id, version) = (*id, *version);
    let mut details = prep.details.clone();
    if let Some((key, max, _)) = &prep.concurrency {
        details["concurrency"] = serde_json::json!({
            "key": key, "max": max,
            "outcome": match start {
                Event::Tick => "queued",
                Event::Cancel => "cancelled",
                _ => "started",
            },
        });
    }
    // A new run's first event is planned before anything is written, so that its rows go in
    // already in the state it leaves them in (one write for the whole start). A retry's rows go
    // in pending; its carried-over tasks are then marked, and it starts after that.
    let (planned, rows) = match &req.retry {
        Some(_) => (None, NewRows::pending(req.tenant, id, run_plan)),
        None => {
            let key = prep.concurrency.as_ref().map(|c| c.0.clone());
            let row = RunRow::new(id, req.tenant, req.pipeline.id, version, key, load);
            let (applied, rows) = state.engine.start_new(conn, row, run_plan.clone(), start).await?;
            (Some(applied), rows)
        }
    };
    // The run's row, its stages' and its tasks', and its audit event go in one round trip.
    let mut inserts = vec![(
        "INSERT INTO runs (id, tenant_id, pipeline_id, pipeline_name, version, status, trigger, initiator_id, initiator, \
             params, plan, idempotency_key, retry_of, created_at, concurrency_key, started_at, finished_at, \
             next_wake_at, rev) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)"
            .to_owned(),
        vec![
            id.into(),
            req.tenant.into(),
            req.pipeline.id.into(),
            req.pipeline.name.clone().into(),
            version.into(),
            rows.status.as_str().into(),
            req.trigger.into(),
            req.initiator.into(),
            req.actor.label.clone().into(),
            prep.params_text.clone().into(),
            prep.plan_text.clone().into(),
            req.idempotency_key.map(str::to_owned).into(),
            req.retry.as_ref().map(|r| r.of).into(),
            Utc::now().into(),
            prep.concurrency.as_ref().map(|c| c.0.clone()).into(),
            rows.started_at.into(),
            rows.finished_at.into(),
            rows.next_wake_at.into(),
            rows.rev.into(),
        ],
    )];
    inserts.extend(rows.inserts);
    let inserted = 1 + (run_plan.stages.len() + run_plan.tasks.len()) as u64;
    let (head, audited) = audit::append_statements(
        req.tenant,
        head.seq,
        head.hash,
        &NewEvent {
            actor: req.actor,
            action: if req.retry.is_some() { "run.retry" } else { "run.create" },
            resource_type: "Run",
            resource_id: Some(&id.to_string()),
            resource_version: Some(version),
            outcome: Outcome::Allow,
            policy_ids: req.policy_ids,
            source: req.source,
            details,
        },
    );
    inserts.extend(audited);
    Ok(StartWrites { planned, inserts, inserted, head })
}

/// The start of a new run (not a retry) of a pipeline without a concurrency key, of a tenant
/// whose audit chain head this process knows from its own last start, is written without
/// reading anything first, in one round trip (see [`crate::store::Store::execute_guarded`]):
/// planned at the database time (on PostgreSQL estimated from this process's last reading of
/// the clock; SQLite's is this process's), and written so that the chain's head moves on only
/// if it is still the one known here and, when this process's worker claims tasks of the run
/// at once, only while the tenant stays within its limit of running tasks; the run's rows and
/// the audit event go with it or not at all. One round trip instead of four (BEGIN, the head's
/// locked read, the write, COMMIT). `None` when the start is not such a one, or the head had
/// moved on (another start or audited change, here or in another process), or the tenant was
/// at its limit: then nothing was written, and the start takes the locked way.
async fn start_unlocked(state: &AppState, req: &StartRun<'_>, prep: &Prep) -> ApiResult<Option<Started>> {
    let store = &state.store;
    if req.retry.is_some() || prep.concurrency.is_some() {
        return Ok(None);
    }
    // A run whose rows cannot go in one round trip however they group (the run's row, inserts
    // of up to `INSERT_CHUNK` stages or tasks, the audit event and the head's update) is not
    // planned for one.
    let chunk = crate::engine::state::INSERT_CHUNK;
    let fewest = 3 + prep.run_plan.stages.len().div_ceil(chunk) + prep.run_plan.tasks.len().div_ceil(chunk);
    if fewest > crate::store::COMBINE {
        return Ok(None);
    }
    let Some(head) = state.starts.head(req.tenant) else { return Ok(None) };
    let Some(clock) = Clock::usable(store.backend(), state.starts.clock()) else { return Ok(None) };
    // The tenant's limit is left to the statement: the planner sees none.
    let load = TenantLoad { db_now: Some(clock.now()), tenant_running: Some(0), tenant_max: Some(0) };
    let w = start_statements(state, req, prep, store.db(), head, load, Event::Start).await?;
    if w.inserts.len() > crate::store::COMBINE {
        return Ok(None);
    }
    // The head's update first (it carries the conditions), the inserts after it.
    let mut inserts = w.inserts.into_iter();
    let Some((mut update, mut values)) = inserts.next_back() else { return Ok(None) };
    let guard = Guard {
        claims: w.planned.as_ref().map_or(0, |a| a.handed.len() as u64),
        tenant: req.tenant,
        default_limit: state.engine.tenant_task_limit() as i64,
    };
    guard.restrict(&mut update, &mut values);
    let parts: Vec<_> =
        std::iter::once((update, values, Some(1))).chain(inserts.map(|(sql, values)| (sql, values, None))).collect();
    // Written, the start's tasks are handed over and rung whatever becomes of the request.
    let write = {
        let store = store.clone();
        async move { store.execute_guarded(parts).await }
    };
    let written = match state.engine.write_then_apply(write, w.planned.unwrap_or_default()).await {
        Ok(written) => written,
        // An idempotency key or the event's seq taken meanwhile: the locked way tells which.
        Err(e) if is_unique_violation(&e) => false,
        Err(e) => return Err(e.into()),
    };
    if !written {
        state.starts.forget(req.tenant);
        return Ok(None);
    }
    state.starts.learned(req.tenant, w.head);
    Ok(Some(Started { id: prep.id, created: true }))
}

/// What this process knows, from its own starts, of tenants' audit chain heads and of the
/// database's clock: what a start without a transaction is planned on (see `start_unlocked`).
pub struct StartCache {
    heads: Memo<Uuid, audit::Head>,
    clock: std::sync::Mutex<Option<Clock>>,
}

impl Default for StartCache {
    fn default() -> Self {
        Self { heads: Memo::new(4096), clock: std::sync::Mutex::new(None) }
    }
}

impl StartCache {
    /// The head of `tenant`'s chain as this process last wrote it.
    fn head(&self, tenant: Uuid) -> Option<audit::Head> {
        self.heads.get(&tenant)
    }

    /// The last reading of the database's clock (see [`Clock::usable`]).
    fn clock(&self) -> Option<Clock> {
        *self.clock.lock().ok()?
    }

    /// A new reading of the database's clock.
    fn anchor(&self, clock: Clock) {
        if let Ok(mut c) = self.clock.lock() {
            *c = Some(clock);
        }
    }

    /// The head of `tenant`'s chain as a start just committed it.
    fn learned(&self, tenant: Uuid, head: audit::Head) {
        self.heads.put(tenant, head);
    }

    /// Forgets the head of `tenant`'s chain (it moved on elsewhere).
    fn forget(&self, tenant: Uuid) {
        self.heads.forget(&tenant);
    }
}
