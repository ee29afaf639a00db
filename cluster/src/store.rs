//! The rendezvous key-value store (the role torch's `TCPStore` plays): rank 0 serves it on
//! `MASTER_ADDR:MASTER_PORT`, every rank connects, and the ranks exchange what they must
//! agree on before training (ring addresses, the NCCL unique id) by key.
//!
//! Protocol, one request and one reply per message, all lengths little-endian `u32`:
//! request `op (1 byte) | key len | key | value len | value`; reply `status (1 byte) | value
//! len | value`. `op`: 1 set, 2 get (waits until the key exists, up to the client's
//! timeout), 3 add (an `i64` counter; returns the new value). `status`: 0 ok, 1 timed out.

use crate::{ClusterError, Result};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
struct State {
    values: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

/// The server, running on threads of its own until the process ends.
pub struct StoreServer {
    addr: SocketAddr,
}

impl StoreServer {
    /// Listens on `addr` (port 0: any free port) and serves every client on its own thread.
    pub fn start(addr: SocketAddr) -> Result<Self> {
        let listener =
            TcpListener::bind(addr).map_err(|source| ClusterError::StoreListen { addr, source })?;
        let addr = listener
            .local_addr()
            .map_err(|source| ClusterError::StoreListen { addr, source })?;
        let state = Arc::new(State::default());
        std::thread::Builder::new()
            .name("knn-store".into())
            .spawn(move || {
                for conn in listener.incoming().flatten() {
                    let state = state.clone();
                    let _ = std::thread::Builder::new()
                        .name("knn-store-client".into())
                        .spawn(move || serve(conn, &state));
                }
            })
            .map_err(|source| ClusterError::StoreListen { addr, source })?;
        Ok(Self { addr })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

fn read_bytes(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut v = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut v)?;
    Ok(v)
}

fn write_bytes(out: &mut Vec<u8>, v: &[u8]) {
    out.extend((v.len() as u32).to_le_bytes());
    out.extend_from_slice(v);
}

/// Answers one client's requests until it disconnects.
fn serve(mut conn: TcpStream, state: &State) {
    let _ = conn.set_nodelay(true);
    loop {
        let mut op = [0u8; 1];
        if conn.read_exact(&mut op).is_err() {
            return;
        }
        let (Ok(key), Ok(value)) = (read_bytes(&mut conn), read_bytes(&mut conn)) else {
            return;
        };
        let key = String::from_utf8_lossy(&key).into_owned();
        let mut values = state.values.lock().unwrap_or_else(|p| p.into_inner());
        let (status, reply) = match op[0] {
            1 => {
                values.insert(key, value);
                state.changed.notify_all();
                (0u8, Vec::new())
            }
            2 => {
                // The client sends its timeout (ms) as the value.
                let wait_ms = u64::from_le_bytes(value.try_into().unwrap_or([0; 8]));
                let deadline = Instant::now() + Duration::from_millis(wait_ms);
                loop {
                    if let Some(v) = values.get(&key) {
                        break (0, v.clone());
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break (1, Vec::new());
                    }
                    values = state
                        .changed
                        .wait_timeout(values, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
            3 => {
                let delta = i64::from_le_bytes(value.try_into().unwrap_or([0; 8]));
                let now = values
                    .get(&key)
                    .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                    .map_or(0, i64::from_le_bytes)
                    + delta;
                values.insert(key, now.to_le_bytes().to_vec());
                state.changed.notify_all();
                (0, now.to_le_bytes().to_vec())
            }
            _ => return,
        };
        drop(values);
        let mut out = vec![status];
        write_bytes(&mut out, &reply);
        if conn.write_all(&out).is_err() {
            return;
        }
    }
}

/// A connection to the store.
pub struct StoreClient {
    addr: SocketAddr,
    conn: TcpStream,
    timeout: Duration,
}

impl StoreClient {
    /// Connects to the store at `addr`, retrying until `timeout` (ranks start in any order).
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let deadline = Instant::now() + timeout;
        let conn = loop {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(c) => break c,
                Err(source) if Instant::now() >= deadline => {
                    return Err(ClusterError::StoreUnreachable {
                        addr,
                        what: "never accepted a connection",
                        source,
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        };
        let unreachable = |source| ClusterError::StoreUnreachable {
            addr,
            what: "could not be configured",
            source,
        };
        conn.set_nodelay(true).map_err(unreachable)?;
        // Replies to `get` may take the whole wait; allow a margin beyond it.
        conn.set_read_timeout(Some(timeout + Duration::from_secs(5)))
            .map_err(unreachable)?;
        conn.set_write_timeout(Some(timeout)).map_err(unreachable)?;
        Ok(Self {
            addr,
            conn,
            timeout,
        })
    }

    fn request(&mut self, op: u8, key: &str, value: &[u8]) -> Result<(u8, Vec<u8>)> {
        let mut msg = vec![op];
        write_bytes(&mut msg, key.as_bytes());
        write_bytes(&mut msg, value);
        let addr = self.addr;
        let lost = |what, source| ClusterError::StoreUnreachable { addr, what, source };
        self.conn
            .write_all(&msg)
            .map_err(|e| lost("did not take a request", e))?;
        let mut status = [0u8; 1];
        self.conn
            .read_exact(&mut status)
            .map_err(|e| lost("did not answer", e))?;
        let reply = read_bytes(&mut self.conn).map_err(|e| lost("did not answer", e))?;
        Ok((status[0], reply))
    }

    /// Sets `key` to `value`.
    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.request(1, key, value).map(|_| ())
    }

    /// The value of `key`, waiting for some rank to set it (up to the timeout).
    pub fn get(&mut self, key: &str) -> Result<Vec<u8>> {
        let ms = self.timeout.as_millis() as u64;
        match self.request(2, key, &ms.to_le_bytes())? {
            (0, v) => Ok(v),
            _ => Err(ClusterError::KeyTimeout {
                key: key.to_string(),
                timeout_s: self.timeout.as_secs_f64(),
            }),
        }
    }

    /// Adds `delta` to the counter `key` (0 when unset); returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        let (_, v) = self.request(3, key, &delta.to_le_bytes())?;
        Ok(<[u8; 8]>::try_from(v.as_slice()).map_or(0, i64::from_le_bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server() -> StoreServer {
        StoreServer::start("127.0.0.1:0".parse().unwrap()).unwrap()
    }

    #[test]
    fn ranks_exchange_values_and_count() {
        let s = server();
        let got: Vec<Vec<u8>> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..3u8)
                .map(|r| {
                    let addr = s.addr();
                    sc.spawn(move || {
                        let mut c = StoreClient::connect(addr, Duration::from_secs(5)).unwrap();
                        c.set(&format!("addr/{r}"), &[r; 3]).unwrap();
                        c.add("joined", 1).unwrap();
                        // Every rank reads the next one's value, whenever that rank sets it.
                        c.get(&format!("addr/{}", (r + 1) % 3)).unwrap()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(got, vec![vec![1; 3], vec![2; 3], vec![0; 3]]);
        let mut c = StoreClient::connect(s.addr(), Duration::from_secs(1)).unwrap();
        assert_eq!(c.add("joined", 0).unwrap(), 3);
    }

    #[test]
    fn a_key_nobody_sets_times_out_naming_it() {
        let s = server();
        let mut c = StoreClient::connect(s.addr(), Duration::from_millis(300)).unwrap();
        let t0 = Instant::now();
        let e = c.get("nccl/unique-id").unwrap_err();
        assert!(
            matches!(e, ClusterError::KeyTimeout { ref key, .. } if key == "nccl/unique-id"),
            "{e}"
        );
        assert!(t0.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn no_server_is_a_clear_error() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let e = StoreClient::connect(addr, Duration::from_millis(300))
            .err()
            .unwrap();
        assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
    }
}
