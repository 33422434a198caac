//! Authentication: passwords, access JWTs, API tokens, login throttling, and the extractors that
//! turn a request's credential into a principal (a bare 401 when it fails; the reason is logged
//! at debug level).

pub mod api_token;
pub mod jwt;
pub mod password;
pub mod throttle;

use std::{future::Future, pin::Pin};

use actix_web::{FromRequest, HttpMessage, HttpRequest, dev::Payload, web};
use chrono::{DateTime, Utc};
use sea_orm::FromQueryResult;
use uuid::Uuid;

use crate::{
    AppState,
    audit::{Actor, Source},
    error::ApiError,
};

/// The request id assigned by the request-id middleware.
#[derive(Clone, Debug)]
pub struct RequestId(pub String);

/// Client address, user agent and request id of a request.
pub fn source_of(req: &HttpRequest, trust_proxy: bool) -> Source {
    let forwarded = trust_proxy
        .then(|| req.headers().get("x-forwarded-for")?.to_str().ok()?.split(',').next().map(|s| s.trim().to_owned()))
        .flatten();
    Source {
        ip: forwarded.or_else(|| req.peer_addr().map(|a| a.ip().to_string())),
        user_agent: req
            .headers()
            .get(actix_web::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.chars().take(512).collect()),
        request_id: req.extensions().get::<RequestId>().map(|r| r.0.clone()),
    }
}

/// What kind of principal made the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// A person, with an access token from login.
    User,
    /// An API token.
    ApiToken,
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// User or API token.
    pub kind: PrincipalKind,
    /// User id, or API token id.
    pub id: Uuid,
    /// The user (for a token: its owner).
    pub user_id: Uuid,
    /// The user's email (for a token: its owner's).
    pub email: String,
    /// For a token: its display prefix and name.
    pub token_label: Option<(String, String)>,
    /// Groups in the tenant of the request (empty outside a tenant).
    pub groups: Vec<String>,
    /// The login session, for users.
    pub session_id: Option<Uuid>,
}

impl Principal {
    /// The principal as an audit actor.
    pub fn actor(&self) -> Actor {
        match (&self.kind, &self.token_label) {
            (PrincipalKind::ApiToken, Some((prefix, name))) => Actor {
                kind: "token",
                id: Some(self.id.to_string()),
                label: format!("{prefix}… ({name}, owner {})", self.email),
            },
            _ => Actor { kind: "user", id: Some(self.id.to_string()), label: self.email.clone() },
        }
    }
}

/// The tenant of a request.
#[derive(Debug, Clone)]
pub struct TenantRef {
    /// Id.
    pub id: Uuid,
    /// Slug (as in URLs).
    pub slug: String,
    /// Display name.
    pub name: String,
    /// Current policy version.
    pub policy_version: i64,
}

/// An authenticated request inside a tenant (`/api/v1/t/{tenant}/...`): the caller is a member
/// (or a token of that tenant). A tenant that does not exist and one the caller is not in both
/// answer 404.
#[derive(Debug, Clone)]
pub struct TenantCtx {
    /// The tenant.
    pub tenant: TenantRef,
    /// The caller.
    pub principal: Principal,
    /// Where the request came from.
    pub source: Source,
}

/// An authenticated request outside any tenant (`/api/v1/me`, logout).
#[derive(Debug, Clone)]
pub struct Authn {
    /// The caller (groups empty).
    pub principal: Principal,
    /// For a token: its tenant.
    pub token_tenant: Option<Uuid>,
    /// Where the request came from.
    pub source: Source,
}

fn bearer(req: &HttpRequest) -> Option<String> {
    let h = req.headers().get(actix_web::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, value) = h.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| value.trim().to_owned())
}

#[derive(FromQueryResult)]
struct UserRow {
    email: String,
    disabled: bool,
    session_revoked: Option<DateTime<Utc>>,
    session_expires: Option<DateTime<Utc>>,
    tenant_id: Option<Uuid>,
    tenant_slug: Option<String>,
    tenant_name: Option<String>,
    policy_version: Option<i64>,
    groups: Option<String>,
}

#[derive(FromQueryResult)]
struct TokenRow {
    id: Uuid,
    tenant_id: Uuid,
    name: String,
    prefix: String,
    token_groups: String,
    expires_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    last_used_at: Option<DateTime<Utc>>,
    created_by: Uuid,
    email: String,
    disabled: bool,
    tenant_slug: String,
    tenant_name: String,
    policy_version: i64,
    owner_groups: Option<String>,
}

fn parse_groups(s: &str) -> Vec<String> {
    serde_json::from_str(s).unwrap_or_default()
}

/// Resolves the credential of a request. `tenant` is the tenant slug of the path, if any.
/// Returns the principal and the tenant when the caller is in it (`None` = not a member or no
/// such tenant).
async fn resolve(
    state: &AppState,
    req: &HttpRequest,
    tenant: Option<&str>,
) -> Result<(Principal, Option<TenantRef>, Option<Uuid>), ApiError> {
    let credential = bearer(req).ok_or(ApiError::Unauthorized)?;
    let store = &state.store;
    if credential.starts_with(api_token::PREFIX) {
        if !api_token::is_well_formed(&credential) {
            tracing::debug!("malformed API token");
            return Err(ApiError::Unauthorized);
        }
        let hash = api_token::sha256_hex(&credential);
        let row: TokenRow = store
            .query_one(
                store.db(),
                "SELECT k.id, k.tenant_id, k.name, k.prefix, k.groups AS token_groups, k.expires_at, k.revoked_at, \
                 k.last_used_at, k.created_by, u.email, u.disabled, t.slug AS tenant_slug, t.name AS tenant_name, \
                 t.policy_version, m.groups AS owner_groups \
                 FROM api_tokens k JOIN tenants t ON t.id = k.tenant_id JOIN users u ON u.id = k.created_by \
                 LEFT JOIN memberships m ON m.tenant_id = k.tenant_id AND m.user_id = k.created_by \
                 WHERE k.token_hash = $1",
                vec![hash.into()],
            )
            .await?
            .ok_or_else(|| {
                tracing::debug!("unknown API token");
                ApiError::Unauthorized
            })?;
        let now = Utc::now();
        if row.revoked_at.is_some() || row.expires_at <= now || row.disabled || row.owner_groups.is_none() {
            tracing::debug!(token = %row.id, "revoked, expired or orphaned API token");
            return Err(ApiError::Unauthorized);
        }
        if row.last_used_at.is_none_or(|t| now - t > chrono::Duration::seconds(60)) {
            let store = store.clone();
            let id = row.id;
            tokio::spawn(async move {
                if let Ok(txn) = store.write().await {
                    let _ = store
                        .execute(
                            &*txn,
                            "UPDATE api_tokens SET last_used_at = $2 WHERE id = $1",
                            vec![id.into(), now.into()],
                        )
                        .await;
                    let _ = txn.commit().await;
                }
            });
        }
        // A token never has more rights than its owner has now: an admin owner may hand out any
        // group (they could join it), anyone else only groups they are in themselves.
        let owner = parse_groups(row.owner_groups.as_deref().unwrap_or("[]"));
        let owner_is_admin = owner.iter().any(|g| g == "admins");
        let groups =
            parse_groups(&row.token_groups).into_iter().filter(|g| owner_is_admin || owner.contains(g)).collect();
        let principal = Principal {
            kind: PrincipalKind::ApiToken,
            id: row.id,
            user_id: row.created_by,
            email: row.email,
            token_label: Some((row.prefix, row.name)),
            groups,
            session_id: None,
        };
        let tenant_ref = TenantRef {
            id: row.tenant_id,
            slug: row.tenant_slug,
            name: row.tenant_name,
            policy_version: row.policy_version,
        };
        let in_tenant = tenant.is_some_and(|slug| slug == tenant_ref.slug);
        return Ok((principal, in_tenant.then_some(tenant_ref), Some(row.tenant_id)));
    }
    let claims = state.jwt.verify(&credential).ok_or(ApiError::Unauthorized)?;
    let row: UserRow = store
        .query_one(
            store.db(),
            "SELECT u.email, u.disabled, s.revoked_at AS session_revoked, s.expires_at AS session_expires, \
             t.id AS tenant_id, t.slug AS tenant_slug, t.name AS tenant_name, t.policy_version, m.groups \
             FROM users u LEFT JOIN sessions s ON s.id = $2 AND s.user_id = u.id \
             LEFT JOIN tenants t ON t.slug = $3 \
             LEFT JOIN memberships m ON m.tenant_id = t.id AND m.user_id = u.id \
             WHERE u.id = $1",
            vec![claims.sub.into(), claims.sid.into(), tenant.unwrap_or("").into()],
        )
        .await?
        .ok_or(ApiError::Unauthorized)?;
    if row.disabled || row.session_revoked.is_some() || row.session_expires.is_none_or(|e| e <= Utc::now()) {
        tracing::debug!(user = %claims.sub, "disabled user or ended session");
        return Err(ApiError::Unauthorized);
    }
    let tenant_ref = match (row.tenant_id, row.tenant_slug, row.tenant_name, row.policy_version, &row.groups) {
        (Some(id), Some(slug), Some(name), Some(policy_version), Some(_)) => {
            Some(TenantRef { id, slug, name, policy_version })
        }
        _ => None,
    };
    let principal = Principal {
        kind: PrincipalKind::User,
        id: claims.sub,
        user_id: claims.sub,
        email: row.email,
        token_label: None,
        groups: row.groups.as_deref().map(parse_groups).unwrap_or_default(),
        session_id: Some(claims.sid),
    };
    Ok((principal, tenant_ref, None))
}

fn state_of(req: &HttpRequest) -> Result<web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::Internal(anyhow::anyhow!("application state missing")))
}

impl FromRequest for TenantCtx {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = state_of(&req)?;
            let slug = req.match_info().get("tenant").unwrap_or_default().to_owned();
            let (principal, tenant, _) = resolve(&state, &req, Some(&slug)).await?;
            let tenant = tenant.ok_or(ApiError::NotFound("tenant"))?;
            Ok(TenantCtx { tenant, principal, source: source_of(&req, state.config.trust_proxy) })
        })
    }
}

impl FromRequest for Authn {
    type Error = ApiError;
    type Future = Pin<Box<dyn Future<Output = Result<Self, ApiError>>>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        let req = req.clone();
        Box::pin(async move {
            let state = state_of(&req)?;
            let (principal, _, token_tenant) = resolve(&state, &req, None).await?;
            Ok(Authn { principal, token_tenant, source: source_of(&req, state.config.trust_proxy) })
        })
    }
}
