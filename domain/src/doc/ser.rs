//! A serde `Serializer` that builds an ordered [`Node`] tree (struct fields keep their
//! declaration order, unlike `serde_json::Value` whose maps are sorted).

use core::fmt;

use serde::ser::{self, Serialize};

use super::{Entry, Node, Value};

/// Serialization failed (only for shapes a definition never has, such as non-string keys).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct SerError(String);

impl ser::Error for SerError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

/// Serializes any value into a tree.
pub(crate) fn to_node<T: Serialize + ?Sized>(value: &T) -> Result<Node, SerError> {
    value.serialize(NodeSerializer)
}

fn node(value: Value) -> Node {
    Node::new(value, None)
}

struct NodeSerializer;

/// Collects sequence elements.
pub(crate) struct SeqBuilder {
    items: Vec<Node>,
    variant: Option<&'static str>,
}

/// Collects mapping entries.
pub(crate) struct MapBuilder {
    entries: Vec<Entry>,
    key: Option<String>,
    variant: Option<&'static str>,
}

fn wrap(variant: Option<&'static str>, inner: Node) -> Node {
    match variant {
        None => inner,
        Some(name) => node(Value::Map(vec![Entry { key: name.to_owned(), key_mark: None, value: inner }])),
    }
}

impl ser::Serializer for NodeSerializer {
    type Ok = Node;
    type Error = SerError;
    type SerializeSeq = SeqBuilder;
    type SerializeTuple = SeqBuilder;
    type SerializeTupleStruct = SeqBuilder;
    type SerializeTupleVariant = SeqBuilder;
    type SerializeMap = MapBuilder;
    type SerializeStruct = MapBuilder;
    type SerializeStructVariant = MapBuilder;

    fn serialize_bool(self, v: bool) -> Result<Node, SerError> {
        Ok(node(Value::Bool(v)))
    }
    fn serialize_i8(self, v: i8) -> Result<Node, SerError> {
        Ok(node(Value::Int(v.into())))
    }
    fn serialize_i16(self, v: i16) -> Result<Node, SerError> {
        Ok(node(Value::Int(v.into())))
    }
    fn serialize_i32(self, v: i32) -> Result<Node, SerError> {
        Ok(node(Value::Int(v.into())))
    }
    fn serialize_i64(self, v: i64) -> Result<Node, SerError> {
        Ok(node(Value::Int(v)))
    }
    fn serialize_u8(self, v: u8) -> Result<Node, SerError> {
        Ok(node(Value::Int(v.into())))
    }
    fn serialize_u16(self, v: u16) -> Result<Node, SerError> {
        Ok(node(Value::Int(v.into())))
    }
    fn serialize_u32(self, v: u32) -> Result<Node, SerError> {
        Ok(node(Value::Int(v.into())))
    }
    fn serialize_u64(self, v: u64) -> Result<Node, SerError> {
        Ok(node(i64::try_from(v).map_or(Value::UInt(v), Value::Int)))
    }
    fn serialize_f32(self, v: f32) -> Result<Node, SerError> {
        Ok(node(Value::Float(v.into())))
    }
    fn serialize_f64(self, v: f64) -> Result<Node, SerError> {
        Ok(node(Value::Float(v)))
    }
    fn serialize_char(self, v: char) -> Result<Node, SerError> {
        Ok(node(Value::Str(v.to_string())))
    }
    fn serialize_str(self, v: &str) -> Result<Node, SerError> {
        Ok(node(Value::Str(v.to_owned())))
    }
    fn serialize_bytes(self, v: &[u8]) -> Result<Node, SerError> {
        Ok(node(Value::Seq(v.iter().map(|b| node(Value::Int((*b).into()))).collect())))
    }
    fn serialize_none(self) -> Result<Node, SerError> {
        Ok(node(Value::Null))
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<Node, SerError> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<Node, SerError> {
        Ok(node(Value::Null))
    }
    fn serialize_unit_struct(self, _name: &'static str) -> Result<Node, SerError> {
        Ok(node(Value::Null))
    }
    fn serialize_unit_variant(self, _name: &'static str, _index: u32, variant: &'static str) -> Result<Node, SerError> {
        Ok(node(Value::Str(variant.to_owned())))
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _name: &'static str, value: &T) -> Result<Node, SerError> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<Node, SerError> {
        Ok(wrap(Some(variant), value.serialize(self)?))
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<SeqBuilder, SerError> {
        Ok(SeqBuilder { items: Vec::with_capacity(len.unwrap_or(0)), variant: None })
    }
    fn serialize_tuple(self, len: usize) -> Result<SeqBuilder, SerError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_struct(self, _name: &'static str, len: usize) -> Result<SeqBuilder, SerError> {
        self.serialize_seq(Some(len))
    }
    fn serialize_tuple_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<SeqBuilder, SerError> {
        Ok(SeqBuilder { items: Vec::with_capacity(len), variant: Some(variant) })
    }
    fn serialize_map(self, _len: Option<usize>) -> Result<MapBuilder, SerError> {
        Ok(MapBuilder { entries: Vec::new(), key: None, variant: None })
    }
    fn serialize_struct(self, _name: &'static str, _len: usize) -> Result<MapBuilder, SerError> {
        self.serialize_map(None)
    }
    fn serialize_struct_variant(
        self,
        _name: &'static str,
        _index: u32,
        variant: &'static str,
        _len: usize,
    ) -> Result<MapBuilder, SerError> {
        Ok(MapBuilder { entries: Vec::new(), key: None, variant: Some(variant) })
    }
}

impl SeqBuilder {
    fn push<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        self.items.push(to_node(value)?);
        Ok(())
    }
    fn finish(self) -> Node {
        wrap(self.variant, node(Value::Seq(self.items)))
    }
}

impl ser::SerializeSeq for SeqBuilder {
    type Ok = Node;
    type Error = SerError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        self.push(value)
    }
    fn end(self) -> Result<Node, SerError> {
        Ok(self.finish())
    }
}

impl ser::SerializeTuple for SeqBuilder {
    type Ok = Node;
    type Error = SerError;
    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        self.push(value)
    }
    fn end(self) -> Result<Node, SerError> {
        Ok(self.finish())
    }
}

impl ser::SerializeTupleStruct for SeqBuilder {
    type Ok = Node;
    type Error = SerError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        self.push(value)
    }
    fn end(self) -> Result<Node, SerError> {
        Ok(self.finish())
    }
}

impl ser::SerializeTupleVariant for SeqBuilder {
    type Ok = Node;
    type Error = SerError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        self.push(value)
    }
    fn end(self) -> Result<Node, SerError> {
        Ok(self.finish())
    }
}

impl MapBuilder {
    fn field<T: Serialize + ?Sized>(&mut self, key: &str, value: &T) -> Result<(), SerError> {
        self.entries.push(Entry { key: key.to_owned(), key_mark: None, value: to_node(value)? });
        Ok(())
    }
    fn finish(self) -> Node {
        wrap(self.variant, node(Value::Map(self.entries)))
    }
}

impl ser::SerializeMap for MapBuilder {
    type Ok = Node;
    type Error = SerError;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), SerError> {
        let key = match to_node(key)?.value {
            Value::Str(s) => s,
            Value::Int(i) => i.to_string(),
            Value::UInt(u) => u.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => return Err(SerError("mapping keys must be strings".to_owned())),
        };
        self.key = Some(key);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), SerError> {
        let key = self.key.take().ok_or_else(|| SerError("value without a key".to_owned()))?;
        self.field(&key, value)
    }
    fn end(self) -> Result<Node, SerError> {
        Ok(self.finish())
    }
}

impl ser::SerializeStruct for MapBuilder {
    type Ok = Node;
    type Error = SerError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), SerError> {
        self.field(key, value)
    }
    fn end(self) -> Result<Node, SerError> {
        Ok(self.finish())
    }
}

impl ser::SerializeStructVariant for MapBuilder {
    type Ok = Node;
    type Error = SerError;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, key: &'static str, value: &T) -> Result<(), SerError> {
        self.field(key, value)
    }
    fn end(self) -> Result<Node, SerError> {
        Ok(self.finish())
    }
}
