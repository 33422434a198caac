//! The workers a tenant's tasks can run on: the shared workers and the tenant's own, never
//! another tenant's. Read from the worker registry (`crate::engine::registry`); a worker's status
//! is computed on the database clock.

use actix_web::{http::Method, web};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sluice_domain::cedar::Action;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Routes, State, authorize};
use crate::{auth::TenantCtx, authz::Resource, error::ApiResult};

pub(super) fn routes(r: &mut Routes<'_>) {
    r.add(Method::GET, "/api/v1/t/{tenant}/workers", list_workers);
}

/// What a worker offers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Capacity {
    /// CPUs offered to tasks that declare `resources.cpu`.
    pub cpu: f64,
    /// Memory offered to tasks that declare `resources.memory`, in bytes.
    pub memory_bytes: i64,
    /// Tasks it executes at once.
    pub slots: i32,
}

/// What a worker is using, as of its last heartbeat.
#[derive(Debug, Serialize, ToSchema)]
pub struct Load {
    /// Tasks executing.
    pub running: i32,
    /// CPUs reserved by the tasks executing.
    pub cpu: f64,
    /// Memory reserved by the tasks executing, in bytes.
    pub memory_bytes: i64,
}

/// A registered worker.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerView {
    /// Name, unique among live workers.
    pub name: String,
    /// `shared` (run by the operator for every tenant) or `tenant` (this tenant's own).
    pub owner: &'static str,
    /// Labels; a task with `runs_on` runs only on a worker that has all of them. A tenant's own
    /// workers have `self-hosted`.
    pub labels: Vec<String>,
    /// `worker` (a `sluice worker` process) or `serve` (the worker inside `sluice serve`).
    pub mode: String,
    /// Sluice version of the worker.
    pub version: String,
    /// What it offers.
    pub capacity: Capacity,
    /// What it uses.
    pub load: Load,
    /// When it (last) started under this name.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat (every third of the lease).
    pub last_heartbeat_at: DateTime<Utc>,
    /// When it shut down cleanly, if it did.
    pub stopped_at: Option<DateTime<Utc>>,
    /// `alive` (heartbeat within the lease), `lost` (silent for longer: its tasks are given to
    /// other workers) or `stopped`.
    pub status: &'static str,
}

#[derive(sea_orm::FromQueryResult)]
struct Row {
    name: String,
    tenant_id: Option<Uuid>,
    labels: String,
    mode: String,
    version: String,
    cpu_millis: i64,
    memory_bytes: i64,
    slots: i32,
    running: i32,
    cpu_used_millis: i64,
    memory_used_bytes: i64,
    started_at: DateTime<Utc>,
    last_heartbeat_at: DateTime<Utc>,
    stopped_at: Option<DateTime<Utc>>,
}

/// A worker's status at `now` (database clock), given the lease.
pub fn status(
    last_heartbeat_at: DateTime<Utc>,
    stopped_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    lease: chrono::Duration,
) -> &'static str {
    if stopped_at.is_some() {
        "stopped"
    } else if last_heartbeat_at + lease >= now {
        "alive"
    } else {
        "lost"
    }
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/workers", tag = "workers", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")),
    responses((status = 200, description = "shared workers and the tenant's own, by name; stopped and lost ones are kept for a day", body = Vec<WorkerView>),
              (status = 401, description = "not authenticated"),
              (status = 403, description = "not permitted"),
              (status = 404, description = "no such tenant")))]
async fn list_workers(state: State, ctx: TenantCtx) -> ApiResult<web::Json<Vec<WorkerView>>> {
    authorize(&state, &ctx, Action::WorkerList, Resource::Tenant).await?;
    let store = &state.store;
    let rows: Vec<Row> = store
        .query_all(
            store.db(),
            "SELECT name, tenant_id, labels, mode, version, cpu_millis, memory_bytes, slots, running, cpu_used_millis, \
             memory_used_bytes, started_at, last_heartbeat_at, stopped_at FROM workers \
             WHERE tenant_id IS NULL OR tenant_id = $1 ORDER BY name",
            vec![ctx.tenant.id.into()],
        )
        .await?;
    let now = state.engine.db_now(store.db()).await?;
    let lease =
        chrono::Duration::from_std(state.engine.timings().lease).unwrap_or_else(|_| chrono::Duration::seconds(15));
    let views = rows
        .into_iter()
        .map(|r| WorkerView {
            status: status(r.last_heartbeat_at, r.stopped_at, now, lease),
            owner: if r.tenant_id.is_some() { "tenant" } else { "shared" },
            labels: serde_json::from_str(&r.labels).unwrap_or_default(),
            capacity: Capacity { cpu: r.cpu_millis as f64 / 1000.0, memory_bytes: r.memory_bytes, slots: r.slots },
            load: Load {
                running: r.running,
                cpu: r.cpu_used_millis as f64 / 1000.0,
                memory_bytes: r.memory_used_bytes,
            },
            name: r.name,
            mode: r.mode,
            version: r.version,
            started_at: r.started_at,
            last_heartbeat_at: r.last_heartbeat_at,
            stopped_at: r.stopped_at,
        })
        .collect();
    Ok(web::Json(views))
}
