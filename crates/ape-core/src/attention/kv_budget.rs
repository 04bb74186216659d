//! One budget for every key and value held in memory: each running request's own cache,
//! the contexts it encodes, and the caches kept for later requests (kept prompts, the
//! store's memory tier).
//!
//! A request charges what it will hold before it allocates it, and releases it by
//! dropping its [`Charge`]. A kept cache charges each entry it keeps, only if it fits at
//! that moment, and gives entries up when a request needs room (least recently used
//! first, never one a running request reads: dropping that would free nothing). A request
//! that cannot fit even after the kept caches gave way is refused ([`Error::KvMemoryBusy`],
//! to try again later), never left to run the machine out of memory. A cache shared by
//! several requests (a stored context, a kept prefix) is charged once, by the cache that
//! keeps it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::error::{Error, Result};

/// Share of the memory available at start that the default budget takes: the rest is
/// left to the weights' pages, activations and the rest of the machine.
const DEFAULT_SHARE_OF_AVAILABLE: f64 = 0.5;

/// Budget when the available memory cannot be read.
const FALLBACK_BYTES: usize = 2 << 30;

/// A cache whose entries can be dropped to make room for a running request.
pub trait Evict: Send + Sync {
    /// Drop entries no running request reads, least recently used first, until at least
    /// `bytes` of charges are released or none such is left; the bytes released.
    fn release(&self, bytes: usize) -> usize;
}

/// The bytes of keys and values the process may hold at once, what is charged against
/// them now, and the caches that give entries up when a request needs room.
pub struct KvBudget {
    limit: usize,
    used: AtomicUsize,
    caches: Mutex<Vec<Weak<dyn Evict>>>,
}

/// Bytes charged to a budget, released when dropped.
pub struct Charge {
    budget: Arc<KvBudget>,
    bytes: usize,
}

impl Charge {
    /// Bytes this charge holds, given back to the budget when it is dropped.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Charge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Charge({} bytes)", self.bytes)
    }
}

impl KvBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Arc<KvBudget> {
        Arc::new(KvBudget {
            limit,
            used: AtomicUsize::new(0),
            caches: Mutex::new(Vec::new()),
        })
    }

    /// Half of the memory the machine has available now (`MemAvailable`), or 2 GiB
    /// where that cannot be read.
    pub(crate) fn for_machine() -> Arc<KvBudget> {
        let available = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
                let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib * 1024)
            });
        let limit = available.map_or(FALLBACK_BYTES, |bytes| {
            (bytes as f64 * DEFAULT_SHARE_OF_AVAILABLE) as usize
        });
        KvBudget::new(limit)
    }

    /// The budget's size in bytes, fixed when it was made.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Bytes charged now, by running requests and kept caches together.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    /// Ask `cache` to give entries up when a request needs room, for as long as it lives.
    pub fn register(&self, cache: Weak<dyn Evict>) {
        let mut caches = self.caches.lock().unwrap_or_else(|e| e.into_inner());
        caches.retain(|c| c.strong_count() > 0);
        caches.push(cache);
    }

    /// `bytes` charged if they fit now, without asking any cache to give way: how a kept
    /// cache charges an entry.
    pub fn try_charge(self: &Arc<Self>, bytes: usize) -> Option<Charge> {
        self.used
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(bytes).filter(|&after| after <= self.limit)
            })
            .ok()
            .map(|_| Charge {
                budget: self.clone(),
                bytes,
            })
    }

    /// `bytes` charged for a running request, the kept caches giving entries up when
    /// that makes room.
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Result<Charge> {
        if bytes > self.limit {
            return Err(Error::KvMemoryTooSmall {
                needed: bytes,
                limit: self.limit,
            });
        }
        if let Some(charge) = self.try_charge(bytes) {
            return Ok(charge);
        }
        let caches: Vec<Arc<dyn Evict>> = {
            let caches = self.caches.lock().unwrap_or_else(|e| e.into_inner());
            caches.iter().filter_map(Weak::upgrade).collect()
        };
        for cache in caches {
            let short = (self.used() + bytes).saturating_sub(self.limit);
            if short == 0 {
                break;
            }
            cache.release(short);
        }
        self.try_charge(bytes).ok_or_else(|| Error::KvMemoryBusy {
            needed: bytes,
            free: self.limit.saturating_sub(self.used()),
            limit: self.limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of charged entries, the oldest first; an entry in `in_use` is never given up.
    struct Kept {
        budget: Arc<KvBudget>,
        entries: Mutex<Vec<(usize, Charge)>>,
        in_use: usize,
    }

    impl Evict for Kept {
        fn release(&self, bytes: usize) -> usize {
            let mut entries = self.entries.lock().unwrap();
            let mut released = 0;
            while released < bytes {
                let Some(at) = entries.iter().position(|(id, _)| *id != self.in_use) else {
                    break;
                };
                released += entries.remove(at).1.bytes();
            }
            released
        }
    }

    #[test]
    fn a_request_takes_room_from_kept_entries_no_one_reads_and_is_refused_beyond() {
        let budget = KvBudget::new(1000);
        let kept = Arc::new(Kept {
            budget: budget.clone(),
            entries: Mutex::new(Vec::new()),
            in_use: 1,
        });
        budget.register(Arc::downgrade(&kept) as Weak<dyn Evict>);
        for id in 0..4 {
            let charge = kept.budget.try_charge(200).expect("room for four entries");
            kept.entries.lock().unwrap().push((id, charge));
        }
        assert!(
            kept.budget.try_charge(300).is_none(),
            "a cache never pushes out"
        );
        let running = budget.charge(500).expect("entries 0 and 2 give way");
        let left: Vec<usize> = kept.entries.lock().unwrap().iter().map(|e| e.0).collect();
        assert_eq!(left, [1, 3]);
        assert_eq!(budget.used(), 900);
        let busy = budget.charge(400).unwrap_err();
        assert!(
            matches!(busy, Error::KvMemoryBusy { free: 300, .. }),
            "{busy}"
        );
        assert_eq!(kept.entries.lock().unwrap().len(), 1, "entry 3 gave way");
        assert!(matches!(
            budget.charge(1001),
            Err(Error::KvMemoryTooSmall { .. })
        ));
        drop(running);
        assert_eq!(budget.used(), 200, "what the request held is free again");
        assert!(budget.charge(800).is_ok());
    }
}
