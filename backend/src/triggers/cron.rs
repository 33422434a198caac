//! The cron scheduler: every server runs one. Once a second it looks at every non-archived
//! pipeline's latest version and starts a run for each schedule time that has come, with the
//! idempotency key `cron:<pipeline id>:<trigger index>:<scheduled time, RFC 3339 UTC>`: when
//! several servers fire the same time, the runs' unique index leaves one run.
//!
//! Missed times are not replayed: a scheduler computes a schedule's next fire time from the
//! current time when it first sees it (when the server starts, or when the pipeline gets a new
//! version), and a fire time already more than [`MISFIRE_GRACE`] old when it is noticed (the
//! process was suspended, the database was away) is skipped rather than run late.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Map, Value};
use sluice_domain::{parse_definition, schedule::Schedule};
use uuid::Uuid;

use crate::{
    AppState,
    audit::{Actor, Source},
    service::runs::{self, PipelineRef},
};

/// How often the scheduler looks.
pub const PERIOD: Duration = Duration::from_secs(1);
/// How late a fire time may still be fired.
pub const MISFIRE_GRACE: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// One schedule of a pipeline version.
struct Trigger {
    /// `None` for a stored schedule that no longer parses (it never fires).
    schedule: Option<Schedule>,
    params: Map<String, Value>,
}

/// What the scheduler knows about one schedule.
struct Entry {
    version: i64,
    next: Option<DateTime<Utc>>,
}

/// A run the scheduler asked for.
#[derive(Debug, Clone)]
pub struct Fired {
    /// Tenant.
    pub tenant: Uuid,
    /// Pipeline.
    pub pipeline: Uuid,
    /// Index of the trigger in the definition.
    pub trigger: usize,
    /// The schedule time.
    pub scheduled: DateTime<Utc>,
    /// The run (an existing one when another server fired this time first).
    pub run: Uuid,
    /// Whether this call created the run.
    pub created: bool,
}

#[derive(sea_orm::FromQueryResult)]
struct PipelineRow {
    id: Uuid,
    tenant_id: Uuid,
    name: String,
    latest_version: i64,
}

/// The parsed triggers of a pipeline's version.
type Versioned = (i64, Arc<Vec<Trigger>>);

/// One scheduler's memory: the parsed triggers of each pipeline version it has seen and each
/// schedule's next fire time. A new `Scheduler` (a restarted server) starts from the present.
#[derive(Default)]
pub struct Scheduler {
    triggers: Mutex<HashMap<Uuid, Versioned>>,
    entries: Mutex<HashMap<(Uuid, usize), Entry>>,
}

/// The idempotency key of a schedule time.
pub fn idempotency_key(pipeline: Uuid, trigger: usize, scheduled: DateTime<Utc>) -> String {
    format!("cron:{pipeline}:{trigger}:{}", scheduled.to_rfc3339_opts(SecondsFormat::Secs, true))
}

impl Scheduler {
    /// An empty scheduler.
    pub fn new() -> Self {
        Self::default()
    }

    async fn triggers_of(&self, state: &AppState, p: &PipelineRow) -> anyhow::Result<Arc<Vec<Trigger>>> {
        if let Ok(cache) = self.triggers.lock()
            && let Some((v, t)) = cache.get(&p.id)
            && *v == p.latest_version
        {
            return Ok(t.clone());
        }
        #[derive(sea_orm::FromQueryResult)]
        struct Def {
            definition: String,
        }
        let def: Option<Def> = state
            .store
            .query_one(
                state.store.db(),
                "SELECT definition FROM pipeline_versions WHERE tenant_id = $1 AND pipeline_id = $2 AND version = $3",
                vec![p.tenant_id.into(), p.id.into(), p.latest_version.into()],
            )
            .await?;
        let mut list = vec![];
        if let Some(def) = def {
            match parse_definition(&def.definition) {
                Ok(spec) => {
                    for (i, t) in spec.triggers.iter().enumerate() {
                        // Only a definition saved before schedules were checked can fail here; its
                        // entry stays, so that indexes match the definition's.
                        let schedule = Schedule::parse(&t.cron, t.timezone.as_deref())
                            .inspect_err(
                                |e| tracing::warn!(pipeline = %p.id, trigger = i, error = ?e, "schedule ignored"),
                            )
                            .ok();
                        list.push(Trigger {
                            schedule,
                            params: t.params.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!(pipeline = %p.id, version = p.latest_version, error = %e, "stored definition does not parse; its schedules are ignored")
                }
            }
        }
        let list = Arc::new(list);
        if let Ok(mut cache) = self.triggers.lock() {
            cache.insert(p.id, (p.latest_version, list.clone()));
        }
        Ok(list)
    }

    /// Fires every schedule time that has come at `now` (the scheduler's clock, injectable for
    /// tests) and returns the runs started or found.
    pub async fn fire_due(&self, state: &AppState, now: DateTime<Utc>) -> anyhow::Result<Vec<Fired>> {
        let pipelines: Vec<PipelineRow> = state
            .store
            .query_all(
                state.store.db(),
                "SELECT id, tenant_id, name, latest_version FROM pipelines WHERE archived_at IS NULL",
                vec![],
            )
            .await?;
        let live: HashSet<Uuid> = pipelines.iter().map(|p| p.id).collect();
        if let Ok(mut cache) = self.triggers.lock() {
            cache.retain(|id, _| live.contains(id));
        }
        let mut due = vec![];
        let mut seen = HashSet::new();
        for p in &pipelines {
            let triggers = match self.triggers_of(state, p).await {
                Ok(t) => t,
                Err(e) => {
                    // Only this pipeline waits for the next pass; its schedule is kept as it is.
                    tracing::warn!(pipeline = %p.id, error = %e, "cannot read the pipeline's triggers; trying again");
                    if let Ok(entries) = self.entries.lock() {
                        seen.extend(entries.keys().filter(|(id, _)| *id == p.id).copied());
                    }
                    continue;
                }
            };
            let Ok(mut entries) = self.entries.lock() else { continue };
            for (i, t) in triggers.iter().enumerate() {
                let Some(schedule) = &t.schedule else { continue };
                seen.insert((p.id, i));
                let e = entries.entry((p.id, i)).or_insert(Entry { version: -1, next: None });
                if e.version != p.latest_version {
                    // New to this scheduler, or a new version: start from now, replay nothing.
                    *e = Entry { version: p.latest_version, next: schedule.next_after(now) };
                    continue;
                }
                let Some(at) = e.next.filter(|at| *at <= now) else { continue };
                let next = schedule.next_after(now);
                if now - at > MISFIRE_GRACE {
                    e.next = next;
                    tracing::warn!(pipeline = %p.id, trigger = i, scheduled = %at, "schedule time missed; not replayed");
                    continue;
                }
                // The time moves on once its run is started (or refused for good), below.
                due.push((p, i, at, next, t.params.clone()));
            }
        }
        if let Ok(mut entries) = self.entries.lock() {
            entries.retain(|k, _| seen.contains(k));
        }
        let mut fired = vec![];
        for (p, i, at, next, params) in due {
            let pipeline =
                PipelineRef { id: p.id, name: p.name.clone(), latest_version: p.latest_version, archived_at: None };
            let key = idempotency_key(p.id, i, at);
            let actor = Actor { kind: "system", id: None, label: "cron".into() };
            let started = runs::start_run(
                state,
                runs::StartRun {
                    tenant: p.tenant_id,
                    pipeline: &pipeline,
                    version: Some(p.latest_version),
                    params: &params,
                    trigger: "cron",
                    initiator: None,
                    actor: &actor,
                    source: &Source::default(),
                    policy_ids: &[],
                    idempotency_key: Some(&key),
                    retry: None,
                },
            )
            .await;
            // A server-side failure (the database restarting, say) leaves the time due: the next
            // pass tries again, within the grace period; the idempotency key keeps it to one run.
            let retry = matches!(&started, Err(e) if actix_web::ResponseError::status_code(e).is_server_error());
            if !retry
                && let Ok(mut entries) = self.entries.lock()
                && let Some(e) = entries.get_mut(&(p.id, i)).filter(|e| e.next == Some(at))
            {
                e.next = next;
            }
            match started {
                Ok(s) => {
                    if s.created {
                        tracing::info!(pipeline = %p.id, trigger = i, scheduled = %at, run = %s.id, "scheduled run started");
                    }
                    fired.push(Fired {
                        tenant: p.tenant_id,
                        pipeline: p.id,
                        trigger: i,
                        scheduled: at,
                        run: s.id,
                        created: s.created,
                    });
                }
                // One pipeline's failure (archived meanwhile, a database error) does not stop the others.
                Err(e) if retry => {
                    tracing::warn!(pipeline = %p.id, trigger = i, scheduled = %at, error = %e, "scheduled run not started; trying again")
                }
                Err(e) => {
                    tracing::warn!(pipeline = %p.id, trigger = i, scheduled = %at, error = %e, "scheduled run not started")
                }
            }
        }
        Ok(fired)
    }
}

/// Starts this server's scheduler.
pub fn spawn_scheduler(state: Arc<AppState>) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        tracing::warn!("no async runtime; the cron scheduler is not running");
        return;
    };
    rt.spawn(async move {
        let scheduler = Scheduler::new();
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = scheduler.fire_due(&state, Utc::now()).await {
                tracing::warn!(error = %e, "scheduler pass failed");
            }
        }
    });
}
