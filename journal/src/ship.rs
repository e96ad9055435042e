//! The ship/land protocol as sans-IO state machines, driven by the agent's and the
//! appliance's network code the way `quinn` drives `quinn-proto`: inputs are `handle_*`
//! calls, outputs are `poll_*` calls, and neither machine does I/O or reads the clock.
//!
//! - [`Shipper`] (agent): decides which journal records to read and send, keeps the in-flight
//!   window bounded, follows acks, and rewinds on a resend request or a reconnect.
//! - [`Lander`] (appliance): checks the hello, verifies every record of every batch (framing,
//!   checksum, blake3, seq, generation) before handing it to the landing journal, and
//!   acknowledges only what the driver reports durable.
//!
//! Must never: ship a record that is not durable in the agent's journal (the appliance would
//! otherwise hold seqs the agent could lose), acknowledge a seq the landing journal has not
//! made durable, hand the landing journal a record it has not verified, or let seqs skip.

use std::collections::VecDeque;

use crate::record::{RecordDecoder, RecordHeader};
use crate::types::{Generation, JobId, Seq, Timestamp};
use crate::wire::{
    AgentStatus, Batch, CheckpointRequest, Control, DiskInfo, Frame, Heartbeat, Hello, Mode,
    Refuse, RefuseCode, Resend, ResendReason, ResyncNeed, Welcome, WIRE_VERSION,
};

/// Checkpoint requests the shipper holds for its driver, at most; more are dropped (the
/// operator's call times out and says so).
pub const CHECKPOINT_REQUESTS_MAX: usize = 64;
/// Most resync answers the shipper holds for its driver (the driver keeps fewer hashes
/// records than this unanswered).
pub const RESYNC_NEEDS_MAX: usize = 256;

/// Bounds and periods of a shipper.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShipperConfig {
    /// Stored record bytes sent but not yet acknowledged, at most. Past it the shipper stops
    /// reading until acks arrive.
    pub inflight_bytes_max: u64,
    /// Stored record bytes per batch, at most (a single larger record still goes alone).
    pub batch_bytes_max: usize,
    /// How often a heartbeat is sent while streaming.
    pub heartbeat_interval_micros: u64,
}

impl Default for ShipperConfig {
    fn default() -> Self {
        ShipperConfig {
            inflight_bytes_max: 64 << 20,
            batch_bytes_max: 1 << 20,
            heartbeat_interval_micros: 500_000,
        }
    }
}

/// Where a shipper is in its connection's life.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShipperState {
    /// No connection.
    Disconnected,
    /// Hello sent, waiting for the appliance's answer.
    Handshaking,
    /// Shipping records.
    Streaming,
    /// The appliance refused the hello; the connection is to be closed and the operator told.
    Refused(Refuse),
}

/// What the job is, as announced in every hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobInfo {
    /// The job (consistency group).
    pub job: JobId,
    /// Its human name.
    pub job_name: String,
    /// The generation the agent writes.
    pub generation: Generation,
    /// Replication mode.
    pub mode: Mode,
    /// The job's disks.
    pub disks: Vec<DiskInfo>,
}

/// The shipper asks its driver to read records `from ..= to_max` (stopping earlier once
/// `bytes_max` stored bytes are reached, but always at least one record).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRequest {
    /// First seq to read.
    pub from: Seq,
    /// Last seq that may be read (the agent journal's durable seq when asked).
    pub to_max: Seq,
    /// Stored bytes to read, at most, unless the first record alone is larger.
    pub bytes_max: usize,
}

/// Records the driver read for a [`ReadRequest`], as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadDone {
    /// Seq of the first record (the request's `from`).
    pub first_seq: Seq,
    /// Number of records in `records`; at least one.
    pub count: u32,
    /// The records back to back, exactly as the journal stores them.
    pub records: Vec<u8>,
    /// Timestamp of the first record (for the RPO).
    pub first_timestamp: Timestamp,
}

/// A protocol violation by the appliance; the driver closes the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShipError {
    /// The appliance refused the hello.
    #[error("appliance refused the job ({code:?}): {message}")]
    Refused {
        /// The appliance's reason.
        code: RefuseCode,
        /// The appliance's message.
        message: String,
    },
    /// The appliance claims seqs the agent never made durable (it would have lost them).
    #[error("appliance holds seq {landing} but the agent's journal is durable only to {durable}")]
    ApplianceAhead {
        /// The appliance's landing durable seq.
        landing: Seq,
        /// The agent's durable seq.
        durable: Seq,
    },
    /// The agent no longer holds the records the appliance needs next.
    #[error("appliance needs seq {needed} but the agent's journal starts at {first}")]
    Gap {
        /// First seq the appliance needs.
        needed: Seq,
        /// Oldest seq in the agent's journal.
        first: Seq,
    },
    /// An ack or resend names a seq outside what was sent.
    #[error("appliance sent {what} for seq {seq}, outside {acked}..={shipped}")]
    SeqOutOfWindow {
        /// Which frame.
        what: &'static str,
        /// The seq it named.
        seq: Seq,
        /// Highest seq acknowledged before.
        acked: Seq,
        /// Highest seq sent.
        shipped: Seq,
    },
    /// A frame that makes no sense in the current state.
    #[error("unexpected frame from the appliance while {state}: {frame}")]
    Unexpected {
        /// The shipper's state.
        state: &'static str,
        /// The frame's kind.
        frame: &'static str,
    },
}

#[derive(Clone, Copy, Debug)]
struct InFlight {
    first_seq: Seq,
    last_seq: Seq,
    bytes: u64,
    first_timestamp: Timestamp,
}

/// The agent's half of the protocol for one job.
#[derive(Debug)]
pub struct Shipper {
    config: ShipperConfig,
    job: JobInfo,
    state: ShipperState,
    /// Highest seq in the agent's journal.
    head: Seq,
    /// Highest seq durable in the agent's journal. Invariant: nothing above it is shipped.
    durable: Seq,
    /// Oldest seq the agent's journal still holds.
    first: Seq,
    /// Highest seq the appliance acknowledged durable. Invariant: never decreases while the
    /// process lives; only records above it are ever sent.
    acked: Seq,
    /// Next seq to read and send.
    next_read: Seq,
    /// A read request is with the driver.
    read_pending: bool,
    inflight: VecDeque<InFlight>,
    /// Sum of `inflight[..].bytes`. Invariant: at most `inflight_bytes_max` plus one batch.
    inflight_bytes: u64,
    outbox: VecDeque<Frame>,
    /// The acked seq last handed out by `poll_trim`.
    trimmed: Seq,
    last_heartbeat_micros: Option<u64>,
    shipped_bytes_total: u64,
    /// Checkpoints the appliance asked for, in order, for the driver to append.
    checkpoint_requests: VecDeque<CheckpointRequest>,
    /// The appliance's answers to resync hashes records, in order, for the driver.
    resync_needs: VecDeque<ResyncNeed>,
    /// The appliance's latest control settings, until the driver takes them.
    control: Option<Control>,
}

impl Shipper {
    /// A disconnected shipper for `job`, whose journal holds `first ..= head` with `durable`
    /// made durable.
    pub fn new(config: ShipperConfig, job: JobInfo, first: Seq, head: Seq, durable: Seq) -> Self {
        Shipper {
            config,
            job,
            state: ShipperState::Disconnected,
            head,
            durable,
            first,
            acked: Seq::NONE,
            next_read: Seq::FIRST,
            read_pending: false,
            inflight: VecDeque::new(),
            inflight_bytes: 0,
            outbox: VecDeque::new(),
            trimmed: Seq::NONE,
            last_heartbeat_micros: None,
            shipped_bytes_total: 0,
            checkpoint_requests: VecDeque::new(),
            resync_needs: VecDeque::new(),
            control: None,
        }
    }

    /// The agent's journal now holds records up to `head`, durable up to `durable`, oldest
    /// `first`.
    pub fn handle_journal(&mut self, first: Seq, head: Seq, durable: Seq) {
        self.first = first;
        self.head = head;
        self.durable = durable;
    }

    /// A connection is up: the hello is queued.
    pub fn handle_connected(&mut self) {
        self.reset_connection();
        self.state = ShipperState::Handshaking;
        self.outbox.push_back(Frame::Hello(Hello {
            version: WIRE_VERSION,
            job: self.job.job,
            job_name: self.job.job_name.clone(),
            generation: self.job.generation,
            mode: self.job.mode,
            head_seq: self.head,
            durable_seq: self.durable,
            first_seq: self.first,
            disks: self.job.disks.clone(),
        }));
    }

    /// The connection is gone: what was in flight will be sent again from `acked + 1`.
    pub fn handle_disconnected(&mut self) {
        self.reset_connection();
        if !matches!(self.state, ShipperState::Refused(_)) {
            self.state = ShipperState::Disconnected;
        }
    }

    fn reset_connection(&mut self) {
        self.inflight.clear();
        self.inflight_bytes = 0;
        self.outbox.clear();
        self.read_pending = false;
        self.next_read = self.acked.next();
        self.last_heartbeat_micros = None;
        // Answers to hashes records sent on a lost connection are asked for again.
        self.resync_needs.clear();
    }

    /// A frame from the appliance.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), ShipError> {
        match (&self.state, frame) {
            (ShipperState::Handshaking, Frame::Welcome(w)) => self.handle_welcome(w),
            (ShipperState::Handshaking, Frame::Refuse(r)) => {
                let err = ShipError::Refused {
                    code: r.code,
                    message: r.message.clone(),
                };
                self.state = ShipperState::Refused(r);
                Err(err)
            }
            (ShipperState::Streaming, Frame::Ack(seq)) => self.handle_ack(seq),
            (ShipperState::Streaming, Frame::Resend(r)) => self.handle_resend(r),
            (ShipperState::Streaming, Frame::CheckpointRequest(c)) => {
                if self.checkpoint_requests.len() < CHECKPOINT_REQUESTS_MAX {
                    self.checkpoint_requests.push_back(c);
                }
                Ok(())
            }
            (ShipperState::Streaming, Frame::ResyncNeed(n)) => {
                // The driver keeps at most a bounded number of hashes records unanswered,
                // so this queue is bounded by it; an extra answer is a protocol error.
                if self.resync_needs.len() >= RESYNC_NEEDS_MAX {
                    return Err(ShipError::Unexpected {
                        state: self.state_name(),
                        frame: "resync need beyond the outstanding bound",
                    });
                }
                self.resync_needs.push_back(n);
                Ok(())
            }
            (ShipperState::Streaming, Frame::Control(c)) => {
                self.control = Some(c);
                Ok(())
            }
            (_, frame) => Err(ShipError::Unexpected {
                state: self.state_name(),
                frame: frame_name(&frame),
            }),
        }
    }

    fn handle_welcome(&mut self, w: Welcome) -> Result<(), ShipError> {
        if w.landing_durable_seq > self.durable {
            return Err(ShipError::ApplianceAhead {
                landing: w.landing_durable_seq,
                durable: self.durable,
            });
        }
        let needed = w.landing_durable_seq.next();
        if needed < self.first && self.head >= self.first {
            return Err(ShipError::Gap {
                needed,
                first: self.first,
            });
        }
        // The appliance's durable seq only grows; a lower one than we saw acked means its
        // landing journal lost acknowledged records, which the agent must not paper over.
        if w.landing_durable_seq < self.acked {
            return Err(ShipError::SeqOutOfWindow {
                what: "welcome",
                seq: w.landing_durable_seq,
                acked: self.acked,
                shipped: self.shipped_seq(),
            });
        }
        self.acked = w.landing_durable_seq;
        self.next_read = needed;
        self.state = ShipperState::Streaming;
        Ok(())
    }

    fn handle_ack(&mut self, seq: Seq) -> Result<(), ShipError> {
        if seq < self.acked || seq > self.shipped_seq() {
            return Err(ShipError::SeqOutOfWindow {
                what: "ack",
                seq,
                acked: self.acked,
                shipped: self.shipped_seq(),
            });
        }
        self.acked = seq;
        while let Some(front) = self.inflight.front() {
            if front.last_seq > seq {
                break;
            }
            self.inflight_bytes -= front.bytes;
            self.inflight.pop_front();
        }
        Ok(())
    }

    fn handle_resend(&mut self, r: Resend) -> Result<(), ShipError> {
        if r.from_seq <= self.acked || r.from_seq > self.shipped_seq().next() {
            return Err(ShipError::SeqOutOfWindow {
                what: "resend",
                seq: r.from_seq,
                acked: self.acked,
                shipped: self.shipped_seq(),
            });
        }
        // Everything before `from_seq` is landed, though maybe not yet durable: keep those
        // records in flight until their ack, and send the rest again.
        while let Some(back) = self.inflight.back_mut() {
            if back.first_seq >= r.from_seq {
                self.inflight_bytes -= back.bytes;
                self.inflight.pop_back();
            } else {
                // A batch straddling `from_seq` keeps its byte count until acked (at most one
                // batch counted twice in the window) but no longer claims the seqs resent.
                back.last_seq = back.last_seq.min(r.from_seq.prev());
                break;
            }
        }
        self.next_read = r.from_seq;
        self.read_pending = false;
        Ok(())
    }

    /// Records the driver should read next, if the window has room and records are durable.
    pub fn poll_read(&mut self) -> Option<ReadRequest> {
        if self.state != ShipperState::Streaming
            || self.read_pending
            || self.next_read > self.durable
            || self.inflight_bytes >= self.config.inflight_bytes_max
        {
            return None;
        }
        self.read_pending = true;
        let room = self.config.inflight_bytes_max - self.inflight_bytes;
        let bytes_max = (self.config.batch_bytes_max as u64).min(room) as usize;
        Some(ReadRequest {
            from: self.next_read,
            to_max: self.durable,
            bytes_max,
        })
    }

    /// The driver read records for the last request: they become a batch.
    ///
    /// A read that no longer matches (a resend or reconnect happened meanwhile) is dropped.
    pub fn handle_read(&mut self, read: ReadDone) {
        if !self.read_pending || read.first_seq != self.next_read || read.count == 0 {
            return;
        }
        self.read_pending = false;
        let bytes = read.records.len() as u64;
        let batch = Batch {
            first_seq: read.first_seq,
            count: read.count,
            records: read.records,
        };
        let last_seq = batch.last_seq();
        assert!(
            last_seq <= self.durable,
            "shipping seq {last_seq} beyond the agent's durable seq {}",
            self.durable
        );
        self.inflight.push_back(InFlight {
            first_seq: read.first_seq,
            last_seq,
            bytes,
            first_timestamp: read.first_timestamp,
        });
        self.inflight_bytes += bytes;
        self.shipped_bytes_total += bytes;
        self.next_read = last_seq.next();
        self.outbox.push_back(Frame::Batch(batch));
    }

    /// Time passes: a heartbeat is queued when one is due. `oldest_unacked` is the timestamp
    /// of record `acked + 1` when the driver knows it (see [`Shipper::oldest_unacked`]).
    pub fn handle_tick(&mut self, now_micros: u64, oldest_unacked: Option<Timestamp>) {
        if self.state != ShipperState::Streaming {
            return;
        }
        let due = self.last_heartbeat_micros.is_none_or(|last| {
            now_micros.saturating_sub(last) >= self.config.heartbeat_interval_micros
        });
        if due {
            self.last_heartbeat_micros = Some(now_micros);
            self.outbox.push_back(Frame::Heartbeat(Heartbeat {
                sent_at_micros: now_micros,
                head_seq: self.head,
                rpo_micros: self.rpo_micros(now_micros, oldest_unacked),
                lag_records: self.lag_records(),
                lag_bytes: self.inflight_bytes,
            }));
        }
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.outbox.pop_front()
    }

    /// A checkpoint the appliance asked for: the driver runs the hook if asked, appends a
    /// `Checkpoint` record carrying the request id, and ships it like any record.
    pub fn poll_checkpoint(&mut self) -> Option<CheckpointRequest> {
        self.checkpoint_requests.pop_front()
    }

    /// The appliance's answer to a resync hashes record, in the order they came.
    pub fn poll_resync_need(&mut self) -> Option<ResyncNeed> {
        self.resync_needs.pop_front()
    }

    /// The appliance's control settings, when they came since the last call.
    pub fn poll_control(&mut self) -> Option<Control> {
        self.control.take()
    }

    /// A seq below which the agent's journal may be trimmed, once per advance of the ack.
    pub fn poll_trim(&mut self) -> Option<Seq> {
        if self.acked > self.trimmed {
            self.trimmed = self.acked;
            Some(self.acked.next())
        } else {
            None
        }
    }

    /// Timestamp of the oldest unacknowledged record, when it is in flight; `None` when
    /// nothing is unacknowledged or the driver must look it up (record `acked + 1`).
    pub fn oldest_unacked(&self) -> Option<Timestamp> {
        self.inflight.front().map(|b| b.first_timestamp)
    }

    /// Age of the oldest write not yet durable at the appliance, on the agent's clock: zero
    /// when everything is acknowledged.
    pub fn rpo_micros(&self, now_micros: u64, oldest_unacked: Option<Timestamp>) -> u64 {
        if self.head <= self.acked {
            return 0;
        }
        oldest_unacked
            .or_else(|| self.oldest_unacked())
            .map_or(0, |t| now_micros.saturating_sub(t.unix_micros()))
    }

    /// Records in the agent's journal not yet acknowledged by the appliance.
    pub fn lag_records(&self) -> u64 {
        self.head.0.saturating_sub(self.acked.0)
    }

    /// Stored bytes sent and not yet acknowledged.
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight_bytes
    }

    /// Highest seq acknowledged durable by the appliance.
    pub fn acked_seq(&self) -> Seq {
        self.acked
    }

    /// Highest seq sent on this connection (or acked, when nothing is in flight).
    pub fn shipped_seq(&self) -> Seq {
        self.inflight.back().map_or(self.acked, |b| b.last_seq)
    }

    /// Stored record bytes sent since the shipper was made, resends included.
    pub fn shipped_bytes_total(&self) -> u64 {
        self.shipped_bytes_total
    }

    /// The connection state.
    pub fn state(&self) -> &ShipperState {
        &self.state
    }

    fn state_name(&self) -> &'static str {
        match self.state {
            ShipperState::Disconnected => "disconnected",
            ShipperState::Handshaking => "handshaking",
            ShipperState::Streaming => "streaming",
            ShipperState::Refused(_) => "refused",
        }
    }
}

fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello(_) => "hello",
        Frame::Welcome(_) => "welcome",
        Frame::Refuse(_) => "refuse",
        Frame::Batch(_) => "batch",
        Frame::Ack(_) => "ack",
        Frame::Heartbeat(_) => "heartbeat",
        Frame::Resend(_) => "resend",
        Frame::CheckpointRequest(_) => "checkpoint request",
        Frame::ResyncNeed(_) => "resync need",
        Frame::Control(_) => "control",
        Frame::AgentStatus(_) => "agent status",
    }
}

/// What the appliance knows of a job before a connection, from its own state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LandingState {
    /// The job, and its disks as first announced; `None` for a job never seen.
    pub job: Option<JobInfo>,
    /// Highest seq in the landing journal.
    pub head: Seq,
    /// Highest seq durable in the landing journal.
    pub durable: Seq,
    /// Highest seq applied to the replicas.
    pub applied: Seq,
}

/// A protocol violation by the agent; the driver closes the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LandError {
    /// A frame that makes no sense in the current state.
    #[error("unexpected frame from the agent: {frame}")]
    Unexpected {
        /// The frame's kind.
        frame: &'static str,
    },
}

/// Verified records of one batch for the landing journal: `records[..bytes]` holds `count`
/// records starting at `first_seq`, each checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Landed {
    /// Seq of the first verified record.
    pub first_seq: Seq,
    /// Number of verified records.
    pub count: u32,
    /// How many leading bytes of the batch's records they take.
    pub bytes: usize,
}

/// The appliance's half of the protocol for one job's connection.
#[derive(Debug)]
pub struct Lander {
    state: LandingState,
    generation: Generation,
    welcomed: bool,
    /// Next seq the landing journal expects. Invariant: `head + 1`.
    next_seq: Seq,
    /// The ack last queued.
    acked: Seq,
    /// A resend was asked for from this seq: batches starting later are in-flight leftovers
    /// and are dropped without another request.
    resend_from: Option<Seq>,
    decoder: RecordDecoder,
    outbox: VecDeque<Frame>,
    last_heartbeat: Option<Heartbeat>,
    last_status: Option<AgentStatus>,
    corrupt_records_total: u64,
}

impl Lander {
    /// A lander for a connection to a job in `state`.
    pub fn new(state: LandingState) -> Self {
        Lander {
            next_seq: state.head.next(),
            acked: state.durable,
            generation: Generation::default(),
            state,
            welcomed: false,
            resend_from: None,
            decoder: RecordDecoder::new(),
            outbox: VecDeque::new(),
            last_heartbeat: None,
            last_status: None,
            corrupt_records_total: 0,
        }
    }

    /// The agent's hello: the welcome (queued) or the refusal (queued, and returned so the
    /// driver can log it and close).
    pub fn handle_hello(&mut self, hello: &Hello) -> Result<JobInfo, Refuse> {
        let info = JobInfo {
            job: hello.job,
            job_name: hello.job_name.clone(),
            generation: hello.generation,
            mode: hello.mode,
            disks: hello.disks.clone(),
        };
        match self.check_hello(hello) {
            Ok(()) => {
                self.welcomed = true;
                self.generation = hello.generation;
                self.outbox.push_back(Frame::Welcome(Welcome {
                    version: WIRE_VERSION,
                    landing_durable_seq: self.state.durable,
                    applied_seq: self.state.applied,
                }));
                Ok(info)
            }
            Err(refuse) => {
                self.outbox.push_back(Frame::Refuse(refuse.clone()));
                Err(refuse)
            }
        }
    }

    fn check_hello(&self, hello: &Hello) -> Result<(), Refuse> {
        let refuse = |code, message: String| Err(Refuse { code, message });
        if hello.version != WIRE_VERSION {
            return refuse(
                RefuseCode::Version,
                format!(
                    "agent speaks protocol {}, appliance {}",
                    hello.version, WIRE_VERSION
                ),
            );
        }
        if let Some(known) = &self.state.job {
            if known.job != hello.job {
                return refuse(RefuseCode::JobMismatch, "job id differs".into());
            }
            if known.disks != hello.disks {
                return refuse(
                    RefuseCode::JobMismatch,
                    "the job's disks differ from those first replicated".into(),
                );
            }
            if known.generation != hello.generation {
                return refuse(
                    RefuseCode::Generation,
                    format!(
                        "agent writes generation {}, appliance holds generation {}",
                        hello.generation, known.generation
                    ),
                );
            }
        }
        if self.state.head > hello.durable_seq {
            return refuse(
                RefuseCode::Generation,
                format!(
                    "appliance holds seq {} but the agent is durable only to {}",
                    self.state.head, hello.durable_seq
                ),
            );
        }
        if hello.head_seq >= hello.first_seq && self.next_seq < hello.first_seq {
            return refuse(
                RefuseCode::Gap,
                format!(
                    "appliance needs seq {} but the agent's journal starts at {}",
                    self.next_seq, hello.first_seq
                ),
            );
        }
        Ok(())
    }

    /// A batch from the agent: verifies its records in order and returns those the landing
    /// journal may append (possibly none). A bad record stops the batch and queues a resend.
    pub fn handle_batch(&mut self, batch: &Batch) -> Result<Landed, LandError> {
        let none = Landed {
            first_seq: self.next_seq,
            count: 0,
            bytes: 0,
        };
        if !self.welcomed {
            return Err(LandError::Unexpected { frame: "batch" });
        }
        if batch.first_seq != self.next_seq {
            // Batches sent after a record we asked to have resent are expected leftovers;
            // anything else out of place is a gap to have filled.
            if self.resend_from.is_none() {
                self.ask_resend(ResendReason::Gap);
            }
            return Ok(none);
        }
        self.resend_from = None;
        let mut at = 0usize;
        let mut count = 0u32;
        let mut expected = batch.first_seq;
        while count < batch.count {
            let verified = self
                .decoder
                .verify_stored(&batch.records[at..])
                .ok()
                .filter(|(h, _)| self.record_fits(h, expected));
            let Some((_, len)) = verified else {
                self.corrupt_records_total += 1;
                break;
            };
            at += len;
            count += 1;
            expected = expected.next();
        }
        if count < batch.count || at != batch.records.len() {
            self.next_seq = expected;
            self.ask_resend(ResendReason::Corrupt);
            if count == batch.count {
                // Every announced record verified but bytes trail them: count them as
                // corrupt too, since the agent sent something it did not mean.
                self.corrupt_records_total += 1;
            }
        } else {
            self.next_seq = expected;
        }
        Ok(Landed {
            first_seq: batch.first_seq,
            count,
            bytes: at,
        })
    }

    /// Whether a verified record is the one the landing journal expects next.
    fn record_fits(&self, header: &RecordHeader, expected: Seq) -> bool {
        // Checkpoint and flush records change no disk; every other record must name one of
        // the job's disks.
        let disk_known = matches!(
            header.kind,
            crate::types::RecordKind::Checkpoint
                | crate::types::RecordKind::Flush
                | crate::types::RecordKind::Resync
        ) || self
            .state
            .job
            .as_ref()
            .is_none_or(|j| j.disks.iter().any(|d| d.disk == header.disk));
        header.seq == expected && header.generation == self.generation && disk_known
    }

    fn ask_resend(&mut self, reason: ResendReason) {
        self.resend_from = Some(self.next_seq);
        self.outbox.push_back(Frame::Resend(Resend {
            from_seq: self.next_seq,
            reason,
        }));
    }

    /// The job as it is now known (set by the driver after a successful hello).
    pub fn handle_job_known(&mut self, job: JobInfo) {
        self.state.job = Some(job);
    }

    /// The landing journal is durable up to `durable`: an ack is queued if it advanced.
    pub fn handle_durable(&mut self, durable: Seq) {
        self.state.durable = durable;
        if durable > self.acked {
            self.acked = durable;
            self.outbox.push_back(Frame::Ack(durable));
        }
    }

    /// A frame from the agent other than a batch.
    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), LandError> {
        match frame {
            Frame::Heartbeat(h) if self.welcomed => {
                self.last_heartbeat = Some(h);
                Ok(())
            }
            Frame::AgentStatus(a) if self.welcomed => {
                self.last_status = Some(a);
                Ok(())
            }
            other => Err(LandError::Unexpected {
                frame: frame_name(&other),
            }),
        }
    }

    /// The operator asked for a checkpoint: the request goes to the agent.
    pub fn request_checkpoint(&mut self, request: CheckpointRequest) {
        if self.welcomed {
            self.outbox.push_back(Frame::CheckpointRequest(request));
        }
    }

    /// The answer to a resync hashes record goes to the agent.
    pub fn send_resync_need(&mut self, need: ResyncNeed) {
        if self.welcomed {
            self.outbox.push_back(Frame::ResyncNeed(need));
        }
    }

    /// The job's control settings go to the agent.
    pub fn send_control(&mut self, control: Control) {
        if self.welcomed {
            self.outbox.push_back(Frame::Control(control));
        }
    }

    /// The next frame to send.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.outbox.pop_front()
    }

    /// The agent's last status, if it sent one on this connection.
    pub fn last_status(&self) -> Option<&AgentStatus> {
        self.last_status.as_ref()
    }

    /// The agent's last heartbeat (its RPO and lag, on its own clock).
    pub fn last_heartbeat(&self) -> Option<&Heartbeat> {
        self.last_heartbeat.as_ref()
    }

    /// Records refused for a bad checksum, framing or seq since the lander was made.
    pub fn corrupt_records_total(&self) -> u64 {
        self.corrupt_records_total
    }
}

#[cfg(test)]
mod tests {
    //! A deterministic simulation of one agent and one appliance: a lossy, corrupting network
    //! that also drops the connection, and an appliance whose landing journal loses what it
    //! had not made durable when it crashes. Replayable by seed.
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use crate::record::{encode_record, verify_stored, Entry};
    use crate::types::{Compression, DiskId};
    use crate::wire::{decode, encode};

    /// xorshift64*: small, deterministic, good enough to pick actions.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    fn job() -> JobInfo {
        JobInfo {
            job: JobId([1; 16]),
            job_name: "sim".into(),
            generation: Generation(1),
            mode: Mode::Async,
            disks: vec![DiskInfo {
                disk: DiskId(0),
                name: "d0".into(),
                size_bytes: 1 << 30,
            }],
        }
    }

    fn source_records(rng: &mut Rng, count: u64) -> Vec<Vec<u8>> {
        (1..=count)
            .map(|seq| {
                let len = rng.below(9000) as usize;
                let fill = (seq % 251) as u8;
                let payload: Vec<u8> = (0..len).map(|i| fill ^ (i % 7) as u8).collect();
                let entry = Entry::write(DiskId(0), seq * 4096, &payload, Timestamp(seq * 1000));
                encode_record(&entry, Generation(1), Seq(seq), Compression::default()).unwrap()
            })
            .collect()
    }

    /// Runs one simulation; panics with the seed on any broken invariant.
    fn simulate(seed: u64) {
        let mut rng = Rng(seed | 1);
        let total = 200 + rng.below(200);
        let source = source_records(&mut rng, total);
        let config = ShipperConfig {
            inflight_bytes_max: 64 << 10,
            batch_bytes_max: 16 << 10,
            heartbeat_interval_micros: 10_000,
        };
        let mut agent_durable = 0u64;
        let mut shipper = Shipper::new(config, job(), Seq(1), Seq(0), Seq(0));
        // The appliance: landed records (index = seq - 1) and how many are durable.
        let mut landed: Vec<Vec<u8>> = Vec::new();
        let mut landing_durable = 0usize;
        let mut known_job: Option<JobInfo> = None;
        let mut lander: Option<Lander> = None;
        let mut to_appliance: VecDeque<Vec<u8>> = VecDeque::new();
        let mut to_agent: VecDeque<Vec<u8>> = VecDeque::new();
        let mut now = 0u64;
        let mut highest_ack = Seq(0);
        for step in 0..200_000u64 {
            now += 100;
            let done = landing_durable as u64 == total && shipper.acked_seq() == Seq(total);
            if done {
                break;
            }
            // The agent's journal grows and syncs.
            if agent_durable < total && rng.chance(30) {
                agent_durable = (agent_durable + 1 + rng.below(8)).min(total);
            }
            shipper.handle_journal(Seq(1), Seq(agent_durable), Seq(agent_durable));
            // Connection faults: drop it, or crash the appliance (undurable records lost).
            if rng.chance(1) {
                if rng.chance(50) {
                    landed.truncate(landing_durable);
                }
                lander = None;
                to_appliance.clear();
                to_agent.clear();
                shipper.handle_disconnected();
            }
            if lander.is_none() && rng.chance(20) {
                lander = Some(Lander::new(LandingState {
                    job: known_job.clone(),
                    head: Seq(landed.len() as u64),
                    durable: Seq(landing_durable as u64),
                    applied: Seq(0),
                }));
                shipper.handle_connected();
            }
            // The agent reads and sends.
            if let Some(req) = shipper.poll_read() {
                let mut records = Vec::new();
                let mut seq = req.from;
                while seq <= req.to_max && (records.is_empty() || records.len() < req.bytes_max) {
                    records.extend_from_slice(&source[(seq.0 - 1) as usize]);
                    seq = seq.next();
                }
                let count = (seq.0 - req.from.0) as u32;
                shipper.handle_read(ReadDone {
                    first_seq: req.from,
                    count,
                    records,
                    first_timestamp: Timestamp(req.from.0 * 1000),
                });
            }
            shipper.handle_tick(now, None);
            if lander.is_some() {
                while let Some(frame) = shipper.poll_transmit() {
                    let mut bytes = Vec::new();
                    encode(&frame, &mut bytes);
                    // Corruption in transit, inside a batch's records.
                    if matches!(frame, Frame::Batch(_)) && rng.chance(3) {
                        let at = 17 + rng.below((bytes.len() - 17) as u64) as usize;
                        bytes[at] ^= 1 << rng.below(8);
                    }
                    to_appliance.push_back(bytes);
                }
            }
            // The appliance receives, verifies, lands and syncs.
            if let Some(l) = lander.as_mut() {
                while let Some(bytes) = to_appliance.pop_front() {
                    let (frame, _) = decode(&bytes).expect("framing is not corrupted");
                    match frame {
                        Frame::Hello(h) => {
                            if let Ok(info) = l.handle_hello(&h) {
                                known_job.get_or_insert(info.clone());
                                l.handle_job_known(info);
                            }
                        }
                        Frame::Batch(b) => {
                            let got = l.handle_batch(&b).unwrap();
                            let mut at = 0;
                            for i in 0..got.count {
                                let (h, len) = verify_stored(&b.records[at..]).unwrap();
                                assert_eq!(
                                    h.seq.0,
                                    landed.len() as u64 + 1,
                                    "seed {seed}: seq skipped or repeated (batch +{i})"
                                );
                                let original = &source[(h.seq.0 - 1) as usize];
                                assert_eq!(&b.records[at..at + len], &original[..], "seed {seed}");
                                landed.push(b.records[at..at + len].to_vec());
                                at += len;
                            }
                            assert_eq!(at, got.bytes);
                        }
                        other => l.handle_frame(other).unwrap(),
                    }
                }
                if rng.chance(40) {
                    landing_durable = landed.len();
                    l.handle_durable(Seq(landing_durable as u64));
                }
                while let Some(frame) = l.poll_transmit() {
                    let mut bytes = Vec::new();
                    encode(&frame, &mut bytes);
                    to_agent.push_back(bytes);
                }
            }
            while let Some(bytes) = to_agent.pop_front() {
                let (frame, _) = decode(&bytes).unwrap();
                if let Frame::Ack(seq) = frame {
                    assert!(
                        seq.0 <= landing_durable as u64,
                        "seed {seed}: ack {seq} beyond the landing journal's durable seq"
                    );
                }
                shipper
                    .handle_frame(frame)
                    .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
                assert!(
                    shipper.acked_seq() >= highest_ack,
                    "seed {seed}: ack went back"
                );
                highest_ack = shipper.acked_seq();
            }
        }
        assert_eq!(
            landing_durable as u64, total,
            "seed {seed}: did not converge"
        );
        assert_eq!(
            shipper.acked_seq(),
            Seq(total),
            "seed {seed}: not all acked"
        );
        for (i, record) in landed.iter().enumerate() {
            assert_eq!(record, &source[i], "seed {seed}: record {} differs", i + 1);
        }
    }

    #[test]
    fn simulation_converges_with_faults() {
        let base = std::env::var("CDP_SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0x5eed);
        for i in 0..24 {
            let seed = base + i;
            eprintln!("simulating seed {seed} (CDP_SIM_SEED={seed} reproduces it)");
            simulate(seed);
        }
    }

    fn hello_for(durable: u64, first: u64) -> Hello {
        let j = job();
        Hello {
            version: WIRE_VERSION,
            job: j.job,
            job_name: j.job_name,
            generation: j.generation,
            mode: j.mode,
            head_seq: Seq(durable),
            durable_seq: Seq(durable),
            first_seq: Seq(first),
            disks: j.disks,
        }
    }

    /// A hello against a landing state gives this refusal code, or a welcome.
    fn check_hello(state: LandingState, hello: Hello, expected: Option<RefuseCode>) {
        let mut lander = Lander::new(state);
        let got = lander.handle_hello(&hello).err().map(|r| r.code);
        assert_eq!(got, expected);
    }

    #[test]
    fn hellos_are_refused_for_mismatches() {
        let state = |head: u64| LandingState {
            job: Some(job()),
            head: Seq(head),
            durable: Seq(head),
            applied: Seq(head),
        };
        check_hello(state(10), hello_for(20, 1), None);
        check_hello(state(10), hello_for(20, 11), None);
        check_hello(state(10), hello_for(20, 12), Some(RefuseCode::Gap));
        check_hello(state(30), hello_for(20, 1), Some(RefuseCode::Generation));
        let mut other_gen = hello_for(20, 1);
        other_gen.generation = Generation(2);
        check_hello(state(10), other_gen, Some(RefuseCode::Generation));
        let mut bigger = hello_for(20, 1);
        bigger.disks[0].size_bytes += 4096;
        check_hello(state(10), bigger, Some(RefuseCode::JobMismatch));
        let mut future = hello_for(20, 1);
        future.version = WIRE_VERSION + 1;
        check_hello(state(10), future, Some(RefuseCode::Version));
    }

    #[test]
    fn shipper_never_ships_beyond_durable_and_rejects_stray_acks() {
        let mut s = Shipper::new(ShipperConfig::default(), job(), Seq(1), Seq(5), Seq(3));
        s.handle_connected();
        assert!(matches!(s.poll_transmit(), Some(Frame::Hello(_))));
        s.handle_frame(Frame::Welcome(Welcome {
            version: WIRE_VERSION,
            landing_durable_seq: Seq(0),
            applied_seq: Seq(0),
        }))
        .unwrap();
        let req = s.poll_read().unwrap();
        assert_eq!((req.from, req.to_max), (Seq(1), Seq(3)));
        assert_eq!(
            s.handle_frame(Frame::Ack(Seq(1))),
            Err(ShipError::SeqOutOfWindow {
                what: "ack",
                seq: Seq(1),
                acked: Seq(0),
                shipped: Seq(0),
            })
        );
        // An appliance that claims more than the agent ever made durable is refused.
        let mut s = Shipper::new(ShipperConfig::default(), job(), Seq(1), Seq(5), Seq(3));
        s.handle_connected();
        let err = s.handle_frame(Frame::Welcome(Welcome {
            version: WIRE_VERSION,
            landing_durable_seq: Seq(4),
            applied_seq: Seq(0),
        }));
        assert_eq!(
            err,
            Err(ShipError::ApplianceAhead {
                landing: Seq(4),
                durable: Seq(3),
            })
        );
    }
}
