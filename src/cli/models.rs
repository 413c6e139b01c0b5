//! `inferq models …`: the registry from the shell.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Subcommand;

use crate::config::Settings;
use crate::registry::{Batching, NewVersion, Registry};
use crate::runtime::ModelSession;

/// Registry operations.
#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Add an ONNX file as a new version (copied in, hashed, signature read through ONNX Runtime).
    Add {
        /// The .onnx file.
        file: PathBuf,
        /// Model name.
        #[arg(long)]
        name: String,
        /// Version number (default: the next one).
        #[arg(long)]
        version: Option<u64>,
        /// Metadata `key=value` (repeatable), e.g. `--meta dataset=digits`.
        #[arg(long = "meta", value_parser = parse_meta)]
        meta: Vec<(String, String)>,
        /// Rows per batch for this model (overrides INFERQ_MAX_BATCH).
        #[arg(long = "batch-max-rows")]
        batch_max_rows: Option<usize>,
        /// Extra batch wait in ms for this model (overrides INFERQ_MAX_WAIT_MS).
        #[arg(long = "batch-max-wait-ms")]
        batch_max_wait_ms: Option<u64>,
        /// Padded elements per batch for this model, rows × padded length (overrides
        /// INFERQ_MAX_BATCH_ELEMENTS).
        #[arg(long = "batch-max-elements")]
        batch_max_elements: Option<usize>,
        /// An input axis that may be padded, `INPUT:AXIS[=VALUE]` (value 0 by default;
        /// repeatable), e.g. `--pad input_ids:1 --pad attention_mask:1`: jobs of
        /// different lengths then share a batch, padded to the longest.
        #[arg(long = "pad", value_parser = parse_pad)]
        pad: Vec<crate::runtime::padding::PadInput>,
        /// An output axis that has the padded length and is cut back to each job's,
        /// `OUTPUT:AXIS[=INPUT_AXIS]` (repeatable), e.g. `--pad-output last_hidden_state:1`.
        /// Outputs not named follow no padded axis (pooled outputs).
        #[arg(long = "pad-output", value_parser = parse_pad_output)]
        pad_output: Vec<crate::runtime::padding::PadOutput>,
    },
    /// List models: name, versions, default, size, created.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one version's manifest (`NAME` or `NAME@VERSION`).
    Show {
        /// `NAME[@VERSION]`.
        model: String,
    },
    /// Delete one version (`NAME@VERSION`).
    Rm {
        /// `NAME@VERSION`.
        model: String,
    },
    /// Keep the newest N versions (and the pinned one).
    Prune {
        /// Model name.
        name: String,
        /// How many to keep.
        #[arg(long)]
        keep: usize,
    },
    /// Make VERSION the default of NAME.
    Pin {
        /// Model name.
        name: String,
        /// Version.
        version: u64,
    },
    /// Check every file against its manifest hash; non-zero exit on any mismatch.
    Verify {
        /// Only this model.
        name: Option<String>,
    },
}

/// `INPUT:AXIS[=VALUE]`.
fn parse_pad(s: &str) -> Result<crate::runtime::padding::PadInput, String> {
    let (spec, value) = match s.split_once('=') {
        Some((spec, v)) => (
            spec,
            v.parse::<f64>()
                .map_err(|_| format!("`{v}` in `{s}` is not a number"))?,
        ),
        None => (s, 0.0),
    };
    let (name, axis) = name_axis(spec, s)?;
    Ok(crate::runtime::padding::PadInput { name, axis, value })
}

/// `OUTPUT:AXIS[=INPUT_AXIS]`.
fn parse_pad_output(s: &str) -> Result<crate::runtime::padding::PadOutput, String> {
    let (spec, follows) = match s.split_once('=') {
        Some((spec, f)) => (spec, Some(f)),
        None => (s, None),
    };
    let (name, axis) = name_axis(spec, s)?;
    let follows = match follows {
        Some(f) => f
            .parse()
            .map_err(|_| format!("`{f}` in `{s}` is not an axis number"))?,
        None => axis,
    };
    Ok(crate::runtime::padding::PadOutput {
        name,
        axis,
        follows,
    })
}

fn name_axis(spec: &str, whole: &str) -> Result<(String, usize), String> {
    let (name, axis) = spec
        .rsplit_once(':')
        .ok_or_else(|| format!("`{whole}` is not NAME:AXIS"))?;
    let axis = axis
        .parse()
        .map_err(|_| format!("`{axis}` in `{whole}` is not an axis number"))?;
    if name.is_empty() {
        return Err(format!("`{whole}` names no tensor"));
    }
    Ok((name.to_owned(), axis))
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("`{s}` is not key=value"))
}

fn parse_ref(s: &str) -> anyhow::Result<(String, Option<u64>)> {
    match s.split_once('@') {
        None => Ok((s.to_owned(), None)),
        Some((n, v)) => {
            let v = v
                .parse::<u64>()
                .ok()
                .filter(|&v| v > 0)
                .with_context(|| format!("`{v}` in `{s}` is not a version number"))?;
            Ok((n.to_owned(), Some(v)))
        }
    }
}

/// Runs a `models` subcommand against the registry of `settings`.
pub(super) fn run(settings: &Settings, command: ModelsCommand) -> anyhow::Result<()> {
    let registry = Registry::new(&settings.models);
    match command {
        ModelsCommand::Add {
            file,
            name,
            version,
            meta,
            batch_max_rows,
            batch_max_wait_ms,
            batch_max_elements,
            pad,
            pad_output,
        } => {
            let batching = (batch_max_rows.is_some()
                || batch_max_wait_ms.is_some()
                || batch_max_elements.is_some())
            .then_some(Batching {
                max_batch: batch_max_rows,
                max_wait_ms: batch_max_wait_ms,
                max_batch_elements: batch_max_elements,
            });
            if !pad_output.is_empty() && pad.is_empty() {
                bail!("--pad-output needs at least one --pad (an input axis to pad)");
            }
            let padding = (!pad.is_empty()).then_some(crate::runtime::Padding {
                inputs: pad,
                outputs: pad_output,
            });
            if let Some(n) = batch_max_rows
                && !(1..=crate::config::MAX_BATCH_ROWS).contains(&n)
            {
                bail!(
                    "--batch-max-rows must be 1 to {}, not {n}",
                    crate::config::MAX_BATCH_ROWS
                );
            }
            let new = NewVersion {
                version,
                metadata: meta.into_iter().collect::<BTreeMap<_, _>>(),
                batching,
                padding,
            };
            let label = file.display().to_string();
            let m = registry.add(&file, &name, new, |bytes| {
                ModelSession::load(bytes, &label, 1)
                    .map(|s| s.signature().clone())
                    .map_err(|e| e.to_string())
            })?;
            println!(
                "added {}@{} (sha256 {}, {} bytes)",
                m.name, m.version, m.sha256, m.size
            );
        }
        ModelsCommand::List { json } => {
            let models = registry.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&models)?);
                return Ok(());
            }
            println!(
                "{:<24} {:<16} {:>8} {:>12}  CREATED",
                "NAME", "VERSIONS", "DEFAULT", "SIZE"
            );
            for m in models {
                let versions = m
                    .versions
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                let default = if m.pinned {
                    format!("{}*", m.default)
                } else {
                    m.default.to_string()
                };
                println!(
                    "{:<24} {:<16} {:>8} {:>12}  {}",
                    m.name,
                    versions,
                    default,
                    m.manifest.size,
                    format_ms(m.manifest.created_ms)
                );
            }
        }
        ModelsCommand::Show { model } => {
            let (name, version) = parse_ref(&model)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&registry.manifest(&name, version)?)?
            );
        }
        ModelsCommand::Rm { model } => {
            let (name, version) = parse_ref(&model)?;
            let version = version
                .with_context(|| format!("`{model}`: say which version, as NAME@VERSION"))?;
            registry.remove(&name, version)?;
            println!("removed {name}@{version}");
        }
        ModelsCommand::Prune { name, keep } => {
            let removed = registry.prune(&name, keep)?;
            println!(
                "removed {} version(s) of {name}: {removed:?}",
                removed.len()
            );
        }
        ModelsCommand::Pin { name, version } => {
            registry.pin(&name, version)?;
            println!("pinned {name}@{version} as the default");
        }
        ModelsCommand::Verify { name } => {
            let mut bad = 0;
            for (n, v, result) in registry.verify(name.as_deref())? {
                match result {
                    Ok(()) => println!("ok       {n}@{v}"),
                    Err(e) => {
                        bad += 1;
                        println!("MISMATCH {n}@{v}: {e}");
                    }
                }
            }
            if bad > 0 {
                bail!("{bad} version(s) failed verification");
            }
        }
    }
    Ok(())
}

/// Unix ms as `YYYY-MM-DD HH:MM:SS UTC` (civil-from-days, no date crate needed).
fn format_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}
