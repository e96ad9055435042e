//! Moves replication frames (`journal::wire`) over one QUIC stream: [`FrameSender`] encodes
//! and writes them, [`FrameReceiver`] reads bytes until `wire::decode` yields a whole frame.
//! The protocol decisions stay in the sans-IO machines of `journal::ship`; this file only
//! moves bytes.
//!
//! Must never: buffer more than one frame's worth of bytes for a peer (the decoder refuses a
//! length prefix above `FRAME_BODY_BYTES_MAX` before anything is buffered), or hand out a
//! frame that did not decode completely.
//!
//! Fault injection for tests of the lander's verification: [`Fault::CorruptBatches`] flips
//! one bit inside the records of every n-th batch after it is encoded, which is what a fault
//! between the agent's journal and the appliance's verifier looks like. TLS protects the real
//! wire, so this is the only place such a fault can be made.

use journal::wire::{self, DecodeError, Frame, FRAME_BODY_BYTES_MAX, FRAME_PREFIX_BYTES};

use crate::quic::{ReadError, RecvStream, SendStream, WriteError};

/// Bytes asked of the stream per read.
const READ_CHUNK_BYTES: usize = 256 << 10;
/// Offset of a batch's first record inside its encoded frame: prefix, type, seq, count.
const BATCH_RECORDS_AT: usize = FRAME_PREFIX_BYTES + 1 + 8 + 4;

/// Why a frame could not be moved.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Writing to the stream failed (the connection is gone or the peer stopped reading).
    #[error("sending a frame: {0}")]
    Write(#[from] WriteError),
    /// Reading from the stream failed.
    #[error("receiving a frame: {0}")]
    Read(#[from] ReadError),
    /// The peer sent bytes that can never be a valid frame.
    #[error("peer sent an invalid frame: {0}")]
    Invalid(&'static str),
    /// The peer finished its stream in the middle of a frame.
    #[error("peer closed its stream inside a frame ({buffered} bytes of it received)")]
    Truncated {
        /// Bytes of the unfinished frame.
        buffered: usize,
    },
}

/// A fault the sender injects (tests only; see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Flip one bit in the records of every `every`-th batch (`every` ≥ 1).
    CorruptBatches {
        /// Period, in batches.
        every: u64,
    },
}

impl Fault {
    /// The fault named by the environment variable `CDP_FAULT_CORRUPT_BATCHES=N`, if set to
    /// a positive number. Drivers log loudly when one is active.
    pub fn from_env() -> Option<Fault> {
        std::env::var("CDP_FAULT_CORRUPT_BATCHES")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|&every| every > 0)
            .map(|every| Fault::CorruptBatches { every })
    }
}

/// The sending half: encodes frames into one reused buffer and writes them.
#[derive(Debug)]
pub struct FrameSender {
    send: SendStream,
    buf: Vec<u8>,
    fault: Option<Fault>,
    batches: u64,
    /// Frame bytes written (length prefixes included).
    sent_bytes: u64,
}

impl FrameSender {
    /// Frames onto `send`.
    pub fn new(send: SendStream, fault: Option<Fault>) -> Self {
        Self {
            send,
            buf: Vec::new(),
            fault,
            batches: 0,
            sent_bytes: 0,
        }
    }

    /// Encodes and writes `frame`; returns when the stream took every byte (QUIC flow
    /// control makes this wait when the peer is slow).
    pub async fn send(&mut self, frame: &Frame) -> Result<(), FrameError> {
        self.buf.clear();
        wire::encode(frame, &mut self.buf);
        if let (Frame::Batch(_), Some(Fault::CorruptBatches { every })) = (frame, self.fault) {
            self.batches += 1;
            if self.batches.is_multiple_of(every) && self.buf.len() > BATCH_RECORDS_AT {
                let span = (self.buf.len() - BATCH_RECORDS_AT) as u64;
                let at = BATCH_RECORDS_AT + (self.batches.wrapping_mul(7919) % span) as usize;
                self.buf[at] ^= 1 << (self.batches % 8);
                tracing::warn!(
                    batch = self.batches,
                    at,
                    "fault injection: corrupted a batch in transit"
                );
            }
        }
        self.send.write_all(&self.buf).await?;
        self.sent_bytes += self.buf.len() as u64;
        // Keep a large buffer from staying allocated after a rare large record.
        if self.buf.capacity() > 4 << 20 {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Frame bytes written so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes
    }

    /// Ends the stream after what was written.
    pub fn finish(&mut self) {
        // Finishing an already finished or reset stream is harmless here: the connection
        // is being torn down either way.
        let _ = self.send.finish();
    }
}

/// The receiving half: reads until a whole frame decodes.
#[derive(Debug)]
pub struct FrameReceiver {
    recv: RecvStream,
    /// Received bytes; `buf[start..]` are not yet decoded. Invariant: the undecoded part is
    /// at most one frame (`FRAME_PREFIX_BYTES + FRAME_BODY_BYTES_MAX`) plus one read chunk,
    /// and every byte in it came from the stream.
    buf: Vec<u8>,
    start: usize,
    received_bytes: u64,
}

impl FrameReceiver {
    /// Frames from `recv`.
    pub fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            buf: Vec::new(),
            start: 0,
            received_bytes: 0,
        }
    }

    /// The next frame; `None` when the peer finished its stream between frames. Cancel-safe:
    /// dropping the future loses nothing, the next call goes on where it stopped.
    pub async fn recv(&mut self) -> Result<Option<Frame>, FrameError> {
        loop {
            match wire::decode(&self.buf[self.start..]) {
                Ok((frame, used)) => {
                    self.start += used;
                    self.received_bytes += used as u64;
                    return Ok(Some(frame));
                }
                Err(DecodeError::Invalid(why)) => return Err(FrameError::Invalid(why)),
                Err(DecodeError::Incomplete { .. }) => {}
            }
            // Move the undecoded tail to the front before growing the buffer.
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            // `read_chunk` consumes nothing until it returns data, and the buffer changes
            // only after it returned: a `recv` cancelled here (it runs inside `select!`)
            // loses no byte and leaves no garbage behind.
            match self.recv.read_chunk(READ_CHUNK_BYTES, true).await? {
                Some(chunk) => self.buf.extend_from_slice(&chunk.bytes),
                None => {
                    return if self.buf.is_empty() {
                        Ok(None)
                    } else {
                        Err(FrameError::Truncated {
                            buffered: self.buf.len(),
                        })
                    };
                }
            }
            if self.buf.capacity() > 2 * (FRAME_PREFIX_BYTES + FRAME_BODY_BYTES_MAX) {
                self.buf
                    .shrink_to(FRAME_PREFIX_BYTES + FRAME_BODY_BYTES_MAX);
            }
        }
    }

    /// Frame bytes decoded so far.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes
    }
}
