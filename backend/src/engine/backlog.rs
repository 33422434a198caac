//! A Redis queue's backlog in priority order. apalis-redis queues are lists, first in first out;
//! so beside each queue a sorted set (`{queue}:by-priority`) holds the dispatches that were rung
//! on it, scored like the embedded ready queue: priority × 1 s − the time it was rung, highest
//! first, so every second of waiting counts as one point of priority and nothing starves.
//!
//! A ring (an apalis job) is then a token: "one dispatch waits in this queue". The worker that
//! takes a token, once it has a free slot, claims the best dispatch of the set, whichever ring
//! brought it. Every entry comes with a ring of its own and a ring claims at most one entry, so
//! the tokens never fall short of the dispatches waiting; an entry found claimed already is
//! passed over for the next. The
//! database stays the record of truth: a set lost with Redis (or an entry taken by a worker that
//! died) only delays its task until the reaper rings it again.

use std::sync::Mutex;

use redis::aio::ConnectionManager;
use uuid::Uuid;

use super::{Dispatch, work::AGING_MS};

/// Stale entries removed in one go at most (more wait for the next pop).
const FORGET_BATCH: usize = 64;

/// The sorted set beside `queue`.
fn key(queue: &str) -> String {
    format!("{queue}:by-priority")
}

/// A dispatch as a member of the set.
fn member(d: &Dispatch) -> String {
    format!("{}:{}:{}", d.run, d.task, d.attempt)
}

fn parse(member: &str) -> Option<Dispatch> {
    let mut parts = member.split(':');
    let run = Uuid::parse_str(parts.next()?).ok()?;
    let task = parts.next()?.parse().ok()?;
    let attempt = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some(Dispatch { run, task, attempt })
}

/// The score of a dispatch of `priority` rung at `now_ms`: higher is taken first. (Two waiting
/// dispatches never change order as they wait, so this static score gives the aging order.)
pub(super) fn score(priority: i32, now_ms: i64) -> f64 {
    // Exact in an f64: |priority × 1000| ≤ 200,000 and epoch milliseconds stay below 2^53.
    (i64::from(priority) * AGING_MS - now_ms) as f64
}

/// Adds rung dispatches (`(queue, dispatch, score)`) to their queues' sets in one round trip;
/// one already there keeps its place (a dispatch rung again does not lose its waiting time).
pub(super) async fn add(conn: &mut ConnectionManager, entries: &[(String, Dispatch, f64)]) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    for (queue, d, score) in entries {
        pipe.cmd("ZADD").arg(key(queue)).arg("NX").arg(*score).arg(member(d)).ignore();
    }
    pipe.query_async(conn).await
}

/// One queue's set, as its consumer uses it.
pub(super) struct Backlog {
    key: String,
    conn: ConnectionManager,
    /// Entries of dispatches this process claimed without them, removed with the next pop.
    stale: Mutex<Vec<String>>,
}

impl Backlog {
    /// The set beside `queue`, reached through `conn`.
    pub(super) fn new(queue: &str, conn: ConnectionManager) -> Self {
        Self { key: key(queue), conn, stale: Mutex::default() }
    }

    /// Drops `d`'s entry (its ring was answered: the dispatch is claimed already), with the next
    /// pop or, once many are waiting, at once.
    pub(super) fn forget(&self, d: Dispatch) {
        let batch = {
            let Ok(mut stale) = self.stale.lock() else { return };
            stale.push(member(&d));
            if stale.len() < FORGET_BATCH {
                return;
            }
            std::mem::take(&mut *stale)
        };
        let (mut conn, key) = (self.conn.clone(), self.key.clone());
        tokio::spawn(async move {
            if let Err(e) = redis::cmd("ZREM").arg(&key).arg(batch).query_async::<i64>(&mut conn).await {
                tracing::debug!(error = %e, "removing claimed dispatches from the backlog failed");
            }
        });
    }

    /// Takes the best waiting dispatch, with its score; `None` when the set is empty or Redis
    /// cannot be reached (the caller then falls back on its ring's own dispatch).
    pub(super) async fn pop(&self) -> Option<(Dispatch, f64)> {
        let stale = self.stale.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default();
        let mut pipe = redis::pipe();
        if !stale.is_empty() {
            pipe.cmd("ZREM").arg(&self.key).arg(stale).ignore();
        }
        pipe.cmd("ZPOPMAX").arg(&self.key);
        loop {
            let popped: (Vec<(String, f64)>,) = match pipe.query_async(&mut self.conn.clone()).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(error = %e, "taking from the backlog failed");
                    return None;
                }
            };
            let (m, score) = popped.0.into_iter().next()?;
            match parse(&m) {
                Some(d) => return Some((d, score)),
                None => tracing::warn!(entry = m, "dropped an unreadable backlog entry"),
            }
            pipe = redis::pipe();
            pipe.cmd("ZPOPMAX").arg(&self.key);
        }
    }

    /// The best waiting dispatch, left in place.
    pub(super) async fn top(&self) -> Option<Dispatch> {
        let top: Vec<String> =
            redis::cmd("ZREVRANGE").arg(&self.key).arg(0).arg(0).query_async(&mut self.conn.clone()).await.ok()?;
        top.first().and_then(|m| parse(m))
    }

    /// Puts a popped dispatch back where it was.
    pub(super) async fn put_back(&self, d: Dispatch, score: f64) {
        let r: redis::RedisResult<i64> =
            redis::cmd("ZADD").arg(&self.key).arg(score).arg(member(&d)).query_async(&mut self.conn.clone()).await;
        if let Err(e) = r {
            tracing::warn!(run = %d.run, task = d.task, error = %e, "returning a dispatch to the backlog failed; the reaper will ring it again");
        }
    }

    /// Takes `d` itself out of the set, if it is there: false when it was not (another worker
    /// took it, or it was never added). When Redis cannot be reached the answer is true.
    pub(super) async fn take(&self, d: Dispatch) -> bool {
        let r: redis::RedisResult<i64> =
            redis::cmd("ZREM").arg(&self.key).arg(member(&d)).query_async(&mut self.conn.clone()).await;
        r.map_or(true, |n| n > 0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn members_read_back_as_their_dispatch() {
        let d = Dispatch { run: Uuid::new_v4(), task: 17, attempt: 3 };
        assert_eq!(parse(&member(&d)), Some(d));
        for bad in ["", "x:1:1", &format!("{}:1", d.run), &format!("{}:1:1:1", d.run), &format!("{}:-1:1", d.run)] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn higher_priority_first_and_a_second_of_waiting_counts_as_a_point() {
        let t = 1_800_000_000_000;
        assert!(score(5, t) > score(0, t));
        assert!(score(0, t) > score(0, t + 1), "older first among equals");
        // Rung 3 s earlier at priority 0, it goes before priority 2 rung now, not before 4.
        assert!(score(0, t - 3_000) > score(2, t));
        assert!(score(0, t - 3_000) < score(4, t));
        assert_eq!(score(200, t) - score(-200, t), 400_000.0, "the extremes stay exact");
    }

    /// A backlog on the test Redis (`SLUICE_TEST_REDIS_URL`, default redis://127.0.0.1:6379)
    /// under a key of its own.
    async fn backlog() -> (Backlog, ConnectionManager, String) {
        let url = std::env::var("SLUICE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let client = redis::Client::open(url.as_str()).unwrap();
        let conn = client.get_connection_manager().await.expect("Redis is reachable");
        let queue = format!("sluice-test-{}:dispatch", Uuid::new_v4().simple());
        (Backlog::new(&queue, conn.clone()), conn, queue)
    }

    fn d(task: usize) -> Dispatch {
        Dispatch { run: Uuid::nil(), task, attempt: 1 }
    }

    #[tokio::test]
    async fn the_backlog_gives_the_best_first_and_keeps_what_was_rung_again_in_place() {
        let (b, mut conn, queue) = backlog().await;
        let t = 1_800_000_000_000;
        let entries = [(0, score(0, t)), (1, score(-5, t + 1)), (2, score(10, t + 2)), (3, score(0, t + 3))];
        let rung: Vec<_> = entries.iter().map(|(i, s)| (queue.clone(), d(*i), *s)).collect();
        add(&mut conn, &rung).await.unwrap();
        // Rung again later (the reaper): its place does not change.
        add(&mut conn, &[(queue.clone(), d(0), score(0, t + 60_000))]).await.unwrap();
        assert_eq!(b.top().await, Some(d(2)));
        let (best, best_score) = b.pop().await.unwrap();
        assert_eq!(best, d(2));
        // Returned, it is the best again.
        b.put_back(best, best_score).await;
        assert_eq!(b.pop().await.map(|p| p.0), Some(d(2)));
        // A dispatch claimed without its entry is forgotten before the next pop.
        b.forget(d(0));
        assert_eq!(b.pop().await.map(|p| p.0), Some(d(3)));
        // Taking a dispatch itself: once only.
        assert!(b.take(d(1)).await);
        assert!(!b.take(d(1)).await);
        assert_eq!(b.pop().await, None);
        assert_eq!(b.top().await, None);
    }
}
