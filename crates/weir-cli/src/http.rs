//! A tiny HTTP/1.1 client over `std::net::TcpStream`, for the few JSON calls the job commands
//! make to a job's REST API: one request per connection (`Connection: close`), plain `http://`
//! only (the API serves loopback, or a non-loopback address behind a token), 10 s timeouts.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

/// Connect, read and write timeouts of one call.
const TIMEOUT: Duration = Duration::from_secs(10);

/// An `http://host:port` base and a path on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    /// `host` (a name, an IPv4 address, or `[v6]`).
    pub host: String,
    /// The port (80 when the URL names none).
    pub port: u16,
    /// The path, `/` at least, with its query.
    pub path: String,
}

impl Url {
    /// Parse `http://host[:port][/path]`; a bare `host:port` is taken as `http://host:port`.
    pub fn parse(s: &str) -> Result<Url> {
        let rest = match s.split_once("://") {
            Some(("http", rest)) => rest,
            Some((scheme, _)) => bail!("{s}: only http:// URLs are supported, not {scheme}://"),
            None => s,
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if authority.is_empty() {
            bail!("{s}: no host in the URL");
        }
        let (host, port) = match authority.rsplit_once(':') {
            // `[::1]` alone has a colon inside the brackets, not a port.
            Some((h, p)) if !p.contains(']') => (h, p.parse::<u16>().map_err(|_| anyhow!("{s}: bad port {p:?}"))?),
            _ => (authority, 80),
        };
        Ok(Url { host: host.to_string(), port, path: path.to_string() })
    }

    /// `http://host:port` (no path).
    pub fn base(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// The same server, another path.
    pub fn with_path(&self, path: &str) -> Url {
        Url { path: path.to_string(), ..self.clone() }
    }
}

/// A response: status code, reason phrase, body.
#[derive(Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The reason phrase of the status line.
    pub reason: String,
    /// The body (chunked transfer decoded).
    pub body: Vec<u8>,
}

impl Response {
    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body).with_context(|| format!("a response that is not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    /// The server's error message: Flink's `{"errors": [...]}`, else the body as text.
    pub fn error_message(&self) -> String {
        let from_json = serde_json::from_slice::<serde_json::Value>(&self.body).ok().and_then(|v| {
            let errs = v.get("errors")?.as_array()?.iter().filter_map(|e| e.as_str()).collect::<Vec<_>>();
            (!errs.is_empty()).then(|| errs.join("; "))
        });
        from_json.unwrap_or_else(|| String::from_utf8_lossy(&self.body).trim().to_string())
    }
}

/// One request: `method url` with an optional bearer token and JSON body.
pub fn request(method: &str, url: &Url, token: Option<&str>, body: Option<&serde_json::Value>) -> Result<Response> {
    request_raw(method, url, token, body.map(|b| b.to_string()).as_deref())
}

/// One request with a body sent as it is (as `application/json`).
pub fn request_raw(method: &str, url: &Url, token: Option<&str>, body: Option<&str>) -> Result<Response> {
    let what = format!("{method} {}{}", url.base(), url.path);
    call(method, url, token, body).with_context(|| what)
}

fn call(method: &str, url: &Url, token: Option<&str>, body: Option<&str>) -> Result<Response> {
    let host = url.host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<_> = (host, url.port).to_socket_addrs().with_context(|| format!("resolving {}", url.host))?.collect();
    let mut last = None;
    let mut stream = None;
    for a in &addrs {
        match TcpStream::connect_timeout(a, TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let mut stream = match (stream, last) {
        (Some(s), _) => s,
        (None, Some(e)) => return Err(e).context("connecting (is the job running, with its REST API on this address?)"),
        (None, None) => bail!("{} resolves to no address", url.host),
    };
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    let mut head = format!(
        "{method} {} HTTP/1.1\r\nHost: {}:{}\r\nConnection: close\r\nAccept: application/json\r\nUser-Agent: weir/{}\r\n",
        url.path,
        url.host,
        url.port,
        env!("CARGO_PKG_VERSION")
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    match body {
        Some(b) => head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}", b.len())),
        None if method != "GET" => head.push_str("Content-Length: 0\r\n\r\n"),
        None => head.push_str("\r\n"),
    }
    stream.write_all(head.as_bytes())?;
    stream.flush()?;
    read_response(BufReader::new(stream))
}

/// Parse a response: status line, headers, then a body by Content-Length, chunks, or to the end.
fn read_response<R: BufRead>(mut r: R) -> Result<Response> {
    let mut line = String::new();
    r.read_line(&mut line).context("reading the status line")?;
    let mut parts = line.trim_end().splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1.x response: {:?}", line.trim_end());
    }
    let status = parts.next().and_then(|s| s.parse::<u16>().ok()).ok_or_else(|| anyhow!("bad status line {:?}", line.trim_end()))?;
    let reason = parts.next().unwrap_or_default().to_string();
    let mut length = None;
    let mut chunked = false;
    loop {
        line.clear();
        if r.read_line(&mut line).context("reading headers")? == 0 {
            bail!("the connection closed inside the headers");
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else { bail!("bad header line {h:?}") };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| anyhow!("bad Content-Length {value:?}"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked") {
            chunked = true;
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).context("reading a chunk size")?;
            let size = line.trim_end().split(';').next().unwrap_or_default();
            let n = usize::from_str_radix(size.trim(), 16).map_err(|_| anyhow!("bad chunk size {size:?}"))?;
            if n == 0 {
                break; // trailers, if any, are not needed
            }
            let start = body.len();
            body.resize(start + n, 0);
            r.read_exact(&mut body[start..]).context("reading a chunk")?;
            line.clear();
            r.read_line(&mut line)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body).context("reading the body")?;
    } else {
        r.read_to_end(&mut body).context("reading the body")?;
    }
    Ok(Response { status, reason, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://127.0.0.1:8081/jobs/abc").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("127.0.0.1", 8081, "/jobs/abc"));
        let u = Url::parse("localhost:9000").unwrap();
        assert_eq!((u.host.as_str(), u.port, u.path.as_str()), ("localhost", 9000, "/"));
        let u = Url::parse("http://[::1]:81").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("[::1]", 81));
        assert_eq!(Url::parse("http://[::1]").unwrap().port, 80);
        assert!(Url::parse("https://x:1").is_err());
        assert!(Url::parse("http://x:port").is_err());
    }

    #[test]
    fn responses_by_length_chunks_or_end() {
        let r = read_response(&b"HTTP/1.1 202 Accepted\r\ncontent-length: 2\r\n\r\n{}trailing"[..]).unwrap();
        assert_eq!((r.status, r.reason.as_str(), r.body.as_slice()), (202, "Accepted", &b"{}"[..]));
        let r = read_response(&b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"[..]).unwrap();
        assert_eq!(r.body, b"abcde");
        let r = read_response(&b"HTTP/1.0 401 Unauthorized\r\n\r\n{\"errors\":[\"no token\"]}"[..]).unwrap();
        assert_eq!((r.status, r.error_message().as_str()), (401, "no token"));
        assert!(read_response(&b"SSH-2.0\r\n"[..]).is_err());
    }
}
