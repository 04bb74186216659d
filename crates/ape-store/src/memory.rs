//! The memory tier: decoded entries kept in the process, each charged to the engine's KV
//! budget, which running requests share; the least recently used go first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use ape_core::attention::{Charge, Evict, KvBudget};

use crate::entry::{Entry, Key};
use crate::error::Result;
use crate::{Listed, Tier};

/// Decoded entries kept in this process, charged to the engine's KV budget; nothing
/// survives the process.
pub struct MemoryTier {
    held: Arc<Held>,
}

/// The entries, each charged to the KV budget, which may ask for them back.
struct Held {
    budget: Arc<KvBudget>,
    state: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<Key, Kept>,
    clock: u64,
}

struct Kept {
    entry: Entry,
    used: u64,
    _charge: Charge,
}

impl Lru {
    /// Drop least recently used entries until at most `limit` bytes remain; returns how
    /// many went.
    fn evict_down_to(&mut self, limit: usize) -> usize {
        let mut bytes: usize = self.entries.values().map(|k| k.entry.memory_bytes()).sum();
        let mut removed = 0;
        while bytes > limit {
            let Some(oldest) = self.least_recently_used(|_| true) else {
                break;
            };
            bytes -= self.entries.remove(&oldest).unwrap().entry.memory_bytes();
            removed += 1;
        }
        removed
    }

    /// Drop the least recently used entries no request reads (dropping one that is read
    /// frees nothing) until `bytes` are released or none is left; the bytes released.
    fn release_unused(&mut self, bytes: usize) -> usize {
        let mut released = 0;
        while released < bytes {
            let Some(oldest) = self.least_recently_used(|k| Arc::strong_count(&k.entry.kv) == 1)
            else {
                break;
            };
            released += self.entries.remove(&oldest).unwrap().entry.memory_bytes();
        }
        released
    }

    fn least_recently_used(&self, may_go: impl Fn(&Kept) -> bool) -> Option<Key> {
        self.entries
            .iter()
            .filter(|(_, kept)| may_go(kept))
            .min_by_key(|(_, kept)| kept.used)
            .map(|(key, _)| *key)
    }
}

impl Evict for Held {
    fn release(&self, bytes: usize) -> usize {
        self.lock().release_unused(bytes)
    }
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl MemoryTier {
    /// Keeps entries while `budget` has room for them (see [`KvBudget`]); the least
    /// recently used give way to newer entries and to running requests.
    pub fn new(budget: Arc<KvBudget>) -> Self {
        let held = Arc::new(Held {
            budget: budget.clone(),
            state: Mutex::new(Lru::default()),
        });
        budget.register(Arc::downgrade(&held) as Weak<dyn Evict>);
        MemoryTier { held }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.held.lock()
    }
}

impl Tier for MemoryTier {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn durable(&self) -> bool {
        false
    }

    fn stored_bytes(&self, _: &Key) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    fn get(&self, key: &Key) -> Result<Option<Entry>> {
        let mut lru = self.lock();
        lru.clock += 1;
        let now = lru.clock;
        Ok(lru.entries.get_mut(key).map(|kept| {
            kept.used = now;
            kept.entry.clone()
        }))
    }

    fn put(&self, key: &Key, entry: &Entry) -> Result<()> {
        let size = entry.memory_bytes();
        let budget = &self.held.budget;
        let mut lru = self.lock();
        lru.clock += 1;
        let now = lru.clock;
        if let Some(kept) = lru.entries.get_mut(key) {
            kept.used = now;
            return Ok(());
        }
        let charge = budget.try_charge(size).or_else(|| {
            lru.release_unused(size);
            budget.try_charge(size)
        });
        // Without room (running requests hold the budget) the entry is simply not kept
        // here; the tiers below still have it.
        if let Some(charge) = charge {
            let kept = Kept {
                entry: entry.clone(),
                used: now,
                _charge: charge,
            };
            lru.entries.insert(*key, kept);
        }
        Ok(())
    }

    fn holds(&self, key: &Key) -> Result<bool> {
        Ok(self.lock().entries.contains_key(key))
    }

    fn remove(&self, key: &Key) -> Result<bool> {
        Ok(self.lock().entries.remove(key).is_some())
    }

    fn list(&self) -> Result<Vec<Listed>> {
        Ok(self
            .lock()
            .entries
            .iter()
            .map(|(key, kept)| Listed {
                key: *key,
                bytes: kept.entry.memory_bytes() as u64,
                tokens: Some(kept.entry.tokens.len()),
            })
            .collect())
    }

    fn prune(&self, max_bytes: u64) -> Result<usize> {
        let limit = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        Ok(self.lock().evict_down_to(limit))
    }
}
