//! JSON reader: serde_json → [`Node`] tree, rejecting duplicate keys, nesting deeper than
//! [`MAX_DEPTH`] and strings longer than [`MAX_STRING_BYTES`]. Errors carry the path where they
//! happened and serde_json's line and column.

use core::cell::RefCell;
use core::fmt;
use std::collections::BTreeSet;

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};

use super::{Entry, MAX_DEPTH, MAX_STRING_BYTES, Mark, Node, Problem, Seg, Value};

/// Side channel for error details: the path is collected innermost-first while the error
/// unwinds through the enclosing collections.
#[derive(Default)]
struct ErrorInfo {
    reversed_path: Vec<Seg>,
    message: Option<String>,
}

struct NodeSeed<'a> {
    depth: usize,
    info: &'a RefCell<ErrorInfo>,
}

impl NodeSeed<'_> {
    fn fail<E: serde::de::Error>(&self, message: String) -> E {
        let custom = E::custom(&message);
        self.info.borrow_mut().message = Some(message);
        custom
    }

    fn string<E: serde::de::Error>(&self, s: String) -> Result<Node, E> {
        if s.len() > MAX_STRING_BYTES {
            return Err(self.fail(format!("string is {} bytes long; the limit is {MAX_STRING_BYTES} bytes", s.len())));
        }
        Ok(Node::new(Value::Str(s), None))
    }

    fn enter<E: serde::de::Error>(&self) -> Result<usize, E> {
        if self.depth >= MAX_DEPTH {
            return Err(self.fail(format!("nesting is deeper than {MAX_DEPTH} levels")));
        }
        Ok(self.depth + 1)
    }
}

impl<'de> DeserializeSeed<'de> for NodeSeed<'_> {
    type Value = Node;
    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<Node, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NodeSeed<'_> {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Node, E> {
        Ok(Node::new(Value::Null, None))
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::new(Value::Bool(v), None))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::new(Value::Int(v), None))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Node, E> {
        Ok(Node::new(i64::try_from(v).map_or(Value::UInt(v), Value::Int), None))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Node, E> {
        if v.is_finite() {
            Ok(Node::new(Value::Float(v), None))
        } else {
            Err(self.fail("number is out of range".to_owned()))
        }
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Node, E> {
        self.string(v.to_owned())
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Node, E> {
        self.string(v)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let depth = self.enter()?;
        let mut items = Vec::new();
        loop {
            match seq.next_element_seed(NodeSeed { depth, info: self.info }) {
                Ok(Some(item)) => items.push(item),
                Ok(None) => break,
                Err(e) => {
                    self.info.borrow_mut().reversed_path.push(Seg::Index(items.len()));
                    return Err(e);
                }
            }
        }
        Ok(Node::new(Value::Seq(items), None))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let depth = self.enter()?;
        let mut entries = Vec::new();
        let mut seen = BTreeSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if key.len() > MAX_STRING_BYTES {
                return Err(
                    self.fail(format!("key is {} bytes long; the limit is {MAX_STRING_BYTES} bytes", key.len()))
                );
            }
            if !seen.insert(key.clone()) {
                let message = format!("duplicate key `{key}`");
                self.info.borrow_mut().message = Some(message.clone());
                self.info.borrow_mut().reversed_path.push(Seg::Key(key));
                return Err(A::Error::custom(message));
            }
            match map.next_value_seed(NodeSeed { depth, info: self.info }) {
                Ok(value) => entries.push(Entry { key, key_mark: None, value }),
                Err(e) => {
                    self.info.borrow_mut().reversed_path.push(Seg::Key(key));
                    return Err(e);
                }
            }
        }
        Ok(Node::new(Value::Map(entries), None))
    }
}

/// Parses JSON text into a tree.
pub(crate) fn load(text: &str) -> Result<Node, Problem> {
    let info = RefCell::new(ErrorInfo::default());
    let mut deserializer = serde_json::Deserializer::from_str(text);
    let result = NodeSeed { depth: 0, info: &info }
        .deserialize(&mut deserializer)
        .and_then(|node| deserializer.end().map(|()| node));
    result.map_err(|error| {
        let info = info.into_inner();
        let mut path = info.reversed_path;
        path.reverse();
        let message = match info.message {
            Some(message) => message,
            None => {
                // serde_json's Display appends " at line X column Y"; keep only the message.
                let full = error.to_string();
                let suffix = format!(" at line {} column {}", error.line(), error.column());
                let bare = full.strip_suffix(&suffix).unwrap_or(&full);
                format!("JSON syntax error: {bare}")
            }
        };
        let mark = (error.line() > 0).then(|| Mark {
            line: u32::try_from(error.line()).unwrap_or(u32::MAX),
            column: u32::try_from(error.column().max(1)).unwrap_or(u32::MAX),
        });
        Problem::new(path, message).at(mark)
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn loads_in_order() {
        let node = load(r#"{"b": 1, "a": [true, null, 1.5, "x", 18446744073709551615]}"#).unwrap();
        let Value::Map(entries) = node.value else { panic!() };
        assert_eq!(entries[0].key, "b");
        assert_eq!(entries[1].key, "a");
    }

    #[test]
    fn rejects_duplicates_with_path_and_position() {
        let err = load("{\"a\": {\n \"x\": 1,\n \"x\": 2}}").unwrap_err();
        assert_eq!(err.path, vec![Seg::Key("a".into()), Seg::Key("x".into())]);
        assert_eq!(err.message, "duplicate key `x`");
        assert_eq!(err.mark.map(|m| m.line), Some(3));
    }

    #[test]
    fn syntax_errors() {
        let err = load("{\"a\": [1, 2,]}").unwrap_err();
        assert!(err.message.starts_with("JSON syntax error"), "{err:?}");
        assert_eq!(err.path, vec![Seg::Key("a".into()), Seg::Index(2)]);
        assert_eq!(err.mark, Some(Mark { line: 1, column: 13 }));
        assert!(load("{} x").is_err());
    }

    #[test]
    fn deep_nesting() {
        let deep = format!("{{\"a\":{}", "[".repeat(100_000));
        let err = load(&deep).unwrap_err();
        assert!(err.message.contains("deeper than 64"), "{err:?}");
    }
}
