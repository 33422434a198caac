//! The event bus: run, stage, task and log events across processes, through Redis pub/sub.
//!
//! Each process keeps its events on a local broadcast channel (what the SSE endpoints read).
//! With Redis configured, every process (`serve` and `worker`) also runs this bus: it publishes
//! each event raised in this process to the channel `{prefix}:events`, and delivers the events
//! other processes published into the local channel, marked `relayed` (never published again).
//! Each process tags its messages with a random origin id and drops its own when they come back.
//!
//! The bus is best effort, like the events themselves: while Redis is unreachable, events are
//! not relayed (clients of other processes miss them; the run's state in the database is
//! unaffected) and the bus reconnects with backoff. It never stops the process. What may have
//! been missed is announced, so watchers know to re-read: a process whose subscription came
//! back delivers a `gap` event locally, and a publisher that had to drop events publishes a
//! `gap` once it reaches Redis again, which every other process delivers.

use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sluice_domain::plan::{RunStatus, StageStatus, TaskStatus};
use tokio::{
    sync::{
        broadcast::{self, error::RecvError},
        watch,
    },
    task::JoinHandle,
    time::{Instant, timeout},
};
use uuid::Uuid;

use super::RunEvent;

/// First wait before reconnecting after Redis went away; doubled up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How long connecting, subscribing or publishing may take before Redis counts as gone.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// After this long without a message, the subscription is checked with a ping.
const IDLE_PING: Duration = Duration::from_secs(30);
/// Most events sent to Redis in one round trip.
const BATCH: usize = 256;

/// An event as it travels between processes.
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    /// The publishing process's bus id.
    origin: Uuid,
    tenant: Uuid,
    run_id: Uuid,
    kind: String,
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    attempt: Option<u32>,
    #[serde(default)]
    lines: Vec<serde_json::Value>,
}

impl Wire {
    fn of(origin: Uuid, e: &RunEvent) -> Self {
        Self {
            origin,
            tenant: e.tenant,
            run_id: e.run_id,
            kind: e.kind.to_owned(),
            index: e.index,
            status: e.status.map(str::to_owned),
            attempt: e.attempt,
            lines: e.lines.clone(),
        }
    }

    /// The local event, with `kind` and `status` mapped back to the engine's names; an unknown
    /// kind or status (a newer or foreign publisher) is refused.
    fn into_event(self) -> Result<RunEvent, String> {
        let kind: &'static str = match self.kind.as_str() {
            "run" => "run",
            "stage" => "stage",
            "task" => "task",
            "log" => "log",
            "gap" => return Ok(RunEvent::gap()),
            other => return Err(format!("unknown event kind `{other}`")),
        };
        let status: Option<&'static str> = match (kind, self.status.as_deref()) {
            (_, None) => None,
            ("run", Some(s)) => Some(s.parse::<RunStatus>().map_err(|e| e.to_string())?.as_str()),
            ("stage", Some(s)) => Some(s.parse::<StageStatus>().map_err(|e| e.to_string())?.as_str()),
            ("task", Some(s)) => Some(s.parse::<TaskStatus>().map_err(|e| e.to_string())?.as_str()),
            (_, Some(s)) => return Err(format!("a `{kind}` event carries no status (got `{s}`)")),
        };
        Ok(RunEvent {
            tenant: self.tenant,
            run_id: self.run_id,
            kind,
            index: self.index,
            status,
            attempt: self.attempt,
            lines: self.lines,
            relayed: true,
        })
    }
}

/// A running bus. Dropping it leaves the bus running for the life of the process (or until
/// the local channel closes); [`EventBus::stop`] ends it.
pub struct EventBus {
    origin: Uuid,
    subscribed: watch::Receiver<bool>,
    tasks: [JoinHandle<()>; 2],
}

impl EventBus {
    /// Starts relaying between `events` (this process's channel) and Redis at `url`, on the
    /// channel `{prefix}:events`. Fails only on a malformed URL; Redis being unreachable is
    /// retried in the background.
    pub fn spawn(url: &str, prefix: &str, events: &broadcast::Sender<RunEvent>) -> anyhow::Result<Self> {
        let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("Redis URL for the event bus: {e}"))?;
        let channel = format!("{prefix}:events");
        let origin = Uuid::new_v4();
        let (subscribed_tx, subscribed) = watch::channel(false);
        let publisher = tokio::spawn(publish(client.clone(), channel.clone(), origin, events.subscribe()));
        let mut relay = Relay { origin, events: events.downgrade(), subscribed: subscribed_tx, lost: false };
        let subscriber = tokio::spawn(async move { follow(client, channel, "event bus", &mut relay).await });
        Ok(Self { origin, subscribed, tasks: [publisher, subscriber] })
    }

    /// This process's origin id on the bus.
    pub fn origin(&self) -> Uuid {
        self.origin
    }

    /// Waits until the bus is subscribed to Redis (events other processes publish from then on
    /// reach this process).
    pub async fn subscribed(&self) {
        let mut rx = self.subscribed.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Stops relaying.
    pub fn stop(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The next wait after a failure: doubled, at most [`MAX_BACKOFF`].
fn next_backoff(b: Duration) -> Duration {
    (b * 2).min(MAX_BACKOFF)
}

/// Adds `e` to the batch to publish, unless it came from another process.
fn encode(batch: &mut Vec<String>, origin: Uuid, e: &RunEvent) {
    if !e.relayed {
        batch.push(serde_json::to_string(&Wire::of(origin, e)).unwrap_or_default());
    }
}

/// Publishes this process's events (those not `relayed`) in order, in batches. While Redis is
/// unreachable, events are dropped and a connection is tried again after a growing pause.
async fn publish(client: redis::Client, channel: String, origin: Uuid, mut rx: broadcast::Receiver<RunEvent>) {
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut backoff = MIN_BACKOFF;
    let mut retry_at = Instant::now();
    let mut dropped: u64 = 0;
    let mut batch: Vec<String> = Vec::with_capacity(BATCH);
    loop {
        let first = match rx.recv().await {
            Ok(e) => e,
            Err(RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "event bus fell behind; some events were not relayed to other processes");
                continue;
            }
            Err(RecvError::Closed) => return,
        };
        batch.clear();
        encode(&mut batch, origin, &first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(e) => encode(&mut batch, origin, &e),
                Err(broadcast::error::TryRecvError::Lagged(n)) => {
                    tracing::warn!(
                        missed = n,
                        "event bus fell behind; some events were not relayed to other processes"
                    );
                }
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            continue;
        }
        if conn.is_none() {
            if Instant::now() < retry_at {
                dropped += batch.len() as u64;
                continue;
            }
            match timeout(IO_TIMEOUT, client.get_multiplexed_async_connection()).await {
                Ok(Ok(c)) => {
                    if dropped > 0 {
                        tracing::info!(dropped, "event bus reconnected to Redis for publishing");
                        // The other processes' watchers learn that events went missing.
                        batch.insert(0, serde_json::to_string(&Wire::of(origin, &RunEvent::gap())).unwrap_or_default());
                    }
                    conn = Some(c);
                    backoff = MIN_BACKOFF;
                    dropped = 0;
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "event bus cannot reach Redis; events are not relayed meanwhile");
                }
                Err(_) => tracing::warn!(retry_in = ?backoff, "event bus: connecting to Redis timed out"),
            }
        }
        let Some(c) = conn.as_mut() else {
            dropped += batch.len() as u64;
            retry_at = Instant::now() + backoff;
            backoff = next_backoff(backoff);
            continue;
        };
        let mut pipe = redis::pipe();
        for message in &batch {
            pipe.cmd("PUBLISH").arg(&channel).arg(message).ignore();
        }
        let sent = match timeout(IO_TIMEOUT, pipe.query_async::<()>(c)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, events = batch.len(), "event bus: publishing to Redis failed; reconnecting");
            conn = None;
            dropped += batch.len() as u64;
            retry_at = Instant::now() + backoff;
            backoff = next_backoff(backoff);
        }
    }
}

/// Someone following a Redis pub/sub channel through [`follow`].
pub(super) trait Follower {
    /// Whether anybody still wants the messages (checked between messages and reconnections).
    fn alive(&self) -> bool;
    /// The subscription is (again) in place, or lost.
    fn subscribed(&mut self, yes: bool);
    /// One message; `false` ends following for good.
    fn message(&mut self, payload: &[u8]) -> bool;
}

/// Follows `channel` until `f` is no longer alive (or refuses a message): subscribes, hands
/// over every message, pings after a quiet while, and subscribes again with a growing pause
/// whenever Redis goes away. `what` names the follower in the logs.
pub(super) async fn follow(client: redis::Client, channel: String, what: &'static str, f: &mut impl Follower) {
    let mut backoff = MIN_BACKOFF;
    loop {
        if !f.alive() {
            return;
        }
        let mut subscribed = false;
        match follow_once(&client, &channel, f, &mut subscribed).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, retry_in = ?backoff, "{what}: Redis subscription lost"),
        }
        f.subscribed(false);
        // A subscription that worked starts the backoff over.
        if subscribed {
            backoff = MIN_BACKOFF;
        }
        tokio::time::sleep(backoff).await;
        backoff = next_backoff(backoff);
    }
}

/// One subscription: until Redis goes away (an error) or the follower is done (Ok).
async fn follow_once(
    client: &redis::Client,
    channel: &str,
    f: &mut impl Follower,
    subscribed: &mut bool,
) -> anyhow::Result<()> {
    let pubsub = timeout(IO_TIMEOUT, client.get_async_pubsub()).await.map_err(|_| anyhow::anyhow!("timed out"))??;
    let (mut sink, mut stream) = pubsub.split();
    timeout(IO_TIMEOUT, sink.subscribe(channel)).await.map_err(|_| anyhow::anyhow!("subscribing timed out"))??;
    *subscribed = true;
    f.subscribed(true);
    tracing::debug!(channel, "subscribed");
    loop {
        let msg = match timeout(IDLE_PING, stream.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => anyhow::bail!("Redis closed the connection"),
            Err(_) => {
                // Quiet for a while: make sure the connection is still there.
                if !f.alive() {
                    return Ok(());
                }
                timeout(IO_TIMEOUT, sink.ping::<redis::Value>())
                    .await
                    .map_err(|_| anyhow::anyhow!("ping timed out"))??;
                continue;
            }
        };
        if !f.message(msg.get_payload_bytes()) {
            return Ok(());
        }
    }
}

/// Delivers other processes' events into the local channel.
struct Relay {
    origin: Uuid,
    events: broadcast::WeakSender<RunEvent>,
    subscribed: watch::Sender<bool>,
    /// The subscription was lost since it was first made: events may have been missed.
    lost: bool,
}

impl Follower for Relay {
    fn alive(&self) -> bool {
        self.events.strong_count() > 0
    }

    fn subscribed(&mut self, yes: bool) {
        self.subscribed.send_replace(yes);
        if !yes {
            self.lost = true;
        } else if std::mem::take(&mut self.lost)
            && let Some(tx) = self.events.upgrade()
        {
            let _ = tx.send(RunEvent::gap());
        }
    }

    fn message(&mut self, payload: &[u8]) -> bool {
        let wire: Wire = match serde_json::from_slice(payload) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(error = %e, "event bus: ignoring a malformed message");
                return true;
            }
        };
        if wire.origin == self.origin {
            return true;
        }
        let event = match wire.into_event() {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "event bus: ignoring an event this version does not know");
                return true;
            }
        };
        let Some(tx) = self.events.upgrade() else { return false };
        // No local subscribers is fine: nobody here is watching.
        let _ = tx.send(event);
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn event(kind: &'static str, status: Option<&'static str>) -> RunEvent {
        RunEvent {
            tenant: Uuid::new_v4(),
            run_id: Uuid::new_v4(),
            kind,
            index: Some(2),
            status,
            attempt: Some(1),
            lines: vec![serde_json::json!({ "at": "now", "stream": "out", "text": "hi" })],
            relayed: false,
        }
    }

    fn round_trip(e: &RunEvent) -> Result<RunEvent, String> {
        let text = serde_json::to_string(&Wire::of(Uuid::nil(), e)).map_err(|e| e.to_string())?;
        serde_json::from_str::<Wire>(&text).map_err(|e| e.to_string())?.into_event()
    }

    #[test]
    fn events_survive_the_wire_with_their_tenant_and_are_marked_relayed() {
        for (kind, status) in
            [("run", Some("timed_out")), ("stage", Some("waiting")), ("task", Some("queued")), ("log", None)]
        {
            let e = event(kind, status);
            let back = round_trip(&e).unwrap();
            assert_eq!(back.tenant, e.tenant);
            assert_eq!(back.run_id, e.run_id);
            assert_eq!((back.kind, back.status, back.index, back.attempt), (kind, status, Some(2), Some(1)));
            assert_eq!(back.lines, e.lines);
            assert!(back.relayed);
        }
    }

    #[test]
    fn unknown_kinds_and_statuses_are_refused() {
        assert!(round_trip(&event("gate", None)).unwrap_err().contains("gate"));
        assert!(round_trip(&event("run", Some("exploded"))).unwrap_err().contains("exploded"));
        // A task status that is not a run status.
        assert!(round_trip(&event("run", Some("queued"))).is_err());
        assert!(round_trip(&event("log", Some("running"))).is_err());
    }
}
