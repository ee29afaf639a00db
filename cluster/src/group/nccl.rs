//! The GPU backend: collectives through NCCL on CUDA tensors, loaded at run time by `cudarc`.

use super::{buckets, flatten, scatter_back, Backend, Collective, GroupOptions};
use crate::rendezvous::Rendezvous;
use crate::store::StoreClient;
use crate::{ClusterError, Result};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

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

fn nccl_err(what: &'static str, e: impl std::fmt::Debug) -> ClusterError {
    ClusterError::Nccl {
        what,
        reason: format!("{e:?}"),
    }
}

impl NcclGroup {
    /// Creates the communicator: rank 0 makes the unique id and shares it through `store`.
    pub(super) fn new(
        rdv: &Rendezvous,
        device: Device,
        opts: GroupOptions,
        store: Option<&mut StoreClient>,
    ) -> Result<Self> {
        use cudarc::driver::{result as cu, sys as cusys};
        use cudarc::nccl::{result as nccl, sys as ncsys};
        let Device::Cuda(index) = device else {
            return Err(ClusterError::Nccl {
                what: "needs a CUDA device",
                reason: format!("this rank trains on {device:?}; use the tcp backend on the CPU"),
            });
        };
        if !tch::Cuda::is_available() {
            return Err(ClusterError::Nccl {
                what: "needs a GPU",
                reason: "libtorch sees no CUDA device".into(),
            });
        }
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { ncsys::is_culib_present() } {
            return Err(ClusterError::Nccl {
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
                return Err(ClusterError::Nccl {
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
                return Err(ClusterError::Timeout {
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
            return Err(ClusterError::Nccl {
                what: "communicator was aborted",
                reason: "an earlier collective failed; restart the job".into(),
            });
        }
        let _guard = tch::no_grad_guard();
        for b in buckets(tensors, self.bucket_bytes) {
            let part = &tensors[b];
            if part[0].device() != self.device {
                return Err(ClusterError::Nccl {
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
