//! The `strata` binary: parses the command line and dispatches to `strata::cli`.

use clap::Parser;

fn main() {
    let cli = strata::cli::Cli::parse();
    if let Err(e) = strata::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
