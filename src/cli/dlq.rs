//! `inferq dlq …`: look at dead-lettered jobs, re-drive them, or purge them.

use clap::Subcommand;

use crate::config::Settings;
use crate::queue::{Keys, dlq};

/// Dead-letter operations.
#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List dead letters: entry, job id, attempts, error.
    List {
        /// Model name.
        model: String,
    },
    /// Re-enqueue dead letters (all, or the given job ids) with attempts reset.
    Replay {
        /// Model name.
        model: String,
        /// Job ids; none means all.
        ids: Vec<String>,
    },
    /// Delete every dead letter of the model.
    Purge {
        /// Model name.
        model: String,
    },
}

pub(super) fn run(settings: &Settings, command: DlqCommand) -> anyhow::Result<()> {
    let target = super::roles::redis_target(settings, "dlq")?;
    super::roles::runtime(settings.async_threads)?.block_on(async {
        let mut conn = target.connect(std::time::Duration::from_secs(10)).await?;
        match command {
            DlqCommand::List { model } => {
                let keys = checked(&model)?;
                let entries = dlq::list(&mut conn, &keys, 10_000).await?;
                println!("{:<20} {:<34} {:>8}  ERROR", "ENTRY", "JOB", "ATTEMPTS");
                for e in &entries {
                    let get = |k: &str| {
                        e.fields
                            .as_ref()
                            .and_then(|f| f.iter().find(|(n, _)| n == k.as_bytes()))
                            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                            .unwrap_or_default()
                    };
                    println!(
                        "{:<20} {:<34} {:>8}  {}",
                        e.entry_id,
                        get("id"),
                        get(dlq::dead_field::ATTEMPTS),
                        get(dlq::dead_field::ERROR)
                    );
                }
                println!("{} dead letter(s)", entries.len());
            }
            DlqCommand::Replay { model, ids } => {
                let keys = checked(&model)?;
                let replayed = dlq::replay(&mut conn, &keys, &ids).await?;
                println!("replayed {} job(s): {}", replayed.len(), replayed.join(" "));
            }
            DlqCommand::Purge { model } => {
                let keys = checked(&model)?;
                println!(
                    "purged {} dead letter(s)",
                    dlq::purge(&mut conn, &keys).await?
                );
            }
        }
        Ok(())
    })
}

fn checked(model: &str) -> anyhow::Result<Keys> {
    anyhow::ensure!(
        crate::registry::valid_name(model),
        "invalid model name `{model}`"
    );
    Ok(Keys::new(model))
}
