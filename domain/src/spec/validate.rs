//! Semantic validation of a typed [`PipelineSpec`]: ids, references, cycles, ranges, limits.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::dag;
use crate::doc::{Problem, Seg};
use crate::ids::NodeId;

use super::model::{HttpSpec, PipelineSpec, StageSpec, TaskAction, TaskSpec};

/// Most stages in one pipeline.
pub const MAX_STAGES: usize = 200;
/// Most tasks in one pipeline (all stages together).
pub const MAX_TASKS: usize = 2_000;
/// Most entries in one `needs` list.
pub const MAX_NEEDS: usize = 2_000;
/// Priorities are within `-MAX_PRIORITY..=MAX_PRIORITY`.
pub const MAX_PRIORITY: i32 = 100;
/// Most approvals a gate may require.
pub const MAX_APPROVALS: u32 = 20;
/// Most retries of a task.
pub const MAX_RETRIES: u32 = 20;
/// Most schedules in one pipeline.
pub const MAX_TRIGGERS: usize = 20;

/// A path under construction.
#[derive(Clone)]
struct P(Vec<Seg>);

impl P {
    fn root() -> Self {
        Self(Vec::new())
    }
    fn key(&self, key: &str) -> Self {
        let mut path = self.0.clone();
        path.push(Seg::Key(key.to_owned()));
        Self(path)
    }
    fn idx(&self, index: usize) -> Self {
        let mut path = self.0.clone();
        path.push(Seg::Index(index));
        Self(path)
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn add(&mut self, path: &P, message: impl Into<String>) {
        self.0.push(Problem::new(path.0.clone(), message));
    }

    /// A problem with a mapping key itself (its position is the key's, not the value's).
    fn add_key(&mut self, path: &P, message: impl Into<String>) {
        let mut problem = Problem::new(path.0.clone(), message);
        problem.at_key = true;
        self.0.push(problem);
    }
}

/// Checks everything the types cannot express. Returns the problems in document order
/// (cycles last).
pub(crate) fn validate(spec: &PipelineSpec) -> Vec<Problem> {
    let mut out = Problems::default();
    let root = P::root();
    check_root(spec, &root, &mut out);

    // Stage ids and task ids (unique across the pipeline).
    let mut stage_index: HashMap<&str, usize> = HashMap::new();
    let mut task_home: HashMap<&str, (usize, usize)> = HashMap::new();
    for (si, stage) in spec.stages.iter().enumerate() {
        let sp = root.key("stages").idx(si);
        if let Some(first) = stage_index.get(stage.id.as_str()) {
            out.add(&sp.key("id"), format!("duplicate stage id `{}` (first used by stages[{first}])", stage.id));
        } else {
            stage_index.insert(stage.id.as_str(), si);
        }
        for (ti, task) in stage.tasks.iter().enumerate() {
            if let Some((fs, ft)) = task_home.get(task.id.as_str()) {
                out.add(
                    &sp.key("tasks").idx(ti).key("id"),
                    format!(
                        "duplicate task id `{}` (first used by stages[{fs}].tasks[{ft}]); task ids \
                         must be unique across the pipeline",
                        task.id
                    ),
                );
            } else {
                task_home.insert(task.id.as_str(), (si, ti));
            }
        }
    }

    for (si, stage) in spec.stages.iter().enumerate() {
        let sp = root.key("stages").idx(si);
        check_stage(spec, stage, &sp, &stage_index, &task_home, &mut out);
        for (ti, task) in stage.tasks.iter().enumerate() {
            check_task(spec, stage, task, &sp.key("tasks").idx(ti), si, &task_home, &mut out);
        }
    }

    // Cycles: the stage graph, then each stage's task graph.
    let stage_ids: Vec<&NodeId> = spec.stages.iter().map(|s| &s.id).collect();
    let stage_needs: Vec<&[NodeId]> = spec.stages.iter().map(|s| s.needs.as_slice()).collect();
    check_cycle(&stage_ids, &stage_needs, &|i| root.key("stages").idx(i), "stage", &mut out);
    for (si, stage) in spec.stages.iter().enumerate() {
        let ids: Vec<&NodeId> = stage.tasks.iter().map(|t| &t.id).collect();
        let needs: Vec<&[NodeId]> = stage.tasks.iter().map(|t| t.needs.as_slice()).collect();
        let sp = root.key("stages").idx(si);
        check_cycle(&ids, &needs, &|i| sp.key("tasks").idx(i), "task", &mut out);
    }
    out.0
}

fn check_root(spec: &PipelineSpec, root: &P, out: &mut Problems) {
    for (name, param) in &spec.params {
        if let Some(default) = &param.default
            && !param.kind.accepts(default)
        {
            out.add(
                &root.key("params").key(name.as_str()).key("default"),
                format!("default of param `{name}` must be of type {}", param.kind.as_str()),
            );
        }
    }
    if spec.timeout.is_some_and(|t| t.is_zero()) {
        out.add(&root.key("timeout"), "timeout must be greater than zero");
    }
    check_priority(spec.priority, &root.key("priority"), out);
    if let Some(concurrency) = &spec.concurrency {
        let cp = root.key("concurrency");
        if concurrency.key.trim().is_empty() {
            out.add(&cp.key("key"), "concurrency key must not be empty");
        }
        if concurrency.max == 0 {
            out.add(&cp.key("max"), "concurrency max must be at least 1");
        }
    }
    if spec.triggers.len() > MAX_TRIGGERS {
        out.add(&root.key("triggers"), format!("{} triggers; the limit is {MAX_TRIGGERS}", spec.triggers.len()));
    }
    for (i, trigger) in spec.triggers.iter().enumerate().take(MAX_TRIGGERS) {
        let tp = root.key("triggers").idx(i);
        if let Err(message) = crate::schedule::parse_cron(&trigger.cron) {
            out.add(&tp.key("cron"), message);
        }
        match trigger.timezone.as_deref() {
            Some(tz) if tz.trim().is_empty() => out.add(&tp.key("timezone"), "timezone must not be empty"),
            Some(tz) => {
                if let Err(message) = crate::schedule::parse_timezone(Some(tz)) {
                    out.add(&tp.key("timezone"), message);
                }
            }
            None => {}
        }
        for (name, value) in &trigger.params {
            let pp = tp.key("params").key(name);
            match NodeId::parse(name).ok().and_then(|id| spec.params.get(&id)) {
                None => {
                    out.add_key(&pp, format!("unknown param `{name}` (not declared in `params`)"));
                }
                Some(param) if !param.kind.accepts(value) => {
                    out.add(&pp, format!("param `{name}` must be of type {}", param.kind.as_str()))
                }
                Some(_) => {}
            }
        }
        for (name, param) in &spec.params {
            if param.required && param.default.is_none() && !trigger.params.contains_key(name.as_str()) {
                out.add(&tp.key("params"), format!("missing required param `{name}`"));
            }
        }
    }
    let stages = root.key("stages");
    if spec.stages.is_empty() {
        out.add(&stages, "at least one stage is required");
    }
    if spec.stages.len() > MAX_STAGES {
        out.add(&stages, format!("{} stages; the limit is {MAX_STAGES}", spec.stages.len()));
    }
    let tasks: usize = spec.stages.iter().map(|s| s.tasks.len()).sum();
    if tasks > MAX_TASKS {
        out.add(&stages, format!("{tasks} tasks in total; the limit is {MAX_TASKS}"));
    }
}

fn check_priority(priority: i32, path: &P, out: &mut Problems) {
    if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&priority) {
        out.add(path, format!("priority {priority} is out of range -{MAX_PRIORITY}..={MAX_PRIORITY}"));
    }
}

/// Checks a needs list's length and duplicates; returns whether to look at the entries.
fn check_needs_list(needs: &[NodeId], path: &P, out: &mut Problems) {
    if needs.len() > MAX_NEEDS {
        out.add(path, format!("{} needs; the limit is {MAX_NEEDS}", needs.len()));
    }
    let mut seen = BTreeSet::new();
    for (k, need) in needs.iter().enumerate() {
        if !seen.insert(need.as_str()) {
            out.add(&path.idx(k), format!("`{need}` is listed twice"));
        }
    }
}

fn check_stage(
    spec: &PipelineSpec,
    stage: &StageSpec,
    sp: &P,
    stage_index: &HashMap<&str, usize>,
    task_home: &HashMap<&str, (usize, usize)>,
    out: &mut Problems,
) {
    let np = sp.key("needs");
    check_needs_list(&stage.needs, &np, out);
    for (k, need) in stage.needs.iter().enumerate() {
        if *need == stage.id {
            out.add(&np.idx(k), format!("stage `{need}` needs itself"));
        } else if !stage_index.contains_key(need.as_str()) {
            let hint = match task_home.get(need.as_str()) {
                Some((s, _)) => spec
                    .stages
                    .get(*s)
                    .map_or(String::new(), |home| format!("; `{need}` is a task of stage `{}`, not a stage", home.id)),
                None => String::new(),
            };
            out.add(&np.idx(k), format!("unknown stage `{need}`{hint}"));
        }
    }
    if let Some(gate) = &stage.gate {
        let gp = sp.key("gate");
        if !(1..=MAX_APPROVALS).contains(&gate.approvals) {
            out.add(
                &gp.key("approvals"),
                format!("approvals must be between 1 and {MAX_APPROVALS}; found {}", gate.approvals),
            );
        }
        if gate.timeout.is_some_and(|t| t.is_zero()) {
            out.add(&gp.key("timeout"), "timeout must be greater than zero");
        }
    }
    if stage.tasks.is_empty() {
        out.add(&sp.key("tasks"), "at least one task is required");
    }
}

fn check_task(
    spec: &PipelineSpec,
    stage: &StageSpec,
    task: &TaskSpec,
    tp: &P,
    stage_no: usize,
    task_home: &HashMap<&str, (usize, usize)>,
    out: &mut Problems,
) {
    let np = tp.key("needs");
    check_needs_list(&task.needs, &np, out);
    for (k, need) in task.needs.iter().enumerate() {
        if *need == task.id {
            out.add(&np.idx(k), format!("task `{need}` needs itself"));
            continue;
        }
        if stage.tasks.iter().any(|t| t.id == *need) {
            continue;
        }
        let message = match task_home
            .get(need.as_str())
            .and_then(|(s, _)| (*s != stage_no).then(|| spec.stages.get(*s)).flatten())
        {
            Some(other) => format!(
                "unknown task `{need}` in stage `{}`: `{need}` is in stage `{}`; tasks can only \
                 need tasks of their own stage (make stage `{}` need stage `{}` instead)",
                stage.id, other.id, stage.id, other.id
            ),
            None => format!("unknown task `{need}` in stage `{}`", stage.id),
        };
        out.add(&np.idx(k), message);
    }

    match &task.action {
        TaskAction::Run(argv) => {
            let rp = tp.key("run");
            match argv.first() {
                None => out.add(&rp, "`run` must list at least the program to run"),
                Some(program) if program.is_empty() => {
                    out.add(&rp.idx(0), "the program name (argv[0]) must not be empty");
                }
                Some(_) => {}
            }
        }
        TaskAction::Shell(script) => {
            if script.trim().is_empty() {
                out.add(&tp.key("shell"), "`shell` script must not be empty");
            }
        }
        TaskAction::Http(http) => check_http(http, &tp.key("http"), out),
        TaskAction::Sleep(_) | TaskAction::Noop => {}
    }

    if task.timeout.is_some_and(|t| t.is_zero()) {
        out.add(&tp.key("timeout"), "timeout must be greater than zero");
    }
    if let Some(retries) = &task.retries {
        let rp = tp.key("retries");
        if retries.max > MAX_RETRIES {
            out.add(&rp.key("max"), format!("retries max must be between 0 and {MAX_RETRIES}; found {}", retries.max));
        }
        if retries.max_delay.is_some_and(|d| d < retries.initial) {
            out.add(&rp.key("max_delay"), "max_delay must not be shorter than initial");
        }
    }
    check_env(&task.env, &tp.key("env"), out);
    if task.for_each.as_deref().is_some_and(|f| f.trim().is_empty()) {
        out.add(&tp.key("for_each"), "`for_each` must not be empty");
    }
    for (k, label) in task.runs_on.iter().enumerate() {
        if label.trim().is_empty() {
            out.add(&tp.key("runs_on").idx(k), "labels must not be empty");
        }
    }
    if let Some(cpu) = task.resources.and_then(|r| r.cpu)
        && !(cpu.is_finite() && cpu > 0.0)
    {
        out.add(&tp.key("resources").key("cpu"), "cpu must be a number greater than zero");
    }
    check_priority(task.priority, &tp.key("priority"), out);
    let mut seen = BTreeSet::new();
    for (k, secret) in task.secrets.iter().enumerate() {
        let path = tp.key("secrets").idx(k);
        if !is_secret_name(secret) {
            out.add(&path, format!("invalid secret name `{secret}`: must match ^[A-Za-z_][A-Za-z0-9_]{{0,63}}$"));
        } else if !seen.insert(secret.as_str()) {
            out.add(&path, format!("secret `{secret}` is listed twice"));
        }
    }
}

fn check_http(http: &HttpSpec, hp: &P, out: &mut Problems) {
    if !(http.url.starts_with("http://") || http.url.starts_with("https://")) {
        out.add(&hp.key("url"), "url must start with http:// or https://");
    }
    for name in http.headers.keys() {
        let valid =
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !valid {
            out.add_key(&hp.key("headers").key(name), format!("invalid header name `{name}`"));
        }
    }
    for (k, status) in http.expect_status.iter().enumerate() {
        if !(100..=599).contains(status) {
            out.add(&hp.key("expect_status").idx(k), format!("status {status} is not between 100 and 599"));
        }
    }
    if http.timeout.is_some_and(|t| t.is_zero()) {
        out.add(&hp.key("timeout"), "timeout must be greater than zero");
    }
}

fn is_identifier(name: &str, max_len: usize) -> bool {
    let bytes = name.as_bytes();
    matches!(bytes.first(), Some(b) if b.is_ascii_alphabetic() || *b == b'_')
        && bytes.len() <= max_len
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'_')
}

fn is_secret_name(name: &str) -> bool {
    is_identifier(name, 64)
}

fn check_env(env: &BTreeMap<String, String>, ep: &P, out: &mut Problems) {
    for key in env.keys() {
        if !is_identifier(key, usize::MAX) {
            out.add_key(
                &ep.key(key),
                format!("invalid environment variable name `{key}`: must match ^[A-Za-z_][A-Za-z0-9_]*$"),
            );
        } else if key.starts_with("SLUICE_") {
            out.add_key(&ep.key(key), format!("`{key}`: names starting with SLUICE_ are reserved"));
        }
    }
}

/// Finds one cycle in a needs graph and reports it at one of its edges.
fn check_cycle(ids: &[&NodeId], needs: &[&[NodeId]], path_of: &dyn Fn(usize) -> P, what: &str, out: &mut Problems) {
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        index.entry(id.as_str()).or_insert(i);
    }
    // Edge (a, b): a needs b. Self-needs are reported elsewhere.
    let edges: Vec<(usize, usize)> = needs
        .iter()
        .enumerate()
        .flat_map(|(a, list)| {
            let index = &index;
            list.iter().filter_map(move |need| index.get(need.as_str()).map(|&b| (a, b)))
        })
        .filter(|(a, b)| a != b)
        .collect();
    let Some(cycle) = dag::find_cycle(ids.len(), &edges) else {
        return;
    };
    let (Some(&first), Some(&second)) = (cycle.first(), cycle.get(1).or(cycle.first())) else {
        return;
    };
    let mut names: Vec<&str> = cycle.iter().filter_map(|&i| ids.get(i)).map(|id| id.as_str()).collect();
    if let Some(start) = names.first().copied() {
        names.push(start);
    }
    let target = ids.get(second).map(|id| id.as_str()).unwrap_or_default();
    let k = needs.get(first).and_then(|list| list.iter().position(|n| n.as_str() == target)).unwrap_or(0);
    out.add(&path_of(first).key("needs").idx(k), format!("{what} cycle: {}", names.join(" -> ")));
}
