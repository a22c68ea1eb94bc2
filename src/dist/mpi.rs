//! The MPI job (the `mpi` crate over Open MPI or MPICH): the only file that knows MPI.

use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};

use super::{Collective, Comm};

/// Values a single all-reduce call carries at most: a gradient of any size is summed in windows
/// of this many, so the scratch buffer stays small (32 MiB of f32).
const WINDOW: usize = 8 << 20;

/// A rank of an MPI job. Dropping it finalizes MPI.
pub struct Mpi {
    world: SimpleCommunicator,
    /// This rank's place among the ranks on its machine.
    local_rank: usize,
    /// Where [`Collective::say`] writes on a rank whose ordinary output is silenced.
    loud: Option<RawFd>,
    // Last, so that MPI is finalized after the communicator is gone.
    _universe: Universe,
}

impl Mpi {
    /// Initializes MPI (only the main thread calls it), divides the machine's cores among the
    /// ranks that share it, and silences every rank's output but rank 0's (set
    /// `STRATA_LOG_ALL_RANKS=1` to keep them).
    pub fn init() -> Result<Comm> {
        let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
            bail!("MPI was already initialized in this process");
        };
        let world = universe.world();
        let node = world.split_shared(world.rank());
        let local_rank = node.rank() as usize;
        share_cores(node.size().max(1) as usize);
        let rank = world.rank() as usize;
        let loud = match rank > 0 && std::env::var_os("STRATA_LOG_ALL_RANKS").is_none() {
            true => silence_stderr(),
            false => None,
        };
        Ok(std::rc::Rc::new(Mpi {
            world,
            local_rank,
            loud,
            _universe: universe,
        }))
    }
}

/// Gives each of the `local` ranks on this machine its share of the cores, unless the user set
/// the thread counts: ranks that each ran one thread per core would oversubscribe the machine.
fn share_cores(local: usize) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let each = (cores / local).max(1).to_string();
    // Still one thread: rayon's pool and candle's start later.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", &each);
    }
    if std::env::var("CANDLE_NUM_THREADS").map_or(true, |v| v != "1") {
        std::env::set_var("CANDLE_NUM_THREADS", &each);
    }
}

/// Points stderr at /dev/null and returns a descriptor of the old one.
fn silence_stderr() -> Option<RawFd> {
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null").ok()?;
    use std::os::fd::AsRawFd;
    // SAFETY: plain descriptor calls on descriptors this process owns; stderr (2) stays open
    // (now /dev/null) and the duplicate is kept for the life of the process.
    unsafe {
        let saved = libc::dup(2);
        if saved < 0 || libc::dup2(null.as_raw_fd(), 2) < 0 {
            return None;
        }
        Some(saved)
    }
}

/// Sums `buf` over the ranks in place, [`WINDOW`] values a call (MPI wants a separate send
/// buffer; a window-sized copy is the only scratch).
fn sum_in_windows<T: Equivalence + Copy>(world: &SimpleCommunicator, buf: &mut [T]) {
    let mut send = Vec::with_capacity(WINDOW.min(buf.len()));
    for part in buf.chunks_mut(WINDOW) {
        send.clear();
        send.extend_from_slice(part);
        world.all_reduce_into(&send[..], part, SystemOperation::sum());
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    fn size(&self) -> usize {
        self.world.size() as usize
    }

    fn local_rank(&self) -> usize {
        self.local_rank
    }

    fn sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        sum_in_windows(&self.world, buf);
        Ok(())
    }

    fn sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        sum_in_windows(&self.world, buf);
        Ok(())
    }

    fn broadcast(&self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        let root = self.world.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        root.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        root.broadcast_into(&mut buf[..]);
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    fn say(&self, line: &str) {
        match self.loud {
            Some(fd) => {
                // SAFETY: `fd` is the duplicate made by `silence_stderr`, open for the life of
                // the process; ManuallyDrop keeps this borrow from closing it.
                let mut f = std::mem::ManuallyDrop::new(unsafe { std::fs::File::from_raw_fd(fd) });
                let _ = writeln!(f, "{line}");
            }
            None => eprintln!("{line}"),
        }
    }
}
