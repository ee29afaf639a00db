//! The CPU backend: collectives over the TCP ring of [`crate::ring`], through host memory.

use super::{buckets, flatten, scatter_back, Backend, Collective};
use crate::ring::TcpRing;
use crate::Result;
use std::time::Duration;
use tch::{Device, Kind, Tensor};

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
