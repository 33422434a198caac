//! Reading, verifying and exporting the tenant's audit log.

use actix_web::{HttpResponse, http::Method, web};
use chrono::{DateTime, Utc};
use futures_util::stream;
use sea_orm::Value;
use serde::{Deserialize, Serialize};
use sluice_domain::cedar::Action;
use utoipa::{IntoParams, ToSchema};

use super::{PageParams, Routes, State, authorize, encode_cursor};
use crate::{
    audit::{self, AuditEvent, Verification},
    auth::TenantCtx,
    authz::Resource,
    error::{ApiError, ApiResult},
    store::entities::audit_event,
};

pub(super) fn routes(r: &mut Routes<'_>) {
    r.add(Method::GET, "/api/v1/t/{tenant}/audit", list_events);
    r.add(Method::GET, "/api/v1/t/{tenant}/audit/verify", verify);
    r.add(Method::GET, "/api/v1/t/{tenant}/audit/export", export);
}

/// Filters for the audit log.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// Actor id (user or token id) or exact label (email).
    pub actor: Option<String>,
    /// Action, e.g. `pipeline.update`.
    pub action: Option<String>,
    /// Resource type, e.g. `Pipeline`.
    pub resource_type: Option<String>,
    /// Resource id, e.g. a pipeline name.
    pub resource_id: Option<String>,
    /// `allow`, `deny` or `error`.
    pub outcome: Option<String>,
    /// Events at or after this time (RFC 3339).
    pub since: Option<DateTime<Utc>>,
    /// Events before this time (RFC 3339).
    pub until: Option<DateTime<Utc>>,
    /// Cursor from `next_cursor`.
    pub cursor: Option<String>,
    /// Page size 1..=200 (default 50).
    pub limit: Option<u64>,
}

/// A page of events, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Events.
    pub items: Vec<AuditEvent>,
    /// Cursor of the next (older) page.
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/audit", tag = "audit", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), AuditQuery),
    responses((status = 200, body = AuditPage), (status = 403, description = "not permitted"), (status = 422, body = crate::error::Problem)))]
async fn list_events(state: State, ctx: TenantCtx, q: web::Query<AuditQuery>) -> ApiResult<web::Json<AuditPage>> {
    authorize(&state, &ctx, Action::AuditRead, Resource::Tenant).await?;
    let page = PageParams { cursor: q.cursor.clone(), limit: q.limit };
    let limit = page.limit()?;
    let before = match page.cursor()? {
        Some(c) => c.parse::<i64>().map_err(|_| ApiError::invalid("cursor", "not a cursor from this API"))?,
        None => i64::MAX,
    };
    if let Some(o) = &q.outcome
        && !["allow", "deny", "error"].contains(&o.as_str())
    {
        return Err(ApiError::invalid("outcome", "must be allow, deny or error"));
    }
    let mut sql = String::from("SELECT * FROM audit_events WHERE tenant_id = $1 AND seq < $2");
    let mut values: Vec<Value> = vec![ctx.tenant.id.into(), before.into()];
    fn push(sql: &mut String, values: &mut Vec<Value>, cond: &str, v: Value) {
        values.push(v);
        sql.push_str(&cond.replace("{}", &format!("${}", values.len())));
    }
    if let Some(a) = &q.actor {
        values.push(a.clone().into());
        let n = values.len();
        sql.push_str(&format!(" AND (actor_id = ${n} OR actor_label = ${n})"));
    }
    let filters: [(&str, Option<Value>); 6] = [
        (" AND action = {}", q.action.clone().map(Value::from)),
        (" AND resource_type = {}", q.resource_type.clone().map(Value::from)),
        (" AND resource_id = {}", q.resource_id.clone().map(Value::from)),
        (" AND outcome = {}", q.outcome.clone().map(Value::from)),
        (" AND occurred_at >= {}", q.since.map(Value::from)),
        (" AND occurred_at < {}", q.until.map(Value::from)),
    ];
    for (cond, v) in filters {
        if let Some(v) = v {
            push(&mut sql, &mut values, cond, v);
        }
    }
    values.push((limit as i64 + 1).into());
    sql.push_str(&format!(" ORDER BY seq DESC LIMIT ${}", values.len()));
    let mut rows: Vec<audit_event::Model> = state.store.query_all(state.store.db(), &sql, values).await?;
    let next_cursor = if rows.len() as u64 > limit {
        rows.truncate(limit as usize);
        rows.last().map(|e| encode_cursor(&e.seq.to_string()))
    } else {
        None
    };
    Ok(web::Json(AuditPage { items: rows.into_iter().map(AuditEvent::from).collect(), next_cursor }))
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/audit/verify", tag = "audit", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")),
    responses((status = 200, body = Verification), (status = 403, description = "not permitted")))]
async fn verify(state: State, ctx: TenantCtx) -> ApiResult<web::Json<Verification>> {
    authorize(&state, &ctx, Action::AuditRead, Resource::Tenant).await?;
    Ok(web::Json(audit::verify(&state.store, state.store.db(), ctx.tenant.id).await?))
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/audit/export", tag = "audit", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")),
    responses((status = 200, description = "every event, oldest first, one JSON object per line", content_type = "application/x-ndjson"),
              (status = 403, description = "not permitted")))]
async fn export(state: State, ctx: TenantCtx) -> ApiResult<HttpResponse> {
    authorize(&state, &ctx, Action::AuditExport, Resource::Tenant).await?;
    let tenant = ctx.tenant.id;
    let body = stream::try_unfold((state, 0_i64, false), move |(state, after, done)| async move {
        if done {
            return Ok::<_, ApiError>(None);
        }
        let rows: Vec<audit_event::Model> = state
            .store
            .query_all(
                state.store.db(),
                "SELECT * FROM audit_events WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT 500",
                vec![tenant.into(), after.into()],
            )
            .await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let last = rows.last().map_or(after, |r| r.seq);
        let finished = rows.len() < 500;
        let mut chunk = Vec::new();
        for r in rows {
            serde_json::to_writer(&mut chunk, &AuditEvent::from(r)).map_err(anyhow::Error::from)?;
            chunk.push(b'\n');
        }
        Ok(Some((web::Bytes::from(chunk), (state, last, finished))))
    });
    Ok(HttpResponse::Ok()
        .content_type("application/x-ndjson")
        .insert_header(("Content-Disposition", format!("attachment; filename=\"{}-audit.jsonl\"", ctx.tenant.slug)))
        .streaming(body))
}
