//! Wall-clock time as an injected dependency, so token expiry can be tested by moving a
//! manual clock instead of sleeping. Seconds are the resolution: expiry times are whole
//! Unix seconds in the bundle and on disk.
//!
//! Nothing else in the crate may read the system clock directly.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

pub use rustls_pki_types::UnixTime;

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> UnixTime;
}

/// The operating system's real-time clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixTime {
        UnixTime::now()
    }
}

/// A clock that moves only when told to, for tests and the simulator.
#[derive(Debug)]
pub struct ManualClock {
    unix_s: AtomicU64,
}

impl ManualClock {
    /// A clock standing at `now`.
    pub fn new(now: UnixTime) -> Self {
        Self {
            unix_s: AtomicU64::new(now.as_secs()),
        }
    }

    /// Moves the clock forward by `by` (whole seconds; the fraction is dropped).
    pub fn advance(&self, by: Duration) {
        self.unix_s.fetch_add(by.as_secs(), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(self.unix_s.load(Ordering::SeqCst)))
    }
}
