//! The blackhole sink: discards everything (Flink's `blackhole` connector), for benchmarks.

use crate::sink::{Sink, SinkContext, SinkError, SinkWriter};

/// Discards everything (Flink's blackhole connector), for benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct BlackholeSink;

impl<T: 'static> Sink<T> for BlackholeSink {
    fn open(&self, _: &SinkContext) -> Result<Box<dyn SinkWriter<T>>, SinkError> {
        Ok(Box::new(BlackholeSink))
    }
}

impl<T> SinkWriter<T> for BlackholeSink {
    fn write(&mut self, _: u64, batch: &mut Vec<T>) -> Result<(), SinkError> {
        batch.clear();
        Ok(())
    }
    fn pre_commit(&mut self, _: u64) -> Result<u64, SinkError> {
        Ok(0)
    }
    fn commit(&mut self, _: u64) -> Result<(), SinkError> {
        Ok(())
    }
}

