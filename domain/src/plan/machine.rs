//! [`plan`]: one event applied to a run's state.

use crate::dag;
use crate::spec::When;

use super::{
    Effect, Event, MAX_LOST, Millis, PlannedTask, RunPlan, RunState, RunStatus, StageStatus, TaskOutcome, TaskStatus,
};

/// Applies `event` at time `now` to `state` and returns the new state and the effects to carry
/// out, in order. See the [module documentation](super) for the rules. Ignored events return
/// `state` unchanged and no effects. The plan's visiting order is worked out on every call; a caller
/// that plans many events of one run keeps a [`Prepared`] plan and calls [`plan_prepared`].
#[must_use]
pub fn plan(plan: &RunPlan, state: &RunState, event: Event, now: Millis) -> (RunState, Vec<Effect>) {
    apply(plan, &Order::of(plan), state, event, now)
}

/// [`plan`] with the plan's order worked out once, in advance.
#[must_use]
pub fn plan_prepared(prepared: &Prepared, state: &RunState, event: Event, now: Millis) -> (RunState, Vec<Effect>) {
    apply(&prepared.plan, &prepared.order, state, event, now)
}

/// The order in which the planner visits a plan: the stages, and each stage's tasks, needs
/// first (index order where a cycle leaves no such order). It depends on the plan alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Order {
    stages: Vec<usize>,
    stage_tasks: Vec<Vec<usize>>,
}

impl Order {
    /// The order of `plan`.
    #[must_use]
    pub fn of(plan: &RunPlan) -> Self {
        let stage_count = plan.stages.len();
        let task_count = plan.tasks.len();
        let in_range = |needs: &[usize], count: usize| needs.iter().copied().filter(|&n| n < count).collect::<Vec<_>>();
        let stages = order(stage_count, |s| in_range(&plan.stages[s].needs, stage_count));
        let task_order = order(task_count, |t| in_range(&plan.tasks[t].needs, task_count));
        let mut rank = vec![0usize; task_count];
        for (position, &task) in task_order.iter().enumerate() {
            rank[task] = position;
        }
        let stage_tasks = plan
            .stages
            .iter()
            .map(|s| {
                let mut tasks: Vec<usize> = s.tasks.iter().copied().filter(|&t| t < task_count).collect();
                tasks.sort_by_key(|&t| rank[t]);
                tasks
            })
            .collect();
        Self { stages, stage_tasks }
    }
}

/// A run's plan with its visiting order worked out once (a run's plan never changes). It reads as
/// the plan it holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    plan: RunPlan,
    order: Order,
}

impl Prepared {
    /// Works out `plan`'s order.
    #[must_use]
    pub fn new(plan: RunPlan) -> Self {
        let order = Order::of(&plan);
        Self { plan, order }
    }
}

impl std::ops::Deref for Prepared {
    type Target = RunPlan;

    fn deref(&self) -> &RunPlan {
        &self.plan
    }
}

fn apply(plan: &RunPlan, order: &Order, state: &RunState, event: Event, now: Millis) -> (RunState, Vec<Effect>) {
    if state.status.is_terminal() {
        return (state.clone(), Vec::new());
    }
    let now = state.last_recorded().map_or(now, |last| now.max(last));
    let mut machine = Machine { plan, st: normalized(plan, state), fx: Vec::new(), now };
    let handled = match event {
        Event::Start => machine.start(),
        Event::Cancel => {
            machine.stop(RunStatus::Cancelled);
            true
        }
        _ if machine.st.status == RunStatus::Pending => false,
        Event::TaskStarted { task, attempt } => machine.task_started(task, attempt),
        Event::TaskFinished { task, attempt, outcome } => machine.task_finished(task, attempt, outcome),
        Event::GateDecided { stage, approved } => machine.gate_decided(stage, approved),
        Event::Tick => {
            machine.tick();
            true
        }
    };
    if !handled {
        return (state.clone(), Vec::new());
    }
    machine.settle(order);
    machine.conclude();
    (machine.st, machine.fx)
}

/// The state shaped like the plan: one entry per stage and per task.
fn normalized(plan: &RunPlan, state: &RunState) -> RunState {
    let mut st = state.clone();
    st.stages.resize(plan.stages.len(), super::StageState::default());
    st.tasks.resize(plan.tasks.len(), super::TaskState::default());
    st
}

/// The delay before retrying after the failed attempt number `attempt` (1-based).
pub(super) fn retry_delay(task: &PlannedTask, attempt: u32) -> i64 {
    let initial = task.initial_delay_ms.max(0);
    let delay = if task.backoff_exponential {
        let factor = 2i64.checked_pow(attempt.saturating_sub(1)).unwrap_or(i64::MAX);
        initial.saturating_mul(factor)
    } else {
        initial
    };
    task.max_delay_ms.map_or(delay, |cap| delay.min(cap.max(0)))
}

/// Nodes in dependency order (needs first); index order if the graph has a cycle.
fn order(count: usize, needs: impl Fn(usize) -> Vec<usize>) -> Vec<usize> {
    let edges: Vec<(usize, usize)> = (0..count).flat_map(|i| needs(i).into_iter().map(move |n| (n, i))).collect();
    dag::topo_order(count, &edges).unwrap_or_else(|_| (0..count).collect())
}

struct Machine<'p> {
    plan: &'p RunPlan,
    st: RunState,
    fx: Vec<Effect>,
    now: Millis,
}

impl Machine<'_> {
    fn task_status(&self, task: usize) -> Option<TaskStatus> {
        self.st.tasks.get(task).map(|t| t.status)
    }

    fn stage_status(&self, stage: usize) -> Option<StageStatus> {
        self.st.stages.get(stage).map(|s| s.status)
    }

    fn start(&mut self) -> bool {
        if self.st.status != RunStatus::Pending {
            return false;
        }
        self.st.status = RunStatus::Running;
        self.st.started_at = Some(self.now);
        self.st.deadline = self.plan.run_timeout_ms.map(|t| self.now.saturating_add(t.max(0)));
        true
    }

    fn task_started(&mut self, task: usize, attempt: u32) -> bool {
        let now = self.now;
        match self.st.tasks.get_mut(task) {
            Some(t) if t.status == TaskStatus::Queued && t.attempt == attempt => {
                t.status = TaskStatus::Running;
                t.started_at = Some(now);
                true
            }
            _ => false,
        }
    }

    fn task_finished(&mut self, task: usize, attempt: u32, outcome: TaskOutcome) -> bool {
        let now = self.now;
        let planned = self.plan.tasks.get(task);
        let Some(t) = self.st.tasks.get_mut(task) else {
            return false;
        };
        if !matches!(t.status, TaskStatus::Queued | TaskStatus::Running) || t.attempt != attempt {
            return false;
        }
        // Failed attempts so far: lost ones (that used no retry) do not count.
        let failures = attempt.saturating_sub(t.lost);
        match outcome {
            TaskOutcome::Succeeded => {
                t.status = TaskStatus::Succeeded;
                t.finished_at = Some(now);
            }
            // A lost attempt (its worker died) is no fault of the task: it runs again at once,
            // without using a retry, up to `MAX_LOST` times.
            TaskOutcome::Lost if t.lost < MAX_LOST => {
                t.lost += 1;
                t.status = TaskStatus::Pending;
                t.not_before = Some(now);
            }
            TaskOutcome::Failed | TaskOutcome::TimedOut | TaskOutcome::Lost => match planned {
                Some(planned) if failures <= planned.max_retries => {
                    t.status = TaskStatus::Pending;
                    t.not_before = Some(now.saturating_add(retry_delay(planned, failures)));
                }
                _ => {
                    t.status = TaskStatus::Failed;
                    t.finished_at = Some(now);
                }
            },
        }
        true
    }

    fn gate_decided(&mut self, stage: usize, approved: bool) -> bool {
        if self.stage_status(stage) != Some(StageStatus::Waiting) {
            return false;
        }
        self.decide_gate(stage, approved);
        true
    }

    fn decide_gate(&mut self, stage: usize, approved: bool) {
        if let Some(s) = self.st.stages.get_mut(stage) {
            s.gate_deadline = None;
            s.status = if approved { StageStatus::Running } else { StageStatus::Failed };
        }
        if !approved {
            self.skip_tasks_of(stage);
        }
    }

    /// Every non-terminal task of `stage` becomes `Skipped`.
    fn skip_tasks_of(&mut self, stage: usize) {
        let now = self.now;
        for &task in self.plan.stages.get(stage).map_or(&[][..], |s| s.tasks.as_slice()) {
            if let Some(t) = self.st.tasks.get_mut(task)
                && !t.status.is_terminal()
            {
                t.status = TaskStatus::Skipped;
                t.not_before = None;
                t.finished_at = Some(now);
            }
        }
    }

    fn dispatch(&mut self, task: usize) {
        if let Some(t) = self.st.tasks.get_mut(task) {
            t.status = TaskStatus::Queued;
            t.attempt = t.attempt.saturating_add(1);
            t.not_before = None;
            self.fx.push(Effect::Dispatch { task, attempt: t.attempt });
        }
    }

    fn tick(&mut self) {
        let now = self.now;
        if self.st.deadline.is_some_and(|deadline| now >= deadline) {
            self.stop(RunStatus::TimedOut);
            return;
        }
        for stage in 0..self.st.stages.len() {
            let due = self
                .st
                .stages
                .get(stage)
                .is_some_and(|s| s.status == StageStatus::Waiting && s.gate_deadline.is_some_and(|d| d <= now));
            if due {
                let approve = self.plan.stages.get(stage).and_then(|s| s.gate).is_some_and(|g| g.approve_on_timeout);
                self.decide_gate(stage, approve);
            }
        }
        for task in 0..self.st.tasks.len() {
            if self.retry_due(task).is_some_and(|at| at <= now) {
                self.dispatch(task);
            }
        }
    }

    /// When a pending retry of `task` may be dispatched (`None` if it is not a pending retry).
    fn retry_due(&self, task: usize) -> Option<Millis> {
        let t = self.st.tasks.get(task)?;
        let stage = self.plan.tasks.get(task)?.stage;
        (t.status == TaskStatus::Pending && t.attempt > 0 && self.stage_status(stage) == Some(StageStatus::Running))
            .then(|| t.not_before.unwrap_or(self.now))
    }

    /// Ends the run as cancelled or timed out.
    fn stop(&mut self, status: RunStatus) {
        let now = self.now;
        for (task, t) in self.st.tasks.iter_mut().enumerate() {
            if matches!(t.status, TaskStatus::Queued | TaskStatus::Running) {
                self.fx.push(Effect::Kill { task, attempt: t.attempt });
            }
            if !t.status.is_terminal() {
                t.status = TaskStatus::Cancelled;
                t.not_before = None;
                t.finished_at = Some(now);
            }
        }
        for s in &mut self.st.stages {
            if !s.status.is_terminal() {
                s.status = StageStatus::Cancelled;
                s.gate_deadline = None;
            }
        }
        self.finish(status);
    }

    fn finish(&mut self, status: RunStatus) {
        self.st.status = status;
        self.st.finished_at = Some(self.now);
        self.fx.push(Effect::Finished { status });
    }

    /// Needs of `task` that exist in the plan.
    fn task_needs(&self, task: usize) -> &[usize] {
        self.plan.tasks.get(task).map_or(&[], |t| t.needs.as_slice())
    }

    /// Starts, evaluates and ends stages and tasks until nothing more changes.
    fn settle(&mut self, order: &Order) {
        if self.st.status.is_terminal() {
            return;
        }
        loop {
            let mut progressed = false;
            for &stage in &order.stages {
                if self.stage_status(stage) == Some(StageStatus::Pending) {
                    progressed |= self.try_start_stage(stage);
                }
                if self.stage_status(stage) == Some(StageStatus::Running) {
                    let tasks = order.stage_tasks.get(stage).map_or(&[][..], Vec::as_slice);
                    for &task in tasks {
                        progressed |= self.try_evaluate_task(task);
                    }
                    progressed |= self.try_end_stage(tasks, stage);
                }
            }
            if !progressed {
                break;
            }
        }
    }

    fn try_start_stage(&mut self, stage: usize) -> bool {
        let Some(planned) = self.plan.stages.get(stage) else {
            return false;
        };
        let needs: Vec<StageStatus> = planned.needs.iter().filter_map(|&n| self.stage_status(n)).collect();
        if !needs.iter().all(|s| s.is_terminal()) {
            return false;
        }
        let now = self.now;
        let blocked = needs.iter().any(|&s| s != StageStatus::Succeeded);
        if let Some(s) = self.st.stages.get_mut(stage) {
            if blocked {
                s.status = StageStatus::Skipped;
            } else if let Some(gate) = planned.gate {
                s.status = StageStatus::Waiting;
                s.gate_deadline = gate.timeout_ms.map(|t| now.saturating_add(t.max(0)));
            } else {
                s.status = StageStatus::Running;
            }
        }
        if blocked {
            self.skip_tasks_of(stage);
        }
        true
    }

    fn try_evaluate_task(&mut self, task: usize) -> bool {
        let Some(t) = self.st.tasks.get(task) else {
            return false;
        };
        if t.status != TaskStatus::Pending || t.attempt > 0 {
            return false;
        }
        let mut needs = self.task_needs(task).iter().filter_map(|&n| self.task_status(n));
        if !needs.clone().all(|s| s.is_terminal()) {
            return false;
        }
        let when = self.plan.tasks.get(task).map_or(When::OnSuccess, |t| t.when);
        let run = match when {
            When::OnSuccess => needs.all(|s| s == TaskStatus::Succeeded),
            When::OnFailure => needs.any(|s| s == TaskStatus::Failed),
            When::Always => true,
        };
        if run {
            self.dispatch(task);
        } else if let Some(t) = self.st.tasks.get_mut(task) {
            t.status = TaskStatus::Skipped;
            t.finished_at = Some(self.now);
        }
        true
    }

    fn try_end_stage(&mut self, tasks: &[usize], stage: usize) -> bool {
        let mut statuses = tasks.iter().filter_map(|&t| self.task_status(t));
        if !statuses.clone().all(|s| s.is_terminal()) {
            return false;
        }
        let failed = statuses.any(|s| s == TaskStatus::Failed);
        if let Some(s) = self.st.stages.get_mut(stage) {
            s.status = if failed { StageStatus::Failed } else { StageStatus::Succeeded };
        }
        true
    }

    /// Ends the run when every stage is terminal; otherwise sets Running/Waiting and emits the
    /// next wake-up.
    fn conclude(&mut self) {
        if self.st.status.is_terminal() {
            return;
        }
        if self.st.stages.iter().all(|s| s.status.is_terminal()) {
            let ok = self.st.stages.iter().all(|s| s.status == StageStatus::Succeeded);
            self.finish(if ok { RunStatus::Succeeded } else { RunStatus::Failed });
            return;
        }
        let active = self.st.tasks.iter().any(|t| matches!(t.status, TaskStatus::Queued | TaskStatus::Running));
        let waiting = self.st.stages.iter().any(|s| s.status == StageStatus::Waiting);
        self.st.status = if !active && waiting { RunStatus::Waiting } else { RunStatus::Running };

        let retries = (0..self.st.tasks.len()).filter_map(|t| self.retry_due(t));
        let gates = self.st.stages.iter().filter(|s| s.status == StageStatus::Waiting).filter_map(|s| s.gate_deadline);
        if let Some(at) = retries.chain(gates).chain(self.st.deadline).min() {
            self.fx.push(Effect::WakeAt { at });
        }
    }
}
