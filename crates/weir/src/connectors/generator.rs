//! The seeded generator source (Flink's `datagen`), replayable in O(1).

use std::time::Instant;

use weir_checkpoint::SplitOffset;

use crate::row::{Row, Value};
use crate::source::*;

#[inline]
pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The seeded generator: rows `(key, value)` with `key` uniform over `0..keys` and `value` in
/// `1..=100`. Record `i` of split `j` is a pure function of `(seed, j, i)`, so a restore seeks in
/// O(1). Each key belongs to one split, so each key's updates have one order in every run, at
/// every parallelism: the output of a keyed running aggregate is deterministic.
#[derive(Clone, Debug)]
pub struct GeneratorSource {
    /// Records in all.
    pub count: u64,
    /// Distinct keys.
    pub keys: u64,
    /// Seed.
    pub seed: u64,
    /// Records per second over all instances; `None` = as fast as possible.
    pub rate: Option<f64>,
}

impl GeneratorSource {
    fn num_splits(&self) -> u64 {
        self.keys.clamp(1, 128)
    }

    /// Records in split `j`.
    pub fn split_len(&self, j: u64) -> u64 {
        let s = self.num_splits();
        self.count / s + u64::from(j < self.count % s)
    }

    /// Record `i` of split `j`.
    #[inline]
    pub fn record(&self, j: u64, i: u64) -> (i64, i64) {
        let s = self.num_splits();
        let keys_j = (self.keys.max(1) - j).div_ceil(s);
        let h = splitmix64(self.seed.wrapping_mul(0xA24B_AED4_963E_E407) ^ (j << 40) ^ i);
        let key = j + s * (h % keys_j);
        let value = (splitmix64(h) % 100) as i64 + 1;
        (key as i64, value)
    }
}

struct GeneratorReader {
    gen: GeneratorSource,
    splits: Vec<(u64, u64, u64)>, // (split, offset, len)
    cur: usize,
    rate: Option<f64>,
    start: Instant,
    emitted: u64,
}

impl Source<Row> for GeneratorSource {
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError> {
        Ok((0..self.num_splits()).map(|j| SplitOffset::new(j, 0)).collect())
    }
    fn open(&self, ctx: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        if self.keys == 0 {
            return Err(SourceError::deterministic("source.keys: must be at least 1"));
        }
        Ok(Box::new(GeneratorReader {
            splits: splits.iter().map(|s| (s.split, s.offset, self.split_len(s.split))).collect(),
            gen: self.clone(),
            cur: 0,
            rate: self.rate.map(|r| r / ctx.parallelism as f64),
            start: Instant::now(),
            emitted: 0,
        }))
    }
}

impl SourceReader<Row> for GeneratorReader {
    fn poll(&mut self, out: &mut Vec<Row>, mut max: usize) -> Result<Poll, SourceError> {
        if let Some(rate) = self.rate {
            let allowed = (self.start.elapsed().as_secs_f64() * rate) as u64;
            max = max.min(allowed.saturating_sub(self.emitted) as usize);
            if max == 0 {
                return Ok(Poll::Idle);
            }
        }
        let n = self.splits.len();
        let mut visited = 0;
        while max > 0 && visited < n {
            let (split, off, len) = &mut self.splits[self.cur];
            // A restore with a smaller `count` puts the offset past the end: nothing is left.
            let take = len.saturating_sub(*off).min(max as u64);
            for i in *off..*off + take {
                let (k, v) = self.gen.record(*split, i);
                out.push(Row::new([Value::Int(k), Value::Int(v)]));
            }
            *off += take;
            max -= take as usize;
            self.emitted += take;
            self.cur = (self.cur + 1) % n;
            visited = if take == 0 { visited + 1 } else { 0 };
        }
        let done = self.splits.iter().all(|(_, o, l)| o >= l);
        Ok(if done { Poll::Finished } else { Poll::More })
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.splits.iter().map(|&(split, offset, _)| SplitOffset::new(split, offset)).collect()
    }
}
