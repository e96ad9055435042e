//! The replication wire protocol as pure codecs: the frames an agent and an appliance
//! exchange on their QUIC stream, `encode` into bytes and `decode` from bytes.
//!
//! Layout byte by byte in `docs/wire-protocol.md`. Record batches carry records exactly as
//! the journal stores them; this module checks only the framing, never trusts a length it has
//! not bounded, and never panics on any input. Verifying the records inside a batch is the
//! lander's job ([`crate::ship`]).

use crate::record::RECORD_BYTES_MAX;
use crate::types::{DiskId, Generation, JobId, Seq};

/// The four bytes a `Hello` starts with, so that a stray client is told apart at once.
pub const WIRE_MAGIC: [u8; 4] = *b"CDPW";
/// The protocol version this code speaks.
pub const WIRE_VERSION: u16 = 1;
/// Bytes of a frame's length prefix.
pub const FRAME_PREFIX_BYTES: usize = 4;
/// Largest frame body (type byte included) a peer may send: one batch holding the largest
/// record, plus the batch header. Anything longer is refused before it is buffered.
pub const FRAME_BODY_BYTES_MAX: usize = RECORD_BYTES_MAX + 64;
/// Longest job or disk name, in bytes of UTF-8.
pub const NAME_BYTES_MAX: usize = 255;
/// Most disks in one job.
pub const DISKS_MAX: usize = 256;
/// Longest refusal message, in bytes of UTF-8.
pub const MESSAGE_BYTES_MAX: usize = 1024;

const TYPE_HELLO: u8 = 1;
const TYPE_WELCOME: u8 = 2;
const TYPE_REFUSE: u8 = 3;
const TYPE_BATCH: u8 = 4;
const TYPE_ACK: u8 = 5;
const TYPE_HEARTBEAT: u8 = 6;
const TYPE_RESEND: u8 = 7;
const TYPE_CHECKPOINT_REQUEST: u8 = 8;
const TYPE_RESYNC_NEED: u8 = 9;
const TYPE_CONTROL: u8 = 10;
const TYPE_AGENT_STATUS: u8 = 11;
/// Longest status reason, in bytes of UTF-8.
pub const REASON_BYTES_MAX: usize = 512;

/// How the agent acknowledges its client's writes (the job's replication mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// A write is acknowledged once it is in the agent's journal.
    Async,
    /// A write is acknowledged only once the appliance holds it durably (RPO 0).
    Sync,
}

/// One disk of the job as the agent announces it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// The disk's id within the job; stable for the job's life.
    pub disk: DiskId,
    /// The disk's name (the NBD export name on the agent).
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
}

/// Agent → appliance, first frame of a connection: who it is and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version the agent speaks.
    pub version: u16,
    /// The job (consistency group) this stream carries.
    pub job: JobId,
    /// The job's human name.
    pub job_name: String,
    /// Generation the agent writes.
    pub generation: Generation,
    /// Replication mode.
    pub mode: Mode,
    /// Highest seq in the agent's journal.
    pub head_seq: Seq,
    /// Highest seq durable in the agent's journal; only records up to it are ever shipped.
    pub durable_seq: Seq,
    /// Oldest seq the agent still holds (everything below was trimmed).
    pub first_seq: Seq,
    /// The job's disks.
    pub disks: Vec<DiskInfo>,
}

/// Appliance → agent: the hello is accepted; stream from `landing_durable_seq + 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// Protocol version the appliance will speak on this connection.
    pub version: u16,
    /// Highest seq durable in the appliance's landing journal for this job.
    pub landing_durable_seq: Seq,
    /// Highest seq applied to the replica disks.
    pub applied_seq: Seq,
}

/// Why an appliance refused a hello; the byte values are part of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefuseCode {
    /// The agent speaks a version the appliance does not.
    Version,
    /// The hello contradicts what the appliance knows of the job (disks, sizes).
    JobMismatch,
    /// The generations disagree in a way that needs an operator (split brain).
    Generation,
    /// The agent no longer holds the seqs the appliance needs next: a resync is required.
    Gap,
    /// Another connection already carries this job.
    Busy,
    /// The appliance failed internally; the message says how.
    Internal,
}

/// Appliance → agent: the connection is refused; the appliance closes it next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refuse {
    /// Why.
    pub code: RefuseCode,
    /// For the operator's log.
    pub message: String,
}

/// Agent → appliance: records `first_seq ..= last_seq()` exactly as stored in the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Seq of the first record in `records`.
    pub first_seq: Seq,
    /// Number of records in `records`. Invariant (checked by the decoder): at least one.
    pub count: u32,
    /// The records back to back, as the journal stores them.
    pub records: Vec<u8>,
}

impl Batch {
    /// Seq of the last record of the batch.
    pub fn last_seq(&self) -> Seq {
        Seq(self
            .first_seq
            .0
            .saturating_add(u64::from(self.count).saturating_sub(1)))
    }
}

/// Agent → appliance, periodically: the agent's view of its lag, on its own clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The agent's clock when it sent this, in microseconds since the Unix epoch.
    pub sent_at_micros: u64,
    /// Highest seq in the agent's journal.
    pub head_seq: Seq,
    /// Age of the oldest write not yet durable at the appliance, in microseconds.
    pub rpo_micros: u64,
    /// Records not yet acknowledged.
    pub lag_records: u64,
    /// Stored bytes not yet acknowledged.
    pub lag_bytes: u64,
}

/// Why the appliance asks for records again; the byte values are part of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResendReason {
    /// A record failed its checksum or could not be decoded.
    Corrupt,
    /// A batch did not start where the previous one ended.
    Gap,
}

/// Appliance → agent: discard what is in flight from `from_seq` on and send it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resend {
    /// First seq to send again; every earlier one is landed.
    pub from_seq: Seq,
    /// Why.
    pub reason: ResendReason,
}

/// Appliance → agent: an operator asked for a checkpoint. The agent runs its consistency hook
/// when asked (and configured), appends a `Checkpoint` record whose mark
/// (`crate::mark::CheckpointMark`) carries `request_id`, and ships it like any record: the
/// checkpoint is the record's seq, ordered with the writes around it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointRequest {
    /// Chosen by the appliance; echoed in the record's mark.
    pub request_id: u64,
    /// Run the agent's consistency hook first (e.g. a guest fsfreeze).
    pub app_consistent: bool,
    /// Operator tags (at most `mark::CHECKPOINT_TAGS_MAX`, each 1 to
    /// `mark::CHECKPOINT_TAG_BYTES_MAX` bytes).
    pub tags: Vec<String>,
}

/// Appliance → agent: the answer to a `Resync` hashes record (`crate::resync::ResyncMark`):
/// which of its blocks the replica, at exactly that record's seq, holds differently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncNeed {
    /// Seq of the hashes record answered.
    pub hashes_seq: Seq,
    /// Blocks the record described.
    pub count: u32,
    /// Bit `i` (byte `i / 8`, bit `i % 8`) set: block `i` differs and must be sent.
    /// Exactly `count.div_ceil(8)` bytes; bits past `count` are zero.
    pub differing: Vec<u8>,
}

impl ResyncNeed {
    /// Whether block `i` differs.
    pub fn differs(&self, i: u32) -> bool {
        i < self.count
            && self
                .differing
                .get((i / 8) as usize)
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }
}

/// Appliance → agent, after the welcome and whenever an operator changes them: how the job
/// may use the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Control {
    /// Replication is paused: ship nothing until resumed (the agent journals, and past its
    /// backlog bound tracks dirty regions, as during an outage).
    pub paused: bool,
    /// Stored record bytes per second the job may ship; 0 = no limit.
    pub throttle_bytes_per_second: u64,
}

/// A job's replication state as the agent sees it; the byte values are part of the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    /// A new job copies its disks (only differing blocks).
    Syncing,
    /// Every write is journalled and shipped.
    Replicating,
    /// Past the backlog bound or during a long outage: writes are not journalled, only their
    /// regions are marked dirty (crash-safely), to be resynced.
    Ahead,
    /// Dirty regions are being compared and their differing blocks sent.
    Resyncing,
    /// An operator paused the job.
    Paused,
    /// Replication cannot go on until an operator acts; the reason says why.
    Error,
}

impl JobState {
    /// Every state, for metrics.
    pub const ALL: [JobState; 6] = [
        JobState::Syncing,
        JobState::Replicating,
        JobState::Ahead,
        JobState::Resyncing,
        JobState::Paused,
        JobState::Error,
    ];

    /// The state's name in metrics, logs and the API.
    pub fn name(self) -> &'static str {
        match self {
            JobState::Syncing => "syncing",
            JobState::Replicating => "replicating",
            JobState::Ahead => "ahead",
            JobState::Resyncing => "resyncing",
            JobState::Paused => "paused",
            JobState::Error => "error",
        }
    }

    fn to_byte(self) -> u8 {
        match self {
            JobState::Syncing => 1,
            JobState::Replicating => 2,
            JobState::Ahead => 3,
            JobState::Resyncing => 4,
            JobState::Paused => 5,
            JobState::Error => 6,
        }
    }

    fn from_byte(byte: u8) -> Option<JobState> {
        JobState::ALL.into_iter().find(|s| s.to_byte() == byte)
    }
}

/// Agent → appliance, on every change and with every heartbeat: the job's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentStatus {
    /// The state.
    pub state: JobState,
    /// Bytes of dirty regions compared so far in the current (re)sync.
    pub resync_done_bytes: u64,
    /// Bytes of dirty regions the current (re)sync compares.
    pub resync_total_bytes: u64,
    /// Bytes of regions marked dirty now.
    pub dirty_bytes: u64,
    /// Why the job is in this state (empty when there is nothing to say).
    pub reason: String,
}

/// Every frame of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`Welcome`].
    Welcome(Welcome),
    /// See [`Refuse`].
    Refuse(Refuse),
    /// See [`Batch`].
    Batch(Batch),
    /// Appliance → agent: every seq up to this one is durable in the landing journal.
    Ack(Seq),
    /// See [`Heartbeat`].
    Heartbeat(Heartbeat),
    /// See [`Resend`].
    Resend(Resend),
    /// See [`CheckpointRequest`].
    CheckpointRequest(CheckpointRequest),
    /// See [`ResyncNeed`].
    ResyncNeed(ResyncNeed),
    /// See [`Control`].
    Control(Control),
    /// See [`AgentStatus`].
    AgentStatus(AgentStatus),
}

/// Why bytes could not be decoded into a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes are a valid prefix; at least `needed` bytes in all are required.
    #[error("incomplete frame: {needed} bytes needed")]
    Incomplete {
        /// Total bytes needed from the start of the frame (a lower bound).
        needed: usize,
    },
    /// The bytes can never become a valid frame; the connection must be closed.
    #[error("invalid frame: {0}")]
    Invalid(&'static str),
}

/// Encodes `frame`, appending its bytes (length prefix included) to `out`.
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_PREFIX_BYTES]);
    match frame {
        Frame::Hello(h) => {
            out.push(TYPE_HELLO);
            out.extend_from_slice(&WIRE_MAGIC);
            out.extend_from_slice(&h.version.to_le_bytes());
            out.push(match h.mode {
                Mode::Async => 0,
                Mode::Sync => 1,
            });
            out.push(0);
            out.extend_from_slice(&h.job.0);
            out.extend_from_slice(&h.generation.0.to_le_bytes());
            for seq in [h.head_seq, h.durable_seq, h.first_seq] {
                out.extend_from_slice(&seq.0.to_le_bytes());
            }
            put_str(out, &h.job_name, NAME_BYTES_MAX);
            let disks = &h.disks[..h.disks.len().min(DISKS_MAX)];
            out.extend_from_slice(&(disks.len() as u16).to_le_bytes());
            for d in disks {
                out.extend_from_slice(&d.disk.0.to_le_bytes());
                out.extend_from_slice(&d.size_bytes.to_le_bytes());
                put_str(out, &d.name, NAME_BYTES_MAX);
            }
        }
        Frame::Welcome(w) => {
            out.push(TYPE_WELCOME);
            out.extend_from_slice(&w.version.to_le_bytes());
            out.extend_from_slice(&w.landing_durable_seq.0.to_le_bytes());
            out.extend_from_slice(&w.applied_seq.0.to_le_bytes());
        }
        Frame::Refuse(r) => {
            out.push(TYPE_REFUSE);
            out.extend_from_slice(&refuse_code_to_u16(r.code).to_le_bytes());
            put_str(out, &r.message, MESSAGE_BYTES_MAX);
        }
        Frame::Batch(b) => {
            out.push(TYPE_BATCH);
            out.extend_from_slice(&b.first_seq.0.to_le_bytes());
            out.extend_from_slice(&b.count.to_le_bytes());
            out.extend_from_slice(&b.records);
        }
        Frame::Ack(seq) => {
            out.push(TYPE_ACK);
            out.extend_from_slice(&seq.0.to_le_bytes());
        }
        Frame::Heartbeat(h) => {
            out.push(TYPE_HEARTBEAT);
            for v in [
                h.sent_at_micros,
                h.head_seq.0,
                h.rpo_micros,
                h.lag_records,
                h.lag_bytes,
            ] {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        Frame::CheckpointRequest(c) => {
            out.push(TYPE_CHECKPOINT_REQUEST);
            out.extend_from_slice(&c.request_id.to_le_bytes());
            out.push(u8::from(c.app_consistent));
            let tags = &c.tags[..c.tags.len().min(crate::mark::CHECKPOINT_TAGS_MAX)];
            out.push(tags.len() as u8);
            for tag in tags {
                put_str(out, tag, crate::mark::CHECKPOINT_TAG_BYTES_MAX);
            }
        }
        Frame::ResyncNeed(n) => {
            out.push(TYPE_RESYNC_NEED);
            out.extend_from_slice(&n.hashes_seq.0.to_le_bytes());
            out.extend_from_slice(&n.count.to_le_bytes());
            let len = (n.count as usize).div_ceil(8);
            let mut bits = n.differing.clone();
            bits.resize(len, 0);
            if n.count % 8 != 0 {
                if let Some(last) = bits.last_mut() {
                    *last &= (1u8 << (n.count % 8)) - 1;
                }
            }
            out.extend_from_slice(&bits);
        }
        Frame::Control(c) => {
            out.push(TYPE_CONTROL);
            out.push(u8::from(c.paused));
            out.extend_from_slice(&c.throttle_bytes_per_second.to_le_bytes());
        }
        Frame::AgentStatus(a) => {
            out.push(TYPE_AGENT_STATUS);
            out.push(a.state.to_byte());
            for v in [a.resync_done_bytes, a.resync_total_bytes, a.dirty_bytes] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            put_str(out, &a.reason, REASON_BYTES_MAX);
        }
        Frame::Resend(r) => {
            out.push(TYPE_RESEND);
            out.extend_from_slice(&r.from_seq.0.to_le_bytes());
            out.push(match r.reason {
                ResendReason::Corrupt => 1,
                ResendReason::Gap => 2,
            });
        }
    }
    // A batch is built by the shipper within FRAME_BODY_BYTES_MAX, every other frame is a
    // few hundred bytes at most, so the body length always fits the u32 prefix.
    let body = (out.len() - start - FRAME_PREFIX_BYTES) as u32;
    out[start..start + FRAME_PREFIX_BYTES].copy_from_slice(&body.to_le_bytes());
}

/// Decodes one frame from the start of `bytes`; returns it and how many bytes it took.
pub fn decode(bytes: &[u8]) -> Result<(Frame, usize), DecodeError> {
    let Some(prefix) = bytes.get(..FRAME_PREFIX_BYTES) else {
        return Err(DecodeError::Incomplete {
            needed: FRAME_PREFIX_BYTES,
        });
    };
    let body_len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if body_len == 0 {
        return Err(DecodeError::Invalid("empty frame"));
    }
    if body_len > FRAME_BODY_BYTES_MAX {
        return Err(DecodeError::Invalid(
            "frame longer than the protocol allows",
        ));
    }
    let total = FRAME_PREFIX_BYTES + body_len;
    let Some(body) = bytes.get(FRAME_PREFIX_BYTES..total) else {
        return Err(DecodeError::Incomplete { needed: total });
    };
    let mut r = Reader { bytes: &body[1..] };
    let frame = match body[0] {
        TYPE_HELLO => {
            if r.take(4)? != WIRE_MAGIC {
                return Err(DecodeError::Invalid("hello without the protocol's magic"));
            }
            let version = r.u16()?;
            let mode = match r.u8()? {
                0 => Mode::Async,
                1 => Mode::Sync,
                _ => return Err(DecodeError::Invalid("unknown replication mode")),
            };
            if r.u8()? != 0 {
                return Err(DecodeError::Invalid("reserved hello byte is not zero"));
            }
            let mut job = [0u8; 16];
            job.copy_from_slice(r.take(16)?);
            let generation = Generation(r.u64()?);
            let head_seq = Seq(r.u64()?);
            let durable_seq = Seq(r.u64()?);
            let first_seq = Seq(r.u64()?);
            if durable_seq > head_seq || head_seq > Seq::MAX {
                return Err(DecodeError::Invalid("hello seqs out of order"));
            }
            let job_name = r.str(NAME_BYTES_MAX)?;
            let count = usize::from(r.u16()?);
            if count > DISKS_MAX {
                return Err(DecodeError::Invalid("too many disks"));
            }
            let mut disks = Vec::with_capacity(count);
            for _ in 0..count {
                let disk = DiskId(r.u32()?);
                let size_bytes = r.u64()?;
                let name = r.str(NAME_BYTES_MAX)?;
                disks.push(DiskInfo {
                    disk,
                    name,
                    size_bytes,
                });
            }
            Frame::Hello(Hello {
                version,
                job: JobId(job),
                job_name,
                generation,
                mode,
                head_seq,
                durable_seq,
                first_seq,
                disks,
            })
        }
        TYPE_WELCOME => Frame::Welcome(Welcome {
            version: r.u16()?,
            landing_durable_seq: Seq(r.u64()?),
            applied_seq: Seq(r.u64()?),
        }),
        TYPE_REFUSE => {
            let code = refuse_code_from_u16(r.u16()?)
                .ok_or(DecodeError::Invalid("unknown refusal code"))?;
            let message = r.str(MESSAGE_BYTES_MAX)?;
            Frame::Refuse(Refuse { code, message })
        }
        TYPE_BATCH => {
            let first_seq = Seq(r.u64()?);
            let count = r.u32()?;
            if count == 0 {
                return Err(DecodeError::Invalid("empty batch"));
            }
            if first_seq < Seq::FIRST || first_seq.0.saturating_add(u64::from(count)) > Seq::MAX.0 {
                return Err(DecodeError::Invalid("batch seqs out of range"));
            }
            let records = r.rest().to_vec();
            Frame::Batch(Batch {
                first_seq,
                count,
                records,
            })
        }
        TYPE_ACK => Frame::Ack(Seq(r.u64()?)),
        TYPE_HEARTBEAT => Frame::Heartbeat(Heartbeat {
            sent_at_micros: r.u64()?,
            head_seq: Seq(r.u64()?),
            rpo_micros: r.u64()?,
            lag_records: r.u64()?,
            lag_bytes: r.u64()?,
        }),
        TYPE_RESEND => {
            let from_seq = Seq(r.u64()?);
            let reason = match r.u8()? {
                1 => ResendReason::Corrupt,
                2 => ResendReason::Gap,
                _ => return Err(DecodeError::Invalid("unknown resend reason")),
            };
            Frame::Resend(Resend { from_seq, reason })
        }
        TYPE_CHECKPOINT_REQUEST => {
            let request_id = r.u64()?;
            let app_consistent = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::Invalid("unknown checkpoint flags")),
            };
            let count = usize::from(r.u8()?);
            if count > crate::mark::CHECKPOINT_TAGS_MAX {
                return Err(DecodeError::Invalid("too many checkpoint tags"));
            }
            let mut tags = Vec::with_capacity(count);
            for _ in 0..count {
                let tag = r.str(crate::mark::CHECKPOINT_TAG_BYTES_MAX)?;
                if tag.is_empty() {
                    return Err(DecodeError::Invalid("empty checkpoint tag"));
                }
                tags.push(tag);
            }
            Frame::CheckpointRequest(CheckpointRequest {
                request_id,
                app_consistent,
                tags,
            })
        }
        TYPE_RESYNC_NEED => {
            let hashes_seq = Seq(r.u64()?);
            let count = r.u32()?;
            if count == 0 || count > crate::resync::RESYNC_HASHES_MAX {
                return Err(DecodeError::Invalid("resync need block count out of range"));
            }
            let differing = r.take((count as usize).div_ceil(8))?.to_vec();
            if count % 8 != 0 && differing.last().is_some_and(|b| b >> (count % 8) != 0) {
                return Err(DecodeError::Invalid("resync need sets bits past its count"));
            }
            Frame::ResyncNeed(ResyncNeed {
                hashes_seq,
                count,
                differing,
            })
        }
        TYPE_CONTROL => {
            let paused = match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(DecodeError::Invalid("unknown pause flag")),
            };
            Frame::Control(Control {
                paused,
                throttle_bytes_per_second: r.u64()?,
            })
        }
        TYPE_AGENT_STATUS => {
            let state =
                JobState::from_byte(r.u8()?).ok_or(DecodeError::Invalid("unknown job state"))?;
            let resync_done_bytes = r.u64()?;
            let resync_total_bytes = r.u64()?;
            let dirty_bytes = r.u64()?;
            let reason = r.str(REASON_BYTES_MAX)?;
            Frame::AgentStatus(AgentStatus {
                state,
                resync_done_bytes,
                resync_total_bytes,
                dirty_bytes,
                reason,
            })
        }
        _ => return Err(DecodeError::Invalid("unknown frame type")),
    };
    if !r.bytes.is_empty() {
        return Err(DecodeError::Invalid("trailing bytes in frame"));
    }
    Ok((frame, total))
}

fn refuse_code_to_u16(code: RefuseCode) -> u16 {
    match code {
        RefuseCode::Version => 1,
        RefuseCode::JobMismatch => 2,
        RefuseCode::Generation => 3,
        RefuseCode::Gap => 4,
        RefuseCode::Busy => 5,
        RefuseCode::Internal => 6,
    }
}

fn refuse_code_from_u16(code: u16) -> Option<RefuseCode> {
    Some(match code {
        1 => RefuseCode::Version,
        2 => RefuseCode::JobMismatch,
        3 => RefuseCode::Generation,
        4 => RefuseCode::Gap,
        5 => RefuseCode::Busy,
        6 => RefuseCode::Internal,
        _ => return None,
    })
}

/// Writes a u16 length and at most `max` bytes of `s`, cut at a character boundary.
fn put_str(out: &mut Vec<u8>, s: &str, max: usize) {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// Reads fields from a frame body whose length is already known to be complete, so running
/// out of bytes means the frame is malformed, not incomplete.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Invalid("frame shorter than its fields"));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }

    fn str(&mut self, max: usize) -> Result<String, DecodeError> {
        let len = usize::from(self.u16()?);
        if len > max {
            return Err(DecodeError::Invalid("name or message too long"));
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError::Invalid("text is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use proptest::prelude::*;

    fn hello() -> Hello {
        Hello {
            version: WIRE_VERSION,
            job: JobId([7; 16]),
            job_name: "erp-db".into(),
            generation: Generation(3),
            mode: Mode::Sync,
            head_seq: Seq(90),
            durable_seq: Seq(88),
            first_seq: Seq(10),
            disks: vec![
                DiskInfo {
                    disk: DiskId(0),
                    name: "os".into(),
                    size_bytes: 8 << 30,
                },
                DiskInfo {
                    disk: DiskId(1),
                    name: "data".into(),
                    size_bytes: 1 << 40,
                },
            ],
        }
    }

    fn every_frame() -> Vec<Frame> {
        vec![
            Frame::Hello(hello()),
            Frame::Welcome(Welcome {
                version: WIRE_VERSION,
                landing_durable_seq: Seq(77),
                applied_seq: Seq(70),
            }),
            Frame::Refuse(Refuse {
                code: RefuseCode::Gap,
                message: "seq 5 was trimmed by the agent".into(),
            }),
            Frame::Batch(Batch {
                first_seq: Seq(5),
                count: 2,
                records: vec![1, 2, 3, 4, 5],
            }),
            Frame::Ack(Seq(9)),
            Frame::Heartbeat(Heartbeat {
                sent_at_micros: 1_700_000_000_000_000,
                head_seq: Seq(12),
                rpo_micros: 1500,
                lag_records: 3,
                lag_bytes: 12288,
            }),
            Frame::Resend(Resend {
                from_seq: Seq(6),
                reason: ResendReason::Corrupt,
            }),
            Frame::CheckpointRequest(CheckpointRequest {
                request_id: 0xfeed,
                app_consistent: true,
                tags: vec!["before-upgrade".into(), "ü".into()],
            }),
            Frame::ResyncNeed(ResyncNeed {
                hashes_seq: Seq(44),
                count: 11,
                differing: vec![0b1000_0001, 0b0000_0100],
            }),
            Frame::Control(Control {
                paused: true,
                throttle_bytes_per_second: 10 << 20,
            }),
            Frame::AgentStatus(AgentStatus {
                state: JobState::Resyncing,
                resync_done_bytes: 1 << 20,
                resync_total_bytes: 4 << 20,
                dirty_bytes: 3 << 20,
                reason: "after tracking".into(),
            }),
        ]
    }

    #[test]
    fn resync_need_names_exactly_its_bits() {
        let need = ResyncNeed {
            hashes_seq: Seq(1),
            count: 11,
            differing: vec![0b1000_0001, 0b0000_0100],
        };
        let differing: Vec<u32> = (0..16).filter(|&i| need.differs(i)).collect();
        assert_eq!(differing, vec![0, 7, 10]);
        // A bit past the count is refused.
        let mut bytes = Vec::new();
        encode(&Frame::ResyncNeed(need), &mut bytes);
        *bytes.last_mut().unwrap() |= 0b1000_0000;
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::Invalid("resync need sets bits past its count"))
        );
    }

    /// Decoding `bytes` gives `expected`: a frame and its length, or an error.
    fn check(bytes: &[u8], expected: Result<(Frame, usize), DecodeError>) {
        assert_eq!(decode(bytes), expected, "bytes: {bytes:02x?}");
    }

    #[test]
    fn every_frame_round_trips_and_every_prefix_is_incomplete() {
        for frame in every_frame() {
            let mut bytes = Vec::new();
            encode(&frame, &mut bytes);
            check(&bytes, Ok((frame.clone(), bytes.len())));
            for cut in 0..bytes.len() {
                assert!(
                    matches!(decode(&bytes[..cut]), Err(DecodeError::Incomplete { .. })),
                    "{frame:?} cut at {cut}"
                );
            }
            // Two frames back to back: the first decode takes exactly the first.
            let mut two = bytes.clone();
            encode(&Frame::Ack(Seq(1)), &mut two);
            assert_eq!(decode(&two).unwrap().1, bytes.len());
        }
    }

    #[test]
    fn malformed_frames_are_invalid() {
        let invalid = |what| Err(DecodeError::Invalid(what));
        check(&[0, 0, 0, 0], invalid("empty frame"));
        check(&[1, 0, 0, 0, 99], invalid("unknown frame type"));
        let huge = (FRAME_BODY_BYTES_MAX as u32 + 1).to_le_bytes();
        check(&huge, invalid("frame longer than the protocol allows"));
        // An ack with a byte too many, and one with a byte too few.
        check(
            &[10, 0, 0, 0, TYPE_ACK, 1, 0, 0, 0, 0, 0, 0, 0, 0],
            invalid("trailing bytes in frame"),
        );
        check(
            &[8, 0, 0, 0, TYPE_ACK, 1, 0, 0, 0, 0, 0, 0],
            invalid("frame shorter than its fields"),
        );
        // A batch of zero records.
        let mut b = vec![13, 0, 0, 0, TYPE_BATCH];
        b.extend_from_slice(&5u64.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        check(&b, invalid("empty batch"));
        // A hello from something that is not a cdp agent.
        let mut bytes = Vec::new();
        encode(&Frame::Hello(hello()), &mut bytes);
        bytes[5] = b'X';
        check(&bytes, invalid("hello without the protocol's magic"));
    }

    #[test]
    fn hello_with_durable_past_head_is_invalid() {
        let mut h = hello();
        h.durable_seq = Seq(91);
        let mut bytes = Vec::new();
        encode(&Frame::Hello(h), &mut bytes);
        check(&bytes, Err(DecodeError::Invalid("hello seqs out of order")));
    }

    #[test]
    fn overlong_names_are_cut_at_a_character_boundary() {
        let mut h = hello();
        h.job_name = "é".repeat(200); // 400 bytes
        let mut bytes = Vec::new();
        encode(&Frame::Hello(h), &mut bytes);
        let Ok((Frame::Hello(back), _)) = decode(&bytes) else {
            panic!("hello did not decode");
        };
        assert_eq!(back.job_name, "é".repeat(127));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn flipped_bytes_never_panic(index in 0usize..400, bit in 0u8..8) {
            for frame in every_frame() {
                let mut bytes = Vec::new();
                encode(&frame, &mut bytes);
                let i = index % bytes.len();
                bytes[i] ^= 1 << bit;
                let _ = decode(&bytes);
            }
        }
    }
}
