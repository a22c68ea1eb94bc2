//! Data parallelism's collectives: what ranks of one job say to each other (sums of gradients
//! and loss terms, the lowest micro-batch, an error on one rank) behind one trait, so that the
//! training loop, the Fisher estimate and evaluation are written once for one process and for N.
//!
//! [`Solo`] is the one-process job: every call is the identity, so a run without a launcher is
//! the same run, to the byte, as before data parallelism existed. [`launch`] joins an MPI job
//! when the process was started by `mpirun` (or any MPI launcher) and the binary was built with
//! the `mpi` feature; `mpi.rs` is the only file that knows MPI.

#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;

use anyhow::Result;
use candle_core::{DType, Tensor};
use std::ops::Range;
use std::rc::Rc;

/// The collectives of a job of `size` ranks. Every rank calls the same ones in the same order.
pub trait Collective {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// Ranks in the job.
    fn size(&self) -> usize;
    /// This process's rank among those on its machine (which GPU a `cuda` rank takes).
    fn local_rank(&self) -> usize {
        0
    }
    /// Replaces `buf` by its element-wise sum over the ranks (the same values on every rank).
    fn sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// [`Collective::sum_f32`] in f64.
    fn sum_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Replaces `buf` by rank `root`'s bytes.
    fn broadcast(&self, root: usize, buf: &mut Vec<u8>) -> Result<()>;
    /// Replaces every tensor by its element-wise sum over the ranks, in its own dtype, shape
    /// and device; returns the bytes this rank sent into the sums. The default goes through
    /// host memory ([`sum_on_host`]); a GPU engine sums device tensors where they are.
    fn sum_tensors(&self, ts: &mut [Tensor]) -> Result<usize> {
        sum_on_host(self, ts)
    }
    /// Ends every rank of the job now, with `code`: for a failure the other ranks cannot be told
    /// of in step (they may be waiting in a collective).
    fn abort(&self, code: i32) -> !;
    /// Writes a line where the user sees it, whatever this rank does with its other output.
    fn say(&self, line: &str) {
        eprintln!("{line}");
    }
}

/// A job's collectives, shared by whatever needs them.
pub type Comm = Rc<dyn Collective>;

/// The one-process job.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn sum_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _: usize, _: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The one-process job as a [`Comm`].
pub fn solo() -> Comm {
    Rc::new(Solo)
}

/// Joins the job this process was launched into: MPI's when an MPI launcher started it (and the
/// `mpi` feature is built in), otherwise [`Solo`]. A process an MPI launcher started without
/// the feature is refused, since N copies of one run would each train alone.
pub fn launch() -> Result<Comm> {
    if !launched_by_mpi() {
        return Ok(solo());
    }
    #[cfg(feature = "mpi")]
    {
        mpi::Mpi::init()
    }
    #[cfg(not(feature = "mpi"))]
    {
        anyhow::bail!(
            "this process was started by an MPI launcher, but strata was built without MPI; \
             build it with `cargo build --release --features mpi` (Debian: apt install libopenmpi-dev libclang-dev)"
        )
    }
}

/// The job's collectives for tensors on `dev`: with the `nccl` feature, a job of several ranks
/// on CUDA devices sums its tensors with NCCL on the devices (the rest stays MPI's); otherwise
/// the job as it is (a CUDA rank's tensors then cross through the host).
pub fn for_device(comm: Comm, dev: &candle_core::Device) -> Result<Comm> {
    #[cfg(feature = "nccl")]
    if comm.size() > 1 && dev.is_cuda() {
        return nccl::Nccl::init(comm, dev);
    }
    let _ = dev;
    Ok(comm)
}

/// The largest difference between tensors on the CUDA device `dev` and their sum over a job of
/// one rank by NCCL (the identity): 0 when the device path works. The GPU check runs it, since
/// a lent GPU machine has no MPI for a job of more.
#[cfg(feature = "nccl")]
pub fn one_rank_device_sum_gap(dev: &candle_core::Device) -> Result<f64> {
    let comm = nccl::Nccl::init(solo(), dev)?;
    let ts = vec![
        Tensor::randn(0f32, 1.0, (37, 5), dev)?,
        Tensor::randn(0f32, 1.0, 10_000, dev)?,
    ];
    let mut summed = ts.clone();
    comm.sum_tensors(&mut summed)?;
    let mut gap: f64 = 0.0;
    for (a, b) in ts.iter().zip(&summed) {
        let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        gap = gap.max(f64::from(d));
    }
    Ok(gap)
}

/// Whether an MPI launcher (Open MPI's, MPICH's or Slurm's PMI) started this process.
pub fn launched_by_mpi() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// The device a rank trains on: `cuda` means the GPU of the rank's place on its machine (one GPU
/// a rank); any other name, `cuda:N` included, is taken as given.
pub fn rank_device(name: &str, comm: &dyn Collective) -> String {
    match (name.trim(), comm.size()) {
        ("cuda", n) if n > 1 => format!("cuda:{}", comm.local_rank()),
        (other, _) => other.to_string(),
    }
}

/// The part of `0..n` that `rank` of `size` takes: contiguous, in order, the first `n % size`
/// ranks one longer, so that the parts concatenated in rank order are `0..n`.
pub fn shard(n: usize, rank: usize, size: usize) -> Range<usize> {
    let (q, r) = (n / size, n % size);
    let start = rank * q + rank.min(r);
    start..start + q + usize::from(rank < r)
}

/// A failure every rank of the job knows of (it went through [`agree`]): the ranks can end
/// together, in order, instead of being aborted.
#[derive(Debug)]
pub struct JobFailed {
    /// The first failing rank.
    pub rank: usize,
    /// Its error, as it printed it.
    pub message: String,
}

impl std::fmt::Display for JobFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} failed: {}", self.rank, self.message)
    }
}

impl std::error::Error for JobFailed {}

/// A point every rank reaches with its own outcome: when any rank failed, every rank returns
/// the first failing rank's error (as [`JobFailed`]), so one rank's bad file or full disk ends
/// the job with the same clear message everywhere rather than a hang in the next collective.
pub fn agree<T>(comm: &dyn Collective, r: Result<T>) -> Result<T> {
    if comm.size() == 1 {
        return r;
    }
    let mut failed = vec![0.0; comm.size()];
    if r.is_err() {
        failed[comm.rank()] = 1.0;
    }
    comm.sum_f64(&mut failed)?;
    let Some(first) = failed.iter().position(|&f| f > 0.0) else {
        return r;
    };
    let mut msg = match &r {
        Err(e) if comm.rank() == first => format!("{e:#}").into_bytes(),
        _ => Vec::new(),
    };
    comm.broadcast(first, &mut msg)?;
    Err(JobFailed {
        rank: first,
        message: String::from_utf8_lossy(&msg).into_owned(),
    }
    .into())
}

/// Runs `f` on rank 0 only (the rank that writes a job's files) and [`agree`]s on its outcome:
/// every rank fails with rank 0's error, if any; rank 0 gets `f`'s value, the others `None`.
pub fn on_rank0<T>(comm: &dyn Collective, f: impl FnOnce() -> Result<T>) -> Result<Option<T>> {
    let r = match comm.rank() {
        0 => f().map(Some),
        _ => Ok(None),
    };
    agree(comm, r)
}

/// The smallest of every rank's `v`.
pub fn min_usize(comm: &dyn Collective, v: usize) -> Result<usize> {
    if comm.size() == 1 {
        return Ok(v);
    }
    let mut all = vec![0.0; comm.size()];
    all[comm.rank()] = v as f64;
    comm.sum_f64(&mut all)?;
    Ok(all.into_iter().fold(f64::INFINITY, f64::min) as usize)
}

/// Whether any rank's `v` is true.
pub fn any(comm: &dyn Collective, v: bool) -> Result<bool> {
    if comm.size() == 1 {
        return Ok(v);
    }
    let mut n = [f64::from(u8::from(v))];
    comm.sum_f64(&mut n)?;
    Ok(n[0] > 0.0)
}

/// Rank 0's `T` on every rank (sent as JSON).
pub fn from_rank0<T: serde::Serialize + serde::de::DeserializeOwned>(comm: &dyn Collective, v: T) -> Result<T> {
    if comm.size() == 1 {
        return Ok(v);
    }
    let mut bytes = serde_json::to_vec(&v)?;
    comm.broadcast(0, &mut bytes)?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Values summed in one call by [`sum_on_host`] (larger tensors go alone): a bucket of small
/// gradients (LoRA's hundreds) costs one collective, not hundreds.
const BUCKET: usize = 4 << 20;

/// [`Collective::sum_tensors`] through host memory: f32 on the wire, each tensor back in its
/// own dtype, shape and device, in buckets of about [`BUCKET`] values.
pub fn sum_on_host<C: Collective + ?Sized>(comm: &C, ts: &mut [Tensor]) -> Result<usize> {
    if comm.size() == 1 {
        return Ok(0);
    }
    let mut bytes = 0;
    let mut i = 0;
    while i < ts.len() {
        let (mut j, mut n) = (i, 0);
        while j < ts.len() && (j == i || n + ts[j].elem_count() <= BUCKET) {
            n += ts[j].elem_count();
            j += 1;
        }
        let mut buf: Vec<f32> = Vec::with_capacity(n);
        for t in &ts[i..j] {
            buf.extend_from_slice(&t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?);
        }
        comm.sum_f32(&mut buf)?;
        let mut at = 0;
        for t in &mut ts[i..j] {
            let k = t.elem_count();
            *t = Tensor::from_slice(&buf[at..at + k], t.shape(), t.device())?.to_dtype(t.dtype())?;
            at += k;
        }
        bytes += 4 * n;
        i = j;
    }
    Ok(bytes)
}

/// Says `e` where the user sees it. In a job of several ranks, an error the others already know
/// of ([`JobFailed`]) returns, so that each rank can leave MPI in order and exit; any other
/// aborts the whole job, since the other ranks may be waiting for this one in a collective.
pub fn fail(comm: &dyn Collective, e: &anyhow::Error) {
    let size = comm.size();
    if size == 1 {
        comm.say(&format!("error: {e:#}"));
        return;
    }
    comm.say(&format!("error (rank {} of {size}): {e:#}", comm.rank()));
    if !e.chain().any(|c| c.is::<JobFailed>()) {
        comm.abort(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_tile_the_range_in_order() {
        for n in 0..20 {
            for size in 1..6 {
                let parts: Vec<usize> = (0..size).flat_map(|r| shard(n, r, size)).collect();
                assert_eq!(parts, (0..n).collect::<Vec<_>>(), "n {n} size {size}");
                let lens: Vec<usize> = (0..size).map(|r| shard(n, r, size).len()).collect();
                assert!(lens.iter().max().unwrap() - lens.iter().min().unwrap() <= 1);
            }
        }
    }

    #[test]
    fn solo_agrees_with_itself() -> Result<()> {
        let c = solo();
        assert_eq!(agree(c.as_ref(), Ok(3))?, 3);
        let e = agree::<()>(c.as_ref(), Err(anyhow::anyhow!("bad file"))).unwrap_err();
        assert_eq!(format!("{e}"), "bad file");
        assert_eq!(min_usize(c.as_ref(), 7)?, 7);
        assert!(any(c.as_ref(), true)? && !any(c.as_ref(), false)?);
        assert_eq!(from_rank0(c.as_ref(), vec![1, 2])?, vec![1, 2]);
        Ok(())
    }
}
