//! `syft-router`: one binary for the ledger, the router, the embedded dev stack and client commands.

mod bench;
mod bench_router;
mod cli;
mod setup;

use clap::Parser;

// glibc malloc showed arena-lock contention and consolidation under load (perf); mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    cli::init_tracing(&args.log_format);
    match cli::run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
