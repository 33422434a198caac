//! Signup, login, refresh, logout, the caller's identity, invitations and the JWKS.

use actix_web::{
    HttpRequest, HttpResponse,
    cookie::{Cookie, SameSite, time::Duration as CookieDuration},
    http::Method,
    web,
};
use chrono::Utc;
use serde::{Deserialize, Serialize};
use sluice_domain::ids::Slug;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{Body, Routes, State};
use crate::{
    audit::{self, Actor, NewEvent, Outcome, Source},
    auth::{Authn, PrincipalKind, api_token::sha256_hex, password, throttle},
    error::{ApiError, ApiResult, FieldError},
    service::accounts::{self, RefreshRow},
    store::is_unique_violation,
};

pub(super) fn routes(r: &mut Routes<'_>) {
    r.add(Method::POST, "/api/v1/signup", signup);
    r.add(Method::POST, "/api/v1/auth/login", login);
    r.add(Method::POST, "/api/v1/auth/refresh", refresh);
    r.add(Method::POST, "/api/v1/auth/logout", logout);
    r.add(Method::GET, "/api/v1/me", me);
    r.add(Method::POST, "/api/v1/invitations/accept", accept_invitation);
    r.add(Method::GET, "/.well-known/jwks.json", jwks);
}

const REFRESH_COOKIE: &str = "sluice_refresh";

/// Create a tenant and its first admin.
#[derive(Debug, Deserialize, ToSchema)]
pub struct SignupRequest {
    /// URL name of the new tenant: 2-63 of `a-z`, `0-9`, `-`, starting with a letter or digit.
    pub tenant_slug: String,
    /// Display name of the tenant.
    pub tenant_name: String,
    /// Email of the first admin (an existing account must give its password).
    pub email: String,
    /// Password, 8 to 128 characters.
    pub password: String,
}

/// The created tenant.
#[derive(Debug, Serialize, ToSchema)]
pub struct SignupResponse {
    /// Tenant slug.
    pub tenant: String,
    /// Tenant name.
    pub tenant_name: String,
    /// The admin's user id.
    pub user_id: Uuid,
    /// The admin's email.
    pub email: String,
}

fn validate_signup(b: &SignupRequest) -> ApiResult<(String, String, String)> {
    let mut errors = vec![];
    if let Err(e) = Slug::parse(&b.tenant_slug) {
        errors.push(FieldError::new("tenant_slug", e.to_string()));
    }
    let name = b.tenant_name.trim();
    if name.is_empty() || name.chars().count() > 200 {
        errors.push(FieldError::new("tenant_name", "must be 1 to 200 characters"));
    }
    let email = accounts::normalize_email(&b.email).map_err(|m| errors.push(FieldError::new("email", m))).ok();
    if let Err(m) = password::validate(&b.password) {
        errors.push(FieldError::new("password", m));
    }
    match (errors.is_empty(), email) {
        (true, Some(email)) => Ok((b.tenant_slug.clone(), name.to_owned(), email)),
        _ => Err(ApiError::Validation { detail: "the signup request is invalid".into(), errors }),
    }
}

#[utoipa::path(post, path = "/api/v1/signup", tag = "auth", request_body = SignupRequest,
    responses((status = 201, body = SignupResponse), (status = 403, description = "signup disabled"),
              (status = 409, description = "slug taken or email registered with another password"),
              (status = 422, body = crate::error::Problem)))]
async fn signup(state: State, req: HttpRequest, body: Body) -> ApiResult<HttpResponse> {
    let body: SignupRequest = body.json()?;
    if !state.config.signup_enabled {
        return Err(ApiError::Forbidden);
    }
    let (slug, name, email) = validate_signup(&body)?;
    let store = &state.store;
    let existing = accounts::find_user(store, store.db(), &email).await?;
    let hash = match &existing {
        Some(u) => {
            let (pw, stored) = (body.password.clone(), u.password_hash.clone());
            let ok = web::block(move || password::verify(&pw, stored.as_deref())).await.map_err(anyhow::Error::from)?;
            if !ok || u.disabled {
                return Err(ApiError::Conflict {
                    detail: "an account with this email exists; sign up with its password".into(),
                    errors: vec![FieldError::new("email", "already registered")],
                });
            }
            None
        }
        None => {
            let pw = body.password.clone();
            Some(web::block(move || password::hash(&pw)).await.map_err(anyhow::Error::from)??)
        }
    };
    let src = super::source(&state, &req);
    let txn = store.write().await?;
    let user_id = match (&existing, hash) {
        (Some(u), _) => u.id,
        (None, h) => match accounts::create_user(store, &*txn, &email, h).await {
            Ok(id) => id,
            Err(e) if is_unique_violation(&e) => {
                return Err(ApiError::conflict("an account with this email was just created"));
            }
            Err(e) => return Err(e.into()),
        },
    };
    let tenant_id =
        match accounts::create_tenant(store, &*txn, &slug, &name, state.authz.default_policy_text(), &email).await {
            Ok(id) => id,
            Err(e) if is_unique_violation(&e) => {
                return Err(ApiError::Conflict {
                    detail: format!("tenant {slug} already exists"),
                    errors: vec![FieldError::new("tenant_slug", "already taken")],
                });
            }
            Err(e) => return Err(e.into()),
        };
    accounts::add_membership(store, &*txn, tenant_id, user_id, &["admins".to_owned()]).await?;
    audit::append(
        store,
        &*txn,
        tenant_id,
        &NewEvent {
            actor: &Actor { kind: "user", id: Some(user_id.to_string()), label: email.clone() },
            action: "tenant.create",
            resource_type: "Tenant",
            resource_id: Some(&slug),
            resource_version: None,
            outcome: Outcome::Allow,
            policy_ids: &[],
            source: &src,
            details: serde_json::json!({ "name": name, "admin": email, "policy_version": 1 }),
        },
    )
    .await?;
    txn.commit().await?;
    Ok(HttpResponse::Created().json(SignupResponse { tenant: slug, tenant_name: name, user_id, email }))
}

/// Email and password.
#[derive(Debug, Deserialize, ToSchema)]
pub struct LoginRequest {
    /// Email.
    pub email: String,
    /// Password.
    pub password: String,
}

/// A new access token and refresh token.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    /// Short-lived access JWT for `Authorization: Bearer`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: i64,
    /// Opaque, rotating refresh token (also set as an HttpOnly cookie).
    pub refresh_token: String,
    /// The user.
    pub user_id: Uuid,
}

fn refresh_cookie(state: &State, value: &str, max_age_days: i64) -> Cookie<'static> {
    Cookie::build(REFRESH_COOKIE, value.to_owned())
        .path("/api/v1/auth")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(state.config.public_url.starts_with("https://"))
        .max_age(CookieDuration::days(max_age_days))
        .finish()
}

/// Records an authentication event (`auth.login`, `auth.logout`, `auth.refresh_reuse`) in every
/// tenant of the user, or in the platform chain when there is no known user or tenant, inside
/// the caller's transaction.
#[allow(clippy::too_many_arguments)]
async fn audit_auth(
    state: &State,
    conn: &impl sea_orm::ConnectionTrait,
    action: &str,
    user: Option<(Uuid, &str)>,
    email: &str,
    outcome: Outcome,
    src: &Source,
    reason: &str,
) -> ApiResult<()> {
    #[derive(sea_orm::FromQueryResult)]
    struct T {
        tenant_id: Uuid,
    }
    let mut tenants = vec![];
    if let Some((id, _)) = user {
        let rows: Vec<T> = state
            .store
            .query_all(conn, "SELECT tenant_id FROM memberships WHERE user_id = $1", vec![id.into()])
            .await?;
        tenants = rows.into_iter().map(|r| r.tenant_id).collect();
    }
    if tenants.is_empty() {
        tenants.push(audit::PLATFORM);
    }
    let actor = match user {
        Some((id, e)) => Actor { kind: "user", id: Some(id.to_string()), label: e.to_owned() },
        None => Actor { kind: "anonymous", id: None, label: email.chars().take(320).collect() },
    };
    let resource_id = user.map(|(id, _)| id.to_string());
    for t in tenants {
        audit::append(
            &state.store,
            conn,
            t,
            &NewEvent {
                actor: &actor,
                action,
                resource_type: "User",
                resource_id: resource_id.as_deref(),
                resource_version: None,
                outcome,
                policy_ids: &[],
                source: src,
                details: serde_json::json!({ "reason": reason }),
            },
        )
        .await?;
    }
    Ok(())
}

/// Records a login attempt in its own transaction.
async fn audit_login(
    state: &State,
    user: Option<(Uuid, &str)>,
    email: &str,
    outcome: Outcome,
    src: &Source,
    reason: &str,
) -> ApiResult<()> {
    let txn = state.store.write().await?;
    audit_auth(state, &*txn, "auth.login", user, email, outcome, src, reason).await?;
    txn.commit().await?;
    Ok(())
}

#[utoipa::path(post, path = "/api/v1/auth/login", tag = "auth", request_body = LoginRequest,
    responses((status = 200, body = TokenResponse), (status = 401, description = "invalid email or password"),
              (status = 429, description = "too many failed attempts")))]
async fn login(state: State, req: HttpRequest, body: Body) -> ApiResult<HttpResponse> {
    let body: LoginRequest = body.json()?;
    let src = super::source(&state, &req);
    let email = body.email.trim().to_lowercase();
    let keys = [
        (throttle::account_key(&email), throttle::ACCOUNT_THRESHOLD),
        (throttle::ip_key(src.ip.as_deref().unwrap_or("unknown")), throttle::IP_THRESHOLD),
    ];
    let store = &state.store;
    // Checks the blocks and counts this attempt in one step, so a burst of concurrent attempts
    // cannot all get past the check before the first failure is recorded.
    if let throttle::Attempt::Blocked(secs) = throttle::begin(store, &keys).await? {
        audit_login(&state, None, &email, Outcome::Deny, &src, "throttled").await?;
        return Err(ApiError::TooManyRequests(secs));
    }
    let user = accounts::find_user(store, store.db(), &email).await?;
    let (pw, stored) = (body.password.clone(), user.as_ref().and_then(|u| u.password_hash.clone()));
    let ok = web::block(move || password::verify(&pw, stored.as_deref())).await.map_err(anyhow::Error::from)?;
    let user = match user {
        Some(u) if ok && !u.disabled => u,
        other => {
            throttle::failed(store, &keys).await?;
            let known = other.as_ref().map(|u| (u.id, u.email.as_str()));
            audit_login(&state, known, &email, Outcome::Deny, &src, "invalid credentials").await?;
            return Err(ApiError::InvalidLogin);
        }
    };
    throttle::succeeded(store, &keys[0].0, &keys[1..]).await?;
    let txn = store.write().await?;
    let (session, refresh) = accounts::create_session(store, &*txn, user.id).await?;
    txn.commit().await?;
    audit_login(&state, Some((user.id, &user.email)), &email, Outcome::Allow, &src, "password").await?;
    let (access, exp) = state.jwt.issue(user.id, session)?;
    Ok(HttpResponse::Ok().cookie(refresh_cookie(&state, &refresh, accounts::SESSION_DAYS)).json(TokenResponse {
        access_token: access,
        token_type: "Bearer",
        expires_in: exp - Utc::now().timestamp(),
        refresh_token: refresh,
        user_id: user.id,
    }))
}

/// A refresh token (or none, to use the cookie).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct RefreshRequest {
    /// The refresh token; when absent, the `sluice_refresh` cookie is used.
    pub refresh_token: Option<String>,
}

#[utoipa::path(post, path = "/api/v1/auth/refresh", tag = "auth", request_body = RefreshRequest,
    responses((status = 200, body = TokenResponse), (status = 401, description = "unknown, used or revoked refresh token")))]
async fn refresh(state: State, req: HttpRequest, body: Body) -> ApiResult<HttpResponse> {
    let parsed: RefreshRequest = body.json_or_default()?;
    let token = parsed
        .refresh_token
        .or_else(|| req.cookie(REFRESH_COOKIE).map(|c| c.value().to_owned()))
        .ok_or(ApiError::Unauthorized)?;
    let store = &state.store;
    let txn = store.write().await?;
    let sql = format!(
        "SELECT r.session_id, r.used_at, s.user_id, s.expires_at, s.revoked_at, u.disabled, u.email FROM refresh_tokens r \
         JOIN sessions s ON s.id = r.session_id JOIN users u ON u.id = s.user_id WHERE r.token_hash = $1{}",
        store.for_update()
    );
    let row: RefreshRow =
        store.query_one(&*txn, &sql, vec![sha256_hex(&token).into()]).await?.ok_or(ApiError::Unauthorized)?;
    if row.used_at.is_some() {
        // A rotated token came back: it was stolen or replayed. End the whole session.
        tracing::warn!(session = %row.session_id, "refresh token reuse; revoking the session");
        accounts::revoke_session(store, &*txn, row.session_id).await?;
        let src = super::source(&state, &req);
        audit_auth(
            &state,
            &*txn,
            "auth.refresh_reuse",
            Some((row.user_id, &row.email)),
            &row.email,
            Outcome::Deny,
            &src,
            "a rotated refresh token was presented again; the session was ended",
        )
        .await?;
        txn.commit().await?;
        return Err(ApiError::Unauthorized);
    }
    if row.revoked_at.is_some() || row.disabled || row.expires_at <= Utc::now() {
        return Err(ApiError::Unauthorized);
    }
    let used = store
        .execute(
            &*txn,
            "UPDATE refresh_tokens SET used_at = $2 WHERE token_hash = $1 AND used_at IS NULL",
            vec![sha256_hex(&token).into(), Utc::now().into()],
        )
        .await?;
    if used != 1 {
        return Err(ApiError::Unauthorized);
    }
    let next = accounts::new_refresh_token(store, &*txn, row.session_id).await?;
    txn.commit().await?;
    let (access, exp) = state.jwt.issue(row.user_id, row.session_id)?;
    Ok(HttpResponse::Ok().cookie(refresh_cookie(&state, &next, accounts::SESSION_DAYS)).json(TokenResponse {
        access_token: access,
        token_type: "Bearer",
        expires_in: exp - Utc::now().timestamp(),
        refresh_token: next,
        user_id: row.user_id,
    }))
}

#[utoipa::path(post, path = "/api/v1/auth/logout", tag = "auth", security(("bearer" = [])),
    responses((status = 204, description = "the session is ended: its access and refresh tokens stop working"),
              (status = 401, description = "not logged in")))]
async fn logout(state: State, authn: Authn) -> ApiResult<HttpResponse> {
    let p = &authn.principal;
    let session = p.session_id.ok_or_else(|| {
        ApiError::bad_request("authorization", "API tokens have no session; revoke the token instead")
    })?;
    let txn = state.store.write().await?;
    accounts::revoke_session(&state.store, &*txn, session).await?;
    audit_auth(
        &state,
        &*txn,
        "auth.logout",
        Some((p.user_id, &p.email)),
        &p.email,
        Outcome::Allow,
        &authn.source,
        "logout",
    )
    .await?;
    txn.commit().await?;
    Ok(HttpResponse::NoContent().cookie(refresh_cookie(&state, "", 0)).finish())
}

/// One tenant the caller belongs to.
#[derive(Debug, Serialize, ToSchema)]
pub struct MembershipView {
    /// Tenant slug.
    pub tenant: String,
    /// Tenant name.
    pub tenant_name: String,
    /// Groups in that tenant.
    pub groups: Vec<String>,
}

/// The caller.
#[derive(Debug, Serialize, ToSchema)]
pub struct MeResponse {
    /// User id (for a token: its owner).
    pub user_id: Uuid,
    /// Email.
    pub email: String,
    /// `user` or `token`.
    pub principal: &'static str,
    /// For a token: its id.
    pub token_id: Option<Uuid>,
    /// Tenants the caller can act in.
    pub memberships: Vec<MembershipView>,
}

#[utoipa::path(get, path = "/api/v1/me", tag = "auth", security(("bearer" = [])),
    responses((status = 200, body = MeResponse), (status = 401, description = "not authenticated")))]
async fn me(state: State, authn: Authn) -> ApiResult<web::Json<MeResponse>> {
    #[derive(sea_orm::FromQueryResult)]
    struct Row {
        tenant_id: Uuid,
        slug: String,
        name: String,
        groups: String,
    }
    let p = &authn.principal;
    let rows: Vec<Row> = state
        .store
        .query_all(
            state.store.db(),
            "SELECT t.id AS tenant_id, t.slug, t.name, m.groups FROM memberships m JOIN tenants t ON t.id = m.tenant_id \
             WHERE m.user_id = $1 ORDER BY t.slug",
            vec![p.user_id.into()],
        )
        .await?;
    let memberships = rows
        .into_iter()
        .filter(|r| authn.token_tenant.is_none_or(|t| t == r.tenant_id))
        .map(|r| MembershipView {
            tenant: r.slug,
            tenant_name: r.name,
            groups: serde_json::from_str(&r.groups).unwrap_or_default(),
        })
        .collect::<Vec<_>>();
    let is_token = p.kind == PrincipalKind::ApiToken;
    // A token acts with its own groups, not its owner's.
    let memberships = if is_token {
        memberships.into_iter().map(|m| MembershipView { groups: p.groups.clone(), ..m }).collect()
    } else {
        memberships
    };
    Ok(web::Json(MeResponse {
        user_id: p.user_id,
        email: p.email.clone(),
        principal: if is_token { "token" } else { "user" },
        token_id: is_token.then_some(p.id),
        memberships,
    }))
}

/// Accept an invitation by choosing a password.
#[derive(Debug, Deserialize, ToSchema)]
pub struct AcceptInvitation {
    /// The invitation token from the invitation link.
    pub token: String,
    /// The new password, 8 to 128 characters.
    pub password: String,
}

/// The account that accepted.
#[derive(Debug, Serialize, ToSchema)]
pub struct AcceptedInvitation {
    /// Email to log in with.
    pub email: String,
}

#[utoipa::path(post, path = "/api/v1/invitations/accept", tag = "auth", request_body = AcceptInvitation,
    responses((status = 200, body = AcceptedInvitation), (status = 404, description = "unknown, used or expired invitation"),
              (status = 422, body = crate::error::Problem)))]
async fn accept_invitation(state: State, req: HttpRequest, body: Body) -> ApiResult<web::Json<AcceptedInvitation>> {
    let body: AcceptInvitation = body.json()?;
    #[derive(sea_orm::FromQueryResult)]
    struct Inv {
        id: Uuid,
        tenant_id: Uuid,
        user_id: Uuid,
        email: String,
    }
    password::validate(&body.password).map_err(|m| ApiError::invalid("password", m))?;
    let pw = body.password.clone();
    let hash = web::block(move || password::hash(&pw)).await.map_err(anyhow::Error::from)??;
    let store = &state.store;
    let txn = store.write().await?;
    let sql = format!(
        "SELECT i.id, i.tenant_id, i.user_id, u.email FROM invitations i JOIN users u ON u.id = i.user_id \
         WHERE i.token_hash = $1 AND i.used_at IS NULL AND i.expires_at > $2{}",
        store.for_update()
    );
    let inv: Inv = store
        .query_one(&*txn, &sql, vec![sha256_hex(&body.token).into(), Utc::now().into()])
        .await?
        .ok_or(ApiError::NotFound("invitation"))?;
    store
        .execute(&*txn, "UPDATE invitations SET used_at = $2 WHERE id = $1", vec![inv.id.into(), Utc::now().into()])
        .await?;
    store
        .execute(
            &*txn,
            "UPDATE users SET password_hash = $2 WHERE id = $1 AND password_hash IS NULL",
            vec![inv.user_id.into(), hash.into()],
        )
        .await?;
    audit::append(
        store,
        &*txn,
        inv.tenant_id,
        &NewEvent {
            actor: &Actor { kind: "user", id: Some(inv.user_id.to_string()), label: inv.email.clone() },
            action: "invitation.accept",
            resource_type: "User",
            resource_id: Some(&inv.user_id.to_string()),
            resource_version: None,
            outcome: Outcome::Allow,
            policy_ids: &[],
            source: &super::source(&state, &req),
            details: serde_json::json!({}),
        },
    )
    .await?;
    txn.commit().await?;
    Ok(web::Json(AcceptedInvitation { email: inv.email }))
}

#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "auth",
    responses((status = 200, description = "the public keys that verify access tokens")))]
async fn jwks(state: State) -> HttpResponse {
    HttpResponse::Ok().insert_header(("Cache-Control", "public, max-age=300")).json(state.jwt.jwks())
}
