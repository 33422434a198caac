//! Login throttling per account and per client address, kept in the database so that every
//! server process shares the counters. After `threshold` failures in a row a key is blocked, for
//! a time that doubles with every further failure (capped); a success clears the account's count.
//! Unknown accounts are counted like known ones, so the answers do not tell them apart.

use chrono::{DateTime, Duration, Utc};
use sea_orm::{DbErr, FromQueryResult};

use crate::store::{Store, WriteTxn};

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
    last_failure_at: DateTime<Utc>,
    blocked_until: Option<DateTime<Utc>>,
}

/// Throttle key of an account.
pub fn account_key(email: &str) -> String {
    format!("acct:{}", email.trim().to_lowercase())
}

/// Throttle key of a client address.
pub fn ip_key(ip: &str) -> String {
    format!("ip:{ip}")
}

/// Whether a login attempt may check its password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// Go ahead; the attempt is already counted as a failure (see [`succeeded`]).
    Proceed,
    /// A key is blocked for this many more seconds.
    Blocked(u64),
}

fn block_secs(failures: i64, threshold: i64) -> i64 {
    (30_i64 << (failures - threshold).clamp(0, 10)).min(MAX_BLOCK_SECS)
}

/// Checks the keys (each with its threshold) and, unless one is blocked, counts the attempt as a
/// failure of every key, in one transaction with the rows locked. Counting before the password
/// is checked means concurrent attempts cannot all pass the check before any failure is
/// recorded: the attempt that reaches a threshold blocks its key at once.
pub async fn begin(store: &Store, keys: &[(String, i64)]) -> Result<Attempt, DbErr> {
    let now = Utc::now();
    let cutoff = now - Duration::minutes(WINDOW_MINUTES);
    let mut keys = keys.to_vec();
    keys.sort();
    let txn = store.write().await?;
    let mut rows = Vec::with_capacity(keys.len());
    for (key, _) in &keys {
        store
            .execute(
                &*txn,
                "INSERT INTO login_throttle (key, failures, last_failure_at, blocked_until) VALUES ($1, 0, $2, NULL) \
                 ON CONFLICT (key) DO NOTHING",
                vec![key.clone().into(), now.into()],
            )
            .await?;
        let row =
            locked(store, &txn, key).await?.ok_or_else(|| DbErr::RecordNotFound(format!("login_throttle {key}")))?;
        rows.push(row);
    }
    let blocked = rows.iter().filter_map(|r| r.blocked_until.filter(|u| *u > now)).max();
    if let Some(until) = blocked {
        txn.commit().await?;
        return Ok(Attempt::Blocked((until - now).num_seconds().max(1) as u64));
    }
    for ((key, threshold), row) in keys.iter().zip(rows) {
        // Failures older than the window are forgotten.
        let (failures, last) =
            if row.last_failure_at < cutoff { (1, now) } else { (row.failures + 1, row.last_failure_at) };
        let until = (failures >= *threshold).then(|| now + Duration::seconds(block_secs(failures, *threshold)));
        set(store, &txn, key, failures, last, until.or(row.blocked_until)).await?;
    }
    txn.commit().await?;
    Ok(Attempt::Proceed)
}

async fn locked(store: &Store, txn: &WriteTxn, key: &str) -> Result<Option<Row>, DbErr> {
    let sql = format!(
        "SELECT failures, last_failure_at, blocked_until FROM login_throttle WHERE key = $1{}",
        store.for_update()
    );
    store.query_one(&**txn, &sql, vec![key.into()]).await
}

async fn set(
    store: &Store,
    txn: &WriteTxn,
    key: &str,
    failures: i64,
    last: DateTime<Utc>,
    until: Option<DateTime<Utc>>,
) -> Result<(), DbErr> {
    store
        .execute(
            &**txn,
            "UPDATE login_throttle SET failures = $2, last_failure_at = $3, blocked_until = $4 WHERE key = $1",
            vec![key.into(), failures.into(), last.into(), until.into()],
        )
        .await?;
    Ok(())
}

/// After a failed attempt: its failures (counted by [`begin`]) are dated now, and a key past its
/// threshold is blocked from now.
pub async fn failed(store: &Store, keys: &[(String, i64)]) -> Result<(), DbErr> {
    let now = Utc::now();
    let mut keys = keys.to_vec();
    keys.sort();
    let txn = store.write().await?;
    for (key, threshold) in &keys {
        if let Some(row) = locked(store, &txn, key).await? {
            let until = if row.failures >= *threshold {
                Some(now + Duration::seconds(block_secs(row.failures, *threshold)))
            } else {
                row.blocked_until
            };
            set(store, &txn, key, row.failures, now, until).await?;
        }
    }
    txn.commit().await
}

/// After a successful attempt: clears the account's failures and gives back the attempt counted
/// on the other keys, whose block is then the one their last real failure set.
pub async fn succeeded(store: &Store, account: &str, others: &[(String, i64)]) -> Result<(), DbErr> {
    let txn = store.write().await?;
    store.execute(&*txn, "DELETE FROM login_throttle WHERE key = $1", vec![account.into()]).await?;
    for (key, threshold) in others {
        if let Some(row) = locked(store, &txn, key).await? {
            let failures = (row.failures - 1).max(0);
            let until = (failures >= *threshold)
                .then(|| row.last_failure_at + Duration::seconds(block_secs(failures, *threshold)));
            set(store, &txn, key, failures, row.last_failure_at, until).await?;
        }
    }
    txn.commit().await
}
