//! The agent's metrics: one `prometheus-client` registry per agent (no global registry, so
//! tests can run many agents in one process), per-disk handles for the `stats` filter, and
//! the journal's head and durable seqs. Rendering only reads atomics.

use std::time::Duration;

use nbd::Operation;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label set naming one disk.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DiskLabel {
    disk: String,
}

/// Label set naming one disk and one operation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DiskOpLabel {
    disk: String,
    op: String,
}

/// Label set naming one disk and one NBD error.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DiskErrorLabel {
    disk: String,
    error: String,
}

/// Label set naming the job.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JobLabel {
    job: String,
}

/// Label set naming the job and one of its states.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JobStateLabel {
    job: String,
    state: String,
}

/// A gauge holding a float (seconds).
type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// Latency buckets: 50 µs doubling to about 6.5 s.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.0, 18))
}

/// Request-size buckets: 512 B doubling to 32 MiB.
fn size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(512.0, 2.0, 17))
}

/// Every metric of one agent.
#[derive(Debug)]
pub struct AgentMetrics {
    registry: Registry,
    reads: Family<DiskLabel, Counter>,
    read_bytes: Family<DiskLabel, Counter>,
    writes: Family<DiskLabel, Counter>,
    write_bytes: Family<DiskLabel, Counter>,
    trims: Family<DiskLabel, Counter>,
    write_zeroes: Family<DiskLabel, Counter>,
    flushes: Family<DiskLabel, Counter>,
    errors: Family<DiskOpLabel, Counter>,
    read_latency: Family<DiskLabel, Histogram, fn() -> Histogram>,
    write_latency: Family<DiskLabel, Histogram, fn() -> Histogram>,
    flush_latency: Family<DiskLabel, Histogram, fn() -> Histogram>,
    request_bytes: Family<DiskOpLabel, Histogram, fn() -> Histogram>,
    rejected: Family<DiskErrorLabel, Counter>,
    head_seq: Family<JobLabel, Gauge>,
    durable_seq: Family<JobLabel, Gauge>,
    acked_seq: Family<JobLabel, Gauge>,
    rpo_seconds: Family<JobLabel, FloatGauge>,
    lag_records: Family<JobLabel, Gauge>,
    lag_bytes: Family<JobLabel, Gauge>,
    shipped_bytes: Family<JobLabel, Counter>,
    wire_bytes: Family<JobLabel, Counter>,
    job_state: Family<JobStateLabel, Gauge>,
    link_state: Family<JobStateLabel, Gauge>,
    resync_remaining_bytes: Family<JobLabel, Gauge>,
    dirty_bytes: Family<JobLabel, Gauge>,
    backlog_bytes: Family<JobLabel, Gauge>,
    sync_degraded: Family<JobLabel, Gauge>,
    connections: Gauge,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentMetrics {
    /// A registry with every metric registered and no sample yet.
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            reads: Family::default(),
            read_bytes: Family::default(),
            writes: Family::default(),
            write_bytes: Family::default(),
            trims: Family::default(),
            write_zeroes: Family::default(),
            flushes: Family::default(),
            errors: Family::default(),
            read_latency: Family::new_with_constructor(latency_histogram),
            write_latency: Family::new_with_constructor(latency_histogram),
            flush_latency: Family::new_with_constructor(latency_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            rejected: Family::default(),
            head_seq: Family::default(),
            durable_seq: Family::default(),
            acked_seq: Family::default(),
            rpo_seconds: Family::default(),
            lag_records: Family::default(),
            lag_bytes: Family::default(),
            shipped_bytes: Family::default(),
            wire_bytes: Family::default(),
            job_state: Family::default(),
            link_state: Family::default(),
            resync_remaining_bytes: Family::default(),
            dirty_bytes: Family::default(),
            backlog_bytes: Family::default(),
            sync_degraded: Family::default(),
            connections: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register("cdp_disk_reads", "Reads served, per disk", m.reads.clone());
        r.register(
            "cdp_disk_read_bytes",
            "Bytes read, per disk",
            m.read_bytes.clone(),
        );
        r.register(
            "cdp_disk_writes",
            "Writes acknowledged, per disk",
            m.writes.clone(),
        );
        r.register(
            "cdp_disk_write_bytes",
            "Bytes written, per disk",
            m.write_bytes.clone(),
        );
        r.register(
            "cdp_disk_trims",
            "Trims acknowledged, per disk",
            m.trims.clone(),
        );
        r.register(
            "cdp_disk_write_zeroes",
            "Write-zeroes acknowledged, per disk",
            m.write_zeroes.clone(),
        );
        r.register(
            "cdp_disk_flushes",
            "Flushes acknowledged, per disk",
            m.flushes.clone(),
        );
        r.register(
            "cdp_disk_errors",
            "Operations that failed with an I/O or journal error",
            m.errors.clone(),
        );
        r.register(
            "cdp_disk_read_latency_seconds",
            "Read latency through the filter chain",
            m.read_latency.clone(),
        );
        r.register(
            "cdp_disk_write_latency_seconds",
            "Write, trim and write-zeroes latency through the filter chain (journal and backing disk)",
            m.write_latency.clone(),
        );
        r.register(
            "cdp_disk_flush_latency_seconds",
            "Flush latency",
            m.flush_latency.clone(),
        );
        r.register(
            "cdp_disk_request_bytes",
            "Request sizes, per disk and operation",
            m.request_bytes.clone(),
        );
        r.register(
            "cdp_nbd_rejected_requests",
            "Requests answered with an NBD error before reaching the filter chain",
            m.rejected.clone(),
        );
        r.register(
            "cdp_journal_head_seq",
            "Last seq appended to the job's journal",
            m.head_seq.clone(),
        );
        r.register(
            "cdp_journal_durable_seq",
            "Last seq known durable in the job's journal",
            m.durable_seq.clone(),
        );
        r.register(
            "cdp_nbd_connections",
            "Open NBD connections",
            m.connections.clone(),
        );
        r.register(
            "cdp_acked_seq",
            "Last seq the appliance acknowledged durable",
            m.acked_seq.clone(),
        );
        r.register(
            "cdp_rpo_seconds",
            "Age of the oldest write not yet durable at the appliance, on the agent's clock (0 when none)",
            m.rpo_seconds.clone(),
        );
        r.register(
            "cdp_lag_records",
            "Journal records the appliance has not acknowledged",
            m.lag_records.clone(),
        );
        r.register(
            "cdp_lag_bytes",
            "Stored bytes shipped and not yet acknowledged",
            m.lag_bytes.clone(),
        );
        r.register(
            "cdp_shipped_bytes",
            "Stored record bytes shipped to the appliance (resends included)",
            m.shipped_bytes.clone(),
        );
        r.register(
            "cdp_wire_bytes",
            "UDP bytes sent on replication connections (QUIC and TLS overhead and retransmissions included)",
            m.wire_bytes.clone(),
        );
        r.register(
            "cdp_job_state",
            "1 for the job's current state (syncing, replicating, ahead, resyncing, paused, error), 0 for the others",
            m.job_state.clone(),
        );
        r.register(
            "cdp_link_state",
            "1 for the replication link's current state (connecting, streaming, disconnected, refused), 0 for the others",
            m.link_state.clone(),
        );
        r.register(
            "cdp_resync_remaining_bytes",
            "Bytes of dirty regions the current initial sync or resync has still to compare",
            m.resync_remaining_bytes.clone(),
        );
        r.register(
            "cdp_dirty_bytes",
            "Bytes of regions marked dirty (written while the job was ahead, or not yet synced)",
            m.dirty_bytes.clone(),
        );
        r.register(
            "cdp_backlog_bytes",
            "Journal bytes not yet acknowledged by the appliance, as the backlog bound counts them",
            m.backlog_bytes.clone(),
        );
        r.register(
            "cdp_sync_degraded",
            "1 while a sync-mode job acknowledges writes after the local journal only (the appliance did not ack in time)",
            m.sync_degraded.clone(),
        );
        m
    }

    /// Handles for the `stats` filter of disk `disk`.
    pub fn disk_stats(&self, disk: &str) -> DiskStats {
        let label = DiskLabel {
            disk: disk.to_owned(),
        };
        let op = |op: &str| DiskOpLabel {
            disk: disk.to_owned(),
            op: op.to_owned(),
        };
        DiskStats {
            reads: self.reads.get_or_create(&label).clone(),
            read_bytes: self.read_bytes.get_or_create(&label).clone(),
            writes: self.writes.get_or_create(&label).clone(),
            write_bytes: self.write_bytes.get_or_create(&label).clone(),
            trims: self.trims.get_or_create(&label).clone(),
            write_zeroes: self.write_zeroes.get_or_create(&label).clone(),
            flushes: self.flushes.get_or_create(&label).clone(),
            errors: ["read", "write", "trim", "write_zeroes", "flush"]
                .map(|name| self.errors.get_or_create(&op(name)).clone()),
            read_latency: self.read_latency.get_or_create(&label).clone(),
            write_latency: self.write_latency.get_or_create(&label).clone(),
            flush_latency: self.flush_latency.get_or_create(&label).clone(),
            request_bytes: ["read", "write", "trim", "write_zeroes"]
                .map(|name| self.request_bytes.get_or_create(&op(name)).clone()),
        }
    }

    /// Counts a request answered with `error` before reaching disk `disk`'s chain.
    pub fn rejected(&self, disk: &str, error: nbd::ErrorCode) {
        self.rejected
            .get_or_create(&DiskErrorLabel {
                disk: disk.to_owned(),
                error: error.name().to_owned(),
            })
            .inc();
    }

    /// Records the journal's seqs for job `job`.
    pub fn set_journal(&self, job: &str, head: u64, durable: u64) {
        let label = JobLabel {
            job: job.to_owned(),
        };
        self.head_seq
            .get_or_create(&label)
            .set(i64::try_from(head).unwrap_or(i64::MAX));
        self.durable_seq
            .get_or_create(&label)
            .set(i64::try_from(durable).unwrap_or(i64::MAX));
    }

    /// Samples the job's replication status (at scrape time).
    pub fn set_replication(
        &self,
        job: &str,
        replication: &crate::replicate::Replication,
        head: journal::Seq,
    ) {
        let label = JobLabel {
            job: job.to_owned(),
        };
        let status = replication.status();
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.acked_seq
            .get_or_create(&label)
            .set(as_i64(status.acked.0));
        self.rpo_seconds
            .get_or_create(&label)
            .set(replication.rpo_seconds(crate::replicate::now_micros(), head));
        self.lag_records
            .get_or_create(&label)
            .set(as_i64(head.0.saturating_sub(status.acked.0)));
        self.lag_bytes
            .get_or_create(&label)
            .set(as_i64(status.lag_bytes));
        raise_to(
            &self.shipped_bytes.get_or_create(&label),
            status.shipped_bytes,
        );
        raise_to(&self.wire_bytes.get_or_create(&label), status.wire_bytes);
        for state in crate::replicate::LinkState::ALL {
            let label = JobStateLabel {
                job: job.to_owned(),
                state: state.name().to_owned(),
            };
            self.link_state
                .get_or_create(&label)
                .set(i64::from(state == status.state));
        }
        for state in journal::wire::JobState::ALL {
            let label = JobStateLabel {
                job: job.to_owned(),
                state: state.name().to_owned(),
            };
            self.job_state
                .get_or_create(&label)
                .set(i64::from(state == status.job_state));
        }
        self.resync_remaining_bytes
            .get_or_create(&label)
            .set(as_i64(
                status
                    .resync
                    .total_bytes
                    .saturating_sub(status.resync.done_bytes),
            ));
        self.dirty_bytes
            .get_or_create(&label)
            .set(as_i64(status.dirty_bytes));
        self.backlog_bytes
            .get_or_create(&label)
            .set(as_i64(status.backlog_bytes));
        self.sync_degraded
            .get_or_create(&label)
            .set(i64::from(replication.degraded()));
    }

    /// The open-connections gauge.
    pub fn connections(&self) -> &Gauge {
        &self.connections
    }

    /// The exposition text (OpenMetrics).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail; an error would only come from a broken metric
        // encoder, and then a partial page is still the most useful answer.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The `stats` filter's handles for one disk (clones share the registry's atomics).
#[derive(Debug, Clone)]
pub struct DiskStats {
    reads: Counter,
    read_bytes: Counter,
    writes: Counter,
    write_bytes: Counter,
    trims: Counter,
    write_zeroes: Counter,
    flushes: Counter,
    /// Indexed read, write, trim, write_zeroes, flush.
    errors: [Counter; 5],
    read_latency: Histogram,
    write_latency: Histogram,
    flush_latency: Histogram,
    /// Indexed read, write, trim, write_zeroes.
    request_bytes: [Histogram; 4],
}

impl DiskStats {
    /// Records one operation that went through the rest of the chain.
    pub fn record(&self, op: &Operation, ok: bool, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let (index, length) = match *op {
            Operation::Read { length, .. } => (0, length),
            Operation::Write { length, .. } => (1, length),
            Operation::Trim { length, .. } => (2, length),
            Operation::WriteZeroes { length, .. } => (3, length),
            Operation::Flush => (4, 0),
        };
        if !ok {
            self.errors[index].inc();
            return;
        }
        let bytes = u64::from(length);
        match *op {
            Operation::Read { .. } => {
                self.reads.inc();
                self.read_bytes.inc_by(bytes);
                self.read_latency.observe(seconds);
            }
            Operation::Write { .. } => {
                self.writes.inc();
                self.write_bytes.inc_by(bytes);
                self.write_latency.observe(seconds);
            }
            Operation::Trim { .. } => {
                self.trims.inc();
                self.write_latency.observe(seconds);
            }
            Operation::WriteZeroes { .. } => {
                self.write_zeroes.inc();
                self.write_latency.observe(seconds);
            }
            Operation::Flush => {
                self.flushes.inc();
                self.flush_latency.observe(seconds);
            }
        }
        if let Some(histogram) = self.request_bytes.get(index) {
            histogram.observe(bytes as f64);
        }
    }
}

/// Raises a counter to `total` (the replication status holds the running totals).
fn raise_to(counter: &Counter, total: u64) {
    let now = counter.get();
    if total > now {
        counter.inc_by(total - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_documented_names() {
        let metrics = AgentMetrics::new();
        let stats = metrics.disk_stats("vm1");
        stats.record(
            &Operation::Write {
                offset: 0,
                length: 4096,
                fua: false,
            },
            true,
            Duration::from_micros(80),
        );
        stats.record(
            &Operation::Write {
                offset: 0,
                length: 512,
                fua: true,
            },
            true,
            Duration::from_millis(2),
        );
        stats.record(
            &Operation::Read {
                offset: 0,
                length: 8192,
            },
            true,
            Duration::from_micros(10),
        );
        stats.record(&Operation::Flush, false, Duration::ZERO);
        metrics.set_journal("ab12", 7, 5);
        metrics.rejected("vm1", nbd::ErrorCode::EINVAL);
        let text = metrics.render();
        for line in [
            "cdp_disk_writes_total{disk=\"vm1\"} 2",
            "cdp_disk_write_bytes_total{disk=\"vm1\"} 4608",
            "cdp_disk_reads_total{disk=\"vm1\"} 1",
            "cdp_disk_read_bytes_total{disk=\"vm1\"} 8192",
            "cdp_disk_write_latency_seconds_count{disk=\"vm1\"} 2",
            "cdp_disk_request_bytes_count{disk=\"vm1\",op=\"write\"} 2",
            "cdp_disk_errors_total{disk=\"vm1\",op=\"flush\"} 1",
            "cdp_journal_head_seq{job=\"ab12\"} 7",
            "cdp_journal_durable_seq{job=\"ab12\"} 5",
            "cdp_nbd_rejected_requests_total{disk=\"vm1\",error=\"EINVAL\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
