//! Webhook triggers: configuring a pipeline's signing secret (a tenant route, authorized as a
//! pipeline update) and the public endpoint that senders call, authenticated by signature only.

use actix_web::{
    HttpRequest, HttpResponse, ResponseError,
    http::{Method, header::WWW_AUTHENTICATE},
    web,
};
use serde::{Deserialize, Serialize};
use sluice_domain::cedar::Action;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Body, Routes, State, authorize};
use crate::{
    audit::{self, Actor, NewEvent, Outcome},
    auth::TenantCtx,
    authz::{Decision, Resource},
    error::{ApiError, ApiResult},
    service::runs,
    triggers::webhook::{self, Refusal},
};

/// Unix seconds when the call was signed.
pub const TIMESTAMP_HEADER: &str = "x-sluice-timestamp";
/// `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<raw body>")>`.
pub const SIGNATURE_HEADER: &str = "x-sluice-signature";
/// The sender's id of a delivery: a repeated id returns the run the first one started.
pub const DELIVERY_HEADER: &str = "x-sluice-delivery";
const MAX_DELIVERY_LEN: usize = 100;

pub(super) fn routes(r: &mut Routes<'_>) {
    r.add(Method::POST, "/api/v1/t/{tenant}/pipelines/{pipeline}/webhook", put_webhook);
    r.add(Method::DELETE, "/api/v1/t/{tenant}/pipelines/{pipeline}/webhook", delete_webhook);
    r.add(Method::POST, "/api/v1/hooks/{tenant}/{pipeline}", receive);
}

/// A pipeline's webhook: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookCreated {
    /// Where senders `POST`.
    pub url: String,
    /// The HMAC-SHA256 key. Sign `"<X-Sluice-Timestamp>.<raw body>"` with it and send
    /// `X-Sluice-Signature: sha256=<hex>`. Not shown again; rotating replaces it at once.
    pub secret: String,
    /// Whether an earlier secret was replaced (and so stopped working).
    pub rotated: bool,
}

#[allow(clippy::too_many_arguments)]
async fn audit_webhook(
    state: &State,
    conn: &impl sea_orm::ConnectionTrait,
    ctx: &TenantCtx,
    decision: &Decision,
    action: &str,
    pipeline: &str,
    details: serde_json::Value,
) -> ApiResult<i64> {
    Ok(audit::append(
        &state.store,
        conn,
        ctx.tenant.id,
        &NewEvent {
            actor: &ctx.principal.actor(),
            action,
            resource_type: "Pipeline",
            resource_id: Some(pipeline),
            resource_version: None,
            outcome: Outcome::Allow,
            policy_ids: &decision.determining_policies,
            source: &ctx.source,
            details,
        },
    )
    .await?)
}

#[utoipa::path(post, path = "/api/v1/t/{tenant}/pipelines/{pipeline}/webhook", tag = "webhooks", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("pipeline" = String, Path, description = "pipeline name")),
    responses((status = 201, description = "webhook created; the secret is shown this once", body = WebhookCreated),
              (status = 200, description = "secret rotated: the old one no longer works; the new one is shown this once", body = WebhookCreated),
              (status = 403, description = "not permitted (needs pipeline update)"), (status = 404, description = "no such pipeline"),
              (status = 409, description = "the pipeline is archived")))]
async fn put_webhook(state: State, ctx: TenantCtx, path: web::Path<(String, String)>) -> ApiResult<HttpResponse> {
    let p = runs::find_pipeline(&state, ctx.tenant.id, &path.1).await?;
    let decision =
        authorize(&state, &ctx, Action::PipelineUpdate, Resource::Pipeline { name: &p.name, archived: false }).await?;
    // Only after the check: who may not change the pipeline does not learn it is archived.
    if p.archived_at.is_some() {
        return Err(ApiError::conflict("the pipeline is archived"));
    }
    let secret = webhook::generate_secret();
    let txn = state.store.write().await?;
    let rotated = webhook::put_secret(&state.store, &*txn, ctx.tenant.id, p.id, &secret, ctx.principal.user_id).await?;
    let action = if rotated { "webhook.rotate" } else { "webhook.create" };
    // The secret itself is never recorded.
    audit_webhook(&state, &*txn, &ctx, &decision, action, &p.name, serde_json::json!({ "pipeline": p.name })).await?;
    txn.commit().await?;
    let url = format!("{}/api/v1/hooks/{}/{}", state.config.public_url.trim_end_matches('/'), ctx.tenant.slug, p.name);
    let body = WebhookCreated { url, secret, rotated };
    Ok(if rotated { HttpResponse::Ok().json(body) } else { HttpResponse::Created().json(body) })
}

#[utoipa::path(delete, path = "/api/v1/t/{tenant}/pipelines/{pipeline}/webhook", tag = "webhooks", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("pipeline" = String, Path, description = "pipeline name")),
    responses((status = 204, description = "removed; calls are refused from now on"), (status = 403, description = "not permitted (needs pipeline update)"),
              (status = 404, description = "no such pipeline, or it has no webhook")))]
async fn delete_webhook(state: State, ctx: TenantCtx, path: web::Path<(String, String)>) -> ApiResult<HttpResponse> {
    let p = runs::find_pipeline(&state, ctx.tenant.id, &path.1).await?;
    let decision = authorize(
        &state,
        &ctx,
        Action::PipelineUpdate,
        Resource::Pipeline { name: &p.name, archived: p.archived_at.is_some() },
    )
    .await?;
    let txn = state.store.write().await?;
    if !webhook::delete(&state.store, &*txn, ctx.tenant.id, p.id).await? {
        return Err(ApiError::NotFound("webhook"));
    }
    audit_webhook(&state, &*txn, &ctx, &decision, "webhook.delete", &p.name, serde_json::json!({ "pipeline": p.name }))
        .await?;
    txn.commit().await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The body of a webhook call (any other fields are ignored; the body may be empty).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct WebhookCall {
    /// Values of the pipeline's `params`, checked against their declared types.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// A run started (or found, for a repeated delivery).
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookAccepted {
    /// The run.
    pub run_id: Uuid,
}

fn header<'a>(req: &'a HttpRequest, name: &str) -> Option<&'a str> {
    // A header that is not visible ASCII counts as absent (and so is refused).
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// The answer to every refused call, whatever the reason: nothing tells a missing tenant or
/// pipeline from a wrong signature.
fn unauthorized() -> HttpResponse {
    let mut resp = ApiError::Unauthorized.error_response();
    resp.headers_mut().insert(WWW_AUTHENTICATE, actix_web::http::header::HeaderValue::from_static("Sluice-Signature"));
    resp
}

#[utoipa::path(post, path = "/api/v1/hooks/{tenant}/{pipeline}", tag = "webhooks",
    params(("tenant" = String, Path, description = "tenant slug"), ("pipeline" = String, Path, description = "pipeline name"),
           ("X-Sluice-Timestamp" = String, Header, description = "unix seconds when the call was signed; at most 5 minutes away from the server's clock"),
           ("X-Sluice-Signature" = String, Header, description = "`sha256=` and the hex HMAC-SHA256, keyed with the webhook secret, of `<X-Sluice-Timestamp>.<raw body>`"),
           ("X-Sluice-Delivery" = Option<String>, Header, description = "the sender's delivery id (1 to 100 visible ASCII characters), signed with the call (`<unix time>.<delivery id>.<body>`): a repeated id returns the run of the first")),
    request_body(content = WebhookCall, description = "optional; `params` for the run"),
    responses((status = 202, description = "the run started (or, for a repeated delivery, the run started before)", body = WebhookAccepted),
              (status = 400, description = "not a JSON object, or a bad delivery id", body = crate::error::Problem),
              (status = 401, description = "missing, stale or wrong signature, or no such webhook (not told apart); audited as `webhook.refused`, at most 20 a minute per tenant and server process, the others counted in the next recorded event (`unrecorded_before`) or in one event with their `count` once the minute is over", body = crate::error::Problem),
              (status = 409, description = "the pipeline is archived", body = crate::error::Problem),
              (status = 413, description = "body over 1 MiB", body = crate::error::Problem),
              (status = 422, description = "invalid params", body = crate::error::Problem)))]
async fn receive(
    state: State,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    body: Body,
) -> ApiResult<HttpResponse> {
    let (tenant_slug, name) = path.into_inner();
    let source = super::source(&state, &req);
    // No tenant: no chain to record the refusal in.
    let Some(tenant) = webhook::tenant_id(&state, &tenant_slug).await? else { return Ok(unauthorized()) };
    let (pipeline, checked) = match webhook::target(&state, tenant, &name).await? {
        None => (None, Err(Refusal::UnknownPipeline)),
        Some(webhook::Target { secret: None, .. }) => (None, Err(Refusal::NotConfigured)),
        Some(webhook::Target { pipeline, secret: Some(secret) }) => {
            let checked = webhook::verify(
                &secret,
                header(&req, TIMESTAMP_HEADER),
                // Signed as sent: an id that is not visible ASCII is refused below, once the
                // caller is known to be the sender.
                req.headers().get(DELIVERY_HEADER).map(|v| v.as_bytes()),
                header(&req, SIGNATURE_HEADER),
                body.bytes(),
                chrono::Utc::now().timestamp(),
            );
            (Some(pipeline), checked)
        }
    };
    let pipeline = match (checked, pipeline) {
        (Ok(()), Some(p)) => p,
        (Err(reason), _) => return refuse(&state, tenant, &name, reason, &source).await,
        (Ok(()), None) => return Ok(unauthorized()),
    };
    // Authenticated from here on: errors may say what is wrong.
    let delivery = match req.headers().get(DELIVERY_HEADER) {
        None => None,
        Some(v) => {
            let v = v
                .to_str()
                .ok()
                .filter(|v| (1..=MAX_DELIVERY_LEN).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic()));
            Some(v.ok_or_else(|| {
                ApiError::bad_request("X-Sluice-Delivery", "must be 1 to 100 visible ASCII characters")
            })?)
        }
    };
    let call: WebhookCall = if body.bytes().iter().all(u8::is_ascii_whitespace) {
        WebhookCall::default()
    } else {
        serde_json::from_slice(body.bytes())
            .map_err(|e| ApiError::bad_request("body", format!("must be a JSON object with optional `params`: {e}")))?
    };
    // A repeated delivery returns the first run (the id is signed, so a captured call cannot be
    // replayed under a new one). Without a delivery id, the signature itself is the key: a
    // captured call replayed within the timestamp window starts nothing new.
    let key = match delivery {
        Some(d) => format!("webhook:{}:{d}", pipeline.id),
        None => {
            let sig = header(&req, SIGNATURE_HEADER).unwrap_or_default().to_ascii_lowercase();
            format!("webhook-sig:{}:{}", pipeline.id, sig.trim_start_matches("sha256="))
        }
    };
    let actor = Actor { kind: "system", id: None, label: "webhook".into() };
    let started = runs::start_run(
        &state,
        runs::StartRun {
            tenant,
            pipeline: &pipeline,
            version: None,
            params: &call.params,
            trigger: "webhook",
            initiator: None,
            actor: &actor,
            source: &source,
            policy_ids: &[],
            idempotency_key: Some(&key),
            retry: None,
        },
    )
    .await?;
    Ok(HttpResponse::Accepted().json(WebhookAccepted { run_id: started.id }))
}

/// Records a refused call in the tenant's audit log (at most
/// [`webhook::REFUSALS_RECORDED_PER_MINUTE`] a minute per tenant: the calls are unauthenticated;
/// the next event recorded counts those that were not) and answers 401.
async fn refuse(
    state: &State,
    tenant: Uuid,
    pipeline: &str,
    reason: Refusal,
    source: &audit::Source,
) -> ApiResult<HttpResponse> {
    let Some(unrecorded) = state.webhook_refusals.admit(tenant, std::time::Instant::now()) else {
        return Ok(unauthorized());
    };
    let mut details = serde_json::json!({ "reason": reason.as_str() });
    if unrecorded > 0 {
        details["unrecorded_before"] = unrecorded.into();
    }
    // A failure to record is logged and counted, and the answer stays the same 401.
    if let Err(e) = webhook::record_refused(state, tenant, Some(pipeline), source, details).await {
        tracing::error!(error = %e, "recording a refused webhook call failed");
        state.webhook_refusals.unrecorded(tenant, unrecorded + 1);
    }
    Ok(unauthorized())
}
