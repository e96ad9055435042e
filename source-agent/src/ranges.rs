//! Per-disk range locks that keep the journal's order and the backing disk's order the same
//! for overlapping writes: a write holds its byte range from before its journal append until
//! its backing write is done, so of two overlapping writes the one with the lower seq always
//! reaches the disk first, and replaying the journal reproduces the disk exactly.
//!
//! Non-overlapping writes never wait for each other. Reads take no lock.

use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The ranges held on one disk.
#[derive(Debug, Default)]
pub struct RangeLocks {
    /// Half-open `[start, end)` ranges currently held, with the id of their holder.
    held: Mutex<Vec<(u64, u64, u64)>>,
    next_id: std::sync::atomic::AtomicU64,
    released: Notify,
}

/// A held range; dropping it releases the range and wakes waiters.
#[derive(Debug)]
pub struct RangeGuard {
    locks: Arc<RangeLocks>,
    id: u64,
}

impl RangeLocks {
    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub async fn lock(self: &Arc<Self>, start: u64, end: u64) -> RangeGuard {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before checking, so a release between the check and the await is
            // not missed.
            released.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                if !held.iter().any(|&(s, e, _)| s < end && start < e) {
                    held.push((start, end, id));
                    return RangeGuard {
                        locks: Arc::clone(self),
                        id,
                    };
                }
            }
            released.await;
        }
    }

    /// Number of ranges held (for tests).
    pub fn held(&self) -> usize {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|&(_, _, id)| id != self.id);
        drop(held);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn overlapping_ranges_wait_disjoint_ones_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let first = locks.lock(0, 4096).await;
        let _disjoint = locks.lock(4096, 8192).await;
        let waiter = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move {
                let _g = locks.lock(4000, 4001).await;
            })
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        assert_eq!(locks.held(), 2);
        drop(first);
        waiter.await.unwrap();
        assert_eq!(locks.held(), 1);
    }
}
