//! YAML reader: saphyr-parser events → [`Node`] tree, iteratively, with hardening.
//!
//! Rejected: aliases and anchors, tags other than `!!str`, duplicate mapping keys, keys that
//! are not strings, nesting deeper than [`MAX_DEPTH`], strings longer than
//! [`MAX_STRING_BYTES`], infinite/NaN numbers, integers outside 64 bits and multiple documents.
//! Scalars are resolved with the YAML 1.2 core schema.

use std::collections::BTreeSet;

use saphyr_parser::{Event, Parser, ScalarStyle, Span};

use super::{Entry, MAX_DEPTH, MAX_STRING_BYTES, Mark, Node, Problem, Seg, Value};

fn mark_of(marker: &saphyr_parser::Marker) -> Mark {
    Mark {
        line: u32::try_from(marker.line()).unwrap_or(u32::MAX),
        column: u32::try_from(marker.col().saturating_add(1)).unwrap_or(u32::MAX),
    }
}

enum Frame {
    Seq { mark: Mark, items: Vec<Node> },
    Map { mark: Mark, entries: Vec<Entry>, key: Option<(String, Mark)>, seen: BTreeSet<String> },
}

struct Loader {
    stack: Vec<Frame>,
    root: Option<Node>,
}

impl Loader {
    /// The path of the node currently being read (the next item or the pending key's value).
    fn path(&self) -> Vec<Seg> {
        self.stack
            .iter()
            .map(|frame| match frame {
                Frame::Seq { items, .. } => Some(Seg::Index(items.len())),
                Frame::Map { key: Some((key, _)), .. } => Some(Seg::Key(key.clone())),
                Frame::Map { key: None, .. } => None,
            })
            .take_while(Option::is_some)
            .flatten()
            .collect()
    }

    fn error(&self, mark: Mark, message: impl Into<String>) -> Problem {
        Problem::new(self.path(), message).at(Some(mark))
    }

    /// Whether the next node completes a key (so it must be a string scalar).
    fn expecting_key(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Map { key: None, .. }))
    }

    fn push_node(&mut self, node: Node) -> Result<(), Problem> {
        if self.expecting_key() {
            let Value::Str(name) = node.value else {
                return Err(Problem::new(self.path(), "mapping keys must be strings").at(node.mark));
            };
            let duplicate = matches!(
                self.stack.last(),
                Some(Frame::Map { seen, .. }) if seen.contains(&name)
            );
            if duplicate {
                let mut path = self.path();
                let message = format!("duplicate key `{name}`");
                path.push(Seg::Key(name));
                return Err(Problem::new(path, message).at(node.mark));
            }
            if let Some(Frame::Map { key, seen, .. }) = self.stack.last_mut() {
                seen.insert(name.clone());
                *key = Some((name, node.mark.unwrap_or(Mark { line: 1, column: 1 })));
            }
            return Ok(());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => {
                if let Some((key, key_mark)) = key.take() {
                    entries.push(Entry { key, key_mark: Some(key_mark), value: node });
                }
            }
        }
        Ok(())
    }

    fn open(&mut self, frame: Frame, mark: Mark) -> Result<(), Problem> {
        if self.expecting_key() {
            return Err(self.error(mark, "mapping keys must be strings"));
        }
        if self.stack.len() >= MAX_DEPTH {
            return Err(self.error(mark, format!("nesting is deeper than {MAX_DEPTH} levels")));
        }
        self.stack.push(frame);
        Ok(())
    }

    fn close(&mut self) -> Result<(), Problem> {
        let node = match self.stack.pop() {
            Some(Frame::Seq { mark, items }) => Node::new(Value::Seq(items), Some(mark)),
            Some(Frame::Map { mark, entries, .. }) => Node::new(Value::Map(entries), Some(mark)),
            None => return Ok(()),
        };
        self.push_node(node)
    }
}

/// Parses YAML text into a tree. Errors carry a path and a position.
pub(crate) fn load(text: &str) -> Result<Node, Problem> {
    let mut loader = Loader { stack: Vec::new(), root: None };
    let mut documents = 0usize;
    for event in Parser::new_from_str(text) {
        let (event, span): (Event<'_>, Span) = event.map_err(|e| {
            // The scanner's own flow nesting limit can trigger before ours, as it reads ahead.
            let message = if e.info() == "recursion limit exceeded" {
                format!("nesting is deeper than {MAX_DEPTH} levels")
            } else {
                format!("YAML syntax error: {}", e.info())
            };
            Problem::new(loader.path(), message).at(Some(mark_of(e.marker())))
        })?;
        let mark = mark_of(&span.start);
        match event {
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return Err(Problem::new(Vec::new(), "only one YAML document is allowed (found a second `---`)")
                        .at(Some(mark)));
                }
            }
            Event::Alias(_) => {
                return Err(loader.error(mark, "YAML aliases (`*name`) are not supported"));
            }
            Event::Scalar(text, style, anchor, tag) => {
                if anchor != 0 {
                    return Err(loader.error(mark, "YAML anchors (`&name`) are not supported"));
                }
                let force_string = match tag.as_deref() {
                    None => false,
                    Some(tag) if tag.is_yaml_core_schema() && tag.suffix == "str" => true,
                    Some(tag) => {
                        return Err(loader.error(mark, format!("YAML tags are not supported (found `{tag}`)")));
                    }
                };
                if text.len() > MAX_STRING_BYTES {
                    return Err(loader.error(
                        mark,
                        format!("string is {} bytes long; the limit is {MAX_STRING_BYTES} bytes", text.len()),
                    ));
                }
                let value = if force_string || style != ScalarStyle::Plain {
                    Value::Str(text.into_owned())
                } else {
                    resolve_plain(&text).map_err(|message| loader.error(mark, message))?
                };
                if loader.expecting_key() && !matches!(value, Value::Str(_)) {
                    return Err(loader.error(mark, "mapping keys must be strings (quote the key)"));
                }
                loader.push_node(Node::new(value, Some(mark)))?;
            }
            Event::SequenceStart(anchor, tag) | Event::MappingStart(anchor, tag) if anchor != 0 || tag.is_some() => {
                let what = if anchor != 0 { "YAML anchors (`&name`) are" } else { "YAML tags are" };
                return Err(loader.error(mark, format!("{what} not supported")));
            }
            Event::SequenceStart(..) => {
                loader.open(Frame::Seq { mark, items: Vec::new() }, mark)?;
            }
            Event::MappingStart(..) => {
                loader.open(Frame::Map { mark, entries: Vec::new(), key: None, seen: BTreeSet::new() }, mark)?;
            }
            Event::SequenceEnd | Event::MappingEnd => loader.close()?,
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
    loader.root.ok_or_else(|| Problem::new(Vec::new(), "the definition is empty").at(Some(Mark { line: 1, column: 1 })))
}

/// Resolves a plain scalar with the YAML 1.2 core schema.
pub(crate) fn resolve_plain(text: &str) -> Result<Value, String> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Ok(Value::Null),
        "true" | "True" | "TRUE" => return Ok(Value::Bool(true)),
        "false" | "False" | "FALSE" => return Ok(Value::Bool(false)),
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF" | ".nan" | ".NaN"
        | ".NAN" => {
            return Err(format!("`{text}`: infinite and NaN numbers are not supported"));
        }
        _ => {}
    }
    let out_of_range = || format!("integer `{text}` does not fit in 64 bits");
    if let Some(hex) = text.strip_prefix("0x") {
        if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return u64::from_str_radix(hex, 16).map(int_value).map_err(|_| out_of_range());
        }
        return Ok(Value::Str(text.to_owned()));
    }
    if let Some(oct) = text.strip_prefix("0o") {
        if !oct.is_empty() && oct.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
            return u64::from_str_radix(oct, 8).map(int_value).map_err(|_| out_of_range());
        }
        return Ok(Value::Str(text.to_owned()));
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !unsigned.is_empty() && unsigned.bytes().all(|b| b.is_ascii_digit()) {
        if text.starts_with('-') {
            return text.parse::<i64>().map(Value::Int).map_err(|_| out_of_range());
        }
        return unsigned.parse::<u64>().map(int_value).map_err(|_| out_of_range());
    }
    if is_core_float(unsigned) {
        if let Ok(f) = text.parse::<f64>()
            && f.is_finite()
        {
            return Ok(Value::Float(f));
        }
        return Err(format!("number `{text}` is out of range"));
    }
    Ok(Value::Str(text.to_owned()))
}

fn int_value(u: u64) -> Value {
    i64::try_from(u).map_or(Value::UInt(u), Value::Int)
}

/// `(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?`
fn is_core_float(text: &str) -> bool {
    let bytes = text.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < bytes.len() && bytes[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    let int_digits = digits(&mut i);
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        let frac_digits = digits(&mut i);
        if int_digits == 0 && frac_digits == 0 {
            return false;
        }
    } else if int_digits == 0 {
        return false;
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(bytes.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == bytes.len()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn resolves_core_schema() {
        assert_eq!(resolve_plain("").unwrap(), Value::Null);
        assert_eq!(resolve_plain("true").unwrap(), Value::Bool(true));
        assert_eq!(resolve_plain("yes").unwrap(), Value::Str("yes".into()));
        assert_eq!(resolve_plain("on").unwrap(), Value::Str("on".into()));
        assert_eq!(resolve_plain("12").unwrap(), Value::Int(12));
        assert_eq!(resolve_plain("-12").unwrap(), Value::Int(-12));
        assert_eq!(resolve_plain("0x1F").unwrap(), Value::Int(31));
        assert_eq!(resolve_plain("0o17").unwrap(), Value::Int(15));
        assert_eq!(resolve_plain("18446744073709551615").unwrap(), Value::UInt(u64::MAX));
        assert!(resolve_plain("18446744073709551616").is_err());
        assert_eq!(resolve_plain("1.5").unwrap(), Value::Float(1.5));
        assert_eq!(resolve_plain("1e3").unwrap(), Value::Float(1000.0));
        assert_eq!(resolve_plain(".5").unwrap(), Value::Float(0.5));
        assert_eq!(resolve_plain("1.").unwrap(), Value::Float(1.0));
        assert!(resolve_plain(".inf").is_err());
        assert!(resolve_plain("1e999").is_err());
        for s in ["1h30m", "2s", "1.2.3", "e3", ".", "0x", "v1", "1e", "-", "+"] {
            assert_eq!(resolve_plain(s).unwrap(), Value::Str(s.into()), "{s}");
        }
    }

    #[test]
    fn loads_with_marks() {
        let node = load("a: 1\nb:\n  - x\n  - {c: d}\n").unwrap();
        let Value::Map(entries) = &node.value else { panic!() };
        assert_eq!(entries[0].key, "a");
        assert_eq!(entries[1].key_mark, Some(Mark { line: 2, column: 1 }));
        assert_eq!(
            node.locate(&[Seg::Key("b".into()), Seg::Index(1), Seg::Key("c".into())], false),
            Some(Mark { line: 4, column: 9 })
        );
    }

    #[test]
    fn hardening() {
        let err = load("a: &x 1\nb: *x\n").unwrap_err();
        assert!(err.message.contains("anchors"), "{err:?}");
        let err = load("a: 1\nb: *x\n").unwrap_err();
        assert!(err.message.contains("aliases") || err.message.contains("syntax"), "{err:?}");
        let err = load("a: 1\na: 2\n").unwrap_err();
        assert_eq!(err.path, vec![Seg::Key("a".into())]);
        assert_eq!(err.mark, Some(Mark { line: 2, column: 1 }));
        let err = load("1: x\n").unwrap_err();
        assert!(err.message.contains("keys must be strings"), "{err:?}");
        let err = load("? [a]\n: x\n").unwrap_err();
        assert!(err.message.contains("keys must be strings"), "{err:?}");
        let err = load("a: !!int 3\n").unwrap_err();
        assert!(err.message.contains("tags"), "{err:?}");
        assert_eq!(load("a: !!str 3\n").unwrap().locate(&[], false), Some(Mark { line: 1, column: 1 }));
        let err = load("a: 1\n---\nb: 2\n").unwrap_err();
        assert!(err.message.contains("one YAML document"), "{err:?}");
        assert!(load("").unwrap_err().message.contains("empty"));
    }

    #[test]
    fn deep_nesting_is_rejected_without_overflow() {
        let deep = "[".repeat(100_000);
        let err = load(&deep).unwrap_err();
        assert!(err.message.contains("deeper than 64"), "{err:?}");
        let mut block = String::new();
        for level in 0..200 {
            block.push_str(&" ".repeat(level));
            block.push_str("a:\n");
        }
        assert!(load(&block).unwrap_err().message.contains("deeper than 64"));
        let dashes = "- ".repeat(100_000);
        assert!(load(&dashes).unwrap_err().message.contains("deeper than 64"));
        let braces = "{a: ".repeat(100_000);
        assert!(load(&braces).unwrap_err().message.contains("deeper than 64"));
        let ok = format!("{}{}", "[".repeat(64), "]".repeat(64));
        assert!(load(&ok).is_ok());
        let too_deep = format!("{}{}", "[".repeat(65), "]".repeat(65));
        assert!(load(&too_deep).is_err());
    }
}
