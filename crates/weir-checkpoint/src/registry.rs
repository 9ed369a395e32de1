//! The shared-state registry (Flink's `SharedStateRegistry`): reference counts of the files that
//! several checkpoints list (incremental state under `shared/`). A file may be deleted only when
//! no retained checkpoint refers to it, and only once no checkpoint still being written can
//! list it: storage asks [`SharedStateRegistry::unreferenced`] only about files written by a
//! checkpoint no newer than the newest completed one.
//!
//! ```
//! use weir_checkpoint::SharedStateRegistry;
//!
//! let mut r = SharedStateRegistry::default();
//! r.register(["shared/chk1-a.sst", "shared/chk2-b.sst"]);   // checkpoint 2
//! r.register(["shared/chk1-a.sst", "shared/chk3-c.sst"]);   // checkpoint 3 still lists a
//! r.unregister(["shared/chk1-a.sst", "shared/chk2-b.sst"]); // checkpoint 2 leaves retention
//! assert_eq!(r.references("shared/chk1-a.sst"), 1);
//! assert_eq!(r.unreferenced(["shared/chk1-a.sst", "shared/chk2-b.sst"]), vec!["shared/chk2-b.sst"]);
//! ```

use std::collections::HashMap;

/// Reference counts of shared state files, by path relative to the job directory.
#[derive(Clone, Debug, Default)]
pub struct SharedStateRegistry {
    refs: HashMap<String, u32>,
}

impl SharedStateRegistry {
    /// The registry of the checkpoints whose file lists are `checkpoints` (each a list of
    /// paths: the retained, completed checkpoints of a job).
    pub fn of<'a, C, F>(checkpoints: C) -> Self
    where
        C: IntoIterator<Item = F>,
        F: IntoIterator<Item = &'a str>,
    {
        let mut r = Self::default();
        for files in checkpoints {
            r.register(files);
        }
        r
    }

    /// A checkpoint listing `files` is retained.
    pub fn register<'a>(&mut self, files: impl IntoIterator<Item = &'a str>) {
        for f in files {
            *self.refs.entry(f.to_string()).or_default() += 1;
        }
    }

    /// A checkpoint listing `files` left retention; returns the files no checkpoint refers to
    /// any more.
    pub fn unregister<'a>(&mut self, files: impl IntoIterator<Item = &'a str>) -> Vec<String> {
        let mut freed = Vec::new();
        for f in files {
            if let Some(n) = self.refs.get_mut(f) {
                *n -= 1;
                if *n == 0 {
                    self.refs.remove(f);
                    freed.push(f.to_string());
                }
            }
        }
        freed
    }

    /// How many registered checkpoints list `file`.
    pub fn references(&self, file: &str) -> u32 {
        self.refs.get(file).copied().unwrap_or(0)
    }

    /// Those of `candidates` that no registered checkpoint lists.
    pub fn unreferenced<'a>(&self, candidates: impl IntoIterator<Item = &'a str>) -> Vec<&'a str> {
        candidates.into_iter().filter(|f| self.references(f) == 0).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_lives_while_any_registered_checkpoint_lists_it() {
        let mut r = SharedStateRegistry::of([vec!["s/a", "s/b"], vec!["s/a"]]);
        assert_eq!(r.references("s/a"), 2);
        assert_eq!(r.unregister(["s/a", "s/b"]), vec!["s/b"]);
        assert_eq!(r.unreferenced(["s/a", "s/b", "s/c"]), vec!["s/b", "s/c"]);
        assert_eq!(r.unregister(["s/a"]), vec!["s/a"]);
        assert_eq!(r.unregister(["s/a"]), Vec::<String>::new(), "never below zero");
    }
}
