//! The `inferq` binary: parse, set up logging, run the role, map errors to an exit code.

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: the worker allocates many small, short-lived
/// buffers per job (entries, tensors, result strings); the profile showed about a
/// fifth of its time in glibc's malloc and free.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match inferq::cli::parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("inferq: {e:#}");
            return ExitCode::from(2);
        }
    };
    inferq::telemetry::init_logging(cli.settings.log_format);
    match inferq::cli::run(cli) {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(e) => {
            eprintln!("inferq: {e:#}");
            ExitCode::FAILURE
        }
    }
}
