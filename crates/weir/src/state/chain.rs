//! The chain of incremental snapshot files of one operator instance's state: a full file, then
//! deltas, each on top of the one before. Snapshots are written in checkpoint order (one turn
//! each); a snapshot that failed, panicked or was dropped does not join the chain, so the next
//! one is full (the changes it took with it are lost to the deltas). Shared by the heap
//! backend's deltas, RocksDB's uploads and device-resident state.

use std::sync::{Condvar, Mutex, MutexGuard};

use weir_checkpoint::StateFileHandle;

/// The chain of files of one operator instance's state, advanced by the snapshot writer in
/// checkpoint order.
#[derive(Default)]
pub(crate) struct ChainState {
    pub files: Vec<StateFileHandle>,
    pub base_bytes: u64,
    pub delta_bytes: u64,
    /// The last snapshot whose file joined the chain: a snapshot may be a delta only on top of
    /// the one right before it (a failed, panicked or dropped one in between took dirty chunks
    /// with it).
    pub joined: Option<u64>,
    pub issued: u64,
    turn: u64,
    /// Snapshots dropped before their turn: skipped when it comes.
    cancelled: std::collections::BTreeSet<u64>,
}

#[derive(Default)]
pub(crate) struct Chain {
    state: Mutex<ChainState>,
    turn: Condvar,
}

impl Chain {
    pub fn lock(&self) -> MutexGuard<'_, ChainState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until it is snapshot `seq`'s turn.
    pub fn wait_turn(&self, seq: u64) {
        let mut c = self.lock();
        while c.turn < seq {
            c = self.turn.wait(c).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The current snapshot is done: the next one that was not dropped goes.
    fn pass(&self) {
        let mut c = self.lock();
        c.turn += 1;
        loop {
            let t = c.turn;
            if !c.cancelled.remove(&t) {
                break;
            }
            c.turn += 1;
        }
        drop(c);
        self.turn.notify_all();
    }

    /// Snapshot `seq` will never run.
    pub fn cancel(&self, seq: u64) {
        let mut c = self.lock();
        if c.turn == seq {
            drop(c);
            self.pass();
        } else {
            c.cancelled.insert(seq);
        }
    }
}

/// Passes the turn to the next snapshot when dropped (also on an error or a panic); a snapshot
/// that did not succeed does not join the chain, so the next one is full.
pub(crate) struct Turn<'a> {
    pub chain: &'a Chain,
    pub seq: u64,
    pub ok: bool,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if self.ok {
            self.chain.lock().joined = Some(self.seq);
        }
        self.chain.pass();
    }
}

impl Chain {
    /// A place in the turn order for the snapshot taken now (at the barrier).
    pub fn issue(self: &std::sync::Arc<Self>) -> Ticket {
        let seq = {
            let mut c = self.lock();
            c.issued += 1;
            c.issued - 1
        };
        Ticket { chain: self.clone(), seq, taken: false }
    }
}

impl ChainState {
    /// Whether snapshot `seq` must write a full file: it is first, the one before it did not
    /// join, or the deltas outgrew `max_delta_share` of the full file.
    pub fn must_be_full(&self, seq: u64, max_delta_share: f64) -> bool {
        self.joined.is_none_or(|j| j + 1 != seq)
            || self.files.is_empty()
            || self.delta_bytes as f64 > max_delta_share * self.base_bytes as f64
    }

    /// A file joined the chain: a full one starts it again.
    pub fn push(&mut self, handle: StateFileHandle, full: bool) {
        let size = handle.size;
        if full {
            self.files = vec![handle];
            (self.base_bytes, self.delta_bytes) = (size, 0);
        } else {
            self.files.push(handle);
            self.delta_bytes += size;
        }
    }
}

/// A snapshot's place in its chain's turn order. Dropped without its turn being taken (the
/// snapshot never ran: an earlier part of it failed, or it panicked), it passes the turn on and
/// the next snapshot is full.
pub(crate) struct Ticket {
    chain: std::sync::Arc<Chain>,
    seq: u64,
    taken: bool,
}

impl Ticket {
    /// Wait for this snapshot's turn; the returned [`Turn`] passes it on when dropped.
    pub fn wait(mut self) -> (std::sync::Arc<Chain>, u64) {
        self.taken = true;
        self.chain.wait_turn(self.seq);
        (self.chain.clone(), self.seq)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.taken {
            self.chain.cancel(self.seq);
        }
    }
}
