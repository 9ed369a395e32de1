//! Replayable sources. A source is a set of splits, each with an offset that checkpoints record;
//! splits are spread over the workers (split `i` to worker `i mod parallelism`), so a source
//! restores at any parallelism. A file-per-split source's splits are matched to the restored
//! offsets by file path, so files added before a restore shift nothing.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use weir_checkpoint::SplitOffset;


/// What a poll produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    /// More records may follow at once.
    More,
    /// Nothing now (rate limit, waiting for input); poll again later.
    Idle,
    /// Every split is exhausted.
    Finished,
}

/// Whether a restart can fix a source error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The input or the settings are wrong (malformed JSON, bad UTF-8, a line over
    /// `weir.source.max-line-bytes`, a bad setting): a restart reads the same bytes again, so
    /// the job fails at once.
    Deterministic,
    /// I/O that may succeed on a retry: the restart strategy applies.
    Transient,
}

/// A source failed; the message names the file and line, or the setting, at fault.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct SourceError {
    /// Whether a restart can fix it.
    pub kind: ErrorKind,
    /// What and where.
    pub message: String,
}

impl SourceError {
    /// Bad input or settings: the job fails without restarting.
    pub fn deterministic(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Deterministic, message: message.into() }
    }

    /// An I/O failure: the job restarts per its restart strategy.
    pub fn transient(message: impl Into<String>) -> Self {
        Self { kind: ErrorKind::Transient, message: message.into() }
    }

    /// Whether a restart cannot fix it.
    pub fn is_deterministic(&self) -> bool {
        self.kind == ErrorKind::Deterministic
    }
}

/// Where a source instance runs.
#[derive(Debug, Clone, Copy)]
pub struct SourceContext {
    /// This instance.
    pub subtask: u32,
    /// Instances in all.
    pub parallelism: u32,
    /// The longest line a line-based source accepts (`weir.source.max-line-bytes`).
    pub max_line_bytes: u64,
}

/// A replayable source.
pub trait Source<T>: 'static {
    /// All splits at their start, in one order on every worker. A file-per-split source sets
    /// each split's `path` (relative to [`Source::root`]): restores match on it.
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError>;
    /// A reader over `splits`, each starting at its offset.
    fn open(&self, ctx: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<T>>, SourceError>;
    /// The directory that split paths are relative to (for messages).
    fn root(&self) -> Option<&Path> {
        None
    }
}

/// Subtask `ctx.subtask`'s share of `source`'s splits (split `i` to subtask `i mod parallelism`),
/// each at its offset in `restored`: the restored checkpoint's offsets of this source, of every
/// subtask, so that a restore works at any parallelism.
///
/// Splits with a path match a restored offset with the same path; a file added since the
/// checkpoint has none and starts at 0. Checkpoints written before paths were recorded match by
/// id, as they always did. A restored path that the source no longer lists is a deterministic
/// error naming the file(s): skipping it would silently drop its unread rest, reading it again
/// would duplicate its read part. Every subtask checks, so none starts over a broken restore.
pub fn assign_splits<T, S: Source<T> + ?Sized>(source: &S, ctx: &SourceContext, restored: &[SplitOffset]) -> Result<Vec<SplitOffset>, SourceError> {
    let splits = source.splits()?;
    let mut by_path: HashMap<&str, u64> = HashMap::new();
    let mut by_id: HashMap<u64, u64> = HashMap::new();
    for r in restored {
        match &r.path {
            Some(p) => by_path.insert(p, r.offset),
            None => by_id.insert(r.split, r.offset),
        };
    }
    if !by_path.is_empty() {
        let listed: HashSet<&str> = splits.iter().filter_map(|s| s.path.as_deref()).collect();
        let mut gone: Vec<&str> = by_path.keys().copied().filter(|p| !listed.contains(p)).collect();
        if !gone.is_empty() {
            gone.sort_unstable();
            return Err(files_gone(source.root(), &gone));
        }
    }
    let (subtask, parallelism) = (ctx.subtask as usize, ctx.parallelism.max(1) as usize);
    Ok(splits
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % parallelism == subtask)
        .map(|(_, mut s)| {
            s.offset = s.path.as_deref().and_then(|p| by_path.get(p)).or_else(|| by_id.get(&s.split)).copied().unwrap_or(0);
            s
        })
        .collect())
}

/// One source instance's reader.
pub trait SourceReader<T> {
    /// Append at most `max` records to `out`.
    fn poll(&mut self, out: &mut Vec<T>, max: usize) -> Result<Poll, SourceError>;
    /// The current offsets of this reader's splits.
    fn offsets(&self) -> Vec<SplitOffset>;
}

/// Restored files that are no longer there: no restart brings them back.
pub(crate) fn files_gone(root: Option<&Path>, gone: &[&str]) -> SourceError {
    let root = root.unwrap_or(Path::new(""));
    let names: Vec<String> = gone.iter().map(|p| root.join(p).display().to_string()).collect();
    SourceError::deterministic(match names.as_slice() {
        [one] => format!("file {one} is gone, but the restored checkpoint holds its read position: put it back, or restore another checkpoint"),
        many => format!(
            "files {} are gone, but the restored checkpoint holds their read positions: put them back, or restore another checkpoint",
            many.join(", ")
        ),
    })
}

/// The splits of a file-per-split source over `files` (in name order): split `i` is file `i`,
/// keyed by its name. Two names alike once made UTF-8 would share one restored offset: refused.
pub(crate) fn file_splits(files: &[PathBuf]) -> Result<Vec<SplitOffset>, SourceError> {
    let mut seen = HashSet::with_capacity(files.len());
    files
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let key = file_key(f);
            if !seen.insert(key.clone()) {
                return Err(SourceError::deterministic(format!("{}: another file has the same name once made UTF-8: rename one", f.display())));
            }
            Ok(SplitOffset { split: i as u64, offset: 0, path: Some(key) })
        })
        .collect()
}

/// A file's key in checkpoints: its name (the sources list one directory, not a tree).
pub(crate) fn file_key(file: &Path) -> String {
    file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
}

/// The files of `splits` among `files`: by path where the split has one, else by position (a
/// split built without [`Source::splits`]).
pub(crate) fn files_of_splits(files: &[PathBuf], splits: Vec<SplitOffset>, root: Option<&Path>) -> Result<Vec<(SplitOffset, PathBuf)>, SourceError> {
    let by_key: HashMap<String, &PathBuf> = files.iter().map(|f| (file_key(f), f)).collect();
    splits
        .into_iter()
        .map(|s| {
            let file = match &s.path {
                // Gone since `splits` listed it: a restart lists again (and a restore then names
                // it as gone for good).
                Some(p) => by_key.get(p).map(|f| (*f).clone()).ok_or_else(|| {
                    SourceError::transient(format!("{}: gone since the directory was listed", root.unwrap_or(Path::new("")).join(p).display()))
                })?,
                None => file_of_split(files, s.split, root.unwrap_or(Path::new("")))?,
            };
            Ok((s, file))
        })
        .collect()
}

/// The file of a split of a file-per-split source: a split restored from a checkpoint whose
/// file is gone is an error, not a silent skip.
pub(crate) fn file_of_split(files: &[PathBuf], split: u64, dir: &Path) -> Result<PathBuf, SourceError> {
    // A restart restores the same checkpoint: it cannot fix this.
    files
        .get(split as usize)
        .cloned()
        .ok_or_else(|| SourceError::deterministic(format!("split {split} has no file in {}", dir.display())))
}

/// A value for an error message: quoted, at most 40 characters.
pub(crate) fn abbreviate(text: &str) -> String {
    match text.char_indices().nth(40) {
        Some((end, _)) => format!("{:?}…", &text[..end]),
        None => format!("{text:?}"),
    }
}

pub use crate::connectors::blobs::BlobSource;
pub use crate::connectors::file::{FileFormat, FileSource};
pub use crate::connectors::generator::GeneratorSource;
pub use crate::connectors::images::ImageSource;
pub use crate::connectors::memory::VecSource;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::row::Row;

    const CTX: SourceContext = SourceContext { subtask: 0, parallelism: 1, max_line_bytes: 64 };

    fn drain(r: &mut dyn SourceReader<Row>) -> Result<Vec<Row>, SourceError> {
        let mut out = Vec::new();
        for _ in 0..1000 {
            if r.poll(&mut out, 7)? == Poll::Finished {
                return Ok(out);
            }
        }
        panic!("no end after 1000 polls ({} rows)", out.len());
    }

    fn all_splits<S: Source<Row>>(s: &S, offset: u64) -> Vec<SplitOffset> {
        s.splits().unwrap().into_iter().map(|s| SplitOffset { offset, ..s }).collect()
    }

    /// Restored with a smaller `count` than it ran with: the offsets lie past the new bound,
    /// nothing is left, and the offsets stay where they were (a later restore with the larger
    /// count resumes there instead of replaying).
    #[test]
    fn bounded_sources_restored_past_their_bound_finish_at_once() {
        let gen = GeneratorSource { count: 100, keys: 10, seed: 1, rate: None };
        let mut r = gen.open(&CTX, all_splits(&gen, 50)).unwrap();
        assert!(drain(&mut *r).unwrap().is_empty());
        assert!(r.offsets().iter().all(|o| o.offset == 50));
        let blobs = BlobSource { count: 100, centers: 2, dim: 2, sigma: 1.0, keys: 2, seed: 1 };
        let mut r = blobs.open(&CTX, all_splits(&blobs, 50)).unwrap();
        assert!(drain(&mut *r).unwrap().is_empty());
        let v = VecSource::new(vec![Row::default(); 3]);
        let mut r = v.open(&CTX, all_splits(&v, 10)).unwrap();
        assert!(drain(&mut *r).unwrap().is_empty());
        // Partly consumed splits still yield the rest.
        let mut r = gen.open(&CTX, all_splits(&gen, 5)).unwrap();
        assert_eq!(drain(&mut *r).unwrap().len(), 50);
        // A file restored at or past its end (a shorter file) has nothing left.
        let path = std::env::temp_dir().join(format!("weir-source-bound-{}", std::process::id()));
        std::fs::write(&path, "a\nb\n").unwrap();
        let file = FileSource::new(&path, FileFormat::Lines);
        for offset in [4, 1000] {
            let mut r = file.open(&CTX, all_splits(&file, offset)).unwrap();
            assert!(drain(&mut *r).unwrap().is_empty());
        }
        std::fs::remove_file(&path).unwrap();
    }

    fn read_file(bytes: &[u8], format: FileFormat) -> Result<Vec<Row>, SourceError> {
        let dir = std::env::temp_dir().join(format!("weir-source-test-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("in.txt");
        std::fs::write(&path, bytes).unwrap();
        let src = FileSource::new(&path, format).require_number(1, "the sum needs it");
        let result = src.open(&CTX, all_splits(&src, 0)).and_then(|mut r| drain(&mut *r));
        std::fs::remove_dir_all(&dir).unwrap();
        result
    }

    #[test]
    fn malformed_input_is_deterministic_and_names_file_and_line() {
        let json = || FileFormat::JsonLines(vec!["k".into(), "v".into()]);
        let cases: [(&[u8], &str); 4] = [
            (b"{\"k\": 1, \"v\": 2}\n{\"k\": 1, \"v\": \n", "in.txt:2: not a JSON object"),
            (b"{\"k\": 1, \"v\": 2}\n\n{\"k\": \"\xff\", \"v\": 2}\n", "in.txt:3: not UTF-8"),
            (b"{\"k\": 1, \"v\": \"7\"}\n", "in.txt:1: field 'v' is a string (\"7\"), not a number: the sum needs it"),
            (&[b'x'; 65], "in.txt:1: line longer than weir.source.max-line-bytes (64 bytes)"),
        ];
        for (bytes, want) in cases {
            let e = read_file(bytes, json()).unwrap_err();
            assert!(e.is_deterministic() && e.to_string().contains(want), "{e}");
        }
        // At the limit, with or without a newline, and null or missing numbers, are fine.
        let line = [b'x'; 64];
        assert_eq!(read_file(&[&line[..], b"\n", &line[..]].concat(), FileFormat::Lines).unwrap().len(), 2);
        let rows = read_file(b"{\"k\": 1, \"v\": null}\n{\"k\": 2}\n{\"k\": 3, \"v\": 1.5}", json()).unwrap();
        assert_eq!(rows.len(), 3);
    }

    /// A directory of files named `names`, each holding `lines` lines.
    fn dir_of(tag: &str, names: &[&str], lines: usize) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weir-source-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for n in names {
            std::fs::write(dir.join(n), (0..lines).map(|i| format!("{n}:{i}\n")).collect::<String>()).unwrap();
        }
        dir
    }

    fn ctx(subtask: u32, parallelism: u32) -> SourceContext {
        SourceContext { subtask, parallelism, ..CTX }
    }

    /// Restored offsets follow the file, not its place in the listing: a file added in front
    /// starts at 0, at any parallelism, and every split goes to exactly one subtask.
    #[test]
    fn file_splits_are_matched_by_path() {
        let dir = dir_of("by-path", &["b", "c"], 3);
        let src = FileSource::new(&dir, FileFormat::Lines);
        let mut r = src.open(&CTX, assign_splits(&src, &CTX, &[]).unwrap()).unwrap();
        let mut out = Vec::new();
        r.poll(&mut out, 4).unwrap(); // b read, c one line in
        let restored = r.offsets();
        assert_eq!(restored.iter().map(|s| s.path.as_deref().unwrap()).collect::<Vec<_>>(), ["b", "c"]);
        // The checkpoint's JSON carries the path; a split without one carries none.
        let json = serde_json::to_string(&restored[1]).unwrap();
        assert_eq!(json, r#"{"split":1,"offset":4,"path":"c"}"#);
        assert_eq!(serde_json::to_string(&SplitOffset::new(3, 4)).unwrap(), r#"{"split":3,"offset":4,"path":null}"#);
        // Positional formats (timely's bincode between processes) read it back too.
        for s in [restored[1].clone(), SplitOffset::new(3, 4)] {
            assert_eq!(postcard::from_bytes::<SplitOffset>(&postcard::to_allocvec(&s).unwrap()).unwrap(), s);
        }
        std::fs::write(dir.join("a"), "a:0\n").unwrap();
        for parallelism in [1, 2, 3] {
            let mut mine: Vec<SplitOffset> =
                (0..parallelism).flat_map(|i| assign_splits(&src, &ctx(i, parallelism), &restored).unwrap()).collect();
            mine.sort_by(|x, y| x.path.cmp(&y.path));
            let got: Vec<(&str, u64)> = mine.iter().map(|s| (s.path.as_deref().unwrap(), s.offset)).collect();
            assert_eq!(got, [("a", 0), ("b", 12), ("c", 4)]);
        }
        let rest: Vec<String> = (0..2)
            .flat_map(|i| {
                let c = ctx(i, 2);
                let mut r = src.open(&c, assign_splits(&src, &c, &restored).unwrap()).unwrap();
                drain(&mut *r).unwrap()
            })
            .map(|row| row.get(0).to_string())
            .collect();
        assert_eq!(rest.len(), 3, "{rest:?}");
        for line in ["a:0", "c:1", "c:2"] {
            assert!(rest.iter().any(|l| l.contains(line)), "{line} not in {rest:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A restored file that is gone fails every subtask, deterministically, naming the file.
    #[test]
    fn a_restored_file_that_is_gone_is_a_deterministic_error() {
        let dir = dir_of("gone", &["b", "c", "d"], 1);
        let src = FileSource::new(&dir, FileFormat::Lines);
        let restored = all_splits(&src, 1);
        std::fs::remove_file(dir.join("c")).unwrap();
        for i in 0..2 {
            let e = assign_splits(&src, &ctx(i, 2), &restored).unwrap_err();
            assert!(e.is_deterministic(), "{e}");
            assert!(e.to_string().starts_with(&format!("file {} is gone", dir.join("c").display())), "{e}");
        }
        std::fs::remove_file(dir.join("d")).unwrap();
        let e = assign_splits(&src, &CTX, &restored).unwrap_err();
        assert!(e.to_string().contains(&format!("{}, {} are gone", dir.join("c").display(), dir.join("d").display())), "{e}");
        // Gone between listing and opening: a restart lists again.
        let e = src.open(&CTX, restored[1..2].to_vec()).err().unwrap();
        assert!(!e.is_deterministic() && e.to_string().contains("gone since the directory was listed"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The image source has one split per file too: an image added in front is read, the
    /// ones read before the checkpoint are not read again.
    #[test]
    fn image_splits_are_matched_by_path() {
        let dir = dir_of("images", &[], 0);
        for n in ["b.png", "c.png"] {
            image::RgbImage::new(2, 2).save(dir.join(n)).unwrap();
        }
        let src = ImageSource::new(&dir);
        let mut r = src.open(&CTX, assign_splits(&src, &CTX, &[]).unwrap()).unwrap();
        r.poll(&mut Vec::new(), 1).unwrap(); // b.png read
        let restored = r.offsets();
        image::RgbImage::new(2, 2).save(dir.join("a.png")).unwrap();
        let mut r = src.open(&CTX, assign_splits(&src, &CTX, &restored).unwrap()).unwrap();
        let names: Vec<String> = drain(&mut *r).unwrap().iter().map(|row| row.get(0).to_string()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert!(names[0].contains("a.png") && names[1].contains("c.png"), "{names:?}");
        std::fs::remove_file(dir.join("b.png")).unwrap();
        let e = assign_splits(&src, &CTX, &restored).unwrap_err();
        assert!(e.is_deterministic() && e.to_string().contains(&format!("file {} is gone", dir.join("b.png").display())), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Checkpoints written before paths were recorded still restore by split id, as before.
    #[test]
    fn checkpoints_without_paths_restore_by_id() {
        let dir = dir_of("legacy", &["b", "c"], 2);
        let src = FileSource::new(&dir, FileFormat::Lines);
        let legacy: Vec<SplitOffset> = serde_json::from_str(r#"[{"split":0,"offset":4},{"split":1,"offset":2}]"#).unwrap();
        let mine = assign_splits(&src, &CTX, &legacy).unwrap();
        let got: Vec<(&str, u64)> = mine.iter().map(|s| (s.path.as_deref().unwrap(), s.offset)).collect();
        assert_eq!(got, [("b", 4), ("c", 2)]);
        // Non-file sources have no paths and match by id.
        let gen = GeneratorSource { count: 100, keys: 4, seed: 1, rate: None };
        let mine = assign_splits(&gen, &ctx(1, 2), &[SplitOffset::new(1, 7), SplitOffset::new(3, 9)]).unwrap();
        assert_eq!(mine, [SplitOffset::new(1, 7), SplitOffset::new(3, 9)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn io_errors_are_transient() {
        let src = FileSource::new("/nonexistent/weir-input", FileFormat::Lines);
        assert!(!src.splits().unwrap_err().is_deterministic());
    }
}
