//! An in-memory sink for tests and examples.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::sink::{Sink, SinkContext, SinkError, SinkWriter};

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

