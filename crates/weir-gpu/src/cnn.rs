//! A small CNN (conv 3×3 + ReLU → max-pool 2×2 → dense) loaded from safetensors.

use std::path::Path;

use crate::GpuError;

/// Weights and shape of the CNN, NCHW.
#[derive(Clone, Debug, PartialEq)]
pub struct SmallCnn {
    /// Input channels.
    pub in_c: usize,
    /// Input height (even).
    pub h: usize,
    /// Input width (even).
    pub w: usize,
    /// Convolution output channels.
    pub conv_c: usize,
    /// Classes.
    pub classes: usize,
    /// `[conv_c, in_c, 3, 3]`.
    pub conv_w: Vec<f32>,
    /// `[conv_c]`.
    pub conv_b: Vec<f32>,
    /// `[classes, conv_c · h/2 · w/2]`.
    pub dense_w: Vec<f32>,
    /// `[classes]`.
    pub dense_b: Vec<f32>,
    /// The `__metadata__` of the file.
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

fn bad(path: &Path, what: impl std::fmt::Display) -> GpuError {
    GpuError::Input(format!("model {}: {what}", path.display()))
}

impl SmallCnn {
    /// Load `conv.weight`, `conv.bias`, `dense.weight`, `dense.bias` (F32) from a safetensors
    /// file, for inputs of `h × w` pixels (the file does not say).
    pub fn load(path: &Path, h: usize, w: usize) -> Result<SmallCnn, GpuError> {
        let bytes = std::fs::read(path).map_err(|e| bad(path, e))?;
        if bytes.len() < 8 {
            return Err(bad(path, "truncated"));
        }
        let hlen = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let header: serde_json::Map<String, serde_json::Value> = bytes
            .get(8..8 + hlen)
            .ok_or_else(|| bad(path, "truncated header"))
            .and_then(|h| serde_json::from_slice(h).map_err(|e| bad(path, e)))?;
        let data = &bytes[8 + hlen..];
        let tensor = |name: &str| -> Result<(Vec<usize>, Vec<f32>), GpuError> {
            let t = header.get(name).ok_or_else(|| bad(path, format!("no tensor '{name}'")))?;
            if t["dtype"] != "F32" {
                return Err(bad(path, format!("{name}: dtype {} (F32 expected)", t["dtype"])));
            }
            let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).map_err(|e| bad(path, format!("{name}: {e}")))?;
            let off: [usize; 2] = serde_json::from_value(t["data_offsets"].clone()).map_err(|e| bad(path, format!("{name}: {e}")))?;
            let raw = data.get(off[0]..off[1]).ok_or_else(|| bad(path, format!("{name}: data out of bounds")))?;
            if raw.len() != shape.iter().product::<usize>() * 4 {
                return Err(bad(path, format!("{name}: {} bytes for shape {shape:?}", raw.len())));
            }
            Ok((shape, raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect()))
        };
        let (cws, conv_w) = tensor("conv.weight")?;
        let (_, conv_b) = tensor("conv.bias")?;
        let (dws, dense_w) = tensor("dense.weight")?;
        let (_, dense_b) = tensor("dense.bias")?;
        let [conv_c, in_c, 3, 3] = cws[..] else { return Err(bad(path, format!("conv.weight shape {cws:?}, [C, I, 3, 3] expected"))) };
        let features = conv_c * (h / 2) * (w / 2);
        if dws.len() != 2 || dws[1] != features || !h.is_multiple_of(2) || !w.is_multiple_of(2) || conv_b.len() != conv_c || dense_b.len() != dws[0] {
            return Err(bad(path, format!("dense.weight shape {dws:?} does not fit {conv_c} channels of {h}×{w} inputs")));
        }
        let metadata = header.get("__metadata__").and_then(|m| m.as_object().cloned()).unwrap_or_default();
        Ok(SmallCnn { in_c, h, w, conv_c, classes: dws[0], conv_w, conv_b, dense_w, dense_b, metadata })
    }

    /// Values per input image.
    pub fn input_len(&self) -> usize {
        self.in_c * self.h * self.w
    }
}

/// Index of the largest logit of each row of `logits` (`classes` per row).
pub fn argmax(logits: &[f32], classes: usize) -> Vec<usize> {
    logits
        .chunks(classes)
        .map(|r| r.iter().enumerate().fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b }).0)
        .collect()
}

impl SmallCnn {
    /// The model as a safetensors file: `conv.weight`, `conv.bias`, `dense.weight`, `dense.bias`
    /// (F32 little-endian, in that order, the shapes [`SmallCnn::load`] reads) and the
    /// `__metadata__`, the header padded with spaces to 8 bytes (as
    /// `scripts/train_digits_cnn.py` writes it).
    pub fn to_safetensors(&self) -> Vec<u8> {
        let features = self.conv_c * (self.h / 2) * (self.w / 2);
        let tensors: [(&str, Vec<usize>, &[f32]); 4] = [
            ("conv.weight", vec![self.conv_c, self.in_c, 3, 3], &self.conv_w),
            ("conv.bias", vec![self.conv_c], &self.conv_b),
            ("dense.weight", vec![self.classes, features], &self.dense_w),
            ("dense.bias", vec![self.classes], &self.dense_b),
        ];
        let mut header = serde_json::Map::new();
        let mut off = 0;
        for (name, shape, data) in &tensors {
            let end = off + data.len() * 4;
            header.insert((*name).into(), serde_json::json!({ "dtype": "F32", "shape": shape, "data_offsets": [off, end] }));
            off = end;
        }
        if !self.metadata.is_empty() {
            header.insert("__metadata__".into(), serde_json::Value::Object(self.metadata.clone()));
        }
        let mut json = serde_json::Value::Object(header).to_string().into_bytes();
        json.resize(json.len().next_multiple_of(8), b' ');
        let mut bytes = Vec::with_capacity(8 + json.len() + off);
        bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&json);
        for (_, _, data) in &tensors {
            bytes.extend(data.iter().flat_map(|v| v.to_le_bytes()));
        }
        bytes
    }
}
