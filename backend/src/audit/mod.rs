//! The audit log: append-only, one hash chain per tenant.
//!
//! `hash = sha256(prev_hash || canonical event)`, where the canonical event is a JSON array of
//! every stored column in a fixed order (text exactly as stored). Events are written in the same
//! transaction as the change they record; the chain head (`audit_heads`) is locked while
//! appending, so concurrent writers queue and the sequence has no gaps. Events that concern no
//! tenant (a failed login for an unknown email) go to the platform chain, tenant id nil.

use chrono::{DateTime, SubsecRound, Utc};
use sea_orm::{ConnectionTrait, DbErr, FromQueryResult};
use serde::Serialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::store::{Store, entities::audit_event};

/// `prev_hash` of the first event of a chain.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
/// Tenant id of the platform chain.
pub const PLATFORM: Uuid = Uuid::nil();

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Permitted and done.
    Allow,
    /// Refused (authorization or authentication).
    Deny,
    /// Permitted but failed.
    Error,
}

impl Outcome {
    /// Stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Error => "error",
        }
    }
}

/// Who did it.
#[derive(Debug, Clone)]
pub struct Actor {
    /// `user`, `token`, `anonymous` or `system`.
    pub kind: &'static str,
    /// User or token id.
    pub id: Option<String>,
    /// Email, or `<token prefix> (<token name>)`.
    pub label: String,
}

/// Where the request came from.
#[derive(Debug, Clone, Default)]
pub struct Source {
    /// Client address.
    pub ip: Option<String>,
    /// User agent.
    pub user_agent: Option<String>,
    /// Request id.
    pub request_id: Option<String>,
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    /// Who.
    pub actor: &'a Actor,
    /// What, e.g. `pipeline.update` or `auth.login`.
    pub action: &'a str,
    /// Resource type, e.g. `Pipeline`.
    pub resource_type: &'a str,
    /// Resource id.
    pub resource_id: Option<&'a str>,
    /// Resource version.
    pub resource_version: Option<i64>,
    /// Outcome.
    pub outcome: Outcome,
    /// Cedar policies that determined the decision.
    pub policy_ids: &'a [String],
    /// Where from.
    pub source: &'a Source,
    /// Anything else worth keeping (JSON object).
    pub details: serde_json::Value,
}

/// An event as stored and served.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditEvent {
    /// Position in the tenant's chain, from 1.
    pub seq: i64,
    /// When (UTC).
    pub time: DateTime<Utc>,
    /// `user`, `token`, `anonymous` or `system`.
    pub actor_type: String,
    /// User or token id.
    pub actor_id: Option<String>,
    /// Email or token prefix and name.
    pub actor: String,
    /// Action.
    pub action: String,
    /// Resource type.
    pub resource_type: String,
    /// Resource id.
    pub resource_id: Option<String>,
    /// Resource version.
    pub resource_version: Option<i64>,
    /// `allow`, `deny` or `error`.
    pub outcome: String,
    /// Determining Cedar policy ids.
    pub policy_ids: Vec<String>,
    /// Client address.
    pub source_ip: Option<String>,
    /// User agent.
    pub user_agent: Option<String>,
    /// Request id.
    pub request_id: Option<String>,
    /// Details.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    /// Hash of the previous event.
    pub prev_hash: String,
    /// Hash of this event.
    pub hash: String,
}

impl From<audit_event::Model> for AuditEvent {
    fn from(m: audit_event::Model) -> Self {
        Self {
            seq: m.seq,
            time: m.occurred_at,
            actor_type: m.actor_type,
            actor_id: m.actor_id,
            actor: m.actor_label,
            action: m.action,
            resource_type: m.resource_type,
            resource_id: m.resource_id,
            resource_version: m.resource_version,
            outcome: m.outcome,
            policy_ids: serde_json::from_str(&m.policy_ids).unwrap_or_default(),
            source_ip: m.source_ip,
            user_agent: m.user_agent,
            request_id: m.request_id,
            details: serde_json::from_str(&m.details).unwrap_or(serde_json::Value::Null),
            prev_hash: m.prev_hash,
            hash: m.hash,
        }
    }
}

/// The hash of an event given its stored columns.
pub fn event_hash(m: &audit_event::Model) -> String {
    let canonical = serde_json::json!([
        m.tenant_id.to_string(),
        m.seq,
        m.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        m.actor_type,
        m.actor_id,
        m.actor_label,
        m.action,
        m.resource_type,
        m.resource_id,
        m.resource_version,
        m.outcome,
        m.policy_ids,
        m.source_ip,
        m.user_agent,
        m.request_id,
        m.details,
    ]);
    let mut h = Sha256::new();
    h.update(m.prev_hash.as_bytes());
    h.update(canonical.to_string().as_bytes());
    hex::encode(h.finalize())
}

/// A tenant's chain head: the last event's seq and hash.
#[derive(Debug, Clone, PartialEq, Eq, FromQueryResult)]
pub struct Head {
    /// The last event's seq (0 for an empty chain).
    pub seq: i64,
    /// The last event's hash.
    pub hash: String,
}

fn clip(s: Option<&str>, max: usize) -> Option<String> {
    s.map(|s| s.chars().take(max).collect())
}

/// Creates the chain head of a new tenant (inside the tenant's creation transaction).
pub async fn init_chain(store: &Store, conn: &impl ConnectionTrait, tenant: Uuid) -> Result<(), DbErr> {
    store
        .execute(
            conn,
            "INSERT INTO audit_heads (tenant_id, seq, hash) VALUES ($1, 0, $2)",
            vec![tenant.into(), GENESIS.into()],
        )
        .await?;
    Ok(())
}

/// The statement that reads, and on PostgreSQL locks until the transaction ends, the chain head
/// (`seq`, `hash`) of the tenant whose id is `$1`, along with `extra` columns (which may use `$1`).
pub fn head_sql(store: &Store, extra: &str) -> String {
    let extra = if extra.is_empty() { String::new() } else { format!(", {extra}") };
    format!("SELECT seq, hash{extra} FROM audit_heads WHERE tenant_id = $1{}", store.for_update())
}

/// Appends an event to a tenant's chain, inside the caller's transaction. Returns its seq.
pub async fn append(store: &Store, conn: &impl ConnectionTrait, tenant: Uuid, ev: &NewEvent<'_>) -> Result<i64, DbErr> {
    let sql = head_sql(store, "");
    let head: Head = match store.query_one(conn, &sql, vec![tenant.into()]).await? {
        Some(h) => h,
        None if tenant == PLATFORM => {
            // The platform chain is created on first use; the primary key settles races.
            store
                .execute(
                    conn,
                    "INSERT INTO audit_heads (tenant_id, seq, hash) VALUES ($1, 0, $2) ON CONFLICT (tenant_id) DO NOTHING",
                    vec![tenant.into(), GENESIS.into()],
                )
                .await?;
            store
                .query_one(conn, &sql, vec![tenant.into()])
                .await?
                .ok_or_else(|| DbErr::Custom("platform audit chain missing".into()))?
        }
        None => return Err(DbErr::Custom(format!("audit chain of tenant {tenant} missing"))),
    };
    let (head, statements) = append_statements(tenant, head.seq, head.hash, ev);
    let changed = store.execute_together(conn, statements).await?;
    check_appended(tenant, changed, 0)?;
    Ok(head.seq)
}

/// The two statements that append `ev` to the chain of `tenant`, whose head (read with
/// [`head_sql`], in the same transaction) is `head_seq` and `head_hash`: the event, and the
/// chain's new head, which changes the head only while it is still at `head_seq`. They go in
/// one round trip; [`check_appended`] checks what they changed. Returns the new head and the
/// statements.
pub fn append_statements(
    tenant: Uuid,
    head_seq: i64,
    head_hash: String,
    ev: &NewEvent<'_>,
) -> (Head, Vec<(String, Vec<sea_orm::Value>)>) {
    let mut m = audit_event::Model {
        tenant_id: tenant,
        seq: head_seq + 1,
        occurred_at: Utc::now().trunc_subsecs(6),
        actor_type: ev.actor.kind.to_owned(),
        actor_id: ev.actor.id.clone(),
        actor_label: ev.actor.label.chars().take(400).collect(),
        action: ev.action.to_owned(),
        resource_type: ev.resource_type.to_owned(),
        resource_id: clip(ev.resource_id, 200),
        resource_version: ev.resource_version,
        outcome: ev.outcome.as_str().to_owned(),
        policy_ids: serde_json::to_string(ev.policy_ids).unwrap_or_else(|_| "[]".into()),
        source_ip: clip(ev.source.ip.as_deref(), 64),
        user_agent: clip(ev.source.user_agent.as_deref(), 512),
        request_id: clip(ev.source.request_id.as_deref(), 64),
        details: ev.details.to_string(),
        prev_hash: head_hash,
        hash: String::new(),
    };
    m.hash = event_hash(&m);
    let seq = m.seq;
    // The event and the chain's new head go in one round trip.
    let insert = (
        "INSERT INTO audit_events (tenant_id, seq, occurred_at, actor_type, actor_id, actor_label, action, \
         resource_type, resource_id, resource_version, outcome, policy_ids, source_ip, user_agent, request_id, \
         details, prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
            .to_owned(),
        vec![
            m.tenant_id.into(),
            m.seq.into(),
            m.occurred_at.into(),
            m.actor_type.into(),
            m.actor_id.into(),
            m.actor_label.into(),
            m.action.into(),
            m.resource_type.into(),
            m.resource_id.into(),
            m.resource_version.into(),
            m.outcome.into(),
            m.policy_ids.into(),
            m.source_ip.into(),
            m.user_agent.into(),
            m.request_id.into(),
            m.details.into(),
            m.prev_hash.into(),
            m.hash.clone().into(),
        ],
    );
    let update = (
        "UPDATE audit_heads SET seq = $2, hash = $3 WHERE tenant_id = $1 AND seq = $4".to_owned(),
        vec![tenant.into(), seq.into(), m.hash.clone().into(), head_seq.into()],
    );
    (Head { seq, hash: m.hash }, vec![insert, update])
}

/// Checks the rows changed by [`append_statements`] run together with statements that must
/// change `others` rows: `changed` counts them all.
pub fn check_appended(tenant: Uuid, changed: u64, others: u64) -> Result<(), DbErr> {
    if changed != others + 2 {
        return Err(DbErr::Custom(format!("audit chain of tenant {tenant}: the head changed concurrently")));
    }
    Ok(())
}

/// The result of verifying a chain.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Verification {
    /// Whether the whole chain is intact.
    pub ok: bool,
    /// How many events were checked.
    pub events: i64,
    /// The first seq at which the chain is broken, if any.
    pub first_broken_seq: Option<i64>,
    /// Why it is broken.
    pub reason: Option<String>,
}

/// Verifies a tenant's chain: sequence without gaps, every `prev_hash` equal to the previous
/// hash, every hash recomputed from the columns, and the head matching the last event.
pub async fn verify(store: &Store, conn: &impl ConnectionTrait, tenant: Uuid) -> Result<Verification, DbErr> {
    let head: Option<Head> =
        store.query_one(conn, "SELECT seq, hash FROM audit_heads WHERE tenant_id = $1", vec![tenant.into()]).await?;
    let mut expected_seq = 1_i64;
    let mut prev = GENESIS.to_owned();
    let mut after = 0_i64;
    let broken = |seq: i64, events: i64, why: String| Verification {
        ok: false,
        events,
        first_broken_seq: Some(seq),
        reason: Some(why),
    };
    loop {
        let page: Vec<audit_event::Model> = store
            .query_all(
                conn,
                "SELECT * FROM audit_events WHERE tenant_id = $1 AND seq > $2 ORDER BY seq LIMIT 1000",
                vec![tenant.into(), after.into()],
            )
            .await?;
        if page.is_empty() {
            break;
        }
        for m in page {
            after = m.seq;
            let checked = expected_seq - 1;
            if m.seq != expected_seq {
                return Ok(broken(
                    expected_seq,
                    checked,
                    format!("event {expected_seq} is missing (found {} next)", m.seq),
                ));
            }
            if m.prev_hash != prev {
                return Ok(broken(m.seq, checked, "prev_hash does not match the previous event".into()));
            }
            if event_hash(&m) != m.hash {
                return Ok(broken(m.seq, checked, "event content does not match its hash".into()));
            }
            prev = m.hash;
            expected_seq += 1;
        }
    }
    let events = expected_seq - 1;
    if let Some(h) = head
        && (h.seq != events || h.hash != prev)
    {
        // Truncated (head ahead): the first missing event. Forged tail (head behind): the first
        // event past the head. Same length but another hash: the last event.
        let at = if h.seq == events { events.max(1) } else { h.seq.min(events) + 1 };
        return Ok(broken(at, at - 1, format!("chain head is at {} but events end at {events}", h.seq)));
    }
    Ok(Verification { ok: true, events, first_broken_seq: None, reason: None })
}
