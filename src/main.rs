//! The `strata` binary: parses the command line and dispatches to `strata::cli`.

use clap::Parser;

#[cfg(unix)]
extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn mallopt(param: i32, value: i32) -> i32;
}

/// Keeps freed memory in the heap for reuse. A training step allocates and frees buffers of
/// 1-32 MB per op (decoded slabs, outputs, gradients) and a few larger ones (a trained
/// embedding's gradients); glibc serves the large ones with fresh `mmap`s and hands the top of
/// the heap back to the kernel once over 128 KB is free, so buffers page-fault and are zeroed
/// again every step, on the main thread while the kernels' threads wait (about 5% of a QLoRA
/// step, and 20% of the CPU time of a full fine-tuning step here). Nothing is unmapped or
/// trimmed instead: peak memory is unchanged, since it is the same buffers, reused.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn reuse_freed_memory() {
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_TOP_PAD: i32 = -2;
    const M_MMAP_THRESHOLD: i32 = -3;
    const M_MMAP_MAX: i32 = -4;
    // SAFETY: glibc's documented tuning calls, made before any allocation-heavy work or thread.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20);
        mallopt(M_MMAP_MAX, 0);
        mallopt(M_TRIM_THRESHOLD, -1);
        mallopt(M_TOP_PAD, 64 << 20);
    }
}

/// Marks `CANDLE_NUM_THREADS` as strata's choice rather than the user's.
const CHOSEN: &str = "STRATA_CHOSE_CANDLE_THREADS";

/// Marks `RAYON_NUM_THREADS` as set by [`resolve_matmul_threads`] rather than by the user.
const MATMUL_CHOSEN: &str = "STRATA_CHOSE_MATMUL_THREADS";

/// candle's CPU matmul asks for its thread count on every call, which without
/// `RAYON_NUM_THREADS` means reading /proc/cpuinfo (5% of a generated token's time, some 270
/// matmuls each). Where candle's count (physical cores, or the affinity mask) is the one rayon's
/// pool takes anyway (available parallelism), it is left in the variable once, which changes
/// neither pool. Elsewhere (SMT machines) nothing is set: the variable would resize rayon's pool.
/// Building the pool early instead, to keep its size, raised a full fine-tuning run's peak RSS
/// by 40-90 MB.
fn resolve_matmul_threads() {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() || std::env::var_os("RAYON_RS_NUM_CPUS").is_some() {
        return;
    }
    let candle = candle_core::utils::get_num_threads();
    if std::thread::available_parallelism().map_or(1, |n| n.get()) == candle {
        std::env::set_var("RAYON_NUM_THREADS", candle.to_string());
        std::env::set_var(MATMUL_CHOSEN, "1");
    }
}

fn main() {
    // Rust ignores SIGPIPE, so `strata inspect M | head` would panic when `head` closes the pipe;
    // the default action ends the process quietly, as other command-line tools do.
    #[cfg(unix)]
    // SAFETY: restoring the default disposition (SIG_DFL = 0) of SIGPIPE (13 on Linux and the
    // BSDs) before any thread starts.
    unsafe {
        signal(13, 0);
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    reuse_freed_memory();
    // A strata parent's resolved count is its own machine share's, not a choice to inherit.
    if std::env::var_os(MATMUL_CHOSEN).is_some() {
        std::env::remove_var("RAYON_NUM_THREADS");
        std::env::remove_var(MATMUL_CHOSEN);
    }
    let cli = strata::cli::Cli::parse();
    // strata's heavy CPU ops run on rayon's pool; candle's elementwise ops (residual adds and
    // the like) have a pool of their own whose workers spin between ops, competing with rayon's
    // for the same cores (+6-15% adapter training speed on 2 cores without it). The main thread
    // does candle's share alone unless the user asks otherwise, or the run trains every weight
    // (its gradient sums are large candle ops: 9% slower on one thread). A strata parent that
    // chose the value itself marks it, so that its children (`experiment` runs each recipe in
    // one) choose again for their own job. Still one thread here, so setting the variables
    // races with nothing.
    let chosen_by_strata = std::env::var_os(CHOSEN).is_some();
    if chosen_by_strata || std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        if cli.trains_every_weight() {
            std::env::remove_var("CANDLE_NUM_THREADS");
            std::env::remove_var(CHOSEN);
        } else {
            std::env::set_var("CANDLE_NUM_THREADS", "1");
            std::env::set_var(CHOSEN, "1");
        }
    }
    // An MPI launcher's rank joins its job here (after the thread choice above, which it
    // divides among the ranks sharing the machine); a plain process is a job of one.
    let comm = match strata::dist::launch() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    resolve_matmul_threads();
    let result = strata::cli::run(cli, comm.clone());
    if let Err(e) = &result {
        strata::dist::fail(comm.as_ref(), e);
    }
    drop(comm);
    if result.is_err() {
        std::process::exit(1);
    }
}
