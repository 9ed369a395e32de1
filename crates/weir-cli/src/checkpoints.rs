//! `weir checkpoints list DIR` and `weir checkpoints inspect DIR/chk-<n>` (local or `s3://`; S3
//! settings from `-D s3.*=…` and the AWS environment variables).

use anyhow::Result;
use clap::Subcommand;
use weir_storage::CheckpointStorage;

#[derive(Subcommand)]
pub enum CheckpointCmd {
    /// The checkpoints of a job directory (`<execution.checkpointing.dir>/<job>`), oldest first.
    List {
        /// The job's checkpoint directory (a local path or `s3://bucket/prefix/<job>`).
        dir: String,
        /// A storage setting, as in the job's config: -D s3.endpoint=http://127.0.0.1:9000
        #[arg(short = 'D', value_name = "KEY=VALUE")]
        define: Vec<String>,
    },
    /// The per-subtask cost split of one checkpoint.
    Inspect {
        /// A `chk-<n>` directory (a local path or `s3://…/<job>/chk-<n>`).
        path: String,
        /// A storage setting, as in the job's config: -D s3.endpoint=http://127.0.0.1:9000
        #[arg(short = 'D', value_name = "KEY=VALUE")]
        define: Vec<String>,
    },
}

/// The storage options (`s3.*`) among `-D` settings, checked like a job's config.
fn storage_options(defines: &[String]) -> Result<Vec<(String, String)>> {
    let pairs = defines
        .iter()
        .map(|d| d.split_once('=').map(|(k, v)| (k.trim(), v.trim())).ok_or_else(|| anyhow::anyhow!("-D {d}: expected KEY=VALUE")))
        .collect::<Result<Vec<_>>>()?;
    Ok(weir::JobConfig::from_pairs(pairs)?.checkpoint.storage_options)
}

pub fn main(cmd: CheckpointCmd) -> Result<()> {
    match cmd {
        CheckpointCmd::List { dir, define } => {
            let s = CheckpointStorage::open_job_dir_with(&dir, &storage_options(&define)?)?;
            println!(
                "{:>6} {:>6} {:>10} {:>12} {:>12} {:>11} {:>12} {:>12} {:>10} {:>10} {:>6}  status",
                "id", "par", "dur_ms", "written", "referenced", "kind", "entries", "barrier_us", "sync_us", "async_us", "final"
            );
            let completed = s.completed_checkpoints()?;
            let abandoned = s.abandoned_checkpoints()?;
            let mut ids: Vec<(u64, bool)> = completed.iter().map(|&i| (i, false)).chain(abandoned.iter().map(|&i| (i, true))).collect();
            ids.sort_unstable();
            for (id, is_abandoned) in ids {
                let loaded = if is_abandoned {
                    s.load_abandoned_metadata(id)
                } else {
                    s.load_metadata(id).and_then(|m| s.verify(&m).map(|()| m))
                };
                match loaded {
                    Ok(m) => {
                        let (b, sy, a) = m.max_costs();
                        println!(
                            "{:>6} {:>6} {:>10} {:>12} {:>12} {:>11} {:>12} {:>12} {:>10} {:>10} {:>6}  {}",
                            m.id,
                            m.parallelism,
                            m.duration_ms(),
                            m.bytes(),
                            m.referenced_bytes(),
                            if m.is_incremental() { "incremental" } else { "full" },
                            m.state_entries(),
                            b,
                            sy,
                            a,
                            if m.is_final { "yes" } else { "" },
                            if is_abandoned { "ABANDONED" } else { "ok" }
                        );
                    }
                    Err(e) if is_abandoned => println!("{id:>6} {:>117}  ABANDONED (corrupt: {e})", ""),
                    Err(e) => println!("{id:>6} {:>117}  CORRUPT: {e}", ""),
                }
            }
            let lineage = s.lineage().unwrap_or_else(|e| {
                println!("lineage: unreadable ({e})");
                None
            });
            if let Some(l) = lineage {
                match (l.restored_from, &l.restored_path) {
                    (Some(id), Some(p)) => println!("lineage: the latest run restored checkpoint {id} ({p}); its ids start at {}", l.first_id),
                    _ => println!("lineage: the latest run started fresh; its ids start at {}", l.first_id),
                }
                if !l.abandoned.is_empty() {
                    println!("         it abandoned {:?}: outside its lineage, never restored", l.abandoned);
                }
            }
        }
        CheckpointCmd::Inspect { path, define } => {
            let (s, id) = CheckpointStorage::open_checkpoint_path_with(&path, &storage_options(&define)?)?;
            let abandoned = s.abandoned_checkpoints()?.contains(&id);
            let m = if abandoned { s.load_abandoned_metadata(id)? } else { s.load_metadata(id)? };
            let valid = s.verify(&m);
            if abandoned {
                println!("ABANDONED: newer than a checkpoint that was restored; outside the lineage, never restored");
            }
            println!(
                "checkpoint {} of job {}: parallelism {}, max parallelism {}, {} ms, {} bytes written, {} bytes referenced ({}){}",
                m.id,
                m.job,
                m.parallelism,
                m.max_parallelism,
                m.duration_ms(),
                m.bytes(),
                m.referenced_bytes(),
                if m.is_incremental() { "incremental: it lists files of earlier checkpoints" } else { "full" },
                if m.is_final { ", final" } else { "" }
            );
            if let Err(e) = valid {
                println!("CORRUPT: {e}");
            }
            println!(
                "{:<10} {:<22} {:<24} {:>12} {:>10} {:>10} {:>12} {:>10} {:>6} {:>7}",
                "task", "operator", "uid", "barrier_us", "sync_us", "async_us", "bytes", "entries", "files", "splits"
            );
            for (t, sub) in &m.subtasks {
                let st = &sub.stats;
                println!(
                    "{:<10} {:<22} {:<24} {:>12} {:>10} {:>10} {:>12} {:>10} {:>6} {:>7}",
                    t.to_string(),
                    sub.operator_name,
                    // A checkpoint written before uids matches by position (the task's op<n>).
                    if sub.uid.is_empty() { "-" } else { &sub.uid },
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
