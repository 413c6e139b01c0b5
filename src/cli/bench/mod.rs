//! `inferq bench`: a load generator and report (inferq's perf_analyzer).
//!
//! - load runs through Redis (a direct producer: `XADD` + a reply list) or through
//!   the HTTP front door (sync infer, or submit + long-poll); closed loop
//!   (`--concurrency`) or open loop (`--rate`, constant or Poisson arrivals, latency
//!   from each job's scheduled time); warm-up, then a window bounded in time and
//!   count; every answer checked against a reference file; server-side figures from
//!   `/metrics`; `--sweep` for a latency/throughput curve;
//! - drain-mode capacity: `--fill N` (enqueue only) and `--drain-wait` (time the
//!   workers until the group has nothing lagging or pending, with their CPU time);
//! - `--ceiling MODEL_FILE`: ONNX Runtime in-process at fixed batch sizes.

mod ceiling;
mod http;
mod load;
mod reference;
mod report;
mod schedule;
mod server;
mod stats;
mod via_http;
mod via_redis;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;

use crate::config::Settings;
use crate::queue::Keys;
use load::{Pace, Plan};
use reference::Reference;
use report::Report;
use schedule::Arrivals;
use server::Snapshot;
use via_http::HttpMode;
use via_redis::Encoding;

/// Which door the load goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// Straight to the model's stream, results on a reply list.
    Redis,
    /// The HTTP front door (`--url`).
    Http,
}

/// What to measure and how hard to push.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model name, as the workers serve it.
    pub model: Option<String>,
    /// Through Redis (a direct producer) or through the HTTP front door.
    #[arg(long, value_enum, default_value_t = Via::Redis)]
    pub via: Via,
    /// HTTP route: `sync` (POST /v2/models/{m}/infer) or `poll` (submit, then long-poll).
    #[arg(long, value_enum, default_value_t = HttpMode::Sync)]
    pub http_mode: HttpMode,
    /// Redis payload: the binary tensor encoding (`bin`) or an OIP v2 JSON body.
    #[arg(long, value_enum, default_value_t = Encoding::Bin)]
    pub encoding: Encoding,
    /// Closed loop: jobs out at once (a new one as soon as one is answered).
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Open loop: jobs per second, sent on schedule whatever the answers do.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Open loop: arrival spacing.
    #[arg(long, value_enum, default_value_t = Arrivals::Constant)]
    pub arrivals: Arrivals,
    /// Rows per job (cycled from the reference rows).
    #[arg(long, default_value_t = 1)]
    pub rows_per_job: usize,
    /// Seconds of load before the measured window.
    #[arg(long, default_value_t = 1.0)]
    pub warmup_s: f64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 10.0)]
    pub duration_s: f64,
    /// At most this many measured jobs.
    #[arg(long)]
    pub max_jobs: Option<u64>,
    /// Seconds to wait for the last answers once sending stopped (then: `timeout`).
    #[arg(long, default_value_t = 10.0)]
    pub timeout_s: f64,
    /// A `*.reference.json` (scripts/make_models.py): its rows are the inputs and each
    /// answer is checked against its outputs. Default:
    /// testdata/models/<model>.reference.json.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Gateway base URL for `--via http`.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Server /metrics URL(s), comma-separated (one per process): read before and after
    /// the measured window for queue wait, inference time and batch size.
    #[arg(long, value_delimiter = ',')]
    pub metrics_url: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// Run once per value (concurrencies; rates with `--rate-sweep`) and print the
    /// latency/throughput curve.
    #[arg(long, value_delimiter = ',')]
    pub sweep: Vec<f64>,
    /// `--sweep` values are open-loop rates.
    #[arg(long)]
    pub rate_sweep: bool,
    /// Also write the figures as CSV to this file.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Also draw the latency/throughput curve as SVG to this file (with --sweep).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Only enqueue this many jobs (no reply list), as fast as pipelining allows, and
    /// print the rate: the first half of a drain-mode measurement.
    #[arg(long)]
    pub fill: Option<u64>,
    /// Wait for the first delivery on the model's group, then until nothing lags or is
    /// pending; print the elapsed time and jobs/s: the second half.
    #[arg(long)]
    pub drain_wait: bool,
    /// With --drain-wait: worker process ids whose CPU time to report per job.
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// The in-process ONNX Runtime ceiling of a model file (no queue).
    #[arg(long, hide = true)]
    pub ceiling: Option<PathBuf>,
    /// With --ceiling: rows per call.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,8,32,128,512",
        hide = true
    )]
    pub batch_sizes: Vec<usize>,
}

pub(super) fn run(settings: &Settings, args: BenchArgs) -> anyhow::Result<()> {
    if args.rows_per_job == 0 || args.concurrency == 0 {
        bail!("--rows-per-job and --concurrency must be at least 1");
    }
    if args.rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--rate must be a positive number of jobs per second");
    }
    let reference = match (&args.reference, &args.model) {
        (Some(p), _) => Some(Reference::load(p)?),
        (None, Some(m)) => {
            let p = PathBuf::from("testdata/models").join(format!("{m}.reference.json"));
            p.is_file().then(|| Reference::load(&p)).transpose()?
        }
        (None, None) => None,
    };
    if let Some(file) = &args.ceiling {
        return print_ceiling(&args, file, reference.as_ref(), settings.intra_threads);
    }
    let model = args
        .model
        .clone()
        .context("name the model: `inferq bench MODEL …`")?;
    let reference = reference.with_context(|| {
        format!(
            "no inputs: give --reference FILE (testdata/models/{model}.reference.json is missing)"
        )
    })?;
    let jobs = Arc::new(reference.jobs(args.rows_per_job)?);
    let runtime = super::roles::runtime(settings.async_threads)?;
    if args.fill.is_some() || args.drain_wait || args.via == Via::Redis {
        let redis = super::roles::redis_target(settings, "bench --via redis")?;
        let target = via_redis::Target {
            redis,
            keys: Keys::new(&model),
            jobs: Arc::clone(&jobs),
            rows_per_job: args.rows_per_job,
            encoding: args.encoding,
        };
        if let Some(n) = args.fill {
            let f = runtime.block_on(via_redis::fill(&target, n))?;
            if args.json {
                println!("{}", serde_json::to_string(&f)?);
            } else {
                println!(
                    "filled {} jobs into {} in {:.3} s: {:.0} jobs/s",
                    f.jobs,
                    target.keys.jobs(),
                    f.seconds,
                    f.jobs_per_s
                );
            }
            return Ok(());
        }
        if args.drain_wait {
            let timeout = Duration::from_secs_f64(args.duration_s.max(0.1) + args.timeout_s);
            let d = runtime.block_on(via_redis::drain_wait(&target, &args.pids, timeout))?;
            if args.json {
                println!("{}", serde_json::to_string(&d)?);
            } else {
                let cpu = d
                    .cpu_us_per_job
                    .map(|c| format!(", {c:.1} µs worker CPU per job"))
                    .unwrap_or_default();
                println!(
                    "drained {} jobs in {:.3} s: {:.0} jobs/s{cpu}{}",
                    d.jobs,
                    d.seconds,
                    d.jobs_per_s,
                    if d.complete {
                        ""
                    } else {
                        " (timed out before the end)"
                    }
                );
            }
            if !d.complete {
                bail!("the queue did not drain in time");
            }
            return Ok(());
        }
        let via = format!(
            "redis ({})",
            serde_json::to_value(args.encoding)?.as_str().unwrap_or("?")
        );
        return load_runs(&runtime, &args, &model, &via, |plan| {
            let target = target.clone();
            async move { via_redis::run(&target, &plan).await }
        });
    }
    let target = via_http::Target {
        base: args.url.trim_end_matches('/').to_owned(),
        model: model.clone(),
        mode: args.http_mode,
        jobs,
        rows_per_job: args.rows_per_job,
    };
    let via = match args.http_mode {
        HttpMode::Sync => "http-sync",
        HttpMode::Poll => "http-poll",
    };
    load_runs(&runtime, &args, &model, via, |plan| {
        let target = target.clone();
        async move { via_http::run(&target, &plan).await }
    })
}

/// One run, or one per sweep value; prints and writes what was asked; fails when any
/// job failed or came back wrong.
fn load_runs<F, Fut>(
    runtime: &tokio::runtime::Runtime,
    args: &BenchArgs,
    model: &str,
    via: &str,
    run_one: F,
) -> anyhow::Result<()>
where
    F: Fn(Plan) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<stats::Tally>>,
{
    let paces: Vec<Pace> = if args.sweep.is_empty() {
        vec![match args.rate {
            Some(rate) => Pace::Open {
                rate,
                arrivals: args.arrivals,
            },
            None => Pace::Closed {
                concurrency: args.concurrency,
            },
        }]
    } else if args.rate_sweep || args.rate.is_some() {
        args.sweep
            .iter()
            .map(|&rate| Pace::Open {
                rate,
                arrivals: args.arrivals,
            })
            .collect()
    } else {
        args.sweep
            .iter()
            .map(|&c| Pace::Closed {
                concurrency: (c as usize).max(1),
            })
            .collect()
    };
    if paces
        .iter()
        .any(|p| matches!(p, Pace::Open { rate, .. } if rate.is_nan() || *rate <= 0.0))
    {
        bail!("every rate must be positive");
    }
    let probe = http::HttpClient::new(Duration::from_secs(5));
    let mut reports = Vec::with_capacity(paces.len());
    for pace in paces {
        let plan = Plan {
            pace,
            warmup: Duration::from_secs_f64(args.warmup_s.max(0.0)),
            duration: Duration::from_secs_f64(args.duration_s.max(0.0)),
            max_jobs: args.max_jobs,
            drain_timeout: Duration::from_secs_f64(args.timeout_s.max(0.0)),
        };
        let (tally, server) = runtime.block_on(async {
            let before = (!args.metrics_url.is_empty()).then(|| {
                let (probe, urls, model) =
                    (probe.clone(), args.metrics_url.clone(), model.to_owned());
                let warmup = plan.warmup;
                tokio::spawn(async move {
                    tokio::time::sleep(warmup).await;
                    server::scrape(&probe, &urls, &model).await
                })
            });
            let tally = run_one(plan).await?;
            let server = match before {
                Some(task) => {
                    let before: Snapshot = task.await.context("metrics task")??;
                    let after = server::scrape(&probe, &args.metrics_url, model).await?;
                    Some(after.since(&before))
                }
                None => None,
            };
            anyhow::Ok((tally, server))
        })?;
        let (concurrency, rate, arrivals) = match pace {
            Pace::Closed { concurrency } => (Some(concurrency), None, None),
            Pace::Open { rate, arrivals } => (
                None,
                Some(rate),
                serde_json::to_value(arrivals)?.as_str().map(str::to_owned),
            ),
        };
        let report = Report {
            model: model.to_owned(),
            via: via.to_owned(),
            pace: if concurrency.is_some() {
                "closed"
            } else {
                "open"
            },
            concurrency,
            rate,
            arrivals,
            rows_per_job: args.rows_per_job,
            sent: 0,
            ok: 0,
            errors: Default::default(),
            seconds: 0.0,
            jobs_per_s: 0.0,
            rows_per_s: 0.0,
            latency_ms: Default::default(),
            server,
        }
        .with_tally(&tally);
        if !args.json && args.sweep.is_empty() {
            print!("{}", report.human());
        }
        reports.push(report);
    }
    if args.json {
        if args.sweep.is_empty() {
            println!("{}", serde_json::to_string(&reports[0])?);
        } else {
            println!("{}", serde_json::to_string(&reports)?);
        }
    } else if !args.sweep.is_empty() {
        println!(
            "inferq bench: {model} via {via}, {} row(s)/job",
            args.rows_per_job
        );
        print!("{}", report::sweep_table(&reports));
    }
    if let Some(path) = &args.csv {
        std::fs::write(path, report::sweep_csv(&reports))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, report::sweep_svg(&reports))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    let errors: u64 = reports.iter().map(Report::error_count).sum();
    if errors > 0 {
        bail!("{errors} job(s) failed, came back wrong, or were not answered");
    }
    Ok(())
}

fn print_ceiling(
    args: &BenchArgs,
    file: &std::path::Path,
    reference: Option<&Reference>,
    intra_threads: usize,
) -> anyhow::Result<()> {
    let duration = Duration::from_secs_f64(args.duration_s.clamp(0.05, 60.0));
    let rows = ceiling::run(file, &args.batch_sizes, reference, intra_threads, duration)?;
    if args.json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(());
    }
    println!(
        "ONNX Runtime in-process ceiling: {} ({intra_threads} intra-op thread(s))",
        file.display()
    );
    println!("{:>6}  {:>12}  {:>12}", "batch", "rows/s", "µs/call");
    for r in rows {
        println!(
            "{:>6}  {:>12.0}  {:>12.1}",
            r.batch, r.rows_per_s, r.us_per_batch
        );
    }
    Ok(())
}
