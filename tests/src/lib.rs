//! Harness for the end-to-end tests: finds the built binaries, starts `cdp-agent` (or the
//! reference `qemu-nbd`) on loopback and Unix sockets, drives it with real NBD clients
//! (`qemu-io`, `qemu-img`, `nbdcopy`, `nbdinfo`, fio, `nbdfuse` + a loop device), and checks
//! what the agent journaled by replaying it; starts the `cdp-receiver` appliance, pairs agents
//! with it and checks what it landed, applied and reports; puts the two on either side of an
//! impaired link (network namespaces, `tc tbf`, nftables drops, a delaying UDP relay).
//! Tests live in `tests/tests/`.
//!
//! Environment: `CDP_BIN_DIR` (where `cdp-agent` is; default `$CARGO_TARGET_DIR/debug`, see
//! [`bin_dir`]), `CDP_TEST_SEED` (replays a randomised scenario; each prints its seed),
//! `CDP_KEEP_TMP=1` (keeps the agent's data dir, backing files, journal and log, and the
//! appliance's data dir and log).
//!
//! Must never: leave a process, a mount or a loop device behind, wait without a deadline,
//! sleep hoping something happened (it polls with a deadline), or skip a test because a tool
//! or a privilege is missing (it fails and says which; `scripts/install-test-deps` installs
//! the tools).

pub mod agent;
pub mod appliance;
pub mod clients;
pub mod cmd;
pub mod image;
pub mod metrics;
pub mod mount;
pub mod netns;
pub mod qemu_nbd;
pub mod raw_nbd;
pub mod rng;
pub mod workload;

pub use agent::{
    bin_dir, binary, temp_dir, Agent, AgentBuilder, Disk, Listeners, DEFAULT_DISK_BYTES,
};
pub use appliance::{
    progress, wait_drained, Appliance, ApplianceBuilder, ApplianceListeners, Progress,
};
pub use clients::{export_can, export_size, export_to_file, file_to_export, QemuIo};
pub use cmd::{poll_until, Output, Tool};
pub use image::{assert_same_content, blake3_file, compare_files, create_sparse, Model};
pub use metrics::{scrape, Metrics};
pub use netns::{NetPair, RelayStats, Side, UdpRelay};
pub use qemu_nbd::QemuNbd;
pub use rng::Rng;
pub use workload::{Op, Source};

/// One KiB.
pub const KIB: u64 = 1024;
/// One MiB.
pub const MIB: u64 = 1024 * 1024;
