//! Webhook triggers: one signing secret per pipeline, shown once when it is created or rotated.
//!
//! A call is signed with `HMAC-SHA256(secret, "<timestamp>.<raw body>")`, the timestamp being
//! unix seconds that must lie within [`TOLERANCE_SECS`] of the server's clock. The secret is
//! stored as is (the server must compute signatures with it) and never logged or audited.

use hmac::{Hmac, Mac};
use rand::Rng;
use sea_orm::ConnectionTrait;
use sha2::Sha256;
use uuid::Uuid;

use crate::{
    AppState,
    error::{ApiError, ApiResult},
    service::runs::PipelineRef,
    store::Store,
};

/// How far a call's timestamp may be from the server's clock, either way.
pub const TOLERANCE_SECS: i64 = 300;
/// Prefix of a webhook secret (so that secret scanners can recognise one).
pub const SECRET_PREFIX: &str = "whsec_";

const ALPHABET: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A new secret: the prefix and 43 random base62 characters (256 bits).
pub fn generate_secret() -> String {
    let mut rng = rand::rngs::OsRng;
    let random: String = (0..43).map(|_| ALPHABET[rng.gen_range(0..62)] as char).collect();
    format!("{SECRET_PREFIX}{random}")
}

/// The MAC over `"<timestamp>.<body>"`, or `"<timestamp>.<delivery>.<body>"` when the call
/// carries a delivery id: the id decides which run a call returns, so it must be signed too (a
/// captured call replayed with a new id would otherwise start a new run).
fn mac(secret: &str, timestamp: &str, delivery: Option<&[u8]>, body: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).unwrap_or_else(|_| unreachable!());
    m.update(timestamp.as_bytes());
    m.update(b".");
    if let Some(d) = delivery {
        m.update(d);
        m.update(b".");
    }
    m.update(body);
    m
}

/// The signature header value a sender computes: `sha256=<hex>`.
pub fn sign(secret: &str, timestamp: &str, delivery: Option<&str>, body: &[u8]) -> String {
    format!("sha256={}", hex::encode(mac(secret, timestamp, delivery.map(str::as_bytes), body).finalize().into_bytes()))
}

/// Why a call was refused (recorded in the audit log; the caller only ever sees 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No pipeline of that name in the tenant.
    UnknownPipeline,
    /// The pipeline has no webhook.
    NotConfigured,
    /// No timestamp header.
    MissingTimestamp,
    /// The timestamp is not unix seconds.
    MalformedTimestamp,
    /// The timestamp is more than [`TOLERANCE_SECS`] in the past.
    TimestampTooOld,
    /// The timestamp is more than [`TOLERANCE_SECS`] in the future.
    TimestampInFuture,
    /// No signature header.
    MissingSignature,
    /// Not `sha256=<64 hex digits>`.
    MalformedSignature,
    /// The signature does not match.
    BadSignature,
}

impl Refusal {
    /// The reason as recorded.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownPipeline => "unknown pipeline",
            Self::NotConfigured => "no webhook configured",
            Self::MissingTimestamp => "missing timestamp",
            Self::MalformedTimestamp => "malformed timestamp",
            Self::TimestampTooOld => "timestamp too old",
            Self::TimestampInFuture => "timestamp in the future",
            Self::MissingSignature => "missing signature",
            Self::MalformedSignature => "malformed signature",
            Self::BadSignature => "signature mismatch",
        }
    }
}

/// Checks a call: the signature over the timestamp, the delivery id if there is one, and the
/// raw body (in constant time), then the timestamp's freshness against `now` (unix seconds).
pub fn verify(
    secret: &str,
    timestamp: Option<&str>,
    delivery: Option<&[u8]>,
    signature: Option<&str>,
    body: &[u8],
    now: i64,
) -> Result<(), Refusal> {
    let timestamp = timestamp.ok_or(Refusal::MissingTimestamp)?;
    let signature = signature.ok_or(Refusal::MissingSignature)?;
    let ts: i64 = timestamp
        .parse()
        .ok()
        .filter(|_| !timestamp.is_empty() && timestamp.bytes().all(|b| b.is_ascii_digit()))
        .ok_or(Refusal::MalformedTimestamp)?;
    let hex_sig = signature.strip_prefix("sha256=").ok_or(Refusal::MalformedSignature)?;
    let given = hex::decode(hex_sig).ok().filter(|b| b.len() == 32).ok_or(Refusal::MalformedSignature)?;
    mac(secret, timestamp, delivery, body).verify_slice(&given).map_err(|_| Refusal::BadSignature)?;
    if ts < now - TOLERANCE_SECS {
        return Err(Refusal::TimestampTooOld);
    }
    if ts > now + TOLERANCE_SECS {
        return Err(Refusal::TimestampInFuture);
    }
    Ok(())
}

/// A pipeline a webhook call names, with its secret if it has a webhook.
pub struct Target {
    /// The pipeline.
    pub pipeline: PipelineRef,
    /// The signing secret.
    pub secret: Option<String>,
}

/// The tenant of a slug, if there is one.
pub async fn tenant_id(state: &AppState, slug: &str) -> ApiResult<Option<Uuid>> {
    #[derive(sea_orm::FromQueryResult)]
    struct T {
        id: Uuid,
    }
    let t: Option<T> =
        state.store.query_one(state.store.db(), "SELECT id FROM tenants WHERE slug = $1", vec![slug.into()]).await?;
    Ok(t.map(|t| t.id))
}

/// The pipeline of a tenant by name, with its webhook secret.
pub async fn target(state: &AppState, tenant: Uuid, pipeline: &str) -> ApiResult<Option<Target>> {
    #[derive(sea_orm::FromQueryResult)]
    struct Row {
        id: Uuid,
        name: String,
        latest_version: i64,
        archived_at: Option<chrono::DateTime<chrono::Utc>>,
        secret: Option<String>,
    }
    let row: Option<Row> = state
        .store
        .query_one(
            state.store.db(),
            "SELECT p.id, p.name, p.latest_version, p.archived_at, w.secret FROM pipelines p \
             LEFT JOIN webhooks w ON w.pipeline_id = p.id AND w.tenant_id = p.tenant_id \
             WHERE p.tenant_id = $1 AND p.name = $2",
            vec![tenant.into(), pipeline.into()],
        )
        .await?;
    Ok(row.map(|r| Target {
        pipeline: PipelineRef { id: r.id, name: r.name, latest_version: r.latest_version, archived_at: r.archived_at },
        secret: r.secret,
    }))
}

/// Stores a pipeline's secret, replacing any earlier one; true when one was replaced.
pub async fn put_secret(
    store: &Store,
    conn: &impl ConnectionTrait,
    tenant: Uuid,
    pipeline: Uuid,
    secret: &str,
    by: Uuid,
) -> ApiResult<bool> {
    let replaced = store
        .execute(
            conn,
            "UPDATE webhooks SET secret = $3, created_by = $4, created_at = $5 WHERE tenant_id = $1 AND pipeline_id = $2",
            vec![tenant.into(), pipeline.into(), secret.into(), by.into(), chrono::Utc::now().into()],
        )
        .await?;
    if replaced == 0 {
        store
            .execute(
                conn,
                "INSERT INTO webhooks (pipeline_id, tenant_id, secret, created_by, created_at) VALUES ($1, $2, $3, $4, $5)",
                vec![pipeline.into(), tenant.into(), secret.into(), by.into(), chrono::Utc::now().into()],
            )
            .await
            .map_err(|e| {
                if crate::store::is_unique_violation(&e) {
                    ApiError::conflict("the webhook was configured concurrently; try again")
                } else {
                    e.into()
                }
            })?;
    }
    Ok(replaced > 0)
}

/// Removes a pipeline's webhook; true when there was one.
pub async fn delete(store: &Store, conn: &impl ConnectionTrait, tenant: Uuid, pipeline: Uuid) -> ApiResult<bool> {
    let n = store
        .execute(
            conn,
            "DELETE FROM webhooks WHERE tenant_id = $1 AND pipeline_id = $2",
            vec![tenant.into(), pipeline.into()],
        )
        .await?;
    Ok(n > 0)
}

/// Refused calls recorded one by one per tenant and minute, in each server process; those over
/// it are counted, and the count goes into the next refusal that is recorded or, once the
/// minute is over, into an event of its own.
pub const REFUSALS_RECORDED_PER_MINUTE: u32 = 20;

/// The window [`REFUSALS_RECORDED_PER_MINUTE`] counts in.
const REFUSAL_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a refused call is recorded: anyone may call a webhook URL, and without a cap every
/// unauthenticated call would add an event to the tenant's audit chain.
#[derive(Debug, Default)]
pub struct RefusalLimiter {
    tenants: std::sync::Mutex<std::collections::HashMap<Uuid, Window>>,
}

#[derive(Debug)]
struct Window {
    started: std::time::Instant,
    recorded: u32,
    unrecorded: u64,
}

impl Window {
    fn new(started: std::time::Instant) -> Self {
        Window { started, recorded: 0, unrecorded: 0 }
    }

    fn over(&self, now: std::time::Instant) -> bool {
        now.duration_since(self.started) >= REFUSAL_WINDOW
    }
}

impl RefusalLimiter {
    fn tenants(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Uuid, Window>> {
        self.tenants.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `Some(n)` when this refusal is to be recorded, `n` being the refusals of the tenant not
    /// recorded since the last one that was; `None` when it is only counted.
    pub fn admit(&self, tenant: Uuid, now: std::time::Instant) -> Option<u64> {
        let mut tenants = self.tenants();
        let w = tenants.entry(tenant).or_insert_with(|| Window::new(now));
        if w.over(now) {
            w.started = now;
            w.recorded = 0;
        }
        if w.recorded >= REFUSALS_RECORDED_PER_MINUTE {
            if w.unrecorded == 0 {
                tracing::warn!(%tenant, "refused webhook calls over the recorded rate: counting the rest");
            }
            w.unrecorded += 1;
            return None;
        }
        w.recorded += 1;
        Some(std::mem::take(&mut w.unrecorded))
    }

    /// Takes the counts of refusals not recorded one by one of the tenants whose window has ended,
    /// and forgets the windows that ended with nothing pending.
    pub fn take_overdue(&self, now: std::time::Instant) -> Vec<(Uuid, u64)> {
        let mut overdue = Vec::new();
        self.tenants().retain(|tenant, w| {
            if !w.over(now) {
                return true;
            }
            if w.unrecorded > 0 {
                overdue.push((*tenant, std::mem::take(&mut w.unrecorded)));
            }
            false
        });
        overdue
    }

    /// Counts a refusal back that was admitted but could not be recorded.
    pub fn unrecorded(&self, tenant: Uuid, count: u64) {
        self.tenants().entry(tenant).or_insert_with(|| Window::new(std::time::Instant::now())).unrecorded += count;
    }
}

/// Appends a `webhook.refused` event, from an anonymous caller, to the tenant's audit log.
pub async fn record_refused(
    state: &AppState,
    tenant: Uuid,
    pipeline: Option<&str>,
    source: &crate::audit::Source,
    details: serde_json::Value,
) -> Result<(), sea_orm::DbErr> {
    let txn = state.store.write().await?;
    crate::audit::append(
        &state.store,
        &*txn,
        tenant,
        &crate::audit::NewEvent {
            actor: &crate::audit::Actor { kind: "anonymous", id: None, label: "webhook".into() },
            action: "webhook.refused",
            resource_type: "Pipeline",
            resource_id: pipeline,
            resource_version: None,
            outcome: crate::audit::Outcome::Deny,
            policy_ids: &[],
            source,
            details,
        },
    )
    .await?;
    txn.commit().await
}

/// Records, for each tenant whose minute has ended, how many refused calls were only counted (one
/// `webhook.refused` event with the reason `over the recorded rate` and the `count`), so a flood
/// that stops is recorded too.
pub async fn record_unrecorded_refusals(state: &AppState, now: std::time::Instant) {
    for (tenant, count) in state.webhook_refusals.take_overdue(now) {
        let details = serde_json::json!({ "reason": "over the recorded rate", "count": count });
        if let Err(e) = record_refused(state, tenant, None, &crate::audit::Source::default(), details).await {
            tracing::error!(%tenant, error = %e, "recording the count of refused webhook calls failed");
            state.webhook_refusals.unrecorded(tenant, count);
        }
    }
}

/// Every ten seconds, [`record_unrecorded_refusals`].
pub fn spawn_refusal_counts(state: std::sync::Arc<AppState>) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            record_unrecorded_refusals(&state, std::time::Instant::now()).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn refusals_over_the_rate_are_counted_into_the_next_recorded_one() {
        let limiter = RefusalLimiter::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let t0 = std::time::Instant::now();
        for _ in 0..REFUSALS_RECORDED_PER_MINUTE {
            assert_eq!(limiter.admit(a, t0), Some(0));
        }
        for _ in 0..5 {
            assert_eq!(limiter.admit(a, t0 + std::time::Duration::from_secs(30)), None);
        }
        // Another tenant has its own allowance.
        assert_eq!(limiter.admit(b, t0), Some(0));
        // A minute on, the first recorded refusal carries the count of those not recorded.
        let later = t0 + std::time::Duration::from_secs(60);
        assert_eq!(limiter.admit(a, later), Some(5));
        assert_eq!(limiter.admit(a, later), Some(0));
        // One that could not be written is counted in the next.
        limiter.unrecorded(a, 1 + 7);
        assert_eq!(limiter.admit(a, later), Some(8));
        // Once a minute has ended, what is pending is taken, and windows with nothing pending go.
        let recorded = (0..REFUSALS_RECORDED_PER_MINUTE).filter(|_| limiter.admit(a, later).is_some()).count();
        assert_eq!(recorded, REFUSALS_RECORDED_PER_MINUTE as usize - 3);
        assert_eq!(limiter.take_overdue(later + std::time::Duration::from_secs(59)), vec![]);
        assert_eq!(limiter.take_overdue(later + std::time::Duration::from_secs(60)), vec![(a, 3)]);
        assert!(limiter.tenants().is_empty());
    }

    #[test]
    fn signatures_verify_and_refusals_are_precise() {
        let secret = generate_secret();
        assert!(secret.starts_with(SECRET_PREFIX) && secret.len() == SECRET_PREFIX.len() + 43);
        assert_ne!(secret, generate_secret());
        let ts = NOW.to_string();
        let body = br#"{"params":{}}"#;
        let sig = sign(&secret, &ts, None, body);
        assert_eq!(verify(&secret, Some(&ts), None, Some(&sig), body, NOW), Ok(()));
        assert_eq!(verify(&secret, Some(&ts), None, Some(&sig), body, NOW + TOLERANCE_SECS), Ok(()));
        assert_eq!(
            verify(&secret, Some(&ts), None, Some(&sig), body, NOW + TOLERANCE_SECS + 1),
            Err(Refusal::TimestampTooOld)
        );
        assert_eq!(
            verify(&secret, Some(&ts), None, Some(&sig), body, NOW - TOLERANCE_SECS - 1),
            Err(Refusal::TimestampInFuture)
        );
        assert_eq!(verify(&secret, Some(&ts), None, Some(&sig), b"{}", NOW), Err(Refusal::BadSignature));
        assert_eq!(verify("whsec_other", Some(&ts), None, Some(&sig), body, NOW), Err(Refusal::BadSignature));
        // A delivery id is signed with the call: adding, changing or dropping it breaks the
        // signature.
        assert_eq!(verify(&secret, Some(&ts), Some(b"d-1"), Some(&sig), body, NOW), Err(Refusal::BadSignature));
        let with_id = sign(&secret, &ts, Some("d-1"), body);
        assert_eq!(verify(&secret, Some(&ts), Some(b"d-1"), Some(&with_id), body, NOW), Ok(()));
        assert_eq!(verify(&secret, Some(&ts), Some(b"d-2"), Some(&with_id), body, NOW), Err(Refusal::BadSignature));
        assert_eq!(verify(&secret, Some(&ts), None, Some(&with_id), body, NOW), Err(Refusal::BadSignature));
        let other_ts = (NOW + 1).to_string();
        assert_eq!(verify(&secret, Some(&other_ts), None, Some(&sig), body, NOW), Err(Refusal::BadSignature));
        assert_eq!(verify(&secret, None, None, Some(&sig), body, NOW), Err(Refusal::MissingTimestamp));
        assert_eq!(verify(&secret, Some(&ts), None, None, body, NOW), Err(Refusal::MissingSignature));
        assert_eq!(verify(&secret, Some("+1"), None, Some(&sig), body, NOW), Err(Refusal::MalformedTimestamp));
        assert_eq!(verify(&secret, Some(&ts), None, Some(&sig[7..]), body, NOW), Err(Refusal::MalformedSignature));
        assert_eq!(verify(&secret, Some(&ts), None, Some("sha256=abcd"), body, NOW), Err(Refusal::MalformedSignature));
        assert_eq!(
            verify(&secret, Some(&ts), None, Some(&sig.to_uppercase().replace("SHA256", "sha256")), body, NOW),
            Ok(())
        );
    }
}
