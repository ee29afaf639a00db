//! A process group: the ranks of one data-parallel job joined through rank 0's store, with
//! collectives on tensors (the role `torch.distributed`'s process group plays).
//!
//! Two backends behind [`Collective`], one file each:
//! - [`TcpGroup`] (`tcp.rs`): the CPU ring of [`crate::ring`]; tensors are flattened into
//!   buckets of [`GroupOptions::bucket_bytes`], copied to host memory, reduced and copied back.
//!   For CPU training and tests.
//! - [`NcclGroup`] (`nccl.rs`): NCCL through `cudarc` with dynamic loading (no CUDA at build
//!   time; `libnccl.so` is found at run time or the join fails with what to install). It works
//!   on tch's CUDA tensors in place on the legacy default stream, which is the stream libtorch
//!   runs its kernels on unless a caller changes it, so the reduction is ordered after the
//!   backward kernels that wrote the gradients.
//!
//! This file holds what both share: the trait, the options, the bucketing, and [`join`], which
//! meets the other ranks through the store and picks the backend.
//!
//! Every collective is bounded by the group's timeout: a lost or frozen rank makes the others
//! fail with an error (naming the rank where the transport can tell), never hang.

mod nccl;
mod tcp;

pub use nccl::NcclGroup;
pub use tcp::TcpGroup;

use crate::rendezvous::Rendezvous;
use crate::ring::TcpRing;
use crate::store::{StoreClient, StoreServer};
use crate::{ClusterError, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};
use tch::{Device, Tensor};

/// Which transport the collectives use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Ring over TCP through host memory.
    Tcp,
    /// NCCL on CUDA tensors.
    Nccl,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Tcp => "tcp",
            Backend::Nccl => "nccl",
        })
    }
}

/// How a group behaves.
#[derive(Clone, Copy, Debug)]
pub struct GroupOptions {
    /// Bound on joining and on every collective.
    pub timeout: Duration,
    /// Gradient bucket size in bytes.
    pub bucket_bytes: usize,
}

impl Default for GroupOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            bucket_bytes: 25 << 20,
        }
    }
}

/// Collectives over the ranks of a group, on tensors, in place.
pub trait Collective: Send {
    /// This rank.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn world(&self) -> usize;
    /// The transport.
    fn backend(&self) -> Backend;
    /// Replaces every tensor with its mean over the ranks (bucketed).
    fn all_reduce_mean(&mut self, tensors: &[Tensor]) -> Result<()>;
    /// Copies rank `root`'s tensors to every rank.
    fn broadcast(&mut self, tensors: &[Tensor], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
    /// A barrier bounded by `timeout` instead of the group's own.
    fn barrier_within(&mut self, timeout: Duration) -> Result<()>;
}

/// Consecutive runs of tensors of one kind and device, each at most `bucket_bytes` (a
/// larger tensor is a bucket of its own).
pub fn buckets(tensors: &[Tensor], bucket_bytes: usize) -> Vec<std::ops::Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.numel() * t.kind().elt_size_in_bytes();
        let same =
            i > start && tensors[start].kind() == t.kind() && tensors[start].device() == t.device();
        if i > start && (!same || bytes + size > bucket_bytes) {
            out.push(start..i);
            start = i;
            bytes = 0;
        }
        bytes += size;
    }
    if start < tensors.len() {
        out.push(start..tensors.len());
    }
    out
}

/// Writes the slices of `flat` back into `tensors`, in order.
fn scatter_back(flat: &Tensor, tensors: &[Tensor]) {
    let mut off = 0i64;
    for t in tensors {
        let n = t.numel() as i64;
        let mut dst = t.shallow_clone();
        dst.copy_(&flat.narrow(0, off, n).view_as(t));
        off += n;
    }
}

/// The tensors' values in one new contiguous buffer (`cat` always allocates).
fn flatten(tensors: &[Tensor]) -> Tensor {
    let parts: Vec<Tensor> = tensors.iter().map(|t| t.reshape([-1])).collect();
    Tensor::cat(&parts, 0).contiguous()
}

/// Joins this rank to its group: rank 0 serves the store at `MASTER_ADDR:MASTER_PORT`, every
/// rank publishes where it listens, and the ranks connect. `device` is where this rank's
/// tensors live (NCCL needs a CUDA device).
pub fn join(
    rdv: &Rendezvous,
    backend: Backend,
    device: Device,
    opts: GroupOptions,
) -> Result<Box<dyn Collective>> {
    if !rdv.is_distributed() {
        return match backend {
            Backend::Tcp => Ok(Box::new(TcpGroup::new(
                TcpRing::connect(0, &["127.0.0.1:0".parse().expect("valid")], opts.timeout)?,
                opts.bucket_bytes,
            ))),
            Backend::Nccl => Ok(Box::new(NcclGroup::new(rdv, device, opts, None)?)),
        };
    }
    let master = resolve(&rdv.master_addr, rdv.master_port, opts.timeout)?;
    if rdv.rank == 0 {
        // Listen where the others will look; fall back to every interface when the master
        // name resolves to an address this host cannot bind (NAT, a service name).
        // The server runs on its own threads for the life of the process.
        StoreServer::start(master).or_else(|_| {
            let any = match master.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            StoreServer::start(SocketAddr::new(any, master.port()))
        })?;
    }
    let mut store = StoreClient::connect(master, opts.timeout)?;
    let own_ip = local_ip_towards(master);
    let listener =
        TcpListener::bind(SocketAddr::new(own_ip, 0)).map_err(|source| ClusterError::Listen {
            rank: rdv.rank,
            addr: SocketAddr::new(own_ip, 0),
            source,
        })?;
    let own = listener
        .local_addr()
        .map_err(|source| ClusterError::Listen {
            rank: rdv.rank,
            addr: SocketAddr::new(own_ip, 0),
            source,
        })?;
    store.set(
        &format!("ring/{}", rdv.rank),
        format!("{own}|{}", rdv.world).as_bytes(),
    )?;
    let mut addrs = Vec::with_capacity(rdv.world);
    for r in 0..rdv.world {
        let v = store.get(&format!("ring/{r}"))?;
        let v = String::from_utf8_lossy(&v).to_string();
        let (addr, world) = v.split_once('|').unwrap_or((v.as_str(), ""));
        if world != rdv.world.to_string() {
            return Err(ClusterError::WorldMismatch {
                rank: r,
                theirs: world.to_string(),
                ours: rdv.world,
            });
        }
        addrs.push(addr.parse().map_err(|_| ClusterError::Mismatch {
            rank: r,
            got: 0,
            want: 1,
        })?);
    }
    tracing::info!(
        rank = rdv.rank,
        world = rdv.world,
        local_rank = rdv.local_rank,
        from = rdv.source,
        %backend,
        "joined the process group through {master}"
    );
    match backend {
        Backend::Tcp => Ok(Box::new(TcpGroup::new(
            TcpRing::join(rdv.rank, Some(listener), &addrs, opts.timeout)?,
            opts.bucket_bytes,
        ))),
        Backend::Nccl => {
            drop(listener);
            Ok(Box::new(NcclGroup::new(
                rdv,
                device,
                opts,
                Some(&mut store),
            )?))
        }
    }
}

/// Resolves `host:port`, retrying until `timeout` (a Kubernetes service name appears only
/// once its pod runs).
fn resolve(host: &str, port: u16, timeout: Duration) -> Result<SocketAddr> {
    let deadline = Instant::now() + timeout;
    loop {
        match (host, port).to_socket_addrs() {
            Ok(mut it) => {
                if let Some(a) = it.next() {
                    return Ok(a);
                }
            }
            Err(e) if Instant::now() >= deadline => {
                return Err(ClusterError::Resolve {
                    host: host.to_string(),
                    reason: e.to_string(),
                })
            }
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            return Err(ClusterError::Resolve {
                host: host.to_string(),
                reason: "no address".into(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The address of the interface this host uses to reach `peer` (no packet is sent).
fn local_ip_towards(peer: SocketAddr) -> IpAddr {
    let any: SocketAddr = match peer {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().expect("valid"),
        SocketAddr::V6(_) => "[::]:0".parse().expect("valid"),
    };
    UdpSocket::bind(any)
        .and_then(|s| s.connect(peer).and_then(|_| s.local_addr()))
        .map(|a| a.ip())
        .unwrap_or(peer.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tch::Kind;

    #[test]
    fn buckets_split_by_size_kind_and_device() {
        let f = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
        let d = Tensor::zeros([4], (Kind::Double, Device::Cpu));
        // 4 B a value: buckets of at most 40 B.
        let ts = [f(4), f(4), f(4), d, f(100), f(1)];
        assert_eq!(buckets(&ts, 40), vec![0..2, 2..3, 3..4, 4..5, 5..6]);
        assert_eq!(buckets(&[], 40), Vec::<std::ops::Range<usize>>::new());
    }

    fn run<T: Send>(world: usize, f: impl Fn(Box<dyn Collective>) -> T + Sync) -> Vec<T> {
        let port = crate::launch::free_port().unwrap();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..world)
                .map(|rank| {
                    let f = &f;
                    s.spawn(move || {
                        let rdv = Rendezvous {
                            rank,
                            world,
                            local_rank: rank,
                            local_world: world,
                            master_addr: "127.0.0.1".into(),
                            master_port: port,
                            source: "test",
                        };
                        let opts = GroupOptions {
                            timeout: Duration::from_secs(10),
                            bucket_bytes: 64,
                        };
                        f(join(&rdv, Backend::Tcp, Device::Cpu, opts).unwrap())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn tensors_are_averaged_and_broadcast_across_buckets() {
        let out = run(3, |mut g| {
            let r = g.rank() as f64;
            // 40 + 3 values: several 64-byte buckets, a 2-D tensor among them.
            let a = Tensor::full([40], r, (Kind::Float, Device::Cpu));
            let b = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]) * (r + 1.0);
            g.all_reduce_mean(&[a.shallow_clone(), b.shallow_clone()])
                .unwrap();
            let c = Tensor::full([5], r + 10.0, (Kind::Float, Device::Cpu));
            g.broadcast(&[c.shallow_clone()], 2).unwrap();
            g.barrier().unwrap();
            (
                Vec::<f32>::try_from(&a).unwrap(),
                Vec::<f32>::try_from(&b.reshape([-1])).unwrap(),
                Vec::<f32>::try_from(&c).unwrap(),
            )
        });
        for (a, b, c) in out {
            assert!(a.iter().all(|&x| x == 1.0), "{a:?}");
            assert_eq!(b, vec![0.0, 2.0, 4.0, 6.0, 8.0, 10.0]);
            assert!(c.iter().all(|&x| x == 12.0), "{c:?}");
        }
    }

    #[test]
    fn a_rank_that_never_comes_is_named() {
        // World of 2, only rank 0 starts: the wait for rank 1's address times out.
        let port = crate::launch::free_port().unwrap();
        let rdv = Rendezvous {
            rank: 0,
            world: 2,
            local_rank: 0,
            local_world: 2,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            source: "test",
        };
        let opts = GroupOptions {
            timeout: Duration::from_millis(500),
            bucket_bytes: 64,
        };
        let err = join(&rdv, Backend::Tcp, Device::Cpu, opts)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("ring/1"), "{err}");
    }

    /// scripts/setup.sh links the torch wheel's NCCL as `.libtorch/lib/libnccl.so`, on the
    /// binaries' run path: cudarc's loader must find it there with no LD_LIBRARY_PATH.
    #[test]
    fn libnccl_is_found_beside_libtorch() {
        let link = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.libtorch/lib/libnccl.so");
        if !link.exists() {
            assert!(
                std::env::var("CI").is_err(),
                "scripts/setup.sh makes {} in CI (the torch wheel brings NCCL)",
                link.display()
            );
            return;
        }
        // SAFETY: only opens the shared library.
        assert!(unsafe { cudarc::nccl::sys::is_culib_present() });
    }

    #[test]
    fn nccl_on_the_cpu_says_why_not() {
        let opts = GroupOptions::default();
        let err = join(&Rendezvous::single(), Backend::Nccl, Device::Cpu, opts)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("tcp backend"), "{err}");
    }
}
