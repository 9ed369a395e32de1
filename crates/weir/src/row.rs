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

    /// Append as one RFC 4180 CSV record (csv-core's encoder): a field holding a comma, a
    /// quote, CR or LF is quoted with its quotes doubled; a record of one empty field is written
    /// `""`, since an empty line reads as no record; records end with LF. Allocates nothing
    /// beyond `out`'s growth.
    pub fn write_csv(&self, out: &mut Vec<u8>) {
        // A 300-byte table on the stack: cheaper than keeping an encoder beside every buffer.
        let mut csv = csv_core::Writer::new();
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                let (_, n) = csv.delimiter(room(out, 2));
                out.truncate(out.len() - 2 + n);
            }
            // At most two bytes out per byte in (a doubled quote), plus the opening quote.
            let start = out.len();
            let (res, n) = match v {
                Value::Str(s) => {
                    let (res, _, n) = csv.field(s.as_bytes(), room(out, 2 * s.len() + 2));
                    (res, n)
                }
                other => {
                    // Quoting needs the whole field (a vector's text holds commas): format it at
                    // the end of `out`, encode it from there, and move the result back.
                    other.write_to(out);
                    let mid = out.len();
                    room(out, 2 * (mid - start) + 2);
                    let (text, dest) = out.split_at_mut(mid);
                    let (res, _, n) = csv.field(&text[start..], dest);
                    out.copy_within(mid..mid + n, start);
                    (res, n)
                }
            };
            debug_assert_eq!(res, csv_core::WriteResult::InputEmpty);
            out.truncate(start + n);
        }
        // The closing quote, `""` for a lone empty field, and the newline.
        let (_, n) = csv.terminator(room(out, 4));
        out.truncate(out.len() - 4 + n);
    }
}

/// Grow `out` by `n` zeroed bytes and return them, for an encoder to write into.
fn room(out: &mut Vec<u8>, n: usize) -> &mut [u8] {
    let start = out.len();
    out.resize(start + n, 0);
    &mut out[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every record `write_csv` writes reads back, with the csv crate, as the fields' text.
    #[test]
    fn csv_round_trips_through_a_reader() {
        let awkward = ["a,b", "say \"hi\"", "two\nlines", "cr\rlf\r\n", "", " padded ", "\"", ",", "plain", "ünï"];
        let mut rows = Vec::new();
        for s in awkward {
            rows.push(Row::new([Value::text(s)]));
            rows.push(Row::new([Value::Int(-7), Value::text(s), Value::Float(2.5)]));
        }
        rows.push(Row::new([Value::Null, Value::Vector(Arc::new(vec![1.5, -2.0, 3.0])), Value::text("x")]));
        let mut out = Vec::new();
        for r in &rows {
            r.write_csv(&mut out);
        }
        let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(&out[..]);
        let read: Vec<Vec<String>> = reader.records().map(|r| r.unwrap().iter().map(str::to_string).collect()).collect();
        let want: Vec<Vec<String>> = rows.iter().map(|r| r.0.iter().map(|v| v.to_string()).collect()).collect();
        assert_eq!(read, want);
    }

    #[test]
    fn csv_quotes_only_what_needs_it() {
        let mut out = Vec::new();
        Row::new([Value::Int(1), Value::text("a\"b"), Value::Vector(Arc::new(vec![1.0, 2.0]))]).write_csv(&mut out);
        Row::new([Value::text("")]).write_csv(&mut out);
        Row::new([Value::Int(3), Value::Float(0.5)]).write_csv(&mut out);
        assert_eq!(String::from_utf8(out).unwrap(), "1,\"a\"\"b\",\"1,2\"\n\"\"\n3,0.5\n");
    }
}
