//! `inferq submit`: enqueue one job from the shell, optionally wait and print the result.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;

use crate::config::Settings;
use crate::producer::{JobRequest, Producer};
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
    /// Wait up to this many seconds for the result and print it.
    #[arg(long)]
    pub wait: Option<f64>,
}

pub(super) fn run(settings: &Settings, args: SubmitArgs) -> anyhow::Result<()> {
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
            return Ok(());
        };
        let until = Instant::now() + Duration::from_secs_f64(wait.max(0.0));
        loop {
            let record = q::get(&mut conn, &accepted.keys, &accepted.id)
                .await?
                .with_context(|| format!("job `{}` vanished", accepted.id))?;
            if record.status.is_terminal() || Instant::now() >= until {
                println!("{}", serde_json::to_string_pretty(&record)?);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}
