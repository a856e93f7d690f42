//! Typed metadata values: the thirteen GGUF value types, scalars and (nested) arrays.

// Metadata values

pub(crate) const T_U8: u32 = 0;
pub(crate) const T_I8: u32 = 1;
pub(crate) const T_U16: u32 = 2;
pub(crate) const T_I16: u32 = 3;
pub(crate) const T_U32: u32 = 4;
pub(crate) const T_I32: u32 = 5;
pub(crate) const T_F32: u32 = 6;
pub(crate) const T_BOOL: u32 = 7;
pub(crate) const T_STRING: u32 = 8;
pub(crate) const T_ARRAY: u32 = 9;
pub(crate) const T_U64: u32 = 10;
pub(crate) const T_I64: u32 = 11;
pub(crate) const T_F64: u32 = 12;

/// GGUF spec name of a value type id (`"?"` if unknown).
pub(crate) fn value_type_name(ty: u32) -> &'static str {
    match ty {
        T_U8 => "UINT8",
        T_I8 => "INT8",
        T_U16 => "UINT16",
        T_I16 => "INT16",
        T_U32 => "UINT32",
        T_I32 => "INT32",
        T_F32 => "FLOAT32",
        T_BOOL => "BOOL",
        T_STRING => "STRING",
        T_ARRAY => "ARRAY",
        T_U64 => "UINT64",
        T_I64 => "INT64",
        T_F64 => "FLOAT64",
        _ => "?",
    }
}

/// Smallest encoded size of one value of type `ty` (None if unknown).
pub(crate) fn min_value_size(ty: u32) -> Option<u64> {
    Some(match ty {
        T_U8 | T_I8 | T_BOOL => 1,
        T_U16 | T_I16 => 2,
        T_U32 | T_I32 | T_F32 => 4,
        T_U64 | T_I64 | T_F64 => 8,
        T_STRING => 8,
        T_ARRAY => 12,
        _ => return None,
    })
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    /// UINT8.
    U8(u8),
    /// INT8.
    I8(i8),
    /// UINT16.
    U16(u16),
    /// INT16.
    I16(i16),
    /// UINT32.
    U32(u32),
    /// INT32.
    I32(i32),
    /// FLOAT32.
    F32(f32),
    /// BOOL.
    Bool(bool),
    /// STRING (UTF-8).
    String(String),
    /// ARRAY (homogeneous, typed).
    Array(GgufArray),
    /// UINT64.
    U64(u64),
    /// INT64.
    I64(i64),
    /// FLOAT64.
    F64(f64),
}

impl GgufValue {
    /// GGUF type id of this value.
    pub(crate) fn type_id(&self) -> u32 {
        match self {
            Self::U8(_) => T_U8,
            Self::I8(_) => T_I8,
            Self::U16(_) => T_U16,
            Self::I16(_) => T_I16,
            Self::U32(_) => T_U32,
            Self::I32(_) => T_I32,
            Self::F32(_) => T_F32,
            Self::Bool(_) => T_BOOL,
            Self::String(_) => T_STRING,
            Self::Array(_) => T_ARRAY,
            Self::U64(_) => T_U64,
            Self::I64(_) => T_I64,
            Self::F64(_) => T_F64,
        }
    }

    /// GGUF type name, e.g. `"UINT32"`, `"STRING"`, `"ARRAY<INT32>"`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Array(a) => a.type_name(),
            v => value_type_name(v.type_id()),
        }
    }

    /// The value as `u64` if it is an integer (of any width/sign) that fits.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as `i64` if it is an integer (of any width/sign) that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => i64::try_from(v).ok(),
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => None,
        }
    }

    /// The value as `f64` if it is a FLOAT32 or FLOAT64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The string if this is a STRING.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    /// The flag if this is a BOOL.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The array if this is an ARRAY.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            Self::Array(a) => Some(a),
            _ => None,
        }
    }

    /// True if this value is an integer of any width or sign.
    pub(crate) fn is_integer(&self) -> bool {
        matches!(
            self,
            Self::U8(_)
                | Self::I8(_)
                | Self::U16(_)
                | Self::I16(_)
                | Self::U32(_)
                | Self::I32(_)
                | Self::U64(_)
                | Self::I64(_)
        )
    }

    /// The value formatted for error messages (integers and floats only).
    pub(crate) fn display_scalar(&self) -> String {
        match *self {
            Self::U8(v) => v.to_string(),
            Self::I8(v) => v.to_string(),
            Self::U16(v) => v.to_string(),
            Self::I16(v) => v.to_string(),
            Self::U32(v) => v.to_string(),
            Self::I32(v) => v.to_string(),
            Self::U64(v) => v.to_string(),
            Self::I64(v) => v.to_string(),
            Self::F32(v) => v.to_string(),
            Self::F64(v) => v.to_string(),
            _ => self.type_name().to_owned(),
        }
    }
}

/// A metadata array: one typed vector per element type, so large token and
/// merge lists load as a single allocation of `String`s or integers.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufArray {
    /// Array of UINT8.
    U8(Vec<u8>),
    /// Array of INT8.
    I8(Vec<i8>),
    /// Array of UINT16.
    U16(Vec<u16>),
    /// Array of INT16.
    I16(Vec<i16>),
    /// Array of UINT32.
    U32(Vec<u32>),
    /// Array of INT32.
    I32(Vec<i32>),
    /// Array of FLOAT32.
    F32(Vec<f32>),
    /// Array of BOOL.
    Bool(Vec<bool>),
    /// Array of STRING.
    String(Vec<String>),
    /// Array of arrays (each inner array has its own element type).
    Array(Vec<GgufArray>),
    /// Array of UINT64.
    U64(Vec<u64>),
    /// Array of INT64.
    I64(Vec<i64>),
    /// Array of FLOAT64.
    F64(Vec<f64>),
}

impl GgufArray {
    /// GGUF type id of the elements.
    pub(crate) fn elem_type_id(&self) -> u32 {
        match self {
            Self::U8(_) => T_U8,
            Self::I8(_) => T_I8,
            Self::U16(_) => T_U16,
            Self::I16(_) => T_I16,
            Self::U32(_) => T_U32,
            Self::I32(_) => T_I32,
            Self::F32(_) => T_F32,
            Self::Bool(_) => T_BOOL,
            Self::String(_) => T_STRING,
            Self::Array(_) => T_ARRAY,
            Self::U64(_) => T_U64,
            Self::I64(_) => T_I64,
            Self::F64(_) => T_F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F64(v) => v.len(),
        }
    }

    /// True if the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// GGUF type name of the elements, e.g. `"STRING"`.
    pub fn elem_type_name(&self) -> &'static str {
        value_type_name(self.elem_type_id())
    }

    /// GGUF type name of the whole array, e.g. `"ARRAY<STRING>"`.
    pub fn type_name(&self) -> &'static str {
        match self.elem_type_id() {
            T_U8 => "ARRAY<UINT8>",
            T_I8 => "ARRAY<INT8>",
            T_U16 => "ARRAY<UINT16>",
            T_I16 => "ARRAY<INT16>",
            T_U32 => "ARRAY<UINT32>",
            T_I32 => "ARRAY<INT32>",
            T_F32 => "ARRAY<FLOAT32>",
            T_BOOL => "ARRAY<BOOL>",
            T_STRING => "ARRAY<STRING>",
            T_ARRAY => "ARRAY<ARRAY>",
            T_U64 => "ARRAY<UINT64>",
            T_I64 => "ARRAY<INT64>",
            _ => "ARRAY<FLOAT64>",
        }
    }

    /// Element `index` as a standalone value (cloned), or None if out of range.
    pub fn get(&self, index: usize) -> Option<GgufValue> {
        Some(match self {
            Self::U8(v) => GgufValue::U8(*v.get(index)?),
            Self::I8(v) => GgufValue::I8(*v.get(index)?),
            Self::U16(v) => GgufValue::U16(*v.get(index)?),
            Self::I16(v) => GgufValue::I16(*v.get(index)?),
            Self::U32(v) => GgufValue::U32(*v.get(index)?),
            Self::I32(v) => GgufValue::I32(*v.get(index)?),
            Self::F32(v) => GgufValue::F32(*v.get(index)?),
            Self::Bool(v) => GgufValue::Bool(*v.get(index)?),
            Self::String(v) => GgufValue::String(v.get(index)?.clone()),
            Self::Array(v) => GgufValue::Array(v.get(index)?.clone()),
            Self::U64(v) => GgufValue::U64(*v.get(index)?),
            Self::I64(v) => GgufValue::I64(*v.get(index)?),
            Self::F64(v) => GgufValue::F64(*v.get(index)?),
        })
    }

    /// The elements if this is an array of STRING.
    pub fn as_strings(&self) -> Option<&[String]> {
        match self {
            Self::String(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if this is an array of INT32.
    pub fn as_i32s(&self) -> Option<&[i32]> {
        match self {
            Self::I32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if this is an array of UINT32.
    pub fn as_u32s(&self) -> Option<&[u32]> {
        match self {
            Self::U32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if this is an array of FLOAT32.
    pub fn as_f32s(&self) -> Option<&[f32]> {
        match self {
            Self::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The inner arrays if this is an array of ARRAY.
    pub fn as_arrays(&self) -> Option<&[GgufArray]> {
        match self {
            Self::Array(v) => Some(v),
            _ => None,
        }
    }
}
