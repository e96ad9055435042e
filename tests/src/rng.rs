//! A small seeded random generator (SplitMix64) for the randomised scenarios, so that a failure
//! is replayed by setting `CDP_TEST_SEED`. Not for anything that needs real randomness.
//!
//! Must never: draw a seed silently. Every seed in use is printed with the command that
//! reproduces it.

use std::time::{SystemTime, UNIX_EPOCH};

/// SplitMix64: tiny, fast, and good enough to spread offsets and sizes.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    /// A generator starting from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator for `test`, seeded from `CDP_TEST_SEED` or the clock; prints the seed.
    pub fn for_test(test: &str) -> Self {
        let seed = match std::env::var("CDP_TEST_SEED") {
            Ok(s) => match s.trim().parse() {
                Ok(seed) => seed,
                Err(_) => panic!("CDP_TEST_SEED={s:?} is not a u64"),
            },
            Err(_) => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed),
        };
        eprintln!("{test}: seed {seed}; reproduce with CDP_TEST_SEED={seed} cargo test -p cdp-tests {test}");
        Self::new(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..bound` (`bound > 0`); the tiny modulo bias does not matter here.
    pub fn below(&mut self, bound: u64) -> u64 {
        assert!(bound > 0, "Rng::below(0)");
        self.next_u64() % bound
    }

    /// A value in `low..=high`.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        assert!(low <= high, "Rng::range({low}, {high})");
        low + self.below(high - low + 1)
    }

    /// A byte that is not zero, so a written range is told apart from a hole.
    pub fn nonzero_byte(&mut self) -> u8 {
        (self.below(255) + 1) as u8
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
