//! The tenant, its members and its groups.

use actix_web::{HttpResponse, http::Method, web};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sluice_domain::{cedar::Action, ids::NodeId, network::AllowEntry};
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Body, Routes, State, audit_change, authorize};
use crate::{
    auth::{TenantCtx, api_token::sha256_hex, password},
    authz::Resource,
    error::{ApiError, ApiResult, FieldError},
    service::{accounts, settings},
    store::{Store, is_unique_violation},
};

pub(super) fn routes(r: &mut Routes<'_>) {
    r.add(Method::GET, "/api/v1/t/{tenant}", get_tenant);
    r.add(Method::GET, "/api/v1/t/{tenant}/members", list_members);
    r.add(Method::POST, "/api/v1/t/{tenant}/members", add_member);
    r.add(Method::PATCH, "/api/v1/t/{tenant}/members/{user_id}", update_member);
    r.add(Method::DELETE, "/api/v1/t/{tenant}/members/{user_id}", remove_member);
    r.add(Method::GET, "/api/v1/t/{tenant}/groups", list_groups);
    r.add(Method::POST, "/api/v1/t/{tenant}/groups", create_group);
    r.add(Method::GET, "/api/v1/t/{tenant}/settings", get_settings);
    r.add(Method::PATCH, "/api/v1/t/{tenant}/settings", update_settings);
}

/// A tenant.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantView {
    /// Slug.
    pub slug: String,
    /// Name.
    pub name: String,
    /// Current policy version.
    pub policy_version: i64,
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}", tag = "tenant", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")),
    responses((status = 200, body = TenantView), (status = 404, description = "no such tenant, or not a member")))]
async fn get_tenant(state: State, ctx: TenantCtx) -> ApiResult<web::Json<TenantView>> {
    authorize(&state, &ctx, Action::TenantRead, Resource::Tenant).await?;
    let t = &ctx.tenant;
    Ok(web::Json(TenantView { slug: t.slug.clone(), name: t.name.clone(), policy_version: t.policy_version }))
}

/// A member of the tenant.
#[derive(Debug, Serialize, ToSchema)]
pub struct MemberView {
    /// User id.
    pub user_id: Uuid,
    /// Email.
    pub email: String,
    /// Groups in this tenant.
    pub groups: Vec<String>,
    /// When they joined.
    pub joined_at: DateTime<Utc>,
    /// True while an invitation is not yet accepted.
    pub invitation_pending: bool,
}

#[derive(sea_orm::FromQueryResult)]
struct MemberRow {
    user_id: Uuid,
    email: String,
    groups: String,
    created_at: DateTime<Utc>,
    pending: bool,
}

impl From<MemberRow> for MemberView {
    fn from(r: MemberRow) -> Self {
        Self {
            user_id: r.user_id,
            email: r.email,
            groups: serde_json::from_str(&r.groups).unwrap_or_default(),
            joined_at: r.created_at,
            invitation_pending: r.pending,
        }
    }
}

const MEMBER_SELECT: &str = "SELECT m.user_id, u.email, m.groups, m.created_at, \
    (u.password_hash IS NULL) AS pending FROM memberships m JOIN users u ON u.id = m.user_id WHERE m.tenant_id = $1";

#[utoipa::path(get, path = "/api/v1/t/{tenant}/members", tag = "tenant", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")),
    responses((status = 200, body = Vec<MemberView>), (status = 403, description = "not permitted")))]
async fn list_members(state: State, ctx: TenantCtx) -> ApiResult<web::Json<Vec<MemberView>>> {
    authorize(&state, &ctx, Action::MemberList, Resource::Tenant).await?;
    let rows: Vec<MemberRow> = state
        .store
        .query_all(state.store.db(), &format!("{MEMBER_SELECT} ORDER BY u.email"), vec![ctx.tenant.id.into()])
        .await?;
    Ok(web::Json(rows.into_iter().map(MemberView::from).collect()))
}

/// Add a member.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AddMember {
    /// Email of an existing user, or of a new one.
    pub email: String,
    /// Groups of this tenant to put them in.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Initial password for a new user; without it a one-time invitation link is returned.
    pub password: Option<String>,
}

/// The added member.
#[derive(Debug, Serialize, ToSchema)]
pub struct AddedMember {
    /// The member.
    #[serde(flatten)]
    pub member: MemberView,
    /// For a new user without a password: the one-time invitation token (valid 7 days).
    pub invitation_token: Option<String>,
    /// The same as a link to hand to the person.
    pub invitation_url: Option<String>,
}

pub(super) async fn check_groups(store: &Store, tenant: Uuid, groups: &[String]) -> ApiResult<Vec<String>> {
    #[derive(sea_orm::FromQueryResult)]
    struct G {
        name: String,
    }
    let known: Vec<G> =
        store.query_all(store.db(), "SELECT name FROM groups WHERE tenant_id = $1", vec![tenant.into()]).await?;
    let mut out: Vec<String> = vec![];
    for (i, g) in groups.iter().enumerate() {
        if !known.iter().any(|k| &k.name == g) {
            return Err(ApiError::invalid(format!("groups[{i}]"), format!("no group named {g:?} in this tenant")));
        }
        if !out.contains(g) {
            out.push(g.clone());
        }
    }
    out.sort();
    Ok(out)
}

#[utoipa::path(post, path = "/api/v1/t/{tenant}/members", tag = "tenant", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")), request_body = AddMember,
    responses((status = 201, body = AddedMember), (status = 403, description = "not permitted"),
              (status = 409, description = "already a member"), (status = 422, body = crate::error::Problem)))]
async fn add_member(state: State, ctx: TenantCtx, body: Body) -> ApiResult<HttpResponse> {
    let decision = authorize(&state, &ctx, Action::MemberAdd, Resource::Tenant).await?;
    let body: AddMember = body.json()?;
    let email = accounts::normalize_email(&body.email).map_err(|m| ApiError::invalid("email", m))?;
    let groups = check_groups(&state.store, ctx.tenant.id, &body.groups).await?;
    let store = &state.store;
    let existing = accounts::find_user(store, store.db(), &email).await?;
    let hash = match (&existing, &body.password) {
        (None, Some(pw)) => {
            password::validate(pw).map_err(|m| ApiError::invalid("password", m))?;
            let pw = pw.clone();
            Some(web::block(move || password::hash(&pw)).await.map_err(anyhow::Error::from)??)
        }
        _ => None,
    };
    let txn = store.write().await?;
    let (user_id, invite) = match existing {
        Some(u) => (u.id, None),
        None => {
            let invite = hash.is_none();
            let id = accounts::create_user(store, &*txn, &email, hash).await.map_err(|e| {
                if is_unique_violation(&e) {
                    ApiError::conflict("this email was just registered; try again")
                } else {
                    e.into()
                }
            })?;
            (id, invite.then(accounts::random_secret))
        }
    };
    if let Err(e) = accounts::add_membership(store, &*txn, ctx.tenant.id, user_id, &groups).await {
        return Err(if is_unique_violation(&e) {
            ApiError::Conflict {
                detail: format!("{email} is already a member"),
                errors: vec![FieldError::new("email", "already a member")],
            }
        } else {
            e.into()
        });
    }
    if let Some(token) = &invite {
        store
            .execute(
                &*txn,
                "INSERT INTO invitations (id, tenant_id, user_id, token_hash, expires_at, used_at, created_at) \
                 VALUES ($1, $2, $3, $4, $5, NULL, $6)",
                vec![
                    Uuid::now_v7().into(),
                    ctx.tenant.id.into(),
                    user_id.into(),
                    sha256_hex(token).into(),
                    (Utc::now() + Duration::days(7)).into(),
                    Utc::now().into(),
                ],
            )
            .await?;
    }
    let uid = user_id.to_string();
    audit_change(
        &state,
        &*txn,
        &ctx,
        &decision,
        Action::MemberAdd,
        Some(&uid),
        None,
        serde_json::json!({ "email": email, "groups": groups, "invited": invite.is_some() }),
    )
    .await?;
    txn.commit().await?;
    let row: MemberRow = store
        .query_one(
            store.db(),
            &format!("{MEMBER_SELECT} AND m.user_id = $2"),
            vec![ctx.tenant.id.into(), user_id.into()],
        )
        .await?
        .ok_or_else(|| anyhow::anyhow!("member vanished after insert"))?;
    let url = invite.as_ref().map(|t| format!("{}/invite#{t}", state.config.public_url));
    Ok(HttpResponse::Created().json(AddedMember { member: row.into(), invitation_token: invite, invitation_url: url }))
}

/// Change a member's groups.
#[derive(Debug, Deserialize, ToSchema)]
pub struct UpdateMember {
    /// The complete new list of groups.
    pub groups: Vec<String>,
}

async fn admins_left(
    store: &Store,
    conn: &impl sea_orm::ConnectionTrait,
    tenant: Uuid,
    without: Uuid,
) -> ApiResult<bool> {
    #[derive(sea_orm::FromQueryResult)]
    struct G {
        groups: String,
    }
    let rows: Vec<G> = store
        .query_all(
            conn,
            "SELECT groups FROM memberships WHERE tenant_id = $1 AND user_id <> $2",
            vec![tenant.into(), without.into()],
        )
        .await?;
    Ok(rows
        .iter()
        .any(|r| serde_json::from_str::<Vec<String>>(&r.groups).unwrap_or_default().iter().any(|g| g == "admins")))
}

async fn load_member(
    store: &Store,
    conn: &impl sea_orm::ConnectionTrait,
    tenant: Uuid,
    user: Uuid,
) -> ApiResult<MemberRow> {
    let sql = format!("{MEMBER_SELECT} AND m.user_id = $2");
    store.query_one(conn, &sql, vec![tenant.into(), user.into()]).await?.ok_or(ApiError::NotFound("member"))
}

#[utoipa::path(patch, path = "/api/v1/t/{tenant}/members/{user_id}", tag = "tenant", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("user_id" = Uuid, Path, description = "member's user id")),
    request_body = UpdateMember,
    responses((status = 200, body = MemberView), (status = 404, description = "no such member"),
              (status = 409, description = "would leave the tenant without an admin"), (status = 422, body = crate::error::Problem)))]
async fn update_member(
    state: State,
    ctx: TenantCtx,
    path: web::Path<(String, Uuid)>,
    body: Body,
) -> ApiResult<web::Json<MemberView>> {
    let user = path.1;
    let store = &state.store;
    load_member(store, store.db(), ctx.tenant.id, user).await?;
    let decision = authorize(&state, &ctx, Action::MemberUpdate, Resource::Tenant).await?;
    let body: UpdateMember = body.json()?;
    let groups = check_groups(store, ctx.tenant.id, &body.groups).await?;
    let txn = store.write().await?;
    if !groups.iter().any(|g| g == "admins") && !admins_left(store, &*txn, ctx.tenant.id, user).await? {
        return Err(ApiError::conflict("the tenant would have no admin left"));
    }
    store
        .execute(
            &*txn,
            "UPDATE memberships SET groups = $3 WHERE tenant_id = $1 AND user_id = $2",
            vec![ctx.tenant.id.into(), user.into(), serde_json::to_string(&groups).unwrap_or_default().into()],
        )
        .await?;
    let uid = user.to_string();
    audit_change(
        &state,
        &*txn,
        &ctx,
        &decision,
        Action::MemberUpdate,
        Some(&uid),
        None,
        serde_json::json!({ "groups": groups }),
    )
    .await?;
    let row = load_member(store, &*txn, ctx.tenant.id, user).await?;
    txn.commit().await?;
    Ok(web::Json(row.into()))
}

#[utoipa::path(delete, path = "/api/v1/t/{tenant}/members/{user_id}", tag = "tenant", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug"), ("user_id" = Uuid, Path, description = "member's user id")),
    responses((status = 204, description = "removed; their API tokens of this tenant stop working"), (status = 404, description = "no such member"),
              (status = 409, description = "would leave the tenant without an admin")))]
async fn remove_member(state: State, ctx: TenantCtx, path: web::Path<(String, Uuid)>) -> ApiResult<HttpResponse> {
    let user = path.1;
    let store = &state.store;
    load_member(store, store.db(), ctx.tenant.id, user).await?;
    let decision = authorize(&state, &ctx, Action::MemberRemove, Resource::Tenant).await?;
    let txn = store.write().await?;
    if !admins_left(store, &*txn, ctx.tenant.id, user).await? {
        return Err(ApiError::conflict("the tenant would have no admin left"));
    }
    store
        .execute(
            &*txn,
            "DELETE FROM memberships WHERE tenant_id = $1 AND user_id = $2",
            vec![ctx.tenant.id.into(), user.into()],
        )
        .await?;
    store
        .execute(
            &*txn,
            "UPDATE api_tokens SET revoked_at = $3 WHERE tenant_id = $1 AND created_by = $2 AND revoked_at IS NULL",
            vec![ctx.tenant.id.into(), user.into(), Utc::now().into()],
        )
        .await?;
    let uid = user.to_string();
    audit_change(&state, &*txn, &ctx, &decision, Action::MemberRemove, Some(&uid), None, serde_json::json!({})).await?;
    txn.commit().await?;
    Ok(HttpResponse::NoContent().finish())
}

/// A group.
#[derive(Debug, Serialize, ToSchema, sea_orm::FromQueryResult)]
pub struct GroupView {
    /// Name (Cedar `Group::"<name>"`).
    pub name: String,
    /// Description.
    pub description: String,
    /// When it was created.
    pub created_at: DateTime<Utc>,
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/groups", tag = "tenant", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")),
    responses((status = 200, body = Vec<GroupView>), (status = 403, description = "not permitted")))]
async fn list_groups(state: State, ctx: TenantCtx) -> ApiResult<web::Json<Vec<GroupView>>> {
    authorize(&state, &ctx, Action::GroupList, Resource::Tenant).await?;
    let rows = state
        .store
        .query_all(
            state.store.db(),
            "SELECT name, description, created_at FROM groups WHERE tenant_id = $1 ORDER BY name",
            vec![ctx.tenant.id.into()],
        )
        .await?;
    Ok(web::Json(rows))
}

/// Create a group.
#[derive(Debug, Deserialize, ToSchema)]
pub struct CreateGroup {
    /// Name: 1-63 of `a-z`, `0-9`, `_`, `-`, starting with a letter or digit.
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
}

#[utoipa::path(post, path = "/api/v1/t/{tenant}/groups", tag = "tenant", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")), request_body = CreateGroup,
    responses((status = 201, body = GroupView), (status = 403, description = "not permitted"), (status = 409, description = "exists"),
              (status = 422, body = crate::error::Problem)))]
async fn create_group(state: State, ctx: TenantCtx, body: Body) -> ApiResult<HttpResponse> {
    let decision = authorize(&state, &ctx, Action::GroupCreate, Resource::Tenant).await?;
    let body: CreateGroup = body.json()?;
    NodeId::parse(&body.name).map_err(|e| ApiError::invalid("name", e.to_string()))?;
    if body.description.chars().count() > 500 {
        return Err(ApiError::invalid("description", "must be at most 500 characters"));
    }
    let store = &state.store;
    let txn = store.write().await?;
    let now = Utc::now();
    if let Err(e) = store
        .execute(
            &*txn,
            "INSERT INTO groups (tenant_id, name, description, created_at) VALUES ($1, $2, $3, $4)",
            vec![ctx.tenant.id.into(), body.name.clone().into(), body.description.clone().into(), now.into()],
        )
        .await
    {
        return Err(if is_unique_violation(&e) {
            ApiError::Conflict {
                detail: format!("group {} exists", body.name),
                errors: vec![FieldError::new("name", "already exists")],
            }
        } else {
            e.into()
        });
    }
    audit_change(
        &state,
        &*txn,
        &ctx,
        &decision,
        Action::GroupCreate,
        Some(&body.name),
        None,
        serde_json::json!({ "description": body.description }),
    )
    .await?;
    txn.commit().await?;
    Ok(HttpResponse::Created().json(GroupView {
        name: body.name.clone(),
        description: body.description.clone(),
        created_at: now,
    }))
}

/// The tenant's settings.
#[derive(Debug, Serialize, ToSchema)]
pub struct SettingsView {
    /// What the tenant's `http:` tasks may reach beyond public addresses: networks (canonical
    /// CIDRs), whose every address is reachable although private, loopback or link-local, and
    /// host names (lower-case; `*.` for every name under a domain), which reach the private
    /// networks (10/8, 172.16/12, 192.168/16, 100.64/10, fc00::/7) they resolve to, never
    /// loopback or link-local. Empty: public addresses only.
    pub http_allow: Vec<String>,
}

/// A change of the tenant's settings; fields left out stay as they are.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSettings {
    /// The complete new HTTP allow-list, at most 64 entries: IP addresses or CIDRs (`127.0.0.1`,
    /// `10.0.0.0/8`, `fd00::/8`), and host names (`build.corp.example`, `*.corp.example`), which
    /// open only the private networks they resolve to (see the settings' `http_allow`).
    pub http_allow: Option<Vec<String>>,
}

#[utoipa::path(get, path = "/api/v1/t/{tenant}/settings", tag = "tenant", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")),
    responses((status = 200, body = SettingsView), (status = 403, description = "not permitted"),
              (status = 404, description = "no such tenant, or not a member")))]
async fn get_settings(state: State, ctx: TenantCtx) -> ApiResult<web::Json<SettingsView>> {
    authorize(&state, &ctx, Action::TenantRead, Resource::Tenant).await?;
    let store = &state.store;
    let http_allow =
        settings::http_allow(store, store.db(), ctx.tenant.id).await?.ok_or(ApiError::NotFound("tenant"))?;
    Ok(web::Json(SettingsView { http_allow }))
}

#[utoipa::path(patch, path = "/api/v1/t/{tenant}/settings", tag = "tenant", security(("bearer" = [])),
    params(("tenant" = String, Path, description = "tenant slug")), request_body = UpdateSettings,
    responses((status = 200, body = SettingsView), (status = 403, description = "not permitted"),
              (status = 404, description = "no such tenant, or not a member"), (status = 422, body = crate::error::Problem)))]
async fn update_settings(state: State, ctx: TenantCtx, body: Body) -> ApiResult<web::Json<SettingsView>> {
    let decision = authorize(&state, &ctx, Action::TenantUpdate, Resource::Tenant).await?;
    let body: UpdateSettings = body.json()?;
    let networks = body.http_allow.as_deref().map(AllowEntry::parse_list).transpose().map_err(|(i, e)| {
        ApiError::invalid(i.map_or("http_allow".into(), |i| format!("http_allow[{i}]")), e.to_string())
    })?;
    let store = &state.store;
    let txn = store.write().await?;
    let before = settings::http_allow(store, &*txn, ctx.tenant.id).await?.ok_or(ApiError::NotFound("tenant"))?;
    let Some(networks) = networks else {
        return Ok(web::Json(SettingsView { http_allow: before }));
    };
    let after = settings::set_http_allow(store, &*txn, ctx.tenant.id, &networks).await?;
    audit_change(
        &state,
        &*txn,
        &ctx,
        &decision,
        Action::TenantUpdate,
        None,
        None,
        serde_json::json!({ "http_allow": { "from": before, "to": after } }),
    )
    .await?;
    txn.commit().await?;
    Ok(web::Json(SettingsView { http_allow: after }))
}
