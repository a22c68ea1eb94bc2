//! NCCL for the gradients of GPU ranks (the `nccl` feature, over cudarc): the MPI job does
//! everything else (ranks, control, the NCCL id's exchange), so this file is only the device
//! sum.

use anyhow::{bail, Result};
use candle_core::{CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};
use cudarc::nccl::{Comm as NcclComm, Id, ReduceOp};

use super::{sum_on_host, Collective, Comm};

/// An MPI job whose device tensors are summed by NCCL, one GPU a rank.
pub struct Nccl {
    mpi: Comm,
    nccl: NcclComm,
}

impl Nccl {
    /// Joins the ranks of `mpi` in an NCCL communicator on `dev` (rank 0 makes the id, MPI
    /// carries it).
    pub fn init(mpi: Comm, dev: &Device) -> Result<Comm> {
        let Device::Cuda(cuda) = dev else {
            bail!("NCCL sums tensors on a CUDA device; this rank trains on {dev:?}");
        };
        let mut id = match mpi.rank() {
            0 => {
                let id = Id::new().map_err(|e| anyhow::anyhow!("NCCL: cannot make an id: {e:?}"))?;
                id.internal().iter().map(|&c| c as u8).collect()
            }
            _ => Vec::new(),
        };
        mpi.broadcast(0, &mut id)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        if id.len() != internal.len() {
            bail!("NCCL: rank 0 sent an id of {} bytes, not 128", id.len());
        }
        for (d, s) in internal.iter_mut().zip(&id) {
            *d = *s as std::ffi::c_char;
        }
        let nccl = NcclComm::from_rank(cuda.cuda_stream(), mpi.rank(), mpi.size(), Id::uninit(internal))
            .map_err(|e| anyhow::anyhow!("NCCL: cannot join the communicator: {e:?}"))?;
        Ok(std::rc::Rc::new(Nccl { mpi, nccl }))
    }
}

/// An in-place NCCL sum of a contiguous f32 CUDA tensor.
struct AllReduce<'a>(&'a NcclComm);

impl InplaceOp1 for AllReduce<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce"
    }

    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("NCCL sums CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> candle_core::Result<()> {
        let n = l.shape().elem_count();
        let slice = s.as_cuda_slice_mut::<f32>()?;
        match l.contiguous_offsets() {
            Some((0, end)) if end == n && slice.len() == n => {}
            _ => candle_core::bail!("NCCL sums whole contiguous tensors"),
        }
        self.0
            .all_reduce_in_place(slice, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok(())
    }
}

impl Collective for Nccl {
    fn rank(&self) -> usize {
        self.mpi.rank()
    }
    fn size(&self) -> usize {
        self.mpi.size()
    }
    fn local_rank(&self) -> usize {
        self.mpi.local_rank()
    }
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.mpi.sum_f32(buf)
    }
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.mpi.sum_f64(buf)
    }
    fn broadcast(&self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        self.mpi.broadcast(root, buf)
    }
    fn abort(&self, code: i32) -> ! {
        self.mpi.abort(code)
    }
    fn say(&self, line: &str) {
        self.mpi.say(line)
    }

    /// CUDA f32 tensors are summed in place on the device; any other goes through the host.
    fn sum_tensors(&self, ts: &mut [Tensor]) -> Result<usize> {
        let on_device = |t: &Tensor| t.device().is_cuda() && t.dtype() == DType::F32;
        if !ts.iter().all(on_device) {
            return sum_on_host(self, ts);
        }
        let nccl_err = |e| anyhow::anyhow!("NCCL: {e:?}");
        let mut bytes = 0;
        // One group: NCCL fuses the launches of many small sums (LoRA's hundreds of adapters).
        cudarc::nccl::group_start().map_err(nccl_err)?;
        for t in ts.iter_mut() {
            // A private, contiguous copy: the sum is written into it in place.
            let mine = t.contiguous()?.copy()?;
            mine.inplace_op1(&AllReduce(&self.nccl))?;
            bytes += 4 * mine.elem_count();
            *t = mine;
        }
        cudarc::nccl::group_end().map_err(nccl_err)?;
        Ok(bytes)
    }
}
