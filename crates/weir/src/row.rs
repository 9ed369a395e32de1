//! Dynamic records for YAML jobs: a row of a few typed values, inline (no heap allocation for
//! rows of up to three numeric fields).

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// One field of a [`Row`].
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub enum Value {
    /// Missing.
    #[default]
    Null,
    /// A 64-bit integer.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// A string (shared: cloning does not copy it; a thin pointer keeps `Value` at 16 bytes).
    Str(Arc<String>),
    /// A vector of floats (points, embeddings).
    Vector(Arc<Vec<f32>>),
    /// An image (f32 values, channels interleaved).
    Image(Arc<weir_gpu::kernels::Image>),
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Null, Value::Null) => true,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Float(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Vector(a), Value::Vector(b)) => a.iter().map(|x| x.to_bits()).eq(b.iter().map(|x| x.to_bits())),
            (Value::Image(a), Value::Image(b)) => a == b,
            _ => false,
        }
    }
}

impl Eq for Value {}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Value::Null => state.write_u8(0),
            Value::Int(i) => state.write_i64(*i),
            Value::Float(f) => state.write_u64(f.to_bits() ^ 0x5555),
            Value::Str(s) => state.write(s.as_bytes()),
            Value::Vector(v) => v.iter().for_each(|x| state.write_u32(x.to_bits())),
            Value::Image(i) => {
                state.write_usize(i.w);
                state.write_usize(i.h);
                state.write_usize(i.c);
            }
        }
    }
}

impl Value {
    /// A string value.
    pub fn text(s: impl Into<String>) -> Value {
        Value::Str(Arc::new(s.into()))
    }

    /// As a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }

    /// The type's name, for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "string",
            Value::Vector(_) => "vector",
            Value::Image(_) => "image",
        }
    }

    /// Append the value as text (for CSV output).
    pub fn write_to(&self, out: &mut Vec<u8>) {
        use std::io::Write;
        match self {
            Value::Null => {}
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::Float(f) => {
                let _ = write!(out, "{f}");
            }
            Value::Str(s) => out.extend_from_slice(s.as_bytes()),
            Value::Image(i) => {
                let _ = write!(out, "<image {}x{}x{}>", i.w, i.h, i.c);
            }
            Value::Vector(v) => {
                for (i, x) in v.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    let _ = write!(out, "{x}");
                }
            }
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut b = Vec::new();
        self.write_to(&mut b);
        f.write_str(&String::from_utf8_lossy(&b))
    }
}

/// A record of a YAML job: fields by position; names live in the job's schema.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct Row(pub SmallVec<[Value; 3]>);

impl Row {
    /// A row of these values.
    pub fn new(values: impl IntoIterator<Item = Value>) -> Self {
        Row(values.into_iter().collect())
    }

    /// Field `i`.
    pub fn get(&self, i: usize) -> &Value {
        self.0.get(i).unwrap_or(&Value::Null)
    }

    /// Append as a CSV line (fields joined by commas, newline-terminated).
    pub fn write_csv(&self, out: &mut Vec<u8>) {
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            v.write_to(out);
        }
        out.push(b'\n');
    }
}
