//! `inferq submit`: enqueue one job from the shell, optionally wait and print the result.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use super::Outcome;
use crate::config::Settings;
use crate::producer::{JobRequest, Producer, Route};
use crate::protocol::job::{JobRecord, Status};
use crate::queue::submit as q;
use crate::registry::{Registry, RegistryCache};

/// What to submit.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// Model name.
    pub model: String,
    /// Model version (default: the model's default).
    #[arg(long)]
    pub version: Option<u64>,
    /// A JSON file with an OIP v2 request or `{"features": …}`; `-` reads stdin.
    #[arg(long, conflicts_with = "rows")]
    pub json: Option<PathBuf>,
    /// Inline rows, e.g. `[[5.1, 3.5, 1.4, 0.2]]`, for a single-input model.
    #[arg(long)]
    pub rows: Option<String>,
    /// Job id (idempotency key); default: a random id.
    #[arg(long)]
    pub id: Option<String>,
    /// Wait up to this many seconds (0 to 604800, a week) for the job to end and
    /// print its record; the exit status then says how it ended (see below).
    #[arg(long, value_name = "SECONDS", value_parser = parse_wait)]
    pub wait: Option<Duration>,
}

/// The exit statuses of `submit`, for `inferq submit --help` (kept in step with
/// [`Outcome::exit_code`] by a test).
pub(super) const AFTER_HELP: &str = "\
Exit status: 0 submitted (with --wait: the job succeeded); 1 the submit failed, or with
  --wait the job failed, expired or was cancelled; 2 a bad command line or setting;
  3 --wait ran out before the job ended (it stays queued). With --wait the job's
  record is printed on stdout whatever the status.";

/// The longest `--wait`: long enough for any backlog worth waiting on from a shell,
/// short enough that the deadline is always a valid `Instant` (a wait of 1e30 s
/// overflowed `Duration` and panicked, AUDIT D27).
const MAX_WAIT_S: f64 = 7.0 * 24.0 * 3600.0;

/// Parses `--wait`: seconds, fractions allowed; clap turns an error into exit 2.
fn parse_wait(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}` is not a number of seconds"))?;
    if !(0.0..=MAX_WAIT_S).contains(&secs) {
        return Err(format!(
            "`{text}` is out of range: wait 0 to {MAX_WAIT_S} seconds (a week)"
        ));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("`{text}`: {e}"))
}

pub(super) fn run(settings: &Settings, args: SubmitArgs) -> anyhow::Result<Outcome> {
    let body = match (&args.json, &args.rows) {
        (Some(p), _) if p.as_os_str() == "-" => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("cannot read stdin")?;
            s
        }
        (Some(p), _) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?
        }
        (None, Some(rows)) => format!(r#"{{"features": {rows}}}"#),
        (None, None) => {
            bail!("give the inputs with --json FILE (or - for stdin) or --rows '[[…]]'")
        }
    };
    let target = super::roles::redis_target(settings, "submit")?;
    super::roles::runtime(settings.async_threads)?.block_on(async {
        let mut conn = target.connect(Duration::from_secs(10)).await?;
        let registry = RegistryCache::new(Registry::new(&settings.models), Duration::from_secs(1));
        let producer = Producer::new(
            registry,
            conn.clone(),
            settings.max_elements,
            settings.max_queue,
        );
        let request = JobRequest {
            model: &args.model,
            // The CLI submits as the jobs route does: the same id there is the same job.
            route: Route::Jobs,
            version: args.version,
            body: body.as_bytes(),
            id: args.id.clone(),
            traceparent: None,
        };
        let accepted = producer.submit(request).await?;
        let Some(wait) = args.wait else {
            println!(
                "{}",
                serde_json::json!({ "id": accepted.id, "created": accepted.created })
            );
            return Ok(Outcome::Done);
        };
        let until = Instant::now() + wait;
        // Starts quick for a job a warm worker answers in milliseconds, backs off so
        // that a long wait does not poll Redis 50 times a second.
        let mut pause = Duration::from_millis(20);
        loop {
            let record = q::get(&mut conn, &accepted.keys, &accepted.id)
                .await?
                .with_context(|| format!("job `{}` vanished", accepted.id))?;
            let ended = record.status.is_terminal();
            if ended || Instant::now() >= until {
                println!("{}", serde_json::to_string_pretty(&record)?);
                return Ok(outcome(&record, ended, wait));
            }
            tokio::time::sleep(pause.min(until.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    })
}

/// The exit status of a wait, with a line on stderr when it is not success (the
/// record on stdout says the rest).
fn outcome(record: &JobRecord, ended: bool, wait: Duration) -> Outcome {
    let status = record.status.as_str();
    if !ended {
        eprintln!(
            "inferq: job `{}` is still {status} after {:.3} s; it stays queued",
            record.id,
            wait.as_secs_f64()
        );
        return Outcome::TimedOut;
    }
    if record.status == Status::Succeeded {
        return Outcome::Done;
    }
    eprintln!(
        "inferq: job `{}` {status}: {}",
        record.id,
        record.error.as_deref().unwrap_or("no reason recorded")
    );
    Outcome::JobNotSucceeded
}
