//! What a checkpoint costs the processing thread with the heap backend.
//!
//! `cargo run --release -p weir-state --example cow_cost -- [keys] [value_bytes] [rounds]
//! [updates] [--release-written] [--track-changes] [--copy-shard-at=N] [--hot-path]`
//!
//! Defaults: 10 000 000 keys, 100-byte values (0: the keyed sum's `(i64, u64)`), 3 rounds, every
//! key updated once per pass.
//! `--release-written`: the snapshot writer lets go of each key group once written;
//! `--track-changes`: the map tracks changed keys; `--copy-shard-at=N`: copy a shard whole once
//! its overlay × N ≥ its table (`18446744073709551615`: about per-shard copy-on-write); `--hot-path`: only the keyed-sum update cost
//! with no snapshot (20 M updates over `keys` keys, best of `rounds`).
// A counting global allocator needs `unsafe impl GlobalAlloc`; it only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use weir_state::cow::bench::{checkpoint_cost, hot_path_ns, CostConfig};

thread_local! {
    // Per thread: the snapshot writer's own buffers are not copies made by the processing thread.
    static ALLOCATED: Cell<u64> = const { Cell::new(0) };
}

struct Counting;

// SAFETY: every call forwards to `System` with the same arguments; the counter is a plain
// thread-local `Cell` without destructor, so it never allocates or runs after teardown.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|c| c.set(c.get() + layout.size() as u64));
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATED.try_with(|c| c.set(c.get() + layout.size() as u64));
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATED.try_with(|c| c.set(c.get() + new_size as u64));
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocated() -> u64 {
    ALLOCATED.with(|c| c.get())
}

fn main() {
    let (flags, numbers): (Vec<String>, Vec<String>) = std::env::args().skip(1).partition(|a| a.starts_with("--"));
    let mut numbers = numbers.iter().map(|a| a.replace('_', "").parse::<u64>().expect("numeric argument"));
    let keys = numbers.next().unwrap_or(10_000_000);
    let value_bytes = numbers.next().unwrap_or(100) as usize;
    let rounds = numbers.next().unwrap_or(3) as usize;
    let updates = numbers.next().unwrap_or(0);
    let flag = |f: &str| flags.iter().any(|a| a == f);
    if flag("--hot-path") {
        let ns = hot_path_ns(keys, 20_000_000, rounds, flag("--track-changes"));
        println!(
            "hot path (entry_or_default on (i64, u64), no snapshot, track changes: {}), {keys} keys: {ns:.1} ns/update (best of {rounds})",
            flag("--track-changes")
        );
        return;
    }
    let release_written = flag("--release-written");
    let track_changes = flag("--track-changes");
    let copy_shard_at = flags.iter().find_map(|f| f.strip_prefix("--copy-shard-at=")).map(|n| n.parse().expect("--copy-shard-at=N"));
    let cfg = CostConfig { keys, value_bytes, rounds, updates, allocated_bytes: Some(allocated), track_changes, release_written, copy_shard_at };
    let c = checkpoint_cost(&cfg);
    let mib = |b: Option<u64>| b.unwrap_or(0) as f64 / (1 << 20) as f64;
    println!(
        "heap backend, {keys} keys, {}, {} updates per pass, {rounds} rounds (means); release written: {release_written}, track changes: {track_changes}, copy shard at: {copy_shard_at:?}",
        if value_bytes == 0 { "(i64, u64) values".to_string() } else { format!("{value_bytes}-byte values") },
        if updates == 0 { keys } else { updates.min(keys) }
    );
    println!("  no snapshot alive:      {:7.1} ns/update, {:8.1} MiB allocated per pass", c.idle_ns_per_update, mib(c.idle_alloc_bytes));
    println!("  snapshot being written: {:7.1} ns/update ({:.0}% of the pass's updates)", c.in_flight_ns_per_update, 100.0 * c.in_flight_fraction);
    println!(
        "  whole pass after snap:  {:7.1} ns/update, {:8.1} MiB allocated per pass (copies), {} entries copied",
        c.pass_ns_per_update,
        mib(c.pass_alloc_bytes),
        c.copied_entries
    );
    println!("  snapshot() pause {:.1} µs; writer {:.0} ms for {:.1} MiB", c.snapshot_pause_us, c.write_ms, c.file_bytes as f64 / (1 << 20) as f64);
}
