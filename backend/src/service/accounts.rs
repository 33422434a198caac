//! Tenants, users, memberships and login sessions.

use chrono::{DateTime, Duration, Utc};
use sea_orm::{ConnectionTrait, DbErr, FromQueryResult};
use uuid::Uuid;

use crate::{auth::api_token::sha256_hex, store::Store};

/// Groups every tenant starts with.
pub const DEFAULT_GROUPS: [(&str, &str); 4] = [
    ("admins", "Administer the tenant: members, groups, tokens, policies"),
    ("editors", "Create and change pipelines and runs"),
    ("approvers", "Approve or reject gates"),
    ("viewers", "Read pipelines and runs"),
];

/// How long a login session (and its refresh tokens) lasts.
pub const SESSION_DAYS: i64 = 30;

/// A user row as needed for login.
#[derive(Debug, FromQueryResult)]
pub struct UserLogin {
    /// Id.
    pub id: Uuid,
    /// Email.
    pub email: String,
    /// PHC hash.
    pub password_hash: Option<String>,
    /// Disabled flag.
    pub disabled: bool,
}

/// Normalizes and checks an email address.
pub fn normalize_email(email: &str) -> Result<String, &'static str> {
    let e = email.trim().to_lowercase();
    let valid = e.len() <= 320
        && !e.chars().any(char::is_whitespace)
        && e.split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && !domain.is_empty() && !domain.contains('@'));
    if valid { Ok(e) } else { Err("must be an email address like name@example.com") }
}

/// Finds a user by (normalized) email.
pub async fn find_user(store: &Store, conn: &impl ConnectionTrait, email: &str) -> Result<Option<UserLogin>, DbErr> {
    store
        .query_one(conn, "SELECT id, email, password_hash, disabled FROM users WHERE email = $1", vec![email.into()])
        .await
}

/// Creates a user.
pub async fn create_user(
    store: &Store,
    conn: &impl ConnectionTrait,
    email: &str,
    password_hash: Option<String>,
) -> Result<Uuid, DbErr> {
    let id = Uuid::now_v7();
    store
        .execute(
            conn,
            "INSERT INTO users (id, email, password_hash, disabled, created_at) VALUES ($1, $2, $3, $4, $5)",
            vec![id.into(), email.into(), password_hash.into(), false.into(), Utc::now().into()],
        )
        .await?;
    Ok(id)
}

/// Creates a tenant with its default groups, policy version 1 and audit chain.
pub async fn create_tenant(
    store: &Store,
    conn: &impl ConnectionTrait,
    slug: &str,
    name: &str,
    policy_text: &str,
    author: &str,
) -> Result<Uuid, DbErr> {
    let id = Uuid::now_v7();
    let now = Utc::now();
    store
        .execute(
            conn,
            "INSERT INTO tenants (id, slug, name, policy_version, created_at) VALUES ($1, $2, $3, 1, $4)",
            vec![id.into(), slug.into(), name.into(), now.into()],
        )
        .await?;
    for (group, description) in DEFAULT_GROUPS {
        store
            .execute(
                conn,
                "INSERT INTO groups (tenant_id, name, description, created_at) VALUES ($1, $2, $3, $4)",
                vec![id.into(), group.into(), description.into(), now.into()],
            )
            .await?;
    }
    store
        .execute(
            conn,
            "INSERT INTO policy_versions (tenant_id, version, text, message, author, sha256, created_at) \
             VALUES ($1, 1, $2, $3, $4, $5, $6)",
            vec![
                id.into(),
                policy_text.into(),
                "Default policies".into(),
                author.into(),
                sha256_hex(policy_text).into(),
                now.into(),
            ],
        )
        .await?;
    crate::audit::init_chain(store, conn, id).await?;
    Ok(id)
}

/// Adds a user to a tenant with the given groups.
pub async fn add_membership(
    store: &Store,
    conn: &impl ConnectionTrait,
    tenant: Uuid,
    user: Uuid,
    groups: &[String],
) -> Result<(), DbErr> {
    store
        .execute(
            conn,
            "INSERT INTO memberships (tenant_id, user_id, groups, created_at) VALUES ($1, $2, $3, $4)",
            vec![
                tenant.into(),
                user.into(),
                serde_json::to_string(groups).unwrap_or_else(|_| "[]".into()).into(),
                Utc::now().into(),
            ],
        )
        .await?;
    Ok(())
}

/// Creates a login session with its first refresh token. Returns (session id, refresh token).
pub async fn create_session(store: &Store, conn: &impl ConnectionTrait, user: Uuid) -> Result<(Uuid, String), DbErr> {
    let id = Uuid::now_v7();
    let now = Utc::now();
    store
        .execute(
            conn,
            "INSERT INTO sessions (id, user_id, created_at, expires_at, revoked_at) VALUES ($1, $2, $3, $4, NULL)",
            vec![id.into(), user.into(), now.into(), (now + Duration::days(SESSION_DAYS)).into()],
        )
        .await?;
    let refresh = new_refresh_token(store, conn, id).await?;
    Ok((id, refresh))
}

/// Issues a new refresh token for a session.
pub async fn new_refresh_token(store: &Store, conn: &impl ConnectionTrait, session: Uuid) -> Result<String, DbErr> {
    let token = format!("slr_{}", random_secret());
    store
        .execute(
            conn,
            "INSERT INTO refresh_tokens (token_hash, session_id, created_at, used_at) VALUES ($1, $2, $3, NULL)",
            vec![sha256_hex(&token).into(), session.into(), Utc::now().into()],
        )
        .await?;
    Ok(token)
}

/// 256 random bits, base64url.
pub fn random_secret() -> String {
    use base64::Engine;
    use rand::RngCore;
    let mut bytes = [0_u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A refresh token's session, as found when rotating.
#[derive(Debug, FromQueryResult)]
pub struct RefreshRow {
    /// Session.
    pub session_id: Uuid,
    /// When it was already used (rotation), if it was.
    pub used_at: Option<DateTime<Utc>>,
    /// Owner.
    pub user_id: Uuid,
    /// Session end.
    pub expires_at: DateTime<Utc>,
    /// Session revoked.
    pub revoked_at: Option<DateTime<Utc>>,
    /// Owner disabled.
    pub disabled: bool,
    /// Owner's email.
    pub email: String,
}

/// Revokes a session (logout, refresh-token reuse).
pub async fn revoke_session(store: &Store, conn: &impl ConnectionTrait, session: Uuid) -> Result<(), DbErr> {
    store
        .execute(
            conn,
            "UPDATE sessions SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
            vec![session.into(), Utc::now().into()],
        )
        .await?;
    Ok(())
}
