//! The dispatch doorbell: how a committed "this task is queued" reaches a worker. The database
//! owns the state; a ring only says "look at this task now". A lost ring delays the task until
//! the reaper rings again, so ringing never blocks and never fails the caller.
//!
//! Two doorbells: an in-process channel (embedded mode, no Redis), and Redis through
//! apalis-redis, consumed by `sluice worker` processes (and by `sluice serve --with-worker`).

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock, Weak},
    time::Duration,
};

use anyhow::Context;
use apalis::prelude::{BoxDynError, Data, ParallelizeExt, TaskSink, WorkerBuilder, WorkerBuilderExt, WorkerContext};
use apalis_redis::RedisStorage;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use uuid::Uuid;

use super::{
    Dispatch, Engine,
    backlog::Backlog,
    registry::{self, Gate, Route, WorkerProfile},
    work::{Sandbox, priority_of, run_claimed},
};
use crate::{Config, secrets::SecretsKey, store::Store};

/// Where dispatches are announced.
pub trait Doorbell: Send + Sync {
    /// Announces a queued task attempt; never blocks, never fails (failures are logged).
    fn ring(&self, d: Dispatch);
}

/// The in-process doorbell: the embedded worker reads the other end.
pub struct ChannelDoorbell(pub mpsc::UnboundedSender<Dispatch>);

impl Doorbell for ChannelDoorbell {
    fn ring(&self, d: Dispatch) {
        if self.0.send(d).is_err() {
            tracing::warn!(run = %d.run, task = d.task, "dispatch queue closed; the reaper will push the task again");
        }
    }
}

/// Idle workers look for new dispatches this often even when no wake-up arrives
/// (apalis-redis fetches on its heartbeat timer when the queue was empty). A push is normally
/// announced on the wake channel, so this only bounds how long a dispatch waits when the
/// announcement was lost.
pub const REDIS_POLL: Duration = Duration::from_millis(25);

/// The pub/sub channel on which pushes are announced: each message names the queue that has a
/// new dispatch, and the workers consuming that queue fetch at once.
pub fn wake_channel(prefix: &str) -> String {
    format!("{prefix}:wake")
}

/// How long a fetched dispatch waits for a free slot and for its CPU and memory before it goes
/// back to its queue for another worker.
pub const WAIT_FOR_ROOM: Duration = Duration::from_secs(1);

/// Most dispatches one fetch takes.
const MAX_FETCH: usize = 4;

/// The configuration of `queue`, fetching up to `fetch` dispatches at a time.
fn redis_config(queue: &str, fetch: usize) -> apalis_redis::Config {
    apalis_redis::Config::default()
        .queue(queue)
        .batch_size(fetch.max(1))
        .heartbeat_interval(REDIS_POLL)
        // Redis-side orphan detection after 5 s; the database lease is what really counts.
        .missed_heartbeats(500)
}

/// A connection to `queue`; a consumer fetches up to `fetch` dispatches at a time (a pusher's
/// `fetch` does not matter).
async fn storage(url: &str, queue: &str, fetch: usize) -> anyhow::Result<RedisStorage<Dispatch>> {
    let conn = apalis_redis::connect(url).await.with_context(|| format!("connecting to Redis at {url}"))?;
    Ok(RedisStorage::new(conn).with_config(redis_config(queue, fetch)))
}

/// A label as it appears in a queue name: bytes other than `A-Z a-z 0-9 . _ -` are written
/// `%XX`, so no label set can be mistaken for another (workers' labels never need it).
fn queue_label(label: &str) -> String {
    let mut out = String::with_capacity(label.len());
    for b in label.bytes() {
        if b.is_ascii_alphanumeric() || b"._-".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The Redis queue of the dispatches on `route`: `{prefix}:dispatch` for tasks without
/// `runs_on`, `{prefix}:dispatch:gpu+linux` for the sorted label set, and
/// `{prefix}:dispatch:t:{tenant id}[:labels]` for a tenant's own workers (`self-hosted`).
pub fn queue_name(prefix: &str, route: &Route) -> String {
    let mut q = format!("{prefix}:dispatch");
    if let Some(t) = route.tenant {
        q.push_str(&format!(":t:{t}"));
    }
    if !route.labels.is_empty() {
        q.push(':');
        q.push_str(&route.labels.iter().map(|l| queue_label(l)).collect::<Vec<_>>().join("+"));
    }
    q
}

/// Every queue a worker consumes: one per subset of its labels (the empty set included), on its
/// tenant's side for a tenant's own worker and on the shared side otherwise.
pub fn worker_queues(prefix: &str, profile: &WorkerProfile) -> Vec<String> {
    let labels = &profile.labels;
    let tenant = profile.tenant.as_ref().map(|t| t.id);
    (0u32..(1 << labels.len()))
        .map(|mask| {
            let subset = labels.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, l)| l.clone());
            queue_name(prefix, &Route { tenant, labels: subset.collect() })
        })
        .collect()
}

/// The queue of a dispatch, from its task's `runs_on` (and, for `self-hosted`, its run's
/// tenant), with its task's priority.
async fn route_queue(engine: &Engine, prefix: &str, d: Dispatch) -> (String, i32) {
    let default = || queue_name(prefix, &Route::default());
    let plan = match engine.plan_of(d.run).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(run = %d.run, error = %e, "cannot route the dispatch; using the default queue");
            return (default(), 0);
        }
    };
    let Some(task) = plan.tasks.get(d.task) else { return (default(), 0) };
    if task.runs_on.is_empty() {
        return (default(), task.priority);
    }
    let tenant = if Route::is_self_hosted(task) {
        match engine.tenant_of(d.run).await {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(run = %d.run, error = %e, "cannot route the dispatch; using the default queue");
                return (default(), task.priority);
            }
        }
    } else {
        Uuid::nil()
    };
    (queue_name(prefix, &Route::of(task, tenant)), task.priority)
}

/// How often a process removes from Redis what apalis keeps of the dispatches that were handled.
const VACUUM_EVERY: Duration = Duration::from_secs(10);

/// apalis keeps every handled dispatch's data and metadata in Redis; the database has the
/// outcome, so each process removes them, for the queues it pushes to, every `VACUUM_EVERY`.
async fn vacuum_queues(queues: &mut HashMap<String, RedisStorage<Dispatch>>) {
    use apalis_core::backend::Vacuum;
    for (queue, storage) in queues.iter_mut() {
        match storage.vacuum().await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(queue, removed = n, "removed handled dispatches from Redis"),
            Err(e) => tracing::debug!(queue, error = %e, "removing handled dispatches from Redis failed"),
        }
    }
}

/// The Redis doorbell: rings are pushed as apalis jobs by one background task, in order, each
/// to the queue of its task's route, each dispatch added to its queue's backlog (see
/// `backlog` module) side by side with its ring; the queues pushed to are then announced on
/// the wake channel.
pub struct RedisDoorbell {
    tx: mpsc::UnboundedSender<Dispatch>,
    router: Arc<OnceLock<Weak<Engine>>>,
}

/// Most rings pushed per batch (one backlog round trip for all of them).
const PUSH_BATCH: usize = 256;

impl RedisDoorbell {
    /// Connects to Redis and starts the pusher. Until [`RedisDoorbell::route_with`] is called
    /// every dispatch goes to the default queue.
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<Self> {
        let base = storage(url, &queue_name(prefix, &Route::default()), 1).await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Dispatch>();
        let router: Arc<OnceLock<Weak<Engine>>> = Arc::default();
        let (prefix, routes) = (prefix.to_owned(), router.clone());
        let wakes = wake_channel(&prefix);
        tokio::spawn(async move {
            let mut queues: HashMap<String, RedisStorage<Dispatch>> = HashMap::new();
            queues.insert(queue_name(&prefix, &Route::default()), base.clone());
            let mut vacuum = tokio::time::interval(VACUUM_EVERY);
            vacuum.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut conn = base.clone();
            let mut batch: Vec<(String, Dispatch, f64)> = vec![];
            loop {
                let d = tokio::select! {
                    d = rx.recv() => match d {
                        Some(d) => d,
                        None => break,
                    },
                    _ = vacuum.tick() => {
                        vacuum_queues(&mut queues).await;
                        continue;
                    }
                };
                // Rings already waiting go in the same batch.
                let engine = routes.get().and_then(Weak::upgrade);
                let now = chrono::Utc::now().timestamp_millis();
                let mut next = Some(d);
                while let Some(d) = next {
                    let (queue, priority) = match &engine {
                        Some(engine) => route_queue(engine, &prefix, d).await,
                        None => (queue_name(&prefix, &Route::default()), 0),
                    };
                    batch.push((queue, d, super::backlog::score(priority, now)));
                    next = if batch.len() < PUSH_BATCH { rx.try_recv().ok() } else { None };
                }
                // The entries and the rings go out side by side on the one connection (the
                // entries are sent first; a ring that still arrives first claims its own
                // dispatch, see `handle`).
                let mut entries = conn.clone();
                let add = async {
                    if let Err(e) = super::backlog::add(entries.get_connection(), &batch).await {
                        // Their rings still go out: each claims its own dispatch.
                        tracing::warn!(error = %e, "adding dispatches to the Redis backlog failed");
                    }
                };
                let push = async {
                    // Each queue's rings in one round trip, in order; the queues pushed to are
                    // woken once their rings are out.
                    let mut by_queue: Vec<(&String, Vec<Dispatch>)> = vec![];
                    for (queue, d, _) in &batch {
                        match by_queue.iter_mut().find(|(q, _)| *q == queue) {
                            Some((_, rings)) => rings.push(*d),
                            None => by_queue.push((queue, vec![*d])),
                        }
                    }
                    let mut pushed: Vec<String> = vec![];
                    for (queue, rings) in by_queue {
                        let storage = queues
                            .entry(queue.clone())
                            .or_insert_with_key(|q| base.clone().with_config(redis_config(q, 1)));
                        let n = rings.len();
                        match storage.push_bulk(rings).await {
                            Ok(()) => pushed.push(queue.clone()),
                            Err(e) => {
                                tracing::warn!(queue = %queue, rings = n, error = %e, "pushing dispatches to Redis failed; the reaper will push them again")
                            }
                        }
                    }
                    pushed
                };
                let ((), pushed) = tokio::join!(add, push);
                batch.clear();
                if !pushed.is_empty() {
                    let mut pipe = redis::pipe();
                    for q in pushed {
                        pipe.cmd("PUBLISH").arg(&wakes).arg(q).ignore();
                    }
                    if let Err(e) = pipe.query_async::<()>(conn.get_connection()).await {
                        // The workers find the dispatch on their next poll.
                        tracing::debug!(error = %e, "announcing dispatches failed");
                    }
                }
            }
        });
        Ok(Self { tx, router })
    }

    /// Routes dispatches by their task's `runs_on`, read from `engine`'s plans.
    pub fn route_with(&self, engine: &Arc<Engine>) {
        let _ = self.router.set(Arc::downgrade(engine));
    }
}

impl Doorbell for RedisDoorbell {
    fn ring(&self, d: Dispatch) {
        if self.tx.send(d).is_err() {
            tracing::warn!(run = %d.run, task = d.task, "Redis pusher stopped; the reaper will push the task again");
        }
    }
}

#[derive(Clone)]
struct Shared {
    engine: Arc<Engine>,
    store: Store,
    sandbox: Arc<Sandbox>,
    secrets_key: SecretsKey,
    gate: Arc<Gate>,
    /// One permit per slot, held for a whole execution: shutdown waits for every permit.
    slots: Arc<Semaphore>,
    /// The backlog of the queue consumed (each consumer has its own).
    backlog: Arc<Backlog>,
}

/// Most backlog entries one ring looks at before it gives up its slot (each is a dispatch found
/// claimed already, by a completion of another worker that passed its slot on).
const MAX_POPS: usize = 16;

/// A ring: once this worker has a free slot, it claims the best dispatch of the queue's backlog
/// (the ring's own when the backlog has none) and executes it.
async fn handle(d: Dispatch, shared: Data<Shared>) -> Result<(), BoxDynError> {
    tracing::debug!(run = %d.run, task = d.task, attempt = d.attempt, "dispatch received");
    let backlog = &shared.backlog;
    if shared.engine.answered(&d) {
        backlog.forget(d);
        return Ok(());
    }
    let need = match shared.gate.judge(&shared.engine, d).await {
        Ok(need) => need,
        Err(skip) => {
            shared.gate.skipped(d, skip);
            return Ok(());
        }
    };
    // A slot first, the claim after: a worker claims only what it can start now. Without a slot
    // soon, the ring goes back to its queue for another worker. While it waits, the best of the
    // backlog counts as waiting for this worker, so that a completion passing its slot on steps
    // aside for a dispatch of higher priority.
    let slot = match shared.slots.clone().try_acquire_owned() {
        Ok(slot) => slot,
        Err(_) => {
            let own = priority_of(&shared.engine, d).await;
            let best = match backlog.top().await {
                Some(top) if top != d => own.max(priority_of(&shared.engine, top).await),
                _ => own,
            };
            let waiting = shared.gate.waiting(best);
            let Ok(Ok(slot)) = tokio::time::timeout(WAIT_FOR_ROOM, shared.slots.clone().acquire_owned()).await else {
                shared.engine.doorbell.ring(d);
                return Ok(());
            };
            drop(waiting);
            slot
        }
    };
    let mut slot = Some(slot);
    let mut own = Some(need);
    for _ in 0..MAX_POPS {
        let Some(held) = slot.take() else { break };
        // The best waiting dispatch this worker may execute, and the score to return it with.
        let (x, need, score) = match backlog.pop().await {
            Some((x, _)) if x == d => match own.take() {
                Some(need) => (d, need, None),
                None => {
                    slot = Some(held);
                    continue;
                }
            },
            Some((x, score)) => {
                // Claimed here already: its ring, still to come, is dropped then.
                if shared.engine.answered_already(&x) {
                    slot = Some(held);
                    continue;
                }
                match shared.gate.judge(&shared.engine, x).await {
                    Ok(need) => (x, need, Some(score)),
                    Err(skip) => {
                        // Not for this worker (too big for it): back for another, and this ring
                        // claims its own dispatch instead.
                        if matches!(skip, registry::Skip::Unsuitable(_)) {
                            backlog.put_back(x, score).await;
                        }
                        shared.gate.skipped(x, skip);
                        match own_turn(&shared, d, &mut own).await {
                            Some(need) => (d, need, None),
                            None => return Ok(()),
                        }
                    }
                }
            }
            // An empty backlog (or none reachable).
            None => match own_turn(&shared, d, &mut own).await {
                Some(need) => (d, need, None),
                None => return Ok(()),
            },
        };
        let Ok(reserved) = tokio::time::timeout(WAIT_FOR_ROOM, shared.gate.capacity.reserve(need)).await else {
            // No room for it here soon: back to the queue, rung again for another worker.
            if let Some(score) = score {
                backlog.put_back(x, score).await;
            }
            drop(held);
            shared.engine.doorbell.ring(x);
            return Ok(());
        };
        let claimed = match shared.engine.claim(x).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(run = %x.run, task = x.task, attempt = x.attempt, error = %e, "claiming a task failed; the reaper will ring it again");
                if let Some(score) = score {
                    backlog.put_back(x, score).await;
                }
                return Ok(());
            }
        };
        let Some(claimed) = claimed else {
            // Claimed already, or no longer queued: the next one.
            drop(reserved);
            slot = Some(held);
            continue;
        };
        let room = super::Room { slot: held, reserved };
        if let Err(e) =
            run_claimed(&shared.engine, &shared.store, x, claimed, shared.sandbox.clone(), &shared.secrets_key, room)
                .await
        {
            tracing::warn!(run = %x.run, task = x.task, attempt = x.attempt, error = %e, "task execution failed");
        }
        return Ok(());
    }
    // Every entry looked at was claimed already: the ring goes out again for its own dispatch,
    // should that still wait.
    if own.is_some() {
        shared.engine.doorbell.ring(d);
    }
    Ok(())
}

/// The ring's own dispatch `d`, once (`own` holds what it needs until then), unless it was
/// claimed meanwhile by a slot passed on. Its entry is normally gone with another worker, who
/// claims it; but the ring may also have overtaken its entry, so the claim (in the database)
/// decides. The entry, if there, is taken out.
async fn own_turn(shared: &Shared, d: Dispatch, own: &mut Option<registry::Need>) -> Option<registry::Need> {
    let need = own.take()?;
    if shared.engine.answered(&d) {
        return None;
    }
    shared.backlog.take(d).await;
    Some(need)
}

/// How many dispatches a worker with `slots` slots takes per fetch: a fetch is a round trip,
/// so taking a few at once raises throughput under load, but what a worker takes and cannot
/// start waits for its slots (up to [`WAIT_FOR_ROOM`], then goes back to its queue) while another
/// worker may be idle. Half the slots, at most [`MAX_FETCH`], bounds that.
fn fetch_size(slots: usize) -> usize {
    (slots / 2).clamp(1, MAX_FETCH)
}

/// Consumes dispatches from Redis, from every queue `gate`'s worker serves, with its slots as
/// concurrent executions, until `stop` is notified; then takes no new work and returns once the
/// executions in flight have finished.
#[allow(clippy::too_many_arguments)]
pub async fn consume_redis(
    engine: Arc<Engine>,
    store: Store,
    url: String,
    prefix: String,
    gate: Arc<Gate>,
    sandbox: Arc<Sandbox>,
    secrets_key: SecretsKey,
    stop: Arc<Notify>,
) -> anyhow::Result<()> {
    let slots = gate.profile.slots.max(1);
    let queues = worker_queues(&prefix, &gate.profile);
    let slots_held = Arc::new(Semaphore::new(slots));
    super::work::spawn_handed(
        engine.clone(),
        store.clone(),
        gate.clone(),
        slots_held.clone(),
        sandbox.clone(),
        secrets_key.clone(),
    );
    // One notification stops every queue's consumer, and the tasks handed to this worker.
    let (stopped_tx, stopped) = watch::channel(false);
    let closing = engine.clone();
    tokio::spawn(async move {
        stop.notified().await;
        closing.close_handoffs();
        let _ = stopped_tx.send(true);
    });
    // Different apalis worker names per process and queue: a restarted worker never collides
    // with its predecessor's registration in Redis.
    let tag = &Uuid::new_v4().simple().to_string()[..6];
    let mut consumers = tokio::task::JoinSet::new();
    let mut wakers = HashMap::new();
    for (i, queue) in queues.into_iter().enumerate() {
        let apalis_name = format!("{}/{tag}/{i}", engine.worker_name());
        let mut first = storage(&url, &queue, fetch_size(slots)).await?;
        let (wake_tx, wake_rx) = mpsc::unbounded_channel();
        wakers.insert(queue.clone(), wake_tx);
        let shared = Shared {
            engine: engine.clone(),
            store: store.clone(),
            sandbox: sandbox.clone(),
            secrets_key: secrets_key.clone(),
            gate: gate.clone(),
            slots: slots_held.clone(),
            backlog: Arc::new(Backlog::new(&queue, first.get_connection().clone())),
        };
        consumers.spawn(consume_queue(shared, url.clone(), queue, apalis_name, first, stopped.clone(), wake_rx));
    }
    let listener = tokio::spawn(listen_for_wakes(url.clone(), wake_channel(&prefix), wakers));
    let _listener = AbortOnDrop(listener);
    // Once stopping, the drain is over when every slot is free again (no execution runs, and
    // none starts) and every result is committed (a completion whose commit is retried has
    // freed its slot already); apalis's own workers are not waited for beyond that, since
    // with several executions in flight they can take until the grace period to notice they
    // were stopped.
    let mut stopping = stopped.clone();
    let mut drained = Box::pin(async {
        let _ = stopping.wait_for(|s| *s).await;
        let all = slots_held.acquire_many(slots as u32).await;
        engine.all_recorded().await;
        all
    });
    loop {
        tokio::select! {
            r = consumers.join_next() => match r {
                Some(r) => r.context("queue consumer")?,
                None => break,
            },
            _ = &mut drained => {
                consumers.abort_all();
                // A dispatch still waiting for a slot gives up (and is rung again for
                // another worker) instead of taking one as the drain lets go of them.
                slots_held.close();
                return Ok(());
            }
        }
    }
    // Every consumer ended first. The drain's wait is let go of, slots it took included (it
    // would hold them while the wait below waits for all of them); executions already started
    // finish, and their completions still reach the database.
    drop(drained);
    let _all = slots_held.acquire_many(slots as u32).await;
    engine.all_recorded().await;
    slots_held.close();
    Ok(())
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tells the consumer of each queue announced on the wake channel to fetch now.
struct WakeListener(HashMap<String, mpsc::UnboundedSender<()>>);

impl super::bus::Follower for WakeListener {
    fn alive(&self) -> bool {
        self.0.values().any(|w| !w.is_closed())
    }

    fn subscribed(&mut self, yes: bool) {
        // A wake-up may have been missed while not subscribed: every consumer looks.
        if yes {
            for w in self.0.values() {
                let _ = w.send(());
            }
        }
    }

    fn message(&mut self, payload: &[u8]) -> bool {
        if let Some(w) = std::str::from_utf8(payload).ok().and_then(|q| self.0.get(q)) {
            let _ = w.send(());
        }
        true
    }
}

/// Follows the wake channel for `wakers`' queues. While Redis is unreachable the consumers
/// still poll.
async fn listen_for_wakes(url: String, channel: String, wakers: HashMap<String, mpsc::UnboundedSender<()>>) {
    let Ok(client) = redis::Client::open(url.as_str()) else { return };
    super::bus::follow(client, channel, "wake-ups", &mut WakeListener(wakers)).await;
}

/// Consumes one queue until `stopped` turns true; a message on `wake` makes it fetch at once.
async fn consume_queue(
    shared: Shared,
    url: String,
    queue: String,
    apalis_name: String,
    first: RedisStorage<Dispatch>,
    stopped: watch::Receiver<bool>,
    mut wake: mpsc::UnboundedReceiver<()>,
) {
    let mut storage = Some(first);
    // apalis-redis gives up for good on a fetch error, including "worker not registered" after
    // Redis lost its keys (restarted empty, flushed): build a new worker, which registers again,
    // and keep going. Executions in flight keep their permits across the rebuild.
    loop {
        let backend = match storage.take() {
            Some(s) => s,
            None => match self::storage(&url, &queue, fetch_size(shared.gate.profile.slots)).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(queue, error = %e, "reconnecting to Redis failed; retrying");
                    if wait_or_stop(stopped.clone()).await {
                        break;
                    }
                    continue;
                }
            },
        };
        match consume_once(&apalis_name, backend, shared.clone(), stopped.clone(), &mut wake).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(queue, error = %e, "the Redis consumer stopped; starting it again");
                if wait_or_stop(stopped.clone()).await {
                    break;
                }
            }
        }
    }
}

/// Waits a second before the consumer starts again; true when stopping meanwhile.
async fn wait_or_stop(mut stopped: watch::Receiver<bool>) -> bool {
    tokio::select! {
        r = stopped.wait_for(|s| *s) => r.is_ok(),
        () = tokio::time::sleep(Duration::from_secs(1)) => false,
    }
}

/// One apalis worker on `backend`, until stopping (Ok) or the worker fails (Err).
async fn consume_once(
    name: &str,
    backend: RedisStorage<Dispatch>,
    shared: Shared,
    stopped: watch::Receiver<bool>,
    wake: &mut mpsc::UnboundedReceiver<()>,
) -> anyhow::Result<()> {
    let slots = shared.gate.profile.slots.max(1);
    let worker = WorkerBuilder::new(name)
        .backend(backend)
        .data(shared)
        .concurrency(slots)
        .parallelize(tokio::spawn)
        .build(handle);
    // apalis-redis polls: after an empty fetch the worker waits for its heartbeat timer to wake
    // it, and that wake-up is lost when the timer fires while a fetch is in flight (the worker
    // then never fetches again). Polling the worker on our own tick as well keeps it looking
    // every `REDIS_POLL`; a wake-up (a push announced on the wake channel) polls it at once.
    let run = worker.run_with_ctx(move |ctx: WorkerContext| {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
            ctx.stop()
        }
    });
    let mut tick = tokio::time::interval(REDIS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Nudged { inner: Box::pin(run), tick, wake }.await.map_err(|e| anyhow::anyhow!("worker: {e}"))
}

/// Polls `inner` whenever it asks to be, at every tick, and at every wake-up.
struct Nudged<'a, F> {
    inner: std::pin::Pin<Box<F>>,
    tick: tokio::time::Interval,
    wake: &'a mut mpsc::UnboundedReceiver<()>,
}

impl<F: Future> Future for Nudged<'_, F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        while self.tick.poll_tick(cx).is_ready() {}
        while let std::task::Poll::Ready(Some(())) = self.wake.poll_recv(cx) {}
        self.inner.as_mut().poll(cx)
    }
}

/// Waits for SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Drains a Redis consumer started by [`consume_redis`] with `stop`: no new work, the tasks in
/// flight finish for up to `grace`, then those still running are given back (see
/// [`super::Core::release_in_flight`]); returns once their results are committed, or after a
/// bounded wait. An error is the consumer's own.
pub async fn drain_consumer(
    engine: &Engine,
    stop: &Notify,
    mut consumer: tokio::task::JoinHandle<anyhow::Result<()>>,
    grace: Duration,
) -> anyhow::Result<()> {
    tracing::info!(grace_seconds = grace.as_secs(), "shutting down: no new work; waiting for tasks in flight");
    stop.notify_one();
    match engine.settle(grace, &mut consumer).await {
        Some(r) => r.context("worker task")?,
        None => Ok(()),
    }
}

/// The profile of this process's worker, named `name`, from the configuration and, for a
/// tenant's own worker, the tenant its token may register for.
pub async fn worker_profile(
    config: &Config,
    store: &Store,
    name: String,
    mode: &'static str,
) -> anyhow::Result<(WorkerProfile, Option<registry::TenantGrant>)> {
    let grant = match (&config.worker.tenant, &config.worker.token) {
        (Some(slug), Some(token)) => Some(registry::authorize_tenant_worker(store, slug, token, &name).await?),
        _ => None,
    };
    let owner = grant.as_ref().map(|g| g.owner.clone());
    Ok((WorkerProfile::new(&config.worker, name, owner, config.worker_slots, mode), grant))
}

/// `sluice worker`: registers under its name (refused while a live worker has it), consumes
/// dispatches from Redis and executes them against the database until SIGTERM or Ctrl-C, then
/// lets executions in flight finish (up to `SLUICE_WORKER_DRAIN_SECONDS`), gives back those
/// still running (see [`super::Core::release_in_flight`]) and marks itself stopped.
pub async fn run_worker(config: Config) -> anyhow::Result<()> {
    let url = config.redis_url.clone().context("`sluice worker` needs SLUICE_REDIS_URL")?;
    let secrets_key = SecretsKey::load(&config).context("loading the key for tenant secrets")?;
    let name = config.worker.name.clone().unwrap_or_else(super::worker_name);
    let store = Store::connect(&config.database_url, config.db_max_connections, &name)
        .await
        .context("connecting to the database")?;
    let (profile, grant) = worker_profile(&config, &store, name, "worker").await?;
    let registration =
        Arc::new(registry::register(&store, &profile, grant.as_ref(), super::Timings::from_env()).await?);
    let result = serve_as_worker(&config, url, store, secrets_key, profile, &registration).await;
    if let Err(e) = registration.stop().await {
        tracing::warn!(error = %e, "marking this worker stopped failed; it will count as lost");
    }
    result
}

async fn serve_as_worker(
    config: &Config,
    url: String,
    store: Store,
    secrets_key: SecretsKey,
    profile: WorkerProfile,
    registration: &Arc<registry::Registration>,
) -> anyhow::Result<()> {
    let sandbox = super::work::prepare_sandbox(config)?;
    // Completions queue the next tasks: this process rings the same doorbell.
    let doorbell = Arc::new(RedisDoorbell::connect(&url, &config.redis_prefix).await?);
    let engine = Arc::new(Engine::named(store.clone(), doorbell.clone(), profile.name.clone()));
    engine.set_tenant_task_limit(config.tenant_max_running_tasks);
    doorbell.route_with(&engine);
    // This process's task and log events reach the clients of every `sluice serve`.
    super::bus::EventBus::spawn(&url, &config.redis_prefix, &engine.event_sender())
        .context("starting the event bus")?;
    let gate = Gate::new(profile);
    let mut taken_over = registration.spawn_heartbeat(gate.capacity.clone());
    tracing::info!(
        worker = engine.worker_name(),
        slots = gate.profile.slots,
        labels = ?gate.profile.advertised_labels(),
        cpu = gate.profile.cpu_millis as f64 / 1000.0,
        memory_mib = gate.profile.memory_bytes >> 20,
        tenant = gate.profile.tenant.as_ref().map(|t| t.slug.as_str()),
        "worker started"
    );
    super::work::announce_task_users(&sandbox);
    let stop = Arc::new(Notify::new());
    let mut consumer = tokio::spawn(consume_redis(
        engine.clone(),
        store,
        url.clone(),
        config.redis_prefix.clone(),
        gate,
        sandbox,
        secrets_key,
        stop.clone(),
    ));
    let mut failure = None;
    tokio::select! {
        r = &mut consumer => return r.context("worker task")?,
        () = shutdown_signal() => {}
        _ = taken_over.wait_for(|t| *t) => {
            failure = Some(anyhow::anyhow!(
                "worker {:?} was taken over by another process after missing its heartbeats; stopped",
                registration.name()
            ));
        }
    }
    drain_consumer(&engine, &stop, consumer, config.worker_drain).await?;
    failure.map_or(Ok(()), Err)
}
