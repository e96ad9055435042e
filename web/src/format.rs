//! Text for people: human-readable sizes and durations, the `cdp status` table and the
//! one-job detail view, all from [`JobStatus`] values.
//!
//! Pure functions of their inputs: must never do I/O or read the clock, so that what the
//! CLI prints can be tested byte for byte.

use std::fmt::Write as _;

use crate::api::JobStatus;

/// `0 B`, `512 B`, `1.5 KiB`, `256 MiB`, `1.0 TiB`: binary units, one decimal below 10.
pub fn bytes(count: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if count < 1024 {
        return format!("{count} B");
    }
    // Lossy above 2^53, which is far below a display's precision.
    let mut value = count as f64 / 1024.0;
    let mut unit = 0;
    while unit + 1 < UNITS.len() && rounded(value) >= 1024.0 {
        value /= 1024.0;
        unit += 1;
    }
    if rounded(value) < 10.0 {
        format!("{value:.1} {}", UNITS[unit])
    } else {
        format!("{value:.0} {}", UNITS[unit])
    }
}

/// The value as it will print: one decimal below 10, none above.
fn rounded(value: f64) -> f64 {
    if value < 9.95 {
        (value * 10.0).round() / 10.0
    } else {
        value.round()
    }
}

/// `0s`, `0.25s`, `12.5s`, `3m04s`, `2h03m`, `3d04h`; `-` for a negative or not-a-number
/// value (a clock that went backwards must not print nonsense).
pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() || seconds < 0.0 {
        return "-".to_owned();
    }
    if seconds < 10.0 {
        // Two significant decimals are what an RPO below a second needs.
        let text = format!("{seconds:.2}");
        let text = text.trim_end_matches('0').trim_end_matches('.');
        return format!("{text}s");
    }
    if seconds < 60.0 {
        return format!("{seconds:.1}s");
    }
    // Whole seconds from here on; the cast saturates, and u64 seconds outlast the sun.
    let whole = seconds.round() as u64;
    let (days, hours, minutes, secs) = (
        whole / 86_400,
        whole / 3_600 % 24,
        whole / 60 % 60,
        whole % 60,
    );
    if whole < 3_600 {
        format!("{minutes}m{secs:02}s")
    } else if whole < 86_400 {
        format!("{hours}h{minutes:02}m")
    } else {
        format!("{days}d{hours:02}h")
    }
}

/// The first 8 digits of a job id: enough to tell jobs apart on one appliance, and
/// accepted back by `cdp status JOB` as a prefix.
pub fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// The `cdp status` table: a header and one line per job, columns aligned with two spaces
/// between them, no trailing spaces. No jobs gives a sentence instead of an empty table.
pub fn jobs_table(jobs: &[JobStatus]) -> String {
    if jobs.is_empty() {
        return "no jobs\n".to_owned();
    }
    let header = [
        "JOB", "ID", "AGENT", "STATE", "MODE", "RPO", "LAG", "APPLIED", "DISKS",
    ];
    let rows: Vec<[String; 9]> = jobs
        .iter()
        .map(|job| {
            let disks: Vec<String> = job
                .disks
                .iter()
                .map(|disk| format!("{} ({})", disk.name, bytes(disk.size_bytes)))
                .collect();
            [
                job.name.clone(),
                short_id(&job.id).to_owned(),
                job.agent.clone(),
                job.state.clone(),
                job.mode.clone(),
                duration(job.rpo_seconds),
                format!("{} rec / {}", job.lag_records, bytes(job.lag_bytes)),
                job.applied_seq.to_string(),
                if disks.is_empty() {
                    "-".to_owned()
                } else {
                    disks.join(", ")
                },
            ]
        })
        .collect();
    let mut widths = header.map(|title| title.chars().count());
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (column, (cell, width)) in cells.iter().zip(widths).enumerate() {
            if column > 0 {
                text.push_str("  ");
            }
            text.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count());
            text.extend(std::iter::repeat_n(' ', pad));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

/// `cdp status JOB`: every field of one job, one per line, labels aligned.
pub fn job_detail(job: &JobStatus) -> String {
    let state = match &job.state_reason {
        Some(reason) => format!("{} ({reason})", job.state),
        None => job.state.clone(),
    };
    let heartbeat = match job.last_heartbeat_age_seconds {
        Some(age) => format!("{} ago", duration(age)),
        None => "never".to_owned(),
    };
    let fields = [
        ("job", job.name.clone()),
        ("id", job.id.clone()),
        ("agent", job.agent.clone()),
        ("state", state),
        ("mode", job.mode.clone()),
        ("generation", job.generation.to_string()),
        (
            "connected",
            if job.connected { "yes" } else { "no" }.to_owned(),
        ),
        ("last heartbeat", heartbeat),
        ("rpo", duration(job.rpo_seconds)),
        (
            "lag",
            format!("{} records, {}", job.lag_records, bytes(job.lag_bytes)),
        ),
        ("agent head seq", job.agent_head_seq.to_string()),
        ("landed seq", job.landing_durable_seq.to_string()),
        (
            "applied seq",
            format!(
                "{} ({} records to apply)",
                job.applied_seq, job.apply_lag_records
            ),
        ),
    ];
    let width = fields
        .iter()
        .map(|(label, _)| label.len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (label, value) in fields {
        // Writing to a String cannot fail.
        let _ = writeln!(out, "{label:width$}  {value}");
    }
    if job.disks.is_empty() {
        out.push_str("disks          none\n");
        return out;
    }
    out.push_str("disks\n");
    let name_width = job
        .disks
        .iter()
        .map(|disk| disk.name.chars().count())
        .max()
        .unwrap_or(0);
    let sizes: Vec<String> = job
        .disks
        .iter()
        .map(|disk| bytes(disk.size_bytes))
        .collect();
    let size_width = sizes.iter().map(String::len).max().unwrap_or(0);
    for (disk, size) in job.disks.iter().zip(&sizes) {
        let _ = writeln!(
            out,
            "  {:>3}  {:name_width$}  {:>size_width$}  {}",
            disk.id, disk.name, size, disk.replica_path
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tests::two_jobs;

    #[test]
    fn bytes_are_human_readable() {
        let check = |count: u64, expected: &str| assert_eq!(bytes(count), expected, "{count}");
        check(0, "0 B");
        check(1023, "1023 B");
        check(1024, "1.0 KiB");
        check(1536, "1.5 KiB");
        check(49_152, "48 KiB");
        check(10 * 1024 - 1, "10 KiB");
        check(1024 * 1024 - 1, "1.0 MiB");
        check(256 << 20, "256 MiB");
        check(20 << 30, "20 GiB");
        check(1 << 40, "1.0 TiB");
        check(u64::MAX, "16 EiB");
    }

    #[test]
    fn durations_are_human_readable() {
        let check = |seconds: f64, expected: &str| {
            assert_eq!(duration(seconds), expected, "{seconds}");
        };
        check(0.0, "0s");
        check(0.25, "0.25s");
        check(0.004, "0s");
        check(1.5, "1.5s");
        check(9.999, "10s");
        check(12.345, "12.3s");
        check(60.0, "1m00s");
        check(184.0, "3m04s");
        check(3_599.4, "59m59s");
        check(4_000.0, "1h06m");
        check(7_380.0, "2h03m");
        check(273_600.0, "3d04h");
        check(-1.0, "-");
        check(f64::NAN, "-");
        check(f64::INFINITY, "-");
    }

    #[test]
    fn short_ids_are_eight_digits_or_the_whole_id() {
        assert_eq!(short_id("0123456789abcdef0123456789abcdef"), "01234567");
        assert_eq!(short_id("abc"), "abc");
        // Not a char boundary at 8: the whole id rather than a panic.
        assert_eq!(short_id("aéééé"), "aéééé");
    }

    #[test]
    fn jobs_table_is_aligned() {
        let expected = "\
JOB   ID        AGENT       STATE        MODE   RPO    LAG              APPLIED  DISKS
demo  01234567  demo-agent  replicating  async  0.25s  12 rec / 48 KiB  1200     disk0 (256 MiB)
db    fedcba98  db-host     refused      sync   1h06m  0 rec / 0 B      77       sys (20 GiB), data (1.0 TiB)
";
        assert_eq!(jobs_table(&two_jobs()), expected);
        assert_eq!(jobs_table(&[]), "no jobs\n");
    }

    #[test]
    fn job_detail_shows_every_field() {
        let jobs = two_jobs();
        let expected = "\
job             db
id              fedcba9876543210fedcba9876543210
agent           db-host
state           refused (agent is not paired)
mode            sync
generation      3
connected       no
last heartbeat  never
rpo             1h06m
lag             0 records, 0 B
agent head seq  0
landed seq      77
applied seq     77 (0 records to apply)
disks
    0  sys    20 GiB  /var/lib/cdp/replica/db/sys.img
    1  data  1.0 TiB  /var/lib/cdp/replica/db/data.img
";
        assert_eq!(job_detail(&jobs[1]), expected);
        let detail = job_detail(&jobs[0]);
        assert!(
            detail.contains("\nstate           replicating\n"),
            "{detail}"
        );
        assert!(detail.contains("\nlast heartbeat  0.5s ago\n"), "{detail}");
        assert!(
            detail.contains("\nlag             12 records, 48 KiB\n"),
            "{detail}"
        );
        assert!(
            detail.contains("\napplied seq     1200 (28 records to apply)\n"),
            "{detail}"
        );
    }
}
