//! A disk's filter chain at run time: each request the NBD server accepted passes through the
//! configured filters in order, then reaches the backing disk.
//!
//! Write path with `journal`: take the byte range → append the record (it reaches the OS) →
//! write the backing disk → release the range → with FUA, `fdatasync` the backing disk (in
//! the backing stage) and wait until the journal holds the record durably → reply.
//! FLUSH: journal sync and backing `fdatasync`, both before the reply. With replication in
//! sync mode, a write is acknowledged only after the appliance acknowledged its seq (or the
//! job fell back to async after `sync_ack_timeout_ms`).
//!
//! Must never write the backing disk for a request whose journal append failed, and never
//! run blocking I/O on the async reactor (it goes through `spawn_blocking`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use nbd::{ErrorCode, Operation};
use thiserror::Error;

use crate::backing::BlockDevice;
use crate::filter::FilterKind;
use crate::metrics::{AgentMetrics, DiskStats};
use crate::ranges::RangeLocks;
use crate::redo::BackingWatermark;
use crate::replicate::Replication;
use crate::sink::{DiskId, RecordKind, RecordSink, Seq, SinkEntry, SinkError, Timestamp};
use crate::tracker::Tracker;

/// What an operation on the backing disk gives back: the data of a read, nothing otherwise.
type BackingResult = io::Result<Option<Vec<u8>>>;

/// Carries out `op` on the backing disk (blocking): the data of a read, nothing otherwise;
/// with FUA (and for a flush) the disk is synced before it returns.
fn backing_op(device: &dyn BlockDevice, op: Operation, payload: &[u8]) -> BackingResult {
    let fua = match op {
        Operation::Read { offset, length } => {
            let mut buf = vec![0; length as usize];
            device.read_at(&mut buf, offset)?;
            return Ok(Some(buf));
        }
        Operation::Write { offset, fua, .. } => {
            device.write_at(payload, offset)?;
            fua
        }
        Operation::Trim {
            offset,
            length,
            fua,
        } => {
            device.zero_range(offset, u64::from(length), true)?;
            fua
        }
        Operation::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
        } => {
            device.zero_range(offset, u64::from(length), !no_hole)?;
            fua
        }
        Operation::Flush => true,
    };
    if fua {
        device.sync_data()?;
    }
    Ok(None)
}

/// Largest extent one trim or write-zeroes record covers; larger requests are split.
pub const ZEROING_RECORD_BYTES_MAX: u64 = 32 << 20;

/// Why an operation failed after it was accepted.
#[derive(Debug, Error)]
pub enum OpError {
    /// The backing disk failed.
    #[error("backing disk {disk}: {source}")]
    Device {
        /// The disk's name.
        disk: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The journal failed; the backing disk was not written.
    #[error("disk {disk}: {source}")]
    Journal {
        /// The disk's name.
        disk: String,
        /// The journal's error.
        source: SinkError,
    },
    /// A blocking task panicked or was cancelled.
    #[error("disk {disk}: blocking task failed: {message}")]
    Task {
        /// The disk's name.
        disk: String,
        /// What the runtime reported.
        message: String,
    },
}

impl OpError {
    /// The NBD error the client receives.
    pub fn nbd_error(&self) -> ErrorCode {
        match self {
            Self::Device { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => ErrorCode::ENOSPC,
                _ => ErrorCode::EIO,
            },
            Self::Journal { .. } | Self::Task { .. } => ErrorCode::EIO,
        }
    }
}

/// One stage of a chain, in order from the server to the backing disk.
#[derive(Debug)]
enum Stage {
    Stats(DiskStats),
    Journal {
        sink: Arc<dyn RecordSink>,
        ranges: Arc<RangeLocks>,
    },
}

/// A request inside the chain.
#[derive(Debug)]
struct Request {
    op: Operation,
    /// The data of a `Write`; empty otherwise.
    payload: Arc<Vec<u8>>,
    timestamp: Timestamp,
}

type StageFuture<'a> = Pin<Box<dyn Future<Output = Result<Option<Vec<u8>>, OpError>> + Send + 'a>>;

/// A disk with its filter chain.
#[derive(Debug)]
pub struct DiskChain {
    id: DiskId,
    name: String,
    stages: Vec<Stage>,
    device: Arc<dyn BlockDevice>,
    /// The job's replication, when the journal is shipped: told of every append, and in
    /// sync mode waited on before a write is acknowledged.
    replication: Option<Arc<Replication>>,
    /// Which journaled records reached the backing disk (shared by every disk of the job).
    watermark: Option<Arc<BackingWatermark>>,
    /// The job's tracking switch: while it is on, writes mark dirty regions instead of
    /// being journalled.
    tracker: Option<Arc<Tracker>>,
}

impl DiskChain {
    /// Builds the chain `kinds` (already validated) for disk `name`.
    pub fn new(
        id: DiskId,
        name: &str,
        kinds: &[FilterKind],
        device: Arc<dyn BlockDevice>,
        sink: &Arc<dyn RecordSink>,
        metrics: &AgentMetrics,
    ) -> Self {
        let stages = kinds
            .iter()
            .map(|kind| match kind {
                FilterKind::Stats => Stage::Stats(metrics.disk_stats(name)),
                FilterKind::Journal => Stage::Journal {
                    sink: Arc::clone(sink),
                    ranges: Arc::new(RangeLocks::default()),
                },
            })
            .collect();
        Self {
            id,
            name: name.to_owned(),
            stages,
            device,
            replication: None,
            watermark: None,
            tracker: None,
        }
    }

    /// The same chain, tracking dirty regions instead of journalling while `tracker` says so.
    /// Needs the watermark (the switch is made under its lock).
    pub fn with_tracker(mut self, tracker: Option<Arc<Tracker>>) -> Self {
        self.tracker = tracker;
        self
    }

    /// The range locks of the journal filter, if the chain has one: whoever reads the
    /// backing disk to journal its content (the resync) takes them like a write does.
    pub fn ranges(&self) -> Option<Arc<RangeLocks>> {
        self.stages.iter().find_map(|s| match s {
            Stage::Journal { ranges, .. } => Some(Arc::clone(ranges)),
            Stage::Stats(_) => None,
        })
    }

    /// The backing disk.
    pub fn device(&self) -> Arc<dyn BlockDevice> {
        Arc::clone(&self.device)
    }

    /// The same chain, registering its appends and completed backing writes with `watermark`.
    pub fn with_watermark(mut self, watermark: Option<Arc<BackingWatermark>>) -> Self {
        self.watermark = watermark;
        self
    }

    /// The same chain, telling `replication` of every append and (sync mode) waiting for
    /// the appliance's ack before acknowledging a write.
    pub fn with_replication(mut self, replication: Option<Arc<Replication>>) -> Self {
        self.replication = replication;
        self
    }

    /// The disk's id in the journal.
    pub fn id(&self) -> DiskId {
        self.id
    }

    /// The disk's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backing disk's size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.device.size_bytes()
    }

    /// Carries out `op`; returns the data of a read. `payload` is the data of a write (empty
    /// otherwise) and must be exactly as long as the write.
    pub async fn execute(
        &self,
        op: Operation,
        payload: Vec<u8>,
    ) -> Result<Option<Vec<u8>>, OpError> {
        if let Operation::Write { length, .. } = op {
            assert_eq!(payload.len(), length as usize, "write payload length");
        }
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let request = Request {
            op,
            payload: Arc::new(payload),
            timestamp: Timestamp(micros),
        };
        self.run(0, &request).await
    }

    /// `fdatasync`s the backing disk (at shutdown).
    pub async fn sync_device(&self) -> Result<(), OpError> {
        let device = Arc::clone(&self.device);
        self.blocking(move || device.sync_data())
            .await?
            .map_err(|source| self.device_error(source))
    }

    fn run<'a>(&'a self, index: usize, request: &'a Request) -> StageFuture<'a> {
        Box::pin(async move {
            match self.stages.get(index) {
                None => self.backing(request).await,
                Some(Stage::Stats(stats)) => {
                    let started = Instant::now();
                    let result = self.run(index + 1, request).await;
                    stats.record(&request.op, result.is_ok(), started.elapsed());
                    result
                }
                Some(Stage::Journal { sink, ranges }) => {
                    self.journal(index, request, sink, ranges).await
                }
            }
        })
    }

    async fn journal(
        &self,
        index: usize,
        request: &Request,
        sink: &Arc<dyn RecordSink>,
        ranges: &Arc<RangeLocks>,
    ) -> Result<Option<Vec<u8>>, OpError> {
        let (kind, offset, length, fua) = match request.op {
            Operation::Read { .. } => return self.run(index + 1, request).await,
            Operation::Flush => {
                let journal_sync = async {
                    let sink = Arc::clone(sink);
                    self.blocking(move || sink.sync())
                        .await?
                        .map_err(|source| self.journal_error(source))
                };
                let (_, data) = tokio::try_join!(journal_sync, self.run(index + 1, request))?;
                return Ok(data);
            }
            Operation::Write {
                offset,
                length,
                fua,
            } => (RecordKind::Write, offset, length, fua),
            Operation::Trim {
                offset,
                length,
                fua,
            } => (RecordKind::Trim, offset, length, fua),
            Operation::WriteZeroes {
                offset,
                length,
                fua,
                ..
            } => (RecordKind::WriteZeroes, offset, length, fua),
        };
        let end = offset.saturating_add(u64::from(length));
        let range = ranges.lock(offset, end).await;
        // When the backing disk comes right after this filter, its write runs in the same
        // blocking task as the append (one thread hand-off per write instead of two).
        let direct = index + 1 == self.stages.len();
        let (seqs, backing): (Vec<Seq>, Option<BackingResult>) = {
            let sink = Arc::clone(sink);
            let device = Arc::clone(&self.device);
            let op = request.op;
            let payload = Arc::clone(&request.payload);
            let (disk, timestamp) = (self.id, request.timestamp);
            let watermark = self.watermark.clone();
            let tracker = self.tracker.clone();
            self.blocking(move || {
                let append = || -> Result<Vec<Seq>, SinkError> {
                    // Decided under the watermark's lock, where the tracker switches.
                    if tracker.as_ref().is_some_and(|t| t.tracking()) {
                        return Ok(Vec::new());
                    }
                    if kind == RecordKind::Write {
                        return Ok(vec![sink.append(&SinkEntry {
                            disk,
                            kind,
                            offset,
                            length,
                            payload: &payload,
                            fua,
                            timestamp,
                        })?]);
                    }
                    // A large trim or zeroing becomes several records of at most
                    // ZEROING_RECORD_BYTES_MAX, consecutive seqs under one range lock, so
                    // the appliance's applier never holds more than that of before-images
                    // for one record. The last seq stands for the request.
                    let mut seqs = Vec::new();
                    let mut at = offset;
                    let end = offset + u64::from(length);
                    while at < end {
                        let part = (end - at).min(ZEROING_RECORD_BYTES_MAX);
                        seqs.push(sink.append(&SinkEntry {
                            disk,
                            kind,
                            offset: at,
                            length: part as u32,
                            payload: &[],
                            fua,
                            timestamp,
                        })?);
                        at += part;
                    }
                    Ok(seqs)
                };
                let mut seqs = match &watermark {
                    Some(w) => w.append(append),
                    None => append(),
                };
                if let (Ok(s), Some(t)) = (&seqs, &tracker) {
                    if s.is_empty() {
                        // Tracked: the region's mark is durable before the disk changes.
                        if let Err(e) = t.before_tracked_write(disk, offset, u64::from(length)) {
                            seqs = Err(SinkError::Journal(e.to_string()));
                        }
                    }
                }
                // Never write the backing disk for a request whose append (or mark) failed.
                let backing = match (&seqs, direct) {
                    (Ok(_), true) => Some(backing_op(&*device, op, &payload)),
                    _ => None,
                };
                (seqs, backing)
            })
            .await
            .map(|(seqs, backing)| seqs.map(|s| (s, backing)))?
            .map_err(|source| self.journal_error(source))?
        };
        let seq = seqs.last().copied().unwrap_or(Seq::NONE);
        if let Some(replication) = &self.replication {
            replication.notify_appended();
        }
        let result = match backing {
            Some(done) => done.map_err(|source| self.device_error(source)),
            None => self.run(index + 1, request).await,
        };
        if let Err(e) = &result {
            tracing::error!(disk = %self.name, %seq, error = %e, "journaled write failed on the backing disk; journaling what the disk holds now");
            self.reconcile(sink, offset, length, request.timestamp)
                .await;
        }
        if let Some(w) = &self.watermark {
            w.complete(&seqs);
        }
        drop(range);
        let data = result?;
        if fua {
            let sink = Arc::clone(sink);
            self.blocking(move || sink.wait_durable(seq))
                .await?
                .map_err(|source| self.journal_error(source))?;
        }
        if let Some(replication) = &self.replication {
            replication.wait_acked(seq).await;
        }
        Ok(data)
    }

    /// After a backing write failed (the client gets the error), journals what the backing
    /// disk holds now over the request's range, so the replica ends as the source did rather
    /// than with the write the source refused. Runs under the request's range lock. If the
    /// range cannot be read back either, the disk is failing: it is logged, nothing more can
    /// be done here.
    async fn reconcile(
        &self,
        sink: &Arc<dyn RecordSink>,
        offset: u64,
        length: u32,
        timestamp: Timestamp,
    ) {
        let device = Arc::clone(&self.device);
        let sink = Arc::clone(sink);
        let (disk, watermark) = (self.id, self.watermark.clone());
        let result = self
            .blocking(move || -> Result<Seq, String> {
                let mut at = offset;
                let end = offset + u64::from(length);
                let mut seq = Seq::NONE;
                while at < end {
                    let part = (end - at).min(ZEROING_RECORD_BYTES_MAX) as usize;
                    let mut data = vec![0u8; part];
                    device
                        .read_at(&mut data, at)
                        .map_err(|e| format!("reading the range back: {e}"))?;
                    let append = || -> Result<Vec<Seq>, SinkError> {
                        Ok(vec![sink.append(&SinkEntry {
                            disk,
                            kind: RecordKind::Write,
                            offset: at,
                            length: part as u32,
                            payload: &data,
                            fua: false,
                            timestamp,
                        })?])
                    };
                    // The data came from the disk: it is on the disk already.
                    let seqs = match &watermark {
                        Some(w) => {
                            let seqs = w.append(append).map_err(|e| e.to_string())?;
                            w.complete(&seqs);
                            seqs
                        }
                        None => append().map_err(|e| e.to_string())?,
                    };
                    seq = seqs.last().copied().unwrap_or(seq);
                    at += part as u64;
                }
                Ok(seq)
            })
            .await;
        match result {
            Ok(Ok(seq)) => {
                tracing::warn!(disk = %self.name, offset, length, %seq, "journaled the backing disk's content after a failed write")
            }
            Ok(Err(e)) => {
                tracing::error!(disk = %self.name, offset, length, error = %e, "could not journal the range after a failed write: source and replica may differ there")
            }
            Err(e) => tracing::error!(disk = %self.name, error = %e, "reconcile task failed"),
        }
        if let Some(replication) = &self.replication {
            replication.notify_appended();
        }
    }

    async fn backing(&self, request: &Request) -> Result<Option<Vec<u8>>, OpError> {
        let device = Arc::clone(&self.device);
        let payload = Arc::clone(&request.payload);
        let op = request.op;
        let result = self
            .blocking(move || backing_op(&*device, op, &payload))
            .await?;
        result.map_err(|source| self.device_error(source))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, OpError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| OpError::Task {
                disk: self.name.clone(),
                message: e.to_string(),
            })
    }

    fn device_error(&self, source: io::Error) -> OpError {
        OpError::Device {
            disk: self.name.clone(),
            source,
        }
    }

    fn journal_error(&self, source: SinkError) -> OpError {
        OpError::Journal {
            disk: self.name.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::{Fault, MemDevice};
    use crate::sink::{MemSink, SinkFault};

    struct Fixture {
        chain: DiskChain,
        device: Arc<MemDevice>,
        sink: Arc<MemSink>,
        metrics: AgentMetrics,
    }

    fn fixture() -> Fixture {
        let device = Arc::new(MemDevice::new(1 << 20));
        let sink = Arc::new(MemSink::new());
        let metrics = AgentMetrics::new();
        let dyn_sink: Arc<dyn RecordSink> = sink.clone();
        let chain = DiskChain::new(
            DiskId(3),
            "d0",
            &[FilterKind::Stats, FilterKind::Journal],
            device.clone(),
            &dyn_sink,
            &metrics,
        );
        Fixture {
            chain,
            device,
            sink,
            metrics,
        }
    }

    #[tokio::test]
    async fn write_is_journaled_then_applied() {
        let f = fixture();
        let op = Operation::Write {
            offset: 4096,
            length: 3,
            fua: false,
        };
        assert_eq!(f.chain.execute(op, b"abc".to_vec()).await.unwrap(), None);
        let records = f.sink.records();
        assert_eq!(records.len(), 1);
        assert_eq!(
            (records[0].seq, records[0].disk, records[0].kind),
            (Seq(1), DiskId(3), RecordKind::Write)
        );
        assert_eq!(records[0].payload, b"abc");
        assert_eq!(&f.device.live()[4096..4099], b"abc");
        assert_eq!(f.sink.durable_seq(), Seq(0), "no FUA, no sync");
        assert_eq!(f.device.syncs(), 0);
        let read = f
            .chain
            .execute(
                Operation::Read {
                    offset: 4096,
                    length: 3,
                },
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(read.as_deref(), Some(&b"abc"[..]));
        assert!(f
            .metrics
            .render()
            .contains("cdp_disk_writes_total{disk=\"d0\"} 1"));
    }

    #[tokio::test]
    async fn fua_makes_journal_and_disk_durable() {
        let f = fixture();
        let op = Operation::WriteZeroes {
            offset: 0,
            length: 512,
            fua: true,
            no_hole: true,
        };
        f.chain.execute(op, Vec::new()).await.unwrap();
        assert_eq!(f.sink.durable_seq(), Seq(1));
        assert_eq!(f.device.syncs(), 1);
        f.chain
            .execute(
                Operation::Write {
                    offset: 0,
                    length: 1,
                    fua: false,
                },
                vec![7],
            )
            .await
            .unwrap();
        assert_eq!(f.sink.durable_seq(), Seq(1));
        f.chain.execute(Operation::Flush, Vec::new()).await.unwrap();
        assert_eq!(f.sink.durable_seq(), Seq(2));
        assert_eq!(f.device.durable()[0], 7);
    }

    #[tokio::test]
    async fn journal_failure_leaves_the_disk_untouched() {
        let f = fixture();
        f.sink.inject(Some(SinkFault::Append));
        let err = f
            .chain
            .execute(
                Operation::Write {
                    offset: 0,
                    length: 2,
                    fua: false,
                },
                vec![1, 2],
            )
            .await
            .unwrap_err();
        assert_eq!(err.nbd_error(), ErrorCode::EIO);
        assert_eq!(f.device.writes(), 0);
        assert!(f.sink.records().is_empty());
        assert!(f
            .metrics
            .render()
            .contains("cdp_disk_errors_total{disk=\"d0\",op=\"write\"} 1"));
    }

    #[tokio::test]
    async fn device_failure_is_eio_and_sync_failure_fails_flush() {
        let f = fixture();
        f.device.inject(Some(Fault::Write));
        let err = f
            .chain
            .execute(
                Operation::Trim {
                    offset: 0,
                    length: 512,
                    fua: false,
                },
                Vec::new(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.nbd_error(), ErrorCode::EIO);
        f.device.inject(None);
        f.sink.inject(Some(SinkFault::Sync));
        assert!(f.chain.execute(Operation::Flush, Vec::new()).await.is_err());
        f.sink.inject(None);
        f.device.inject(Some(Fault::Sync));
        assert!(f.chain.execute(Operation::Flush, Vec::new()).await.is_err());
    }
}
