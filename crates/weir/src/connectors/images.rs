//! Images: the exactly-once PNG sink.
//! Also the image-folder source, one split per file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use weir_checkpoint::SplitOffset;

use crate::row::{Row, Value};
use crate::sink::{fsync_dir, io_err, refuse_fresh_start_into_used, Sink, SinkContext, SinkError, SinkWriter};
use crate::source::*;

/// Writes each row's image (field `image_field`) as a PNG named after field `name_field`, exactly
/// once: epoch `e` of instance `s` is written into the hidden directory `.images-s-e.inprogress`,
/// renamed `.pending` (after fsync) when `e` closes, and its files moved into place when the
/// checkpoint completes. Replays rewrite the same names, so a commit is idempotent.
pub struct ImageSink {
    dir: PathBuf,
    name_field: usize,
    image_field: usize,
}

impl ImageSink {
    /// A sink into `dir`.
    pub fn new(dir: impl Into<PathBuf>, name_field: usize, image_field: usize) -> Self {
        Self { dir: dir.into(), name_field, image_field }
    }
}

struct ImageSinkWriter {
    dir: PathBuf,
    subtask: u32,
    name_field: usize,
    image_field: usize,
    open: Option<(u64, u64)>,
    pending: Vec<u64>,
}

fn parse_image_stage(name: &str) -> Option<(u32, u64, &str)> {
    let rest = name.strip_prefix(".images-")?;
    let (stem, suffix) = rest.split_once('.')?;
    let (s, e) = stem.split_once('-')?;
    Some((s.parse().ok()?, e.parse().ok()?, suffix))
}

impl ImageSinkWriter {
    fn stage(&self, epoch: u64, suffix: &str) -> PathBuf {
        self.dir.join(format!(".images-{:05}-{epoch:012}.{suffix}", self.subtask))
    }
}

fn publish(stage: &Path, dir: &Path) -> Result<(), SinkError> {
    for f in std::fs::read_dir(stage).map_err(|e| io_err("list", stage, e))? {
        let f = f.map_err(|e| io_err("list", stage, e))?;
        std::fs::rename(f.path(), dir.join(f.file_name())).map_err(|e| io_err("commit", &f.path(), e))?;
    }
    std::fs::remove_dir(stage).map_err(|e| io_err("remove", stage, e))?;
    fsync_dir(dir)
}

impl Sink<Row> for ImageSink {
    fn preflight(&self, ctx: &SinkContext) -> Result<(), SinkError> {
        refuse_fresh_start_into_used(&self.dir, ctx, |n| {
            parse_image_stage(n).map_or(!n.starts_with('.'), |(_, e, suffix)| {
                suffix == "pending" && ctx.newest_checkpoint.is_some_and(|c| e <= c)
            })
        })
    }

    fn open(&self, ctx: &SinkContext) -> Result<Box<dyn SinkWriter<Row>>, SinkError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| io_err("create", &self.dir, e))?;
        for entry in std::fs::read_dir(&self.dir).map_err(|e| io_err("list", &self.dir, e))? {
            let entry = entry.map_err(|e| io_err("list", &self.dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((sub, epoch, suffix)) = parse_image_stage(&name) else { continue };
            if sub % ctx.parallelism != ctx.subtask {
                continue;
            }
            if suffix == "pending" && ctx.restored.is_some_and(|n| epoch <= n) {
                publish(&entry.path(), &self.dir)?;
            } else {
                std::fs::remove_dir_all(entry.path()).map_err(|e| io_err("discard", &entry.path(), e))?;
            }
        }
        Ok(Box::new(ImageSinkWriter {
            dir: self.dir.clone(),
            subtask: ctx.subtask,
            name_field: self.name_field,
            image_field: self.image_field,
            open: None,
            pending: Vec::new(),
        }))
    }
}

impl SinkWriter<Row> for ImageSinkWriter {
    fn write(&mut self, epoch: u64, batch: &mut Vec<Row>) -> Result<(), SinkError> {
        let stage = self.stage(epoch, "inprogress");
        if self.open.is_none() {
            std::fs::create_dir_all(&stage).map_err(|e| io_err("create", &stage, e))?;
            self.open = Some((epoch, 0));
        }
        for row in batch.drain(..) {
            let crate::row::Value::Image(img) = row.get(self.image_field) else {
                return Err(SinkError(format!("image sink: field {} is a {}, not an image", self.image_field, row.get(self.image_field).type_name())));
            };
            let stem = row.get(self.name_field).to_string();
            let stem = Path::new(&stem).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or(stem);
            let path = stage.join(format!("{stem}.png"));
            let (c, rgb) = (img.c, img.to_rgb8());
            let buf = match c {
                3 => image::RgbImage::from_raw(img.w as u32, img.h as u32, rgb).map(image::DynamicImage::ImageRgb8),
                1 => image::GrayImage::from_raw(img.w as u32, img.h as u32, rgb).map(image::DynamicImage::ImageLuma8),
                _ => None,
            }
            .ok_or_else(|| SinkError(format!("image sink: {stem}: {c} channels cannot be a PNG")))?;
            buf.save_with_format(&path, image::ImageFormat::Png).map_err(|e| SinkError(format!("image sink: write {}: {e}", path.display())))?;
            File::open(&path).and_then(|f| f.sync_all()).map_err(|e| io_err("fsync", &path, e))?;
            if let Some((_, n)) = self.open.as_mut() {
                *n += 1;
            }
        }
        Ok(())
    }

    fn pre_commit(&mut self, epoch: u64) -> Result<u64, SinkError> {
        let Some((e, n)) = self.open.take() else { return Ok(0) };
        debug_assert_eq!(e, epoch);
        let (from, to) = (self.stage(e, "inprogress"), self.stage(e, "pending"));
        fsync_dir(&from)?;
        std::fs::rename(&from, &to).map_err(|err| io_err("rename", &from, err))?;
        fsync_dir(&self.dir)?;
        self.pending.push(e);
        Ok(n)
    }

    fn commit(&mut self, upto: u64) -> Result<(), SinkError> {
        for e in self.pending.iter().copied().filter(|&e| e <= upto).collect::<Vec<_>>() {
            publish(&self.stage(e, "pending"), &self.dir)?;
        }
        self.pending.retain(|&e| e > upto);
        Ok(())
    }
}

/// Images (PNG, JPEG) of a directory, one row `(name, image)` each, in name order; one split per
/// file, identified by its name as in [`FileSource`], so a restore skips the images already read.
#[derive(Clone, Debug)]
pub struct ImageSource {
    dir: PathBuf,
}

impl ImageSource {
    /// The images in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    fn files(&self) -> Result<Vec<PathBuf>, SourceError> {
        let rd = std::fs::read_dir(&self.dir).map_err(|e| SourceError::transient(format!("source.path {}: {e}", self.dir.display())))?;
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
            })
            .collect();
        files.sort();
        Ok(files)
    }
}

struct ImageReader {
    /// (split with its key, file, read); the split's offset is 1 once read.
    files: Vec<(SplitOffset, PathBuf, bool)>,
}

impl Source<Row> for ImageSource {
    fn splits(&self) -> Result<Vec<SplitOffset>, SourceError> {
        file_splits(&self.files()?)
    }
    fn open(&self, _: &SourceContext, splits: Vec<SplitOffset>) -> Result<Box<dyn SourceReader<Row>>, SourceError> {
        let files = files_of_splits(&self.files()?, splits, self.root())?.into_iter().map(|(s, f)| {
            let done = s.offset > 0;
            (s, f, done)
        });
        Ok(Box::new(ImageReader { files: files.collect() }))
    }
    fn root(&self) -> Option<&Path> {
        Some(&self.dir)
    }
}

impl SourceReader<Row> for ImageReader {
    fn poll(&mut self, out: &mut Vec<Row>, max: usize) -> Result<Poll, SourceError> {
        // Images are large: one per poll keeps a batch's memory bounded.
        if let Some((_, path, done)) = self.files.iter_mut().find(|f| !f.2).filter(|_| max > 0) {
            let img = image::ImageReader::open(&*path)
                .and_then(|r| r.with_guessed_format())
                .map_err(|e| SourceError::transient(format!("{}: {e}", path.display())))?
                .decode()
                .map_err(|e| match e {
                    image::ImageError::IoError(e) => SourceError::transient(format!("{}: {e}", path.display())),
                    e => SourceError::deterministic(format!("{}: not a readable image: {e}", path.display())),
                })?
                .to_rgb8();
            let (w, h) = (img.width() as usize, img.height() as usize);
            let img = weir_gpu::kernels::Image::from_rgb8(w, h, img.as_raw()).map_err(|e| SourceError::deterministic(format!("{}: {e}", path.display())))?;
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            out.push(Row::new([Value::text(name), Value::Image(Arc::new(img))]));
            *done = true;
        }
        Ok(if self.files.iter().all(|f| f.2) { Poll::Finished } else { Poll::More })
    }
    fn offsets(&self) -> Vec<SplitOffset> {
        self.files.iter().map(|(s, _, done)| SplitOffset { offset: u64::from(*done), ..s.clone() }).collect()
    }
}
