//! `inferq dlq …`: look at dead-lettered jobs, re-drive them, or purge them.

use std::fmt::Write as _;

use clap::Subcommand;

use crate::config::Settings;
use crate::queue::consume::Delivery;
use crate::queue::{Keys, dlq};

/// Dead-letter operations.
#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List dead letters, oldest first: entry, job id, attempts, error.
    List {
        /// Model name.
        model: String,
        /// Print a JSON array (entry, original_entry, id, attempts, error) instead of
        /// a table; bytes that are not UTF-8 become U+FFFD.
        #[arg(long)]
        json: bool,
        /// Show at most this many (the oldest); the table's last line, or stderr with
        /// --json, says when more are left out.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        limit: u64,
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
            DlqCommand::List { model, json, limit } => {
                let keys = checked(&model)?;
                // The range check above keeps `limit` far below usize::MAX.
                let count = usize::try_from(limit).unwrap_or(usize::MAX);
                let (entries, total) = dlq::page(&mut conn, &keys, count).await?;
                if json {
                    let list: Vec<_> = entries.iter().map(to_json).collect();
                    println!("{}", serde_json::to_string_pretty(&list)?);
                    if (entries.len() as u64) < total {
                        eprintln!("{}", left_out(entries.len(), total));
                    }
                } else {
                    print_table(&entries, total);
                }
            }
            DlqCommand::Replay { model, ids } => {
                let keys = checked(&model)?;
                let replayed = dlq::replay(&mut conn, &keys, &ids).await?;
                let shown: Vec<String> =
                    replayed.iter().map(|id| printable(id.as_bytes())).collect();
                println!("replayed {} job(s): {}", replayed.len(), shown.join(" "));
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

/// A field of a dead letter, raw.
fn field<'a>(d: &'a Delivery, name: &str) -> Option<&'a [u8]> {
    d.fields
        .as_ref()?
        .iter()
        .find(|(n, _)| n == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

fn print_table(entries: &[Delivery], total: u64) {
    println!("{:<20} {:<34} {:>8}  ERROR", "ENTRY", "JOB", "ATTEMPTS");
    for e in entries {
        let get = |name: &str| field(e, name).map(printable).unwrap_or_default();
        println!(
            "{:<20} {:<34} {:>8}  {}",
            e.entry_id,
            get("id"),
            get(dlq::dead_field::ATTEMPTS),
            get(dlq::dead_field::ERROR)
        );
    }
    if (entries.len() as u64) < total {
        println!("{}", left_out(entries.len(), total));
    } else {
        println!("{total} dead letter(s)");
    }
}

/// The line that says a listing is cut short, and how to see the rest.
fn left_out(shown: usize, total: u64) -> String {
    format!("{shown} of {total} dead letter(s) shown, the oldest; --limit shows more")
}

/// One dead letter for `--json`: the fields the table shows, under stable names.
fn to_json(d: &Delivery) -> serde_json::Value {
    let text = |name: &str| field(d, name).map(|v| String::from_utf8_lossy(v).into_owned());
    let attempts = text(dlq::dead_field::ATTEMPTS);
    serde_json::json!({
        "entry": d.entry_id,
        "original_entry": text(dlq::dead_field::ENTRY),
        "id": text("id"),
        // A number when it is one; a dead letter is written by a script, but its
        // fields are still data from Redis.
        "attempts": attempts.as_deref().and_then(|a| a.parse::<u64>().ok()),
        "error": text(dlq::dead_field::ERROR),
    })
}

/// Bytes a producer wrote, made safe to print on a terminal (AUDIT D30): control
/// characters (escape sequences, bells, carriage returns), invisible direction and
/// width marks and line separators are escaped as `\u{…}` or `\n`, bytes that are
/// not UTF-8 as `\xNN`, and the backslash itself as `\\`, so what is shown
/// is unambiguous and cannot move the cursor, recolour or retitle the terminal.
fn printable(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                c if c.is_control() || invisible(c) => out.extend(c.escape_default()),
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

/// Format and separator characters that reorder or hide text without being
/// control characters (the "Trojan Source" set, zero-width marks, the BOM).
fn invisible(c: char) -> bool {
    matches!(c,
        '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_what_a_terminal_would_act_on() {
        assert_eq!(printable(b"job-1 ok"), "job-1 ok");
        assert_eq!(
            printable("caf\u{e9} \u{4e2d}".as_bytes()),
            "caf\u{e9} \u{4e2d}"
        );
        assert_eq!(
            printable(b"\x1b]0;owned\x07\x1b[2J\r\n\t"),
            "\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\r\\n\\t"
        );
        assert_eq!(
            printable("a\u{202e}b\u{200b}c\u{85}".as_bytes()),
            "a\\u{202e}b\\u{200b}c\\u{85}"
        );
        assert_eq!(printable(b"\xff\xfe-x"), "\\xff\\xfe-x");
        // The backslash is escaped too, so `\\x41` printed cannot pass for a raw byte.
        assert_eq!(printable(br"\x41"), r"\\x41");
        for b in 0..=255u8 {
            let shown = printable(&[b]);
            assert!(
                shown.chars().all(|c| !c.is_control()),
                "byte {b:#x} printed as {shown:?}"
            );
        }
    }
}
