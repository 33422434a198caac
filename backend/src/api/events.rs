//! Live events as server-sent events: one run's, or every run's of the tenant.

use std::time::Duration;

use actix_web::{HttpResponse, http::Method, web};
use futures_util::stream;
use sluice_domain::{cedar::Action, plan::RunStatus};
use tokio::sync::broadcast::{self, error::RecvError};
use uuid::Uuid;

use super::{Routes, State, authorize};
use crate::{
    auth::TenantCtx,
    authz::Resource,
    engine::RunEvent,
    error::{ApiResult, OrNotFound},
};

pub(super) fn routes(r: &mut Routes<'_>) {
    r.add(Method::GET, "/api/v1/t/{tenant}/runs/{run_id}/events", run_events);
    r.add(Method::GET, "/api/v1/t/{tenant}/events", tenant_events);
}

/// How often an idle stream sends a comment so proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

fn frame(name: &str, data: &str) -> web::Bytes {
    web::Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// Turns the engine's broadcast into an SSE body: events that pass `keep`, a keep-alive comment
/// when idle, a `lagged` event when events may have been missed (this client fell behind:
/// `{"reason": "slow_client", "missed": n}`; or the relay between server processes was
/// interrupted: `{"reason": "relay_interrupted"}`), after which the client should re-read what
/// it shows, and the end of the stream after `stop` says so.
fn sse(
    first: Option<web::Bytes>,
    rx: broadcast::Receiver<RunEvent>,
    keep: impl Fn(&RunEvent) -> bool + 'static,
    stop: impl Fn(&RunEvent) -> bool + 'static,
) -> HttpResponse {
    let filters = std::rc::Rc::new((keep, stop));
    let body = stream::unfold((first, rx, false), move |(first, mut rx, done)| {
        let filters = filters.clone();
        async move {
            let (keep, stop) = (&filters.0, &filters.1);
            if let Some(f) = first {
                return Some((Ok::<_, actix_web::Error>(f), (None, rx, false)));
            }
            if done {
                return None;
            }
            loop {
                match tokio::time::timeout(KEEP_ALIVE, rx.recv()).await {
                    Err(_) => return Some((Ok(web::Bytes::from_static(b": keep-alive\n\n")), (None, rx, false))),
                    Ok(Ok(e)) if e.kind == "gap" => {
                        return Some((Ok(frame("lagged", r#"{"reason":"relay_interrupted"}"#)), (None, rx, false)));
                    }
                    Ok(Ok(e)) if keep(&e) => {
                        let data = serde_json::to_string(&e).unwrap_or_default();
                        let end = stop(&e);
                        return Some((Ok(frame(e.kind, &data)), (None, rx, end)));
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(RecvError::Lagged(n))) => {
                        let data = format!(r#"{{"reason":"slow_client","missed":{n}}}"#);
                        return Some((Ok(frame("lagged", &data)), (None, rx, false)));
                    }
                    Ok(Err(RecvError::Closed)) => return None,
                }
            }
        }
    });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body)
}

#[derive(sea_orm::FromQueryResult)]
struct RunRow {
    pipeline_name: String,
    initiator_id: Option<Uuid>,
    status: String,
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/runs/{run_id}/events", tag = "runs", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("run_id" = Uuid, Path, description = "run id")),
    responses((status = 200, description = "server-sent events: first `snapshot` (the run's status), then `run`, `stage`, `task` and `log` events until the run ends; a `lagged` event says events may have been missed (re-read the run)", content_type = "text/event-stream"),
              (status = 403, description = "not permitted"), (status = 404, description = "no such run")))]
async fn run_events(state: State, ctx: TenantCtx, path: web::Path<(String, Uuid)>) -> ApiResult<HttpResponse> {
    let id = path.1;
    // Subscribe before reading the snapshot, so nothing falls between the two.
    let rx = state.engine.subscribe();
    let r: RunRow = state
        .store
        .query_one(
            state.store.db(),
            "SELECT pipeline_name, initiator_id, status FROM runs WHERE tenant_id = $1 AND id = $2",
            vec![ctx.tenant.id.into(), id.into()],
        )
        .await?
        .or_not_found("run")?;
    authorize(
        &state,
        &ctx,
        Action::RunRead,
        Resource::Run { pipeline: &r.pipeline_name, id, initiator: r.initiator_id },
    )
    .await?;
    let finished = r.status.parse::<RunStatus>().is_ok_and(RunStatus::is_terminal);
    let snapshot = frame("snapshot", &serde_json::json!({ "run_id": id, "status": r.status }).to_string());
    if finished {
        return Ok(HttpResponse::Ok().content_type("text/event-stream").body(snapshot));
    }
    let stop = move |e: &RunEvent| {
        e.kind == "run" && e.status.and_then(|s| s.parse::<RunStatus>().ok()).is_some_and(RunStatus::is_terminal)
    };
    Ok(sse(Some(snapshot), rx, move |e| e.run_id == id, stop))
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/events", tag = "runs", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")),
    responses((status = 200, description = "server-sent events of every run of the tenant: `run`, `stage`, `task` and `log` events; a `lagged` event says events may have been missed (re-read the runs)", content_type = "text/event-stream"),
              (status = 403, description = "not permitted"), (status = 404, description = "no such tenant")))]
async fn tenant_events(state: State, ctx: TenantCtx) -> ApiResult<HttpResponse> {
    authorize(&state, &ctx, Action::RunList, Resource::Tenant).await?;
    let tenant = ctx.tenant.id;
    let rx = state.engine.subscribe();
    Ok(sse(None, rx, move |e| e.tenant == tenant, |_| false))
}
