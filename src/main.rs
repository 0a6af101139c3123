//! `syft-router`: one binary for the ledger, the router, the embedded dev stack and client commands.

mod bench;
mod bench_analytics;
mod bench_analytics_shapes;
mod bench_chaos;
mod bench_delay;
mod bench_history;
mod bench_limits;
mod bench_pg;
mod bench_router;
mod bench_shapes;
mod bench_spool;
mod bench_usage;
mod chaos_parts;
mod cli;
mod setup;

use clap::Parser;

// glibc malloc showed arena-lock contention and consolidation under load (perf); mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    if cli::prints_and_exits(&args.command) {
        // Rust ignores SIGPIPE, so printing to a closed pipe (`usage | head`) panicked ("failed
        // printing to stdout"), after `account create` had made the account but before its
        // one-time secret was printed whole. A client command ends at a closed pipe, as Unix
        // tools do. Its sockets are unaffected: they write with MSG_NOSIGNAL.
        // SAFETY: `signal` may be called at any time; it sets the default action, and nothing
        // in this process installs a SIGPIPE handler of its own.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let telemetry = match syft_telemetry::init_with_default_filter(
        cli::service_name(&args.command),
        &args.log_format,
        cli::default_log_filter(&args.command),
    ) {
        Ok(t) => t,
        Err(err) => {
            eprintln!("error: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = cli::run(args).await;
    // Spans still buffered are exported before the process exits.
    tokio::task::block_in_place(|| telemetry.shutdown());
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", cli::errors::one_line(&err));
            std::process::ExitCode::FAILURE
        }
    }
}
