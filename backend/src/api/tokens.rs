//! API tokens of a tenant.

use actix_web::{HttpResponse, http::Method, web};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sluice_domain::cedar::Action;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Body, Routes, State, audit_change, authorize};
use crate::{
    auth::{TenantCtx, api_token},
    authz::Resource,
    error::{ApiError, ApiResult, FieldError},
};

pub(super) fn routes(r: &mut Routes<'_>) {
    r.add(Method::GET, "/api/v1/t/{tenant}/tokens", list_tokens);
    r.add(Method::POST, "/api/v1/t/{tenant}/tokens", create_token);
    r.add(Method::DELETE, "/api/v1/t/{tenant}/tokens/{token_id}", revoke_token);
}

/// An API token as listed (never the secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenView {
    /// Id.
    pub id: Uuid,
    /// The first characters of the token, to recognise it.
    pub prefix: String,
    /// Name.
    pub name: String,
    /// Email of the member who created it (its owner).
    pub created_by: String,
    /// Groups it acts with (never more than its owner has at the time of use).
    pub groups: Vec<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last used (updated at most once a minute).
    pub last_used_at: Option<DateTime<Utc>>,
    /// Expiry.
    pub expires_at: DateTime<Utc>,
    /// Revoked.
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(sea_orm::FromQueryResult)]
struct TokenRow {
    id: Uuid,
    prefix: String,
    name: String,
    email: String,
    groups: String,
    created_at: DateTime<Utc>,
    last_used_at: Option<DateTime<Utc>>,
    expires_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
}

impl From<TokenRow> for TokenView {
    fn from(r: TokenRow) -> Self {
        Self {
            id: r.id,
            prefix: r.prefix,
            name: r.name,
            created_by: r.email,
            groups: serde_json::from_str(&r.groups).unwrap_or_default(),
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            expires_at: r.expires_at,
            revoked_at: r.revoked_at,
        }
    }
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/tokens", tag = "tokens", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")),
    responses((status = 200, body = Vec<TokenView>), (status = 403, description = "not permitted")))]
async fn list_tokens(state: State, ctx: TenantCtx) -> ApiResult<web::Json<Vec<TokenView>>> {
    authorize(&state, &ctx, Action::TokenList, Resource::Tenant).await?;
    let rows: Vec<TokenRow> = state
        .store
        .query_all(
            state.store.db(),
            "SELECT k.id, k.prefix, k.name, u.email, k.groups, k.created_at, k.last_used_at, k.expires_at, k.revoked_at \
             FROM api_tokens k JOIN users u ON u.id = k.created_by WHERE k.tenant_id = $1 ORDER BY k.created_at DESC",
            vec![ctx.tenant.id.into()],
        )
        .await?;
    Ok(web::Json(rows.into_iter().map(TokenView::from).collect()))
}

/// Create an API token.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateToken {
    /// What it is for, 1-100 characters.
    pub name: String,
    /// Expiry (RFC 3339), mandatory, in the future and within the configured maximum lifetime.
    pub expires_at: DateTime<Utc>,
    /// Groups it acts with: groups of the tenant; a non-admin creator may only give their own groups.
    pub groups: Vec<String>,
}

/// A created token: the only time the secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// The token: use as `Authorization: Bearer <token>`. Not shown again.
    pub token: String,
    /// The listing view.
    #[serde(flatten)]
    pub view: TokenView,
}

#[utoipa::path(post, path = "/api/v1/t/{tenant}/tokens", tag = "tokens", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")), request_body = CreateToken,
    responses((status = 201, body = CreatedToken), (status = 403, description = "not permitted"), (status = 422, body = crate::error::Problem)))]
async fn create_token(state: State, ctx: TenantCtx, body: Body) -> ApiResult<HttpResponse> {
    let decision = authorize(&state, &ctx, Action::TokenCreate, Resource::Tenant).await?;
    // Parsed after authorization: a caller who may not create tokens learns nothing from the body.
    let body: CreateToken = body.json()?;
    let name = body.name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::invalid("name", "must be 1 to 100 characters"));
    }
    let now = Utc::now();
    let max = now + Duration::days(i64::from(state.config.token_max_days));
    if body.expires_at <= now {
        return Err(ApiError::invalid("expires_at", "must be in the future"));
    }
    if body.expires_at > max {
        return Err(ApiError::invalid(
            "expires_at",
            format!("must be at most {} days ahead", state.config.token_max_days),
        ));
    }
    let groups = super::tenant::check_groups(&state.store, ctx.tenant.id, &body.groups).await?;
    let is_admin = ctx.principal.groups.iter().any(|g| g == "admins");
    // The index names the group as sent (`groups` is sorted and deduplicated).
    for (i, g) in body.groups.iter().enumerate() {
        if !is_admin && !ctx.principal.groups.contains(g) {
            return Err(ApiError::Validation {
                detail: format!("you are not in group {g:?}; a token cannot have more rights than its creator"),
                errors: vec![FieldError::new(format!("groups[{i}]"), "not one of your groups")],
            });
        }
    }
    let token = api_token::generate();
    let prefix: String = token.chars().take(api_token::DISPLAY_PREFIX_LEN).collect();
    let id = Uuid::now_v7();
    let store = &state.store;
    let txn = store.write().await?;
    store
        .execute(
            &*txn,
            "INSERT INTO api_tokens (id, tenant_id, name, prefix, token_hash, created_by, groups, created_at, expires_at, last_used_at, revoked_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, NULL, NULL)",
            vec![
                id.into(),
                ctx.tenant.id.into(),
                name.into(),
                prefix.clone().into(),
                api_token::sha256_hex(&token).into(),
                ctx.principal.user_id.into(),
                serde_json::to_string(&groups).unwrap_or_default().into(),
                now.into(),
                body.expires_at.into(),
            ],
        )
        .await?;
    let tid = id.to_string();
    audit_change(
        &state,
        &*txn,
        &ctx,
        &decision,
        Action::TokenCreate,
        Some(&tid),
        None,
        serde_json::json!({ "name": name, "prefix": prefix, "groups": groups, "expires_at": body.expires_at }),
    )
    .await?;
    txn.commit().await?;
    let view = TokenView {
        id,
        prefix,
        name: name.to_owned(),
        created_by: ctx.principal.email.clone(),
        groups,
        created_at: now,
        last_used_at: None,
        expires_at: body.expires_at,
        revoked_at: None,
    };
    Ok(HttpResponse::Created().json(CreatedToken { token, view }))
}

#[utoipa::path(delete, path = "/api/v1/t/{tenant}/tokens/{token_id}", tag = "tokens", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("token_id" = Uuid, Path, description = "token id")),
    responses((status = 204, description = "revoked; rejected from the next request on"), (status = 404, description = "no such token")))]
async fn revoke_token(state: State, ctx: TenantCtx, path: web::Path<(String, Uuid)>) -> ApiResult<HttpResponse> {
    #[derive(sea_orm::FromQueryResult)]
    struct Row {
        revoked_at: Option<DateTime<Utc>>,
    }
    let id = path.1;
    let store = &state.store;
    let row: Row = store
        .query_one(
            store.db(),
            "SELECT revoked_at FROM api_tokens WHERE tenant_id = $1 AND id = $2",
            vec![ctx.tenant.id.into(), id.into()],
        )
        .await?
        .ok_or(ApiError::NotFound("token"))?;
    let decision = authorize(&state, &ctx, Action::TokenRevoke, Resource::Tenant).await?;
    if row.revoked_at.is_some() {
        return Ok(HttpResponse::NoContent().finish());
    }
    let txn = store.write().await?;
    let n = store
        .execute(
            &*txn,
            "UPDATE api_tokens SET revoked_at = $3 WHERE tenant_id = $1 AND id = $2 AND revoked_at IS NULL",
            vec![ctx.tenant.id.into(), id.into(), Utc::now().into()],
        )
        .await?;
    if n == 1 {
        let tid = id.to_string();
        audit_change(&state, &*txn, &ctx, &decision, Action::TokenRevoke, Some(&tid), None, serde_json::json!({}))
            .await?;
    }
    txn.commit().await?;
    Ok(HttpResponse::NoContent().finish())
}
