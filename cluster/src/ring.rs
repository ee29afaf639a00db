//! Collectives on the CPU: ring all-reduce, broadcast and barrier over TCP between the ranks
//! of a data-parallel job (the role gloo plays for torch). Each rank listens on its own
//! address, connects to the next rank and accepts the previous one.
//!
//! All-reduce is the bandwidth-optimal ring (Patarasuphy & Yuan 2009; Baidu's ring
//! all-reduce): the buffer is cut into `world` chunks, `world − 1` reduce-scatter steps leave
//! each rank with one fully summed chunk, `world − 1` all-gather steps pass the sums round.
//! Every rank adds the same values in the same order, so all ranks end bit-identical.
//!
//! Every socket read and write has a timeout: a lost or frozen rank makes its neighbours fail
//! with [`ClusterError`] naming that rank, never hang.

use crate::{ClusterError, Result};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// Writes a frame: the value count (`u64`) then the values, all little-endian, straight
/// from `values`' memory on little-endian hosts (no copy of the buffer).
fn write_frame(to: &mut TcpStream, values: &[f32]) -> std::io::Result<()> {
    to.write_all(&(values.len() as u64).to_le_bytes())?;
    if cfg!(target_endian = "little") {
        // SAFETY: f32 has no padding and any byte pattern is a valid u8; the view lives no
        // longer than `values`.
        let bytes = unsafe {
            std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
        };
        to.write_all(bytes)?;
    } else {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        to.write_all(&bytes)?;
    }
    to.flush()
}

/// Values received per read while reducing: small enough to stay in cache, large enough
/// for few system calls.
const RECV_CHUNK: usize = 64 * 1024;

/// Reads a frame of exactly `into.len()` values into `into`, adding them when `add`, as they
/// arrive. Returns the frame's length when it is not `into.len()` (the frame is then left
/// unread: the ring is broken anyway).
fn receive_into(
    from: &mut TcpStream,
    into: &mut [f32],
    add: bool,
    scratch: &mut Vec<f32>,
) -> std::io::Result<Option<usize>> {
    let mut len = [0u8; 8];
    from.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len) as usize;
    if n != into.len() {
        return Ok(Some(n));
    }
    if !add {
        read_values(from, into)?;
        return Ok(None);
    }
    scratch.resize(RECV_CHUNK.min(n), 0.0);
    for dst in into.chunks_mut(RECV_CHUNK) {
        let got = &mut scratch[..dst.len()];
        read_values(from, got)?;
        for (x, y) in dst.iter_mut().zip(got.iter()) {
            *x += *y;
        }
    }
    Ok(None)
}

/// Fills `into` with little-endian f32s from `from`.
fn read_values(from: &mut TcpStream, into: &mut [f32]) -> std::io::Result<()> {
    // SAFETY: f32 has no padding and every byte pattern is a valid f32; the view lives no
    // longer than `into`.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(into.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(into))
    };
    from.read_exact(bytes)?;
    if cfg!(target_endian = "big") {
        for v in into.iter_mut() {
            *v = f32::from_le_bytes(v.to_ne_bytes());
        }
    }
    Ok(())
}

/// `buf[send]` to read and `buf[recv]` to write, two disjoint ranges of one buffer.
fn disjoint(buf: &mut [f32], send: (usize, usize), recv: (usize, usize)) -> (&[f32], &mut [f32]) {
    if send.1 <= recv.0 {
        let (lo, hi) = buf.split_at_mut(recv.0);
        (&lo[send.0..send.1], &mut hi[..recv.1 - recv.0])
    } else {
        let (lo, hi) = buf.split_at_mut(send.0);
        (&hi[..send.1 - send.0], &mut lo[recv.0..recv.1])
    }
}

/// This rank's connections in the ring.
pub struct TcpRing {
    rank: usize,
    world: usize,
    addrs: Vec<SocketAddr>,
    timeout: Duration,
    /// To rank + 1.
    next: Option<TcpStream>,
    /// From rank − 1.
    prev: Option<TcpStream>,
    /// Receive buffer for reductions, reused.
    scratch: Vec<f32>,
}

impl TcpRing {
    /// Joins the ring: listens on `addrs[rank]`, connects to `addrs[rank + 1]` (retrying until
    /// `timeout`, as peers start in any order) and accepts rank − 1.
    pub fn connect(rank: usize, addrs: &[SocketAddr], timeout: Duration) -> Result<Self> {
        if addrs.len() < 2 || rank >= addrs.len() {
            return Self::join(rank, None, addrs, timeout);
        }
        let listener = TcpListener::bind(addrs[rank]).map_err(|source| ClusterError::Listen {
            rank,
            addr: addrs[rank],
            source,
        })?;
        Self::join(rank, Some(listener), addrs, timeout)
    }

    /// Joins the ring on a listener already bound to `addrs[rank]` (the rendezvous binds
    /// port 0 first, then publishes the port it got). `None` only for a ring of one.
    pub fn join(
        rank: usize,
        listener: Option<TcpListener>,
        addrs: &[SocketAddr],
        timeout: Duration,
    ) -> Result<Self> {
        let world = addrs.len();
        if world == 0 || rank >= world {
            return Err(ClusterError::Layout {
                rank,
                world,
                addrs: addrs.len(),
            });
        }
        let mut ring = Self {
            rank,
            world,
            addrs: addrs.to_vec(),
            timeout,
            next: None,
            prev: None,
            scratch: Vec::new(),
        };
        let listener = match listener {
            _ if world == 1 => return Ok(ring),
            Some(l) => l,
            None => {
                return Err(ClusterError::Layout {
                    rank,
                    world,
                    addrs: addrs.len(),
                })
            }
        };
        let next_rank = (rank + 1) % world;
        let deadline = Instant::now() + timeout;
        let next = loop {
            match TcpStream::connect_timeout(&addrs[next_rank], timeout) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(ring.peer_err(next_rank, "never accepted a connection", e))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| ring.peer_err((rank + world - 1) % world, "could not be awaited", e))?;
        let prev = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => {
                    return Err(ring.peer_err((rank + world - 1) % world, "never connected", e))
                }
            }
        };
        for s in [&next, &prev] {
            let configure = s
                .set_nonblocking(false)
                .and_then(|_| s.set_nodelay(true))
                .and_then(|_| s.set_read_timeout(Some(timeout)))
                .and_then(|_| s.set_write_timeout(Some(timeout)));
            configure.map_err(|e| ring.peer_err(next_rank, "could not be configured", e))?;
        }
        ring.next = Some(next);
        ring.prev = Some(prev);
        Ok(ring)
    }

    /// This rank.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Ranks in the ring.
    pub fn world(&self) -> usize {
        self.world
    }

    fn peer_err(&self, rank: usize, what: &'static str, source: std::io::Error) -> ClusterError {
        ClusterError::Peer {
            rank,
            addr: self.addrs[rank],
            what,
            timeout_s: self.timeout.as_secs_f64(),
            source,
        }
    }

    /// Sends `out` to the next rank while receiving as many values as `into` holds from the
    /// previous one, added into `into` (`add`) or written over it, as they arrive.
    fn exchange(&mut self, out: &[f32], into: &mut [f32], add: bool) -> Result<()> {
        let (next_rank, prev_rank) = (
            (self.rank + 1) % self.world,
            (self.rank + self.world - 1) % self.world,
        );
        let mut next = self
            .next
            .as_ref()
            .expect("a ring of 2+ has a next rank")
            .try_clone()
            .map_err(|e| self.peer_err(next_rank, "could not be written to", e))?;
        let prev = self
            .prev
            .as_mut()
            .expect("a ring of 2+ has a previous rank");
        let scratch = &mut self.scratch;
        // Send on a helper thread so two ranks sending at once cannot both block on full
        // socket buffers.
        let (sent, received) = std::thread::scope(|s| {
            let sender = s.spawn(move || write_frame(&mut next, out));
            let received = receive_into(prev, into, add, scratch);
            (
                sender
                    .join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("sender panicked"))),
                received,
            )
        });
        sent.map_err(|e| self.peer_err(next_rank, "did not take data", e))?;
        match received.map_err(|e| self.peer_err(prev_rank, "sent no data", e))? {
            Some(got) => Err(ClusterError::Mismatch {
                rank: prev_rank,
                got,
                want: into.len(),
            }),
            None => Ok(()),
        }
    }

    /// Sums `buf` over all ranks, in place; every rank ends with the same bits.
    pub fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        let w = self.world;
        if w == 1 {
            return Ok(());
        }
        let n = buf.len();
        let bounds: Vec<(usize, usize)> = (0..w).map(|c| (c * n / w, (c + 1) * n / w)).collect();
        // Reduce-scatter: at step s, send chunk (rank − s) and add the received one into
        // chunk (rank − s − 1). After w − 1 steps rank r holds the full sum of chunk r + 1.
        for s in 0..w - 1 {
            let send = bounds[(self.rank + w - s) % w];
            let recv = bounds[(self.rank + w - s - 1) % w];
            let (out, into) = disjoint(buf, send, recv);
            self.exchange(out, into, true)?;
        }
        // All-gather: pass the finished chunks round.
        for s in 0..w - 1 {
            let send = bounds[(self.rank + 1 + w - s) % w];
            let recv = bounds[(self.rank + w - s) % w];
            let (out, into) = disjoint(buf, send, recv);
            self.exchange(out, into, false)?;
        }
        Ok(())
    }

    /// Averages `buf` over all ranks, in place.
    pub fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum(buf)?;
        let w = self.world as f32;
        buf.iter_mut().for_each(|x| *x /= w);
        Ok(())
    }

    /// Copies rank `root`'s `buf` to every rank (passed along the ring).
    pub fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        let w = self.world;
        if w == 1 {
            return Ok(());
        }
        let hops = (self.rank + w - root) % w;
        let (prev_rank, next_rank) = ((self.rank + w - 1) % w, (self.rank + 1) % w);
        if hops > 0 {
            let prev = self
                .prev
                .as_mut()
                .expect("a ring of 2+ has a previous rank");
            let got = receive_into(prev, buf, false, &mut self.scratch);
            if let Some(got) = got.map_err(|e| self.peer_err(prev_rank, "sent no data", e))? {
                return Err(ClusterError::Mismatch {
                    rank: prev_rank,
                    got,
                    want: buf.len(),
                });
            }
        }
        if hops < w - 1 {
            let next = self.next.as_mut().expect("a ring of 2+ has a next rank");
            let sent = write_frame(next, buf);
            sent.map_err(|e| self.peer_err(next_rank, "did not take data", e))?;
        }
        Ok(())
    }

    /// Returns once every rank has called it, waiting up to `timeout` instead of the ring's
    /// own (a rank writing a large checkpoint).
    pub fn barrier_within(&mut self, timeout: Duration) -> Result<()> {
        let saved = self.timeout;
        self.set_timeout(timeout)?;
        let result = self.barrier();
        self.set_timeout(saved)?;
        result
    }

    fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        self.timeout = timeout;
        let next_rank = (self.rank + 1) % self.world;
        for s in [self.next.as_ref(), self.prev.as_ref()]
            .into_iter()
            .flatten()
        {
            let set = s
                .set_read_timeout(Some(timeout))
                .and_then(|_| s.set_write_timeout(Some(timeout)));
            set.map_err(|e| self.peer_err(next_rank, "could not be configured", e))?;
        }
        Ok(())
    }

    /// Returns once every rank has called it.
    pub fn barrier(&mut self) -> Result<()> {
        let mut token = [0f32; 1];
        self.all_reduce_sum(&mut token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n)
            .map(|_| {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                l.local_addr().unwrap()
            })
            .collect()
    }

    fn run<T: Send>(world: usize, f: impl Fn(TcpRing) -> T + Sync) -> Vec<T> {
        let a = addrs(world);
        std::thread::scope(|s| {
            let hs: Vec<_> = (0..world)
                .map(|r| {
                    let (a, f) = (&a, &f);
                    s.spawn(move || f(TcpRing::connect(r, a, Duration::from_secs(10)).unwrap()))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn all_reduce_sums_and_every_rank_agrees_bit_for_bit() {
        for world in [1usize, 2, 3, 4] {
            for n in [0usize, 1, 5, 1000, 100_003] {
                let out = run(world, |mut ring| {
                    let r = ring.rank() as f32;
                    let mut v: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + r).sin()).collect();
                    ring.all_reduce_sum(&mut v).unwrap();
                    v
                });
                let want: Vec<f32> = (0..n)
                    .map(|i| (0..world).map(|r| (i as f32 * 0.37 + r as f32).sin()).sum())
                    .collect();
                for (r, v) in out.iter().enumerate() {
                    assert_eq!(v, &out[0], "world {world}, n {n}: rank {r} differs");
                    for (x, y) in v.iter().zip(&want) {
                        assert!((x - y).abs() < 1e-5, "world {world}, n {n}: {x} vs {y}");
                    }
                }
            }
        }
    }

    #[test]
    fn broadcast_mean_and_barrier() {
        let out = run(3, |mut ring| {
            let mut v = vec![ring.rank() as f32 + 1.0; 7];
            ring.broadcast(&mut v, 1).unwrap();
            let mut m = vec![ring.rank() as f32; 4];
            ring.all_reduce_mean(&mut m).unwrap();
            ring.barrier().unwrap();
            (v, m)
        });
        for (v, m) in out {
            assert_eq!(v, vec![2.0; 7]);
            assert_eq!(m, vec![1.0; 4]);
        }
    }

    #[test]
    fn a_dead_rank_makes_the_others_fail_naming_it() {
        let a = addrs(3);
        let errs: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|r| {
                    let a = &a;
                    s.spawn(move || {
                        let mut ring = TcpRing::connect(r, a, Duration::from_millis(800)).unwrap();
                        if r == 2 {
                            // Rank 2 dies before the collective: its sockets close.
                            drop(ring);
                            return String::new();
                        }
                        let mut v = vec![1f32; 64];
                        let t0 = Instant::now();
                        let e = ring.all_reduce_sum(&mut v).unwrap_err().to_string();
                        assert!(
                            t0.elapsed() < Duration::from_secs(5),
                            "bounded by the timeout"
                        );
                        e
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(
            errs[0].contains("rank 2") || errs[0].contains("rank 1"),
            "{}",
            errs[0]
        );
        assert!(
            errs[1].contains("rank 2") || errs[1].contains("rank 0"),
            "{}",
            errs[1]
        );
    }

    #[test]
    fn a_frozen_rank_times_out_instead_of_hanging() {
        let a = addrs(2);
        let err = std::thread::scope(|s| {
            let frozen = s.spawn(|| {
                let ring = TcpRing::connect(1, &a, Duration::from_millis(500)).unwrap();
                std::thread::sleep(Duration::from_millis(1500));
                drop(ring);
            });
            let mut ring = TcpRing::connect(0, &a, Duration::from_millis(500)).unwrap();
            let t0 = Instant::now();
            let mut v = vec![1f32; 8];
            let e = ring.all_reduce_sum(&mut v).unwrap_err();
            assert!(
                t0.elapsed() < Duration::from_millis(1400),
                "{:?}",
                t0.elapsed()
            );
            frozen.join().unwrap();
            e.to_string()
        });
        assert!(
            err.contains("rank 1") && err.contains("timeout 0.5 s"),
            "{err}"
        );
    }

    #[test]
    fn a_barrier_within_a_longer_bound_waits_for_a_slow_writer() {
        let a = addrs(2);
        std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let mut ring = TcpRing::connect(1, &a, Duration::from_millis(300)).unwrap();
                // Rank 1 "writes a checkpoint" for longer than the ring's timeout.
                std::thread::sleep(Duration::from_millis(900));
                ring.barrier_within(Duration::from_secs(10)).unwrap();
                let mut v = vec![2f32; 3];
                ring.all_reduce_sum(&mut v).unwrap();
                v
            });
            let mut ring = TcpRing::connect(0, &a, Duration::from_millis(300)).unwrap();
            ring.barrier_within(Duration::from_secs(10)).unwrap();
            // The ring's own timeout is back in force afterwards (and the ring still works).
            let mut v = vec![1f32; 3];
            ring.all_reduce_sum(&mut v).unwrap();
            assert_eq!(v, vec![3.0; 3]);
            assert_eq!(writer.join().unwrap(), vec![3.0; 3]);
            assert_eq!(ring.timeout, Duration::from_millis(300));
        });
    }
}
