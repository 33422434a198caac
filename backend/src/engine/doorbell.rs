//! The dispatch doorbell: how a committed "this task is queued" reaches a worker. The database
//! owns the state; a ring only says "look at this task now". A lost ring delays the task until
//! the reaper rings again, so ringing never blocks and never fails the caller.
//!
//! Two doorbells: an in-process channel (embedded mode, no Redis), and Redis through
//! apalis-redis, consumed by `sluice worker` processes (and by `sluice serve --with-worker`).

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use apalis::prelude::{BoxDynError, Data, ParallelizeExt, TaskSink, WorkerBuilder, WorkerBuilderExt, WorkerContext};
use apalis_redis::RedisStorage;
use tokio::sync::{Notify, Semaphore, mpsc};

use super::{Dispatch, Engine, work::run_one};
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

/// Idle workers look for new dispatches this often (apalis-redis fetches on its heartbeat
/// timer when the queue was empty).
pub const REDIS_POLL: Duration = Duration::from_millis(10);

fn redis_config(prefix: &str) -> apalis_redis::Config {
    apalis_redis::Config::default()
        .queue(format!("{prefix}:dispatch"))
        // One at a time: a worker never hoards dispatches another idle worker could take.
        .batch_size(1)
        .heartbeat_interval(REDIS_POLL)
        // Redis-side orphan detection after 5 s; the database lease is what really counts.
        .missed_heartbeats(500)
}

async fn storage(url: &str, prefix: &str) -> anyhow::Result<RedisStorage<Dispatch>> {
    let conn = apalis_redis::connect(url).await.with_context(|| format!("connecting to Redis at {url}"))?;
    Ok(RedisStorage::new(conn).with_config(redis_config(prefix)))
}

/// The Redis doorbell: rings are pushed as apalis jobs by one background task, in order.
pub struct RedisDoorbell {
    tx: mpsc::UnboundedSender<Dispatch>,
}

impl RedisDoorbell {
    /// Connects to Redis and starts the pusher.
    pub async fn connect(url: &str, prefix: &str) -> anyhow::Result<Self> {
        let mut storage = storage(url, prefix).await?;
        let (tx, mut rx) = mpsc::unbounded_channel::<Dispatch>();
        tokio::spawn(async move {
            while let Some(d) = rx.recv().await {
                if let Err(e) = storage.push(d).await {
                    tracing::warn!(run = %d.run, task = d.task, error = %e, "pushing a dispatch to Redis failed; the reaper will push it again");
                }
            }
        });
        Ok(Self { tx })
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
    work_root: PathBuf,
    secrets_key: SecretsKey,
}

async fn handle(d: Dispatch, shared: Data<Shared>) -> Result<(), BoxDynError> {
    tracing::debug!(run = %d.run, task = d.task, attempt = d.attempt, "dispatch received");
    if let Err(e) = run_one(&shared.engine, &shared.store, d, shared.work_root.clone(), &shared.secrets_key).await {
        tracing::warn!(run = %d.run, task = d.task, attempt = d.attempt, error = %e, "task execution failed");
    }
    Ok(())
}

/// Consumes dispatches from Redis with `slots` concurrent executions until `stop` is notified;
/// then takes no new work and returns once the executions in flight have finished.
#[allow(clippy::too_many_arguments)]
pub async fn consume_redis(
    engine: Arc<Engine>,
    store: Store,
    url: String,
    prefix: String,
    slots: usize,
    work_root: PathBuf,
    secrets_key: SecretsKey,
    stop: Arc<Notify>,
) -> anyhow::Result<()> {
    let slots = slots.max(1);
    let inflight = Arc::new(Semaphore::new(slots));
    let shared = Shared { engine: engine.clone(), store, work_root, secrets_key };
    let mut storage = Some(storage(&url, &prefix).await?);
    // apalis-redis gives up for good on a fetch error, including "worker not registered" after
    // Redis lost its keys (restarted empty, flushed): build a new worker, which registers again,
    // and keep going. Executions in flight keep their permits across the rebuild.
    loop {
        let backend = match storage.take() {
            Some(s) => s,
            None => match self::storage(&url, &prefix).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "reconnecting to Redis failed; retrying");
                    if wait_or_stop(&stop).await {
                        break;
                    }
                    continue;
                }
            },
        };
        match consume_once(&engine, backend, shared.clone(), slots, inflight.clone(), stop.clone()).await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "the Redis consumer stopped; starting it again");
                if wait_or_stop(&stop).await {
                    break;
                }
            }
        }
    }
    // Executions already started finish; their completions still reach the database.
    let _ = inflight.acquire_many(slots as u32).await;
    Ok(())
}

/// Waits a second before the consumer starts again; true when `stop` was notified meanwhile.
async fn wait_or_stop(stop: &Notify) -> bool {
    tokio::select! {
        () = stop.notified() => true,
        () = tokio::time::sleep(Duration::from_secs(1)) => false,
    }
}

/// One apalis worker on `backend`, until `stop` is notified (Ok) or the worker fails (Err).
async fn consume_once(
    engine: &Engine,
    backend: RedisStorage<Dispatch>,
    shared: Shared,
    slots: usize,
    permits: Arc<Semaphore>,
    stop: Arc<Notify>,
) -> anyhow::Result<()> {
    let worker = WorkerBuilder::new(engine.worker_name())
        .backend(backend)
        .data(shared)
        .concurrency(slots)
        .parallelize(tokio::spawn)
        .build(move |d: Dispatch, shared: Data<Shared>| {
            let permits = permits.clone();
            async move {
                // Held for the whole execution: shutdown waits for every permit.
                let _permit = permits.acquire_owned().await?;
                handle(d, shared).await
            }
        });
    // apalis-redis polls: after an empty fetch the worker waits for its heartbeat timer to wake
    // it, and that wake-up is lost when the timer fires while a fetch is in flight (the worker
    // then never fetches again). Polling the worker on our own tick as well keeps it looking
    // every `REDIS_POLL`.
    let run = worker.run_with_ctx(move |ctx: WorkerContext| {
        let stop = stop.clone();
        async move {
            stop.notified().await;
            ctx.stop()
        }
    });
    let mut tick = tokio::time::interval(REDIS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    Nudged { inner: Box::pin(run), tick }.await.map_err(|e| anyhow::anyhow!("worker: {e}"))
}

/// Polls `inner` whenever it asks to be, and at every tick as well.
struct Nudged<F> {
    inner: std::pin::Pin<Box<F>>,
    tick: tokio::time::Interval,
}

impl<F: Future> Future for Nudged<F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        while self.tick.poll_tick(cx).is_ready() {}
        self.inner.as_mut().poll(cx)
    }
}

/// Waits for SIGTERM or Ctrl-C.
async fn shutdown_signal() {
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

/// Time in-flight executions get to finish after SIGTERM or Ctrl-C.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

/// `sluice worker`: consumes dispatches from Redis and executes them against the database
/// until SIGTERM or Ctrl-C, then lets executions in flight finish (up to 30 s).
pub async fn run_worker(config: Config) -> anyhow::Result<()> {
    let url = config.redis_url.clone().context("`sluice worker` needs SLUICE_REDIS_URL")?;
    let secrets_key = SecretsKey::load(&config).context("loading the key for tenant secrets")?;
    let store =
        Store::connect(&config.database_url, config.db_max_connections).await.context("connecting to the database")?;
    let work_root = super::work::prepare_work_root(&config.data_dir)?;
    // Completions queue the next tasks: this process rings the same doorbell.
    let doorbell = Arc::new(RedisDoorbell::connect(&url, &config.redis_prefix).await?);
    let engine = Arc::new(Engine::new(store.clone(), doorbell));
    engine.set_tenant_task_limit(config.tenant_max_running_tasks);
    // This process's task and log events reach the clients of every `sluice serve`.
    super::bus::EventBus::spawn(&url, &config.redis_prefix, &engine.event_sender())
        .context("starting the event bus")?;
    tracing::info!(worker = engine.worker_name(), slots = config.worker_slots, "worker started");
    let stop = Arc::new(Notify::new());
    let mut consumer = tokio::spawn(consume_redis(
        engine,
        store,
        url.clone(),
        config.redis_prefix.clone(),
        config.worker_slots,
        work_root,
        secrets_key,
        stop.clone(),
    ));
    tokio::select! {
        r = &mut consumer => return r.context("worker task")?,
        () = shutdown_signal() => {}
    }
    tracing::info!("shutting down: no new work; waiting for tasks in flight");
    stop.notify_one();
    match tokio::time::timeout(SHUTDOWN_GRACE, consumer).await {
        Ok(r) => r.context("worker task")?,
        Err(_) => {
            tracing::warn!(
                "tasks still running after {} s; exiting; their leases will expire",
                SHUTDOWN_GRACE.as_secs()
            );
            Ok(())
        }
    }
}
