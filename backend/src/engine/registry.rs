//! The worker registry and what a worker accepts.
//!
//! - **Identity.** Every worker process (`sluice worker`, and the embedded worker of
//!   `sluice serve`) has a name, which is also the `lease_owner` of the tasks it claims. At start
//!   it registers in the `workers` table: a name whose row was heartbeaten within the lease and
//!   not stopped belongs to a live worker, and the second process refuses to start; a row that is
//!   stopped or older than the lease is taken over (the dead process's claims expire and the
//!   reaper re-queues them). A heartbeat on the database clock records the load every third of
//!   the lease; a clean shutdown marks the row stopped.
//! - **Owner.** A row without a tenant is a shared worker, run by the operator. A tenant's own
//!   worker registers with an API token of that tenant allowed `worker.register`, and executes
//!   only that tenant's tasks that ask for `runs_on: [self-hosted, ..]`; shared workers never
//!   execute those.
//! - **What fits.** A task's `runs_on` labels must all be labels of the worker, and its declared
//!   `resources` must fit the worker's whole capacity; otherwise the worker leaves it queued for
//!   another. A task that fits waits for that much CPU and memory to be free (weighted
//!   semaphores in thousandths of a CPU and MiB) before it is claimed, and returns it when it
//!   ends. Tasks that declare nothing reserve nothing and are bounded by the slots alone.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use sea_orm::FromQueryResult;
use sluice_domain::{cedar::Action, plan::PlannedTask};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use uuid::Uuid;

use super::Engine;
use crate::{
    audit::{self, Actor, NewEvent, Outcome, Source},
    auth::api_token,
    authz::{self, AuthzRequest, Resource},
    config::{SELF_HOSTED, WorkerConfig},
    store::{Store, is_unique_violation},
};

/// Rows of workers that stopped or were lost this long ago are deleted when a worker registers.
pub const RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The tenant a worker belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantOwner {
    /// Tenant id.
    pub id: Uuid,
    /// Tenant slug.
    pub slug: String,
}

/// What a worker is and offers.
#[derive(Debug, Clone)]
pub struct WorkerProfile {
    /// Name, unique among live workers; the `lease_owner` of its claims.
    pub name: String,
    /// Labels, sorted, without duplicates (`self-hosted` is implied for a tenant's worker).
    pub labels: Vec<String>,
    /// The owning tenant; `None` for a shared worker.
    pub tenant: Option<TenantOwner>,
    /// CPU capacity in thousandths of a CPU.
    pub cpu_millis: u64,
    /// Memory capacity in bytes.
    pub memory_bytes: u64,
    /// Tasks executed at once.
    pub slots: usize,
    /// `worker` (`sluice worker`) or `serve` (the embedded worker of `sluice serve`).
    pub mode: &'static str,
}

/// Where a task's dispatches go: its tenant's own workers or the shared ones, and the labels a
/// worker must have.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Route {
    /// The tenant whose own workers must execute the task (`runs_on` has `self-hosted`).
    pub tenant: Option<Uuid>,
    /// The other labels of `runs_on`, sorted, without duplicates.
    pub labels: Vec<String>,
}

impl Route {
    /// The route of a planned task of a run of `tenant`.
    pub fn of(task: &PlannedTask, tenant: Uuid) -> Self {
        let self_hosted = task.runs_on.iter().any(|l| l == SELF_HOSTED);
        let mut labels: Vec<String> = task.runs_on.iter().filter(|l| *l != SELF_HOSTED).cloned().collect();
        labels.sort();
        labels.dedup();
        Self { tenant: self_hosted.then_some(tenant), labels }
    }

    /// Whether the task's `runs_on` asks for its tenant's own workers.
    pub fn is_self_hosted(task: &PlannedTask) -> bool {
        task.runs_on.iter().any(|l| l == SELF_HOSTED)
    }
}

/// CPU and memory a task reserves while it runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Need {
    /// Thousandths of a CPU.
    pub cpu_millis: u32,
    /// MiB (rounded up).
    pub memory_mib: u32,
}

impl Need {
    /// What a planned task declares (`resources: {cpu, memory}`); nothing declared is zero.
    pub fn of(task: &PlannedTask) -> Self {
        let r = task.resources.unwrap_or(sluice_domain::spec::Resources { cpu: None, memory: None });
        let cpu = r.cpu.map_or(0.0, |c| (c * 1000.0).ceil());
        let mib = r.memory.map_or(0, |m| m.bytes().div_ceil(1 << 20));
        Self {
            cpu_millis: cpu.clamp(0.0, f64::from(u32::MAX)) as u32,
            memory_mib: u32::try_from(mib).unwrap_or(u32::MAX),
        }
    }
}

impl WorkerProfile {
    /// A profile from the configuration, for a worker named `name`.
    pub fn new(
        config: &WorkerConfig,
        name: String,
        tenant: Option<TenantOwner>,
        slots: usize,
        mode: &'static str,
    ) -> Self {
        Self {
            name,
            labels: config.labels.clone(),
            tenant,
            cpu_millis: config.cpu_millis,
            memory_bytes: config.memory_bytes,
            slots: slots.max(1),
            mode,
        }
    }

    /// The labels shown and routed on: the configured ones, plus `self-hosted` for a tenant's
    /// own worker.
    pub fn advertised_labels(&self) -> Vec<String> {
        let mut labels = self.labels.clone();
        if self.tenant.is_some() {
            labels.push(SELF_HOSTED.to_owned());
            labels.sort();
        }
        labels
    }

    /// Whether this worker may execute `task` of a run of `run_tenant` at all, and what it
    /// reserves; `Err` says why not (the task is left queued for another worker).
    pub fn judge(&self, task: &PlannedTask, run_tenant: Uuid) -> Result<Need, String> {
        let route = Route::of(task, run_tenant);
        match (&self.tenant, route.tenant) {
            (None, Some(_)) => return Err("the task asks for its tenant's own workers (runs_on: self-hosted)".into()),
            (Some(own), None) => {
                return Err(format!("a worker of tenant {} executes only tasks with runs_on: [self-hosted]", own.slug));
            }
            (Some(own), Some(t)) if own.id != t => {
                return Err(format!("the task belongs to another tenant than this worker's ({})", own.slug));
            }
            _ => {}
        }
        let missing: Vec<&str> = route.labels.iter().filter(|l| !self.labels.contains(l)).map(String::as_str).collect();
        if !missing.is_empty() {
            return Err(format!("this worker lacks the label(s) {}", missing.join(", ")));
        }
        let need = Need::of(task);
        let mem_mib = self.memory_bytes >> 20;
        if u64::from(need.cpu_millis) > self.cpu_millis || u64::from(need.memory_mib) > mem_mib {
            return Err(format!(
                "the task needs {} CPU and {} MiB; this worker has {} CPU and {mem_mib} MiB in all",
                f64::from(need.cpu_millis) / 1000.0,
                need.memory_mib,
                self.cpu_millis as f64 / 1000.0,
            ));
        }
        Ok(need)
    }
}

/// A worker's free CPU and memory, and its current load.
pub struct Capacity {
    cpu: Arc<Semaphore>,
    memory: Arc<Semaphore>,
    running: AtomicI64,
    cpu_used: AtomicI64,
    memory_used: AtomicI64,
}

/// The load a heartbeat records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Load {
    /// Tasks executing.
    pub running: i64,
    /// Reserved CPU, thousandths.
    pub cpu_millis: i64,
    /// Reserved memory, bytes.
    pub memory_bytes: i64,
}

/// CPU and memory held by one execution; released (and the load lowered) on drop.
pub struct Reservation {
    capacity: Arc<Capacity>,
    need: Need,
    _cpu: Option<OwnedSemaphorePermit>,
    _memory: Option<OwnedSemaphorePermit>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.capacity.running.fetch_sub(1, Ordering::Relaxed);
        self.capacity.cpu_used.fetch_sub(i64::from(self.need.cpu_millis), Ordering::Relaxed);
        self.capacity.memory_used.fetch_sub(i64::from(self.need.memory_mib) << 20, Ordering::Relaxed);
    }
}

impl Capacity {
    /// The whole capacity of `profile`, free.
    pub fn new(profile: &WorkerProfile) -> Arc<Self> {
        let cpu = usize::try_from(profile.cpu_millis.min(u64::from(u32::MAX))).unwrap_or(usize::MAX);
        let mib = usize::try_from((profile.memory_bytes >> 20).min(u64::from(u32::MAX))).unwrap_or(usize::MAX);
        Arc::new(Self {
            cpu: Arc::new(Semaphore::new(cpu)),
            memory: Arc::new(Semaphore::new(mib)),
            running: AtomicI64::new(0),
            cpu_used: AtomicI64::new(0),
            memory_used: AtomicI64::new(0),
        })
    }

    /// Waits until `need` is free and reserves it (CPU first, then memory: every reserver takes
    /// them in that order, so two reservations never hold one each while waiting for the other).
    pub async fn reserve(self: &Arc<Self>, need: Need) -> Reservation {
        let cpu = match need.cpu_millis {
            0 => None,
            n => self.cpu.clone().acquire_many_owned(n).await.ok(),
        };
        let memory = match need.memory_mib {
            0 => None,
            n => self.memory.clone().acquire_many_owned(n).await.ok(),
        };
        self.running.fetch_add(1, Ordering::Relaxed);
        self.cpu_used.fetch_add(i64::from(need.cpu_millis), Ordering::Relaxed);
        self.memory_used.fetch_add(i64::from(need.memory_mib) << 20, Ordering::Relaxed);
        Reservation { capacity: self.clone(), need, _cpu: cpu, _memory: memory }
    }

    /// Reserves `need` if it is free now.
    pub fn try_reserve(self: &Arc<Self>, need: Need) -> Option<Reservation> {
        let cpu = match need.cpu_millis {
            0 => None,
            n => Some(self.cpu.clone().try_acquire_many_owned(n).ok()?),
        };
        let memory = match need.memory_mib {
            0 => None,
            n => Some(self.memory.clone().try_acquire_many_owned(n).ok()?),
        };
        self.running.fetch_add(1, Ordering::Relaxed);
        self.cpu_used.fetch_add(i64::from(need.cpu_millis), Ordering::Relaxed);
        self.memory_used.fetch_add(i64::from(need.memory_mib) << 20, Ordering::Relaxed);
        Some(Reservation { capacity: self.clone(), need, _cpu: cpu, _memory: memory })
    }

    /// The current load.
    pub fn load(&self) -> Load {
        Load {
            running: self.running.load(Ordering::Relaxed),
            cpu_millis: self.cpu_used.load(Ordering::Relaxed),
            memory_bytes: self.memory_used.load(Ordering::Relaxed),
        }
    }
}

fn chrono_of(d: Duration) -> chrono::Duration {
    chrono::Duration::from_std(d).unwrap_or_else(|_| chrono::Duration::seconds(15))
}

/// A tenant's permission for one of its own workers, checked at registration.
pub struct TenantGrant {
    /// The tenant.
    pub owner: TenantOwner,
    actor: Actor,
    policy_ids: Vec<String>,
}

#[derive(FromQueryResult)]
struct TokenRow {
    id: Uuid,
    tenant_id: Uuid,
    name: String,
    prefix: String,
    token_groups: String,
    expires_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    created_by: Uuid,
    email: String,
    disabled: bool,
    tenant_slug: String,
    policy_version: i64,
    owner_groups: Option<String>,
}

fn groups_of(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

/// Checks that `token` is a live API token of tenant `slug` whose groups may `worker.register`
/// (Cedar, with the tenant's current policies). A refusal is recorded in the tenant's audit log.
pub async fn authorize_tenant_worker(
    store: &Store,
    slug: &str,
    token: &str,
    name: &str,
) -> anyhow::Result<TenantGrant> {
    let refuse = || anyhow::anyhow!("SLUICE_WORKER_TOKEN is not a valid, unexpired API token of tenant {slug}");
    if !api_token::is_well_formed(token) {
        return Err(refuse());
    }
    let row: TokenRow = store
        .query_one(
            store.db(),
            "SELECT k.id, k.tenant_id, k.name, k.prefix, k.groups AS token_groups, k.expires_at, k.revoked_at, \
             k.created_by, u.email, u.disabled, t.slug AS tenant_slug, t.policy_version, m.groups AS owner_groups \
             FROM api_tokens k JOIN tenants t ON t.id = k.tenant_id JOIN users u ON u.id = k.created_by \
             LEFT JOIN memberships m ON m.tenant_id = k.tenant_id AND m.user_id = k.created_by \
             WHERE k.token_hash = $1",
            vec![api_token::sha256_hex(token).into()],
        )
        .await
        .context("looking up SLUICE_WORKER_TOKEN")?
        .ok_or_else(refuse)?;
    let live = row.revoked_at.is_none() && row.expires_at > Utc::now() && !row.disabled;
    if row.tenant_slug != slug || !live || row.owner_groups.is_none() {
        return Err(refuse());
    }
    // As for any request: a token has its own groups, never more than its owner has now.
    let owner = groups_of(row.owner_groups.as_deref().unwrap_or("[]"));
    let owner_is_admin = owner.iter().any(|g| g == "admins");
    let groups: Vec<String> =
        groups_of(&row.token_groups).into_iter().filter(|g| owner_is_admin || owner.contains(g)).collect();
    #[derive(FromQueryResult)]
    struct Text {
        text: String,
    }
    let text: Text = store
        .query_one(
            store.db(),
            "SELECT text FROM policy_versions WHERE tenant_id = $1 AND version = $2",
            vec![row.tenant_id.into(), row.policy_version.into()],
        )
        .await?
        .with_context(|| format!("policy version {} of tenant {slug} is missing", row.policy_version))?;
    let authz = authz::Authorizer::new().context("loading the Cedar schema")?;
    authz.install(row.tenant_id, row.policy_version, &text.text).map_err(|e| anyhow::anyhow!("{e}"))?;
    let req = AuthzRequest {
        tenant_slug: slug,
        principal: authz::Principal::ApiToken { id: row.id, name: &row.name, owner: row.created_by, groups: &groups },
        action: Action::WorkerRegister,
        resource: Resource::Tenant,
        context: None,
    };
    let decision = authz.authorize(row.tenant_id, row.policy_version, &req).map_err(|e| anyhow::anyhow!("{e}"))?;
    let actor = Actor {
        kind: "token",
        id: Some(row.id.to_string()),
        label: format!("{}… ({}, owner {})", row.prefix, row.name, row.email),
    };
    if !decision.allowed {
        let txn = store.write().await?;
        audit::append(
            store,
            &*txn,
            row.tenant_id,
            &NewEvent {
                actor: &actor,
                action: Action::WorkerRegister.as_str(),
                resource_type: "Worker",
                resource_id: Some(name),
                resource_version: None,
                outcome: Outcome::Deny,
                policy_ids: &decision.determining_policies,
                source: &Source::default(),
                details: serde_json::json!({ "policy_version": row.policy_version }),
            },
        )
        .await?;
        txn.commit().await?;
        anyhow::bail!(
            "the API token {}… ({}) may not register workers of tenant {slug}: its groups {groups:?} are not allowed \
             worker.register (by default only admins are)",
            row.prefix,
            row.name
        );
    }
    Ok(TenantGrant {
        owner: TenantOwner { id: row.tenant_id, slug: slug.to_owned() },
        actor,
        policy_ids: decision.determining_policies,
    })
}

/// A worker's registration: its row in `workers`, heartbeaten while the process lives.
pub struct Registration {
    store: Store,
    name: String,
    instance: Uuid,
    lease: Duration,
    interval: Duration,
}

#[derive(FromQueryResult)]
struct Holder {
    host: String,
    pid: i64,
    last_heartbeat_at: DateTime<Utc>,
}

fn host_name() -> String {
    std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "host".into())
}

/// Registers `profile` under its name: refused while a live worker (heartbeat within the lease,
/// not stopped) has that name; a stopped or lost worker's row is taken over. A tenant's worker
/// is recorded in the tenant's audit log with the registration.
pub async fn register(
    store: &Store,
    profile: &WorkerProfile,
    grant: Option<&TenantGrant>,
    timings: super::Timings,
) -> anyhow::Result<Registration> {
    let lease = timings.lease;
    let instance = Uuid::new_v4();
    let labels = serde_json::to_string(&profile.advertised_labels())?;
    let tenant = profile.tenant.as_ref().map(|t| t.id);
    let cpu = i64::try_from(profile.cpu_millis).unwrap_or(i64::MAX);
    let memory = i64::try_from(profile.memory_bytes).unwrap_or(i64::MAX);
    let slots = i32::try_from(profile.slots).unwrap_or(i32::MAX);
    let host = host_name().chars().take(255).collect::<String>();
    let pid = i64::from(std::process::id());
    let version = env!("CARGO_PKG_VERSION");
    let name = profile.name.as_str();

    let txn = store.write().await?;
    let now = store.now(&*txn).await?;
    let stale = now - chrono_of(lease);
    store
        .execute(
            &*txn,
            "DELETE FROM workers WHERE last_heartbeat_at < $1 AND name <> $2",
            vec![(now - chrono_of(RETENTION)).into(), name.into()],
        )
        .await?;
    let values = || -> Vec<sea_orm::Value> {
        vec![
            name.into(),
            instance.into(),
            tenant.into(),
            labels.clone().into(),
            profile.mode.into(),
            host.clone().into(),
            pid.into(),
            version.into(),
            cpu.into(),
            memory.into(),
            slots.into(),
            now.into(),
        ]
    };
    let mut taken = values();
    taken.push(stale.into());
    let n = store
        .execute(
            &*txn,
            "UPDATE workers SET instance = $2, tenant_id = $3, labels = $4, mode = $5, host = $6, pid = $7, \
             version = $8, cpu_millis = $9, memory_bytes = $10, slots = $11, running = 0, cpu_used_millis = 0, \
             memory_used_bytes = 0, started_at = $12, last_heartbeat_at = $12, stopped_at = NULL \
             WHERE name = $1 AND (stopped_at IS NOT NULL OR last_heartbeat_at < $13)",
            taken,
        )
        .await?;
    let in_use = |holder: Option<Holder>| {
        let detail = holder.map_or_else(
            || "it was registered at the same moment by another process".to_owned(),
            |h| {
                let age = (now - h.last_heartbeat_at).num_milliseconds().max(0) as f64 / 1000.0;
                format!("host {}, pid {}, last heartbeat {age:.1} s ago", h.host, h.pid)
            },
        );
        anyhow::anyhow!(
            "worker name {name:?} is already in use by a live worker ({detail}); stop that worker or choose another \
             name (SLUICE_WORKER_NAME / --name). A worker that died counts as gone {} s after its last heartbeat",
            lease.as_secs()
        )
    };
    if n == 0 {
        let holder: Option<Holder> = store
            .query_one(&*txn, "SELECT host, pid, last_heartbeat_at FROM workers WHERE name = $1", vec![name.into()])
            .await?;
        if holder.is_some() {
            return Err(in_use(holder));
        }
        store
            .execute(
                &*txn,
                "INSERT INTO workers (name, instance, tenant_id, labels, mode, host, pid, version, cpu_millis, \
                 memory_bytes, slots, running, cpu_used_millis, memory_used_bytes, started_at, last_heartbeat_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, 0, 0, $12, $12)",
                values(),
            )
            .await
            .map_err(|e| if is_unique_violation(&e) { in_use(None) } else { e.into() })?;
    }
    if let Some(g) = grant {
        audit::append(
            store,
            &*txn,
            g.owner.id,
            &NewEvent {
                actor: &g.actor,
                action: Action::WorkerRegister.as_str(),
                resource_type: "Worker",
                resource_id: Some(name),
                resource_version: None,
                outcome: Outcome::Allow,
                policy_ids: &g.policy_ids,
                source: &Source::default(),
                details: serde_json::json!({ "labels": profile.advertised_labels(), "host": host, "taken_over": n == 1 }),
            },
        )
        .await?;
    }
    txn.commit().await?;
    tracing::info!(worker = name, taken_over = n == 1, "worker registered");
    Ok(Registration { store: store.clone(), name: name.to_owned(), instance, lease, interval: timings.heartbeat })
}

impl Registration {
    /// The registered name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One heartbeat with the current load; `Ok(false)` when another process took the name over
    /// (this one was considered dead).
    pub async fn beat(&self, load: Load) -> anyhow::Result<bool> {
        let txn = self.store.write().await?;
        let now = self.store.now(&*txn).await?;
        let n = self
            .store
            .execute(
                &*txn,
                "UPDATE workers SET last_heartbeat_at = $3, running = $4, cpu_used_millis = $5, \
                 memory_used_bytes = $6 WHERE name = $1 AND instance = $2 AND stopped_at IS NULL",
                vec![
                    self.name.clone().into(),
                    self.instance.into(),
                    now.into(),
                    load.running.into(),
                    load.cpu_millis.into(),
                    load.memory_bytes.into(),
                ],
            )
            .await?;
        txn.commit().await?;
        Ok(n == 1)
    }

    /// Heartbeats every third of the lease until the process ends. The receiver turns `true` if
    /// the registration was taken over by another process (this worker should stop).
    pub fn spawn_heartbeat(self: &Arc<Self>, capacity: Arc<Capacity>) -> watch::Receiver<bool> {
        let (tx, rx) = watch::channel(false);
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(me.interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                match me.beat(capacity.load()).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::error!(
                            worker = %me.name,
                            "this worker's registration was taken over by another process (it was silent for more than {} s); stopping",
                            me.lease.as_secs()
                        );
                        let _ = tx.send(true);
                        return;
                    }
                    Err(e) => tracing::warn!(worker = %me.name, error = %e, "worker heartbeat failed; retrying"),
                }
            }
        });
        rx
    }

    /// Marks the worker stopped (a clean shutdown); its name is free again at once.
    pub async fn stop(&self) -> anyhow::Result<()> {
        let txn = self.store.write().await?;
        let now = self.store.now(&*txn).await?;
        self.store
            .execute(
                &*txn,
                "UPDATE workers SET stopped_at = $3, last_heartbeat_at = $3, running = 0, cpu_used_millis = 0, \
                 memory_used_bytes = 0 WHERE name = $1 AND instance = $2",
                vec![self.name.clone().into(), self.instance.into(), now.into()],
            )
            .await?;
        txn.commit().await?;
        tracing::info!(worker = %self.name, "worker deregistered");
        Ok(())
    }
}

/// Why a dispatch was not claimed by this worker.
pub enum Skip {
    /// Never by this worker (labels, owner or size): left queued for another.
    Unsuitable(String),
    /// The run or its plan could not be read; left queued.
    Error(anyhow::Error),
}

/// A worker's identity, capacity and the checks made before each claim.
pub struct Gate {
    /// What the worker offers.
    pub profile: WorkerProfile,
    /// Its free capacity.
    pub capacity: Arc<Capacity>,
    /// Dispatches already reported as unsuitable (the reaper rings them again every second).
    reported: std::sync::Mutex<std::collections::HashSet<super::Dispatch>>,
    /// Priorities of the dispatches waiting for a slot, with how many wait at each.
    waiting: std::sync::Mutex<std::collections::BTreeMap<i32, usize>>,
}

/// A dispatch counted as waiting for a slot of its worker until this is dropped.
pub struct Waiting<'a> {
    gate: &'a Gate,
    priority: i32,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.gate.unwait(self.priority);
    }
}

impl Gate {
    /// A gate over `profile`'s whole capacity.
    pub fn new(profile: WorkerProfile) -> Arc<Self> {
        let capacity = Capacity::new(&profile);
        Arc::new(Self {
            profile,
            capacity,
            reported: std::sync::Mutex::default(),
            waiting: std::sync::Mutex::default(),
        })
    }

    /// Counts a dispatch of `priority` as waiting for a slot, until [`Gate::unwait`].
    pub fn wait(&self, priority: i32) {
        if let Ok(mut w) = self.waiting.lock() {
            *w.entry(priority).or_default() += 1;
        }
    }

    /// A dispatch of `priority` no longer waits.
    pub fn unwait(&self, priority: i32) {
        if let Ok(mut w) = self.waiting.lock()
            && let Some(n) = w.get_mut(&priority)
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                w.remove(&priority);
            }
        }
    }

    /// Counts a dispatch of `priority` as waiting for a slot while the guard lives.
    pub fn waiting(&self, priority: i32) -> Waiting<'_> {
        self.wait(priority);
        Waiting { gate: self, priority }
    }

    /// The highest priority among the dispatches waiting for a slot.
    pub fn best_waiting(&self) -> Option<i32> {
        self.waiting.lock().ok().and_then(|w| w.keys().next_back().copied())
    }

    /// Logs why a dispatch was left queued (an unsuitable one once, then quietly).
    pub fn skipped(&self, d: super::Dispatch, skip: Skip) {
        match skip {
            Skip::Unsuitable(why) => {
                let first = self.reported.lock().is_ok_and(|mut seen| {
                    if seen.len() >= 10_000 {
                        seen.clear();
                    }
                    seen.insert(d)
                });
                if first {
                    tracing::warn!(worker = %self.profile.name, run = %d.run, task = d.task, attempt = d.attempt, "not taking the task, left queued for another worker: {why}");
                } else {
                    tracing::debug!(worker = %self.profile.name, run = %d.run, task = d.task, "not taking the task: {why}");
                }
            }
            Skip::Error(e) => {
                tracing::warn!(worker = %self.profile.name, run = %d.run, task = d.task, error = %e, "could not check the task; left queued");
            }
        }
    }

    /// Checks that this worker may execute the dispatched task and returns what it reserves.
    pub async fn judge(&self, engine: &Engine, d: super::Dispatch) -> Result<Need, Skip> {
        let plan = engine.plan_of(d.run).await.map_err(Skip::Error)?;
        let task =
            plan.tasks.get(d.task).ok_or_else(|| Skip::Error(anyhow::anyhow!("no task {} in the plan", d.task)))?;
        // The run's tenant matters only to tenants' own workers and to self-hosted tasks.
        let tenant = if self.profile.tenant.is_some() || Route::is_self_hosted(task) {
            engine.tenant_of(d.run).await.map_err(Skip::Error)?
        } else {
            Uuid::nil()
        };
        self.profile.judge(task, tenant).map_err(Skip::Unsuitable)
    }
}

/// The tenant of a run.
pub async fn run_tenant(store: &Store, run: Uuid) -> anyhow::Result<Uuid> {
    #[derive(FromQueryResult)]
    struct T {
        tenant_id: Uuid,
    }
    let t: T = store
        .query_one(store.db(), "SELECT tenant_id FROM runs WHERE id = $1", vec![run.into()])
        .await?
        .ok_or_else(|| anyhow::anyhow!("run {run} vanished"))?;
    Ok(t.tenant_id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use sluice_domain::{MemorySize, spec::Resources};

    use super::*;

    fn task(runs_on: &[&str], cpu: Option<f64>, memory: Option<&str>) -> PlannedTask {
        let yaml = "stages:\n  - id: s\n    tasks:\n      - id: t\n        noop: true\n";
        let spec = sluice_domain::parse_definition(yaml).unwrap_or_else(|e| panic!("{e}"));
        let plan = sluice_domain::plan::compile(&spec, &serde_json::Map::new()).unwrap_or_else(|e| panic!("{e}"));
        let mut t = plan.tasks[0].clone();
        t.runs_on = runs_on.iter().map(|s| (*s).to_owned()).collect();
        t.resources =
            Some(Resources { cpu, memory: memory.map(|m| MemorySize::parse(m).unwrap_or_else(|e| panic!("{e}"))) });
        t
    }

    fn profile(labels: &[&str], tenant: Option<Uuid>) -> WorkerProfile {
        WorkerProfile {
            name: "w".into(),
            labels: labels.iter().map(|s| (*s).to_owned()).collect(),
            tenant: tenant.map(|id| TenantOwner { id, slug: "acme".into() }),
            cpu_millis: 2000,
            memory_bytes: 4 << 30,
            slots: 4,
            mode: "worker",
        }
    }

    #[test]
    fn labels_must_all_be_present() {
        let t = Uuid::new_v4();
        let w = profile(&["gpu", "linux"], None);
        assert!(w.judge(&task(&[], None, None), t).is_ok());
        assert!(w.judge(&task(&["gpu"], None, None), t).is_ok());
        assert!(w.judge(&task(&["linux", "gpu"], None, None), t).is_ok());
        let e = w.judge(&task(&["gpu", "arm64"], None, None), t).unwrap_err();
        assert!(e.contains("arm64"), "{e}");
    }

    #[test]
    fn self_hosted_tasks_go_only_to_their_tenants_workers() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let hosted = task(&["self-hosted"], None, None);
        assert!(profile(&[], None).judge(&hosted, a).is_err(), "a shared worker");
        assert!(profile(&[], Some(a)).judge(&hosted, a).is_ok());
        assert!(profile(&[], Some(b)).judge(&hosted, a).is_err(), "another tenant's worker");
        // A tenant's worker takes nothing else, not even its own tenant's shared tasks.
        assert!(profile(&[], Some(a)).judge(&task(&[], None, None), a).is_err());
        assert_eq!(
            Route::of(&task(&["x", "self-hosted", "a"], None, None), a),
            Route { tenant: Some(a), labels: vec!["a".into(), "x".into()] }
        );
    }

    #[test]
    fn a_task_larger_than_the_whole_worker_is_refused() {
        let t = Uuid::new_v4();
        let w = profile(&[], None);
        assert_eq!(w.judge(&task(&[], Some(2.0), Some("4GiB")), t), Ok(Need { cpu_millis: 2000, memory_mib: 4096 }));
        assert_eq!(w.judge(&task(&[], Some(0.25), Some("1500K")), t), Ok(Need { cpu_millis: 250, memory_mib: 2 }));
        assert!(w.judge(&task(&[], Some(2.5), None), t).unwrap_err().contains("2.5 CPU"));
        assert!(w.judge(&task(&[], None, Some("5GiB")), t).unwrap_err().contains("5120 MiB"));
    }

    #[tokio::test]
    async fn reservations_wait_for_free_capacity() {
        let cap = Capacity::new(&profile(&[], None));
        let big = cap.reserve(Need { cpu_millis: 1500, memory_mib: 1024 }).await;
        assert_eq!(cap.load(), Load { running: 1, cpu_millis: 1500, memory_bytes: 1 << 30 });
        let waiting =
            tokio::time::timeout(Duration::from_millis(50), cap.reserve(Need { cpu_millis: 1000, memory_mib: 1 }));
        assert!(waiting.await.is_err(), "1.5 + 1 CPU do not fit in 2");
        let small =
            tokio::time::timeout(Duration::from_millis(50), cap.reserve(Need { cpu_millis: 500, memory_mib: 3072 }))
                .await
                .unwrap_or_else(|_| panic!("0.5 CPU and 3 GiB fit"));
        drop(big);
        let after =
            tokio::time::timeout(Duration::from_millis(50), cap.reserve(Need { cpu_millis: 1000, memory_mib: 1 }))
                .await
                .unwrap_or_else(|_| panic!("fits once the big one is done"));
        drop((small, after));
        assert_eq!(cap.load(), Load::default());
    }

    #[test]
    fn the_best_waiting_priority_follows_waiters_as_they_come_and_go() {
        let gate = Gate::new(profile(&[], None));
        assert_eq!(gate.best_waiting(), None);
        let low = gate.waiting(-5);
        gate.wait(10);
        gate.wait(10);
        assert_eq!(gate.best_waiting(), Some(10));
        gate.unwait(10);
        assert_eq!(gate.best_waiting(), Some(10), "one of the two still waits");
        gate.unwait(10);
        assert_eq!(gate.best_waiting(), Some(-5));
        drop(low);
        assert_eq!(gate.best_waiting(), None);
    }
}
