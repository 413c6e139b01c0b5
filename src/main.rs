//! The `inferq` binary: parse, set up logging, run the role, map errors to an exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match inferq::cli::parse() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("inferq: {e:#}");
            return ExitCode::from(2);
        }
    };
    inferq::telemetry::init_logging(&cli.settings.log_format);
    match inferq::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("inferq: {e:#}");
            ExitCode::FAILURE
        }
    }
}
