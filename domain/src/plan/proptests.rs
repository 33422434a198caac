//! Property tests: random pipelines driven by a random, adversarial scheduler.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::duration::Duration;
use crate::ids::NodeId;
use crate::spec::{
    Backoff, GateSpec, OnTimeout, ParamSpec, ParamType, PipelineSpec, RetrySpec, StageSpec, TaskAction, TaskSpec,
};

/// A small deterministic generator (SplitMix64), so a failing seed reproduces exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }
    /// True with probability `percent`%.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.below(i + 1));
        }
    }
}

fn id(text: &str) -> NodeId {
    NodeId::parse(text).unwrap()
}

fn task(name: String, needs: Vec<NodeId>, rng: &mut Rng) -> TaskSpec {
    let when = [When::OnSuccess, When::OnSuccess, When::OnFailure, When::Always][rng.below(4)];
    let retries = rng.chance(50).then(|| {
        let initial = Duration::from_millis(rng.next() % 3_000);
        RetrySpec {
            max: u32::try_from(rng.below(4)).unwrap(),
            backoff: if rng.chance(50) { Backoff::Exponential } else { Backoff::Fixed },
            initial,
            max_delay: rng.chance(50).then(|| Duration::from_millis(initial.as_millis() + rng.next() % 5_000)),
        }
    });
    let for_each = rng.chance(20).then(|| format!("{{{{ params.l{} }}}}", rng.below(3)));
    TaskSpec {
        id: id(&name),
        name: None,
        needs,
        when,
        action: TaskAction::Noop,
        timeout: None,
        retries,
        env: BTreeMap::new(),
        for_each,
        runs_on: Vec::new(),
        resources: None,
        priority: 0,
        secrets: Vec::new(),
    }
}

/// A random valid pipeline and run parameters.
fn pipeline(rng: &mut Rng) -> (PipelineSpec, serde_json::Map<String, serde_json::Value>) {
    let stage_count = 1 + rng.below(4);
    let mut stages = Vec::new();
    for s in 0..stage_count {
        let needs = (0..s).filter(|_| rng.chance(40)).map(|n| id(&format!("s{n}"))).collect();
        let task_count = 1 + rng.below(5);
        let mut tasks = Vec::new();
        for t in 0..task_count {
            let needs = (0..t).filter(|_| rng.chance(35)).map(|n| id(&format!("t{s}_{n}"))).collect();
            tasks.push(task(format!("t{s}_{t}"), needs, rng));
        }
        // Spec order need not be dependency order.
        rng.shuffle(&mut tasks);
        let gate = rng.chance(30).then(|| GateSpec {
            approvals: 1,
            timeout: rng.chance(50).then(|| Duration::from_millis(1 + rng.next() % 20_000)),
            on_timeout: if rng.chance(50) { OnTimeout::Approve } else { OnTimeout::Reject },
        });
        stages.push(StageSpec { id: id(&format!("s{s}")), name: None, needs, gate, tasks });
    }
    rng.shuffle(&mut stages);
    let mut params = BTreeMap::new();
    let mut given = serde_json::Map::new();
    for l in 0..3 {
        params.insert(
            id(&format!("l{l}")),
            ParamSpec {
                kind: ParamType::Array,
                required: false,
                default: Some(serde_json::json!([])),
                description: None,
            },
        );
        let items: Vec<usize> = (0..rng.below(4)).collect();
        if rng.chance(80) {
            given.insert(format!("l{l}"), serde_json::json!(items));
        }
    }
    let spec = PipelineSpec {
        name: None,
        description: None,
        params,
        timeout: rng.chance(20).then(|| Duration::from_millis(1 + rng.next() % 200_000)),
        priority: 0,
        concurrency: None,
        triggers: Vec::new(),
        stages,
    };
    (spec, given)
}

/// The simulated world around the planner.
struct Sim<'p> {
    plan: &'p RunPlan,
    /// The same plan, prepared once, as the engine keeps it.
    prepared: &'p Prepared,
    state: RunState,
    now: Millis,
    /// Attempts dispatched and not yet reported finished or killed: (task, attempt, started).
    outstanding: Vec<(usize, u32, bool)>,
    /// Every attempt ever dispatched.
    history: Vec<(usize, u32)>,
    dispatches: Vec<u32>,
    finished: usize,
    wake: Option<Millis>,
}

impl Sim<'_> {
    fn apply(&mut self, event: Event) -> Vec<Effect> {
        let before = self.state.clone();
        let (state, effects) = plan(self.plan, &self.state, event, self.now);
        assert_eq!(plan_prepared(self.prepared, &self.state, event, self.now), (state.clone(), effects.clone()));
        self.state = state;
        self.check(&before, &effects, event);
        effects
    }

    fn check(&mut self, before: &RunState, effects: &[Effect], event: Event) {
        let plan = self.plan;
        let st = &self.state;
        if before.status.is_terminal() {
            assert!(effects.is_empty() && *st == *before, "event after finish changed something: {event:?}");
        }
        for (i, effect) in effects.iter().enumerate() {
            match *effect {
                Effect::Dispatch { task, attempt } => {
                    for &need in &plan.tasks[task].needs {
                        assert!(st.tasks[need].status.is_terminal(), "task {task} dispatched before need {need}");
                    }
                    assert_eq!(st.tasks[task].status, TaskStatus::Queued);
                    assert_eq!(st.tasks[task].attempt, attempt);
                    assert_eq!(st.stages[plan.tasks[task].stage].status, StageStatus::Running);
                    let previous = self.history.iter().filter(|(t, _)| *t == task).map(|(_, a)| *a).max();
                    assert_eq!(attempt, previous.unwrap_or(0) + 1, "attempts must increase by one");
                    self.dispatches[task] += 1;
                    // Retries are bounded by `max`; lost attempts (worker died) add at most MAX_LOST.
                    assert!(
                        self.dispatches[task] <= plan.tasks[task].max_retries + 1 + st.tasks[task].lost,
                        "too many dispatches"
                    );
                    assert!(st.tasks[task].lost <= super::MAX_LOST, "too many lost attempts rerun");
                    self.outstanding.push((task, attempt, false));
                    self.history.push((task, attempt));
                }
                Effect::Kill { task, attempt } => {
                    let pos = self.outstanding.iter().position(|&(t, a, _)| (t, a) == (task, attempt));
                    assert!(pos.is_some(), "kill of an attempt that is not outstanding");
                    self.outstanding.retain(|&(t, a, _)| (t, a) != (task, attempt));
                }
                Effect::WakeAt { at } => {
                    assert!(!st.status.is_terminal());
                    assert_eq!(i, effects.len() - 1, "WakeAt comes last");
                    self.wake = Some(at);
                }
                Effect::Finished { status } => {
                    self.finished += 1;
                    assert_eq!(status, st.status);
                    assert_eq!(i, effects.len() - 1, "Finished comes last");
                    assert_eq!(st.finished_at, Some(self.now));
                }
            }
        }
        // Terminal statuses never change.
        for (old, new) in before.tasks.iter().zip(&st.tasks) {
            if old.status.is_terminal() {
                assert_eq!(old, new);
            }
            assert!(new.attempt >= old.attempt);
        }
        for (old, new) in before.stages.iter().zip(&st.stages) {
            if old.status.is_terminal() {
                assert_eq!(old, new);
            }
        }
        // Consistency of the three levels.
        for (index, t) in st.tasks.iter().enumerate() {
            let stage = st.stages[plan.tasks[index].stage].status;
            if matches!(t.status, TaskStatus::Queued | TaskStatus::Running) {
                assert_eq!(stage, StageStatus::Running);
            }
            if matches!(stage, StageStatus::Pending | StageStatus::Waiting) {
                assert_eq!((t.status, t.attempt), (TaskStatus::Pending, 0));
            }
            if stage.is_terminal() {
                assert!(t.status.is_terminal());
            }
        }
        if st.status.is_terminal() {
            assert!(st.stages.iter().all(|s| s.status.is_terminal()));
        }
        if st.status == RunStatus::Succeeded {
            assert!(st.stages.iter().all(|s| s.status == StageStatus::Succeeded));
            assert!(st.tasks.iter().all(|t| matches!(t.status, TaskStatus::Succeeded | TaskStatus::Skipped)));
        }
        for (stage, s) in plan.stages.iter().zip(&st.stages) {
            if s.status == StageStatus::Succeeded {
                assert!(stage.tasks.iter().all(|&t| st.tasks[t].status != TaskStatus::Failed));
            }
        }
        if st.status == RunStatus::Waiting {
            assert!(!st.tasks.iter().any(|t| matches!(t.status, TaskStatus::Queued | TaskStatus::Running)));
            assert!(st.stages.iter().any(|s| s.status == StageStatus::Waiting));
        }
    }

    /// Sends an event that must change nothing.
    fn must_ignore(&mut self, event: Event) {
        let before = self.state.clone();
        let effects = self.apply(event);
        assert!(effects.is_empty(), "{event:?} should be ignored, got {effects:?}");
        assert_eq!(self.state, before, "{event:?} should be ignored");
    }
}

fn outcome(rng: &mut Rng) -> TaskOutcome {
    match rng.below(20) {
        0..=10 => TaskOutcome::Succeeded,
        11..=15 => TaskOutcome::Failed,
        16..=17 => TaskOutcome::TimedOut,
        _ => TaskOutcome::Lost,
    }
}

fn simulate(seed: u64) -> (RunStatus, usize, usize, usize) {
    let mut rng = Rng(seed);
    let (spec, given) = pipeline(&mut rng);
    assert_eq!(spec.validate(), Ok(()));
    let plan = compile(&spec, &given).unwrap();
    let prepared = Prepared::new(plan.clone());
    let mut sim = Sim {
        plan: &plan,
        prepared: &prepared,
        state: RunState::new(&plan),
        now: 0,
        outstanding: Vec::new(),
        history: Vec::new(),
        dispatches: vec![0; plan.tasks.len()],
        finished: 0,
        wake: None,
    };
    sim.apply(Event::Start);
    let mut steps = 0;
    while !sim.state.status.is_terminal() {
        steps += 1;
        assert!(steps < 20_000, "the run did not end");
        let roll = rng.below(100);
        let waiting: Vec<usize> =
            (0..plan.stages.len()).filter(|&s| sim.state.stages[s].status == StageStatus::Waiting).collect();
        if roll < 1 {
            sim.apply(Event::Cancel);
        } else if roll < 60 && !sim.outstanding.is_empty() {
            let i = rng.below(sim.outstanding.len());
            let (task, attempt, started) = sim.outstanding[i];
            if !started && rng.chance(50) {
                sim.outstanding[i].2 = true;
                let before = sim.state.clone();
                sim.apply(Event::TaskStarted { task, attempt });
                assert_eq!(sim.state.tasks[task].status, TaskStatus::Running);
                assert_ne!(sim.state, before);
            } else {
                sim.outstanding.swap_remove(i);
                let before = sim.state.clone();
                sim.apply(Event::TaskFinished { task, attempt, outcome: outcome(&mut rng) });
                assert_ne!(sim.state, before, "a current completion must be accepted");
            }
        } else if roll < 72 && !sim.history.is_empty() {
            // Duplicate or stale report of an attempt no longer outstanding.
            let (task, attempt) = sim.history[rng.below(sim.history.len())];
            if !sim.outstanding.iter().any(|&(t, a, _)| (t, a) == (task, attempt)) {
                let event = if rng.chance(70) {
                    Event::TaskFinished { task, attempt, outcome: outcome(&mut rng) }
                } else {
                    Event::TaskStarted { task, attempt }
                };
                sim.must_ignore(event);
            }
        } else if roll < 82 {
            let stage = rng.below(plan.stages.len() + 1);
            let event = Event::GateDecided { stage, approved: rng.chance(60) };
            if waiting.contains(&stage) {
                sim.apply(event);
                assert_ne!(sim.state.stages[stage].status, StageStatus::Waiting);
            } else {
                sim.must_ignore(event);
            }
        } else {
            // Time passes: a little, or up to the requested alarm.
            sim.now = match (sim.wake, rng.chance(50)) {
                (Some(at), true) => sim.now.max(at),
                _ => sim.now + i64::try_from(rng.below(3_000)).unwrap(),
            };
            sim.apply(Event::Tick);
        }
        // Liveness: an unfinished run always has something that will move it on.
        let stuck = !sim.state.status.is_terminal()
            && sim.outstanding.is_empty()
            && !sim.state.stages.iter().any(|s| s.status == StageStatus::Waiting)
            && !sim.state.tasks.iter().any(|t| t.status == TaskStatus::Pending && t.attempt > 0)
            && sim.state.deadline.is_none();
        assert!(!stuck, "run is stuck: {:?}", sim.state);
    }
    assert_eq!(sim.finished, 1, "Finished must be emitted exactly once");
    assert!(sim.state.tasks.iter().all(|t| t.status.is_terminal()));
    assert!(sim.state.stages.iter().all(|s| s.status.is_terminal()));
    assert!(sim.outstanding.iter().all(|&(t, _, _)| sim.state.tasks[t].status.is_terminal()));
    // Everything after the end is ignored.
    for event in [Event::Start, Event::Tick, Event::Cancel, Event::GateDecided { stage: 0, approved: true }] {
        sim.must_ignore(event);
    }
    for (task, attempt) in sim.history.clone() {
        sim.must_ignore(Event::TaskFinished { task, attempt, outcome: TaskOutcome::Succeeded });
    }
    assert_eq!(sim.finished, 1);
    let retried = sim.dispatches.iter().filter(|&&d| d > 1).count();
    let gates = plan.stages.iter().filter(|s| s.gate.is_some()).count();
    (sim.state.status, plan.tasks.len(), retried, gates)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

    #[test]
    fn random_runs_always_end_consistently(seed in any::<u64>()) {
        simulate(seed);
    }
}

#[test]
fn many_seeds() {
    let mut stats = BTreeMap::new();
    let (mut tasks, mut retried, mut gates) = (0, 0, 0);
    for seed in 0..300 {
        let (status, t, r, g) = simulate(seed);
        *stats.entry(status.as_str()).or_insert(0) += 1;
        tasks += t;
        retried += r;
        gates += g;
    }
    // The generator reaches every outcome.
    assert!(stats.len() == 4, "{stats:?}");
    assert!(retried > 50 && gates > 50 && tasks > 1_000, "{retried} {gates} {tasks}");
}
