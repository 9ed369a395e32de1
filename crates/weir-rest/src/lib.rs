//! Weir's REST API: serves a running job's [`JobMonitor`] over HTTP in the shapes of Flink's REST
//! API (so Flink's tools and the dashboard read it), Prometheus metrics at `/metrics`, and the
//! static dashboard at `/`.
//!
//! ```no_run
//! # fn main() -> Result<(), weir_rest::RestError> {
//! let config = weir::config::JobConfig::default();
//! let monitor = weir::monitor::JobMonitor::new("my-job", &config);
//! let server = weir_rest::start(monitor, &config.rest)?;
//! println!("dashboard at {}, token in {}", server.url(), server.token_file().display());
//! server.shutdown();
//! # Ok(())
//! # }
//! ```
//!
//! It depends on `weir` (the model) and an HTTP stack (axum, tokio); the server runs on a thread
//! of its own with a single-threaded tokio runtime, and its handlers only take copies of the
//! model ([`JobMonitor::view`]) or queue commands ([`JobMonitor::submit`]), so it never blocks
//! or slows the job. Mutating calls need the bearer token ([`RestServer::token`]).
//!
//! Nothing in the runtime may depend on this crate: `weir` and the crates below it know only the
//! monitor; the CLI (`weir run`) is what starts a server.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;
use weir::config::RestSettings;
use weir::monitor::JobMonitor;

mod auth;
mod flink;
mod prometheus;
mod routes;

pub use auth::default_token_file;

/// Why the REST API could not start; messages name the config key at fault.
#[derive(Debug, thiserror::Error)]
pub enum RestError {
    /// `rest.address` does not resolve.
    #[error("rest.address '{address}': cannot resolve it: {message}")]
    Address {
        /// The address given.
        address: String,
        /// Why.
        message: String,
    },
    /// The port is taken (or the address is not this machine's).
    #[error("rest.port: cannot listen on {address}: {source} (another process may use the port; rest.port 0 picks a free one)")]
    Bind {
        /// Address and port.
        address: String,
        /// The bind error.
        source: std::io::Error,
    },
    /// A non-loopback `rest.address` without `rest.token-file`.
    #[error("rest.address '{address}' is not a loopback address: set rest.token-file to serve the REST API beyond this machine")]
    PublicWithoutToken {
        /// The address given.
        address: String,
    },
    /// `rest.token-file` cannot be read or is empty.
    #[error("rest.token-file '{}': {message}", path.display())]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A generated token cannot be written.
    #[error("cannot write the REST API token to {}: {message} (set rest.token-file to provide one)", path.display())]
    TokenWrite {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// No randomness for the token.
    #[error("cannot generate the REST API token: {0}")]
    Random(String),
    /// The server's thread or runtime cannot start.
    #[error("cannot start the REST API server: {0}")]
    Runtime(std::io::Error),
}

/// A running REST API server; stops on [`RestServer::shutdown`] or when dropped.
pub struct RestServer {
    addr: SocketAddr,
    token: String,
    token_file: PathBuf,
    /// A generated token's file is removed at shutdown (the token dies with the server).
    generated: bool,
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

/// How long open requests may take to finish once shutdown is asked for.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// Bind `settings.address:settings.port` now (a taken port fails here) and serve `monitor` on a
/// background thread. Whether to serve at all (`settings.enabled`) is the caller's decision.
pub fn start(monitor: Arc<JobMonitor>, settings: &RestSettings) -> Result<RestServer, RestError> {
    let address = settings.address.trim();
    let addrs: Vec<SocketAddr> = (address, settings.port)
        .to_socket_addrs()
        .map_err(|e| RestError::Address { address: address.to_string(), message: e.to_string() })?
        .collect();
    if addrs.is_empty() {
        return Err(RestError::Address { address: address.to_string(), message: "no addresses".into() });
    }
    if addrs.iter().any(|a| !a.ip().is_loopback()) && settings.token_file.is_none() {
        return Err(RestError::PublicWithoutToken { address: address.to_string() });
    }
    // Read a given token before binding: a bad file fails without having held the port.
    let given = settings.token_file.as_ref().map(|f| auth::read_token(Path::new(f))).transpose()?;
    let listener = TcpListener::bind(&addrs[..])
        .map_err(|source| RestError::Bind { address: format!("{address}:{}", settings.port), source })?;
    let addr = listener.local_addr().map_err(RestError::Runtime)?;
    listener.set_nonblocking(true).map_err(RestError::Runtime)?;
    let (token, token_file, generated) = match (given, &settings.token_file) {
        (Some(t), Some(f)) => (t, PathBuf::from(f), false),
        _ => {
            let t = auth::generate_token()?;
            let f = default_token_file(addr.port());
            auth::write_token(&f, &t)?;
            (t, f, true)
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().map_err(RestError::Runtime)?;
    let router = routes::router(Arc::new(routes::App { monitor, token: token.clone() }));
    let (stop, stopped) = watch::channel(false);
    let thread = std::thread::Builder::new()
        .name("weir-rest".into())
        .spawn(move || runtime.block_on(serve(listener, router, stopped)))
        .map_err(RestError::Runtime)?;
    let server = RestServer { addr, token, token_file, generated, stop, thread: Some(thread) };
    tracing::debug!("REST API and dashboard at {} (token in {})", server.url(), server.token_file.display());
    Ok(server)
}

async fn serve(listener: TcpListener, router: axum::Router, stopped: watch::Receiver<bool>) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("REST API: cannot serve: {e}");
            return;
        }
    };
    let mut asked = stopped.clone();
    // A dropped sender counts as a shutdown too.
    let signal = async move {
        let _ = asked.wait_for(|s| *s).await;
    };
    let mut asked = stopped;
    let deadline = async move {
        let _ = asked.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        r = axum::serve(listener, router).with_graceful_shutdown(signal) => {
            if let Err(e) = r {
                tracing::warn!("REST API stopped: {e}");
            }
        }
        _ = deadline => {}
    }
}

impl RestServer {
    /// The address it listens on (the port picked, for `rest.port` 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its base URL, e.g. `http://127.0.0.1:8081` (a loopback address where it listens on all).
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// The bearer token of the mutating calls.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The file holding the token (`rest.token-file`, or where a generated one was written).
    pub fn token_file(&self) -> &Path {
        &self.token_file
    }

    /// Stop serving and wait for the server's thread (at most about a second for open calls).
    pub fn shutdown(self) {
        drop(self)
    }

    fn stop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Another server may have taken the port and written its own token since.
        if self.generated && auth::read_token(&self.token_file).is_ok_and(|t| t == self.token) {
            let _ = std::fs::remove_file(&self.token_file);
        }
    }
}

impl Drop for RestServer {
    fn drop(&mut self) {
        self.stop();
    }
}
