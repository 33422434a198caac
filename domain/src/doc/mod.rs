//! An ordered document tree with source positions, shared by the YAML and JSON readers, the
//! canonical YAML writer and the position look-up of validation errors.
//!
//! Readers enforce [`MAX_DEPTH`], so every tree built from input is at most that deep and the
//! (recursive) conversions below cannot overflow the stack on input-derived data.

pub(crate) mod emit;
pub(crate) mod json;
pub(crate) mod ser;
pub(crate) mod yaml;

use core::fmt::Write as _;

/// Deepest nesting of collections accepted in a definition (the root mapping is level 1).
pub(crate) const MAX_DEPTH: usize = 64;
/// Longest accepted string (scalar or key), in bytes.
pub(crate) const MAX_STRING_BYTES: usize = 64 * 1024;

/// A 1-based line and column in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Mark {
    pub line: u32,
    pub column: u32,
}

/// One step of a path into a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// Renders a path as `stages[1].tasks[0].needs[0]`; the root is the empty string.
pub(crate) fn render_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Index(index) => {
                let _ = write!(out, "[{index}]");
            }
        }
    }
    out
}

/// A problem found at a path, before positions are attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub path: Vec<Seg>,
    pub message: String,
    /// Position, when the reader knows it directly (syntax errors).
    pub mark: Option<Mark>,
    /// Whether the problem is the key itself (an unknown field), not its value.
    pub at_key: bool,
}

impl Problem {
    pub(crate) fn new(path: Vec<Seg>, message: impl Into<String>) -> Self {
        Self { path, message: message.into(), mark: None, at_key: false }
    }

    pub(crate) fn at(mut self, mark: Option<Mark>) -> Self {
        self.mark = mark;
        self
    }
}

/// A node's value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
}

/// A value and where it starts in the source (`None` for trees not read from text).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub value: Value,
    pub mark: Option<Mark>,
}

/// A mapping entry; keys are always strings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Entry {
    pub key: String,
    pub key_mark: Option<Mark>,
    pub value: Node,
}

impl Node {
    pub(crate) fn new(value: Value, mark: Option<Mark>) -> Self {
        Self { value, mark }
    }

    /// The position of the node at `path`, or of its deepest existing ancestor.
    ///
    /// For a path ending in a mapping key, the position is the value's when it is a scalar
    /// (the value is what is wrong) and the key's otherwise, or always the key's when
    /// `prefer_key` (unknown fields).
    pub(crate) fn locate(&self, path: &[Seg], prefer_key: bool) -> Option<Mark> {
        let mut node = self;
        let mut mark = node.mark;
        for seg in path {
            let next = match (seg, &node.value) {
                (Seg::Key(key), Value::Map(entries)) => entries.iter().find(|e| &e.key == key).map(|e| {
                    let scalar = !matches!(e.value.value, Value::Seq(_) | Value::Map(_));
                    let at = if scalar && !prefer_key { e.value.mark } else { e.key_mark };
                    (at.or(e.value.mark), &e.value)
                }),
                (Seg::Index(i), Value::Seq(items)) => items.get(*i).map(|n| (n.mark, n)),
                _ => None,
            };
            let Some((seg_mark, child)) = next else { break };
            mark = seg_mark.or(mark);
            node = child;
        }
        mark
    }

    /// Converts to a `serde_json::Value` for typed deserialization. The tree is at most
    /// [`MAX_DEPTH`] deep (enforced by the readers), so the recursion is bounded.
    pub(crate) fn to_json(&self) -> Result<serde_json::Value, String> {
        Ok(match &self.value {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => serde_json::Value::Bool(*b),
            Value::Int(i) => serde_json::Value::from(*i),
            Value::UInt(u) => serde_json::Value::from(*u),
            Value::Float(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .ok_or_else(|| "infinite and NaN numbers are not supported".to_owned())?,
            Value::Str(s) => serde_json::Value::String(s.clone()),
            Value::Seq(items) => serde_json::Value::Array(items.iter().map(Node::to_json).collect::<Result<_, _>>()?),
            Value::Map(entries) => serde_json::Value::Object(
                entries.iter().map(|e| Ok((e.key.clone(), e.value.to_json()?))).collect::<Result<_, String>>()?,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_paths() {
        assert_eq!(render_path(&[]), "");
        assert_eq!(render_path(&[Seg::Key("stages".into())]), "stages");
        assert_eq!(
            render_path(&[
                Seg::Key("stages".into()),
                Seg::Index(1),
                Seg::Key("tasks".into()),
                Seg::Index(0),
                Seg::Key("needs".into()),
                Seg::Index(0),
            ]),
            "stages[1].tasks[0].needs[0]"
        );
    }
}
