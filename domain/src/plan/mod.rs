//! The run planner: a pure state machine that turns a pipeline spec plus run parameters into
//! a [`RunPlan`] ([`compile`]) and advances a run's [`RunState`] one [`Event`] at a time,
//! returning the [`Effect`]s the caller must carry out ([`plan`]).
//!
//! Nothing here performs I/O or reads a clock: the caller passes `now` (unix milliseconds).
//! Given the same `(plan, state, event, now)`, [`plan`] always returns the same result. It
//! never panics on malformed input: out-of-range indexes are ignored, state vectors of the
//! wrong length are padded or truncated to the plan's shape.
//!
//! # Compiling
//! [`compile`] checks the run parameters against `spec.params` (unknown parameter, wrong type,
//! missing required parameter → an error with path `params.NAME`), applies defaults, and
//! expands `for_each: "{{ params.NAME }}"` (a single reference to an array parameter) into one
//! [`PlannedTask`] per element, keyed `id[0]`, `id[1]`, …. A task that needs a fanned-out task
//! needs every one of its instances (a join); an empty list yields no instances, and a join
//! over nothing is satisfied. Stages, tasks and needs keep spec order; `needs` are indexes into
//! [`RunPlan::stages`] / [`RunPlan::tasks`].
//!
//! # Semantics of [`plan`]
//! - **Start** (run `Pending`): the run becomes `Running` (`started_at = now`,
//!   `deadline = now + run_timeout`), and stages whose needs are met start.
//! - **Stage start** (all needed stages terminal): if any needed stage did not succeed
//!   (`Failed`, `Cancelled`, or `Skipped`, which only happens downstream of a failure), the stage
//!   is `Skipped` and so are all its tasks. Otherwise a gated stage becomes `Waiting`
//!   (`gate_deadline = now + gate timeout`) and holds its tasks back; an ungated stage becomes
//!   `Running`.
//! - **Task evaluation** (stage `Running`, task never dispatched, all its needs terminal):
//!   `when: on_success` runs iff every need `Succeeded`; `on_failure` runs iff at least one
//!   need `Failed`; `always` runs regardless; otherwise the task is `Skipped` (so everything
//!   downstream of a failure is skipped). Running a task = status `Queued`, `attempt + 1`,
//!   [`Effect::Dispatch`]. Tasks without needs are evaluated as soon as their stage runs.
//! - **TaskStarted** with the current attempt of a `Queued` task → `Running`, `started_at = now`
//!   (the start of the latest attempt). Anything else is ignored.
//! - **TaskFinished** with the current attempt of a `Queued` or `Running` task: `Succeeded` →
//!   `Succeeded`. `Lost` (the worker died) while fewer than [`MAX_LOST`] attempts were lost →
//!   `lost + 1`, back to `Pending` with `not_before = now`, no retry used. `Failed`, `TimedOut`
//!   or a further `Lost` → with `failures = attempt - lost`, if `failures <= max_retries` the
//!   task goes back to `Pending` with `not_before = now + delay` (fixed: `initial`; exponential:
//!   `initial × 2^(failures-1)`; both capped by `max_delay`), else `Failed`. A completion for a
//!   stale attempt, or for a task not `Queued`/`Running` (a duplicate, or one that arrives after
//!   a cancel), is ignored: same state, no effects.
//! - **Tick**: time-based transitions happen only here. If the run's deadline has passed
//!   (`now >= deadline`) the run is `TimedOut`: `Queued`/`Running` tasks get [`Effect::Kill`]
//!   and become `Cancelled`, other non-terminal tasks become `Cancelled`, non-terminal stages
//!   `Cancelled`. Otherwise gates whose deadline has passed are decided by
//!   `approve_on_timeout`, and retries whose `not_before <= now` are dispatched (`attempt + 1`).
//! - **GateDecided** on a `Waiting` stage: approved → `Running` (its tasks are evaluated);
//!   rejected → stage `Failed`, its tasks `Skipped`. On a stage in any other status: ignored.
//! - **Cancel**: every non-terminal task becomes `Cancelled` (with [`Effect::Kill`] for `Queued`
//!   and `Running` ones), non-terminal stages `Cancelled`, the run `Cancelled`.
//! - **Stage end**: when all its tasks are terminal, a `Running` stage ends `Failed` if any task
//!   `Failed`, else `Succeeded` (a stage with no tasks succeeds as soon as it runs). Dependent
//!   stages are then evaluated, all within the same call.
//! - **Run end**: when all stages are terminal the run ends `Succeeded` if no stage `Failed`
//!   or was `Skipped`, else `Failed`; `finished_at = now`. Every way of ending (including cancel
//!   and time-out) emits [`Effect::Finished`] exactly once, as the last effect.
//! - **Waiting**: while the run is unfinished, nothing is `Queued`/`Running` and some stage is
//!   `Waiting` for its gate, the run's status is `Waiting`; otherwise `Running`.
//! - **Wake-ups**: every event that is not ignored and leaves the run unfinished ends with one
//!   [`Effect::WakeAt`] for the earliest of: pending retries' `not_before`, waiting gates'
//!   deadlines and the run deadline — when there is one. The caller keeps a single alarm per
//!   run, replaces it on every `WakeAt`, and sends [`Event::Tick`] when it fires.
//! - Events for a finished run, and any event other than `Start` and `Cancel` for a run that has
//!   not started, are ignored. `Start` on a started run is ignored.
//! - **Time never goes back within a run**: an event whose `now` is earlier than the latest time
//!   the state records ([`RunState::last_recorded`]) is applied at that latest time. Callers
//!   whose clocks are read before they take the run (a transaction's start, another machine)
//!   thus never record a task as started before the task it needs finished.

mod compile;
mod machine;
mod status;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

use crate::spec::When;

pub use compile::{MAX_PLANNED_TASKS, PlanError, PlanErrors, compile};
pub use machine::{Prepared, plan, plan_prepared};
pub use status::{ParseStatusError, RunStatus, StageStatus, TaskStatus};

/// Lost attempts (the worker died) a task is run again for without using a retry.
pub const MAX_LOST: u32 = 3;

/// Unix time in milliseconds, always passed in by the caller.
pub type Millis = i64;

/// A run's compiled plan: the spec with parameters checked and fan-outs expanded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunPlan {
    /// The stages, in spec order.
    pub stages: Vec<PlannedStage>,
    /// All task instances, in spec order (fan-out instances contiguous).
    pub tasks: Vec<PlannedTask>,
    /// Run-level timeout in milliseconds.
    pub run_timeout_ms: Option<i64>,
    /// The run parameters, defaults applied.
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// A stage of a [`RunPlan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedStage {
    /// The stage id.
    pub id: String,
    /// Indexes into [`RunPlan::stages`] of the stages that must finish first.
    pub needs: Vec<usize>,
    /// The approval gate, if any.
    pub gate: Option<PlannedGate>,
    /// Indexes into [`RunPlan::tasks`] of the stage's task instances.
    pub tasks: Vec<usize>,
}

/// An approval gate of a [`PlannedStage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedGate {
    /// Distinct approvals needed (counted by the caller, which then sends
    /// [`Event::GateDecided`]).
    pub approvals: u32,
    /// How long the gate waits, in milliseconds.
    pub timeout_ms: Option<i64>,
    /// Whether the gate is approved (rather than rejected) when the timeout passes.
    pub approve_on_timeout: bool,
}

/// One task instance of a [`RunPlan`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlannedTask {
    /// Unique key: the task id, or `id[i]` for the `i`-th fan-out instance.
    pub key: String,
    /// The task id in the spec.
    pub task_id: String,
    /// Index into [`RunPlan::stages`].
    pub stage: usize,
    /// `(stage index, task index)` of the task in the spec.
    pub spec_index: (usize, usize),
    /// Indexes into [`RunPlan::tasks`] of the instances this one needs.
    pub needs: Vec<usize>,
    /// Condition on the needs' outcomes.
    pub when: When,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Exponential (rather than fixed) retry delays.
    pub backoff_exponential: bool,
    /// First retry delay in milliseconds.
    pub initial_delay_ms: i64,
    /// Upper bound on the retry delay in milliseconds.
    pub max_delay_ms: Option<i64>,
    /// Per-attempt timeout in milliseconds (enforced by the worker).
    pub timeout_ms: Option<i64>,
    /// The `for_each` element of a fan-out instance.
    pub item: Option<serde_json::Value>,
    /// Labels a worker must have to execute it (`runs_on`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runs_on: Vec<String>,
    /// CPU and memory it declares (`resources`); a worker reserves them while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<crate::spec::Resources>,
    /// Scheduling priority: the pipeline's `priority` plus the task's, -200..=200 (higher first).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
}

fn is_zero(value: &i32) -> bool {
    *value == 0
}

/// The state of one task instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TaskState {
    /// Current status.
    pub status: TaskStatus,
    /// 0 until the first dispatch; `n` during and after the `n`-th dispatch.
    pub attempt: u32,
    /// When a pending retry may be dispatched.
    pub not_before: Option<Millis>,
    /// When the latest attempt started running.
    pub started_at: Option<Millis>,
    /// When the task reached a terminal status.
    pub finished_at: Option<Millis>,
    /// Attempts lost with their worker, run again without using a retry.
    #[serde(default)]
    pub lost: u32,
}

/// The state of one stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StageState {
    /// Current status.
    pub status: StageStatus,
    /// When a waiting gate times out.
    pub gate_deadline: Option<Millis>,
}

/// The state of a run, stored by the caller between events.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RunState {
    /// Current status.
    pub status: RunStatus,
    /// When the run started.
    pub started_at: Option<Millis>,
    /// When the run times out.
    pub deadline: Option<Millis>,
    /// When the run ended.
    pub finished_at: Option<Millis>,
    /// One entry per [`RunPlan::stages`] element.
    pub stages: Vec<StageState>,
    /// One entry per [`RunPlan::tasks`] element.
    pub tasks: Vec<TaskState>,
}

impl RunState {
    /// The state of a run that has not started: everything `Pending`.
    #[must_use]
    pub fn new(plan: &RunPlan) -> Self {
        Self {
            status: RunStatus::Pending,
            started_at: None,
            deadline: None,
            finished_at: None,
            stages: vec![StageState::default(); plan.stages.len()],
            tasks: vec![TaskState::default(); plan.tasks.len()],
        }
    }

    /// The latest time the state records as past: the run's start and end, and its tasks'
    /// starts and ends (not the future times: deadlines, retries' `not_before`).
    #[must_use]
    pub fn last_recorded(&self) -> Option<Millis> {
        let tasks = self.tasks.iter().flat_map(|t| [t.started_at, t.finished_at]);
        [self.started_at, self.finished_at].into_iter().chain(tasks).flatten().max()
    }
}

/// How one attempt of a task ended, as reported by the worker or the reaper.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskOutcome {
    /// The attempt succeeded.
    Succeeded,
    /// The attempt failed.
    Failed,
    /// The attempt exceeded its timeout.
    TimedOut,
    /// The worker's lease expired.
    Lost,
}

/// Something that happened to a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Event {
    /// Start the run.
    Start,
    /// A worker began an attempt.
    TaskStarted {
        /// Index into [`RunPlan::tasks`].
        task: usize,
        /// The attempt number from [`Effect::Dispatch`].
        attempt: u32,
    },
    /// An attempt ended.
    TaskFinished {
        /// Index into [`RunPlan::tasks`].
        task: usize,
        /// The attempt number from [`Effect::Dispatch`].
        attempt: u32,
        /// How it ended.
        outcome: TaskOutcome,
    },
    /// A gate was approved or rejected.
    GateDecided {
        /// Index into [`RunPlan::stages`].
        stage: usize,
        /// Approved (`true`) or rejected.
        approved: bool,
    },
    /// Cancel the run.
    Cancel,
    /// Time passed (sent when a [`Effect::WakeAt`] alarm fires).
    Tick,
}

/// Something the caller must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Effect {
    /// Enqueue an attempt of a task.
    Dispatch {
        /// Index into [`RunPlan::tasks`].
        task: usize,
        /// The attempt number (1 for the first).
        attempt: u32,
    },
    /// Stop an attempt that is queued or running.
    Kill {
        /// Index into [`RunPlan::tasks`].
        task: usize,
        /// The attempt to stop.
        attempt: u32,
    },
    /// Send [`Event::Tick`] at this time (replaces any earlier alarm of the run).
    WakeAt {
        /// Unix milliseconds.
        at: Millis,
    },
    /// The run ended.
    Finished {
        /// Its final status.
        status: RunStatus,
    },
}
