//! Background threads for the asynchronous part of snapshots (serialise and write).

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

/// A small pool that runs snapshot writes off the processing threads.
#[derive(Clone)]
pub(crate) struct SnapshotExecutor {
    tx: Sender<Job>,
}

/// Owns the pool's threads; dropping it waits for queued writes.
pub(crate) struct ExecutorGuard {
    exec: Option<SnapshotExecutor>,
    threads: Vec<JoinHandle<()>>,
}

impl SnapshotExecutor {
    pub(crate) fn start(threads: usize) -> (SnapshotExecutor, ExecutorGuard) {
        let (tx, rx) = channel::<Job>();
        let rx: Arc<Mutex<Receiver<Job>>> = Arc::new(Mutex::new(rx));
        let threads = (0..threads.max(1))
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("weir-snapshot-{i}"))
                    .spawn(move || loop {
                        // One lock per snapshot job, never per record.
                        let job = rx.lock().map(|r| r.recv());
                        match job {
                            // A panicking job must not take the thread with it: later writes
                            // (and the checkpoints waiting for them) still need it.
                            Ok(Ok(job)) => {
                                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                                    tracing::error!("a snapshot job panicked; its checkpoint will not complete");
                                }
                            }
                            _ => return,
                        }
                    })
                    .expect("spawn snapshot thread")
            })
            .collect();
        let exec = SnapshotExecutor { tx };
        (exec.clone(), ExecutorGuard { exec: Some(exec), threads })
    }

    pub(crate) fn submit(&self, job: impl FnOnce() + Send + 'static) {
        // The pool outlives every worker of an attempt, so the send cannot fail.
        let _ = self.tx.send(Box::new(job));
    }
}

impl Drop for ExecutorGuard {
    fn drop(&mut self) {
        self.exec.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
