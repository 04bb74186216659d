//! The memory tier: decoded entries kept in the process, least recently used evicted first
//! once their bytes pass the budget.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::entry::{Entry, Key};
use crate::error::Result;
use crate::{Listed, Tier};

pub struct MemoryTier {
    budget: usize,
    state: Mutex<Lru>,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<Key, (Entry, u64)>,
    bytes: usize,
    clock: u64,
}

impl Lru {
    /// Drop least recently used entries until at most `limit` bytes remain; returns how
    /// many went.
    fn evict_down_to(&mut self, limit: usize) -> usize {
        let mut removed = 0;
        while self.bytes > limit {
            let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(key, _)| *key)
            else {
                break;
            };
            let (evicted, _) = self.entries.remove(&oldest).unwrap();
            self.bytes -= evicted.memory_bytes();
            removed += 1;
        }
        removed
    }
}

impl MemoryTier {
    /// Keeps at most `budget` bytes of entries (an entry larger than that is not kept).
    pub fn new(budget: usize) -> Self {
        MemoryTier {
            budget,
            state: Mutex::new(Lru::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
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
        Ok(lru.entries.get_mut(key).map(|(entry, used)| {
            *used = now;
            entry.clone()
        }))
    }

    fn put(&self, key: &Key, entry: &Entry) -> Result<()> {
        let size = entry.memory_bytes();
        if size > self.budget {
            return Ok(());
        }
        let mut lru = self.lock();
        lru.clock += 1;
        let now = lru.clock;
        if let Some((_, used)) = lru.entries.get_mut(key) {
            *used = now;
            return Ok(());
        }
        lru.evict_down_to(self.budget - size);
        lru.entries.insert(*key, (entry.clone(), now));
        lru.bytes += size;
        Ok(())
    }

    fn holds(&self, key: &Key) -> Result<bool> {
        Ok(self.lock().entries.contains_key(key))
    }

    fn remove(&self, key: &Key) -> Result<bool> {
        let mut lru = self.lock();
        match lru.entries.remove(key) {
            Some((entry, _)) => {
                lru.bytes -= entry.memory_bytes();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn list(&self) -> Result<Vec<Listed>> {
        Ok(self
            .lock()
            .entries
            .iter()
            .map(|(key, (entry, _))| Listed {
                key: *key,
                bytes: entry.memory_bytes() as u64,
                tokens: Some(entry.tokens.len()),
            })
            .collect())
    }

    fn prune(&self, max_bytes: u64) -> Result<usize> {
        let limit = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        Ok(self.lock().evict_down_to(limit))
    }
}
