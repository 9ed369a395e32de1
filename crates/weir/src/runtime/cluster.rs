//! The cluster's TCP connections, connected and authenticated by Weir, then handed to timely.
//!
//! timely's own `create_sockets` accepts any connection and trusts the process index a peer
//! writes first: a stranger can take a worker slot, an out-of-range index panics the process,
//! and a forged control message could commit sink output early. So Weir connects and accepts
//! itself, with the same topology as timely (process `i` connects to every `j < i` and accepts
//! every `j > i`), proves on each connection that both ends know the cluster's shared secret,
//! and gives the finished streams to `initialize_networking_from_sockets`.
//!
//! The handshake, connector `C` (process `i`) to listener `L` (process `j < i`):
//!
//! 1. `C → L` HELLO: `"WEIRCL"`, version 1, flags (bit 0: has a secret), processes (u64 BE),
//!    `i` (u64 BE), a fresh 32-byte random nonce.
//! 2. `L` checks magic, version, flags, process count and `j < i < processes`, or closes.
//!    `L → C` HELLO: the same fields with `j` and `L`'s own fresh nonce.
//! 3. `C` checks `L`'s HELLO (the expected index, same count and flags).
//!    `C → L` `HMAC-SHA256(secret, "C" ‖ HELLO_C ‖ HELLO_L)`.
//! 4. `L` verifies it (constant time) or closes.
//!    `L → C` `HMAC-SHA256(secret, "L" ‖ HELLO_C ‖ HELLO_L)`.
//! 5. `C` verifies it. The next bytes on the stream are timely's.
//!
//! Both nonces are in both proofs, so a recorded handshake cannot be replayed; the role byte
//! keeps one side's proof from being reflected back as the other's; the listener proves
//! nothing to a peer that has not proved itself first. Without a secret (allowed only when
//! every address in the hostfile is loopback) the same messages run with an empty HMAC key:
//! no authentication, but a garbage client is still refused instead of crashing the process.
//! The handshake has a deadline, and runs on its own thread per connection, so a silent client
//! cannot stall the listener. The streams are not encrypted: the secret authenticates peers
//! at connection time, it does not protect the traffic from an on-path attacker.

use std::any::Any;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
use timely::communication::allocator::ProcessBuilder;
use timely::communication::{AllocatorBuilder, Hooks};

use super::ClusterConfig;
use crate::config::{ConfigError, JobConfig};

/// The environment variable that holds the cluster's shared secret.
pub const SECRET_ENV: &str = "WEIR_CLUSTER_SECRET";
/// The config key naming a file that holds the cluster's shared secret.
pub const SECRET_FILE_KEY: &str = "cluster.secret-file";

/// How long one handshake may take, from accept (or connect) to the last proof.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes a listener runs at once; more connections are dropped unanswered (a flood of
/// strangers must not spawn unbounded threads).
const MAX_PENDING_HANDSHAKES: usize = 64;
/// How often the listener polls for new connections and cancellation.
const POLL: Duration = Duration::from_millis(50);
/// Connecting to a peer that is not up yet: retry interval, and the limit on one attempt.
const CONNECT_RETRY: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed handshake with a peer (wrong secret, wrong process): retry interval.
const HANDSHAKE_RETRY: Duration = Duration::from_secs(1);

const MAGIC: &[u8; 6] = b"WEIRCL";
const VERSION: u8 = 1;
const FLAG_SECRET: u8 = 1;
const NONCE_LEN: usize = 32;
const HELLO_LEN: usize = 6 + 1 + 1 + 8 + 8 + NONCE_LEN;
const PROOF_LEN: usize = 32;
const ROLE_CONNECTOR: u8 = b'C';
const ROLE_LISTENER: u8 = b'L';

/// The cluster's shared secret. Its bytes never appear in `Debug` output or logs.
#[derive(Clone)]
pub struct Secret {
    bytes: Arc<[u8]>,
    origin: String,
    file: Option<String>,
}

impl Secret {
    /// A secret from raw bytes; `origin` says where it came from, for logs.
    pub fn new(bytes: impl Into<Vec<u8>>, origin: &str) -> Self {
        Secret { bytes: bytes.into().into(), origin: origin.to_string(), file: None }
    }

    /// Where the secret came from (the env variable or the file), never its value.
    pub fn origin(&self) -> &str {
        &self.origin
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret({} bytes from {})", self.bytes.len(), self.origin)
    }
}

/// Why the cluster's connections could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// `cluster.secret-file` is unreadable or empty, or a secret is required and missing.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `WEIR_CLUSTER_SECRET` is set to nothing.
    #[error("environment variable {SECRET_ENV} is set but empty: give it the cluster secret or unset it")]
    EmptyEnv,
    /// `--process` is not an index into the hostfile.
    #[error("process {process} is not in the hostfile's {processes} processes")]
    Process {
        /// This process's index.
        process: usize,
        /// Processes in the hostfile.
        processes: usize,
    },
    /// This process's own address could not be bound.
    #[error("listening on {address} (process {process}): {source}")]
    Bind {
        /// This process's index.
        process: usize,
        /// The address from the hostfile.
        address: String,
        /// The bind error.
        source: io::Error,
    },
    /// The job was cancelled while the processes were still connecting.
    #[error("cancelled while connecting to the other processes")]
    Cancelled,
    /// timely's network threads could not start.
    #[error("starting the network threads: {0}")]
    Network(io::Error),
    /// timely refused the single-process configuration.
    #[error("{0}")]
    Timely(String),
}

impl ClusterError {
    /// A configuration error: no restart can fix it.
    pub fn is_config(&self) -> bool {
        matches!(self, ClusterError::Config(_) | ClusterError::EmptyEnv | ClusterError::Process { .. })
    }
}

/// Why one handshake failed. The peer is refused; the listener goes on waiting.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// Reading or writing the stream failed (including the deadline passing).
    #[error("{0}")]
    Io(#[source] io::Error),
    /// The peer closed the connection mid-handshake (a listener does this when it refuses).
    #[error("the peer closed the connection during the handshake (does it use the same secret and hostfile?)")]
    Closed,
    /// The handshake did not finish in time.
    #[error("no complete handshake within {0:?}")]
    TimedOut(Duration),
    /// The first bytes are not a Weir cluster HELLO.
    #[error("not a Weir cluster peer (bad magic bytes)")]
    BadMagic,
    /// Another protocol version.
    #[error("handshake version {0}, this build speaks {VERSION}")]
    Version(u8),
    /// One side has a secret and the other has not.
    #[error("{}", if *.ours { "the peer has no cluster secret, this process has one" } else { "the peer has a cluster secret, this process has none" })]
    SecretMismatch {
        /// Whether this process has a secret.
        ours: bool,
    },
    /// The peer's hostfile lists another number of processes.
    #[error("the peer's hostfile lists {theirs} processes, this one {ours}")]
    Processes {
        /// The peer's count.
        theirs: u64,
        /// Ours.
        ours: usize,
    },
    /// The peer claims an index it cannot have on this connection.
    #[error("process index {got} is out of range (expected {expected})")]
    Index {
        /// The index the peer sent.
        got: u64,
        /// What this connection allows.
        expected: String,
    },
    /// The peer's proof does not verify: it does not know the secret.
    #[error("wrong cluster secret (HMAC mismatch)")]
    BadProof,
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => HandshakeError::Closed,
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => HandshakeError::TimedOut(HANDSHAKE_TIMEOUT),
            _ => HandshakeError::Io(e),
        }
    }
}

/// The cluster secret for this job: `cluster.secret-file` if set, else `WEIR_CLUSTER_SECRET`.
/// Refuses an unreadable or empty secret, and a missing one when the hostfile names an address
/// that is not loopback. `None`: a single process, or a loopback-only cluster without a secret.
pub fn resolve_secret(config: &JobConfig, cluster: &ClusterConfig) -> Result<Option<Secret>, ClusterError> {
    resolve_secret_from(std::env::var_os(SECRET_ENV), config, cluster)
}

fn resolve_secret_from(env: Option<OsString>, config: &JobConfig, cluster: &ClusterConfig) -> Result<Option<Secret>, ClusterError> {
    if cluster.processes() <= 1 {
        return Ok(None);
    }
    if cluster.process >= cluster.processes() {
        return Err(ClusterError::Process { process: cluster.process, processes: cluster.processes() });
    }
    let secret = if let Some(path) = &config.cluster_secret_file {
        let key_error = |message: String| ConfigError { key: SECRET_FILE_KEY.into(), message };
        let bytes = std::fs::read(path).map_err(|e| key_error(format!("cannot read the cluster secret from {path}: {e}")))?;
        let bytes = bytes.trim_ascii();
        if bytes.is_empty() {
            return Err(key_error(format!("{path} is empty: it must hold the cluster secret")).into());
        }
        Some(Secret { file: Some(path.clone()), ..Secret::new(bytes, &format!("{SECRET_FILE_KEY} {path}")) })
    } else if let Some(value) = env {
        // A file's trailing newline and an env value's are the same secret.
        let bytes = value.into_encoded_bytes();
        let bytes = bytes.trim_ascii();
        if bytes.is_empty() {
            return Err(ClusterError::EmptyEnv);
        }
        Some(Secret::new(bytes, SECRET_ENV))
    } else {
        None
    };
    if secret.is_none() {
        if let Some(address) = cluster.hosts.iter().flat_map(|h| h.split_whitespace()).find(|a| !is_loopback(a)) {
            return Err(ConfigError {
                key: SECRET_FILE_KEY.into(),
                message: format!(
                    "the hostfile names {address}, which is not a loopback address: processes on a network must \
                     authenticate each other, so set {SECRET_ENV} or {SECRET_FILE_KEY} (the same secret on every process)"
                ),
            }
            .into());
        }
    }
    Ok(secret)
}

/// Warn (once per attempt, not at the CLI's early check) about a weak or exposed secret.
fn warn_if_weak(secret: &Secret) {
    if secret.bytes.len() < 16 {
        tracing::warn!("the cluster secret from {} is only {} bytes: use 16 or more random bytes", secret.origin, secret.bytes.len());
    }
    #[cfg(unix)]
    if let Some(path) = &secret.file {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o077 != 0 {
                tracing::warn!("{SECRET_FILE_KEY} {path} can be read by other users (mode {:o}): chmod 600 it", m.permissions().mode() & 0o777);
            }
        }
    }
}

/// Whether `address` (`host:port`) only ever means this machine. An unresolvable name is not.
fn is_loopback(address: &str) -> bool {
    match address.to_socket_addrs() {
        Ok(addrs) => {
            let addrs: Vec<SocketAddr> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback())
        }
        Err(_) => false,
    }
}

/// Build timely's communication for one attempt: a single process as `Config::Process`; in a
/// cluster, this process's authenticated sockets wired up as timely's `Config::Cluster` would
/// (`zerocopy: false`, no report).
pub(crate) fn communication(
    workers: usize,
    cluster: &ClusterConfig,
    config: &JobConfig,
    cancel: &AtomicBool,
) -> Result<(Vec<AllocatorBuilder>, Box<dyn Any + Send>), ClusterError> {
    if cluster.processes() <= 1 {
        return timely::CommunicationConfig::Process(workers).try_build().map_err(ClusterError::Timely);
    }
    let secret = resolve_secret(config, cluster)?;
    secret.iter().for_each(warn_if_weak);
    let sockets = connect(&cluster.hosts, cluster.process, secret.as_ref(), cancel)?;
    let hooks = Hooks::default();
    let process = ProcessBuilder::new_typed_vector(workers, hooks.refill.clone(), hooks.spill.clone());
    let (builders, guard) =
        initialize_networking_from_sockets(process, sockets, cluster.process, workers, hooks).map_err(ClusterError::Network)?;
    Ok((builders.into_iter().map(AllocatorBuilder::Tcp).collect(), Box::new(guard)))
}

/// Connect this process to every other: one stream per process in process order, `None` at
/// `me`. Waits for the peers (as timely does) until they are all in or `cancel` is set.
pub fn connect(hosts: &[String], me: usize, secret: Option<&Secret>, cancel: &AtomicBool) -> Result<Vec<Option<TcpStream>>, ClusterError> {
    let n = hosts.len();
    if me >= n {
        return Err(ClusterError::Process { process: me, processes: n });
    }
    // Bind first: a process that cannot listen fails before its peers count on it.
    let listeners = if me + 1 < n {
        hosts[me]
            .split_whitespace()
            .map(|a| {
                let bind = |a: &str| -> io::Result<TcpListener> {
                    let l = TcpListener::bind(a)?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                };
                bind(a).map_err(|source| ClusterError::Bind { process: me, address: a.to_string(), source })
            })
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    match secret {
        Some(s) => tracing::info!("cluster: process {me} of {n}, connections authenticated with the secret from {}", s.origin()),
        None => tracing::info!("cluster: process {me} of {n}, no cluster secret (loopback only): connections are not authenticated"),
    }
    let (lower, higher) = std::thread::scope(|s| {
        let dialer = std::thread::Builder::new()
            .name("weir-cluster-connect".into())
            .spawn_scoped(s, || dial_lower(hosts, me, secret, cancel))
            .map_err(ClusterError::Network)?;
        let higher = accept_higher(&listeners, me, n, secret, cancel);
        // The dialer only ends connected or cancelled; it does not panic on peers' input.
        let lower = dialer.join().unwrap_or(None);
        Ok::<_, ClusterError>((lower, higher))
    })?;
    let (Some(lower), Some(higher)) = (lower, higher) else {
        return Err(ClusterError::Cancelled);
    };
    let mut sockets: Vec<Option<TcpStream>> = lower.into_iter().map(Some).collect();
    sockets.push(None);
    sockets.extend(higher.into_iter().map(Some));
    tracing::info!("cluster: process {me} connected to its {} peer(s)", n - 1);
    Ok(sockets)
}

/// Sleep `d` in short steps; false if `cancel` was set.
fn sleep_unless(cancel: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if cancel.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(POLL.min(until.saturating_duration_since(Instant::now())));
    }
    !cancel.load(Ordering::SeqCst)
}

/// Connect to processes `0..me` in order, retrying until each is up and proves the secret.
fn dial_lower(hosts: &[String], me: usize, secret: Option<&Secret>, cancel: &AtomicBool) -> Option<Vec<TcpStream>> {
    let mut out = Vec::with_capacity(me);
    for (peer, entry) in hosts.iter().enumerate().take(me) {
        // timely connects to the whole entry; its first address is the one peers dial.
        let address = entry.split_whitespace().next().unwrap_or(entry);
        let mut waiting_logged = false;
        let stream = loop {
            if cancel.load(Ordering::SeqCst) {
                return None;
            }
            match connect_to(address) {
                Ok(mut stream) => {
                    let remote = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "?".into());
                    match dial(&mut stream, me, peer, hosts.len(), secret) {
                        Ok(()) => {
                            tracing::info!("cluster: connected to process {peer} at {address} ({remote})");
                            break stream;
                        }
                        Err(e) => {
                            tracing::warn!("cluster: refused process {peer} at {address} ({remote}): {e}; retrying");
                            if !sleep_unless(cancel, HANDSHAKE_RETRY) {
                                return None;
                            }
                        }
                    }
                }
                Err(e) => {
                    if !waiting_logged {
                        tracing::info!("cluster: waiting for process {peer} at {address} ({e})");
                        waiting_logged = true;
                    }
                    if !sleep_unless(cancel, CONNECT_RETRY) {
                        return None;
                    }
                }
            }
        };
        out.push(stream);
    }
    Some(out)
}

fn connect_to(address: &str) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{address} resolves to no address"));
    for a in address.to_socket_addrs()? {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Accept processes `me + 1..n`, each handshake on its own thread; refuse and log everything
/// else, and keep waiting.
fn accept_higher(listeners: &[TcpListener], me: usize, n: usize, secret: Option<&Secret>, cancel: &AtomicBool) -> Option<Vec<TcpStream>> {
    let mut slots: Vec<Option<TcpStream>> = (me + 1..n).map(|_| None).collect();
    let (tx, rx) = channel::<(SocketAddr, Result<(usize, TcpStream), HandshakeError>)>();
    let pending = Arc::new(AtomicUsize::new(0));
    if !slots.is_empty() {
        let at: Vec<String> = listeners.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.to_string()).collect();
        let peers = if me + 2 == n { format!("process {}", me + 1) } else { format!("processes {}..={}", me + 1, n - 1) };
        tracing::info!("cluster: process {me} listening on {} for {peers}", at.join(", "));
    }
    while slots.iter().any(Option::is_none) {
        if cancel.load(Ordering::SeqCst) {
            return None;
        }
        for listener in listeners {
            loop {
                match listener.accept() {
                    Ok((mut stream, addr)) => {
                        if pending.load(Ordering::SeqCst) >= MAX_PENDING_HANDSHAKES {
                            tracing::warn!("cluster: refused connection from {addr}: {MAX_PENDING_HANDSHAKES} handshakes already in progress");
                            continue;
                        }
                        pending.fetch_add(1, Ordering::SeqCst);
                        let (tx, in_progress, secret) = (tx.clone(), pending.clone(), secret.cloned());
                        let spawned = std::thread::Builder::new().name("weir-cluster-handshake".into()).spawn(move || {
                            let result = accept_peer(&mut stream, me, n, secret.as_ref()).map(|peer| (peer, stream));
                            in_progress.fetch_sub(1, Ordering::SeqCst);
                            // The listener may have all its peers already; then nobody waits.
                            let _ = tx.send((addr, result));
                        });
                        if let Err(e) = spawned {
                            pending.fetch_sub(1, Ordering::SeqCst);
                            tracing::warn!("cluster: refused connection from {addr}: no thread for its handshake: {e}");
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        // Out of file descriptors and the like: transient, try again next poll.
                        tracing::warn!("cluster: accepting a connection: {e}");
                        break;
                    }
                }
            }
        }
        match rx.recv_timeout(POLL) {
            Ok((addr, Ok((peer, stream)))) => {
                let slot = &mut slots[peer - me - 1];
                if slot.is_some() {
                    tracing::warn!("cluster: refused connection from {addr}: process {peer} is already connected");
                } else {
                    tracing::info!("cluster: accepted process {peer} from {addr}");
                    *slot = Some(stream);
                }
            }
            Ok((addr, Err(e))) => tracing::warn!("cluster: refused connection from {addr}: {e}"),
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
    }
    Some(slots.into_iter().flatten().collect())
}

/// The connector's side of the handshake on a connected stream: this process is `me`, the
/// listener should be process `peer` of `processes`. On success the stream is timely's.
pub fn dial(stream: &mut TcpStream, me: usize, peer: usize, processes: usize, secret: Option<&Secret>) -> Result<(), HandshakeError> {
    dial_within(stream, me, peer, processes, secret, HANDSHAKE_TIMEOUT)
}

fn dial_within(
    stream: &mut TcpStream,
    me: usize,
    peer: usize,
    processes: usize,
    secret: Option<&Secret>,
    timeout: Duration,
) -> Result<(), HandshakeError> {
    let deadline = Instant::now() + timeout;
    prepare(stream, timeout)?;
    let ours = hello(me, processes, secret.is_some())?;
    stream.write_all(&ours)?;
    let mut theirs = [0u8; HELLO_LEN];
    read_full(stream, &mut theirs, deadline, timeout)?;
    let index = check_hello(&theirs, processes, secret.is_some())?;
    if index != peer as u64 {
        return Err(HandshakeError::Index { got: index, expected: format!("process {peer}, the one at this address") });
    }
    stream.write_all(&proof(secret, ROLE_CONNECTOR, &ours, &theirs))?;
    let mut answer = [0u8; PROOF_LEN];
    read_full(stream, &mut answer, deadline, timeout)?;
    verify(secret, ROLE_LISTENER, &ours, &theirs, &answer)?;
    finish(stream)?;
    Ok(())
}

/// The listener's side of the handshake on an accepted stream: this process is `me` of
/// `processes`. Returns the peer's index (in `me + 1..processes`), proven with the secret.
pub fn accept_peer(stream: &mut TcpStream, me: usize, processes: usize, secret: Option<&Secret>) -> Result<usize, HandshakeError> {
    accept_within(stream, me, processes, secret, HANDSHAKE_TIMEOUT)
}

fn accept_within(stream: &mut TcpStream, me: usize, processes: usize, secret: Option<&Secret>, timeout: Duration) -> Result<usize, HandshakeError> {
    let deadline = Instant::now() + timeout;
    prepare(stream, timeout)?;
    let mut theirs = [0u8; HELLO_LEN];
    read_full(stream, &mut theirs, deadline, timeout)?;
    let index = check_hello(&theirs, processes, secret.is_some())?;
    // Only higher processes connect to this one (timely's topology).
    if index <= me as u64 || index >= processes as u64 {
        return Err(HandshakeError::Index { got: index, expected: format!("{}..{}", me + 1, processes.saturating_sub(1)) });
    }
    let ours = hello(me, processes, secret.is_some())?;
    stream.write_all(&ours)?;
    let mut their_proof = [0u8; PROOF_LEN];
    read_full(stream, &mut their_proof, deadline, timeout)?;
    verify(secret, ROLE_CONNECTOR, &theirs, &ours, &their_proof)?;
    stream.write_all(&proof(secret, ROLE_LISTENER, &theirs, &ours))?;
    finish(stream)?;
    Ok(index as usize)
}

fn prepare(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(timeout))
}

/// timely's network threads expect plain blocking streams.
fn finish(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)
}

/// Read exactly `buf.len()` bytes before `deadline` (one deadline for the whole handshake, so a
/// client dripping one byte at a time cannot hold it open longer).
fn read_full(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant, timeout: Duration) -> Result<(), HandshakeError> {
    let mut filled = 0;
    while filled < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::TimedOut(timeout));
        }
        stream.set_read_timeout(Some(left))?;
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return Err(HandshakeError::Closed),
            Ok(k) => filled += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(HandshakeError::TimedOut(timeout))
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

fn hello(index: usize, processes: usize, has_secret: bool) -> io::Result<[u8; HELLO_LEN]> {
    let mut m = [0u8; HELLO_LEN];
    m[..6].copy_from_slice(MAGIC);
    m[6] = VERSION;
    m[7] = if has_secret { FLAG_SECRET } else { 0 };
    m[8..16].copy_from_slice(&(processes as u64).to_be_bytes());
    m[16..24].copy_from_slice(&(index as u64).to_be_bytes());
    getrandom::fill(&mut m[24..]).map_err(|e| io::Error::other(format!("no randomness for the handshake nonce: {e}")))?;
    Ok(m)
}

/// Check a peer's HELLO against this process's view; returns the index it claims.
fn check_hello(m: &[u8; HELLO_LEN], processes: usize, has_secret: bool) -> Result<u64, HandshakeError> {
    if &m[..6] != MAGIC {
        return Err(HandshakeError::BadMagic);
    }
    if m[6] != VERSION {
        return Err(HandshakeError::Version(m[6]));
    }
    if (m[7] & FLAG_SECRET != 0) != has_secret {
        return Err(HandshakeError::SecretMismatch { ours: has_secret });
    }
    let theirs = u64::from_be_bytes(m[8..16].try_into().expect("8 bytes"));
    if theirs != processes as u64 {
        return Err(HandshakeError::Processes { theirs, ours: processes });
    }
    Ok(u64::from_be_bytes(m[16..24].try_into().expect("8 bytes")))
}

fn mac(secret: Option<&Secret>, role: u8, connector: &[u8; HELLO_LEN], listener: &[u8; HELLO_LEN]) -> Hmac<Sha256> {
    // No secret: an empty key, so the messages are the same but prove nothing (loopback only).
    let key: &[u8] = secret.map(|s| &s.bytes[..]).unwrap_or(&[]);
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes a key of any length");
    m.update(&[role]);
    m.update(connector);
    m.update(listener);
    m
}

fn proof(secret: Option<&Secret>, role: u8, connector: &[u8; HELLO_LEN], listener: &[u8; HELLO_LEN]) -> [u8; PROOF_LEN] {
    mac(secret, role, connector, listener).finalize().into_bytes().into()
}

fn verify(secret: Option<&Secret>, role: u8, connector: &[u8; HELLO_LEN], listener: &[u8; HELLO_LEN], tag: &[u8]) -> Result<(), HandshakeError> {
    // Constant-time comparison (hmac's `verify_slice`).
    mac(secret, role, connector, listener).verify_slice(tag).map_err(|_| HandshakeError::BadProof)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes(), "test")
    }

    fn pair() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    /// Listener `me` of `n` with `ls`, connector `dial_as` claiming to be `claim` with `ds`.
    fn handshake(
        n: usize,
        me: usize,
        claim: usize,
        ls: Option<Secret>,
        ds: Option<Secret>,
    ) -> (Result<usize, HandshakeError>, Result<(), HandshakeError>) {
        let (l, addr) = pair();
        let listener = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            accept_within(&mut s, me, n, ls.as_ref(), Duration::from_secs(5))
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let dialed = dial_within(&mut c, claim, me, n, ds.as_ref(), Duration::from_secs(5));
        drop(c);
        (listener.join().unwrap(), dialed)
    }

    #[test]
    fn same_secret_authenticates_both_ways() {
        let (l, d) = handshake(3, 0, 2, Some(secret("s3cret-s3cret-s3cret")), Some(secret("s3cret-s3cret-s3cret")));
        assert_eq!(l.unwrap(), 2);
        d.unwrap();
    }

    #[test]
    fn no_secret_on_either_side_still_handshakes() {
        let (l, d) = handshake(2, 0, 1, None, None);
        assert_eq!(l.unwrap(), 1);
        d.unwrap();
    }

    #[test]
    fn wrong_secret_is_refused_by_the_listener() {
        let (l, d) = handshake(2, 0, 1, Some(secret("right")), Some(secret("wrong")));
        assert!(matches!(l, Err(HandshakeError::BadProof)), "{l:?}");
        // The listener closes without proving anything: the connector sees the refusal.
        assert!(matches!(d, Err(HandshakeError::Closed)), "{d:?}");
    }

    #[test]
    fn a_secret_on_one_side_only_is_refused() {
        let (l, _) = handshake(2, 0, 1, Some(secret("right")), None);
        assert!(matches!(l, Err(HandshakeError::SecretMismatch { ours: true })), "{l:?}");
        let (l, _) = handshake(2, 0, 1, None, Some(secret("right")));
        assert!(matches!(l, Err(HandshakeError::SecretMismatch { ours: false })), "{l:?}");
    }

    #[test]
    fn out_of_range_and_lower_indices_are_refused() {
        for claim in [0, 1, 5] {
            let (l, _) = handshake(3, 1, claim, Some(secret("k")), Some(secret("k")));
            assert!(matches!(l, Err(HandshakeError::Index { .. })), "claim {claim}: {l:?}");
        }
        // A connector claiming an index beyond any `usize` the listener could index with.
        let (l, addr) = pair();
        let t = thread::spawn(move || accept_within(&mut l.accept().unwrap().0, 0, 2, None, Duration::from_secs(5)));
        let mut c = TcpStream::connect(addr).unwrap();
        let mut m = hello(0, 2, false).unwrap();
        m[16..24].copy_from_slice(&u64::MAX.to_be_bytes());
        c.write_all(&m).unwrap();
        assert!(matches!(t.join().unwrap(), Err(HandshakeError::Index { got: u64::MAX, .. })));
    }

    #[test]
    fn another_process_count_is_refused() {
        let (l, addr) = pair();
        let t = thread::spawn(move || accept_within(&mut l.accept().unwrap().0, 0, 2, None, Duration::from_secs(5)));
        let mut c = TcpStream::connect(addr).unwrap();
        let _ = dial_within(&mut c, 1, 0, 3, None, Duration::from_secs(5));
        assert!(matches!(t.join().unwrap(), Err(HandshakeError::Processes { theirs: 3, ours: 2 })));
    }

    #[test]
    fn garbage_and_timely_style_clients_are_refused() {
        for bytes in [vec![0xA5u8; 200], 1u64.to_be_bytes().to_vec(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(3)] {
            let (l, addr) = pair();
            let t = thread::spawn(move || accept_within(&mut l.accept().unwrap().0, 0, 2, None, Duration::from_millis(500)));
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(&bytes).unwrap();
            let r = t.join().unwrap();
            // Short input times out (the connection stays open); long input fails the magic.
            assert!(matches!(r, Err(HandshakeError::BadMagic | HandshakeError::TimedOut(_))), "{r:?}");
        }
    }

    #[test]
    fn a_silent_or_dripping_client_times_out_at_the_deadline() {
        let (l, addr) = pair();
        let t = thread::spawn(move || {
            let start = Instant::now();
            let r = accept_within(&mut l.accept().unwrap().0, 0, 2, None, Duration::from_millis(300));
            (r, start.elapsed())
        });
        let mut c = TcpStream::connect(addr).unwrap();
        for b in MAGIC {
            // Past the deadline the listener has closed: the write may fail, that's the point.
            let _ = c.write_all(&[*b]);
            thread::sleep(Duration::from_millis(100));
        }
        let (r, took) = t.join().unwrap();
        assert!(matches!(r, Err(HandshakeError::TimedOut(_))), "{r:?}");
        assert!(took < Duration::from_millis(1000), "one deadline for the whole handshake, took {took:?}");
    }

    #[test]
    fn a_connector_refuses_a_listener_with_another_secret_or_index() {
        // A listener that answers with a valid HELLO but cannot prove the secret.
        let (l, addr) = pair();
        let fake = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut theirs = [0u8; HELLO_LEN];
            s.read_exact(&mut theirs).unwrap();
            let ours = hello(0, 2, true).unwrap();
            s.write_all(&ours).unwrap();
            let mut p = [0u8; PROOF_LEN];
            s.read_exact(&mut p).unwrap();
            s.write_all(&proof(Some(&secret("other")), ROLE_LISTENER, &theirs, &ours)).unwrap();
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let r = dial_within(&mut c, 1, 0, 2, Some(&secret("mine")), Duration::from_secs(5));
        assert!(matches!(r, Err(HandshakeError::BadProof)), "{r:?}");
        fake.join().unwrap();
        // A listener claiming another index than the address's process.
        let (l, addr) = pair();
        let fake = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut theirs = [0u8; HELLO_LEN];
            s.read_exact(&mut theirs).unwrap();
            s.write_all(&hello(1, 3, false).unwrap()).unwrap();
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let r = dial_within(&mut c, 2, 0, 3, None, Duration::from_secs(5));
        assert!(matches!(r, Err(HandshakeError::Index { got: 1, .. })), "{r:?}");
        fake.join().unwrap();
    }

    #[test]
    fn proofs_differ_by_role_and_nonce() {
        let s = secret("k");
        let (a, b) = (hello(1, 2, true).unwrap(), hello(0, 2, true).unwrap());
        assert_ne!(proof(Some(&s), ROLE_CONNECTOR, &a, &b), proof(Some(&s), ROLE_LISTENER, &a, &b));
        let b2 = hello(0, 2, true).unwrap();
        assert_ne!(b[24..], b2[24..], "fresh nonces");
        assert_ne!(proof(Some(&s), ROLE_CONNECTOR, &a, &b), proof(Some(&s), ROLE_CONNECTOR, &a, &b2));
        assert!(verify(Some(&s), ROLE_CONNECTOR, &a, &b, &proof(Some(&s), ROLE_CONNECTOR, &a, &b)).is_ok());
    }

    fn hosts(n: usize) -> Vec<String> {
        (0..n).map(|_| format!("127.0.0.1:{}", pair().1.port())).collect()
    }

    /// Three processes connect with strangers knocking first; every stream reaches the right
    /// peer, and nothing of the handshake is left on the wire for timely.
    #[test]
    fn three_processes_connect_past_strangers() {
        let hosts = hosts(3);
        let s = secret("cluster-secret-for-tests");
        let cancel = AtomicBool::new(false);
        let all = thread::scope(|scope| {
            let start = |me: usize| {
                let (hosts, s, cancel) = (&hosts, &s, &cancel);
                scope.spawn(move || (me, connect(hosts, me, Some(s), cancel).unwrap()))
            };
            // Process 0 first, alone: the strangers reach it before its peers do.
            let mut handles = vec![start(0)];
            let stranger = |f: &dyn Fn(&mut TcpStream)| loop {
                if let Ok(mut c) = TcpStream::connect(&hosts[0]) {
                    f(&mut c);
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            };
            stranger(&|c| c.write_all(&[0xFF; 100]).unwrap());
            stranger(&|c| c.write_all(&7u64.to_be_bytes()).unwrap());
            stranger(&|c| assert!(matches!(dial(c, 1, 0, 3, Some(&secret("wrong"))), Err(HandshakeError::Closed))));
            handles.extend([start(2), start(1)]);
            let mut all: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            all.sort_by_key(|(me, _)| *me);
            all
        });
        let mut socks: Vec<Vec<Option<TcpStream>>> = all.into_iter().map(|(_, s)| s).collect();
        for (me, row) in socks.iter().enumerate() {
            assert_eq!(row.len(), 3);
            assert!(row[me].is_none());
        }
        for (a, row) in socks.iter_mut().enumerate() {
            for (b, s) in row.iter_mut().enumerate() {
                if let Some(s) = s {
                    s.write_all(&[a as u8, b as u8]).unwrap();
                }
            }
        }
        for (b, row) in socks.iter_mut().enumerate() {
            for (a, s) in row.iter_mut().enumerate() {
                if let Some(s) = s {
                    let mut got = [0u8; 2];
                    s.read_exact(&mut got).unwrap();
                    assert_eq!(got, [a as u8, b as u8], "stream {a} → {b}");
                }
            }
        }
    }

    #[test]
    fn cancel_stops_waiting() {
        let hosts = hosts(2);
        let cancel = AtomicBool::new(false);
        thread::scope(|s| {
            let t = s.spawn(|| connect(&hosts, 0, None, &cancel));
            thread::sleep(Duration::from_millis(200));
            cancel.store(true, Ordering::SeqCst);
            assert!(matches!(t.join().unwrap(), Err(ClusterError::Cancelled)));
        });
    }

    fn cfg(pairs: &[(&str, &str)]) -> JobConfig {
        JobConfig::from_pairs(pairs.iter().copied()).unwrap()
    }

    fn cluster(hosts: &[&str]) -> ClusterConfig {
        ClusterConfig { process: 0, hosts: hosts.iter().map(|h| h.to_string()).collect() }
    }

    #[test]
    fn secret_resolution() {
        let dir = std::env::temp_dir().join(format!("weir-cluster-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (good, empty, missing) = (dir.join("good"), dir.join("empty"), dir.join("missing"));
        std::fs::write(&good, "0123456789abcdef0123\n").unwrap();
        std::fs::write(&empty, " \n").unwrap();
        let local = cluster(&["127.0.0.1:1", "localhost:2"]);
        let remote = cluster(&["127.0.0.1:1", "192.0.2.7:2"]);
        let file = |p: &std::path::Path| cfg(&[(SECRET_FILE_KEY, p.to_str().unwrap())]);

        // Loopback without a secret: allowed. One process: no sockets, no secret needed.
        assert!(resolve_secret_from(None, &JobConfig::default(), &local).unwrap().is_none());
        assert!(resolve_secret_from(None, &JobConfig::default(), &cluster(&["192.0.2.7:2"])).unwrap().is_none());
        // A network address without a secret: refused, naming both ways to give one.
        let e = resolve_secret_from(None, &JobConfig::default(), &remote).unwrap_err().to_string();
        assert!(e.contains(SECRET_FILE_KEY) && e.contains(SECRET_ENV) && e.contains("192.0.2.7:2"), "{e}");
        // The file: trimmed; unreadable or empty refused naming the key.
        let s = resolve_secret_from(None, &file(&good), &remote).unwrap().unwrap();
        assert_eq!(&s.bytes[..], b"0123456789abcdef0123");
        assert!(!format!("{s:?}").contains("0123"), "Debug never shows the secret");
        for bad in [&empty, &missing] {
            let e = resolve_secret_from(Some("x".into()), &file(bad), &local).unwrap_err();
            assert!(e.is_config() && e.to_string().contains(SECRET_FILE_KEY), "{e}");
        }
        // The env variable; the file wins when both are given; empty env refused.
        let s = resolve_secret_from(Some("from-env\n".into()), &JobConfig::default(), &remote).unwrap().unwrap();
        assert_eq!((&s.bytes[..], s.origin()), (&b"from-env"[..], SECRET_ENV));
        let s = resolve_secret_from(Some("from-env".into()), &file(&good), &remote).unwrap().unwrap();
        assert_eq!(&s.bytes[..], b"0123456789abcdef0123");
        let e = resolve_secret_from(Some("".into()), &JobConfig::default(), &local).unwrap_err();
        assert!(matches!(e, ClusterError::EmptyEnv) && e.to_string().contains(SECRET_ENV));
        // A process index outside the hostfile.
        let e = resolve_secret_from(None, &JobConfig::default(), &ClusterConfig { process: 2, ..local.clone() }).unwrap_err();
        assert!(matches!(e, ClusterError::Process { process: 2, processes: 2 }));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1:2101"));
        assert!(is_loopback("127.0.1.1:2101"));
        assert!(is_loopback("[::1]:2101"));
        assert!(is_loopback("localhost:2101"));
        assert!(!is_loopback("0.0.0.0:2101"));
        assert!(!is_loopback("10.1.2.3:2101"));
        assert!(!is_loopback("no-such-host.invalid:2101"));
    }
}
