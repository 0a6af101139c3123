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
        end_at_a_closed_output();
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
    let verifying = cli::is_verify(&args.command);
    let result = cli::run(args).await;
    // Spans still buffered are exported before the process exits.
    tokio::task::block_in_place(|| telemetry.shutdown());
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", cli::errors::one_line(&err));
            std::process::ExitCode::from(cli::errors::exit_code(&err, verifying))
        }
    }
}

/// A client command ends at a closed output (`usage | head`) as Unix tools do: killed by
/// SIGPIPE. Rust ignores SIGPIPE, so printing to a closed pipe panics ("failed printing to
/// stdout"), and such a panic is turned into that death here (it came after `account create` had
/// made the account but before its one-time secret was printed whole). SIGPIPE itself stays
/// ignored: restored to its default, it also killed the process, silently, when a server closed
/// its connection while the client wrote to it (`writev` on a socket takes no `MSG_NOSIGNAL`),
/// instead of the one-line error the client commands print.
fn end_at_a_closed_output() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let text = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        // The text as Rust writes it; the errno too, should the OS say it in other words.
        let closed = text.contains("Broken pipe") || text.contains("os error 32");
        if text.starts_with("failed printing to std") && closed {
            cli::die_of_a_closed_output();
        }
        default(info)
    }));
}
