//! Text for people: human-readable sizes and durations, shell quoting, the `cdp status`
//! table and one-job detail (with a job's sync progress, dirty bytes, pause and throttle),
//! and what `cdp checkpoint`, `cdp checkpoints`, `cdp view`, `cdp pause`, `cdp resume` and
//! `cdp throttle` print, all from the API's DTOs.
//!
//! Pure functions of their inputs: must never do I/O or read the clock, so that what the
//! CLI prints can be tested byte for byte. Text that operators typed into the appliance
//! (tags) is shown with control characters replaced, so it cannot drive the terminal.

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::api::{CheckpointStatus, JobStatus, LinkChange, ViewStatus};

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

/// A rate in bytes per second: `500 B/s`, `10 MiB/s`, `1.5 GiB/s`.
pub fn rate(bytes_per_second: u64) -> String {
    format!("{}/s", bytes(bytes_per_second))
}

/// How much of `total` `done` is, in whole percent rounded down (so 100% means done),
/// never above 100.
fn percent(done: u64, total: u64) -> u64 {
    if total == 0 {
        return 0;
    }
    // u128: `done * 100` cannot overflow; the quotient is at most 100.
    let done = u128::from(done.min(total));
    (done * 100 / u128::from(total)) as u64
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

/// `text` as one shell word: unchanged if it has only safe characters, else single-quoted.
pub fn shell_quote(text: &str) -> Cow<'_, str> {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./:=@%+,".contains(c);
    if !text.is_empty() && text.chars().all(safe) {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(format!("'{}'", text.replace('\'', r"'\''")))
    }
}

/// `text` with every control character (escape sequences, newlines) replaced by `?`.
pub fn printable(text: &str) -> Cow<'_, str> {
    if text.chars().any(char::is_control) {
        Cow::Owned(
            text.chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        )
    } else {
        Cow::Borrowed(text)
    }
}

/// A tag as `cdp` shows it: printable, and one shell word, so that a tag with spaces reads
/// as one (`'before upgrade'`).
fn tag(text: &str) -> String {
    shell_quote(&printable(text)).into_owned()
}

/// Columns aligned with two spaces between them, no trailing spaces: the shape of every
/// table `cdp` prints.
fn table<const N: usize>(header: [&str; N], rows: &[[String; N]]) -> String {
    let mut widths = header.map(|title| title.chars().count());
    for row in rows {
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
    for row in rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cells);
    }
    out
}

/// A job's state and what it means now: the progress of an initial sync or a resync
/// (`resyncing 42% (1.2 GiB of 2.9 GiB)`, once the agent has reported its size), the bytes
/// the agent has marked dirty while it is `ahead` or `paused` (`ahead, 1.2 GiB dirty`), or
/// the state alone.
pub fn job_state(job: &JobStatus) -> String {
    let state = printable(&job.state);
    match job.state.as_str() {
        "syncing" | "resyncing" if job.resync_total_bytes > 0 => {
            let done = job.resync_done_bytes.min(job.resync_total_bytes);
            format!(
                "{state} {}% ({} of {})",
                percent(done, job.resync_total_bytes),
                bytes(done),
                bytes(job.resync_total_bytes)
            )
        }
        "ahead" | "paused" if job.dirty_bytes > 0 => {
            format!("{state}, {} dirty", bytes(job.dirty_bytes))
        }
        _ => state.into_owned(),
    }
}

/// The STATE cell of `cdp status`: [`job_state`], then `paused` when an operator paused the
/// job but its state does not say so yet (the agent has not reported since, or the applier
/// failed), and the throttle when one is set: `replicating, throttle 10 MiB/s`.
fn state_cell(job: &JobStatus) -> String {
    let mut cell = job_state(job);
    if job.paused && job.state != "paused" {
        cell.push_str(", paused");
    }
    if job.throttle_bytes_per_second > 0 {
        // Writing to a String cannot fail.
        let _ = write!(cell, ", throttle {}", rate(job.throttle_bytes_per_second));
    }
    cell
}

/// The `cdp status` table: a header and one line per job. No jobs gives a sentence instead
/// of an empty table.
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
                state_cell(job),
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
    table(header, &rows)
}

/// `cdp status JOB`: every field of one job, one per line, labels aligned.
pub fn job_detail(job: &JobStatus) -> String {
    let state = match &job.state_reason {
        Some(reason) => format!("{} ({})", job_state(job), printable(reason)),
        None => job_state(job),
    };
    let throttle = if job.throttle_bytes_per_second == 0 {
        "none".to_owned()
    } else {
        rate(job.throttle_bytes_per_second)
    };
    let heartbeat = match job.last_heartbeat_age_seconds {
        Some(age) => format!("{} ago", duration(age)),
        None => "never".to_owned(),
    };
    let history = match (job.history_oldest_seq, &job.history_oldest_time) {
        (Some(seq), Some(time)) => format!("from seq {seq} ({time})"),
        (Some(seq), None) => format!("from seq {seq}"),
        (None, _) => "empty".to_owned(),
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
        ("history", history),
        ("checkpoints", job.checkpoints.to_string()),
        (
            "consistent",
            if job.consistent { "yes" } else { "no" }.to_owned(),
        ),
        ("dirty regions", bytes(job.dirty_bytes)),
        ("paused", if job.paused { "yes" } else { "no" }.to_owned()),
        ("throttle", throttle),
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

/// What `cdp pause`, `cdp resume` and `cdp throttle` print, from the job's status after
/// `change`: `job erp-db paused`, `job erp-db resumed`, `job erp-db: throttle 10 MiB/s`,
/// `job erp-db: no throttle` (both, for a change of both settings).
pub fn link_changed(change: &LinkChange, job: &JobStatus) -> String {
    let name = printable(&job.name);
    let mut out = format!("job {name}");
    if change.paused.is_some() {
        out.push_str(if job.paused { " paused" } else { " resumed" });
    }
    if change.throttle_bytes_per_second.is_some() {
        out.push_str(if change.paused.is_some() { "; " } else { ": " });
        if job.throttle_bytes_per_second == 0 {
            out.push_str("no throttle");
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "throttle {}", rate(job.throttle_bytes_per_second));
        }
    }
    out.push('\n');
    out
}

/// `application-consistent` or `crash-consistent`.
fn consistency(app_consistent: bool) -> &'static str {
    if app_consistent {
        "application-consistent"
    } else {
        "crash-consistent"
    }
}

/// What `cdp checkpoint` prints:
/// `checkpoint seq 1241 at 2025-06-01T12:00:01.000000Z (tag before-upgrade, application-consistent)`.
pub fn checkpoint_made(checkpoint: &CheckpointStatus) -> String {
    let tags = match checkpoint.tags.as_slice() {
        [] => "no tags".to_owned(),
        [one] => format!("tag {}", tag(one)),
        many => {
            let words: Vec<String> = many.iter().map(|t| tag(t)).collect();
            format!("tags {}", words.join(" "))
        }
    };
    format!(
        "checkpoint seq {} at {} ({tags}, {})\n",
        checkpoint.seq,
        printable(&checkpoint.time),
        consistency(checkpoint.app_consistent)
    )
}

/// The `cdp checkpoints JOB` table, oldest first as the appliance lists them. None gives a
/// sentence instead of an empty table.
pub fn checkpoints_table(checkpoints: &[CheckpointStatus]) -> String {
    if checkpoints.is_empty() {
        return "no checkpoints\n".to_owned();
    }
    let rows: Vec<[String; 5]> = checkpoints
        .iter()
        .map(|checkpoint| {
            let tags: Vec<String> = checkpoint.tags.iter().map(|t| tag(t)).collect();
            [
                checkpoint.seq.to_string(),
                printable(&checkpoint.time).into_owned(),
                printable(&checkpoint.kind).into_owned(),
                if checkpoint.app_consistent {
                    "application"
                } else {
                    "crash"
                }
                .to_owned(),
                if tags.is_empty() {
                    "-".to_owned()
                } else {
                    tags.join(", ")
                },
            ]
        })
        .collect();
    table(["SEQ", "TIME", "KIND", "CONSISTENCY", "TAGS"], &rows)
}

/// `read-only`, or `writable` with what becomes of the writes.
fn access(writable: bool) -> &'static str {
    if writable {
        "writable (writes are dropped with the view)"
    } else {
        "read-only"
    }
}

/// What `cdp view create` prints: the view, its point, and per disk its NBD URI with
/// commands to inspect and copy it, ready to paste.
pub fn view_created(view: &ViewStatus) -> String {
    let mut out = String::new();
    let time = match &view.time {
        Some(time) => format!(" ({})", printable(time)),
        None => String::new(),
    };
    // Writing to a String cannot fail.
    let _ = writeln!(
        out,
        "view {} of job {} at seq {}{time}, {}",
        view.id,
        printable(&view.job_name),
        view.seq,
        access(view.writable)
    );
    if view.exports.is_empty() {
        out.push_str("  no disks\n");
    }
    let name_width = view
        .exports
        .iter()
        .map(|export| printable(&export.disk).chars().count())
        .max()
        .unwrap_or(0);
    let sizes: Vec<String> = view
        .exports
        .iter()
        .map(|export| bytes(export.size_bytes))
        .collect();
    let size_width = sizes.iter().map(String::len).max().unwrap_or(0);
    for (export, size) in view.exports.iter().zip(&sizes) {
        let uri = shell_quote(&printable(&export.uri)).into_owned();
        let copy = shell_quote(&printable(&format!("{}.img", export.disk))).into_owned();
        let _ = writeln!(
            out,
            "  {:name_width$}  {size:>size_width$}  {uri}",
            printable(&export.disk)
        );
        let _ = writeln!(out, "      qemu-img info {uri}");
        let _ = writeln!(out, "      nbdcopy {uri} {copy}");
    }
    let _ = writeln!(out, "delete it when done: cdp view delete {}", view.id);
    out
}

/// The `cdp view list` table. None gives a sentence instead of an empty table.
pub fn views_table(views: &[ViewStatus]) -> String {
    if views.is_empty() {
        return "no views\n".to_owned();
    }
    let rows: Vec<[String; 6]> = views
        .iter()
        .map(|view| {
            let uris: Vec<&str> = view
                .exports
                .iter()
                .map(|export| export.uri.as_str())
                .collect();
            [
                view.id.to_string(),
                printable(&view.job_name).into_owned(),
                view.seq.to_string(),
                view.time
                    .as_deref()
                    .map_or_else(|| "-".to_owned(), |time| printable(time).into_owned()),
                if view.writable {
                    "writable"
                } else {
                    "read-only"
                }
                .to_owned(),
                if uris.is_empty() {
                    "-".to_owned()
                } else {
                    printable(&uris.join(", ")).into_owned()
                },
            ]
        })
        .collect();
    table(["ID", "JOB", "SEQ", "TIME", "ACCESS", "EXPORTS"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::tests::{demo_checkpoints, nightly_view, two_jobs, ID_DB};
    use crate::api::ViewExport;

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
    fn rates_and_percentages_round_as_shown() {
        assert_eq!(rate(0), "0 B/s");
        assert_eq!(rate(10 << 20), "10 MiB/s");
        assert_eq!(rate(1_500_000), "1.4 MiB/s");
        let check = |done: u64, total: u64, expected: u64| {
            assert_eq!(percent(done, total), expected, "{done} of {total}");
        };
        check(0, 0, 0);
        check(0, 10, 0);
        check(1, 3, 33);
        check(999, 1000, 99);
        check(1000, 1000, 100);
        check(2000, 1000, 100);
        check(u64::MAX - 1, u64::MAX, 99);
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
history         empty
checkpoints     0
consistent      no
dirty regions   0 B
paused          no
throttle        none
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
            detail.contains(
                "\napplied seq     1200 (28 records to apply)\n\
                 history         from seq 1000 (2025-06-01T11:00:00.000000Z)\n\
                 checkpoints     2\n\
                 consistent      yes\n"
            ),
            "{detail}"
        );
        let mut no_time = jobs[0].clone();
        no_time.history_oldest_time = None;
        let detail = job_detail(&no_time);
        assert!(
            detail.contains("\nhistory         from seq 1000\n"),
            "{detail}"
        );
    }

    /// `demo` (replicating) in `state`, with the given sync progress and dirty bytes.
    fn demo_in(state: &str, resync: (u64, u64), dirty_bytes: u64) -> JobStatus {
        JobStatus {
            state: state.to_owned(),
            resync_done_bytes: resync.0,
            resync_total_bytes: resync.1,
            dirty_bytes,
            ..two_jobs()[0].clone()
        }
    }

    #[test]
    fn states_show_progress_dirty_bytes_pause_and_throttle() {
        const GIB: u64 = 1 << 30;
        let check = |job: JobStatus, expected: &str| {
            assert_eq!(state_cell(&job), expected, "{job:?}");
        };
        check(demo_in("replicating", (0, 0), 0), "replicating");
        check(
            demo_in("resyncing", (GIB * 6 / 5, GIB * 29 / 10), 3 * GIB),
            "resyncing 41% (1.2 GiB of 2.9 GiB)",
        );
        check(
            demo_in("syncing", (0, 256 << 20), 0),
            "syncing 0% (0 B of 256 MiB)",
        );
        // Before the agent has sized the sync: the state alone.
        check(demo_in("syncing", (0, 0), 0), "syncing");
        check(demo_in("ahead", (0, 0), 12 << 20), "ahead, 12 MiB dirty");
        check(demo_in("ahead", (0, 0), 0), "ahead");
        // Dirty bytes belong to `ahead` and `paused`; a resync shows its own progress.
        check(
            demo_in("resyncing", (GIB, GIB), 5 * GIB),
            "resyncing 100% (1.0 GiB of 1.0 GiB)",
        );
        let paused = |state: &str, dirty_bytes: u64, throttle: u64| JobStatus {
            paused: true,
            throttle_bytes_per_second: throttle,
            ..demo_in(state, (0, 0), dirty_bytes)
        };
        check(paused("paused", 0, 0), "paused");
        check(paused("paused", 3 << 20, 0), "paused, 3.0 MiB dirty");
        // Paused, but the agent has not said so yet.
        check(paused("replicating", 0, 0), "replicating, paused");
        check(
            paused("replicating", 0, 10 << 20),
            "replicating, paused, throttle 10 MiB/s",
        );
        check(
            JobStatus {
                throttle_bytes_per_second: 1 << 20,
                ..demo_in("ahead", (0, 0), GIB)
            },
            "ahead, 1.0 GiB dirty, throttle 1.0 MiB/s",
        );
        // An unknown state is shown as it is, made printable.
        check(demo_in("rebalancing\x1b", (0, 0), 0), "rebalancing?");
    }

    #[test]
    fn jobs_table_shows_sync_progress_and_throttle_aligned() {
        let mut jobs = two_jobs();
        jobs[0] = JobStatus {
            throttle_bytes_per_second: 10 << 20,
            ..demo_in("resyncing", (420 << 20, 1 << 30), 0)
        };
        let expected = "\
JOB   ID        AGENT       STATE                                                  MODE   RPO    LAG              APPLIED  DISKS
demo  01234567  demo-agent  resyncing 41% (420 MiB of 1.0 GiB), throttle 10 MiB/s  async  0.25s  12 rec / 48 KiB  1200     disk0 (256 MiB)
db    fedcba98  db-host     refused                                                sync   1h06m  0 rec / 0 B      77       sys (20 GiB), data (1.0 TiB)
";
        assert_eq!(jobs_table(&jobs), expected);
    }

    #[test]
    fn job_detail_shows_state_pause_and_throttle() {
        let job = JobStatus {
            paused: true,
            throttle_bytes_per_second: 10 << 20,
            state_reason: Some("past the backlog bound".to_owned()),
            ..demo_in("ahead", (0, 0), 3 << 30)
        };
        let detail = job_detail(&job);
        assert!(
            detail.contains("\nstate           ahead, 3.0 GiB dirty (past the backlog bound)\n"),
            "{detail}"
        );
        assert!(
            detail.contains(
                "\nconsistent      yes\n\
                 dirty regions   3.0 GiB\n\
                 paused          yes\n\
                 throttle        10 MiB/s\n\
                 disks\n"
            ),
            "{detail}"
        );
    }

    #[test]
    fn link_changes_are_one_sentence() {
        let check = |change: LinkChange, paused: bool, throttle: u64, expected: &str| {
            let job = JobStatus {
                name: "erp-db".to_owned(),
                paused,
                throttle_bytes_per_second: throttle,
                ..two_jobs()[0].clone()
            };
            assert_eq!(link_changed(&change, &job), expected, "{change:?}");
        };
        let pause = |paused| LinkChange {
            paused: Some(paused),
            throttle_bytes_per_second: None,
        };
        let throttle = |rate| LinkChange {
            paused: None,
            throttle_bytes_per_second: Some(rate),
        };
        check(pause(true), true, 0, "job erp-db paused\n");
        check(pause(false), false, 5, "job erp-db resumed\n");
        check(
            throttle(10 << 20),
            false,
            10 << 20,
            "job erp-db: throttle 10 MiB/s\n",
        );
        check(throttle(0), true, 0, "job erp-db: no throttle\n");
        let both = LinkChange {
            paused: Some(true),
            throttle_bytes_per_second: Some(1 << 20),
        };
        check(
            both,
            true,
            1 << 20,
            "job erp-db paused; throttle 1.0 MiB/s\n",
        );
    }

    #[test]
    fn shell_quote_leaves_safe_words_and_quotes_the_rest() {
        let check = |text: &str, expected: &str| assert_eq!(shell_quote(text), expected, "{text}");
        check(
            "/tmp/cdp-demo.Ab12/source/disk0.img",
            "/tmp/cdp-demo.Ab12/source/disk0.img",
        );
        check(
            "nbd+unix:///disk0?socket=/tmp/d/nbd.sock",
            "'nbd+unix:///disk0?socket=/tmp/d/nbd.sock'",
        );
        check("/tmp/my disk", "'/tmp/my disk'");
        check("it's", r"'it'\''s'");
        check("", "''");
    }

    #[test]
    fn printable_replaces_control_characters() {
        assert_eq!(printable("nightly"), "nightly");
        assert!(matches!(printable("nightly"), Cow::Borrowed(_)));
        assert_eq!(printable("a\x1b[2Jb\nc\u{9b}"), "a?[2Jb?c?");
        assert_eq!(tag("before upgrade"), "'before upgrade'");
        assert_eq!(tag("x\x07"), "'x?'");
    }

    #[test]
    fn a_made_checkpoint_is_one_line() {
        let check = |tags: &[&str], app_consistent: bool, expected: &str| {
            let checkpoint = CheckpointStatus {
                tags: tags.iter().map(|t| (*t).to_owned()).collect(),
                app_consistent,
                seq: 1_241,
                time: "2025-06-01T12:00:01.000000Z".to_owned(),
                ..demo_checkpoints()[1].clone()
            };
            assert_eq!(checkpoint_made(&checkpoint), expected, "{tags:?}");
        };
        check(
            &["before-upgrade"],
            true,
            "checkpoint seq 1241 at 2025-06-01T12:00:01.000000Z (tag before-upgrade, \
             application-consistent)\n",
        );
        check(
            &["nightly", "before upgrade"],
            false,
            "checkpoint seq 1241 at 2025-06-01T12:00:01.000000Z (tags nightly 'before upgrade', \
             crash-consistent)\n",
        );
        check(
            &[],
            false,
            "checkpoint seq 1241 at 2025-06-01T12:00:01.000000Z (no tags, crash-consistent)\n",
        );
    }

    #[test]
    fn checkpoints_table_is_aligned() {
        let mut checkpoints = demo_checkpoints();
        checkpoints.push(CheckpointStatus {
            seq: 1_241,
            time: "2025-06-01T12:00:01.000000Z".to_owned(),
            unix_micros: 1_748_779_201_000_000,
            kind: "tagged".to_owned(),
            app_consistent: false,
            tags: vec!["before-upgrade".to_owned()],
        });
        let expected = "\
SEQ   TIME                         KIND    CONSISTENCY  TAGS
1000  2025-06-01T11:00:00.000000Z  auto    crash        -
1100  2025-06-01T11:30:00.250000Z  tagged  application  nightly, 'before upgrade'
1241  2025-06-01T12:00:01.000000Z  tagged  crash        before-upgrade
";
        assert_eq!(checkpoints_table(&checkpoints), expected);
        assert_eq!(checkpoints_table(&[]), "no checkpoints\n");
    }

    /// A writable view of `db` at a seq without a checkpoint: two disks, no time.
    fn db_view() -> ViewStatus {
        let export = |disk: &str, size_bytes: u64| ViewExport {
            disk: disk.to_owned(),
            export: format!("view2-{disk}"),
            uri: format!("nbd://127.0.0.1:10809/view2-{disk}"),
            size_bytes,
        };
        ViewStatus {
            id: 2,
            job: ID_DB.to_owned(),
            job_name: "db".to_owned(),
            seq: 77,
            time: None,
            writable: true,
            exports: vec![export("sys", 20 << 30), export("data", 1 << 40)],
        }
    }

    #[test]
    fn a_created_view_says_how_to_reach_each_disk() {
        let expected = "\
view 1 of job demo at seq 1100 (2025-06-01T11:30:00.250000Z), read-only
  disk0  256 MiB  nbd://127.0.0.1:10809/view1-disk0
      qemu-img info nbd://127.0.0.1:10809/view1-disk0
      nbdcopy nbd://127.0.0.1:10809/view1-disk0 disk0.img
delete it when done: cdp view delete 1
";
        assert_eq!(view_created(&nightly_view()), expected);
        let expected = "\
view 2 of job db at seq 77, writable (writes are dropped with the view)
  sys    20 GiB  nbd://127.0.0.1:10809/view2-sys
      qemu-img info nbd://127.0.0.1:10809/view2-sys
      nbdcopy nbd://127.0.0.1:10809/view2-sys sys.img
  data  1.0 TiB  nbd://127.0.0.1:10809/view2-data
      qemu-img info nbd://127.0.0.1:10809/view2-data
      nbdcopy nbd://127.0.0.1:10809/view2-data data.img
delete it when done: cdp view delete 2
";
        assert_eq!(view_created(&db_view()), expected);
        // Odd names stay one shell word each.
        let mut odd = nightly_view();
        odd.exports[0].disk = "my disk".to_owned();
        odd.exports[0].uri = "nbd://127.0.0.1:10809/view1-my%20disk".to_owned();
        let text = view_created(&odd);
        assert!(
            text.contains("\n      nbdcopy nbd://127.0.0.1:10809/view1-my%20disk 'my disk.img'\n"),
            "{text}"
        );
        odd.exports.clear();
        assert!(view_created(&odd).contains("\n  no disks\n"));
    }

    #[test]
    fn views_table_is_aligned() {
        let expected = "\
ID  JOB   SEQ   TIME                         ACCESS     EXPORTS
1   demo  1100  2025-06-01T11:30:00.250000Z  read-only  nbd://127.0.0.1:10809/view1-disk0
2   db    77    -                            writable   nbd://127.0.0.1:10809/view2-sys, nbd://127.0.0.1:10809/view2-data
";
        assert_eq!(views_table(&[nightly_view(), db_view()]), expected);
        assert_eq!(views_table(&[]), "no views\n");
    }
}
