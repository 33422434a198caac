//! The tenant's Cedar policies: immutable, validated versions.

use actix_web::{http::Method, web};
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use sluice_domain::cedar::Action;
use utoipa::ToSchema;

use super::{Body, Routes, State, audit_change, authorize};
use crate::{
    audit::{self, NewEvent, Outcome},
    auth::{TenantCtx, api_token::sha256_hex},
    authz::Resource,
    error::{ApiError, ApiResult, FieldError, OrNotFound},
};

pub(super) fn routes(r: &mut Routes<'_>) {
    r.add(Method::GET, "/api/v1/t/{tenant}/policies", get_policies);
    r.add(Method::PUT, "/api/v1/t/{tenant}/policies", put_policies);
    r.add(Method::GET, "/api/v1/t/{tenant}/policies/versions", list_versions);
    r.add(Method::GET, "/api/v1/t/{tenant}/policies/versions/{version}", get_version);
}

/// A version of the tenant's policy set.
#[derive(Debug, Serialize, ToSchema, sea_orm::FromQueryResult)]
pub struct PolicyVersionView {
    /// Version number, from 1.
    pub version: i64,
    /// The Cedar policy text.
    pub text: String,
    /// Why it was changed.
    pub message: String,
    /// Who changed it.
    pub author: String,
    /// SHA-256 of the text.
    pub sha256: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

const SELECT: &str =
    "SELECT version, text, message, author, sha256, created_at FROM policy_versions WHERE tenant_id = $1";

#[utoipa::path(get, path = "/api/v1/t/{tenant}/policies", tag = "policies", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")),
    responses((status = 200, body = PolicyVersionView), (status = 403, description = "not permitted")))]
async fn get_policies(state: State, ctx: TenantCtx) -> ApiResult<web::Json<PolicyVersionView>> {
    authorize(&state, &ctx, Action::PolicyRead, Resource::Tenant).await?;
    let v = state
        .store
        .query_one(
            state.store.db(),
            &format!("{SELECT} AND version = $2"),
            vec![ctx.tenant.id.into(), ctx.tenant.policy_version.into()],
        )
        .await?
        .or_not_found("policy version")?;
    Ok(web::Json(v))
}

/// A new policy set.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PutPolicies {
    /// The complete Cedar policy text; validated strictly against the Sluice schema.
    pub text: String,
    /// Why, 1-1000 characters.
    pub message: String,
    /// The version this edit started from; when given, a save on another base answers 409
    /// (default: the current version, i.e. last write wins).
    #[serde(default)]
    pub base_version: Option<i64>,
}

#[utoipa::path(put, path = "/api/v1/t/{tenant}/policies", tag = "policies", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")), request_body = PutPolicies,
    responses((status = 200, body = PolicyVersionView), (status = 403, description = "not permitted"),
              (status = 409, description = "changed concurrently; retry"),
              (status = 422, description = "invalid policy: Cedar's message with line and column", body = crate::error::Problem)))]
async fn put_policies(state: State, ctx: TenantCtx, body: Body) -> ApiResult<web::Json<PolicyVersionView>> {
    let decision = authorize(&state, &ctx, Action::PolicyUpdate, Resource::Tenant).await?;
    let body: PutPolicies = body.json()?;
    let message = body.message.trim();
    if message.is_empty() || message.chars().count() > 1000 {
        return Err(ApiError::invalid("message", "must be 1 to 1000 characters"));
    }
    let store = &state.store;
    if let Err(e) = state.authz.validate(&ctx.tenant.slug, &body.text) {
        // The refused attempt is recorded (it may be an escalation attempt), nothing else is.
        let txn = store.write().await?;
        audit::append(
            store,
            &*txn,
            ctx.tenant.id,
            &NewEvent {
                actor: &ctx.principal.actor(),
                action: Action::PolicyUpdate.as_str(),
                resource_type: "Policy",
                resource_id: None,
                resource_version: None,
                outcome: Outcome::Error,
                policy_ids: &decision.determining_policies,
                source: &ctx.source,
                details: serde_json::json!({ "rejected": e.message, "line": e.line, "column": e.column }),
            },
        )
        .await?;
        txn.commit().await?;
        let mut fe = FieldError::new("text", e.message.clone());
        fe.line = e.line;
        fe.column = e.column;
        return Err(ApiError::Validation { detail: format!("invalid policy: {}", e.message), errors: vec![fe] });
    }
    let txn = store.write().await?;
    let base = body.base_version.unwrap_or(ctx.tenant.policy_version);
    let next = base + 1;
    let moved = store
        .execute(
            &*txn,
            "UPDATE tenants SET policy_version = $3 WHERE id = $1 AND policy_version = $2",
            vec![ctx.tenant.id.into(), base.into(), next.into()],
        )
        .await?;
    if moved != 1 {
        return Err(ApiError::conflict("the policies were changed concurrently; reload and retry"));
    }
    let now = Utc::now().trunc_subsecs(6); // as stored (PostgreSQL keeps microseconds)
    let view = PolicyVersionView {
        version: next,
        text: body.text.clone(),
        message: message.to_owned(),
        author: ctx.principal.actor().label,
        sha256: sha256_hex(&body.text),
        created_at: now,
    };
    store
        .execute(&*txn, "INSERT INTO policy_versions (tenant_id, version, text, message, author, sha256, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            vec![ctx.tenant.id.into(), next.into(), view.text.clone().into(), view.message.clone().into(), view.author.clone().into(), view.sha256.clone().into(), now.into()])
        .await?;
    audit_change(
        &state,
        &*txn,
        &ctx,
        &decision,
        Action::PolicyUpdate,
        Some("policies"),
        Some(next),
        serde_json::json!({ "message": message, "sha256": view.sha256, "previous_version": base }),
    )
    .await?;
    txn.commit().await?;
    Ok(web::Json(view))
}

/// A policy version without its text.
#[derive(Debug, Serialize, ToSchema, sea_orm::FromQueryResult)]
pub struct PolicyVersionSummary {
    /// Version.
    pub version: i64,
    /// Message.
    pub message: String,
    /// Author.
    pub author: String,
    /// SHA-256.
    pub sha256: String,
    /// When.
    pub created_at: DateTime<Utc>,
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/policies/versions", tag = "policies", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")),
    responses((status = 200, body = Vec<PolicyVersionSummary>), (status = 403, description = "not permitted")))]
async fn list_versions(state: State, ctx: TenantCtx) -> ApiResult<web::Json<Vec<PolicyVersionSummary>>> {
    authorize(&state, &ctx, Action::PolicyRead, Resource::Tenant).await?;
    let rows = state
        .store
        .query_all(state.store.db(),
            "SELECT version, message, author, sha256, created_at FROM policy_versions WHERE tenant_id = $1 ORDER BY version DESC",
            vec![ctx.tenant.id.into()])
        .await?;
    Ok(web::Json(rows))
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/policies/versions/{version}", tag = "policies", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("version" = i64, Path, description = "version number")),
    responses((status = 200, body = PolicyVersionView), (status = 404, description = "no such version")))]
async fn get_version(
    state: State,
    ctx: TenantCtx,
    path: web::Path<(String, i64)>,
) -> ApiResult<web::Json<PolicyVersionView>> {
    authorize(&state, &ctx, Action::PolicyRead, Resource::Tenant).await?;
    let v = state
        .store
        .query_one(state.store.db(), &format!("{SELECT} AND version = $2"), vec![ctx.tenant.id.into(), path.1.into()])
        .await?
        .or_not_found("policy version")?;
    Ok(web::Json(v))
}
