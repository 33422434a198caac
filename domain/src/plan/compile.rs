//! [`compile`]: a spec plus run parameters → a [`RunPlan`].

use core::fmt;
use std::collections::HashMap;

use serde::Serialize;

use crate::dag;
use crate::duration::Duration;
use crate::ids::NodeId;
use crate::spec::{Backoff, OnTimeout, PipelineSpec, SpecError, SpecErrors, TaskSpec};
use crate::template::{Reference, Template};

use super::{PlannedGate, PlannedStage, PlannedTask, RunPlan};

/// Most task instances in one run, after `for_each` expansion.
pub const MAX_PLANNED_TASKS: usize = 10_000;

/// Retry delay used when a task has no `retries` (it is never retried then).
const DEFAULT_INITIAL_DELAY_MS: i64 = 1_000;

/// One problem that prevents a run from being planned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
pub struct PlanError {
    /// Path of the offending value, such as `params.version` or `stages[0].tasks[1].for_each`.
    pub path: String,
    /// What is wrong, in words.
    pub message: String,
}

impl PlanError {
    /// Creates an error.
    #[must_use]
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self { path: path.into(), message: message.into() }
    }
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() { f.write_str(&self.message) } else { write!(f, "{}: {}", self.path, self.message) }
    }
}

/// All problems found while planning a run (never empty).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(transparent)]
pub struct PlanErrors(Vec<PlanError>);

impl PlanErrors {
    /// Wraps a list of errors; `None` when the list is empty.
    #[must_use]
    pub fn new(errors: Vec<PlanError>) -> Option<Self> {
        if errors.is_empty() { None } else { Some(Self(errors)) }
    }

    /// The errors, parameters first, then in spec order.
    #[must_use]
    pub fn errors(&self) -> &[PlanError] {
        &self.0
    }

    /// The errors, by value.
    #[must_use]
    pub fn into_vec(self) -> Vec<PlanError> {
        self.0
    }
}

impl fmt::Display for PlanErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.0.len();
        write!(f, "cannot plan the run ({count} error{})", if count == 1 { "" } else { "s" })?;
        for error in &self.0 {
            write!(f, "\n  {error}")?;
        }
        Ok(())
    }
}

impl From<PlanErrors> for SpecErrors {
    /// The same problems as [`SpecErrors`] (without positions), for callers that report both
    /// kinds the same way.
    fn from(errors: PlanErrors) -> Self {
        let list: Vec<SpecError> = errors.0.into_iter().map(|e| SpecError::new(e.path, e.message)).collect();
        Self::new(list).unwrap_or_else(|| Self::single(SpecError::new("", "cannot plan the run")))
    }
}

fn value_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::String(_) => "string",
        serde_json::Value::Array(_) => "array",
        serde_json::Value::Object(_) => "object",
    }
}

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

/// Checks `given` against the declared params and applies defaults.
fn check_params(
    spec: &PipelineSpec,
    given: &serde_json::Map<String, serde_json::Value>,
    errors: &mut Vec<PlanError>,
) -> serde_json::Map<String, serde_json::Value> {
    let mut values = serde_json::Map::new();
    // By name, whatever order the caller's map keeps, so errors and stored params are stable.
    let mut given_sorted: Vec<_> = given.iter().collect();
    given_sorted.sort_by(|a, b| a.0.cmp(b.0));
    for (name, value) in given_sorted {
        let path = format!("params.{name}");
        match NodeId::parse(name).ok().and_then(|id| spec.params.get(&id)) {
            None => errors.push(PlanError::new(path, format!("unknown param `{name}` (not declared in `params`)"))),
            Some(param) if !param.kind.accepts(value) => errors.push(PlanError::new(
                path,
                format!("param `{name}` must be of type {}; got {}", param.kind.as_str(), value_kind(value)),
            )),
            Some(_) => {
                values.insert(name.clone(), value.clone());
            }
        }
    }
    for (name, param) in &spec.params {
        if given.contains_key(name.as_str()) {
            continue;
        }
        if let Some(default) = &param.default {
            values.insert(name.as_str().to_owned(), default.clone());
        } else if param.required {
            errors.push(PlanError::new(format!("params.{name}"), format!("missing required param `{name}`")));
        }
    }
    values
}

/// The elements a `for_each` expands to, or an error message.
fn fan_out_items(
    spec: &PipelineSpec,
    text: &str,
    values: &serde_json::Map<String, serde_json::Value>,
) -> Result<Vec<serde_json::Value>, String> {
    let template = Template::parse(text.trim()).map_err(|e| format!("invalid `for_each` template: {e}"))?;
    if template.references().any(|r| matches!(r, Reference::TaskOutput { .. })) {
        return Err("for_each over task outputs is not supported yet".to_owned());
    }
    let Some(Reference::Param(name)) = template.is_single_reference() else {
        return Err("`for_each` must be a single `{{ params.NAME }}` reference to an array param".to_owned());
    };
    match values.get(name) {
        Some(serde_json::Value::Array(items)) => Ok(items.clone()),
        Some(other) => {
            Err(format!("`for_each` needs a list, but param `{name}` is {} {}", article(other), value_kind(other)))
        }
        None if NodeId::parse(name).ok().is_some_and(|id| spec.params.contains_key(&id)) => {
            Err(format!("`for_each` param `{name}` has no value (give it one or declare a default)"))
        }
        None => Err(format!("unknown param `{name}` in `for_each`")),
    }
}

fn article(value: &serde_json::Value) -> &'static str {
    if value_kind(value).starts_with(['a', 'i', 'o']) { "an" } else { "a" }
}

fn planned_task(
    spec: &PipelineSpec,
    task: &TaskSpec,
    key: String,
    stage: usize,
    spec_index: (usize, usize),
) -> PlannedTask {
    let retries = task.retries;
    PlannedTask {
        key,
        task_id: task.id.as_str().to_owned(),
        stage,
        spec_index,
        needs: Vec::new(),
        when: task.when,
        max_retries: retries.map_or(0, |r| r.max),
        backoff_exponential: retries.is_some_and(|r| r.backoff == Backoff::Exponential),
        initial_delay_ms: retries.map_or(DEFAULT_INITIAL_DELAY_MS, |r| millis(r.initial)),
        max_delay_ms: retries.and_then(|r| r.max_delay).map(millis),
        timeout_ms: task.timeout.map(millis),
        item: None,
        runs_on: task.runs_on.clone(),
        resources: task.resources,
        priority: spec.priority.saturating_add(task.priority),
    }
}

/// Compiles a run: checks `params` against the spec's declarations (unknown, wrongly typed or
/// missing required parameters are errors with path `params.NAME`), applies defaults, and
/// expands `for_each` fan-outs. See the [module documentation](super) for the rules.
///
/// The spec is expected to be valid ([`crate::spec::parse_definition`]); needs that do not
/// resolve and dependency cycles are reported as errors rather than planned.
///
/// # Errors
/// [`PlanErrors`] listing every problem: parameter errors first, then `for_each` and
/// structural errors in spec order.
pub fn compile(
    spec: &PipelineSpec,
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<RunPlan, PlanErrors> {
    let mut errors = Vec::new();
    let values = check_params(spec, params, &mut errors);

    // Fan-out elements per spec task; `None` for a plain task (one instance).
    let mut expansions: Vec<Vec<Option<Vec<serde_json::Value>>>> = Vec::with_capacity(spec.stages.len());
    let mut total: usize = 0;
    for (si, stage) in spec.stages.iter().enumerate() {
        let mut per_task = Vec::with_capacity(stage.tasks.len());
        for (ti, task) in stage.tasks.iter().enumerate() {
            let expansion = match &task.for_each {
                None => None,
                Some(text) => match fan_out_items(spec, text, &values) {
                    Ok(items) => Some(items),
                    Err(message) => {
                        errors.push(PlanError::new(format!("stages[{si}].tasks[{ti}].for_each"), message));
                        Some(Vec::new())
                    }
                },
            };
            total = total.saturating_add(expansion.as_ref().map_or(1, Vec::len));
            per_task.push(expansion);
        }
        expansions.push(per_task);
    }
    if total > MAX_PLANNED_TASKS {
        errors.push(PlanError::new(
            "stages",
            format!("the run would have {total} task instances; the limit is {MAX_PLANNED_TASKS}"),
        ));
        return Err(PlanErrors(errors));
    }

    let stage_index: HashMap<&str, usize> =
        spec.stages.iter().enumerate().rev().map(|(i, s)| (s.id.as_str(), i)).collect();
    let mut stages = Vec::with_capacity(spec.stages.len());
    let mut tasks: Vec<PlannedTask> = Vec::with_capacity(total);
    // Planned index range of every spec task.
    let mut ranges: Vec<Vec<core::ops::Range<usize>>> = Vec::with_capacity(spec.stages.len());

    for (si, (stage, per_task)) in spec.stages.iter().zip(expansions).enumerate() {
        let mut needs = Vec::with_capacity(stage.needs.len());
        for (k, need) in stage.needs.iter().enumerate() {
            match stage_index.get(need.as_str()) {
                Some(&index) => needs.push(index),
                None => {
                    errors.push(PlanError::new(format!("stages[{si}].needs[{k}]"), format!("unknown stage `{need}`")))
                }
            }
        }
        let first = tasks.len();
        let mut stage_ranges = Vec::with_capacity(stage.tasks.len());
        for (ti, (task, expansion)) in stage.tasks.iter().zip(per_task).enumerate() {
            let start = tasks.len();
            match expansion {
                None => tasks.push(planned_task(spec, task, task.id.as_str().to_owned(), si, (si, ti))),
                Some(items) => {
                    for (i, item) in items.into_iter().enumerate() {
                        let mut planned = planned_task(spec, task, format!("{}[{i}]", task.id), si, (si, ti));
                        planned.item = Some(item);
                        tasks.push(planned);
                    }
                }
            }
            stage_ranges.push(start..tasks.len());
        }
        ranges.push(stage_ranges);
        stages.push(PlannedStage {
            id: stage.id.as_str().to_owned(),
            needs,
            gate: stage.gate.map(|gate| PlannedGate {
                approvals: gate.approvals,
                timeout_ms: gate.timeout.map(millis),
                approve_on_timeout: gate.on_timeout == OnTimeout::Approve,
            }),
            tasks: (first..tasks.len()).collect(),
        });
    }

    // Task needs: every instance of every needed task of the same stage.
    for (si, (stage, stage_ranges)) in spec.stages.iter().zip(&ranges).enumerate() {
        // The first task of an id, as a duplicate (refused by validation) would be looked up.
        let index: HashMap<&str, usize> =
            stage.tasks.iter().enumerate().rev().map(|(i, t)| (t.id.as_str(), i)).collect();
        for (ti, (task, range)) in stage.tasks.iter().zip(stage_ranges).enumerate() {
            let mut needs = Vec::new();
            for (k, need) in task.needs.iter().enumerate() {
                match index.get(need.as_str()).and_then(|&i| stage_ranges.get(i)) {
                    Some(needed) => needs.extend(needed.clone()),
                    None => errors.push(PlanError::new(
                        format!("stages[{si}].tasks[{ti}].needs[{k}]"),
                        format!("unknown task `{need}` in stage `{}`", stage.id),
                    )),
                }
            }
            for planned in tasks.get_mut(range.clone()).unwrap_or_default() {
                planned.needs.clone_from(&needs);
            }
        }
    }

    // Cycles would leave a run stuck: refuse them.
    let stage_edges: Vec<(usize, usize)> =
        stages.iter().enumerate().flat_map(|(i, s)| s.needs.iter().map(move |&n| (n, i))).collect();
    if let Some(cycle) = dag::find_cycle(stages.len(), &stage_edges) {
        let names: Vec<&str> = cycle.iter().filter_map(|&i| stages.get(i)).map(|s| s.id.as_str()).collect();
        errors.push(PlanError::new("stages", format!("stages form a cycle: {}", names.join(" → "))));
    }
    let task_edges: Vec<(usize, usize)> =
        tasks.iter().enumerate().flat_map(|(i, t)| t.needs.iter().map(move |&n| (n, i))).collect();
    if let Some(cycle) = dag::find_cycle(tasks.len(), &task_edges) {
        let names: Vec<&str> = cycle.iter().filter_map(|&i| tasks.get(i)).map(|t| t.key.as_str()).collect();
        errors.push(PlanError::new("stages", format!("tasks form a cycle: {}", names.join(" → "))));
    }

    match PlanErrors::new(errors) {
        Some(errors) => Err(errors),
        None => Ok(RunPlan { stages, tasks, run_timeout_ms: spec.timeout.map(millis), params: values }),
    }
}
