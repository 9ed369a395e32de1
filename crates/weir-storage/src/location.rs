//! Where a job directory lives (a local directory or an S3 prefix), and the object store that
//! serves it.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ClientConfigKey, ObjectStore, RetryConfig};

use crate::StorageError;

/// The storage options this build knows (Flink's keys), all for S3.
pub const STORAGE_OPTIONS: &[&str] = &["s3.endpoint", "s3.access-key", "s3.secret-key", "s3.path.style.access", "s3.region"];

/// A parsed `execution.checkpointing.dir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Dir {
    /// A local directory (a path or a `file://` URL).
    Local(PathBuf),
    /// `s3://bucket/prefix` (`s3a://` too): the prefix without leading or trailing slashes.
    S3 { bucket: String, prefix: String },
}

impl Dir {
    pub(crate) fn parse(dir: &str) -> Result<Self, StorageError> {
        match dir.split_once("://") {
            None => Ok(Dir::Local(PathBuf::from(dir))),
            Some(("file", rest)) => Ok(Dir::Local(PathBuf::from(rest))),
            Some(("s3" | "s3a", rest)) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(StorageError::Location(format!("'{dir}': no bucket (expected s3://bucket/prefix)")));
                }
                let prefix = prefix.split('/').filter(|s| !s.is_empty()).collect::<Vec<_>>().join("/");
                Ok(Dir::S3 { bucket: bucket.to_string(), prefix })
            }
            Some((scheme, _)) => Err(StorageError::Location(format!(
                "'{dir}': scheme '{scheme}://' is not supported (supported: a local path, file://, s3://)"
            ))),
        }
    }

    /// The URL of `<self>/<job>` (`s3://bucket/prefix/job`), for messages; S3 only.
    pub(crate) fn s3_url(bucket: &str, key_prefix: &str) -> String {
        format!("s3://{bucket}/{key_prefix}")
    }
}

/// A process-wide runtime for the S3 client (reqwest needs one): callers block on it from
/// their own threads, while connection tasks run on its two workers.
static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();

fn runtime(url: &str) -> Result<&'static tokio::runtime::Runtime, StorageError> {
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("weir-storage-io")
        .enable_all()
        .build()
        .map_err(|e| StorageError::Io { op: "start the I/O runtime for", file: url.to_string(), source: Box::new(e) })?;
    // A lost race drops the spare runtime (outside any runtime: allowed).
    let _ = RUNTIME.set(rt);
    Ok(RUNTIME.get().expect("set above"))
}

/// How the storage runs object-store futures.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Executor {
    /// On the calling thread: the local store does its I/O inline when no runtime is current.
    Inline,
    /// On the S3 runtime.
    Runtime(&'static tokio::runtime::Runtime),
}

impl Executor {
    pub(crate) fn block_on<F: Future>(self, f: F) -> F::Output {
        match self {
            Executor::Inline => futures::executor::block_on(f),
            Executor::Runtime(rt) => rt.block_on(f),
        }
    }

    /// Start `f` now, so that it makes progress while the caller prepares the next part; the
    /// returned future yields its result.
    pub(crate) fn start(
        self,
        f: object_store::UploadPart,
    ) -> futures::future::BoxFuture<'static, Result<(), object_store::Error>> {
        use futures::FutureExt;
        match self {
            // Local part writes are synchronous file writes anyway.
            Executor::Inline => futures::future::ready(futures::executor::block_on(f)).boxed(),
            Executor::Runtime(rt) => {
                let handle = rt.spawn(f);
                async move {
                    handle.await.unwrap_or_else(|e| Err(object_store::Error::Generic { store: "S3", source: Box::new(e) }))
                }
                .boxed()
            }
        }
    }
}

/// The local store of job directory `job_dir` (created if missing), with fsync.
pub(crate) fn local_store(job_dir: &std::path::Path) -> Result<(Arc<dyn ObjectStore>, PathBuf), StorageError> {
    std::fs::create_dir_all(job_dir)
        .map_err(|e| StorageError::Io { op: "create", file: job_dir.display().to_string(), source: Box::new(e) })?;
    let local = std::fs::canonicalize(job_dir)
        .map_err(|e| StorageError::Io { op: "resolve", file: job_dir.display().to_string(), source: Box::new(e) })?;
    // with_fsync: data is fsynced before the rename that publishes it, so a crash never
    // leaves a published file with unwritten contents.
    let fs = LocalFileSystem::new_with_prefix(&local)
        .map_err(|e| StorageError::Location(format!("'{}': {e}", local.display())))?
        .with_fsync(true);
    Ok((Arc::new(fs), local))
}

/// The S3 store of `s3://bucket/key_prefix`: the standard AWS environment variables
/// (`AmazonS3Builder::from_env`) overridden by `options` (Flink's `s3.*` keys).
pub(crate) fn s3_store(
    bucket: &str,
    key_prefix: &str,
    options: &[(String, String)],
) -> Result<(Arc<dyn ObjectStore>, Executor), StorageError> {
    let url = Dir::s3_url(bucket, key_prefix);
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
    let mut virtual_hosted = None;
    for (key, value) in options {
        let bad = |message: &str| StorageError::Config { key: key.clone(), message: format!("'{value}': {message}") };
        b = match key.as_str() {
            // Also the S3-specific endpoint, which would otherwise win over this one when
            // AWS_ENDPOINT_URL_S3 is set: options override the environment.
            "s3.endpoint" => b.with_endpoint(value).with_config(AmazonS3ConfigKey::S3Endpoint, value),
            "s3.access-key" => b.with_access_key_id(value),
            "s3.secret-key" => b.with_secret_access_key(value),
            "s3.region" => b.with_region(value),
            "s3.path.style.access" => {
                virtual_hosted = Some(match value.as_str() {
                    "true" => false,
                    "false" => true,
                    _ => return Err(bad("expected true or false")),
                });
                b.with_virtual_hosted_style_request(virtual_hosted == Some(true))
            }
            _ => {
                return Err(StorageError::Config {
                    key: key.clone(),
                    message: format!("not a storage option (known: {})", STORAGE_OPTIONS.join(", ")),
                })
            }
        };
    }
    let endpoint = b.get_config_value(&AmazonS3ConfigKey::S3Endpoint).or_else(|| b.get_config_value(&AmazonS3ConfigKey::Endpoint));
    if let Some(e) = &endpoint {
        // A plain-http endpoint was asked for (a loopback or in-cluster server).
        if e.starts_with("http://") {
            b = b.with_allow_http(true);
        }
        // Flink's virtual-hosted style names the bucket in the host; object_store expects the
        // endpoint to carry it already.
        if virtual_hosted == Some(true) {
            if let Some((scheme, host)) = e.split_once("://") {
                if !host.starts_with(&format!("{bucket}.")) {
                    let e = format!("{scheme}://{bucket}.{host}");
                    b = b.with_endpoint(&e).with_config(AmazonS3ConfigKey::S3Endpoint, e);
                }
            }
        }
    }
    // An outage must fail a checkpoint within seconds (it is declined and the job goes on),
    // not stall the writers for the client's default of three minutes.
    b = b.with_retry(RetryConfig {
        backoff: BackoffConfig { init_backoff: Duration::from_millis(100), max_backoff: Duration::from_secs(2), base: 2.0 },
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
    });
    for (key, default) in [(ClientConfigKey::ConnectTimeout, "5s"), (ClientConfigKey::Timeout, "60s")] {
        if b.get_config_value(&AmazonS3ConfigKey::Client(key)).is_none() {
            b = b.with_config(AmazonS3ConfigKey::Client(key), default);
        }
    }
    let s3 = b.build().map_err(|e| StorageError::Location(format!("'{url}': {e}")))?;
    let store: Arc<dyn ObjectStore> = Arc::new(PrefixStore::new(s3, key_prefix));
    Ok((store, Executor::Runtime(runtime(&url)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirs_parse() {
        assert_eq!(Dir::parse("/tmp/x").unwrap(), Dir::Local("/tmp/x".into()));
        assert_eq!(Dir::parse("file:///tmp/x").unwrap(), Dir::Local("/tmp/x".into()));
        assert_eq!(Dir::parse("s3://b/a//c/").unwrap(), Dir::S3 { bucket: "b".into(), prefix: "a/c".into() });
        assert_eq!(Dir::parse("s3a://b").unwrap(), Dir::S3 { bucket: "b".into(), prefix: String::new() });
        assert!(Dir::parse("s3:///x").unwrap_err().to_string().contains("no bucket"));
        assert!(Dir::parse("gs://b/x").unwrap_err().to_string().contains("'gs://' is not supported"));
    }

    #[test]
    fn bad_options_name_the_key() {
        let opt = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let e = s3_store("b", "p", &opt("s3.path.style.access", "yes")).err().unwrap();
        assert!(e.to_string().contains("s3.path.style.access") && e.to_string().contains("true or false"), "{e}");
        let e = s3_store("b", "p", &opt("s3.endpoin", "http://x")).err().unwrap();
        assert!(e.to_string().contains("s3.endpoin:") && e.to_string().contains("s3.endpoint"), "{e}");
    }
}
