//! Runs: start one (pinned to a pipeline version), list, inspect, cancel, retry, read task logs.

use actix_web::{HttpRequest, HttpResponse, http::Method, web};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, FromQueryResult, Value};
use serde::{Deserialize, Serialize};
use sluice_domain::{
    cedar::Action,
    plan::{Event, RunStatus},
};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::{Body, PageParams, Routes, State, audit_change, authorize, encode_cursor};
use crate::{
    auth::TenantCtx,
    authz::Resource,
    engine::state::CarriedTask,
    error::{ApiError, ApiResult, OrNotFound},
    service::runs,
};

pub(super) fn routes(r: &mut Routes<'_>) {
    r.add(Method::POST, "/api/v1/t/{tenant}/pipelines/{pipeline}/runs", create_run);
    r.add(Method::GET, "/api/v1/t/{tenant}/runs", list_runs);
    r.add(Method::GET, "/api/v1/t/{tenant}/runs/{run_id}", get_run);
    r.add(Method::POST, "/api/v1/t/{tenant}/runs/{run_id}/cancel", cancel_run);
    r.add(Method::POST, "/api/v1/t/{tenant}/runs/{run_id}/retry", retry_run);
    r.add(Method::GET, "/api/v1/t/{tenant}/runs/{run_id}/tasks/{task}/logs", task_logs);
}

/// Start a run.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct CreateRun {
    /// Values of the pipeline's `params`, checked against their declared types.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// The version to run (default: the latest).
    pub version: Option<i64>,
}

/// A stage of a run.
#[derive(Debug, Serialize, ToSchema, sea_orm::FromQueryResult)]
pub struct StageView {
    /// Stage id.
    pub stage_id: String,
    /// `pending`, `waiting`, `running`, `succeeded`, `failed`, `cancelled` or `skipped`.
    pub status: String,
    /// When a gate stops waiting.
    pub gate_deadline: Option<DateTime<Utc>>,
}

/// A task of a run.
#[derive(Debug, Serialize, ToSchema)]
pub struct TaskView {
    /// Index in the run (used in log URLs).
    pub index: i32,
    /// `id`, or `id[n]` for an instance of a fan-out.
    pub key: String,
    /// Task id in the definition.
    pub task_id: String,
    /// Status.
    pub status: String,
    /// Attempt number (0 before the first dispatch).
    pub attempt: i32,
    /// Started (latest attempt).
    pub started_at: Option<DateTime<Utc>>,
    /// Finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// Exit code of the last attempt.
    pub exit_code: Option<i32>,
    /// Why it failed, if it did.
    pub message: Option<String>,
    /// Outputs written to `$SLUICE_OUTPUT`.
    #[schema(value_type = Object)]
    pub outputs: serde_json::Value,
    /// Attempts lost with their worker (run again without using a retry).
    pub lost: i32,
}

#[derive(sea_orm::FromQueryResult)]
struct TaskRow {
    idx: i32,
    key: String,
    task_id: String,
    status: String,
    attempt: i32,
    started_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
    exit_code: Option<i32>,
    message: Option<String>,
    outputs: String,
    lost: i32,
}

/// A run.
#[derive(Debug, Serialize, ToSchema, sea_orm::FromQueryResult)]
pub struct RunSummary {
    /// Run id.
    pub id: Uuid,
    /// Pipeline name.
    pub pipeline_name: String,
    /// The pinned pipeline version.
    pub version: i64,
    /// `pending`, `running`, `waiting`, `succeeded`, `failed`, `cancelled` or `timed_out`.
    pub status: String,
    /// `api`, `cron`, `webhook` or `retry`.
    pub trigger: String,
    /// The run this one retries (trigger `retry`).
    pub retry_of: Option<Uuid>,
    /// Who started it.
    pub initiator: String,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Started.
    pub started_at: Option<DateTime<Utc>>,
    /// Finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// The rendered key of the pipeline's concurrency limit, if it has one: a `pending` run
    /// with a key waits for a run of that key to end.
    pub concurrency_key: Option<String>,
}

/// A run with its stages and tasks.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunView {
    /// The run.
    #[serde(flatten)]
    pub run: RunSummary,
    /// Parameters (defaults applied).
    #[schema(value_type = Object)]
    pub params: serde_json::Value,
    /// Stages, in definition order.
    pub stages: Vec<StageView>,
    /// Tasks, in plan order.
    pub tasks: Vec<TaskView>,
}

/// How a run can be started (`runs.trigger`).
const TRIGGERS: [&str; 4] = ["api", "webhook", "cron", "retry"];

const RUN_SELECT: &str = "SELECT id, pipeline_name, version, status, trigger, retry_of, initiator, created_at, started_at, finished_at, concurrency_key FROM runs";

#[derive(sea_orm::FromQueryResult)]
struct RunAuth {
    pipeline_name: String,
    initiator_id: Option<Uuid>,
}

async fn run_view(state: &State, tenant: Uuid, id: Uuid) -> ApiResult<RunView> {
    let store = &state.store;
    // The run and its params in one read.
    let row = store
        .db()
        .query_one_raw(store.stmt(
            &format!("{} WHERE tenant_id = $1 AND id = $2", RUN_SELECT.replace(" FROM runs", ", params FROM runs")),
            vec![tenant.into(), id.into()],
        ))
        .await?
        .or_not_found("run")?;
    #[derive(sea_orm::FromQueryResult)]
    struct P {
        params: String,
    }
    let run = RunSummary::from_query_result(&row, "")?;
    let p = P::from_query_result(&row, "").ok();
    let stages: Vec<StageView> = store
        .query_all(
            store.db(),
            "SELECT stage_id, status, gate_deadline FROM stage_runs WHERE tenant_id = $1 AND run_id = $2 ORDER BY idx",
            vec![tenant.into(), id.into()],
        )
        .await?;
    let tasks: Vec<TaskRow> = store
        .query_all(
            store.db(),
            "SELECT idx, key, task_id, status, attempt, started_at, finished_at, exit_code, message, outputs, lost FROM task_runs \
             WHERE tenant_id = $1 AND run_id = $2 ORDER BY idx",
            vec![tenant.into(), id.into()],
        )
        .await?;
    Ok(RunView {
        run,
        params: p.and_then(|p| serde_json::from_str(&p.params).ok()).unwrap_or_default(),
        stages,
        tasks: tasks
            .into_iter()
            .map(|t| TaskView {
                index: t.idx,
                key: t.key,
                task_id: t.task_id,
                status: t.status,
                attempt: t.attempt,
                started_at: t.started_at,
                finished_at: t.finished_at,
                exit_code: t.exit_code,
                message: t.message,
                outputs: serde_json::from_str(&t.outputs).unwrap_or_default(),
                lost: t.lost,
            })
            .collect(),
    })
}

fn idempotency_key(req: &HttpRequest) -> ApiResult<Option<String>> {
    let Some(v) = req.headers().get("idempotency-key") else { return Ok(None) };
    let v = v.to_str().map_err(|_| ApiError::bad_request("Idempotency-Key", "must be printable ASCII"))?;
    if v.is_empty() || v.len() > 200 {
        return Err(ApiError::bad_request("Idempotency-Key", "must be 1 to 200 characters"));
    }
    Ok(Some(v.to_owned()))
}

#[utoipa::path(post, path = "/api/v1/t/{tenant}/pipelines/{pipeline}/runs", tag = "runs", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("pipeline" = String, Path, description = "pipeline name"),
           ("Idempotency-Key" = Option<String>, Header, description = "a retried request with the same key (by the same user, for the same pipeline) returns the same run")),
    request_body = CreateRun,
    responses((status = 201, body = RunView), (status = 200, description = "the run this user created earlier for this pipeline with this Idempotency-Key", body = RunView),
              (status = 403, description = "not permitted"), (status = 404, description = "no such pipeline or version"),
              (status = 409, description = "the pipeline is archived"), (status = 422, description = "invalid params", body = crate::error::Problem)))]
async fn create_run(
    state: State,
    ctx: TenantCtx,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: Body,
) -> ApiResult<HttpResponse> {
    let p = runs::find_pipeline(&state, ctx.tenant.id, &path.1).await?;
    if p.archived_at.is_some() {
        return Err(ApiError::conflict("the pipeline is archived"));
    }
    let decision =
        authorize(&state, &ctx, Action::RunCreate, Resource::Pipeline { name: &p.name, archived: false }).await?;
    let body: CreateRun = body.json_or_default()?;
    // A key answers for the pipeline and the caller that used it, nobody else: another
    // pipeline's run (which the caller may not be allowed to read) is never the answer, and the
    // keys of triggers (`cron:`, `webhook:`) cannot be taken in advance. Hashed, to fit the column.
    let key = idempotency_key(&req)?
        .map(|k| format!("api:{}:{}:{}", p.id, ctx.principal.user_id, crate::auth::api_token::sha256_hex(&k)));
    let started = runs::start_run(
        &state,
        runs::StartRun {
            tenant: ctx.tenant.id,
            pipeline: &p,
            version: body.version,
            params: &body.params,
            trigger: "api",
            initiator: Some(ctx.principal.user_id),
            actor: &ctx.principal.actor(),
            source: &ctx.source,
            policy_ids: &decision.determining_policies,
            idempotency_key: key.as_deref(),
            retry: None,
        },
    )
    .await?;
    let view = run_view(&state, ctx.tenant.id, started.id).await?;
    Ok(if started.created { HttpResponse::Created().json(view) } else { HttpResponse::Ok().json(view) })
}

/// Run filters.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunQuery {
    /// Pipeline name.
    pub pipeline: Option<String>,
    /// Status.
    pub status: Option<String>,
    /// Trigger (`api`).
    pub trigger: Option<String>,
    /// Created at or after (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Created before (RFC 3339).
    pub until: Option<DateTime<Utc>>,
    /// Cursor from `next_cursor`.
    pub cursor: Option<String>,
    /// Page size 1..=200 (default 50).
    pub limit: Option<u64>,
}

/// A page of runs, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunPage {
    /// Runs.
    pub items: Vec<RunSummary>,
    /// Cursor of the next (older) page.
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/runs", tag = "runs", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), RunQuery),
    responses((status = 200, body = RunPage), (status = 403, description = "not permitted"), (status = 404, description = "no such tenant")))]
async fn list_runs(state: State, ctx: TenantCtx, q: web::Query<RunQuery>) -> ApiResult<web::Json<RunPage>> {
    authorize(&state, &ctx, Action::RunList, Resource::Tenant).await?;
    let page = PageParams { cursor: q.cursor.clone(), limit: q.limit };
    let limit = page.limit()?;
    let mut sql = format!("{RUN_SELECT} WHERE tenant_id = $1");
    let mut values: Vec<Value> = vec![ctx.tenant.id.into()];
    if let Some(c) = page.cursor()? {
        let before = Uuid::parse_str(&c).map_err(|_| ApiError::invalid("cursor", "not a cursor from this API"))?;
        values.push(before.into());
        sql.push_str(&format!(" AND id < ${}", values.len()));
    }
    if let Some(status) = &q.status {
        status.parse::<RunStatus>().map_err(|e| ApiError::invalid("status", e.to_string()))?;
    }
    if let Some(trigger) = &q.trigger
        && !TRIGGERS.contains(&trigger.as_str())
    {
        return Err(ApiError::invalid("trigger", format!("`{trigger}` is not one of {}", TRIGGERS.join(", "))));
    }
    let filters: [(&str, Option<Value>); 5] = [
        ("pipeline_name", q.pipeline.clone().map(Value::from)),
        ("status", q.status.clone().map(Value::from)),
        ("trigger", q.trigger.clone().map(Value::from)),
        ("created_at >=", q.since.map(Value::from)),
        ("created_at <", q.until.map(Value::from)),
    ];
    for (col, v) in filters {
        if let Some(v) = v {
            values.push(v);
            let op = if col.contains(' ') { "" } else { " =" };
            sql.push_str(&format!(" AND {col}{op} ${}", values.len()));
        }
    }
    values.push((limit as i64 + 1).into());
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", values.len()));
    let mut items: Vec<RunSummary> = state.store.query_all(state.store.db(), &sql, values).await?;
    let next_cursor = if items.len() as u64 > limit {
        items.truncate(limit as usize);
        items.last().map(|r| encode_cursor(&r.id.to_string()))
    } else {
        None
    };
    Ok(web::Json(RunPage { items, next_cursor }))
}

async fn load_run_auth(state: &State, ctx: &TenantCtx, id: Uuid) -> ApiResult<RunAuth> {
    state
        .store
        .query_one(
            state.store.db(),
            "SELECT pipeline_name, initiator_id FROM runs WHERE tenant_id = $1 AND id = $2",
            vec![ctx.tenant.id.into(), id.into()],
        )
        .await?
        .or_not_found("run")
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/runs/{run_id}", tag = "runs", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("run_id" = Uuid, Path, description = "run id")),
    responses((status = 200, body = RunView), (status = 403, description = "not permitted"), (status = 404, description = "no such run")))]
async fn get_run(state: State, ctx: TenantCtx, path: web::Path<(String, Uuid)>) -> ApiResult<web::Json<RunView>> {
    let r = load_run_auth(&state, &ctx, path.1).await?;
    authorize(
        &state,
        &ctx,
        Action::RunRead,
        Resource::Run { pipeline: &r.pipeline_name, id: path.1, initiator: r.initiator_id },
    )
    .await?;
    Ok(web::Json(run_view(&state, ctx.tenant.id, path.1).await?))
}

#[utoipa::path(post, path = "/api/v1/t/{tenant}/runs/{run_id}/cancel", tag = "runs", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("run_id" = Uuid, Path, description = "run id")),
    responses((status = 200, description = "cancelled (or already finished)", body = RunView), (status = 403, description = "not permitted"),
              (status = 404, description = "no such run")))]
async fn cancel_run(state: State, ctx: TenantCtx, path: web::Path<(String, Uuid)>) -> ApiResult<web::Json<RunView>> {
    let id = path.1;
    let r = load_run_auth(&state, &ctx, id).await?;
    let decision = authorize(
        &state,
        &ctx,
        Action::RunCancel,
        Resource::Run { pipeline: &r.pipeline_name, id, initiator: r.initiator_id },
    )
    .await?;
    let txn = state.store.write().await?;
    let applied = state.engine.apply_in(&*txn, id, Event::Cancel).await?;
    if applied.finished {
        let rid = id.to_string();
        audit_change(&state, &*txn, &ctx, &decision, Action::RunCancel, Some(&rid), None, serde_json::json!({}))
            .await?;
    }
    state.engine.commit_applied(txn, applied).await?;
    Ok(web::Json(run_view(&state, ctx.tenant.id, id).await?))
}

/// Retry a run that ended `failed`, `cancelled` or `timed_out`.
///
/// Starts a **new** run (trigger `retry`, `retry_of` = the original run's id) of the **same**
/// pipeline version with the **same** parameters. Every task that succeeded in the original run
/// is carried over as `succeeded` — with its attempt, times, exit code and outputs, so
/// `{{ tasks.ID.outputs.KEY }}` still resolves for the tasks that need it — and is not executed
/// again (its logs stay with the original run). Every other task runs again, from attempt 1;
/// gated stages whose tasks do not all carry over wait for their gate again. The original run is
/// left as it was. Audited as `run.retry` (on the new run, with `retry_of` in the details).
///
/// 409 when the run is in any other status (still going, or succeeded), or its pipeline is
/// archived.
#[utoipa::path(post, path = "/api/v1/t/{tenant}/runs/{run_id}/retry", tag = "runs", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("run_id" = Uuid, Path, description = "id of the run to retry")),
    responses((status = 201, description = "the new run", body = RunView), (status = 403, description = "not permitted"),
              (status = 404, description = "no such run"),
              (status = 409, description = "the run did not end failed, cancelled or timed out, or its pipeline is archived",
               body = crate::error::Problem)))]
async fn retry_run(state: State, ctx: TenantCtx, path: web::Path<(String, Uuid)>) -> ApiResult<HttpResponse> {
    let id = path.1;
    let r = load_run_auth(&state, &ctx, id).await?;
    let decision = authorize(
        &state,
        &ctx,
        Action::RunRetry,
        Resource::Run { pipeline: &r.pipeline_name, id, initiator: r.initiator_id },
    )
    .await?;
    #[derive(sea_orm::FromQueryResult)]
    struct Original {
        pipeline_id: Uuid,
        version: i64,
        status: String,
        params: String,
    }
    let store = &state.store;
    let original: Original = store
        .query_one(
            store.db(),
            "SELECT pipeline_id, version, status, params FROM runs WHERE tenant_id = $1 AND id = $2",
            vec![ctx.tenant.id.into(), id.into()],
        )
        .await?
        .or_not_found("run")?;
    if !["failed", "cancelled", "timed_out"].contains(&original.status.as_str()) {
        return Err(ApiError::conflict(format!(
            "only a failed, cancelled or timed-out run can be retried; this one is {}",
            original.status
        )));
    }
    let pipeline = runs::find_pipeline_by_id(&state, ctx.tenant.id, original.pipeline_id).await?;
    let params: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&original.params)
        .map_err(|e| anyhow::anyhow!("stored params of run {id} do not parse: {e}"))?;
    let carried: Vec<CarriedTask> = store
        .query_all(
            store.db(),
            "SELECT idx, key, attempt, queued_at, started_at, finished_at, exit_code, outputs FROM task_runs \
             WHERE tenant_id = $1 AND run_id = $2 AND status = 'succeeded' ORDER BY idx",
            vec![ctx.tenant.id.into(), id.into()],
        )
        .await?;
    let started = runs::start_run(
        &state,
        runs::StartRun {
            tenant: ctx.tenant.id,
            pipeline: &pipeline,
            version: Some(original.version),
            params: &params,
            trigger: "retry",
            initiator: Some(ctx.principal.user_id),
            actor: &ctx.principal.actor(),
            source: &ctx.source,
            policy_ids: &decision.determining_policies,
            idempotency_key: None,
            retry: Some(runs::Retry { of: id, carry_over: &carried }),
        },
    )
    .await?;
    Ok(HttpResponse::Created().json(run_view(&state, ctx.tenant.id, started.id).await?))
}

/// Which lines to read.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// First line to return (0-based; default 0).
    pub offset: Option<i64>,
    /// Most lines to return, 1..=5000 (default 1000).
    pub limit: Option<i64>,
}

/// Log lines of a task.
#[derive(Debug, Serialize, ToSchema)]
pub struct LogPage {
    /// Offset of the first line returned.
    pub offset: i64,
    /// Lines: `{at, stream, text}` objects (`stream` is `out`, `err` or `sys`).
    #[schema(value_type = Vec<Object>)]
    pub lines: Vec<serde_json::Value>,
    /// Offset to ask for next.
    pub next_offset: i64,
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/runs/{run_id}/tasks/{task}/logs", tag = "runs", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("run_id" = Uuid, Path, description = "run id"),
           ("task" = String, Path, description = "task key (e.g. `compile` or `deploy[1]`) or index"), LogQuery),
    responses((status = 200, body = LogPage), (status = 403, description = "not permitted"), (status = 404, description = "no such run or task")))]
async fn task_logs(
    state: State,
    ctx: TenantCtx,
    path: web::Path<(String, Uuid, String)>,
    q: web::Query<LogQuery>,
) -> ApiResult<web::Json<LogPage>> {
    let (_, id, task) = path.into_inner();
    let r = load_run_auth(&state, &ctx, id).await?;
    authorize(
        &state,
        &ctx,
        Action::RunRead,
        Resource::Run { pipeline: &r.pipeline_name, id, initiator: r.initiator_id },
    )
    .await?;
    let offset = q.offset.unwrap_or(0);
    if offset < 0 {
        return Err(ApiError::invalid("offset", "must not be negative"));
    }
    let limit = q.limit.unwrap_or(1000);
    if !(1..=5000).contains(&limit) {
        return Err(ApiError::invalid("limit", "must be between 1 and 5000"));
    }
    #[derive(sea_orm::FromQueryResult)]
    struct T {
        idx: i32,
    }
    let t: T = state
        .store
        .query_one(
            state.store.db(),
            "SELECT idx FROM task_runs WHERE tenant_id = $1 AND run_id = $2 AND (key = $3 OR CAST(idx AS TEXT) = $3)",
            vec![ctx.tenant.id.into(), id.into(), task.into()],
        )
        .await?
        .or_not_found("task")?;
    #[derive(sea_orm::FromQueryResult)]
    struct Chunk {
        first_line: i64,
        body: String,
    }
    let chunks: Vec<Chunk> = state
        .store
        .query_all(state.store.db(),
            "SELECT first_line, body FROM task_logs WHERE tenant_id = $1 AND run_id = $2 AND task_idx = $3 AND first_line + lines > $4 \
             ORDER BY chunk LIMIT 100",
            vec![ctx.tenant.id.into(), id.into(), t.idx.into(), offset.into()])
        .await?;
    let mut lines = vec![];
    for c in chunks {
        for (i, l) in c.body.split('\n').enumerate() {
            let n = c.first_line + i as i64;
            if n >= offset && (lines.len() as i64) < limit {
                lines.push(serde_json::from_str(l).unwrap_or(serde_json::Value::String(l.to_owned())));
            }
        }
    }
    let next_offset = offset + lines.len() as i64;
    Ok(web::Json(LogPage { offset, lines, next_offset }))
}
