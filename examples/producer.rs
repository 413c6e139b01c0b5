//! A direct inferq producer in Rust, following docs/PROTOCOL.md: the `redis` crate for
//! Redis, `inferq::protocol` for the job entry and the binary tensor encoding.
//!
//! Enqueues two jobs for a single-input model (by default `tutorial-rf`): reference row
//! 0 as an OIP v2 JSON `body`, reference row 1 in the binary `bin` encoding; both name
//! one reply list. Then BLPOPs the results.
//!
//! ```text
//! cargo run --example producer -- --redis-url redis://127.0.0.1:6379 [--model tutorial-rf]
//!     [--reference testdata/models/tutorial-rf.reference.json] [--timeout 30]
//! ```
//!
//! Prints one JSON line per job on stdout — `{"row": r, "encoding": "json"|"bin",
//! "record": <job record>}` — and a summary on stderr. Exits 0 when both jobs
//! succeeded, 1 otherwise (a missing or failed result, a Redis error), 2 for bad
//! arguments.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use inferq::protocol::job::{self, JobEntry, JobRecord, Payload, Status};
use inferq::protocol::{InferResponse, Tensor, TensorData, binary};
use inferq::queue::Keys;
use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;

/// Command-line arguments.
struct Args {
    redis_url: String,
    model: String,
    reference: PathBuf,
    timeout: Duration,
}

const USAGE: &str =
    "usage: producer [--redis-url URL] [--model NAME] [--reference FILE] [--timeout SECONDS]";

fn parse_args() -> Result<Args, String> {
    let mut redis_url = "redis://127.0.0.1:6379".to_owned();
    let mut model = "tutorial-rf".to_owned();
    let mut reference = None;
    let mut timeout = Duration::from_secs(30);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || {
            it.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--redis-url" => redis_url = value()?,
            "--model" => model = value()?,
            "--reference" => reference = Some(PathBuf::from(value()?)),
            "--timeout" => {
                let v = value()?;
                let secs: f64 = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| {
                        format!("--timeout: `{v}` is not a positive number of seconds")
                    })?;
                timeout = Duration::from_secs_f64(secs);
            }
            "-h" | "--help" => return Err(USAGE.to_owned()),
            other => return Err(format!("unknown argument `{other}`\n{USAGE}")),
        }
    }
    let reference = reference.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("testdata/models")
            .join(format!("{model}.reference.json"))
    });
    Ok(Args {
        redis_url,
        model,
        reference,
        timeout,
    })
}

/// The single input of a reference file: name, OIP datatype, and its rows.
struct Rows {
    name: String,
    datatype: String,
    rows: Vec<Vec<f64>>,
}

fn reference_rows(path: &Path) -> anyhow::Result<Rows> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).context("reference is not JSON")?;
    let [input] = v["inputs"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    else {
        bail!("{}: expected exactly one input", path.display());
    };
    let cols = input["shape"][1].as_u64().context("shape [rows, cols]")? as usize;
    let data: Vec<f64> = input["data"]
        .as_array()
        .context("data")?
        .iter()
        .map(|x| x.as_f64().context("a number"))
        .collect::<anyhow::Result<_>>()?;
    Ok(Rows {
        name: input["name"].as_str().context("name")?.to_owned(),
        datatype: input["datatype"].as_str().context("datatype")?.to_owned(),
        rows: data.chunks(cols.max(1)).map(<[f64]>::to_vec).collect(),
    })
}

/// One row as a `[1, cols]` tensor of the input's type (the binary encoding does not
/// convert types: it must be the model input's own).
fn row_tensor(rows: &Rows, row: usize) -> anyhow::Result<Tensor> {
    let values = &rows.rows[row];
    let data = match rows.datatype.as_str() {
        "FP32" => TensorData::Fp32(values.iter().map(|&x| x as f32).collect()),
        "FP64" => TensorData::Fp64(values.clone()),
        other => bail!("this example sends FP32 or FP64 inputs, not {other}"),
    };
    Ok(Tensor {
        name: rows.name.clone(),
        shape: vec![1, values.len()],
        data,
    })
}

/// `XADD inferq:{m}:jobs * <fields>`: id `*`, no MAXLEN (workers trim safely).
async fn enqueue(
    conn: &mut MultiplexedConnection,
    keys: &Keys,
    entry: &JobEntry,
) -> anyhow::Result<String> {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(keys.jobs()).arg("*");
    for (field, value) in entry.to_fields() {
        cmd.arg(field).arg(value);
    }
    cmd.query_async(conn)
        .await
        .with_context(|| format!("XADD {}", keys.jobs()))
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let rows = reference_rows(&args.reference)?;
    if rows.rows.len() < 2 {
        bail!("{}: needs at least 2 rows", args.reference.display());
    }
    // `redis+unix:///path` and `unix:///path` both work here. BLPOP blocks on the
    // server, so the client must not time out first (the default is 500 ms).
    let client = redis::Client::open(args.redis_url.as_str()).context("Redis URL")?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(None);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .with_context(|| format!("connect to {}", args.redis_url))?;

    // inferq:{m}:jobs, inferq:{m}:result:<id>, inferq:{m}:reply:… (one hash tag: one slot).
    let keys = Keys::new(&args.model);
    let run_id = job::new_id();
    let reply_to = format!("{}rs-{run_id}", keys.reply_prefix());

    // Row 0 as an OIP v2 JSON request.
    let json_body = serde_json::json!({
        "inputs": [{
            "name": rows.name,
            "shape": [1, rows.rows[0].len()],
            "datatype": rows.datatype,
            "data": rows.rows[0],
        }]
    });
    // Row 1 in the binary encoding: "IQT1", count, then name/type/rank/dims/data.
    let bin = binary::encode(&[row_tensor(&rows, 1)?]).context("encode the binary payload")?;

    let jobs = [
        (
            0usize,
            "json",
            Payload::Json(serde_json::to_vec(&json_body)?),
        ),
        (1usize, "bin", Payload::Binary(bin)),
    ];
    let mut pending: HashMap<String, (usize, &str)> = HashMap::new();
    for (row, encoding, payload) in jobs {
        let entry = JobEntry {
            id: format!("rs-{run_id}-{encoding}"),
            payload,
            version: None, // the model's default version
            deadline_ms: None,
            reply_to: Some(reply_to.clone()),
            traceparent: None,
            record: false, // only the gateway writes a record hash with the entry
        };
        let entry_id = enqueue(&mut conn, &keys, &entry).await?;
        eprintln!("enqueued {} as {entry_id} ({encoding})", entry.id);
        pending.insert(entry.id, (row, encoding));
    }

    let deadline = Instant::now() + args.timeout;
    let mut ok = true;
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        // BLPOP key timeout → nil, or [key, element]; the timeout is in seconds.
        let popped: Option<(String, String)> = redis::cmd("BLPOP")
            .arg(&reply_to)
            .arg(left.as_secs_f64().max(0.01))
            .query_async(&mut conn)
            .await
            .context("BLPOP")?;
        let Some((_, json)) = popped else { break };
        let record: JobRecord = serde_json::from_str(&json).context("a job record")?;
        let Some((row, encoding)) = pending.remove(&record.id) else {
            continue;
        };
        let record_value: serde_json::Value = serde_json::from_str(&json)?;
        println!(
            "{}",
            serde_json::json!({"row": row, "encoding": encoding, "record": record_value})
        );
        match (&record.status, &record.outputs) {
            (Status::Succeeded, Some(outputs)) => {
                let response: InferResponse =
                    serde_json::from_str(outputs.get()).context("an OIP v2 response")?;
                let summary: Vec<String> = response
                    .outputs
                    .iter()
                    .map(|o| format!("{}={:?}", o.name, o.data))
                    .collect();
                eprintln!(
                    "{} (row {row}, {encoding}): {}",
                    record.id,
                    summary.join(" ")
                );
            }
            (status, _) => {
                ok = false;
                eprintln!(
                    "{} (row {row}, {encoding}): {}: {}: {}",
                    record.id,
                    status.as_str(),
                    record.error_kind.as_deref().unwrap_or("-"),
                    record.error.as_deref().unwrap_or("-")
                );
            }
        }
    }
    for id in pending.keys() {
        ok = false;
        // No reply: the terminal record, else the running record (if any), says where
        // the job is.
        let (record, result): (HashMap<String, String>, Option<String>) = redis::pipe()
            .cmd("HGETALL")
            .arg(keys.job(id))
            .cmd("GET")
            .arg(keys.result(id))
            .query_async(&mut conn)
            .await
            .context("read the record")?;
        let record = match result {
            Some(json) => json,
            None if record.is_empty() => "none (not taken by a worker yet)".to_owned(),
            None => format!("{record:?}"),
        };
        eprintln!(
            "{id}: no result within {:?}; record: {record:?}",
            args.timeout
        );
    }
    Ok(ok)
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
