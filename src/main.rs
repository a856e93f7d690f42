//! `kiln`: the command line for the whole pipeline.

mod cli;

use clap::Parser;

/// mimalloc, tuned for training (feature `mimalloc`, on by default): see `kiln::Allocator`.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: kiln::Allocator = kiln::Allocator;

fn main() {
    let args = cli::Cli::parse();
    if let Err(err) = cli::run(args) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
