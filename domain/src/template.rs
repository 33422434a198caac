//! Template expressions: `{{ params.NAME }}`, `{{ tasks.TASK_ID.outputs.KEY }}`, `{{ run.id }}`,
//! `{{ secrets.NAME }}`, `{{ item }}` and `{{ item.field }}` (the current `for_each` element).
//!
//! Whitespace inside the braces is optional (`{{params.x}}` equals `{{ params.x }}`). Text
//! outside `{{ … }}` is copied verbatim; a lone `}}` is plain text. Path segments are made of
//! ASCII letters, digits, `_` and `-`. A `{{` without its closing `}}`, an empty expression, an
//! unknown root or a malformed path is an error carrying the byte offset where it was found.
//!
//! Rendering inserts strings verbatim, numbers and booleans as their JSON text, and arrays and
//! objects (and `null`) as compact JSON. A reference with no value is an error naming it.
//! [`render_argv`] renders each argv element on its own: a value is never split or
//! re-parsed, so a parameter holding `$(rm -rf /)` or `a; b` stays one argv element.

use core::fmt;
use std::collections::BTreeMap;

/// What a `{{ … }}` expression refers to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reference {
    /// `{{ params.NAME }}`.
    Param(String),
    /// `{{ tasks.TASK.outputs.KEY }}`.
    TaskOutput {
        /// The task id.
        task: String,
        /// The output key.
        key: String,
    },
    /// `{{ run.id }}`.
    RunId,
    /// `{{ secrets.NAME }}`.
    Secret(String),
    /// `{{ item }}` (empty path) or `{{ item.a.b }}`: the `for_each` element, or a field of it.
    /// A segment that is a number indexes into an array.
    Item(Vec<String>),
}

impl fmt::Display for Reference {
    /// The expression without braces, such as `params.version` or `item.name`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Param(name) => write!(f, "params.{name}"),
            Self::TaskOutput { task, key } => write!(f, "tasks.{task}.outputs.{key}"),
            Self::RunId => f.write_str("run.id"),
            Self::Secret(name) => write!(f, "secrets.{name}"),
            Self::Item(path) => {
                f.write_str("item")?;
                for segment in path {
                    write!(f, ".{segment}")?;
                }
                Ok(())
            }
        }
    }
}

/// Why a template could not be parsed or rendered. Offsets are byte offsets into the template
/// text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// `{{` without a closing `}}`.
    #[error("unclosed `{{{{` at byte {offset}")]
    Unclosed {
        /// Offset of the `{{`.
        offset: usize,
    },
    /// `{{ }}` with nothing inside.
    #[error("empty expression `{{{{ }}}}` at byte {offset}")]
    Empty {
        /// Offset of the `{{`.
        offset: usize,
    },
    /// The first segment is not `params`, `tasks`, `run`, `secrets` or `item`.
    #[error("unknown root `{root}` at byte {offset}; expected params, tasks, run, secrets or item")]
    UnknownRoot {
        /// Offset of the root segment.
        offset: usize,
        /// The root found.
        root: String,
    },
    /// A malformed path: empty segment, bad character, wrong number of segments.
    #[error("invalid expression `{expression}` at byte {offset}: {reason}")]
    Invalid {
        /// Offset of the offending part.
        offset: usize,
        /// The whole expression (without braces).
        expression: String,
        /// What is wrong.
        reason: String,
    },
    /// Rendering found no value for a reference.
    #[error("no value for `{{{{ {reference} }}}}` at byte {offset}")]
    Missing {
        /// Offset of the expression's `{{`.
        offset: usize,
        /// The reference without a value.
        reference: Reference,
    },
}

impl TemplateError {
    /// The byte offset the error points at.
    #[must_use]
    pub fn offset(&self) -> usize {
        match self {
            Self::Unclosed { offset }
            | Self::Empty { offset }
            | Self::UnknownRoot { offset, .. }
            | Self::Invalid { offset, .. }
            | Self::Missing { offset, .. } => *offset,
        }
    }
}

/// One piece of a parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    /// Literal text.
    Text(String),
    /// An expression and the offset of its `{{`.
    Ref(Reference, usize),
}

/// A parsed template: literal text and references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pieces: Vec<Piece>,
}

/// The values a template is rendered with.
pub trait Context {
    /// A run parameter's value.
    fn param(&self, name: &str) -> Option<&serde_json::Value>;
    /// An output of a finished task.
    fn output(&self, task: &str, key: &str) -> Option<&str>;
    /// The run's id.
    fn run_id(&self) -> &str;
    /// A secret's value.
    fn secret(&self, name: &str) -> Option<&str>;
    /// The current `for_each` element, if the task is a fan-out instance.
    fn item(&self) -> Option<&serde_json::Value>;
}

/// A [`Context`] backed by plain maps (handy for tests, previews and simple callers).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MapContext {
    /// Run parameters.
    pub params: serde_json::Map<String, serde_json::Value>,
    /// Task outputs: task id → key → value.
    pub outputs: BTreeMap<String, BTreeMap<String, String>>,
    /// The run id.
    pub run_id: String,
    /// Secrets by name.
    pub secrets: BTreeMap<String, String>,
    /// The `for_each` element.
    pub item: Option<serde_json::Value>,
}

impl Context for MapContext {
    fn param(&self, name: &str) -> Option<&serde_json::Value> {
        self.params.get(name)
    }
    fn output(&self, task: &str, key: &str) -> Option<&str> {
        self.outputs.get(task).and_then(|outputs| outputs.get(key)).map(String::as_str)
    }
    fn run_id(&self) -> &str {
        &self.run_id
    }
    fn secret(&self, name: &str) -> Option<&str> {
        self.secrets.get(name).map(String::as_str)
    }
    fn item(&self) -> Option<&serde_json::Value> {
        self.item.as_ref()
    }
}

fn is_segment_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// Parses the expression between `{{` (at `open`) and `}}`. `inner_start` is the offset of the
/// first byte after `{{`.
fn parse_expression(inner: &str, open: usize, inner_start: usize) -> Result<Reference, TemplateError> {
    let leading = inner.len() - inner.trim_start().len();
    let expression = inner.trim();
    if expression.is_empty() {
        return Err(TemplateError::Empty { offset: open });
    }
    let base = inner_start + leading;
    let invalid =
        |offset: usize, reason: String| TemplateError::Invalid { offset, expression: expression.to_owned(), reason };

    // Split on '.', checking every segment and remembering its offset.
    let mut segments: Vec<(&str, usize)> = Vec::new();
    let mut start = 0;
    for part in expression.split('.') {
        let offset = base + start;
        if part.is_empty() {
            return Err(invalid(offset, "empty path segment".to_owned()));
        }
        if let Some(pos) = part.bytes().position(|b| !is_segment_byte(b)) {
            let bad = part.get(pos..).and_then(|rest| rest.chars().next()).unwrap_or('?');
            return Err(invalid(
                offset + pos,
                format!("unexpected character `{bad}` (path segments use letters, digits, `_` and `-`)"),
            ));
        }
        segments.push((part, offset));
        start += part.len() + 1;
    }

    let Some(&(root, root_offset)) = segments.first() else {
        return Err(TemplateError::Empty { offset: open });
    };
    let rest: Vec<&str> = segments.iter().skip(1).map(|(s, _)| *s).collect();
    let after_root = segments.get(1).map_or(base + expression.len(), |(_, o)| *o);
    match root {
        "params" => match rest.as_slice() {
            [name] => Ok(Reference::Param((*name).to_owned())),
            _ => Err(invalid(after_root, "expected `params.NAME`".to_owned())),
        },
        "secrets" => match rest.as_slice() {
            [name] => Ok(Reference::Secret((*name).to_owned())),
            _ => Err(invalid(after_root, "expected `secrets.NAME`".to_owned())),
        },
        "run" => match rest.as_slice() {
            ["id"] => Ok(Reference::RunId),
            _ => Err(invalid(after_root, "expected `run.id`".to_owned())),
        },
        "tasks" => match rest.as_slice() {
            [task, "outputs", key] => Ok(Reference::TaskOutput { task: (*task).to_owned(), key: (*key).to_owned() }),
            _ => Err(invalid(after_root, "expected `tasks.TASK_ID.outputs.KEY`".to_owned())),
        },
        "item" => Ok(Reference::Item(rest.iter().map(|s| (*s).to_owned()).collect())),
        _ => Err(TemplateError::UnknownRoot { offset: root_offset, root: root.to_owned() }),
    }
}

/// Renders a JSON value: strings verbatim, anything else as compact JSON with object keys
/// sorted, so the text does not depend on how a map happens to be ordered.
fn value_text(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::String(text) => out.push_str(text),
        other => out.push_str(&sorted_keys(other).to_string()),
    }
}

/// A copy of `value` whose objects list their keys in order. Iterative: no recursion on input.
fn sorted_keys(value: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    // Post-order over the tree with an explicit stack of (node, children visited?).
    let mut stack: Vec<(&Value, bool)> = vec![(value, false)];
    let mut done: Vec<Value> = vec![];
    while let Some((node, visited)) = stack.pop() {
        match node {
            Value::Array(items) if !visited => {
                stack.push((node, true));
                stack.extend(items.iter().rev().map(|v| (v, false)));
            }
            Value::Object(map) if !visited => {
                stack.push((node, true));
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                stack.extend(keys.into_iter().rev().filter_map(|k| map.get(k)).map(|v| (v, false)));
            }
            Value::Array(items) => {
                let children = done.split_off(done.len().saturating_sub(items.len()));
                done.push(Value::Array(children));
            }
            Value::Object(map) => {
                let children = done.split_off(done.len().saturating_sub(map.len()));
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                let mut out = serde_json::Map::new();
                for (k, v) in keys.into_iter().zip(children) {
                    out.insert(k.clone(), v);
                }
                done.push(Value::Object(out));
            }
            leaf => done.push(leaf.clone()),
        }
    }
    done.pop().unwrap_or(Value::Null)
}

/// Follows an item path: object fields by name, array elements by index.
fn item_at<'v>(mut value: &'v serde_json::Value, path: &[String]) -> Option<&'v serde_json::Value> {
    for segment in path {
        value = match value {
            serde_json::Value::Object(map) => map.get(segment)?,
            serde_json::Value::Array(items) => items.get(segment.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(value)
}

impl Template {
    /// Parses template text.
    ///
    /// # Errors
    /// [`TemplateError`] with the byte offset of the first problem: an unclosed `{{`, an empty
    /// expression, an unknown root or a malformed path.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut pieces = Vec::new();
        let mut pos = 0;
        while let Some(found) = text.get(pos..).and_then(|rest| rest.find("{{")) {
            let open = pos + found;
            if found > 0 {
                pieces.push(Piece::Text(text.get(pos..open).unwrap_or_default().to_owned()));
            }
            let inner_start = open + 2;
            let Some(close) = text.get(inner_start..).and_then(|rest| rest.find("}}")) else {
                return Err(TemplateError::Unclosed { offset: open });
            };
            let inner = text.get(inner_start..inner_start + close).unwrap_or_default();
            pieces.push(Piece::Ref(parse_expression(inner, open, inner_start)?, open));
            pos = inner_start + close + 2;
        }
        if pos < text.len() {
            pieces.push(Piece::Text(text.get(pos..).unwrap_or_default().to_owned()));
        }
        Ok(Self { pieces })
    }

    /// The references, in order of appearance (repeats included).
    pub fn references(&self) -> impl Iterator<Item = &Reference> {
        self.pieces.iter().filter_map(|piece| match piece {
            Piece::Ref(reference, _) => Some(reference),
            Piece::Text(_) => None,
        })
    }

    /// The reference, when the whole template is exactly one `{{ … }}` and nothing else.
    #[must_use]
    pub fn is_single_reference(&self) -> Option<&Reference> {
        match self.pieces.as_slice() {
            [Piece::Ref(reference, _)] => Some(reference),
            _ => None,
        }
    }

    /// Whether the template has no references (it renders to its text unchanged).
    #[must_use]
    pub fn is_literal(&self) -> bool {
        self.references().next().is_none()
    }

    /// Renders the template.
    ///
    /// # Errors
    /// [`TemplateError::Missing`] naming the first reference without a value.
    pub fn render(&self, ctx: &dyn Context) -> Result<String, TemplateError> {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Ref(reference, offset) => {
                    let missing = || TemplateError::Missing { offset: *offset, reference: reference.clone() };
                    match reference {
                        Reference::Param(name) => value_text(ctx.param(name).ok_or_else(missing)?, &mut out),
                        Reference::TaskOutput { task, key } => out.push_str(ctx.output(task, key).ok_or_else(missing)?),
                        Reference::RunId => out.push_str(ctx.run_id()),
                        Reference::Secret(name) => out.push_str(ctx.secret(name).ok_or_else(missing)?),
                        Reference::Item(path) => {
                            let value = ctx.item().and_then(|item| item_at(item, path)).ok_or_else(missing)?;
                            value_text(value, &mut out);
                        }
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Parses `text` and returns its references (for validation when a definition is saved).
///
/// # Errors
/// The parse error, as [`Template::parse`].
pub fn check(text: &str) -> Result<Vec<Reference>, TemplateError> {
    Ok(Template::parse(text)?.references().cloned().collect())
}

/// Parses and renders `text` in one step.
///
/// # Errors
/// A parse error or a missing value.
pub fn render_text(text: &str, ctx: &dyn Context) -> Result<String, TemplateError> {
    Template::parse(text)?.render(ctx)
}

/// Renders each argv element separately. A rendered value is inserted into its element and
/// never split or re-parsed, so the result has exactly as many elements as `argv`.
///
/// # Errors
/// The first parse error or missing value.
pub fn render_argv(argv: &[String], ctx: &dyn Context) -> Result<Vec<String>, TemplateError> {
    argv.iter().map(|arg| render_text(arg, ctx)).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn ctx() -> MapContext {
        let mut c = MapContext { run_id: "run-42".to_owned(), ..MapContext::default() };
        c.params.insert("version".to_owned(), json!("1.2.3"));
        c.params.insert("count".to_owned(), json!(3));
        c.params.insert("ratio".to_owned(), json!(0.5));
        c.params.insert("dry".to_owned(), json!(true));
        c.params.insert("list".to_owned(), json!(["a", 1, {"k": "v"}]));
        c.params.insert("obj".to_owned(), json!({"b": 2, "a": [1, 2]}));
        c.params.insert("nothing".to_owned(), json!(null));
        c.params.insert("evil".to_owned(), json!("$(rm -rf /); echo pwned"));
        c.outputs.entry("compile".to_owned()).or_default().insert("digest".to_owned(), "sha256:abc".to_owned());
        c.secrets.insert("TOKEN".to_owned(), "s3cr3t".to_owned());
        c
    }

    fn render(text: &str, c: &MapContext) -> Result<String, TemplateError> {
        Template::parse(text)?.render(c)
    }

    #[test]
    fn parses_every_reference_kind() {
        let t = Template::parse(
            "a{{ params.version }}b{{tasks.compile.outputs.digest}}{{ run.id }}\
             {{  secrets.TOKEN\t}}{{item}}{{ item.x.0 }}",
        )
        .unwrap();
        let refs: Vec<_> = t.references().cloned().collect();
        assert_eq!(
            refs,
            vec![
                Reference::Param("version".into()),
                Reference::TaskOutput { task: "compile".into(), key: "digest".into() },
                Reference::RunId,
                Reference::Secret("TOKEN".into()),
                Reference::Item(vec![]),
                Reference::Item(vec!["x".into(), "0".into()]),
            ]
        );
        assert_eq!(t.is_single_reference(), None);
        assert!(!t.is_literal());
        assert_eq!(refs[1].to_string(), "tasks.compile.outputs.digest");
        assert_eq!(refs[5].to_string(), "item.x.0");
    }

    #[test]
    fn single_reference_and_literals() {
        let t = Template::parse("{{ params.list }}").unwrap();
        assert_eq!(t.is_single_reference(), Some(&Reference::Param("list".into())));
        assert_eq!(Template::parse(" {{ params.list }}").unwrap().is_single_reference(), None);
        assert_eq!(Template::parse("{{ params.a }}{{ params.b }}").unwrap().is_single_reference(), None);
        let lit = Template::parse("plain } text }} with { braces").unwrap();
        assert!(lit.is_literal());
        assert_eq!(lit.render(&ctx()).unwrap(), "plain } text }} with { braces");
        assert_eq!(Template::parse("").unwrap().render(&ctx()).unwrap(), "");
        assert_eq!(
            check("x {{ run.id }} {{ params.a }}").unwrap(),
            vec![Reference::RunId, Reference::Param("a".into())]
        );
    }

    #[test]
    fn renders_values() {
        let c = ctx();
        assert_eq!(render("v{{ params.version }}-{{params.count}}", &c).unwrap(), "v1.2.3-3");
        assert_eq!(render("{{ params.ratio }} {{ params.dry }} {{ params.nothing }}", &c).unwrap(), "0.5 true null");
        assert_eq!(render("{{ params.list }}", &c).unwrap(), r#"["a",1,{"k":"v"}]"#);
        assert_eq!(render("{{ params.obj }}", &c).unwrap(), r#"{"a":[1,2],"b":2}"#);
        assert_eq!(render("{{ tasks.compile.outputs.digest }}", &c).unwrap(), "sha256:abc");
        assert_eq!(render("{{ run.id }}/{{ secrets.TOKEN }}", &c).unwrap(), "run-42/s3cr3t");
        let mut c = c;
        c.item = Some(json!({"name": "eu", "zones": ["a", "b"], "n": 7}));
        assert_eq!(render("{{ item.name }}:{{ item.zones.1 }}:{{ item.n }}", &c).unwrap(), "eu:b:7");
        assert_eq!(render("{{ item }}", &c).unwrap(), r#"{"n":7,"name":"eu","zones":["a","b"]}"#);
        c.item = Some(json!("plain"));
        assert_eq!(render("[{{ item }}]", &c).unwrap(), "[plain]");
    }

    #[test]
    fn missing_values_name_the_reference() {
        let c = ctx();
        let err = render("ab{{ params.nope }}", &c).unwrap_err();
        assert_eq!(err, TemplateError::Missing { offset: 2, reference: Reference::Param("nope".into()) });
        assert!(err.to_string().contains("params.nope"), "{err}");
        assert!(render("{{ tasks.compile.outputs.other }}", &c).is_err());
        assert!(render("{{ tasks.other.outputs.digest }}", &c).is_err());
        assert!(render("{{ secrets.NOPE }}", &c).unwrap_err().to_string().contains("secrets.NOPE"));
        assert!(render("{{ item }}", &c).is_err());
        let mut c = c;
        c.item = Some(json!({"a": 1}));
        assert!(render("{{ item.b }}", &c).is_err());
        assert!(render("{{ item.a.b }}", &c).is_err());
        c.item = Some(json!([1]));
        assert!(render("{{ item.x }}", &c).is_err());
        assert!(render("{{ item.5 }}", &c).is_err());
    }

    #[test]
    fn parse_errors_have_offsets() {
        assert_eq!(Template::parse("abc {{ params.x").unwrap_err(), TemplateError::Unclosed { offset: 4 });
        assert_eq!(Template::parse("{{ params.x }} {{").unwrap_err(), TemplateError::Unclosed { offset: 15 });
        assert_eq!(Template::parse("x{{   }}").unwrap_err(), TemplateError::Empty { offset: 1 });
        assert_eq!(Template::parse("x{{}}").unwrap_err(), TemplateError::Empty { offset: 1 });
        assert_eq!(
            Template::parse("ab{{ env.HOME }}").unwrap_err(),
            TemplateError::UnknownRoot { offset: 5, root: "env".into() }
        );
        let err = Template::parse("{{ params. }}").unwrap_err();
        assert!(matches!(err, TemplateError::Invalid { offset: 10, .. }), "{err:?}");
        let err = Template::parse("{{ params }}").unwrap_err();
        assert!(matches!(err, TemplateError::Invalid { offset: 9, .. }), "{err:?}");
        assert!(err.to_string().contains("params.NAME"), "{err}");
        let err = Template::parse("{{ .x }}").unwrap_err();
        assert!(matches!(err, TemplateError::Invalid { offset: 3, .. }), "{err:?}");
        let err = Template::parse("{{ params.a b }}").unwrap_err();
        assert!(matches!(err, TemplateError::Invalid { offset: 11, .. }), "{err:?}");
        assert!(err.to_string().contains("` `"), "{err}");
        let err = Template::parse("{{ item..a }}").unwrap_err();
        assert!(matches!(err, TemplateError::Invalid { offset: 8, .. }), "{err:?}");
        assert!(matches!(Template::parse("{{ tasks.a.b.c }}"), Err(TemplateError::Invalid { offset: 9, .. })));
        assert!(matches!(Template::parse("{{ tasks.a.outputs }}"), Err(TemplateError::Invalid { .. })));
        assert!(matches!(Template::parse("{{ run.other }}"), Err(TemplateError::Invalid { .. })));
        assert!(matches!(Template::parse("{{ secrets.a.b }}"), Err(TemplateError::Invalid { .. })));
        assert!(matches!(Template::parse("{{ params.é }}"), Err(TemplateError::Invalid { offset: 10, .. })));
        assert!(matches!(Template::parse("{{ {{ params.x }}"), Err(TemplateError::Invalid { offset: 3, .. })));
        assert_eq!(Template::parse("é{{ x }}").unwrap_err().offset(), 5);
        assert!(check("{{ nope }}").is_err());
    }

    #[test]
    fn argv_values_are_never_split() {
        let c = ctx();
        let argv: Vec<String> =
            ["echo", "{{ params.evil }}", "--v={{ params.version }}", "; x"].iter().map(|s| (*s).to_owned()).collect();
        let out = render_argv(&argv, &c).unwrap();
        assert_eq!(out, vec!["echo", "$(rm -rf /); echo pwned", "--v=1.2.3", "; x"]);
        // A value that looks like a template is not re-expanded.
        let mut c = c;
        c.params.insert("tricky".to_owned(), json!("{{ secrets.TOKEN }}"));
        assert_eq!(render_argv(&["{{ params.tricky }}".to_owned()], &c).unwrap(), vec!["{{ secrets.TOKEN }}"]);
        assert!(render_argv(&["ok".to_owned(), "{{ params.missing }}".to_owned()], &c).is_err());
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in "[a-z{} .\\t_é0-9]{0,40}") {
            let _ = Template::parse(&text).map(|t| t.render(&ctx()));
        }

        #[test]
        fn literal_text_round_trips(text in "[a-z }{ .]{0,40}") {
            prop_assume!(!text.contains("{{"));
            prop_assert_eq!(render(&text, &ctx()).unwrap(), text);
        }

        #[test]
        fn argv_length_is_preserved(values in proptest::collection::vec("[ -~]{0,20}", 0..6)) {
            let mut c = ctx();
            let argv: Vec<String> = values.iter().enumerate().map(|(i, v)| {
                c.params.insert(format!("p{i}"), serde_json::Value::String(v.clone()));
                format!("{{{{ params.p{i} }}}}")
            }).collect();
            let out = render_argv(&argv, &c).unwrap();
            prop_assert_eq!(out, values);
        }
    }
}
