//! The `strata` binary: parses the command line and dispatches to `strata::cli`.

use clap::Parser;

#[cfg(unix)]
extern "C" {
    fn signal(signum: i32, handler: usize) -> usize;
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
    let cli = strata::cli::Cli::parse();
    if let Err(e) = strata::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
