//! Operator commands behind `sluice admin ...` and `sluice audit verify`.

use anyhow::{Context, bail};
use chrono::Utc;
use sea_orm::FromQueryResult;
use sluice_domain::ids::Slug;
use uuid::Uuid;

use crate::{
    audit::{self, Actor, NewEvent, Outcome, Source},
    auth::password,
    authz::Authorizer,
    config::Config,
    service::accounts,
    store::Store,
};

async fn store(config: &Config) -> anyhow::Result<Store> {
    if config.is_embedded() {
        std::fs::create_dir_all(&config.data_dir)?;
    }
    let store = Store::connect(&config.database_url, 2, "sluice admin").await.context("connecting to the database")?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

/// Applies migrations.
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    store(config).await.map(|_| ())
}

fn system() -> Actor {
    Actor { kind: "system", id: None, label: "sluice admin".into() }
}

/// Records an operator's change in `tenant`'s audit log, inside `conn`.
async fn audit_operator(
    store: &Store,
    conn: &impl sea_orm::ConnectionTrait,
    tenant: Uuid,
    action: &str,
    resource: (&str, &str),
    details: serde_json::Value,
) -> anyhow::Result<()> {
    let event = NewEvent {
        actor: &system(),
        action,
        resource_type: resource.0,
        resource_id: Some(resource.1),
        resource_version: None,
        outcome: Outcome::Allow,
        policy_ids: &[],
        source: &Source::default(),
        details,
    };
    audit::append(store, conn, tenant, &event).await?;
    Ok(())
}

/// Creates a tenant with a first admin. Returns the admin's password if one was generated.
pub async fn create_tenant(
    config: &Config,
    slug: &str,
    name: &str,
    email: &str,
    pw: Option<String>,
) -> anyhow::Result<Option<String>> {
    Slug::parse(slug).map_err(|e| anyhow::anyhow!("--slug: {e}"))?;
    let email = accounts::normalize_email(email).map_err(|e| anyhow::anyhow!("--admin-email: {e}"))?;
    let store = store(config).await?;
    let existing = accounts::find_user(&store, store.db(), &email).await?;
    let (generated, hash) = match (&existing, pw) {
        (Some(_), _) => (None, None),
        (None, Some(p)) => {
            password::validate(&p).map_err(|e| anyhow::anyhow!("--admin-password: {e}"))?;
            (None, Some(password::hash(&p)?))
        }
        (None, None) => {
            let p = accounts::random_secret()[..20].to_owned();
            let h = password::hash(&p)?;
            (Some(p), Some(h))
        }
    };
    let authz = Authorizer::new()?;
    let txn = store.write().await?;
    let user = match existing {
        Some(u) => u.id,
        None => accounts::create_user(&store, &*txn, &email, hash).await?,
    };
    let tenant = accounts::create_tenant(&store, &*txn, slug, name, authz.default_policy_text(), "sluice admin")
        .await
        .map_err(|e| {
            if crate::store::is_unique_violation(&e) {
                anyhow::anyhow!("tenant {slug} already exists")
            } else {
                e.into()
            }
        })?;
    accounts::add_membership(&store, &*txn, tenant, user, &["admins".to_owned()]).await?;
    let details = serde_json::json!({ "name": name, "admin": email, "policy_version": 1 });
    audit_operator(&store, &*txn, tenant, "tenant.create", ("Tenant", slug), details).await?;
    txn.commit().await?;
    Ok(generated)
}

/// Disables a user everywhere: their sessions and API tokens stop working on the next request.
pub async fn disable_user(config: &Config, email: &str) -> anyhow::Result<()> {
    let email = accounts::normalize_email(email).map_err(|e| anyhow::anyhow!("--email: {e}"))?;
    let store = store(config).await?;
    let user = accounts::find_user(&store, store.db(), &email).await?.with_context(|| format!("no user {email}"))?;
    #[derive(FromQueryResult)]
    struct T {
        tenant_id: Uuid,
    }
    let txn = store.write().await?;
    store.execute(&*txn, "UPDATE users SET disabled = $2 WHERE id = $1", vec![user.id.into(), true.into()]).await?;
    store
        .execute(
            &*txn,
            "UPDATE sessions SET revoked_at = $2 WHERE user_id = $1 AND revoked_at IS NULL",
            vec![user.id.into(), Utc::now().into()],
        )
        .await?;
    let tenants: Vec<T> =
        store.query_all(&*txn, "SELECT tenant_id FROM memberships WHERE user_id = $1", vec![user.id.into()]).await?;
    for t in tenants {
        let details = serde_json::json!({ "email": email });
        audit_operator(&store, &*txn, t.tenant_id, "user.disable", ("User", &user.id.to_string()), details).await?;
    }
    txn.commit().await?;
    Ok(())
}

/// Sets how many tasks of a tenant may run at once (`None`: the configured default,
/// `SLUICE_TENANT_MAX_RUNNING_TASKS`; 0: no limit). Returns the previous override.
pub async fn set_tenant_limit(config: &Config, slug: &str, max: Option<u32>) -> anyhow::Result<Option<i64>> {
    Slug::parse(slug).map_err(|e| anyhow::anyhow!("--tenant: {e}"))?;
    let store = store(config).await?;
    #[derive(FromQueryResult)]
    struct T {
        id: Uuid,
        max_running_tasks: Option<i64>,
    }
    let txn = store.write().await?;
    let sql = format!("SELECT id, max_running_tasks FROM tenants WHERE slug = $1{}", store.for_update());
    let t: T = store.query_one(&*txn, &sql, vec![slug.into()]).await?.with_context(|| format!("no tenant {slug}"))?;
    let max = max.map(i64::from);
    store
        .execute(&*txn, "UPDATE tenants SET max_running_tasks = $2 WHERE id = $1", vec![t.id.into(), max.into()])
        .await?;
    let details = serde_json::json!({ "max_running_tasks": { "from": t.max_running_tasks, "to": max } });
    audit_operator(&store, &*txn, t.id, "tenant.limits", ("Tenant", slug), details).await?;
    txn.commit().await?;
    Ok(t.max_running_tasks)
}

/// Verifies the audit chain of one tenant (by slug), or of every tenant and the platform chain.
/// Prints one line per chain; returns whether all are intact.
pub async fn audit_verify(config: &Config, tenant: Option<&str>) -> anyhow::Result<bool> {
    #[derive(FromQueryResult)]
    struct T {
        id: Uuid,
        slug: String,
    }
    let store = store(config).await?;
    let mut chains: Vec<T> = match tenant {
        Some(slug) => {
            let t: Option<T> =
                store.query_one(store.db(), "SELECT id, slug FROM tenants WHERE slug = $1", vec![slug.into()]).await?;
            match t {
                Some(t) => vec![t],
                None => bail!("no tenant {slug}"),
            }
        }
        None => store.query_all(store.db(), "SELECT id, slug FROM tenants ORDER BY slug", vec![]).await?,
    };
    if tenant.is_none() {
        chains.push(T { id: audit::PLATFORM, slug: "(platform)".into() });
    }
    let mut all_ok = true;
    for t in chains {
        let v = audit::verify(&store, store.db(), t.id).await?;
        if v.ok {
            println!("{}: ok, {} events", t.slug, v.events);
        } else {
            all_ok = false;
            println!(
                "{}: BROKEN at seq {} ({}); {} events verified before it",
                t.slug,
                v.first_broken_seq.unwrap_or_default(),
                v.reason.unwrap_or_default(),
                v.events
            );
        }
    }
    Ok(all_ok)
}
