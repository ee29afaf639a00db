//! A fault-injecting HTTP/1.1 proxy for tests, put in front of the loopback S3 server
//! (`s3_server.rs`): on a chosen fraction of requests it answers `503 SlowDown`, resets the
//! connection, cuts a response body short or adds latency, the faults an object store shows
//! under load. Deterministic for a seed, so a failing run can be repeated.
//!
//! Each request goes upstream on a fresh connection marked `connection: close`, so the
//! proxy never parses a response's framing to find its end (it reads to EOF), and the
//! client, told the same, opens a new connection for its next request.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the proxy does to requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Faults {
    /// Every request passes.
    None,
    /// This fraction of requests fails, by slow-down, reset and cut body in turn (a write
    /// meets a slow-down instead of a cut: a cut write would be half applied); as many of
    /// the others are delayed by 100-400 ms.
    Mixed(f64),
    /// The store is down: every request is answered 503 or reset, alternately.
    Outage,
    /// Every write (PUT, POST, DELETE) whose path contains this is answered `503 SlowDown`;
    /// everything else passes: e.g. a table's data files land and its commits never do.
    FailWritesTo(&'static str),
    /// Every request waits this many milliseconds, then passes.
    Slow(u64),
}

/// Faults injected so far, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Injected {
    /// Requests seen.
    pub requests: u64,
    /// Answered `503 SlowDown` without reaching the store.
    pub slow_down: u64,
    /// Connection reset before the store saw the request.
    pub reset: u64,
    /// Response body cut short (the store did answer).
    pub cut: u64,
    /// Delayed, then passed.
    pub delayed: u64,
}

impl Injected {
    /// Requests that failed at the client (all but the delayed ones).
    pub fn failed(&self) -> u64 {
        self.slow_down + self.reset + self.cut
    }
}

struct Shared {
    upstream: String,
    faults: Mutex<(Faults, u64)>,
    counts: [AtomicU64; 5],
    stop: AtomicBool,
}

/// A running proxy; stops on drop.
pub struct FaultProxy {
    shared: Arc<Shared>,
    /// `http://127.0.0.1:PORT`, to use as the S3 endpoint.
    pub endpoint: String,
    port: u16,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://127.0.0.1:PORT`) passing everything; `seed`
    /// fixes which requests meet faults.
    pub fn start(upstream: &str, seed: u64) -> FaultProxy {
        let upstream = upstream
            .strip_prefix("http://")
            .expect("an http:// upstream")
            .trim_end_matches('/')
            .to_string();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let shared = Arc::new(Shared {
            upstream,
            faults: Mutex::new((Faults::None, seed | 1)),
            counts: Default::default(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let s = s.clone();
                    std::thread::spawn(move || serve(&s, conn));
                }
            }
        });
        FaultProxy {
            shared,
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
        }
    }

    /// Changes the faults from the next request on.
    pub fn set(&self, faults: Faults) {
        self.shared.faults.lock().unwrap().0 = faults;
    }

    /// Faults injected so far.
    pub fn injected(&self) -> Injected {
        let c = |i: usize| self.shared.counts[i].load(Ordering::SeqCst);
        Injected {
            requests: c(0),
            slow_down: c(1),
            reset: c(2),
            cut: c(3),
            delayed: c(4),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    Pass,
    SlowDown,
    Reset,
    Cut,
    Delay(u64),
}

impl Shared {
    fn next_fault(&self, write: bool, target: &str) -> Fault {
        let mut guard = self.faults.lock().unwrap();
        let (faults, state) = &mut *guard;
        // xorshift64: deterministic for the seed and the order requests arrive in.
        let mut next = || {
            *state ^= *state << 13;
            *state ^= *state >> 7;
            *state ^= *state << 17;
            *state
        };
        let fault = match *faults {
            Faults::None => Fault::Pass,
            Faults::FailWritesTo(part) if write && target.contains(part) => Fault::SlowDown,
            Faults::FailWritesTo(_) => Fault::Pass,
            Faults::Slow(ms) => Fault::Delay(ms),
            Faults::Outage => {
                if next() % 2 == 0 {
                    Fault::SlowDown
                } else {
                    Fault::Reset
                }
            }
            Faults::Mixed(rate) => {
                let hit = |draw: u64| ((draw % 1_000_000) as f64) < rate * 1e6;
                if hit(next()) {
                    // Kinds in turn, so that a short run meets each of them.
                    let turn = self.counts[1..4]
                        .iter()
                        .map(|c| c.load(Ordering::SeqCst))
                        .sum::<u64>();
                    match (turn % 3, write) {
                        (0, _) | (2, true) => Fault::SlowDown,
                        (1, _) => Fault::Reset,
                        _ => Fault::Cut,
                    }
                } else if hit(next()) {
                    Fault::Delay(100 + next() % 300)
                } else {
                    Fault::Pass
                }
            }
        };
        let slot = match fault {
            Fault::Pass => None,
            Fault::SlowDown => Some(1),
            Fault::Reset => Some(2),
            // Counted when a body is cut (`serve`): an empty one passes whole.
            Fault::Cut => None,
            Fault::Delay(_) => Some(4),
        };
        self.counts[0].fetch_add(1, Ordering::SeqCst);
        if let Some(i) = slot {
            self.counts[i].fetch_add(1, Ordering::SeqCst);
        }
        fault
    }
}

/// One client connection, one request: every answer says `connection: close`.
fn serve(shared: &Shared, client: TcpStream) {
    let Ok(read_half) = client.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut client = client;
    let Some((method, request)) = read_request(&mut reader) else {
        return;
    };
    let write = !matches!(method.as_str(), "GET" | "HEAD");
    let target = request
        .split(|&b| b == b' ')
        .nth(1)
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let fault = shared.next_fault(write, &target);
    match fault {
        Fault::SlowDown => {
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>SlowDown\
                </Code><Message>Please reduce your request rate.</Message></Error>";
            let head = format!(
                "HTTP/1.1 503 Slow Down\r\ncontent-type: application/xml\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = client.write_all(head.as_bytes());
            let _ = client.write_all(body.as_bytes());
            return;
        }
        Fault::Reset => return reset(client),
        Fault::Delay(ms) => std::thread::sleep(Duration::from_millis(ms)),
        Fault::Pass | Fault::Cut => {}
    }
    let Some(response) = forward(&shared.upstream, &request) else {
        return reset(client);
    };
    let head_end = find(&response, b"\r\n\r\n").map_or(response.len(), |i| i + 4);
    let body_len = response.len() - head_end;
    if fault == Fault::Cut && body_len >= 2 {
        shared.counts[3].fetch_add(1, Ordering::SeqCst);
        let _ = client.write_all(&response[..head_end + body_len / 2]);
        return reset(client);
    }
    // The upstream answer says `connection: close` (the proxy asked for it): the
    // client opens a new connection for its next request.
    let _ = client.write_all(&response);
    let _ = client.shutdown(Shutdown::Both);
}

/// Reads one request (head and body, framed by `content-length` or chunked) and returns
/// its method and its bytes with `connection: close` set; `None` at EOF or on a bad request.
fn read_request(reader: &mut BufReader<TcpStream>) -> Option<(String, Vec<u8>)> {
    let mut head = Vec::new();
    let (mut length, mut chunked, mut method) = (0usize, false, String::new());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        if method.is_empty() {
            method = line.split(' ').next()?.to_string();
            head.extend_from_slice(line.as_bytes());
            continue;
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if lower.starts_with("connection:") {
            continue;
        }
        if let Some(v) = lower.strip_prefix("content-length:") {
            length = v.trim().parse().ok()?;
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
        head.extend_from_slice(line.as_bytes());
    }
    head.extend_from_slice(b"connection: close\r\n\r\n");
    if chunked {
        loop {
            let mut size_line = String::new();
            reader.read_line(&mut size_line).ok()?;
            head.extend_from_slice(size_line.as_bytes());
            let size = usize::from_str_radix(size_line.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).ok()?;
            head.extend_from_slice(&chunk);
            if size == 0 {
                break;
            }
        }
    } else {
        let start = head.len();
        head.resize(start + length, 0);
        reader.read_exact(&mut head[start..]).ok()?;
    }
    Some((method, head))
}

/// Sends `request` to the store on a fresh connection and reads the whole answer.
fn forward(upstream: &str, request: &[u8]) -> Option<Vec<u8>> {
    let mut conn = TcpStream::connect(upstream).ok()?;
    conn.write_all(request).ok()?;
    let mut response = Vec::new();
    conn.read_to_end(&mut response).ok()?;
    (!response.is_empty()).then_some(response)
}

/// Drops the connection with a TCP reset (SO_LINGER 0), as a failing load balancer does.
fn reset(conn: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `conn` owns a valid socket for the call, and `linger` outlives it.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(conn);
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
