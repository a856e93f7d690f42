//! The ONNX protobuf messages Kiln writes, and a minimal protobuf encoder for them.
//!
//! Only the fields an inference graph needs are modelled: [`ModelProto`] with its
//! [`GraphProto`] of [`NodeProto`]s, [`AttributeProto`]s, initializer [`TensorProto`]s and
//! [`ValueInfoProto`] inputs and outputs (see `onnx/onnx.proto` for the full schema; field numbers
//! are quoted beside each field below).
//!
//! Encoding follows the protobuf wire format: every field is a key `(field_number << 3) |
//! wire_type` as a varint, then a varint (wire type 0), four little-endian bytes (type 5), or a
//! varint length and that many bytes (type 2: strings, bytes, nested messages). `onnx.proto` is
//! `proto2`, so repeated integers are written unpacked (one key per element), and fields come in
//! field-number order — the bytes are the ones Python's `onnx` package serializes for the same
//! message. An optional string field is written when it is non-empty.
//!
//! Tensor data goes in `raw_data` (little-endian) and is never copied into the encoded buffer:
//! [`ModelProto::encoded_len`] is known before anything is written, and
//! [`ModelProto::write_to`] streams the weights straight from the tensors.

use std::io::{self, Write};

use super::error::OnnxError;

/// The largest message protobuf parsers accept (2³¹ − 1 bytes): onnxruntime and `onnx` refuse
/// bigger files unless the weights are stored as external data.
pub const PROTOBUF_LIMIT: u64 = i32::MAX as u64;

/// `TensorProto.DataType` values used here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum DataType {
    /// 32-bit float (`FLOAT` = 1).
    Float = 1,
    /// 64-bit signed integer (`INT64` = 7).
    Int64 = 7,
    /// Boolean (`BOOL` = 9).
    Bool = 9,
}

/// A tensor's values, stored little-endian in `raw_data`.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    /// `FLOAT` values.
    F32(Vec<f32>),
    /// `INT64` values.
    I64(Vec<i64>),
}

impl TensorData {
    /// The element type.
    pub fn data_type(&self) -> DataType {
        match self {
            TensorData::F32(_) => DataType::Float,
            TensorData::I64(_) => DataType::Int64,
        }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `TensorProto`: a named constant tensor (an initializer or an attribute value).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorProto {
    /// `dims` (1).
    pub dims: Vec<i64>,
    /// `name` (8).
    pub name: String,
    /// `data_type` (2) and `raw_data` (9).
    pub data: TensorData,
}

/// `AttributeProto`'s value and its `type` (20).
#[derive(Clone, Debug, PartialEq)]
pub enum AttributeValue {
    /// `f` (2), type `FLOAT` = 1.
    Float(f32),
    /// `i` (3), type `INT` = 2.
    Int(i64),
    /// `s` (4), type `STRING` = 3.
    String(String),
    /// `t` (5), type `TENSOR` = 4.
    Tensor(TensorProto),
    /// `floats` (7), type `FLOATS` = 6.
    Floats(Vec<f32>),
    /// `ints` (8), type `INTS` = 7.
    Ints(Vec<i64>),
}

/// `AttributeProto`: a named operator attribute.
#[derive(Clone, Debug, PartialEq)]
pub struct AttributeProto {
    /// `name` (1).
    pub name: String,
    /// The value.
    pub value: AttributeValue,
}

impl AttributeProto {
    /// An `INT` attribute.
    pub fn int(name: &str, v: i64) -> Self {
        Self {
            name: name.into(),
            value: AttributeValue::Int(v),
        }
    }

    /// A `FLOAT` attribute.
    pub fn float(name: &str, v: f32) -> Self {
        Self {
            name: name.into(),
            value: AttributeValue::Float(v),
        }
    }

    /// An `INTS` attribute.
    pub fn ints(name: &str, v: &[i64]) -> Self {
        Self {
            name: name.into(),
            value: AttributeValue::Ints(v.to_vec()),
        }
    }
}

/// `NodeProto`: one operator application.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeProto {
    /// `input` (1): value names; an empty name is an omitted optional input.
    pub inputs: Vec<String>,
    /// `output` (2).
    pub outputs: Vec<String>,
    /// `name` (3).
    pub name: String,
    /// `op_type` (4).
    pub op_type: String,
    /// `attribute` (5).
    pub attributes: Vec<AttributeProto>,
    /// `domain` (7); empty for the default `ai.onnx` domain.
    pub domain: String,
}

/// One dimension of a `TensorShapeProto`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    /// `dim_value` (1): a fixed size.
    Value(i64),
    /// `dim_param` (2): a named symbolic size (dynamic axis).
    Param(String),
}

/// `ValueInfoProto`: a graph input or output, typed as a tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueInfoProto {
    /// `name` (1).
    pub name: String,
    /// `type.tensor_type.elem_type`.
    pub elem_type: DataType,
    /// `type.tensor_type.shape`, when known.
    pub shape: Option<Vec<Dim>>,
}

/// `GraphProto`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GraphProto {
    /// `node` (1), in topological order.
    pub nodes: Vec<NodeProto>,
    /// `name` (2).
    pub name: String,
    /// `initializer` (5).
    pub initializers: Vec<TensorProto>,
    /// `doc_string` (10).
    pub doc_string: String,
    /// `input` (11).
    pub inputs: Vec<ValueInfoProto>,
    /// `output` (12).
    pub outputs: Vec<ValueInfoProto>,
}

/// `OperatorSetIdProto`: an operator set the model uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorSetId {
    /// `domain` (1), always written (`""` is the default `ai.onnx` domain).
    pub domain: String,
    /// `version` (2).
    pub version: i64,
}

/// `ModelProto`: the file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModelProto {
    /// `ir_version` (1).
    pub ir_version: i64,
    /// `producer_name` (2).
    pub producer_name: String,
    /// `producer_version` (3).
    pub producer_version: String,
    /// `doc_string` (6).
    pub doc_string: String,
    /// `graph` (7).
    pub graph: GraphProto,
    /// `opset_import` (8).
    pub opset_import: Vec<OperatorSetId>,
    /// `metadata_props` (14): key/value strings.
    pub metadata_props: Vec<(String, String)>,
}

impl ModelProto {
    /// The encoding's pieces (metadata bytes and borrowed tensor data).
    fn encoded(&self) -> Encoder<'_> {
        let mut e = Encoder::default();
        self.encode(&mut e);
        e
    }

    /// Size of the encoded message in bytes.
    pub fn encoded_len(&self) -> u64 {
        self.encoded().len()
    }

    /// The encoded message, or [`OnnxError::TooLarge`] past the 2 GiB protobuf limit.
    pub fn to_bytes(&self) -> Result<Vec<u8>, OnnxError> {
        let e = self.encoded();
        check_size(e.len())?;
        let mut out = Vec::with_capacity(e.len() as usize);
        e.write_to(&mut out)
            .expect("writing to a Vec<u8> cannot fail");
        Ok(out)
    }

    /// Streams the encoded message to `out` (the size is checked before anything is written).
    pub fn write_to(&self, out: &mut dyn Write) -> Result<(), OnnxError> {
        let e = self.encoded();
        check_size(e.len())?;
        e.write_to(out).map_err(OnnxError::Write)
    }

    /// Writes the file atomically ([`crate::atomic`]): readers see the old file or the new one.
    /// Nothing is written if the model is too large.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<(), OnnxError> {
        let path = path.as_ref();
        let e = self.encoded();
        check_size(e.len())?;
        crate::atomic::write_with(path, |w| e.write_to(w)).map_err(|source| OnnxError::Io {
            path: path.to_owned(),
            source,
        })
    }
}

pub(crate) fn check_size(bytes: u64) -> Result<(), OnnxError> {
    if bytes > PROTOBUF_LIMIT {
        return Err(OnnxError::TooLarge {
            bytes,
            limit: PROTOBUF_LIMIT,
        });
    }
    Ok(())
}

// --- Wire format ------------------------------------------------------------------------------

const VARINT: u32 = 0;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// A piece of the encoding: bytes, or tensor values written little-endian when streamed.
#[derive(Debug)]
enum Chunk<'a> {
    Bytes(Vec<u8>),
    F32(&'a [f32]),
}

/// Protobuf encoder whose output is a list of chunks, so nested messages know their length
/// without the tensor data being copied.
#[derive(Debug, Default)]
pub(crate) struct Encoder<'a> {
    chunks: Vec<Chunk<'a>>,
    buf: Vec<u8>,
    /// Bytes in `chunks` (not counting `buf`).
    chunked: u64,
}

impl<'a> Encoder<'a> {
    /// Total encoded length.
    fn len(&self) -> u64 {
        self.chunked + self.buf.len() as u64
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    fn key(&mut self, field: u32, wire: u32) {
        self.varint(u64::from(field << 3 | wire));
    }

    /// An `int32`/`int64`/enum field (negative values take ten bytes, as protobuf does).
    fn int(&mut self, field: u32, v: i64) {
        self.key(field, VARINT);
        self.varint(v as u64);
    }

    fn float(&mut self, field: u32, v: f32) {
        self.key(field, FIXED32);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn bytes(&mut self, field: u32, v: &[u8]) {
        self.key(field, LEN);
        self.varint(v.len() as u64);
        self.buf.extend_from_slice(v);
    }

    /// A string field, always written.
    fn string(&mut self, field: u32, v: &str) {
        self.bytes(field, v.as_bytes());
    }

    /// An optional string field, written when non-empty.
    fn opt_string(&mut self, field: u32, v: &str) {
        if !v.is_empty() {
            self.string(field, v);
        }
    }

    /// A nested message.
    fn message(&mut self, field: u32, encode: impl FnOnce(&mut Encoder<'a>)) {
        let mut sub = Encoder::default();
        encode(&mut sub);
        self.key(field, LEN);
        self.varint(sub.len());
        self.append(sub);
    }

    /// A `bytes` field holding `values` little-endian, borrowed until written.
    fn f32_bytes(&mut self, field: u32, values: &'a [f32]) {
        self.key(field, LEN);
        self.varint(4 * values.len() as u64);
        if values.len() <= 64 {
            for v in values {
                self.buf.extend_from_slice(&v.to_le_bytes());
            }
        } else {
            self.flush();
            self.chunks.push(Chunk::F32(values));
            self.chunked += 4 * values.len() as u64;
        }
    }

    fn flush(&mut self) {
        if !self.buf.is_empty() {
            self.chunked += self.buf.len() as u64;
            self.chunks
                .push(Chunk::Bytes(std::mem::take(&mut self.buf)));
        }
    }

    fn append(&mut self, mut sub: Encoder<'a>) {
        sub.flush();
        for chunk in sub.chunks {
            match chunk {
                Chunk::Bytes(b) => self.buf.extend_from_slice(&b),
                Chunk::F32(values) => {
                    self.flush();
                    self.chunked += 4 * values.len() as u64;
                    self.chunks.push(Chunk::F32(values));
                }
            }
        }
    }

    fn write_to(mut self, out: &mut dyn Write) -> io::Result<()> {
        self.flush();
        let mut scratch = Vec::new();
        for chunk in &self.chunks {
            match chunk {
                Chunk::Bytes(b) => out.write_all(b)?,
                Chunk::F32(values) => {
                    for part in values.chunks(1 << 14) {
                        scratch.clear();
                        scratch.extend(part.iter().flat_map(|v| v.to_le_bytes()));
                        out.write_all(&scratch)?;
                    }
                }
            }
        }
        Ok(())
    }
}

/// Encoding of a message into an [`Encoder`].
pub(crate) trait Encode {
    /// Appends the message's fields.
    fn encode<'a>(&'a self, e: &mut Encoder<'a>);

    /// The message's bytes (tensor data included), for tests and small messages.
    #[cfg(test)]
    fn encode_to_vec(&self) -> Vec<u8> {
        let mut e = Encoder::default();
        self.encode(&mut e);
        let mut out = Vec::new();
        e.write_to(&mut out)
            .expect("writing to a Vec<u8> cannot fail");
        out
    }
}

impl Encode for TensorProto {
    fn encode<'a>(&'a self, e: &mut Encoder<'a>) {
        for &d in &self.dims {
            e.int(1, d);
        }
        e.int(2, self.data.data_type() as i64);
        e.opt_string(8, &self.name);
        match &self.data {
            TensorData::F32(v) => e.f32_bytes(9, v),
            TensorData::I64(v) => {
                let raw: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                e.bytes(9, &raw);
            }
        }
    }
}

impl Encode for AttributeProto {
    fn encode<'a>(&'a self, e: &mut Encoder<'a>) {
        e.string(1, &self.name);
        let ty = match &self.value {
            AttributeValue::Float(v) => {
                e.float(2, *v);
                1
            }
            AttributeValue::Int(v) => {
                e.int(3, *v);
                2
            }
            AttributeValue::String(v) => {
                e.string(4, v);
                3
            }
            AttributeValue::Tensor(t) => {
                e.message(5, |e| t.encode(e));
                4
            }
            AttributeValue::Floats(v) => {
                for &x in v {
                    e.float(7, x);
                }
                6
            }
            AttributeValue::Ints(v) => {
                for &x in v {
                    e.int(8, x);
                }
                7
            }
        };
        e.int(20, ty);
    }
}

impl Encode for NodeProto {
    fn encode<'a>(&'a self, e: &mut Encoder<'a>) {
        for s in &self.inputs {
            e.string(1, s);
        }
        for s in &self.outputs {
            e.string(2, s);
        }
        e.opt_string(3, &self.name);
        e.string(4, &self.op_type);
        for a in &self.attributes {
            e.message(5, |e| a.encode(e));
        }
        e.opt_string(7, &self.domain);
    }
}

impl Encode for ValueInfoProto {
    fn encode<'a>(&'a self, e: &mut Encoder<'a>) {
        e.string(1, &self.name);
        // TypeProto { tensor_type (1): TypeProto.Tensor { elem_type (1), shape (2) } }
        e.message(2, |e| {
            e.message(1, |e| {
                e.int(1, self.elem_type as i64);
                if let Some(dims) = &self.shape {
                    // TensorShapeProto { dim (1): Dimension { dim_value (1) | dim_param (2) } }
                    e.message(2, |e| {
                        for d in dims {
                            e.message(1, |e| match d {
                                Dim::Value(v) => e.int(1, *v),
                                Dim::Param(p) => e.string(2, p),
                            });
                        }
                    });
                }
            });
        });
    }
}

impl Encode for GraphProto {
    fn encode<'a>(&'a self, e: &mut Encoder<'a>) {
        for n in &self.nodes {
            e.message(1, |e| n.encode(e));
        }
        e.opt_string(2, &self.name);
        for t in &self.initializers {
            e.message(5, |e| t.encode(e));
        }
        e.opt_string(10, &self.doc_string);
        for v in &self.inputs {
            e.message(11, |e| v.encode(e));
        }
        for v in &self.outputs {
            e.message(12, |e| v.encode(e));
        }
    }
}

impl Encode for ModelProto {
    fn encode<'a>(&'a self, e: &mut Encoder<'a>) {
        e.int(1, self.ir_version);
        e.opt_string(2, &self.producer_name);
        e.opt_string(3, &self.producer_version);
        e.opt_string(6, &self.doc_string);
        e.message(7, |e| self.graph.encode(e));
        for o in &self.opset_import {
            e.message(8, |e| {
                e.string(1, &o.domain);
                e.int(2, o.version);
            });
        }
        for (k, v) in &self.metadata_props {
            // StringStringEntryProto { key (1), value (2) }
            e.message(14, |e| {
                e.string(1, k);
                e.string(2, v);
            });
        }
    }
}
