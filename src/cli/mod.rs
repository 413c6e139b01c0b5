//! Command line: one binary, several roles. Parsing layers the config file under
//! environment variables and flags; each role gets validated settings.

mod bench;
mod dlq;
mod models;
mod roles;
mod submit;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::config::{self, Settings};

/// What `inferq --help` says after the settings: what an operator looks for and no
/// setting shows, the log filter and the exit statuses (the README repeats both).
const AFTER_HELP: &str = "\
Logging: logs go to stderr, as text or JSON (INFERQ_LOG_FORMAT). RUST_LOG filters them
  (tracing's EnvFilter syntax; default `info`), e.g. RUST_LOG=debug,
  RUST_LOG=inferq=debug,redis=warn or RUST_LOG=inferq::queue=trace.

Exit status: 0 success; 1 failure (and, for `submit --wait`, a job that failed, expired
  or was cancelled); 2 a bad command line, setting or config file; 3 `submit --wait`
  stopped waiting before the job ended.";

/// inferq: queue-based batch inference on Redis Streams and ONNX Runtime.
#[derive(Parser, Debug)]
#[command(
    name = "inferq",
    version,
    about,
    max_term_width = 100,
    after_help = AFTER_HELP
)]
pub struct Cli {
    /// TOML file of settings (keys as in `--help`, e.g. `max_batch = 32`); environment
    /// variables and flags override it.
    #[arg(
        long,
        env = "INFERQ_CONFIG",
        global = true,
        help_heading = config::heading::REGISTRY
    )]
    pub config: Option<PathBuf>,

    /// Settings shared by every role.
    #[command(flatten)]
    pub settings: Settings,

    /// The role or tool to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Roles and tools.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// The versioned model registry.
    Models {
        /// What to do with it.
        #[command(subcommand)]
        command: models::ModelsCommand,
    },
    /// Front door and workers in one process; starts a private redis-server when
    /// INFERQ_REDIS_URL is unset.
    Serve,
    /// The stateless HTTP front door.
    Gateway,
    /// Consume model streams: micro-batch, run ONNX Runtime, write results.
    Worker,
    /// Enqueue one job from the shell; optionally wait for its result.
    #[command(after_help = submit::AFTER_HELP)]
    Submit(submit::SubmitArgs),
    /// Load generator: throughput and latency through Redis or HTTP, drain-mode
    /// capacity, and the in-process ONNX Runtime ceiling.
    Bench(Box<bench::BenchArgs>),
    /// Inspect and re-drive dead-lettered jobs.
    Dlq {
        /// What to do with them.
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Print a shell completion script, e.g. `inferq completions bash >
    /// /etc/bash_completion.d/inferq` or `inferq completions zsh > ~/.zfunc/_inferq`.
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
}

/// How a command ended when it ran to its end: the exit status of the process. A
/// waited-for job that did not succeed is not an error of the command (it printed
/// the record), but a script must be able to tell it from success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Did what was asked: exit 0.
    Done,
    /// `submit --wait`: the job ended failed, expired or cancelled: exit 1, as for
    /// any failure.
    JobNotSucceeded,
    /// `submit --wait`: the wait ran out with the job still queued or running: exit
    /// 3, like `kubectl wait` telling a timeout from a failure, and apart from clap's
    /// 2 for usage errors.
    TimedOut,
}

impl Outcome {
    /// The process exit status.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Done => 0,
            Outcome::JobNotSucceeded => 1,
            Outcome::TimedOut => 3,
        }
    }
}

/// Parses the command line with the config file (from `--config` or `INFERQ_CONFIG`)
/// as the lowest layer.
pub fn parse() -> anyhow::Result<Cli> {
    let args: Vec<String> = std::env::args().collect();
    let mut command = Cli::command();
    if let Some(path) = config_path(&args) {
        for (key, value) in config::read_file(&path).map_err(anyhow::Error::msg)? {
            if !command.get_arguments().any(|a| a.get_id() == key.as_str()) || key == "config" {
                bail!("config file {}: unknown setting `{key}`", path.display());
            }
            let secret = config::is_secret(&key);
            command = command.mut_arg(key, |a| a.default_value(value).hide_default_value(secret));
        }
    }
    // A secret's `_FILE` variable sits at the environment's level: above the file.
    for (id, var) in config::SECRETS {
        if let Some(value) = config::secret_from_file(var).map_err(anyhow::Error::msg)? {
            command = command.mut_arg(id, |a| a.default_value(value).hide_default_value(true));
        }
    }
    let matches = command.get_matches_from(args);
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli.settings.drop_empty_values();
    cli.settings
        .validate()
        .map_err(anyhow::Error::msg)
        .context("invalid setting")?;
    Ok(cli)
}

/// Writes the completion script. It is rendered into memory first: clap_complete
/// panics when its writer fails, and stdout may be a closed pipe or a full disk.
fn completions(shell: clap_complete::Shell) -> anyhow::Result<()> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "inferq", &mut script);
    std::io::Write::write_all(&mut std::io::stdout().lock(), &script)
        .with_context(|| format!("cannot write the {shell} completion script"))
}

fn config_path(args: &[String]) -> Option<PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os("INFERQ_CONFIG").map(PathBuf::from)
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    let done = match cli.command {
        Command::Submit(args) => return submit::run(&cli.settings, args),
        Command::Models { command } => models::run(&cli.settings, command),
        Command::Serve => roles::run(&cli.settings, roles::Role::Serve),
        Command::Gateway => roles::run(&cli.settings, roles::Role::Gateway),
        Command::Worker => roles::run(&cli.settings, roles::Role::Worker),
        Command::Dlq { command } => dlq::run(&cli.settings, command),
        Command::Bench(args) => bench::run(&cli.settings, *args),
        Command::Completions { shell } => completions(shell),
    };
    done.map(|()| Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_setting_is_under_a_heading_and_help_shows_them_in_order() {
        let mut command = Cli::command();
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if ["help", "version"].contains(&id) {
                continue;
            }
            let heading = arg.get_help_heading();
            assert!(
                heading.is_some_and(|h| config::heading::ALL.contains(&h)),
                "setting `{id}` is under {heading:?}"
            );
        }
        let help = command.render_long_help().to_string();
        let at: Vec<usize> = config::heading::ALL
            .iter()
            .map(|h| {
                help.find(&format!("\n{h}:\n"))
                    .unwrap_or_else(|| panic!("no {h}"))
            })
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{help}");
        // A closed set lists its values.
        assert!(
            help.contains("Possible values:") && help.contains("json:"),
            "{help}"
        );
    }

    #[test]
    fn every_secret_is_a_setting_whose_env_value_is_hidden() {
        let command = Cli::command();
        for (id, var) in config::SECRETS {
            let arg = command
                .get_arguments()
                .find(|a| a.get_id() == id)
                .unwrap_or_else(|| panic!("secret `{id}` is not a setting"));
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(var), "{id}");
            assert!(arg.is_hide_env_values_set(), "{id} shows its env value");
        }
    }
}
