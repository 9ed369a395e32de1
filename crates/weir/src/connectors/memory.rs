//! An in-memory sink for tests and examples.
//! Also the matching source over a vector.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use weir_checkpoint::SplitOffset;

use crate::sink::{Sink, SinkContext, SinkError, SinkWriter};
use crate::source::*;

/// Collects committed records in memory (tests and examples). Exactly once within a process.
pub struct CollectSink<T> {
    committed: Arc<Mutex<Vec<T>>>,
}

impl<T> Clone for CollectSink<T> {
    fn clone(&self) -> Self {
        Self { committed: self.committed.clone() }
    }
}

impl<T> Default for CollectSink<T> {
    fn default() -> Self {
        Self { committed: Arc::default() }
    }
}

impl<T> CollectSink<T> {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }
    /// Take what was committed so far.
    pub fn take(&self) -> Vec<T> {
        std::mem::take(&mut *self.committed.lock().expect("collect sink"))
    }
}

struct CollectWriter<T> {
    committed: Arc<Mutex<Vec<T>>>,
    pending: BTreeMap<u64, Vec<T>>,
}

impl<T: 'static> Sink<T> for CollectSink<T> {
    fn open(&self, _: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        Ok(Box::new(CollectWriter { committed: self.committed.clone(), pending: BTreeMap::new() }))
    }
}

impl<T> SinkWriter<T> for CollectWriter<T> {
    fn write(&mut self, epoch: u64, batch: &mut Vec<T>) -> Result<(), SinkError> {
        self.pending.entry(epoch).or_default().append(batch);
        Ok(())
    }
    fn pre_commit(&mut self, _: u64) -> Result<u64, SinkError> {
        Ok(0)
    }
    fn commit(&mut self, upto: u64) -> Result<(), SinkError> {
        let later = self.pending.split_off(&(upto + 1));
        let mut c = self.committed.lock().expect("collect sink");
        for (_, mut v) in std::mem::replace(&mut self.pending, later) {
            c.append(&mut v);
        }
        Ok(())
    }
}

/// A source over a vector (one split): for tests and examples.
pub struct VecSource<T> {
    data: Arc<Vec<T>>,
}

impl<T> VecSource<T> {
    /// A source emitting `data` in order.
    pub fn new(data: Vec<T>) -> Self {
        Self { data: Arc::new(data) }
    }
}

struct VecReader<T> {
    data: Arc<Vec<T>>,
    pos: Option<usize>,
}

impl<T: Clone + 'static> Source<T> for VecSource<T> {
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError> {
        Ok(vec![SplitOffset::new(0, 0)])
    }
    fn open(&self, _: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<T>>, SourceError> {
        Ok(Box::new(VecReader { data: self.data.clone(), pos: splits.first().map(|s| s.offset as usize) }))
    }
}

impl<T: Clone> SourceReader<T> for VecReader<T> {
    fn poll(&mut self, out: &mut Vec<T>, max: usize) -> Result<Poll, SourceError> {
        let Some(pos) = self.pos.as_mut() else { return Ok(Poll::Finished) };
        // Restored past the end (a shorter vector): nothing is left; the offset stays as it was.
        if *pos >= self.data.len() {
            return Ok(Poll::Finished);
        }
        let end = (*pos + max).min(self.data.len());
        out.extend_from_slice(&self.data[*pos..end]);
        *pos = end;
        Ok(if end == self.data.len() { Poll::Finished } else { Poll::More })
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.pos.map(|p| SplitOffset::new(0, p as u64)).into_iter().collect()
    }
}
