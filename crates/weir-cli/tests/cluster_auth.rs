//! The cluster port authenticates its peers: two processes with the same secret run a job
//! exactly once; strangers (garbage, a stock timely index, an out-of-range index, a wrong
//! secret) are refused and logged while the job goes on; a hostfile with a network address
//! and no secret is refused at start.

mod common;

use std::fs::File;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use weir::runtime::cluster::{dial, Secret, SECRET_ENV, SECRET_FILE_KEY};

const SECRET: &str = "a-shared-secret-of-the-test-cluster";

/// Keyed sum of 300 k records over 30 k keys, 200 ms checkpoints, no cluster secret from the
/// environment unless a test gives one.
fn keyed_sum(out: &Path, ck: &Path, extra: &[&str]) -> Command {
    let mut args = vec!["-D", "restart-strategy.type=none"];
    args.extend_from_slice(extra);
    let mut c = keyed_sum_cmd(out, ck, 300_000, 30_000, "200ms", &args);
    c.env_remove(SECRET_ENV);
    c
}

fn reference(tmp: &TempDir) -> std::collections::BTreeMap<String, usize> {
    let out = tmp.join("ref-out");
    run_ok(&mut keyed_sum(&out, &tmp.join("ref-ck"), &[]));
    let lines = committed_lines(&out);
    assert_eq!(lines.values().sum::<usize>(), 300_000, "one line per record");
    lines
}

fn hostfile(tmp: &TempDir, lines: &[String]) -> PathBuf {
    let p = tmp.join("hosts.txt");
    std::fs::write(&p, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    p
}

fn secret_file(tmp: &TempDir, name: &str, content: &str) -> PathBuf {
    let p = tmp.join(name);
    std::fs::write(&p, content).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    p
}

/// Start process `p` with its stderr in `log` (a pipe could fill up and block it).
fn start(mut cmd: Command, p: usize, hosts: &Path, log: &Path) -> Child {
    cmd.arg("--process").arg(p.to_string()).arg("--hostfile").arg(hosts);
    cmd.stdout(Stdio::null()).stderr(Stdio::from(File::create(log).unwrap())).spawn().unwrap()
}

fn read(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap()
}

/// Both processes exit successfully within the deadline (else both are killed).
fn both_succeed(procs: &mut [Child], logs: &[PathBuf]) {
    for (i, p) in procs.iter_mut().enumerate() {
        let ok = wait_success(p, Duration::from_secs(120));
        assert!(ok, "process {i} failed:\n{}", read(&logs[i]));
    }
}

#[test]
fn two_processes_with_a_shared_secret_run_exactly_once() {
    let tmp = TempDir::new("auth-ok");
    let expected = reference(&tmp);
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let hosts = hostfile(&tmp, &[format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port())]);
    let secret = secret_file(&tmp, "secret", &format!("{SECRET}\n"));
    let define = format!("{SECRET_FILE_KEY}={}", secret.display());
    let logs = [tmp.join("p0.log"), tmp.join("p1.log")];
    let mut procs: Vec<Child> = (0..2).map(|p| start(keyed_sum(&out, &ck, &["-D", &define]), p, &hosts, &logs[p])).collect();
    both_succeed(&mut procs, &logs);
    assert_exactly_once(&expected, &committed_lines(&out));
    let (log0, log1) = (read(&logs[0]), read(&logs[1]));
    assert!(log0.contains("authenticated with the secret from cluster.secret-file"), "{log0}");
    assert!(log0.contains("accepted process 1 from"), "{log0}");
    assert!(log1.contains("connected to process 0 at"), "{log1}");
    // "Connection refused" while process 0 is not listening yet is fine; a refused peer is not.
    let refusal = "refused connection from";
    assert!(!log0.contains(refusal) && !log1.contains(refusal), "no refusals:\n{log0}\n{log1}");
}

#[test]
fn strangers_are_refused_and_logged_while_the_job_goes_on() {
    let tmp = TempDir::new("auth-strangers");
    let expected = reference(&tmp);
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    let addr0 = format!("127.0.0.1:{}", free_port());
    let hosts = hostfile(&tmp, &[addr0.clone(), format!("127.0.0.1:{}", free_port())]);
    let logs = [tmp.join("p0.log"), tmp.join("p1.log")];
    let with_secret = |p: usize| {
        let mut c = keyed_sum(&out, &ck, &[]);
        c.env(SECRET_ENV, SECRET);
        start(c, p, &hosts, &logs[p])
    };
    // Process 0 alone first: the strangers reach its port before process 1 does.
    let p0 = with_secret(0);
    let start_wait = Instant::now();
    let probe = loop {
        match TcpStream::connect(&addr0) {
            Ok(s) => break s,
            Err(_) if start_wait.elapsed() < Duration::from_secs(60) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("process 0 never listened on {addr0}: {e}\n{}", read(&logs[0])),
        }
    };
    let mut refused = vec![probe.local_addr().unwrap()];
    drop(probe);
    let mut rng = Rng::from_env("strangers");
    let connect = || TcpStream::connect(&addr0).unwrap();
    // Random bytes.
    let mut c = connect();
    let garbage: Vec<u8> = (0..512).map(|_| rng.next() as u8).collect();
    let _ = c.write_all(&garbage);
    refused.push(c.local_addr().unwrap());
    drop(c);
    // What timely's own peers send first: a process index, here far out of range.
    let mut c = connect();
    let _ = c.write_all(&(1u64 << 40).to_be_bytes());
    refused.push(c.local_addr().unwrap());
    drop(c);
    // The right secret but an index outside the cluster.
    let mut c = connect();
    assert!(dial(&mut c, 5, 0, 2, Some(&Secret::new(SECRET, "test"))).is_err(), "index 5 of 2 must be refused");
    refused.push(c.local_addr().unwrap());
    drop(c);
    // A wrong secret, claiming to be process 1.
    let mut c = connect();
    assert!(dial(&mut c, 1, 0, 2, Some(&Secret::new("not-the-secret", "test"))).is_err(), "a wrong secret must be refused");
    refused.push(c.local_addr().unwrap());
    drop(c);
    // A client that says nothing and holds its connection: must not stall the real peer.
    let silent = connect();

    let mut procs = vec![p0, with_secret(1)];
    both_succeed(&mut procs, &logs);
    drop(silent);
    assert_exactly_once(&expected, &committed_lines(&out));
    let log0 = read(&logs[0]);
    for a in &refused {
        assert!(log0.contains(&format!("refused connection from {a}")), "refusal of {a} logged:\n{log0}");
    }
    assert!(log0.contains("bad magic"), "{log0}");
    assert!(log0.contains("process index 5 is out of range"), "{log0}");
    assert!(log0.contains("wrong cluster secret"), "{log0}");
    assert!(log0.contains("accepted process 1 from"), "{log0}");
}

/// Run a process that must refuse to start; returns its stderr.
fn refused_at_start(mut cmd: Command) -> String {
    let log = std::env::temp_dir().join(format!("weir-refused-{}-{}.log", std::process::id(), free_port()));
    cmd.stdout(Stdio::null()).stderr(Stdio::from(File::create(&log).unwrap()));
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > Duration::from_secs(30) {
            kill9(&mut child);
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = read(&log);
    let _ = std::fs::remove_file(&log);
    let status = status.unwrap_or_else(|| panic!("still running after 30 s instead of refusing to start:\n{text}"));
    assert!(!status.success(), "must refuse to start:\n{text}");
    text
}

#[test]
fn a_network_address_without_a_secret_is_refused_at_start() {
    let tmp = TempDir::new("auth-refused");
    let (out, ck) = (tmp.join("out"), tmp.join("ck"));
    // 192.0.2.0/24 is TEST-NET-1: documentation only, never this machine.
    let hosts = hostfile(&tmp, &[format!("127.0.0.1:{}", free_port()), "192.0.2.10:2101".to_string()]);
    for p in 0..2 {
        let mut c = keyed_sum(&out, &ck, &[]);
        c.arg("--process").arg(p.to_string()).arg("--hostfile").arg(&hosts);
        let err = refused_at_start(c);
        assert!(err.contains(SECRET_FILE_KEY) && err.contains(SECRET_ENV), "names both ways to give a secret:\n{err}");
        assert!(err.contains("192.0.2.10:2101") && err.contains("not a loopback address"), "names the address:\n{err}");
    }
    // A secret file that cannot be read, or is empty: refused, naming the key (loopback too).
    let local = hostfile(&tmp, &[format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port())]);
    let empty = secret_file(&tmp, "empty", "\n");
    for (file, why) in [(tmp.join("no-such-file"), "cannot read"), (empty, "is empty")] {
        let mut c = keyed_sum(&out, &ck, &["-D", &format!("{SECRET_FILE_KEY}={}", file.display())]);
        c.env(SECRET_ENV, SECRET).arg("--process").arg("1").arg("--hostfile").arg(&local);
        let err = refused_at_start(c);
        assert!(err.contains(&format!("config key '{SECRET_FILE_KEY}'")) && err.contains(why), "{why}:\n{err}");
    }
    // An empty WEIR_CLUSTER_SECRET is a mistake, not "no secret".
    let mut c = keyed_sum(&out, &ck, &[]);
    c.env(SECRET_ENV, "").arg("--process").arg("1").arg("--hostfile").arg(&local);
    let err = refused_at_start(c);
    assert!(err.contains(SECRET_ENV) && err.contains("empty"), "{err}");
    assert!(!out.exists(), "nothing ran");
}
