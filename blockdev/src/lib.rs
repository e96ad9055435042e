//! Block devices as cdp uses them on both sides: the agent's backing disks, the appliance's
//! replica disks, and the images `cdp-agent replay` rebuilds. One small trait
//! ([`BlockDevice`]) with a real implementation ([`FileDevice`]: a raw image file or a block
//! device) and an in-memory one with faults ([`MemDevice`]), and the one function that
//! applies a verified journal record to a device ([`apply_record`]), so the replay tool and
//! the appliance's applier cannot disagree on what a record means.
//!
//! Every method blocks: async callers go through `spawn_blocking`. Must never apply a record
//! outside the device (it is refused with an error naming the seq).

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod apply;
mod device;

pub use apply::{apply_record, ApplyError};
pub use device::{create_image, BlockDevice, Fault, FileDevice, MemDevice};
