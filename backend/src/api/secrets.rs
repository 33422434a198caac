//! Tenant secrets: write-only values, encrypted at rest (see `crate::secrets`). The API shows
//! names and metadata, never a value; only a running task that lists a secret receives it.

use actix_web::{HttpResponse, http::Method, web};
use chrono::{DateTime, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use sluice_domain::cedar::Action;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Body, Routes, State, audit_change, authorize};
use crate::{
    auth::TenantCtx,
    authz::Resource,
    error::{ApiError, ApiResult, OrNotFound},
    store::is_unique_violation,
};

/// Largest secret value, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

pub(super) fn routes(r: &mut Routes<'_>) {
    r.add(Method::GET, "/api/v1/t/{tenant}/secrets", list_secrets);
    r.add(Method::PUT, "/api/v1/t/{tenant}/secrets/{name}", put_secret);
    r.add(Method::GET, "/api/v1/t/{tenant}/secrets/{name}", get_secret);
    r.add(Method::DELETE, "/api/v1/t/{tenant}/secrets/{name}", delete_secret);
}

/// Whether `name` is a valid secret name: `^[A-Za-z_][A-Za-z0-9_]{0,63}$`.
pub fn is_valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

/// A secret's metadata (never its value).
#[derive(Debug, Serialize, ToSchema, sea_orm::FromQueryResult)]
pub struct SecretView {
    /// Name, as used in `{{ secrets.NAME }}` and a task's `secrets:` list.
    pub name: String,
    /// Version, from 1; each write of a new value adds one.
    pub version: i64,
    /// Email of the member who first created it.
    pub created_by: String,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Value last written.
    pub updated_at: DateTime<Utc>,
}

const SELECT: &str = "SELECT s.name, s.version, u.email AS created_by, s.created_at, s.updated_at \
                      FROM secrets s JOIN users u ON u.id = s.created_by WHERE s.tenant_id = $1";

async fn load(state: &State, tenant: Uuid, name: &str) -> ApiResult<SecretView> {
    if !is_valid_name(name) {
        return Err(ApiError::NotFound("secret"));
    }
    state
        .store
        .query_one(state.store.db(), &format!("{SELECT} AND s.name = $2"), vec![tenant.into(), name.into()])
        .await?
        .or_not_found("secret")
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/secrets", tag = "secrets", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")),
    responses((status = 200, description = "the tenant's secrets by name, without values", body = Vec<SecretView>),
              (status = 403, description = "not permitted")))]
async fn list_secrets(state: State, ctx: TenantCtx) -> ApiResult<web::Json<Vec<SecretView>>> {
    authorize(&state, &ctx, Action::SecretList, Resource::Tenant).await?;
    let rows = state
        .store
        .query_all(state.store.db(), &format!("{SELECT} ORDER BY s.name"), vec![ctx.tenant.id.into()])
        .await?;
    Ok(web::Json(rows))
}

/// A secret's new value.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PutSecret {
    /// The value, 1 to 65,536 bytes of UTF-8 without NUL characters. Never shown again.
    pub value: String,
}

#[utoipa::path(put, path = "/api/v1/t/{tenant}/secrets/{name}", tag = "secrets", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"),
           ("name" = String, Path, description = "secret name, ^[A-Za-z_][A-Za-z0-9_]{0,63}$")),
    request_body = PutSecret,
    responses((status = 201, description = "created (version 1)", body = SecretView),
              (status = 200, description = "value replaced (version + 1)", body = SecretView),
              (status = 403, description = "not permitted"), (status = 409, description = "written concurrently; retry"),
              (status = 422, description = "invalid name or value", body = crate::error::Problem)))]
async fn put_secret(
    state: State,
    ctx: TenantCtx,
    path: web::Path<(String, String)>,
    body: Body,
) -> ApiResult<HttpResponse> {
    #[derive(sea_orm::FromQueryResult)]
    struct Current {
        version: i64,
        created_by: String,
        created_at: DateTime<Utc>,
    }
    let name = path.1.as_str();
    // Checked first: the name becomes a Cedar entity id and an audit resource id.
    if !is_valid_name(name) {
        return Err(ApiError::invalid("name", "must match ^[A-Za-z_][A-Za-z0-9_]{0,63}$"));
    }
    let decision = authorize(&state, &ctx, Action::SecretWrite, Resource::Secret { name }).await?;
    let body: PutSecret = body.json()?;
    if body.value.is_empty() || body.value.len() > MAX_VALUE_BYTES {
        return Err(ApiError::invalid("value", format!("must be 1 to {MAX_VALUE_BYTES} bytes")));
    }
    if body.value.contains('\0') {
        return Err(ApiError::invalid("value", "must not contain NUL characters"));
    }
    let store = &state.store;
    let tenant = ctx.tenant.id;
    let txn = store.write().await?;
    let current: Option<Current> = store
        .query_one(
            &*txn,
            &format!(
                "SELECT s.version, u.email AS created_by, s.created_at FROM secrets s JOIN users u ON u.id = s.created_by \
                 WHERE s.tenant_id = $1 AND s.name = $2{}",
                store.for_update()
            ),
            vec![tenant.into(), name.into()],
        )
        .await?;
    let now = Utc::now().trunc_subsecs(6); // as stored (PostgreSQL keeps microseconds)
    let version = current.as_ref().map_or(1, |c| c.version + 1);
    let sealed = state.secrets_key.seal(tenant, name, version, &body.value)?;
    let concurrent = || ApiError::conflict(format!("secret {name} was written concurrently; retry"));
    let view = match current {
        Some(c) => {
            let n = store
                .execute(
                    &*txn,
                    "UPDATE secrets SET version = $3, nonce = $4, ciphertext = $5, updated_at = $6 \
                     WHERE tenant_id = $1 AND name = $2 AND version = $7",
                    vec![
                        tenant.into(),
                        name.into(),
                        version.into(),
                        sealed.nonce.into(),
                        sealed.ciphertext.into(),
                        now.into(),
                        c.version.into(),
                    ],
                )
                .await?;
            if n != 1 {
                return Err(concurrent());
            }
            SecretView {
                name: name.to_owned(),
                version,
                created_by: c.created_by,
                created_at: c.created_at,
                updated_at: now,
            }
        }
        None => {
            store
                .execute(
                    &*txn,
                    "INSERT INTO secrets (tenant_id, name, version, nonce, ciphertext, created_by, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $7)",
                    vec![
                        tenant.into(),
                        name.into(),
                        version.into(),
                        sealed.nonce.into(),
                        sealed.ciphertext.into(),
                        ctx.principal.user_id.into(),
                        now.into(),
                    ],
                )
                .await
                .map_err(|e| if is_unique_violation(&e) { concurrent() } else { e.into() })?;
            SecretView {
                name: name.to_owned(),
                version,
                created_by: ctx.principal.email.clone(),
                created_at: now,
                updated_at: now,
            }
        }
    };
    let created = version == 1;
    audit_change(
        &state,
        &*txn,
        &ctx,
        &decision,
        Action::SecretWrite,
        Some(name),
        Some(version),
        serde_json::json!({ "created": created }),
    )
    .await?;
    txn.commit().await?;
    Ok(if created { HttpResponse::Created().json(view) } else { HttpResponse::Ok().json(view) })
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/secrets/{name}", tag = "secrets", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("name" = String, Path, description = "secret name")),
    responses((status = 200, description = "metadata only, never the value", body = SecretView),
              (status = 403, description = "not permitted"), (status = 404, description = "no such secret")))]
async fn get_secret(
    state: State,
    ctx: TenantCtx,
    path: web::Path<(String, String)>,
) -> ApiResult<web::Json<SecretView>> {
    let s = load(&state, ctx.tenant.id, &path.1).await?;
    authorize(&state, &ctx, Action::SecretRead, Resource::Secret { name: &s.name }).await?;
    Ok(web::Json(s))
}

#[utoipa::path(delete, path = "/api/v1/t/{tenant}/secrets/{name}", tag = "secrets", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("name" = String, Path, description = "secret name")),
    responses((status = 204, description = "deleted; tasks that list it fail from now on"),
              (status = 403, description = "not permitted"), (status = 404, description = "no such secret")))]
async fn delete_secret(state: State, ctx: TenantCtx, path: web::Path<(String, String)>) -> ApiResult<HttpResponse> {
    let s = load(&state, ctx.tenant.id, &path.1).await?;
    let decision = authorize(&state, &ctx, Action::SecretDelete, Resource::Secret { name: &s.name }).await?;
    let store = &state.store;
    let txn = store.write().await?;
    #[derive(sea_orm::FromQueryResult)]
    struct Version {
        version: i64,
    }
    let row: Version = store
        .query_one(
            &*txn,
            &format!("SELECT version FROM secrets WHERE tenant_id = $1 AND name = $2{}", store.for_update()),
            vec![ctx.tenant.id.into(), s.name.clone().into()],
        )
        .await?
        .or_not_found("secret")?;
    store
        .execute(
            &*txn,
            "DELETE FROM secrets WHERE tenant_id = $1 AND name = $2",
            vec![ctx.tenant.id.into(), s.name.clone().into()],
        )
        .await?;
    audit_change(
        &state,
        &*txn,
        &ctx,
        &decision,
        Action::SecretDelete,
        Some(&s.name),
        Some(row.version),
        serde_json::json!({}),
    )
    .await?;
    txn.commit().await?;
    Ok(HttpResponse::NoContent().finish())
}
