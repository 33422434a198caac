//! Tenant settings read by the API and by the engine: the HTTP allow-list.

use sea_orm::{ConnectionTrait, DbErr, FromQueryResult};
use sluice_domain::network::{AllowEntry, AllowedHost};
use uuid::Uuid;

use crate::store::Store;

#[derive(FromQueryResult)]
struct Row {
    http_allow: String,
}

/// The tenant's HTTP allow-list as stored (canonical CIDRs and lower-case host names); `None`
/// when there is no such tenant.
pub async fn http_allow(
    store: &Store,
    conn: &impl ConnectionTrait,
    tenant: Uuid,
) -> Result<Option<Vec<String>>, DbErr> {
    let row: Option<Row> =
        store.query_one(conn, "SELECT http_allow FROM tenants WHERE id = $1", vec![tenant.into()]).await?;
    Ok(row.map(|r| serde_json::from_str(&r.http_allow).unwrap_or_default()))
}

/// What the tenant's `http:` tasks may reach beyond public addresses, as the executor takes it:
/// networks, and host names. A stored entry that no longer parses is an error, never a silent
/// widening.
pub async fn http_allow_policy(
    store: &Store,
    tenant: Uuid,
) -> anyhow::Result<(Vec<(std::net::IpAddr, u8)>, Vec<AllowedHost>)> {
    let entries = http_allow(store, store.db(), tenant).await?.unwrap_or_default();
    let entries = AllowEntry::parse_list(&entries)
        .map_err(|(_, e)| anyhow::anyhow!("the tenant's HTTP allow-list is invalid: {e}"))?;
    let (mut networks, mut hosts) = (vec![], vec![]);
    for entry in entries {
        match entry {
            AllowEntry::Network(n) => networks.push((n.addr(), n.prefix())),
            AllowEntry::Host(h) => hosts.push(h),
        }
    }
    Ok((networks, hosts))
}

/// Stores a new allow-list (already parsed) inside the caller's transaction.
pub async fn set_http_allow(
    store: &Store,
    conn: &impl ConnectionTrait,
    tenant: Uuid,
    allowed: &[AllowEntry],
) -> Result<Vec<String>, DbErr> {
    let entries: Vec<String> = allowed.iter().map(ToString::to_string).collect();
    let text = serde_json::to_string(&entries).unwrap_or_else(|_| "[]".into());
    store.execute(conn, "UPDATE tenants SET http_allow = $2 WHERE id = $1", vec![tenant.into(), text.into()]).await?;
    Ok(entries)
}
