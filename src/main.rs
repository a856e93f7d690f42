//! `kiln`: the command line for the whole pipeline.

mod cli;

use clap::Parser;

/// mimalloc (feature `mimalloc`, on by default): see the feature's note in Cargo.toml.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = cli::Cli::parse();
    if let Err(err) = cli::run(args) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
