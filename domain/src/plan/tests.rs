#![allow(clippy::unwrap_used)]

use serde_json::json;

use super::machine::retry_delay;
use super::*;
use crate::spec::parse_definition;

fn params(value: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    match value {
        serde_json::Value::Object(map) => map,
        _ => panic!("params must be an object"),
    }
}

fn compiled(yaml: &str, given: serde_json::Value) -> RunPlan {
    compile(&parse_definition(yaml).unwrap(), &params(given)).unwrap()
}

fn compile_errors(yaml: &str, given: serde_json::Value) -> Vec<PlanError> {
    compile(&parse_definition(yaml).unwrap(), &params(given)).unwrap_err().into_vec()
}

/// A run driven by hand.
struct Run {
    plan: RunPlan,
    state: RunState,
    now: Millis,
    finished: usize,
}

impl Run {
    fn new(yaml: &str) -> Self {
        Self::with(compiled(yaml, json!({})))
    }

    fn with(plan: RunPlan) -> Self {
        let state = RunState::new(&plan);
        Self { plan, state, now: 1_000, finished: 0 }
    }

    fn ev(&mut self, event: Event) -> Vec<Effect> {
        let (state, effects) = plan(&self.plan, &self.state, event, self.now);
        self.finished += effects.iter().filter(|e| matches!(e, Effect::Finished { .. })).count();
        self.state = state;
        effects
    }

    /// Sends an event that must be ignored.
    #[track_caller]
    fn ignored(&mut self, event: Event) {
        let before = self.state.clone();
        assert_eq!(self.ev(event), vec![], "{event:?} should be ignored");
        assert_eq!(self.state, before, "{event:?} should not change the state");
    }

    fn at(&mut self, now: Millis) -> &mut Self {
        self.now = now;
        self
    }

    fn t(&self, key: &str) -> usize {
        self.plan.tasks.iter().position(|t| t.key == key).unwrap_or_else(|| panic!("no task {key}"))
    }

    fn s(&self, id: &str) -> usize {
        self.plan.stages.iter().position(|s| s.id == id).unwrap()
    }

    fn task(&self, key: &str) -> TaskState {
        self.state.tasks[self.t(key)]
    }

    fn stage(&self, id: &str) -> StageStatus {
        self.state.stages[self.s(id)].status
    }

    fn dispatch(&self, key: &str, attempt: u32) -> Effect {
        Effect::Dispatch { task: self.t(key), attempt }
    }

    /// Starts and finishes the current attempt of `key`.
    fn complete(&mut self, key: &str, outcome: TaskOutcome) -> Vec<Effect> {
        let task = self.t(key);
        let attempt = self.state.tasks[task].attempt;
        let fx = self.ev(Event::TaskStarted { task, attempt });
        assert!(fx.iter().all(|e| matches!(e, Effect::WakeAt { .. })), "{fx:?}");
        self.ev(Event::TaskFinished { task, attempt, outcome })
    }
}

const CHAIN: &str = "
stages:
  - id: build
    tasks:
      - { id: compile, run: [make] }
      - { id: test, needs: [compile], run: [make, test] }
";

#[test]
fn a_chain_runs_to_success() {
    let mut r = Run::new(CHAIN);
    assert_eq!(r.state.status, RunStatus::Pending);
    assert_eq!(r.ev(Event::Start), vec![r.dispatch("compile", 1)]);
    assert_eq!(r.state.status, RunStatus::Running);
    assert_eq!((r.state.started_at, r.state.deadline), (Some(1_000), None));
    assert_eq!(r.stage("build"), StageStatus::Running);
    assert_eq!(r.task("compile").status, TaskStatus::Queued);
    assert_eq!(r.task("test").status, TaskStatus::Pending);

    let compile = r.t("compile");
    r.at(2_000);
    assert_eq!(r.ev(Event::TaskStarted { task: compile, attempt: 1 }), vec![]);
    assert_eq!(r.task("compile").status, TaskStatus::Running);
    assert_eq!(r.task("compile").started_at, Some(2_000));
    r.at(3_000);
    let fx = r.ev(Event::TaskFinished { task: compile, attempt: 1, outcome: TaskOutcome::Succeeded });
    assert_eq!(fx, vec![r.dispatch("test", 1)]);
    assert_eq!(r.task("compile").status, TaskStatus::Succeeded);
    assert_eq!(r.task("compile").finished_at, Some(3_000));
    // A task can finish without a TaskStarted (the started report may be lost).
    let test = r.t("test");
    r.at(4_000);
    let fx = r.ev(Event::TaskFinished { task: test, attempt: 1, outcome: TaskOutcome::Succeeded });
    assert_eq!(fx, vec![Effect::Finished { status: RunStatus::Succeeded }]);
    assert_eq!(r.stage("build"), StageStatus::Succeeded);
    assert_eq!((r.state.status, r.state.finished_at), (RunStatus::Succeeded, Some(4_000)));
    assert_eq!(r.finished, 1);
}

#[test]
fn a_clock_that_goes_back_never_records_a_start_before_the_needs_ended() {
    let mut r = Run::new(CHAIN);
    r.ev(Event::Start);
    let (compile, test) = (r.t("compile"), r.t("test"));
    r.at(2_000).ev(Event::TaskStarted { task: compile, attempt: 1 });
    r.at(3_000).ev(Event::TaskFinished { task: compile, attempt: 1, outcome: TaskOutcome::Succeeded });
    // Whoever reports next read its clock before the completion above was recorded.
    r.at(2_500).ev(Event::TaskStarted { task: test, attempt: 1 });
    assert_eq!(r.task("test").started_at, Some(3_000));
    r.at(2_900).ev(Event::TaskFinished { task: test, attempt: 1, outcome: TaskOutcome::Succeeded });
    assert_eq!(r.task("test").finished_at, Some(3_000));
    assert_eq!((r.state.status, r.state.finished_at), (RunStatus::Succeeded, Some(3_000)));
    assert_eq!(r.state.last_recorded(), Some(3_000));
    // A later clock is taken as it is.
    let mut r = Run::new(CHAIN);
    r.ev(Event::Start);
    r.at(5_000).ev(Event::TaskStarted { task: compile, attempt: 1 });
    assert_eq!(r.task("compile").started_at, Some(5_000));
}

#[test]
fn a_retry_is_timed_from_the_latest_recorded_time() {
    let mut r =
        Run::new("stages:\n  - id: s\n    tasks:\n      - { id: a, run: [a], retries: { max: 1, initial: 10s } }\n");
    r.ev(Event::Start);
    let a = r.t("a");
    r.at(4_000).ev(Event::TaskStarted { task: a, attempt: 1 });
    r.at(3_000).ev(Event::TaskFinished { task: a, attempt: 1, outcome: TaskOutcome::Failed });
    assert_eq!(r.task("a").not_before, Some(14_000));
}

const CONDITIONS: &str = "
stages:
  - id: s
    tasks:
      - { id: a, run: [a] }
      - { id: ok, needs: [a], run: [x] }
      - { id: fix, needs: [a], when: on_failure, run: [x] }
      - { id: cleanup, needs: [a], when: always, run: [x] }
      - { id: after_ok, needs: [ok], run: [x] }
      - { id: after_ok_fail, needs: [ok], when: on_failure, run: [x] }
      - { id: after_ok_always, needs: [ok], when: always, run: [x] }
";

#[test]
fn conditions_after_a_failure() {
    let mut r = Run::new(CONDITIONS);
    r.ev(Event::Start);
    let fx = r.complete("a", TaskOutcome::Failed);
    assert_eq!(fx, vec![r.dispatch("fix", 1), r.dispatch("cleanup", 1), r.dispatch("after_ok_always", 1)]);
    assert_eq!(r.task("a").status, TaskStatus::Failed);
    assert_eq!(r.task("ok").status, TaskStatus::Skipped);
    // Downstream of a skipped task: on_success skipped, on_failure skipped (no need failed).
    assert_eq!(r.task("after_ok").status, TaskStatus::Skipped);
    assert_eq!(r.task("after_ok_fail").status, TaskStatus::Skipped);
    r.complete("fix", TaskOutcome::Succeeded);
    r.complete("cleanup", TaskOutcome::Succeeded);
    let fx = r.complete("after_ok_always", TaskOutcome::Succeeded);
    // The stage fails because a task failed, even though on_failure handled it.
    assert_eq!(fx, vec![Effect::Finished { status: RunStatus::Failed }]);
    assert_eq!(r.stage("s"), StageStatus::Failed);
}

#[test]
fn conditions_after_a_success() {
    let mut r = Run::new(CONDITIONS);
    r.ev(Event::Start);
    let fx = r.complete("a", TaskOutcome::Succeeded);
    assert_eq!(fx, vec![r.dispatch("ok", 1), r.dispatch("cleanup", 1)]);
    assert_eq!(r.task("fix").status, TaskStatus::Skipped);
    let fx = r.complete("ok", TaskOutcome::Failed);
    assert_eq!(fx, vec![r.dispatch("after_ok_fail", 1), r.dispatch("after_ok_always", 1)]);
    assert_eq!(r.task("after_ok").status, TaskStatus::Skipped);
    r.complete("after_ok_fail", TaskOutcome::Succeeded);
    r.complete("after_ok_always", TaskOutcome::Succeeded);
    assert_eq!(r.complete("cleanup", TaskOutcome::Succeeded), vec![Effect::Finished { status: RunStatus::Failed }]);
}

#[test]
fn on_failure_without_needs_is_skipped_and_always_runs() {
    let mut r = Run::new(
        "
stages:
  - id: s
    tasks:
      - { id: f, when: on_failure, run: [x] }
      - { id: w, when: always, run: [x] }
",
    );
    assert_eq!(r.ev(Event::Start), vec![r.dispatch("w", 1)]);
    assert_eq!(r.task("f").status, TaskStatus::Skipped);
    assert_eq!(r.complete("w", TaskOutcome::Succeeded), vec![Effect::Finished { status: RunStatus::Succeeded }]);
}

const RETRY_FIXED: &str = "
stages:
  - id: s
    tasks:
      - { id: a, run: [a], retries: { max: 2, initial: 5s } }
";

#[test]
fn fixed_retries_then_failure() {
    let mut r = Run::new(RETRY_FIXED);
    r.ev(Event::Start);
    r.at(10_000);
    let fx = r.complete("a", TaskOutcome::Failed);
    assert_eq!(fx, vec![Effect::WakeAt { at: 15_000 }]);
    assert_eq!(
        r.task("a"),
        TaskState {
            status: TaskStatus::Pending,
            attempt: 1,
            not_before: Some(15_000),
            started_at: Some(10_000),
            finished_at: None,
            lost: 0,
        }
    );
    assert_eq!(r.state.status, RunStatus::Running);
    // Too early: nothing happens but the alarm is repeated.
    r.at(14_999);
    assert_eq!(r.ev(Event::Tick), vec![Effect::WakeAt { at: 15_000 }]);
    r.at(15_000);
    assert_eq!(r.ev(Event::Tick), vec![r.dispatch("a", 2)]);
    assert_eq!(r.task("a").not_before, None);
    r.at(20_000);
    assert_eq!(r.complete("a", TaskOutcome::TimedOut), vec![Effect::WakeAt { at: 25_000 }]);
    r.at(30_000);
    assert_eq!(r.ev(Event::Tick), vec![r.dispatch("a", 3)]);
    assert_eq!(r.complete("a", TaskOutcome::Failed), vec![Effect::Finished { status: RunStatus::Failed }]);
    assert_eq!(r.task("a").status, TaskStatus::Failed);
    assert_eq!(r.task("a").attempt, 3);
}

#[test]
fn retry_then_success() {
    let mut r = Run::new(RETRY_FIXED);
    r.ev(Event::Start);
    r.complete("a", TaskOutcome::Failed);
    r.at(6_000);
    assert_eq!(r.ev(Event::Tick), vec![r.dispatch("a", 2)]);
    assert_eq!(r.complete("a", TaskOutcome::Succeeded), vec![Effect::Finished { status: RunStatus::Succeeded }]);
}

#[test]
fn lost_attempts_run_again_at_once_without_using_retries() {
    // No retries: a task whose worker dies still runs again, up to MAX_LOST times.
    let mut r = Run::new("stages:\n  - id: s\n    tasks:\n      - { id: a, run: [a] }\n");
    r.ev(Event::Start);
    for lost in 1..=super::MAX_LOST {
        r.at(1_000 * i64::from(lost));
        assert_eq!(r.complete("a", TaskOutcome::Lost), vec![Effect::WakeAt { at: r.now }]);
        assert_eq!((r.task("a").status, r.task("a").lost), (TaskStatus::Pending, lost));
        assert_eq!(r.ev(Event::Tick), vec![r.dispatch("a", lost + 1)]);
    }
    // One more loss is a failure like any other, and there is no retry left.
    assert_eq!(r.complete("a", TaskOutcome::Lost), vec![Effect::Finished { status: RunStatus::Failed }]);
    assert_eq!(r.task("a").attempt, super::MAX_LOST + 1);

    // Lost attempts do not count against `retries.max`, nor towards the backoff.
    let mut r = Run::new(RETRY_FIXED);
    r.ev(Event::Start);
    r.at(1_000);
    r.complete("a", TaskOutcome::Lost);
    r.ev(Event::Tick);
    r.at(2_000);
    assert_eq!(r.complete("a", TaskOutcome::Failed), vec![Effect::WakeAt { at: 7_000 }]);
    r.at(7_000);
    assert_eq!(r.ev(Event::Tick), vec![r.dispatch("a", 3)]);
    assert_eq!(r.complete("a", TaskOutcome::Failed), vec![Effect::WakeAt { at: 12_000 }]);
    r.at(12_000);
    assert_eq!(r.ev(Event::Tick), vec![r.dispatch("a", 4)]);
    assert_eq!(r.complete("a", TaskOutcome::Failed), vec![Effect::Finished { status: RunStatus::Failed }]);
}

#[test]
fn exponential_backoff_is_capped() {
    let mut r = Run::new(
        "
stages:
  - id: s
    tasks:
      - { id: a, run: [a], retries: { max: 5, backoff: exponential, initial: 1s, max_delay: 3s } }
",
    );
    r.ev(Event::Start);
    let mut delays = Vec::new();
    for attempt in 1..=5 {
        assert_eq!(r.task("a").attempt, attempt);
        let fx = r.complete("a", TaskOutcome::Failed);
        let Some(&Effect::WakeAt { at }) = fx.first() else { panic!("{fx:?}") };
        delays.push(at - r.now);
        r.at(at);
        assert_eq!(r.ev(Event::Tick), vec![r.dispatch("a", attempt + 1)]);
    }
    assert_eq!(delays, vec![1_000, 2_000, 3_000, 3_000, 3_000]);
    assert_eq!(r.complete("a", TaskOutcome::Failed), vec![Effect::Finished { status: RunStatus::Failed }]);
}

#[test]
fn retry_delays() {
    let mut task = compiled(RETRY_FIXED, json!({})).tasks[0].clone();
    assert_eq!(retry_delay(&task, 1), 5_000);
    assert_eq!(retry_delay(&task, 7), 5_000);
    task.backoff_exponential = true;
    assert_eq!((1..=4).map(|a| retry_delay(&task, a)).collect::<Vec<_>>(), vec![5_000, 10_000, 20_000, 40_000]);
    assert_eq!(retry_delay(&task, 0), 5_000);
    assert_eq!(retry_delay(&task, 200), i64::MAX);
    task.max_delay_ms = Some(12_000);
    assert_eq!(retry_delay(&task, 3), 12_000);
    assert_eq!(retry_delay(&task, u32::MAX), 12_000);
    task.initial_delay_ms = -5;
    assert_eq!(retry_delay(&task, 2), 0);
}

#[test]
fn stale_and_duplicate_reports_are_ignored() {
    let mut r = Run::new(RETRY_FIXED);
    r.ev(Event::Start);
    let a = r.t("a");
    r.ignored(Event::TaskStarted { task: a, attempt: 2 });
    r.ignored(Event::TaskFinished { task: a, attempt: 0, outcome: TaskOutcome::Succeeded });
    r.ignored(Event::TaskFinished { task: a, attempt: 2, outcome: TaskOutcome::Failed });
    r.ignored(Event::TaskStarted { task: 99, attempt: 1 });
    r.ignored(Event::TaskFinished { task: 99, attempt: 1, outcome: TaskOutcome::Failed });
    r.ignored(Event::GateDecided { stage: 99, approved: true });
    r.ev(Event::TaskStarted { task: a, attempt: 1 });
    r.ignored(Event::TaskStarted { task: a, attempt: 1 });
    r.ev(Event::TaskFinished { task: a, attempt: 1, outcome: TaskOutcome::Failed });
    // The task waits for its retry: a duplicate completion of attempt 1 changes nothing.
    r.ignored(Event::TaskFinished { task: a, attempt: 1, outcome: TaskOutcome::Failed });
    r.ignored(Event::TaskFinished { task: a, attempt: 1, outcome: TaskOutcome::Succeeded });
    r.ignored(Event::TaskStarted { task: a, attempt: 1 });
    r.at(7_000);
    r.ev(Event::Tick);
    // Attempt 1's late success after attempt 2 was dispatched is stale too.
    r.ignored(Event::TaskFinished { task: a, attempt: 1, outcome: TaskOutcome::Succeeded });
    r.ev(Event::TaskFinished { task: a, attempt: 2, outcome: TaskOutcome::Succeeded });
    assert_eq!(r.finished, 1);
    // After the run finished, everything is ignored.
    r.ignored(Event::TaskFinished { task: a, attempt: 2, outcome: TaskOutcome::Succeeded });
    r.ignored(Event::Cancel);
    r.ignored(Event::Tick);
    r.ignored(Event::Start);
    assert_eq!(r.finished, 1);
}

#[test]
fn events_before_start_and_double_start() {
    let mut r = Run::new(CHAIN);
    r.ignored(Event::Tick);
    r.ignored(Event::TaskStarted { task: 0, attempt: 1 });
    r.ignored(Event::TaskFinished { task: 0, attempt: 0, outcome: TaskOutcome::Succeeded });
    r.ignored(Event::GateDecided { stage: 0, approved: true });
    r.ev(Event::Start);
    r.ignored(Event::Start);
}

#[test]
fn cancel_before_start() {
    let mut r = Run::new(CHAIN);
    assert_eq!(r.ev(Event::Cancel), vec![Effect::Finished { status: RunStatus::Cancelled }]);
    assert_eq!(r.state.status, RunStatus::Cancelled);
    assert!(r.state.tasks.iter().all(|t| t.status == TaskStatus::Cancelled));
    assert_eq!(r.stage("build"), StageStatus::Cancelled);
    r.ignored(Event::Start);
}

const FAN_OUT: &str = "
params:
  regions: { type: array, default: [eu, us, ap] }
stages:
  - id: s
    tasks:
      - { id: prep, run: [x] }
      - { id: deploy, needs: [prep], for_each: '{{ params.regions }}', run: [deploy, '{{ item }}'] }
      - { id: done, needs: [deploy], noop: true }
";

#[test]
fn fan_out_and_join() {
    let mut r = Run::new(FAN_OUT);
    let keys: Vec<&str> = r.plan.tasks.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(keys, ["prep", "deploy[0]", "deploy[1]", "deploy[2]", "done"]);
    assert_eq!(r.plan.tasks[2].item, Some(json!("us")));
    assert_eq!(r.plan.tasks[2].task_id, "deploy");
    assert_eq!(r.plan.tasks[2].spec_index, (0, 1));
    assert_eq!(r.plan.tasks[4].spec_index, (0, 2));
    assert_eq!(r.plan.tasks[1].needs, vec![0]);
    assert_eq!(r.plan.tasks[4].needs, vec![1, 2, 3]);
    assert_eq!(r.plan.stages[0].tasks, vec![0, 1, 2, 3, 4]);
    r.ev(Event::Start);
    let fx = r.complete("prep", TaskOutcome::Succeeded);
    assert_eq!(fx, vec![r.dispatch("deploy[0]", 1), r.dispatch("deploy[1]", 1), r.dispatch("deploy[2]", 1)]);
    assert_eq!(r.complete("deploy[2]", TaskOutcome::Succeeded), vec![]);
    assert_eq!(r.complete("deploy[0]", TaskOutcome::Succeeded), vec![]);
    assert_eq!(r.complete("deploy[1]", TaskOutcome::Succeeded), vec![r.dispatch("done", 1)]);
    assert_eq!(r.complete("done", TaskOutcome::Succeeded), vec![Effect::Finished { status: RunStatus::Succeeded }]);
}

#[test]
fn fan_out_instance_failure_skips_the_join() {
    let mut r = Run::new(FAN_OUT);
    r.ev(Event::Start);
    r.complete("prep", TaskOutcome::Succeeded);
    r.complete("deploy[0]", TaskOutcome::Succeeded);
    r.complete("deploy[1]", TaskOutcome::Failed);
    assert_eq!(r.task("done").status, TaskStatus::Pending);
    assert_eq!(r.complete("deploy[2]", TaskOutcome::Succeeded), vec![Effect::Finished { status: RunStatus::Failed }]);
    assert_eq!(r.task("done").status, TaskStatus::Skipped);
}

#[test]
fn fan_out_over_an_empty_list() {
    let spec = parse_definition(FAN_OUT).unwrap();
    let plan = compile(&spec, &params(json!({ "regions": [] }))).unwrap();
    let keys: Vec<&str> = plan.tasks.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(keys, ["prep", "done"]);
    assert_eq!(plan.tasks[1].needs, Vec::<usize>::new());
    let mut r = Run::with(plan);
    // The join over nothing is satisfied at once.
    assert_eq!(r.ev(Event::Start), vec![r.dispatch("prep", 1), r.dispatch("done", 1)]);

    // A stage whose only task fans out over nothing succeeds as soon as it starts.
    let yaml = "
params:
  xs: { type: array, default: [] }
stages:
  - id: a
    tasks:
      - { id: each, for_each: '{{params.xs}}', noop: true }
  - id: b
    needs: [a]
    tasks:
      - { id: after, noop: true }
";
    let mut r = Run::new(yaml);
    assert!(r.plan.stages[0].tasks.is_empty());
    assert_eq!(r.ev(Event::Start), vec![r.dispatch("after", 1)]);
    assert_eq!(r.stage("a"), StageStatus::Succeeded);
}

#[test]
fn fan_out_join_between_two_fan_outs() {
    let yaml = "
params:
  xs: { type: array, default: [1, 2] }
  ys: { type: array, default: [{ n: a }, { n: b }, { n: c }] }
stages:
  - id: s
    tasks:
      - { id: x, for_each: '{{ params.xs }}', noop: true }
      - { id: y, needs: [x], for_each: '{{ params.ys }}', noop: true }
";
    let plan = compiled(yaml, json!({}));
    assert_eq!(plan.tasks.len(), 5);
    for y in 2..5 {
        assert_eq!(plan.tasks[y].needs, vec![0, 1]);
    }
    assert_eq!(plan.tasks[4].key, "y[2]");
    assert_eq!(plan.tasks[4].item, Some(json!({ "n": "c" })));
}

const GATED: &str = "
stages:
  - id: build
    tasks:
      - { id: compile, run: [make] }
  - id: prod
    needs: [build]
    gate: { approvals: 2, timeout: 1h }
    tasks:
      - { id: deploy, run: [deploy] }
  - id: after
    needs: [prod]
    tasks:
      - { id: notify, run: [notify] }
";

fn gated(on_timeout: &str) -> Run {
    let yaml = GATED.replace("timeout: 1h }", &format!("timeout: 1h, on_timeout: {on_timeout} }}"));
    let mut r = Run::new(&yaml);
    r.ev(Event::Start);
    let fx = r.complete("compile", TaskOutcome::Succeeded);
    assert_eq!(fx, vec![Effect::WakeAt { at: r.now + 3_600_000 }]);
    assert_eq!(r.stage("prod"), StageStatus::Waiting);
    assert_eq!(r.state.stages[r.s("prod")].gate_deadline, Some(r.now + 3_600_000));
    assert_eq!(r.state.status, RunStatus::Waiting);
    assert_eq!(r.task("deploy").status, TaskStatus::Pending);
    r
}

#[test]
fn gate_approved() {
    let mut r = gated("reject");
    let prod = r.s("prod");
    r.ignored(Event::GateDecided { stage: r.s("build"), approved: false });
    r.ignored(Event::GateDecided { stage: r.s("after"), approved: true });
    assert_eq!(r.ev(Event::GateDecided { stage: prod, approved: true }), vec![r.dispatch("deploy", 1)]);
    assert_eq!(r.stage("prod"), StageStatus::Running);
    assert_eq!(r.state.stages[prod].gate_deadline, None);
    assert_eq!(r.state.status, RunStatus::Running);
    r.ignored(Event::GateDecided { stage: prod, approved: false });
    r.complete("deploy", TaskOutcome::Succeeded);
    assert_eq!(r.complete("notify", TaskOutcome::Succeeded), vec![Effect::Finished { status: RunStatus::Succeeded }]);
}

#[test]
fn gate_rejected() {
    let mut r = gated("approve");
    let fx = r.ev(Event::GateDecided { stage: r.s("prod"), approved: false });
    assert_eq!(fx, vec![Effect::Finished { status: RunStatus::Failed }]);
    assert_eq!(r.stage("prod"), StageStatus::Failed);
    assert_eq!(r.task("deploy").status, TaskStatus::Skipped);
    assert_eq!(r.stage("after"), StageStatus::Skipped);
    assert_eq!(r.task("notify").status, TaskStatus::Skipped);
    assert_eq!(r.state.status, RunStatus::Failed);
}

#[test]
fn gate_timeout_approves() {
    let mut r = gated("approve");
    let deadline = r.state.stages[r.s("prod")].gate_deadline.unwrap();
    r.at(deadline - 1);
    assert_eq!(r.ev(Event::Tick), vec![Effect::WakeAt { at: deadline }]);
    r.at(deadline);
    assert_eq!(r.ev(Event::Tick), vec![r.dispatch("deploy", 1)]);
    assert_eq!(r.stage("prod"), StageStatus::Running);
}

#[test]
fn gate_timeout_rejects() {
    let mut r = gated("reject");
    let deadline = r.state.stages[r.s("prod")].gate_deadline.unwrap();
    r.at(deadline + 5);
    assert_eq!(r.ev(Event::Tick), vec![Effect::Finished { status: RunStatus::Failed }]);
    assert_eq!(r.stage("prod"), StageStatus::Failed);
    assert_eq!(r.stage("after"), StageStatus::Skipped);
}

#[test]
fn gate_without_timeout_waits_forever() {
    let mut r = Run::new(&GATED.replace(", timeout: 1h", ""));
    r.ev(Event::Start);
    assert_eq!(r.complete("compile", TaskOutcome::Succeeded), vec![]);
    assert_eq!(r.state.status, RunStatus::Waiting);
    r.at(i64::MAX);
    assert_eq!(r.ev(Event::Tick), vec![]);
    assert_eq!(r.stage("prod"), StageStatus::Waiting);
}

#[test]
fn failed_stage_skips_dependents() {
    let mut r = Run::new(GATED);
    r.ev(Event::Start);
    assert_eq!(r.complete("compile", TaskOutcome::Failed), vec![Effect::Finished { status: RunStatus::Failed }]);
    assert_eq!(r.stage("build"), StageStatus::Failed);
    assert_eq!(r.stage("prod"), StageStatus::Skipped);
    assert_eq!(r.stage("after"), StageStatus::Skipped);
    assert!(r.state.tasks[1..].iter().all(|t| t.status == TaskStatus::Skipped && t.attempt == 0));
}

#[test]
fn stages_run_in_parallel_and_join() {
    let yaml = "
stages:
  - id: join
    needs: [a, b]
    tasks: [{ id: j, noop: true }]
  - id: a
    tasks: [{ id: ta, noop: true }]
  - id: b
    tasks: [{ id: tb, noop: true }]
";
    let mut r = Run::new(yaml);
    assert_eq!(r.plan.stages[0].needs, vec![1, 2]);
    assert_eq!(r.ev(Event::Start), vec![r.dispatch("ta", 1), r.dispatch("tb", 1)]);
    assert_eq!(r.complete("tb", TaskOutcome::Succeeded), vec![]);
    assert_eq!(r.stage("join"), StageStatus::Pending);
    assert_eq!(r.complete("ta", TaskOutcome::Succeeded), vec![r.dispatch("j", 1)]);
}

#[test]
fn cancel_kills_and_cancels() {
    let mut r = Run::new(FAN_OUT);
    r.ev(Event::Start);
    r.complete("prep", TaskOutcome::Succeeded);
    let d0 = r.t("deploy[0]");
    r.ev(Event::TaskStarted { task: d0, attempt: 1 });
    r.complete("deploy[1]", TaskOutcome::Succeeded);
    r.at(50_000);
    let fx = r.ev(Event::Cancel);
    assert_eq!(
        fx,
        vec![
            Effect::Kill { task: d0, attempt: 1 },
            Effect::Kill { task: r.t("deploy[2]"), attempt: 1 },
            Effect::Finished { status: RunStatus::Cancelled }
        ]
    );
    assert_eq!(r.task("deploy[0]").status, TaskStatus::Cancelled);
    assert_eq!(r.task("deploy[1]").status, TaskStatus::Succeeded);
    assert_eq!(r.task("done").status, TaskStatus::Cancelled);
    assert_eq!(r.task("done").finished_at, Some(50_000));
    assert_eq!(r.stage("s"), StageStatus::Cancelled);
    assert_eq!((r.state.status, r.state.finished_at), (RunStatus::Cancelled, Some(50_000)));
    // The killed attempt's late report is ignored.
    r.ignored(Event::TaskFinished { task: d0, attempt: 1, outcome: TaskOutcome::Failed });
    r.ignored(Event::Cancel);
    assert_eq!(r.finished, 1);
}

#[test]
fn cancel_while_waiting_for_a_gate_or_a_retry() {
    let mut r = gated("reject");
    assert_eq!(r.ev(Event::Cancel), vec![Effect::Finished { status: RunStatus::Cancelled }]);
    assert_eq!(r.stage("build"), StageStatus::Succeeded);
    assert_eq!(r.stage("prod"), StageStatus::Cancelled);
    assert_eq!(r.state.stages[r.s("prod")].gate_deadline, None);

    let mut r = Run::new(RETRY_FIXED);
    r.ev(Event::Start);
    r.complete("a", TaskOutcome::Failed);
    assert_eq!(r.ev(Event::Cancel), vec![Effect::Finished { status: RunStatus::Cancelled }]);
    assert_eq!(r.task("a").status, TaskStatus::Cancelled);
    assert_eq!(r.task("a").not_before, None);
}

#[test]
fn run_timeout() {
    let yaml = format!("timeout: 1m\n{CHAIN}");
    let mut r = Run::new(&yaml);
    assert_eq!(r.plan.run_timeout_ms, Some(60_000));
    assert_eq!(r.ev(Event::Start), vec![r.dispatch("compile", 1), Effect::WakeAt { at: 61_000 }]);
    assert_eq!(r.state.deadline, Some(61_000));
    let compile = r.t("compile");
    assert_eq!(r.ev(Event::TaskStarted { task: compile, attempt: 1 }), vec![Effect::WakeAt { at: 61_000 }]);
    r.at(60_999);
    assert_eq!(r.ev(Event::Tick), vec![Effect::WakeAt { at: 61_000 }]);
    r.at(61_000);
    let fx = r.ev(Event::Tick);
    assert_eq!(fx, vec![Effect::Kill { task: compile, attempt: 1 }, Effect::Finished { status: RunStatus::TimedOut }]);
    assert_eq!(r.task("compile").status, TaskStatus::Cancelled);
    assert_eq!(r.task("test").status, TaskStatus::Cancelled);
    assert_eq!(r.stage("build"), StageStatus::Cancelled);
    assert_eq!((r.state.status, r.state.finished_at), (RunStatus::TimedOut, Some(61_000)));
    r.ignored(Event::Tick);
    r.ignored(Event::TaskFinished { task: compile, attempt: 1, outcome: TaskOutcome::Succeeded });
}

#[test]
fn wake_at_is_the_earliest_deadline() {
    let yaml = "
timeout: 1h
stages:
  - id: s
    tasks:
      - { id: a, run: [a], retries: { max: 1, initial: 10s } }
      - { id: b, run: [b], retries: { max: 1, initial: 2s } }
      - { id: c, run: [c], retries: { max: 1, initial: 1d } }
";
    let mut r = Run::new(yaml);
    r.at(0);
    r.ev(Event::Start);
    assert_eq!(r.complete("a", TaskOutcome::Failed), vec![Effect::WakeAt { at: 10_000 }]);
    assert_eq!(r.complete("b", TaskOutcome::Failed), vec![Effect::WakeAt { at: 2_000 }]);
    // A retry later than the run deadline: the deadline comes first.
    assert_eq!(r.complete("c", TaskOutcome::Failed), vec![Effect::WakeAt { at: 2_000 }]);
    r.at(3_000);
    assert_eq!(r.ev(Event::Tick), vec![r.dispatch("b", 2), Effect::WakeAt { at: 10_000 }]);
    r.at(20_000);
    assert_eq!(r.ev(Event::Tick), vec![r.dispatch("a", 2), Effect::WakeAt { at: 3_600_000 }]);
}

#[test]
fn mismatched_or_malformed_input_does_not_panic() {
    let mut plan = compiled(CHAIN, json!({}));
    // A state with missing entries is padded.
    let mut state = RunState::new(&plan);
    state.tasks.clear();
    state.stages.clear();
    let (state, fx) = super::plan(&plan, &state, Event::Start, 0);
    assert_eq!(fx, vec![Effect::Dispatch { task: 0, attempt: 1 }]);
    assert_eq!(state.tasks.len(), 2);
    // Out-of-range needs are ignored; a cycle leaves the tasks waiting (cancel still works).
    plan.tasks[0].needs = vec![57];
    plan.stages[0].needs = vec![9];
    plan.stages[0].tasks.push(42);
    let (_, fx) = super::plan(&plan, &RunState::new(&plan), Event::Start, 0);
    assert_eq!(fx, vec![Effect::Dispatch { task: 0, attempt: 1 }]);
    plan.tasks[0].needs = vec![1];
    let (state, fx) = super::plan(&plan, &RunState::new(&plan), Event::Start, 0);
    assert_eq!(fx, vec![]);
    let (_, fx) = super::plan(&plan, &state, Event::Cancel, 0);
    assert_eq!(fx, vec![Effect::Finished { status: RunStatus::Cancelled }]);
    // A plan with no stages succeeds at once.
    let empty = RunPlan { stages: vec![], tasks: vec![], run_timeout_ms: Some(-5), params: serde_json::Map::new() };
    let (state, fx) = super::plan(&empty, &RunState::new(&empty), Event::Start, 7);
    assert_eq!(fx, vec![Effect::Finished { status: RunStatus::Succeeded }]);
    assert_eq!(state.finished_at, Some(7));
}

#[test]
fn statuses_have_stable_names() {
    for status in TaskStatus::ALL {
        assert_eq!(status.as_str().parse::<TaskStatus>(), Ok(*status));
        assert_eq!(serde_json::to_value(status).unwrap(), json!(status.as_str()));
        assert_eq!(status.to_string(), status.as_str());
    }
    for status in StageStatus::ALL {
        assert_eq!(status.as_str().parse::<StageStatus>(), Ok(*status));
        assert_eq!(serde_json::to_value(status).unwrap(), json!(status.as_str()));
    }
    for status in RunStatus::ALL {
        assert_eq!(status.as_str().parse::<RunStatus>(), Ok(*status));
        assert_eq!(serde_json::from_value::<RunStatus>(json!(status.as_str())).unwrap(), *status);
    }
    assert_eq!(RunStatus::TimedOut.as_str(), "timed_out");
    assert_eq!(TaskStatus::ALL.len(), 7);
    assert_eq!(StageStatus::ALL.len(), 7);
    assert_eq!(RunStatus::ALL.len(), 7);
    let terminal: Vec<&str> = RunStatus::ALL.iter().filter(|s| s.is_terminal()).map(|s| s.as_str()).collect();
    assert_eq!(terminal, ["succeeded", "failed", "cancelled", "timed_out"]);
    let terminal: Vec<&str> = TaskStatus::ALL.iter().filter(|s| s.is_terminal()).map(|s| s.as_str()).collect();
    assert_eq!(terminal, ["succeeded", "failed", "cancelled", "skipped"]);
    assert!(!StageStatus::Waiting.is_terminal());
    let err = "done".parse::<TaskStatus>().unwrap_err();
    assert_eq!(err.to_string(), "unknown task status `done`");
    assert!("Pending".parse::<RunStatus>().is_err());
}

#[test]
fn plan_state_and_events_round_trip_as_json() {
    let plan = compiled(FAN_OUT, json!({}));
    let text = serde_json::to_string(&plan).unwrap();
    assert_eq!(serde_json::from_str::<RunPlan>(&text).unwrap(), plan);
    let mut r = Run::with(plan);
    r.ev(Event::Start);
    r.complete("prep", TaskOutcome::Failed);
    let value = serde_json::to_value(&r.state).unwrap();
    assert_eq!(value["status"], json!("failed"));
    assert_eq!(value["tasks"][1]["status"], json!("skipped"));
    assert_eq!(serde_json::from_value::<RunState>(value).unwrap(), r.state);
    let event = Event::TaskFinished { task: 3, attempt: 2, outcome: TaskOutcome::TimedOut };
    let value = serde_json::to_value(event).unwrap();
    assert_eq!(value, json!({ "type": "task_finished", "task": 3, "attempt": 2, "outcome": "timed_out" }));
    assert_eq!(serde_json::from_value::<Event>(value).unwrap(), event);
    let effect = Effect::Finished { status: RunStatus::TimedOut };
    assert_eq!(serde_json::to_value(effect).unwrap(), json!({ "type": "finished", "status": "timed_out" }));
}

const PARAMS: &str = "
params:
  version: { type: string, required: true }
  replicas: { type: integer, default: 2 }
  ratio: { type: number }
  flags: { type: object, required: true, default: { a: 1 } }
stages:
  - id: s
    tasks: [{ id: a, noop: true }]
";

#[test]
fn params_are_checked_and_defaulted() {
    let plan = compiled(PARAMS, json!({ "version": "1.2", "ratio": 3 }));
    assert_eq!(
        serde_json::Value::Object(plan.params),
        json!({ "version": "1.2", "ratio": 3, "replicas": 2, "flags": { "a": 1 } })
    );
    let plan = compiled(PARAMS, json!({ "version": "1.2", "replicas": 5 }));
    assert_eq!(plan.params.get("replicas"), Some(&json!(5)));
    assert_eq!(plan.params.get("ratio"), None);

    let errors = compile_errors(PARAMS, json!({ "replicas": 1.5, "bogus": true, "ratio": "x" }));
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["params.bogus", "params.ratio", "params.replicas", "params.version"]);
    assert!(errors[0].message.contains("unknown param `bogus`"), "{}", errors[0].message);
    assert_eq!(errors[1].message, "param `ratio` must be of type number; got string");
    assert_eq!(errors[2].message, "param `replicas` must be of type integer; got number");
    assert_eq!(errors[3].message, "missing required param `version`");
    let errors = compile(&parse_definition(PARAMS).unwrap(), &serde_json::Map::new()).unwrap_err();
    assert!(errors.to_string().contains("params.version: missing required param `version`"), "{errors}");
    let spec_errors: crate::spec::SpecErrors = errors.into();
    assert_eq!(spec_errors.errors()[0].path, "params.version");
    assert_eq!(
        compile_errors(PARAMS, json!({ "version": null }))[0].message,
        "param `version` must be of type string; got null"
    );
}

#[test]
fn plan_fields_come_from_the_spec() {
    let yaml = "
timeout: 2h
stages:
  - id: b
    tasks:
      - { id: c, run: [x], timeout: 10m, retries: { max: 3, backoff: exponential, initial: 5s, max_delay: 1m } }
      - { id: d, needs: [c], when: always, noop: true }
  - id: p
    needs: [b]
    gate: { approvals: 2, timeout: 72h, on_timeout: approve }
    tasks: [{ id: e, noop: true }]
";
    let plan = compiled(yaml, json!({}));
    assert_eq!(plan.run_timeout_ms, Some(7_200_000));
    let c = &plan.tasks[0];
    assert_eq!((c.key.as_str(), c.stage, c.spec_index), ("c", 0, (0, 0)));
    assert_eq!(
        (c.max_retries, c.backoff_exponential, c.initial_delay_ms, c.max_delay_ms),
        (3, true, 5_000, Some(60_000))
    );
    assert_eq!((c.timeout_ms, c.item.clone(), c.when), (Some(600_000), None, crate::spec::When::OnSuccess));
    let d = &plan.tasks[1];
    assert_eq!((d.needs.clone(), d.when, d.max_retries, d.timeout_ms), (vec![0], crate::spec::When::Always, 0, None));
    assert_eq!(
        plan.stages[1],
        PlannedStage {
            id: "p".into(),
            needs: vec![0],
            gate: Some(PlannedGate { approvals: 2, timeout_ms: Some(259_200_000), approve_on_timeout: true }),
            tasks: vec![2],
        }
    );
    assert_eq!(plan.stages[0].gate, None);
}

#[test]
fn for_each_errors() {
    let base = "
params:
  xs: { type: array, default: [1] }
  s: { type: string, default: hi }
  opt: { type: array }
stages:
  - id: s
    tasks:
      - { id: a, noop: true }
      - { id: b, noop: true, for_each: 'FOR_EACH' }
";
    let error = |for_each: &str| {
        let errors = compile_errors(&base.replace("FOR_EACH", for_each), json!({}));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].path, "stages[0].tasks[1].for_each");
        errors[0].message.clone()
    };
    assert_eq!(error("{{ tasks.a.outputs.list }}"), "for_each over task outputs is not supported yet");
    assert!(error("{{ params.s }}").contains("needs a list, but param `s` is a string"));
    assert!(error("{{ params.opt }}").contains("has no value"));
    assert!(error("{{ params.nope }}").contains("unknown param `nope`"));
    assert!(error("{{ params.xs }}{{ params.xs }}").contains("single"));
    assert!(error("x{{ params.xs }}").contains("single"));
    assert!(error("{{ item }}").contains("single"));
    assert!(error("{{ run.id }}").contains("single"));
    assert!(error("[1, 2]").contains("single"));
    let message = error("{{ params.xs");
    assert!(message.contains("invalid `for_each` template") && message.contains("byte 0"), "{message}");
    // Surrounding whitespace is fine.
    let plan = compiled(&base.replace("FOR_EACH", "  {{params.xs}} "), json!({}));
    assert_eq!(plan.tasks[1].key, "b[0]");
    // The param's value decides, not its default.
    let plan = compiled(&base.replace("FOR_EACH", "{{ params.opt }}"), json!({ "opt": ["p", "q"] }));
    assert_eq!(plan.tasks.len(), 3);
}

#[test]
fn fan_out_limit() {
    let yaml = "
params:
  xs: { type: array }
stages:
  - id: s
    tasks:
      - { id: a, noop: true, for_each: '{{ params.xs }}' }
";
    let many: Vec<u32> = (0..=u32::try_from(MAX_PLANNED_TASKS).unwrap()).collect();
    let errors = compile_errors(yaml, json!({ "xs": many }));
    assert_eq!(errors[0].path, "stages");
    assert!(errors[0].message.contains("limit"), "{}", errors[0].message);
    let ok: Vec<u32> = (0..u32::try_from(MAX_PLANNED_TASKS).unwrap()).collect();
    assert_eq!(compiled(yaml, json!({ "xs": ok })).tasks.len(), MAX_PLANNED_TASKS);
}

#[test]
fn structural_errors_of_unvalidated_specs() {
    let mut spec = parse_definition(CHAIN).unwrap();
    spec.stages[0].tasks[0].needs.push(crate::ids::NodeId::parse("test").unwrap());
    let errors = compile(&spec, &serde_json::Map::new()).unwrap_err().into_vec();
    assert!(errors[0].message.contains("cycle"), "{errors:?}");
    spec.stages[0].tasks[0].needs = vec![crate::ids::NodeId::parse("ghost").unwrap()];
    spec.stages[0].needs = vec![crate::ids::NodeId::parse("nowhere").unwrap()];
    let errors = compile(&spec, &serde_json::Map::new()).unwrap_err().into_vec();
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["stages[0].needs[0]", "stages[0].tasks[0].needs[0]"]);
}

/// A retried run starts from a state in which the tasks that succeeded in the original run are
/// already `Succeeded`: the planner never dispatches them again and runs only the others.
#[test]
fn tasks_already_succeeded_at_start_are_never_dispatched_again() {
    let yaml = "
stages:
  - id: first
    tasks:
      - { id: a, run: [a] }
      - { id: b, needs: [a], run: [b] }
      - { id: c, needs: [a], run: [c] }
  - id: done
    needs: [first]
    tasks:
      - { id: d, run: [d] }
  - id: whole
    tasks:
      - { id: e, run: [e] }
";
    let mut r = Run::new(yaml);
    let carried = TaskState {
        status: TaskStatus::Succeeded,
        attempt: 2,
        not_before: None,
        started_at: Some(100),
        finished_at: Some(200),
        lost: 0,
    };
    for key in ["a", "c", "e"] {
        let i = r.t(key);
        r.state.tasks[i] = carried;
    }
    // Only `b` is dispatched; the stage whose every task was carried over succeeds at once.
    assert_eq!(r.ev(Event::Start), vec![r.dispatch("b", 1)]);
    for key in ["a", "c", "e"] {
        assert_eq!(r.task(key), carried, "{key} must be left as it was");
    }
    assert_eq!(r.stage("whole"), StageStatus::Succeeded);
    assert_eq!(r.stage("first"), StageStatus::Running);
    assert_eq!(r.complete("b", TaskOutcome::Succeeded), vec![r.dispatch("d", 1)]);
    assert_eq!(r.complete("d", TaskOutcome::Succeeded), vec![Effect::Finished { status: RunStatus::Succeeded }]);
    for key in ["a", "c", "e"] {
        assert_eq!(r.task(key), carried);
    }

    // Every task carried over: the run succeeds on Start without dispatching anything.
    let mut r = Run::new(yaml);
    r.state.tasks.iter_mut().for_each(|t| *t = carried);
    assert_eq!(r.ev(Event::Start), vec![Effect::Finished { status: RunStatus::Succeeded }]);
    assert_eq!(r.finished, 1);
}

#[test]
fn placement_is_compiled_and_old_plans_still_read() {
    let plan = compiled(
        "priority: 5\nstages:\n  - id: s\n    tasks:\n      - id: gpu\n        runs_on: [gpu, linux]\n        resources: { cpu: 2, memory: 1GiB }\n        priority: -3\n        noop: true\n      - id: plain\n        noop: true\n",
        json!({}),
    );
    let gpu = &plan.tasks[0];
    assert_eq!(gpu.runs_on, ["gpu", "linux"]);
    let r = gpu.resources.unwrap();
    assert_eq!((r.cpu, r.memory.map(crate::MemorySize::bytes)), (Some(2.0), Some(1 << 30)));
    assert_eq!(gpu.priority, 2);
    assert_eq!((plan.tasks[1].runs_on.len(), plan.tasks[1].resources, plan.tasks[1].priority), (0, None, 5));
    // A plan stored before these fields existed has none of them.
    let mut old = serde_json::to_value(&plan).unwrap();
    for t in old["tasks"].as_array_mut().unwrap() {
        let t = t.as_object_mut().unwrap();
        for k in ["runs_on", "resources", "priority"] {
            t.remove(k);
        }
    }
    let back: RunPlan = serde_json::from_value(old).unwrap();
    assert!(back.tasks.iter().all(|t| t.runs_on.is_empty() && t.resources.is_none() && t.priority == 0));
}
