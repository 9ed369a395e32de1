//! Seeded Gaussian blobs: points for the K-means examples and benchmarks.

use std::sync::Arc;

use weir_checkpoint::SplitOffset;

use crate::row::{Row, Value};
use crate::connectors::generator::splitmix64;
use crate::source::*;

/// Seeded Gaussian blobs: rows `(key, point)` where `point` is a `dim`-vector drawn from one of
/// `centers` isotropic Gaussians (standard deviation `sigma`) whose centres are uniform in
/// `[-10, 10]^dim`; each key has its own centres. Record `i` of split `j` is a pure function of
/// `(seed, j, i)`, so restores seek in O(1).
#[derive(Clone, Debug)]
pub struct BlobSource {
    /// Points in all.
    pub count: u64,
    /// Gaussians per key.
    pub centers: usize,
    /// Dimensions.
    pub dim: usize,
    /// Standard deviation.
    pub sigma: f32,
    /// Independent streams (keys).
    pub keys: u64,
    /// Seed.
    pub seed: u64,
}

const BLOB_SPLITS: u64 = 16;

fn unit(h: u64) -> f32 {
    ((h >> 40) as f32 + 0.5) / (1u64 << 24) as f32
}

impl BlobSource {
    /// Centre `c` of key `key`.
    pub fn center(&self, key: u64, c: usize) -> Vec<f32> {
        (0..self.dim)
            .map(|j| unit(splitmix64(self.seed ^ 0xC3A5_C85C_97CB_3127 ^ (key << 32) ^ ((c as u64) << 16) ^ j as u64)) * 20.0 - 10.0)
            .collect()
    }

    fn split_len(&self, j: u64) -> u64 {
        self.count / BLOB_SPLITS + u64::from(j < self.count % BLOB_SPLITS)
    }

    fn record(&self, j: u64, i: u64) -> Row {
        let h = splitmix64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (j << 44) ^ i);
        let key = h % self.keys.max(1);
        let c = (splitmix64(h) % self.centers.max(1) as u64) as usize;
        let center = self.center(key, c);
        let mut x = h;
        let point: Vec<f32> = center
            .iter()
            .map(|m| {
                x = splitmix64(x);
                let (u1, u2) = (unit(x), unit(splitmix64(x ^ 0x5555)));
                // Box–Muller
                m + self.sigma * (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
            })
            .collect();
        Row::new([Value::Int(key as i64), Value::Vector(Arc::new(point))])
    }
}

struct BlobReader {
    gen: BlobSource,
    splits: Vec<(u64, u64, u64)>,
    cur: usize,
}

impl Source<Row> for BlobSource {
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError> {
        Ok((0..BLOB_SPLITS).map(|j| SplitOffset::new(j, 0)).collect())
    }
    fn open(&self, _: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        if self.dim == 0 || self.centers == 0 {
            return Err(SourceError::deterministic("source.dim and source.centers must be at least 1"));
        }
        Ok(Box::new(BlobReader {
            splits: splits.iter().map(|s| (s.split, s.offset, self.split_len(s.split))).collect(),
            gen: self.clone(),
            cur: 0,
        }))
    }
}

impl SourceReader<Row> for BlobReader {
    fn poll(&mut self, out: &mut Vec<Row>, mut max: usize) -> Result<Poll, SourceError> {
        let n = self.splits.len();
        let mut idle = 0;
        while max > 0 && idle < n {
            let (split, off, len) = &mut self.splits[self.cur];
            let take = len.saturating_sub(*off).min(max as u64);
            out.extend((*off..*off + take).map(|i| self.gen.record(*split, i)));
            *off += take;
            max -= take as usize;
            self.cur = (self.cur + 1) % n;
            idle = if take == 0 { idle + 1 } else { 0 };
        }
        Ok(if self.splits.iter().all(|(_, o, l)| o >= l) { Poll::Finished } else { Poll::More })
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.splits.iter().map(|&(split, offset, _)| SplitOffset::new(split, offset)).collect()
    }
}
