//! Tenant settings read by the API and by the engine: the HTTP allow-list.

use sea_orm::{ConnectionTrait, DbErr, FromQueryResult};
use sluice_domain::network::AllowedNetwork;
use uuid::Uuid;

use crate::store::Store;

#[derive(FromQueryResult)]
struct Row {
    http_allow: String,
}

/// The tenant's HTTP allow-list as stored (canonical CIDRs); `None` when there is no such tenant.
pub async fn http_allow(
    store: &Store,
    conn: &impl ConnectionTrait,
    tenant: Uuid,
) -> Result<Option<Vec<String>>, DbErr> {
    let row: Option<Row> =
        store.query_one(conn, "SELECT http_allow FROM tenants WHERE id = $1", vec![tenant.into()]).await?;
    Ok(row.map(|r| serde_json::from_str(&r.http_allow).unwrap_or_default()))
}

/// The networks the tenant's `http:` tasks may reach beyond public addresses, as the executor
/// takes them. A stored entry that no longer parses is an error, never a silent widening.
pub async fn http_allow_networks(store: &Store, tenant: Uuid) -> anyhow::Result<Vec<(std::net::IpAddr, u8)>> {
    let entries = http_allow(store, store.db(), tenant).await?.unwrap_or_default();
    let networks = AllowedNetwork::parse_list(&entries)
        .map_err(|(_, e)| anyhow::anyhow!("the tenant's HTTP allow-list is invalid: {e}"))?;
    Ok(networks.into_iter().map(|n| (n.addr(), n.prefix())).collect())
}

/// Stores a new allow-list (already parsed) inside the caller's transaction.
pub async fn set_http_allow(
    store: &Store,
    conn: &impl ConnectionTrait,
    tenant: Uuid,
    networks: &[AllowedNetwork],
) -> Result<Vec<String>, DbErr> {
    let entries: Vec<String> = networks.iter().map(ToString::to_string).collect();
    let text = serde_json::to_string(&entries).unwrap_or_else(|_| "[]".into());
    store.execute(conn, "UPDATE tenants SET http_allow = $2 WHERE id = $1", vec![tenant.into(), text.into()]).await?;
    Ok(entries)
}
