//! Deterministic block-style YAML writer for [`Node`] trees.
//!
//! Strings are written plain only when they contain nothing but `[A-Za-z0-9_./-]`, do not
//! start with `-` or `.`, and would read back as strings under the core schema; everything
//! else is double-quoted with escapes, so reading the output back gives the same tree.
//! Recursion depth equals the tree's depth, which is bounded for trees read from input.

use core::fmt::Write as _;

use super::yaml::resolve_plain;
use super::{Entry, Node, Value};

/// Writes `node` as a YAML document (ending with a newline).
pub(crate) fn to_yaml(node: &Node) -> String {
    let mut out = String::new();
    match &node.value {
        Value::Map(entries) if !entries.is_empty() => write_map(&mut out, entries, 0, false),
        Value::Seq(items) if !items.is_empty() => write_seq(&mut out, items, 0),
        _ => {
            write_inline(&mut out, &node.value);
            out.push('\n');
        }
    }
    out
}

fn indent(out: &mut String, width: usize) {
    out.extend(core::iter::repeat_n(' ', width));
}

/// Writes the map's entries at `width`; if `first_inline`, the first entry continues the
/// current line (after `- `).
fn write_map(out: &mut String, entries: &[Entry], width: usize, first_inline: bool) {
    for (i, entry) in entries.iter().enumerate() {
        if !(first_inline && i == 0) {
            indent(out, width);
        }
        write_string(out, &entry.key);
        out.push(':');
        match &entry.value.value {
            Value::Map(inner) if !inner.is_empty() => {
                out.push('\n');
                write_map(out, inner, width + 2, false);
            }
            Value::Seq(items) if !items.is_empty() => {
                out.push('\n');
                write_seq(out, items, width + 2);
            }
            value => {
                out.push(' ');
                write_inline(out, value);
                out.push('\n');
            }
        }
    }
}

fn write_seq(out: &mut String, items: &[Node], width: usize) {
    for item in items {
        indent(out, width);
        out.push('-');
        match &item.value {
            Value::Map(inner) if !inner.is_empty() => {
                out.push(' ');
                write_map(out, inner, width + 2, true);
            }
            Value::Seq(inner) if !inner.is_empty() => {
                out.push('\n');
                write_seq(out, inner, width + 2);
            }
            value => {
                out.push(' ');
                write_inline(out, value);
                out.push('\n');
            }
        }
    }
}

/// Scalars and empty collections.
fn write_inline(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Value::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        Value::Float(f) => write_float(out, *f),
        Value::Str(s) => write_string(out, s),
        Value::Seq(_) => out.push_str("[]"),
        Value::Map(_) => out.push_str("{}"),
    }
}

fn write_float(out: &mut String, f: f64) {
    if f.is_nan() {
        out.push_str(".nan");
    } else if f.is_infinite() {
        out.push_str(if f > 0.0 { ".inf" } else { "-.inf" });
    } else {
        // Debug prints the shortest representation that round-trips and always includes a
        // `.` or an exponent (`1.0`, `1e100`), so it reads back as a float.
        let _ = write!(out, "{f:?}");
    }
}

fn is_plain_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    first != '-'
        && first != '.'
        && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '/' | '-'))
        && matches!(resolve_plain(s), Ok(Value::Str(_)))
}

fn write_string(out: &mut String, s: &str) {
    if is_plain_safe(s) {
        out.push_str(s);
        return;
    }
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\0' => out.push_str("\\0"),
            ' '..='~' => out.push(c),
            '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}' => {
                let _ = write!(out, "\\x{:02X}", u32::from(c));
            }
            '\u{2028}' | '\u{2029}' | '\u{feff}' | '\u{fffe}' | '\u{ffff}' => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            _ => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::yaml::load;
    use super::*;
    use proptest::prelude::*;

    fn strip_marks(node: &mut Node) {
        node.mark = None;
        match &mut node.value {
            Value::Seq(items) => items.iter_mut().for_each(strip_marks),
            Value::Map(entries) => entries.iter_mut().for_each(|e| {
                e.key_mark = None;
                strip_marks(&mut e.value);
            }),
            _ => {}
        }
    }

    fn round_trip(node: &Node) -> Node {
        let text = to_yaml(node);
        let mut back = load(&text).unwrap_or_else(|e| panic!("{e:?} in\n{text}"));
        strip_marks(&mut back);
        back
    }

    fn s(v: &str) -> Node {
        Node::new(Value::Str(v.to_owned()), None)
    }

    #[test]
    fn writes_block_style() {
        let tree = Node::new(
            Value::Map(vec![
                Entry { key: "name".into(), key_mark: None, value: s("deploy-api") },
                Entry {
                    key: "stages".into(),
                    key_mark: None,
                    value: Node::new(
                        Value::Seq(vec![Node::new(
                            Value::Map(vec![
                                Entry { key: "id".into(), key_mark: None, value: s("build") },
                                Entry {
                                    key: "run".into(),
                                    key_mark: None,
                                    value: Node::new(Value::Seq(vec![s("cargo"), s("a b")]), None),
                                },
                                Entry {
                                    key: "empty".into(),
                                    key_mark: None,
                                    value: Node::new(Value::Seq(vec![]), None),
                                },
                            ]),
                            None,
                        )]),
                        None,
                    ),
                },
            ]),
            None,
        );
        let text = to_yaml(&tree);
        assert_eq!(
            text,
            "name: deploy-api\nstages:\n  - id: build\n    run:\n      - cargo\n      - \"a b\"\n    empty: []\n"
        );
        assert_eq!(round_trip(&tree), tree);
    }

    #[test]
    fn quotes_what_needs_quoting() {
        for v in ["true", "null", "1", "1.5", "0x1", "", " a", "a: b", "#x", "-x", ".inf", "é", "a\"b\\"] {
            let mut out = String::new();
            write_string(&mut out, v);
            assert!(out.starts_with('"'), "{v} -> {out}");
        }
        let mut out = String::new();
        write_string(&mut out, "1h30m");
        assert_eq!(out, "1h30m");
    }

    #[test]
    fn nested_sequences_and_floats() {
        let tree = Node::new(
            Value::Seq(vec![
                Node::new(Value::Seq(vec![s("a"), Node::new(Value::Seq(vec![s("b")]), None)]), None),
                Node::new(Value::Float(1.0), None),
                Node::new(Value::Float(1e100), None),
                Node::new(Value::Float(-2.5e-7), None),
                Node::new(Value::UInt(u64::MAX), None),
                Node::new(Value::Int(i64::MIN), None),
                Node::new(Value::Null, None),
                Node::new(Value::Map(vec![]), None),
            ]),
            None,
        );
        assert_eq!(round_trip(&tree), tree);
    }

    proptest! {
        #[test]
        fn any_string_round_trips(value in any::<String>(), key in "\\PC{0,12}") {
            let tree = Node::new(
                Value::Map(vec![Entry { key, key_mark: None, value: s(&value) }]),
                None,
            );
            prop_assert_eq!(round_trip(&tree), tree);
        }
    }
}
