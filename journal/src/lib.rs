//! The sequenced write journal: cdp's one ordered, self-verifying log of writes.
//!
//! A pure library: no async runtime, no network, no database, and it never reads the clock
//! (timestamps are parameters). It must never return a byte it has not verified.
