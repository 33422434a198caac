//! The REST API: the route table, the one authorization path, request limits and the OpenAPI
//! document. Only this module knows HTTP.

mod audit_log;
mod auth;
mod body;
mod events;
mod health;
mod hooks;
pub mod openapi;
mod pipelines;
mod policies;
mod runs;
mod secrets;
mod tenant;
mod tokens;
mod workers;

use actix_web::{
    FromRequest, Handler, HttpRequest, Responder,
    http::Method,
    web::{self, ServiceConfig},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;
use sluice_domain::cedar::Action;
use utoipa::{IntoParams, ToSchema};

use crate::{
    AppState,
    audit::{self, NewEvent, Outcome},
    auth::TenantCtx,
    authz::{self, AuthzRequest, Decision, Resource},
    error::{ApiError, ApiResult},
};

/// Largest accepted request body.
pub const MAX_BODY: usize = 1024 * 1024;

pub use body::Body;

/// Application state as handlers see it.
pub type State = web::Data<AppState>;

/// One registered route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteDef {
    /// HTTP method.
    pub method: Method,
    /// Path template, e.g. `/api/v1/t/{tenant}/pipelines/{pipeline}`.
    pub path: &'static str,
}

/// Registers routes on an actix `ServiceConfig` and records them, so that the route table used
/// by tests and the OpenAPI check is exactly what the server serves.
pub struct Routes<'a> {
    cfg: Option<&'a mut ServiceConfig>,
    list: Vec<RouteDef>,
}

impl Routes<'_> {
    fn add<F, Args>(&mut self, method: Method, path: &'static str, handler: F)
    where
        F: Handler<Args>,
        Args: FromRequest + 'static,
        F::Output: Responder + 'static,
    {
        if let Some(cfg) = self.cfg.as_deref_mut() {
            cfg.route(path, web::method(method.clone()).to(handler));
        }
        self.list.push(RouteDef { method, path });
    }
}

fn register(r: &mut Routes<'_>) {
    health::routes(r);
    auth::routes(r);
    tenant::routes(r);
    tokens::routes(r);
    policies::routes(r);
    pipelines::routes(r);
    runs::routes(r);
    events::routes(r);
    secrets::routes(r);
    hooks::routes(r);
    audit_log::routes(r);
    workers::routes(r);
}

/// Every route the server serves.
pub fn route_table() -> Vec<RouteDef> {
    let mut r = Routes { cfg: None, list: vec![] };
    register(&mut r);
    r.list
}

/// Configures the actix application: body limits, extractor errors, routes.
pub fn configure(cfg: &mut ServiceConfig) {
    cfg.app_data(
        web::QueryConfig::default().error_handler(|err, _req| ApiError::bad_request("query", err.to_string()).into()),
    )
    .app_data(web::PathConfig::default().error_handler(|_err, _req| ApiError::NotFound("resource").into()));
    let mut r = Routes { cfg: Some(cfg), list: vec![] };
    register(&mut r);
    cfg_default(r.cfg);
}

fn cfg_default(cfg: Option<&mut ServiceConfig>) {
    if let Some(cfg) = cfg {
        cfg.default_service(web::to(|| async { Err::<actix_web::HttpResponse, _>(ApiError::NotFound("route")) }));
    }
}

/// The one authorization path: makes sure the tenant's current policy version is compiled, asks
/// Cedar, and on a deny records the refusal in the audit log and answers 403.
pub async fn authorize(
    state: &AppState,
    ctx: &TenantCtx,
    action: Action,
    resource: Resource<'_>,
) -> ApiResult<Decision> {
    let tenant = &ctx.tenant;
    if !state.authz.has_version(tenant.id, tenant.policy_version) {
        let text: Option<String> = state
            .store
            .query_one::<PolicyText>(
                state.store.db(),
                "SELECT text FROM policy_versions WHERE tenant_id = $1 AND version = $2",
                vec![tenant.id.into(), tenant.policy_version.into()],
            )
            .await?
            .map(|p| p.text);
        let text = text.ok_or_else(|| {
            anyhow::anyhow!("policy version {} of tenant {} missing", tenant.policy_version, tenant.id)
        })?;
        state.authz.install(tenant.id, tenant.policy_version, &text).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let p = &ctx.principal;
    let principal = match p.kind {
        crate::auth::PrincipalKind::User => authz::Principal::User { id: p.id, email: &p.email, groups: &p.groups },
        crate::auth::PrincipalKind::ApiToken => authz::Principal::ApiToken {
            id: p.id,
            name: p.token_label.as_ref().map_or("", |(_, n)| n.as_str()),
            owner: p.user_id,
            groups: &p.groups,
        },
    };
    let resource_id = resource_label(&resource);
    let req = AuthzRequest { tenant_slug: &tenant.slug, principal, action, resource, context: None };
    let decision = state.authz.authorize(tenant.id, tenant.policy_version, &req).map_err(|e| anyhow::anyhow!("{e}"))?;
    if decision.allowed {
        return Ok(decision);
    }
    let txn = state.store.write().await?;
    audit::append(
        &state.store,
        &*txn,
        tenant.id,
        &NewEvent {
            actor: &p.actor(),
            action: action.as_str(),
            resource_type: audited_type(action),
            resource_id: resource_id.as_deref(),
            resource_version: None,
            outcome: Outcome::Deny,
            policy_ids: &decision.determining_policies,
            source: &ctx.source,
            details: serde_json::json!({ "policy_version": tenant.policy_version }),
        },
    )
    .await?;
    txn.commit().await?;
    Err(ApiError::Forbidden)
}

fn resource_label(r: &Resource<'_>) -> Option<String> {
    match r {
        Resource::Tenant => None,
        Resource::Pipeline { name, .. } => Some((*name).to_owned()),
        Resource::Run { id, .. } => Some(id.to_string()),
        Resource::Gate { run, id, .. } => Some(format!("{run}/{id}")),
        Resource::Secret { name } => Some((*name).to_owned()),
    }
}

#[derive(sea_orm::FromQueryResult)]
struct PolicyText {
    text: String,
}

/// Records an allowed change in the audit log, inside the change's transaction.
#[allow(clippy::too_many_arguments)]
pub async fn audit_change(
    state: &AppState,
    conn: &impl sea_orm::ConnectionTrait,
    ctx: &TenantCtx,
    decision: &Decision,
    action: Action,
    resource_id: Option<&str>,
    resource_version: Option<i64>,
    details: serde_json::Value,
) -> ApiResult<i64> {
    Ok(audit::append(
        &state.store,
        conn,
        ctx.tenant.id,
        &NewEvent {
            actor: &ctx.principal.actor(),
            action: action.as_str(),
            resource_type: audited_type(action),
            resource_id,
            resource_version,
            outcome: Outcome::Allow,
            policy_ids: &decision.determining_policies,
            source: &ctx.source,
            details,
        },
    )
    .await?)
}

/// The type of the thing an action changes, as recorded in the audit log.
pub fn audited_type(action: Action) -> &'static str {
    match action.as_str().split('.').next().unwrap_or_default() {
        "member" => "Member",
        "group" => "Group",
        "token" => "ApiToken",
        "policy" => "Policy",
        "pipeline" => "Pipeline",
        "run" => "Run",
        "gate" => "Gate",
        "secret" => "Secret",
        "worker" => "Worker",
        _ => action.resource_type(),
    }
}

/// Cursor pagination parameters.
#[derive(Debug, Deserialize, IntoParams, ToSchema)]
#[into_params(parameter_in = Query)]
pub struct PageParams {
    /// Opaque cursor from a previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Page size, 1..=200 (default 50).
    pub limit: Option<u64>,
}

impl PageParams {
    /// The page size, validated.
    pub fn limit(&self) -> ApiResult<u64> {
        match self.limit {
            None => Ok(50),
            Some(n @ 1..=200) => Ok(n),
            Some(_) => Err(ApiError::invalid("limit", "must be between 1 and 200")),
        }
    }

    /// The decoded cursor.
    pub fn cursor(&self) -> ApiResult<Option<String>> {
        self.cursor
            .as_deref()
            .map(|c| {
                URL_SAFE_NO_PAD
                    .decode(c)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| ApiError::invalid("cursor", "not a cursor from this API"))
            })
            .transpose()
    }
}

/// Encodes a cursor.
pub fn encode_cursor(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

/// The client-visible source of a request outside a tenant context.
pub fn source(state: &AppState, req: &HttpRequest) -> audit::Source {
    crate::auth::source_of(req, state.config.trust_proxy)
}
