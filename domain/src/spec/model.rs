//! The pipeline definition types.
//!
//! Field declaration order is the canonical serialization order. Fields holding their default
//! value are left out when serializing, so equal specs have one canonical form.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::ids::{NodeId, Slug};
use crate::memory::MemorySize;

fn is_zero(value: &i32) -> bool {
    *value == 0
}

fn is_false(value: &bool) -> bool {
    !*value
}

fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

/// A pipeline definition. Build one with [`crate::spec::parse_definition`], which validates
/// everything; deserializing directly checks only the shape (use
/// [`PipelineSpec::validate`] afterwards).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSpec {
    /// Optional pipeline name (a slug).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<Slug>,
    /// Free-form description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Run parameters by name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<NodeId, ParamSpec>,
    /// Run-level timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Scheduling priority of runs, -100..=100 (higher runs first).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// Limit on concurrent runs sharing a key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
    /// Schedules that start runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub triggers: Vec<Trigger>,
    /// The stages (at least one).
    pub stages: Vec<StageSpec>,
}

/// A run parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    /// The JSON type of the value.
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// Whether a run must supply a value (when there is no default).
    #[serde(default, skip_serializing_if = "is_false")]
    pub required: bool,
    /// Value used when a run supplies none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<serde_json::Value>,
    /// Help text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The type of a parameter value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    /// A string.
    String,
    /// Any number.
    Number,
    /// A whole number.
    Integer,
    /// `true` or `false`.
    Boolean,
    /// A list.
    Array,
    /// A mapping.
    Object,
}

impl ParamType {
    /// The type's name as written in a definition.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            ParamType::String => "string",
            ParamType::Number => "number",
            ParamType::Integer => "integer",
            ParamType::Boolean => "boolean",
            ParamType::Array => "array",
            ParamType::Object => "object",
        }
    }

    /// Whether `value` has this type.
    #[must_use]
    pub fn accepts(self, value: &serde_json::Value) -> bool {
        match self {
            Self::String => value.is_string(),
            Self::Number => value.is_number(),
            Self::Integer => value.is_i64() || value.is_u64(),
            Self::Boolean => value.is_boolean(),
            Self::Array => value.is_array(),
            Self::Object => value.is_object(),
        }
    }
}

/// Run concurrency limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Concurrency {
    /// Key (may contain templates); runs with the same rendered key count together.
    pub key: String,
    /// Maximum concurrent runs per key (at least 1).
    #[serde(default = "default_max")]
    pub max: u32,
    /// What to do with a new run when the limit is reached.
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_conflict: OnConflict,
}

fn default_max() -> u32 {
    1
}

/// What happens to a run that exceeds the concurrency limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// Wait until a slot frees up.
    #[default]
    Queue,
    /// Cancel the new run.
    CancelNew,
}

/// A schedule that starts runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Trigger {
    /// Five-field cron expression.
    pub cron: String,
    /// IANA time zone of the cron expression (UTC when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// Parameter values for triggered runs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, serde_json::Value>,
}

/// A stage: a group of tasks, optionally behind an approval gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageSpec {
    /// Stage id, unique in the pipeline.
    pub id: NodeId,
    /// Display name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Stages that must finish first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub needs: Vec<NodeId>,
    /// Approval gate in front of the stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateSpec>,
    /// The tasks (at least one).
    pub tasks: Vec<TaskSpec>,
}

/// An approval gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GateSpec {
    /// Distinct approvals needed, 1..=20.
    pub approvals: u32,
    /// How long to wait for approvals.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Outcome when the timeout passes.
    #[serde(default, skip_serializing_if = "is_default")]
    pub on_timeout: OnTimeout,
}

/// Outcome of a gate whose timeout passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// The gate is rejected.
    #[default]
    Reject,
    /// The gate is approved.
    Approve,
}

/// When a task runs, given the outcome of the tasks it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Only if all needed tasks succeeded.
    #[default]
    OnSuccess,
    /// Only if a needed task failed.
    OnFailure,
    /// Regardless of outcomes.
    Always,
}

/// A task. Exactly one action (`run`, `shell`, `http`, `sleep` or `noop`) is given.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawTask", into = "RawTask")]
pub struct TaskSpec {
    /// Task id, unique in the whole pipeline.
    pub id: NodeId,
    /// Display name.
    pub name: Option<String>,
    /// Tasks of the same stage that must finish first.
    pub needs: Vec<NodeId>,
    /// Condition on the needed tasks' outcomes.
    pub when: When,
    /// What the task does.
    pub action: TaskAction,
    /// Per-attempt timeout.
    pub timeout: Option<Duration>,
    /// Retry policy.
    pub retries: Option<RetrySpec>,
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Template yielding a list; the task runs once per element.
    pub for_each: Option<String>,
    /// Worker labels required to run the task.
    pub runs_on: Vec<String>,
    /// Resource requests.
    pub resources: Option<Resources>,
    /// Scheduling priority within the run, -100..=100.
    pub priority: i32,
    /// Names of the secrets the task may read.
    pub secrets: Vec<String>,
}

/// What a task does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskAction {
    /// Run a program: argv, no shell.
    Run(Vec<String>),
    /// Run a script through `/bin/sh -c`.
    Shell(String),
    /// Make an HTTP request.
    Http(HttpSpec),
    /// Wait.
    Sleep(Duration),
    /// Do nothing (useful for joins).
    Noop,
}

impl TaskAction {
    /// The action's field name in the definition.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Run(_) => "run",
            Self::Shell(_) => "shell",
            Self::Http(_) => "http",
            Self::Sleep(_) => "sleep",
            Self::Noop => "noop",
        }
    }
}

/// An HTTP request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSpec {
    /// Request method.
    pub method: HttpMethod,
    /// `http://` or `https://` URL (may contain templates).
    pub url: String,
    /// Request headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Statuses counted as success (any 2xx when empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect_status: Vec<u16>,
    /// Request timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// HTTP request method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    /// GET.
    Get,
    /// POST.
    Post,
    /// PUT.
    Put,
    /// PATCH.
    Patch,
    /// DELETE.
    Delete,
    /// HEAD.
    Head,
}

/// Retry policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Retries after the first attempt, 0..=20.
    pub max: u32,
    /// Delay growth.
    #[serde(default, skip_serializing_if = "is_default")]
    pub backoff: Backoff,
    /// First delay (default 1s).
    #[serde(default = "default_initial", skip_serializing_if = "is_default_initial")]
    pub initial: Duration,
    /// Upper bound on the delay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<Duration>,
}

fn default_initial() -> Duration {
    Duration::from_secs(1)
}

fn is_default_initial(value: &Duration) -> bool {
    *value == default_initial()
}

/// How retry delays grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    /// Always `initial`.
    #[default]
    Fixed,
    /// `initial × 2^(attempt-1)`, capped by `max_delay`.
    Exponential,
}

/// Resource requests.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPUs (fractions allowed), greater than zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    /// Memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemorySize>,
}

/// The serialized shape of a task: the action is one of five optional fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTask {
    id: NodeId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    needs: Vec<NodeId>,
    #[serde(default, skip_serializing_if = "is_default")]
    when: When,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    shell: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    http: Option<HttpSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sleep: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    noop: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retries: Option<RetrySpec>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    for_each: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    runs_on: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    resources: Option<Resources>,
    #[serde(default, skip_serializing_if = "is_zero")]
    priority: i32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    secrets: Vec<String>,
}

impl TryFrom<RawTask> for TaskSpec {
    type Error = String;

    fn try_from(raw: RawTask) -> Result<Self, String> {
        let mut found = Vec::new();
        let mut action = None;
        if let Some(argv) = raw.run {
            found.push("run");
            action = Some(TaskAction::Run(argv));
        }
        if let Some(script) = raw.shell {
            found.push("shell");
            action = Some(TaskAction::Shell(script));
        }
        if let Some(http) = raw.http {
            found.push("http");
            action = Some(TaskAction::Http(http));
        }
        if let Some(duration) = raw.sleep {
            found.push("sleep");
            action = Some(TaskAction::Sleep(duration));
        }
        if let Some(noop) = raw.noop {
            found.push("noop");
            if !noop {
                return Err("`noop` must be `true` when present".to_owned());
            }
            action = Some(TaskAction::Noop);
        }
        let action = match (found.len(), action) {
            (1, Some(action)) => action,
            (0, _) => {
                return Err(format!(
                    "task `{}` must have exactly one of run, shell, http, sleep, noop; found none",
                    raw.id
                ));
            }
            _ => {
                return Err(format!(
                    "task `{}` must have exactly one of run, shell, http, sleep, noop; found {}",
                    raw.id,
                    found.join(", ")
                ));
            }
        };
        Ok(Self {
            id: raw.id,
            name: raw.name,
            needs: raw.needs,
            when: raw.when,
            action,
            timeout: raw.timeout,
            retries: raw.retries,
            env: raw.env,
            for_each: raw.for_each,
            runs_on: raw.runs_on,
            resources: raw.resources,
            priority: raw.priority,
            secrets: raw.secrets,
        })
    }
}

impl From<TaskSpec> for RawTask {
    fn from(task: TaskSpec) -> Self {
        let mut raw = Self {
            id: task.id,
            name: task.name,
            needs: task.needs,
            when: task.when,
            run: None,
            shell: None,
            http: None,
            sleep: None,
            noop: None,
            timeout: task.timeout,
            retries: task.retries,
            env: task.env,
            for_each: task.for_each,
            runs_on: task.runs_on,
            resources: task.resources,
            priority: task.priority,
            secrets: task.secrets,
        };
        match task.action {
            TaskAction::Run(argv) => raw.run = Some(argv),
            TaskAction::Shell(script) => raw.shell = Some(script),
            TaskAction::Http(http) => raw.http = Some(http),
            TaskAction::Sleep(duration) => raw.sleep = Some(duration),
            TaskAction::Noop => raw.noop = Some(true),
        }
        raw
    }
}
