//! Text → [`PipelineSpec`]: read the document, deserialize with paths, validate, and attach
//! source positions to every problem.

use serde::de::DeserializeOwned;

use crate::doc::{self, Node, Problem, Seg, render_path};

use super::error::{SpecError, SpecErrors};
use super::model::{PipelineSpec, StageSpec, TaskSpec};
use super::validate::validate;

/// Largest accepted definition, in bytes.
pub const MAX_DEFINITION_BYTES: usize = 1_048_576;

/// Parses and validates a pipeline definition.
///
/// The text is JSON if its first non-whitespace character is `{`, YAML otherwise. Every
/// problem found is returned, each with a path (`stages[1].tasks[0].needs[0]`) and, for YAML
/// (and JSON syntax errors), a 1-based line and column.
///
/// # Errors
/// [`SpecErrors`] (never empty) when the text is too large, malformed, has the wrong shape or
/// breaks a rule (ids, references, cycles, ranges, limits).
pub fn parse_definition(text: &str) -> Result<PipelineSpec, SpecErrors> {
    if text.len() > MAX_DEFINITION_BYTES {
        return Err(SpecErrors::single(SpecError::new(
            "",
            format!("definition is {} bytes; the limit is {MAX_DEFINITION_BYTES} bytes", text.len()),
        )));
    }
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let is_json = text.trim_start().starts_with('{');
    let tree = if is_json { doc::json::load(text) } else { doc::yaml::load(text) };
    let tree = tree.map_err(|problem| finish(vec![problem], None))?;
    if !matches!(tree.value, doc::Value::Map(_)) {
        return Err(finish(
            vec![Problem::new(Vec::new(), "the definition must be a mapping (an object with `stages`)")],
            Some(&tree),
        ));
    }
    let value = tree.to_json().map_err(|message| finish(vec![Problem::new(Vec::new(), message)], Some(&tree)))?;
    let spec = deserialize_spec(&value).map_err(|problems| finish(problems, Some(&tree)))?;
    let problems = validate(&spec);
    if problems.is_empty() { Ok(spec) } else { Err(finish(problems, Some(&tree))) }
}

/// Turns problems into errors, looking positions up in the tree.
pub(crate) fn finish(problems: Vec<Problem>, tree: Option<&Node>) -> SpecErrors {
    let errors: Vec<SpecError> = problems
        .into_iter()
        .map(|problem| {
            let mark = problem.mark.or_else(|| tree.and_then(|t| t.locate(&problem.path, problem.at_key)));
            SpecError {
                path: render_path(&problem.path),
                message: problem.message,
                line: mark.map(|m| m.line),
                column: mark.map(|m| m.column),
            }
        })
        .collect();
    SpecErrors::new(errors).unwrap_or_else(|| SpecErrors::single(SpecError::new("", "invalid pipeline definition")))
}

/// Deserializes `value` as `T`, reporting the first error with its path under `prefix`.
fn typed<T: DeserializeOwned>(value: &serde_json::Value, prefix: &[Seg]) -> Result<T, Problem> {
    serde_path_to_error::deserialize(value).map_err(|error| {
        let mut path = prefix.to_vec();
        for segment in error.path().iter() {
            match segment {
                serde_path_to_error::Segment::Seq { index } => path.push(Seg::Index(*index)),
                serde_path_to_error::Segment::Map { key } => path.push(Seg::Key(key.clone())),
                serde_path_to_error::Segment::Enum { variant } => {
                    path.push(Seg::Key(variant.clone()));
                }
                serde_path_to_error::Segment::Unknown => break,
            }
        }
        let message = error.into_inner().to_string();
        let mut problem = Problem::new(path, message);
        problem.at_key = problem.message.starts_with("unknown field");
        problem
    })
}

/// A copy of `value` with the array under `field` replaced by an empty one, so the rest of
/// the object can be checked on its own.
fn without_list(value: &serde_json::Value, field: &str) -> Option<serde_json::Value> {
    let object = value.as_object()?;
    object.get(field)?.as_array()?;
    Some(serde_json::Value::Object(
        object
            .iter()
            .map(|(k, v)| {
                let v = if k == field { serde_json::Value::Array(Vec::new()) } else { v.clone() };
                (k.clone(), v)
            })
            .collect(),
    ))
}

/// Deserializes the whole spec; on failure, checks the root, each stage and each task
/// separately so that one error per object is reported rather than only the first.
fn deserialize_spec(value: &serde_json::Value) -> Result<PipelineSpec, Vec<Problem>> {
    let first = match typed::<PipelineSpec>(value, &[]) {
        Ok(spec) => return Ok(spec),
        Err(problem) => problem,
    };
    let mut problems = Vec::new();
    let Some(shallow) = without_list(value, "stages") else {
        return Err(vec![first]);
    };
    if let Err(problem) = typed::<PipelineSpec>(&shallow, &[]) {
        problems.push(problem);
    }
    let stages = value.get("stages").and_then(serde_json::Value::as_array);
    for (si, stage) in stages.into_iter().flatten().enumerate() {
        let sp = [Seg::Key("stages".to_owned()), Seg::Index(si)];
        let Some(shallow) = without_list(stage, "tasks") else {
            if let Err(problem) = typed::<StageSpec>(stage, &sp) {
                problems.push(problem);
            }
            continue;
        };
        if let Err(problem) = typed::<StageSpec>(&shallow, &sp) {
            problems.push(problem);
        }
        let tasks = stage.get("tasks").and_then(serde_json::Value::as_array);
        for (ti, task) in tasks.into_iter().flatten().enumerate() {
            let tp = [sp[0].clone(), sp[1].clone(), Seg::Key("tasks".to_owned()), Seg::Index(ti)];
            if let Err(problem) = typed::<TaskSpec>(task, &tp) {
                problems.push(problem);
            }
        }
    }
    if problems.is_empty() {
        problems.push(first);
    }
    Err(problems)
}
