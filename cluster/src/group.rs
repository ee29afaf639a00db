//! A process group: the ranks of one data-parallel job joined through rank 0's store, with
//! collectives on tensors (the role `torch.distributed`'s process group plays).
//!
//! Two backends behind [`Collective`]:
//! - [`TcpGroup`]: the CPU ring of [`crate::ring`]; tensors are flattened into buckets of
//!   `bucket_mb`, copied to host memory, reduced and copied back. For CPU training and tests.
//! - [`NcclGroup`]: NCCL through `cudarc` with dynamic loading (no CUDA at build time;
//!   `libnccl.so` is found at run time or the join fails with what to install). It works on
//!   tch's CUDA tensors in place on the legacy default stream, which is the stream libtorch
//!   runs its kernels on unless a caller changes it, so the reduction is ordered after the
//!   backward kernels that wrote the gradients.
//!
//! Every collective is bounded by the group's timeout: a lost or frozen rank makes the others
//! fail with an error (naming the rank where the transport can tell), never hang.

use crate::rendezvous::Rendezvous;
use crate::ring::{CollectiveError, Result, TcpRing};
use crate::store::{StoreClient, StoreServer};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

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
    let listener = TcpListener::bind(SocketAddr::new(own_ip, 0)).map_err(|source| {
        CollectiveError::Listen {
            rank: rdv.rank,
            addr: SocketAddr::new(own_ip, 0),
            source,
        }
    })?;
    let own = listener
        .local_addr()
        .map_err(|source| CollectiveError::Listen {
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
            return Err(CollectiveError::WorldMismatch {
                rank: r,
                theirs: world.to_string(),
                ours: rdv.world,
            });
        }
        addrs.push(addr.parse().map_err(|_| CollectiveError::Mismatch {
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
                return Err(CollectiveError::Resolve {
                    host: host.to_string(),
                    reason: e.to_string(),
                })
            }
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            return Err(CollectiveError::Resolve {
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

/// Collectives over the TCP ring, through host memory.
pub struct TcpGroup {
    ring: TcpRing,
    bucket_bytes: usize,
}

impl TcpGroup {
    /// A group over an already connected ring.
    pub fn new(ring: TcpRing, bucket_bytes: usize) -> Self {
        Self { ring, bucket_bytes }
    }

    /// Runs `op` on the values of `part` as one contiguous float32 host buffer, in place,
    /// then writes them back.
    fn on_host(part: &[Tensor], op: impl FnOnce(&mut [f32]) -> Result<()>) -> Result<()> {
        if let [t] = part {
            if t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous() {
                // One float32 host tensor: work in its own memory, as gloo does.
                // SAFETY: contiguous float32 storage of `numel` values, alive for the call;
                // the caller hands it over for the collective and does not touch it meanwhile.
                let values = unsafe {
                    std::slice::from_raw_parts_mut(t.data_ptr().cast::<f32>(), t.numel())
                };
                return op(values);
            }
        }
        // `cat` always makes a new buffer, so on the CPU in float32 this is already ours.
        let host = flatten(part)
            .to_kind(Kind::Float)
            .to_device(Device::Cpu)
            .contiguous();
        let n = host.numel();
        // SAFETY: `host` is a contiguous float32 CPU tensor of `n` values that this function
        // alone references, alive until the slice is dropped.
        let values = unsafe { std::slice::from_raw_parts_mut(host.data_ptr().cast::<f32>(), n) };
        op(values)?;
        scatter_back(&host, part);
        Ok(())
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.ring.rank()
    }

    fn world(&self) -> usize {
        self.ring.world()
    }

    fn backend(&self) -> Backend {
        Backend::Tcp
    }

    fn all_reduce_mean(&mut self, tensors: &[Tensor]) -> Result<()> {
        if self.ring.world() == 1 {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        for b in buckets(tensors, self.bucket_bytes) {
            let ring = &mut self.ring;
            Self::on_host(&tensors[b], |v| ring.all_reduce_mean(v))?;
        }
        Ok(())
    }

    fn broadcast(&mut self, tensors: &[Tensor], root: usize) -> Result<()> {
        if self.ring.world() == 1 {
            return Ok(());
        }
        let _guard = tch::no_grad_guard();
        for b in buckets(tensors, self.bucket_bytes) {
            let ring = &mut self.ring;
            Self::on_host(&tensors[b], |v| ring.broadcast(v, root))?;
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.ring.barrier()
    }

    fn barrier_within(&mut self, timeout: Duration) -> Result<()> {
        self.ring.barrier_within(timeout)
    }
}

/// Collectives through NCCL on CUDA tensors.
pub struct NcclGroup {
    comm: cudarc::nccl::sys::ncclComm_t,
    ctx: cudarc::driver::sys::CUcontext,
    rank: usize,
    world: usize,
    device: Device,
    timeout: Duration,
    bucket_bytes: usize,
    /// Set once the communicator was aborted: it must not be used or destroyed again.
    aborted: bool,
}

// The communicator and context are handles NCCL and CUDA allow to be used from any thread;
// the group is used by one thread at a time (`&mut self`).
unsafe impl Send for NcclGroup {}

fn nccl_err(what: &'static str, e: impl std::fmt::Debug) -> CollectiveError {
    CollectiveError::Nccl {
        what,
        reason: format!("{e:?}"),
    }
}

impl NcclGroup {
    /// Creates the communicator: rank 0 makes the unique id and shares it through `store`.
    fn new(
        rdv: &Rendezvous,
        device: Device,
        opts: GroupOptions,
        store: Option<&mut StoreClient>,
    ) -> Result<Self> {
        use cudarc::driver::{result as cu, sys as cusys};
        use cudarc::nccl::{result as nccl, sys as ncsys};
        let Device::Cuda(index) = device else {
            return Err(CollectiveError::Nccl {
                what: "needs a CUDA device",
                reason: format!("this rank trains on {device:?}; use the tcp backend on the CPU"),
            });
        };
        if !tch::Cuda::is_available() {
            return Err(CollectiveError::Nccl {
                what: "needs a GPU",
                reason: "libtorch sees no CUDA device".into(),
            });
        }
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { ncsys::is_culib_present() } {
            return Err(CollectiveError::Nccl {
                what: "cannot load libnccl.so",
                reason: "install NCCL (PyPI nvidia-nccl-cu13 comes with torch) and put a \
                         `libnccl.so` on the loader path (scripts/setup.sh links it beside libtorch)"
                    .into(),
            });
        }
        cu::init().map_err(|e| nccl_err("could not initialise the CUDA driver", e))?;
        // SAFETY: plain driver calls with out-pointers we own.
        let ctx = unsafe {
            let mut dev = 0;
            cusys::cuDeviceGet(&mut dev, index as i32)
                .result()
                .map_err(|e| nccl_err("could not open the CUDA device", e))?;
            let mut ctx = std::ptr::null_mut();
            cusys::cuDevicePrimaryCtxRetain(&mut ctx, dev)
                .result()
                .map_err(|e| nccl_err("could not retain the device's primary context", e))?;
            cusys::cuCtxSetCurrent(ctx)
                .result()
                .map_err(|e| nccl_err("could not make the device current", e))?;
            ctx
        };
        let id_bytes = if rdv.rank == 0 {
            let id = nccl::get_uniqueid().map_err(|e| nccl_err("could not make a unique id", e))?;
            let bytes: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
            if let Some(s) = store {
                s.set("nccl/id", &bytes)?;
            }
            bytes
        } else {
            store
                .expect("a distributed group has a store")
                .get("nccl/id")?
        };
        let mut id = ncsys::ncclUniqueId { internal: [0; 128] };
        for (d, s) in id.internal.iter_mut().zip(&id_bytes) {
            *d = *s as _;
        }
        let mut comm = std::ptr::null_mut();
        // SAFETY: `comm` is an out-pointer; the id came from rank 0.
        unsafe { nccl::comm_init_rank(&mut comm, rdv.world as i32, id, rdv.rank as i32) }
            .map_err(|e| nccl_err("could not create the communicator", e))?;
        if let Ok(v) = nccl::get_nccl_version() {
            tracing::info!(rank = rdv.rank, nccl_version = v, "NCCL communicator ready");
        }
        Ok(Self {
            comm,
            ctx,
            rank: rdv.rank,
            world: rdv.world,
            device,
            timeout: opts.timeout,
            bucket_bytes: opts.bucket_bytes,
            aborted: false,
        })
    }

    fn dtype(kind: Kind) -> Result<cudarc::nccl::sys::ncclDataType_t> {
        use cudarc::nccl::sys::ncclDataType_t as T;
        Ok(match kind {
            Kind::Float => T::ncclFloat32,
            Kind::Double => T::ncclFloat64,
            Kind::Half => T::ncclFloat16,
            Kind::BFloat16 => T::ncclBfloat16,
            Kind::Int => T::ncclInt32,
            Kind::Int64 => T::ncclInt64,
            other => {
                return Err(CollectiveError::Nccl {
                    what: "has no reduction for this tensor kind",
                    reason: format!("{other:?}"),
                })
            }
        })
    }

    /// Waits for the default stream, polling so a lost rank becomes an error after the
    /// timeout (the communicator is aborted) instead of a hang.
    fn wait(&mut self, op: &'static str) -> Result<()> {
        use cudarc::driver::sys as cusys;
        use cudarc::nccl::sys as ncsys;
        let deadline = Instant::now() + self.timeout;
        loop {
            // SAFETY: a query on the legacy default stream of our context.
            let status = unsafe {
                cusys::cuCtxSetCurrent(self.ctx);
                cusys::cuStreamQuery(std::ptr::null_mut())
            };
            match status {
                cusys::CUresult::CUDA_SUCCESS => return Ok(()),
                cusys::CUresult::CUDA_ERROR_NOT_READY => {}
                other => return Err(nccl_err("stream failed", other)),
            }
            let mut async_err = ncsys::ncclResult_t::ncclSuccess;
            // SAFETY: out-pointer we own; a live communicator.
            unsafe { ncsys::ncclCommGetAsyncError(self.comm, &mut async_err) };
            if async_err != ncsys::ncclResult_t::ncclSuccess
                && async_err != ncsys::ncclResult_t::ncclInProgress
            {
                // SAFETY: aborting a live communicator; `aborted` keeps it from further use.
                unsafe { ncsys::ncclCommAbort(self.comm) };
                self.aborted = true;
                return Err(nccl_err("reported an error from a peer", async_err));
            }
            if Instant::now() >= deadline {
                // SAFETY: as above.
                unsafe { ncsys::ncclCommAbort(self.comm) };
                self.aborted = true;
                return Err(CollectiveError::Timeout {
                    op,
                    world: self.world,
                    timeout_s: self.timeout.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    fn run_buckets(
        &mut self,
        tensors: &[Tensor],
        op: &'static str,
        call: impl Fn(*mut std::ffi::c_void, usize, cudarc::nccl::sys::ncclDataType_t) -> Result<()>,
    ) -> Result<()> {
        if self.aborted {
            return Err(CollectiveError::Nccl {
                what: "communicator was aborted",
                reason: "an earlier collective failed; restart the job".into(),
            });
        }
        let _guard = tch::no_grad_guard();
        for b in buckets(tensors, self.bucket_bytes) {
            let part = &tensors[b];
            if part[0].device() != self.device {
                return Err(CollectiveError::Nccl {
                    what: "got a tensor on another device",
                    reason: format!("{:?}, group on {:?}", part[0].device(), self.device),
                });
            }
            let flat = flatten(part);
            let dtype = Self::dtype(flat.kind())?;
            // SAFETY: context switch only.
            unsafe { cudarc::driver::sys::cuCtxSetCurrent(self.ctx) };
            call(flat.data_ptr(), flat.numel(), dtype)?;
            self.wait(op)?;
            scatter_back(&flat, part);
        }
        Ok(())
    }
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn backend(&self) -> Backend {
        Backend::Nccl
    }

    fn all_reduce_mean(&mut self, tensors: &[Tensor]) -> Result<()> {
        use cudarc::nccl::{result as nccl, sys as ncsys};
        let comm = self.comm;
        self.run_buckets(tensors, "all-reduce", |ptr, n, dtype| {
            // SAFETY: `ptr` is a contiguous CUDA buffer of `n` elements kept alive by the
            // caller until the stream has finished.
            unsafe {
                nccl::all_reduce(
                    ptr,
                    ptr,
                    n,
                    dtype,
                    ncsys::ncclRedOp_t::ncclAvg,
                    comm,
                    std::ptr::null_mut(),
                )
            }
            .map(|_| ())
            .map_err(|e| nccl_err("all-reduce failed", e))
        })
    }

    fn broadcast(&mut self, tensors: &[Tensor], root: usize) -> Result<()> {
        use cudarc::nccl::result as nccl;
        let comm = self.comm;
        self.run_buckets(tensors, "broadcast", |ptr, n, dtype| {
            // SAFETY: as in `all_reduce_mean`.
            unsafe { nccl::broadcast(ptr, ptr, n, dtype, root as i32, comm, std::ptr::null_mut()) }
                .map(|_| ())
                .map_err(|e| nccl_err("broadcast failed", e))
        })
    }

    fn barrier(&mut self) -> Result<()> {
        let token = Tensor::zeros([1], (Kind::Float, self.device));
        self.all_reduce_mean(&[token])
    }

    fn barrier_within(&mut self, timeout: Duration) -> Result<()> {
        let saved = self.timeout;
        self.timeout = timeout;
        let result = self.barrier();
        self.timeout = saved;
        result
    }
}

impl Drop for NcclGroup {
    fn drop(&mut self) {
        if self.aborted {
            return;
        }
        // SAFETY: the communicator is ours, live, and not used after this.
        unsafe {
            let _ = cudarc::nccl::result::comm_destroy(self.comm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

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
