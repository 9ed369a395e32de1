//! `weir checkpoints list DIR` and `weir checkpoints inspect DIR/chk-<n>`.

use anyhow::Result;
use clap::Subcommand;
use weir_storage::CheckpointStorage;

#[derive(Subcommand)]
pub enum CheckpointCmd {
    /// The checkpoints of a job directory (`<execution.checkpointing.dir>/<job>`), oldest first.
    List {
        /// The job's checkpoint directory.
        dir: String,
    },
    /// The per-subtask cost split of one checkpoint.
    Inspect {
        /// A `chk-<n>` directory.
        path: String,
    },
}

fn open_job_dir(dir: &str) -> Result<CheckpointStorage> {
    let p = std::path::Path::new(dir.trim_end_matches('/'));
    let job = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let base = p.parent().map(|b| b.to_string_lossy().into_owned()).filter(|b| !b.is_empty()).unwrap_or_else(|| ".".into());
    if !p.is_dir() {
        anyhow::bail!("{dir}: not a directory");
    }
    Ok(CheckpointStorage::open(&base, job)?)
}

pub fn main(cmd: CheckpointCmd) -> Result<()> {
    match cmd {
        CheckpointCmd::List { dir } => {
            let s = open_job_dir(&dir)?;
            println!(
                "{:>6} {:>6} {:>10} {:>12} {:>12} {:>12} {:>10} {:>10} {:>6}  status",
                "id", "par", "dur_ms", "bytes", "entries", "barrier_us", "sync_us", "async_us", "final"
            );
            for id in s.completed_checkpoints()? {
                match s.load_metadata(id).and_then(|m| s.verify(&m).map(|()| m)) {
                    Ok(m) => {
                        let (b, sy, a) = m.max_costs();
                        println!(
                            "{:>6} {:>6} {:>10} {:>12} {:>12} {:>12} {:>10} {:>10} {:>6}  ok",
                            m.id,
                            m.parallelism,
                            m.duration_ms(),
                            m.bytes(),
                            m.state_entries(),
                            b,
                            sy,
                            a,
                            if m.is_final { "yes" } else { "" }
                        );
                    }
                    Err(e) => println!("{id:>6} {:>92}  CORRUPT: {e}", ""),
                }
            }
        }
        CheckpointCmd::Inspect { path } => {
            let (s, id) = CheckpointStorage::open_checkpoint_path(&path)?;
            let m = s.load_metadata(id)?;
            let valid = s.verify(&m);
            println!(
                "checkpoint {} of job {}: parallelism {}, max parallelism {}, {} ms, {} bytes{}",
                m.id,
                m.job,
                m.parallelism,
                m.max_parallelism,
                m.duration_ms(),
                m.bytes(),
                if m.is_final { ", final" } else { "" }
            );
            if let Err(e) = valid {
                println!("CORRUPT: {e}");
            }
            println!(
                "{:<10} {:<22} {:>12} {:>10} {:>10} {:>12} {:>10} {:>6} {:>7}",
                "task", "operator", "barrier_us", "sync_us", "async_us", "bytes", "entries", "files", "splits"
            );
            for (t, sub) in &m.subtasks {
                let st = &sub.stats;
                println!(
                    "{:<10} {:<22} {:>12} {:>10} {:>10} {:>12} {:>10} {:>6} {:>7}",
                    t.to_string(),
                    sub.operator_name,
                    st.barrier_us,
                    st.sync_us,
                    st.async_us,
                    st.bytes,
                    st.state_entries,
                    sub.state_files.len(),
                    sub.splits.len()
                );
            }
        }
    }
    Ok(())
}
