//! The Sluice server: configuration, storage, authentication, Cedar authorization, the audit
//! log and the REST API. `Application::build` wires them and binds the listener; the `sluice`
//! binary only parses the command line and calls into this crate.

pub mod admin;
pub mod api;
pub mod audit;
pub mod auth;
pub mod authz;
pub mod config;
pub mod engine;
pub mod error;
pub mod secrets;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod triggers;

use std::net::TcpListener;

use actix_web::{App, HttpServer, dev::Server, web};
use anyhow::Context;

pub use config::{Config, ConfigArgs};

/// Everything a request handler needs.
pub struct AppState {
    /// Resolved configuration.
    pub config: Config,
    /// The database.
    pub store: store::Store,
    /// Cedar policies and decisions.
    pub authz: authz::Authorizer,
    /// JWT signing and verification keys.
    pub jwt: auth::jwt::JwtKeys,
    /// Run orchestration.
    pub engine: std::sync::Arc<engine::Engine>,
    /// The key that encrypts tenant secrets.
    pub secrets_key: secrets::SecretsKey,
    /// The embedded worker's registration, if this process executes tasks.
    pub worker: Option<std::sync::Arc<engine::registry::Registration>>,
    /// The embedded worker, taken by the [`Application`] that drains it when it stops.
    pub embedded_worker: std::sync::Mutex<Option<engine::EmbeddedWorker>>,
    /// How many refused webhook calls each tenant's audit log records.
    pub webhook_refusals: triggers::webhook::RefusalLimiter,
    /// Tenants' audit chain heads and the database's clock, as this process's starts left them.
    pub starts: service::runs::StartCache,
}

impl AppState {
    /// Connects to the database, applies migrations and loads keys and policies' schema.
    pub async fn init(config: Config) -> anyhow::Result<Self> {
        if config.is_embedded() {
            engine::create_folder(&config.data_dir)
                .with_context(|| format!("creating data folder {}", config.data_dir.display()))?;
        }
        let secrets_key = secrets::SecretsKey::load(&config).context("loading the key for tenant secrets")?;
        // The name under which this process holds leases (its database connections carry it).
        let name = match (&config.worker.name, config.with_worker) {
            (Some(name), true) => name.clone(),
            _ => engine::worker_name(),
        };
        let store = store::Store::connect(&config.database_url, config.db_max_connections, &name)
            .await
            .context("connecting to the database")?;
        store.migrate().await.context("applying database migrations")?;
        let generate = config.is_embedded() || !config.jwt_keys_file.exists();
        let key_file = auth::jwt::load_or_generate(&config.jwt_keys_file, generate)?;
        let jwt = auth::jwt::JwtKeys::new(&key_file, &config.public_url)?;
        let authz = authz::Authorizer::new().context("loading the Cedar schema and default policies")?;
        // The embedded worker registers like any worker; it is a shared one (a tenant's own
        // workers run as `sluice worker --tenant`).
        let worker = if config.with_worker {
            anyhow::ensure!(
                config.worker.tenant.is_none(),
                "SLUICE_WORKER_TENANT applies to `sluice worker` only; the worker inside `sluice serve` is shared"
            );
            let profile =
                engine::registry::WorkerProfile::new(&config.worker, name.clone(), None, config.worker_slots, "serve");
            // Only a process that executes tasks prepares (and checks) where they run.
            let sandbox = engine::prepare_sandbox(&config)?;
            let registration = engine::registry::register(&store, &profile, None, engine::Timings::from_env()).await?;
            Some((engine::registry::Gate::new(profile), std::sync::Arc::new(registration), sandbox))
        } else {
            None
        };
        let mut embedded_worker = None;
        let engine = match &config.redis_url {
            // Distributed: dispatches go to Redis; `sluice worker` processes take them, and this
            // process too with `--with-worker`.
            Some(url) => {
                let doorbell = std::sync::Arc::new(
                    engine::RedisDoorbell::connect(url, &config.redis_prefix).await.context("connecting to Redis")?,
                );
                let engine = std::sync::Arc::new(engine::Engine::named(store.clone(), doorbell.clone(), name));
                doorbell.route_with(&engine);
                // Events of every process (workers run the tasks) reach this process's clients.
                engine::bus::EventBus::spawn(url, &config.redis_prefix, &engine.event_sender())
                    .context("starting the event bus")?;
                if let Some((gate, _, sandbox)) = &worker {
                    let (engine, store, url, prefix, gate, key, sandbox) = (
                        engine.clone(),
                        store.clone(),
                        url.clone(),
                        config.redis_prefix.clone(),
                        gate.clone(),
                        secrets_key.clone(),
                        sandbox.clone(),
                    );
                    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
                    let consumer = tokio::spawn({
                        let (engine, stop) = (engine.clone(), stop.clone());
                        async move {
                            if let Err(e) =
                                engine::consume_redis(engine, store, url, prefix, gate, sandbox, key, stop).await
                            {
                                tracing::error!(error = %e, "the embedded Redis worker stopped");
                            }
                            Ok(())
                        }
                    });
                    embedded_worker = Some(engine::EmbeddedWorker::Redis { engine, stop, consumer });
                }
                engine
            }
            // In-process dispatch: the embedded worker executes what the engine queues.
            None => {
                let (queue, rx) = tokio::sync::mpsc::unbounded_channel();
                let engine = std::sync::Arc::new(engine::Engine::named(
                    store.clone(),
                    std::sync::Arc::new(engine::ChannelDoorbell(queue)),
                    name,
                ));
                if let Some((gate, _, sandbox)) = &worker {
                    embedded_worker = Some(engine::EmbeddedWorker::Local(engine::spawn_local_workers(
                        engine.clone(),
                        store.clone(),
                        rx,
                        gate.clone(),
                        sandbox.clone(),
                        secrets_key.clone(),
                    )));
                    // Rings go through this process's memory: those of tasks queued before it
                    // started were lost with the process before it.
                    engine.ring_queued().await.context("ringing the tasks left queued")?;
                }
                engine
            }
        };
        engine.set_tenant_task_limit(config.tenant_max_running_tasks);
        engine.spawn_reaper();
        let worker = worker.map(|(gate, registration, _)| {
            registration.spawn_heartbeat(gate.capacity.clone());
            registration
        });
        Ok(Self {
            config,
            store,
            authz,
            jwt,
            engine,
            secrets_key,
            worker,
            embedded_worker: std::sync::Mutex::new(embedded_worker),
            webhook_refusals: Default::default(),
            starts: Default::default(),
        })
    }
}

/// A built, bound, not yet running server.
pub struct Application {
    port: u16,
    server: Server,
    worker: Option<std::sync::Arc<engine::registry::Registration>>,
    embedded_worker: Option<engine::EmbeddedWorker>,
    drain: std::time::Duration,
}

impl Application {
    /// Builds the server on the configured address (port 0 picks a free port).
    pub async fn build(config: Config) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(&config.bind).with_context(|| format!("binding {}", config.bind))?;
        let state = web::Data::new(AppState::init(config).await?);
        Self::with_listener(state, listener)
    }

    /// Builds the server on an already bound listener.
    pub fn with_listener(state: web::Data<AppState>, listener: TcpListener) -> anyhow::Result<Self> {
        let port = listener.local_addr()?.port();
        let worker = state.worker.clone();
        let embedded_worker = state.embedded_worker.lock().ok().and_then(|mut w| w.take());
        let drain = state.config.worker_drain;
        triggers::spawn_scheduler(state.clone().into_inner());
        triggers::webhook::spawn_refusal_counts(state.clone().into_inner());
        let server = HttpServer::new(move || {
            App::new()
                .wrap(actix_web::middleware::from_fn(telemetry::request_id))
                .app_data(state.clone())
                .configure(api::configure)
        })
        // Small writes (server-sent events, short JSON answers) go out at once instead of
        // waiting for the client's delayed acknowledgement of the previous one.
        .tcp_nodelay(true)
        .listen(listener)?
        .shutdown_timeout(30)
        // SIGTERM and Ctrl-C are handled by `run_until_stopped`, which drains the embedded
        // worker before the HTTP workers stop.
        .disable_signals()
        .run();
        Ok(Self { port, server, worker, embedded_worker, drain })
    }

    /// The bound port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs until stopped by SIGTERM or Ctrl-C (or by the server's handle). On a signal the
    /// server stops accepting connections, the embedded worker drains (see
    /// [`engine::EmbeddedWorker::drain`]), and then the HTTP server stops gracefully. The HTTP
    /// workers' runtimes stay up until the drain is over: database connections opened by
    /// requests are bound to them, and the drain's commits may use any connection of the pool.
    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        let Self { server, worker, embedded_worker, drain: grace, .. } = self;
        let handle = server.handle();
        // Polled on its own: the server carries out its handle's commands only while polled.
        let mut server = tokio::spawn(server);
        let joined = |r: Result<std::io::Result<()>, tokio::task::JoinError>| {
            r.unwrap_or_else(|e| Err(std::io::Error::other(e)))
        };
        let result = tokio::select! {
            r = &mut server => {
                let r = joined(r);
                // Stopped by its handle: the embedded worker drains now.
                if let Some(embedded) = embedded_worker {
                    embedded.drain(grace).await;
                }
                r
            }
            () = engine::shutdown_signal() => {
                tracing::info!("shutting down: no new connections; draining the embedded worker, then the HTTP server");
                handle.pause().await;
                if let Some(embedded) = embedded_worker {
                    embedded.drain(grace).await;
                }
                handle.stop(true).await;
                joined(server.await)
            }
        };
        // Stopped cleanly: the embedded worker's name is free again at once.
        if let Some(worker) = worker
            && let Err(e) = worker.stop().await
        {
            tracing::warn!(error = %e, "marking the embedded worker stopped failed; it will count as lost");
        }
        result
    }
}
