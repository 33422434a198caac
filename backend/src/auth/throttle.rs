//! Login throttling per account and per client address, kept in the database so that every
//! server process shares the counters. After `threshold` failures in a row a key is blocked, for
//! a time that doubles with every further failure (capped); a success clears the account's count.
//! Unknown accounts are counted like known ones, so the answers do not tell them apart.

use chrono::{Duration, Utc};
use sea_orm::{DbErr, FromQueryResult};

use crate::store::Store;

/// Failures allowed in a row for one account before it is blocked.
pub const ACCOUNT_THRESHOLD: i64 = 5;
/// Failures allowed in a row from one address before it is blocked.
pub const IP_THRESHOLD: i64 = 10;
/// Failures older than this are forgotten.
const WINDOW_MINUTES: i64 = 15;
const MAX_BLOCK_SECS: i64 = 15 * 60;

#[derive(FromQueryResult)]
struct Row {
    failures: i64,
}

#[derive(FromQueryResult)]
struct Blocked {
    blocked_until: Option<chrono::DateTime<Utc>>,
}

/// Throttle key of an account.
pub fn account_key(email: &str) -> String {
    format!("acct:{}", email.trim().to_lowercase())
}

/// Throttle key of a client address.
pub fn ip_key(ip: &str) -> String {
    format!("ip:{ip}")
}

/// Seconds until the first of `keys` is unblocked, if any is blocked.
pub async fn blocked_for(store: &Store, keys: &[String]) -> Result<Option<u64>, DbErr> {
    let now = Utc::now();
    let mut longest: Option<u64> = None;
    for key in keys {
        let row: Option<Blocked> = store
            .query_one(store.db(), "SELECT blocked_until FROM login_throttle WHERE key = $1", vec![key.clone().into()])
            .await?;
        if let Some(until) = row.and_then(|r| r.blocked_until).filter(|u| *u > now) {
            let secs = (until - now).num_seconds().max(1) as u64;
            longest = Some(longest.map_or(secs, |l| l.max(secs)));
        }
    }
    Ok(longest)
}

/// Records one failure for a key; blocks it past its threshold.
pub async fn record_failure(store: &Store, key: &str, threshold: i64) -> Result<(), DbErr> {
    let now = Utc::now();
    let cutoff = now - Duration::minutes(WINDOW_MINUTES);
    let txn = store.write().await?;
    let row: Option<Row> = store
        .query_one(
            &*txn,
            "INSERT INTO login_throttle (key, failures, last_failure_at, blocked_until) VALUES ($1, 1, $2, NULL) \
             ON CONFLICT (key) DO UPDATE SET \
               failures = CASE WHEN login_throttle.last_failure_at < $3 THEN 1 ELSE login_throttle.failures + 1 END, \
               last_failure_at = $2 \
             RETURNING failures",
            vec![key.into(), now.into(), cutoff.into()],
        )
        .await?;
    let failures = row.map_or(1, |r| r.failures);
    if failures >= threshold {
        let exp = (failures - threshold).min(10) as u32;
        let secs = (30_i64 << exp).min(MAX_BLOCK_SECS);
        store
            .execute(
                &*txn,
                "UPDATE login_throttle SET blocked_until = $2 WHERE key = $1",
                vec![key.into(), (now + Duration::seconds(secs)).into()],
            )
            .await?;
    }
    txn.commit().await
}

/// Clears an account's failures after a successful login.
pub async fn clear(store: &Store, key: &str) -> Result<(), DbErr> {
    let txn = store.write().await?;
    store.execute(&*txn, "DELETE FROM login_throttle WHERE key = $1", vec![key.into()]).await?;
    txn.commit().await
}
