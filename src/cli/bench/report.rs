//! What a run reports: for people (a few aligned lines, or one table for a sweep),
//! for machines (`--json`) and for spreadsheets (`--csv`).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use super::server::ServerSide;
use super::stats::{Latency, Tally};

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub(super) struct Report {
    /// Model name.
    pub model: String,
    /// `redis`, `http-sync` or `http-poll`.
    pub via: String,
    /// `closed` or `open`.
    pub pace: &'static str,
    /// Closed loop: jobs out at once.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// Open loop: jobs per second offered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// Open loop: `constant` or `poisson`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arrivals: Option<String>,
    /// Rows per job.
    pub rows_per_job: usize,
    /// Measured jobs sent.
    pub sent: u64,
    /// Measured jobs answered with the expected outputs.
    pub ok: u64,
    /// Errors by kind.
    pub errors: BTreeMap<String, u64>,
    /// Measured window, seconds (first measured send to last measured answer).
    pub seconds: f64,
    /// Successful jobs per second.
    pub jobs_per_s: f64,
    /// Successful rows per second.
    pub rows_per_s: f64,
    /// Latency of successful jobs, ms, from the time each was due.
    pub latency_ms: Latency,
    /// From the server's `/metrics`, when `--metrics-url` was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerSide>,
}

impl Report {
    /// Fills the figures from a tally.
    pub(super) fn with_tally(mut self, t: &Tally) -> Report {
        let secs = t.elapsed.as_secs_f64();
        self.sent = t.sent;
        self.ok = t.ok;
        self.errors = t.errors.clone();
        self.seconds = secs;
        self.jobs_per_s = if secs > 0.0 { t.ok as f64 / secs } else { 0.0 };
        self.rows_per_s = self.jobs_per_s * self.rows_per_job as f64;
        self.latency_ms = t.latency;
        self
    }

    /// Errors of every kind.
    pub(super) fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The load, as a sweep table labels it.
    fn load(&self) -> String {
        match (self.concurrency, self.rate) {
            (Some(c), _) => format!("c={c}"),
            (_, Some(r)) => format!("{r}/s"),
            _ => "-".into(),
        }
    }

    /// A few lines for a person.
    pub(super) fn human(&self) -> String {
        let mut s = String::new();
        let pace = match (self.concurrency, self.rate, &self.arrivals) {
            (Some(c), _, _) => format!("closed loop, concurrency {c}"),
            (_, Some(r), Some(a)) => format!("open loop, {r} jobs/s {a}"),
            _ => self.pace.to_owned(),
        };
        let _ = writeln!(
            s,
            "inferq bench: {} via {}, {pace}, {} row(s)/job",
            self.model, self.via, self.rows_per_job
        );
        let _ = writeln!(
            s,
            "  jobs        {} ok, {} errors, of {} sent in {:.2} s",
            self.ok,
            self.error_count(),
            self.sent,
            self.seconds
        );
        let _ = writeln!(
            s,
            "  throughput  {:.1} jobs/s, {:.1} rows/s",
            self.jobs_per_s, self.rows_per_s
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            s,
            "  latency ms  p50 {:.3}  p90 {:.3}  p95 {:.3}  p99 {:.3}  max {:.3}  (mean {:.3})",
            l.p50, l.p90, l.p95, l.p99, l.max, l.mean
        );
        if !self.errors.is_empty() {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect();
            let _ = writeln!(s, "  errors      {}", list.join(", "));
        }
        if let Some(sv) = &self.server {
            let _ = writeln!(
                s,
                "  server      queue wait {:.3} ms/job, inference {:.3} ms/batch, {:.1} rows/batch ({} batches)",
                sv.queue_wait_ms, sv.inference_ms, sv.batch_rows, sv.batches
            );
        }
        s
    }
}

/// The columns of a sweep, for the table and the CSV.
const COLUMNS: [&str; 13] = [
    "load",
    "jobs_per_s",
    "rows_per_s",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "ok",
    "errors",
    "batch_rows",
    "queue_wait_ms",
    "inference_ms",
];

fn cells(r: &Report) -> Vec<String> {
    let l = &r.latency_ms;
    let sv = r.server.unwrap_or_default();
    vec![
        r.load(),
        format!("{:.1}", r.jobs_per_s),
        format!("{:.1}", r.rows_per_s),
        format!("{:.3}", l.p50),
        format!("{:.3}", l.p90),
        format!("{:.3}", l.p95),
        format!("{:.3}", l.p99),
        format!("{:.3}", l.max),
        r.ok.to_string(),
        r.error_count().to_string(),
        format!("{:.1}", sv.batch_rows),
        format!("{:.3}", sv.queue_wait_ms),
        format!("{:.3}", sv.inference_ms),
    ]
}

/// The latency/throughput curve of a sweep, as an aligned table.
pub(super) fn sweep_table(reports: &[Report]) -> String {
    let rows: Vec<Vec<String>> = reports.iter().map(cells).collect();
    let widths: Vec<usize> = (0..COLUMNS.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([COLUMNS[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cols: Vec<&str>| {
        let padded: Vec<String> = cols
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect();
        padded.join("  ").trim_end().to_owned() + "\n"
    };
    let mut out = line(COLUMNS.to_vec());
    for r in &rows {
        out += &line(r.iter().map(String::as_str).collect());
    }
    out
}

/// The same as CSV.
pub(super) fn sweep_csv(reports: &[Report]) -> String {
    let mut out = COLUMNS.join(",") + "\n";
    for r in reports {
        out += &(cells(r).join(",") + "\n");
    }
    out
}

/// The curve of a sweep as a small SVG: throughput (x) against p50, p95 and p99
/// latency (y), one point per run. Hand-written: no plotting crate for three lines.
pub(super) fn sweep_svg(reports: &[Report]) -> String {
    let (w, h, m) = (640.0, 400.0, 56.0);
    let x_max = reports.iter().map(|r| r.jobs_per_s).fold(1.0, f64::max) * 1.05;
    let y_max = reports.iter().map(|r| r.latency_ms.p99).fold(0.1, f64::max) * 1.1;
    // The plot area inside the margins: 528 x 288.
    let (x_scale, y_scale) = (528.0 / x_max, 288.0 / y_max);
    let x = |v: f64| v.mul_add(x_scale, m);
    let y = |v: f64| h - v.mul_add(y_scale, m);
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{m}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{m}" y1="{m}" x2="{m}" y2="{b}" stroke="black"/>
<text x="{cx}" y="{tb}" text-anchor="middle">throughput, jobs/s (max {x_max:.0})</text>
<text x="14" y="{cy}" transform="rotate(-90 14 {cy})" text-anchor="middle">latency, ms (max {y_max:.2})</text>
"#,
        b = h - m,
        r = w - m,
        cx = w / 2.0,
        tb = h - 16.0,
        cy = h / 2.0,
    );
    type Series = (&'static str, &'static str, fn(&Latency) -> f64);
    let series: [Series; 3] = [
        ("p50", "#1b9e77", |l| l.p50),
        ("p95", "#d95f02", |l| l.p95),
        ("p99", "#7570b3", |l| l.p99),
    ];
    for (k, (name, color, get)) in series.iter().enumerate() {
        let points: Vec<String> = reports
            .iter()
            .map(|r| format!("{:.1},{:.1}", x(r.jobs_per_s), y(get(&r.latency_ms))))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
            points.join(" ")
        );
        for p in &points {
            let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
            let _ = writeln!(out, r#"<circle cx="{px}" cy="{py}" r="3" fill="{color}"/>"#);
        }
        let _ = writeln!(
            out,
            r#"<text x="{:.0}" y="{:.0}" fill="{color}">{name}</text>"#,
            w - m - 40.0,
            16.0f64.mul_add(k as f64, m)
        );
    }
    out + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(c: usize, jobs: f64) -> Report {
        Report {
            model: "m".into(),
            via: "redis".into(),
            pace: "closed",
            concurrency: Some(c),
            rate: None,
            arrivals: None,
            rows_per_job: 1,
            sent: 10,
            ok: 10,
            errors: BTreeMap::new(),
            seconds: 1.0,
            jobs_per_s: jobs,
            rows_per_s: jobs,
            latency_ms: Latency::default(),
            server: None,
        }
    }

    #[test]
    fn sweeps_print_one_row_per_load() {
        let rs = [report(1, 100.0), report(8, 750.5)];
        let table = sweep_table(&rs);
        assert_eq!(table.lines().count(), 3);
        assert!(
            table
                .lines()
                .nth(2)
                .unwrap()
                .trim_start()
                .starts_with("c=8")
        );
        let csv = sweep_csv(&rs);
        assert!(csv.starts_with("load,jobs_per_s,"));
        assert!(csv.contains("\nc=8,750.5,750.5,"));
        assert!(
            report(1, 1.0)
                .human()
                .contains("closed loop, concurrency 1")
        );
    }
}
