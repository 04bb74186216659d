use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ape_core::attention::KvCache;
use ape_core::engine::ContextStore;

use crate::entry::{Codec, Entry, Key, KvDtype};
use crate::error::StoreError;
use crate::Tier;

/// Tiers read in order (memory, then disk, then Redis, as given) and written together.
pub struct Store {
    /// Makes each context's key; with a dtype other than f16, what is stored is first
    /// rounded through it, so that every tier gives back the same values.
    pub(crate) codec: Codec,
    tiers: Vec<Box<dyn Tier>>,
    stats: Vec<TierStats>,
}

/// Lookups answered and not answered by one tier since the store was opened.
#[derive(Debug, Default)]
pub struct TierStats {
    /// The tier's [`Tier::name`].
    pub name: &'static str,
    /// Lookups this tier answered with a sound entry.
    pub hits: AtomicU64,
    /// Lookups that reached this tier and found no sound entry there (none, a damaged one
    /// or an unreadable one).
    pub misses: AtomicU64,
    /// Entries found damaged and deleted.
    pub corrupt: AtomicU64,
}

impl Store {
    /// A store keying entries with `codec`, over `tiers` in the order they are to be read
    /// (the fastest first). The tiers that encode entries should have been opened with the
    /// same codec.
    pub fn new(codec: Codec, tiers: Vec<Box<dyn Tier>>) -> Self {
        let stats = tiers
            .iter()
            .map(|t| TierStats {
                name: t.name(),
                ..TierStats::default()
            })
            .collect();
        Store {
            codec,
            tiers,
            stats,
        }
    }

    /// The tiers, in reading order.
    pub fn tiers(&self) -> &[Box<dyn Tier>] {
        &self.tiers
    }

    /// Each tier's counts, in the order of [`Store::tiers`].
    pub fn stats(&self) -> &[TierStats] {
        &self.stats
    }

    /// The entry under `key` from the first tier that has a sound one; it is then copied
    /// into the tiers before that one. Damaged entries found on the way are deleted.
    pub fn lookup(&self, key: &Key) -> Option<Entry> {
        for (i, tier) in self.tiers.iter().enumerate() {
            match tier.get(key) {
                Ok(Some(entry)) => {
                    self.stats[i].hits.fetch_add(1, Ordering::Relaxed);
                    for earlier in &self.tiers[..i] {
                        self.report(earlier.put(key, &entry), earlier.as_ref(), key);
                    }
                    return Some(entry);
                }
                Ok(None) => {}
                Err(StoreError::Corrupt(reason)) => {
                    self.stats[i].corrupt.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "{} tier: entry {key} is damaged ({reason}); deleting it, the context will be encoded again",
                        tier.name()
                    );
                    self.report(tier.remove(key).map(|_| ()), tier.as_ref(), key);
                }
                Err(e @ StoreError::Io { .. }) => {
                    // An entry the process cannot read (a folder in its place, a file it
                    // may not open) would otherwise be encoded again on every request and
                    // never replaced.
                    tracing::warn!(
                        "{} tier: cannot read entry {key}: {e}; deleting it, the context will be encoded again",
                        tier.name()
                    );
                    self.report(tier.remove(key).map(|_| ()), tier.as_ref(), key);
                }
                Err(e) => tracing::warn!("{} tier: cannot read entry {key}: {e}", tier.name()),
            }
            self.stats[i].misses.fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    /// The durable tiers (all but memory) which do not hold `key`: after
    /// a context was stored, where its write failed. Each comes with why, fit for a client
    /// (no paths).
    pub fn missing_from_durable(&self, key: &Key) -> Vec<String> {
        self.tiers
            .iter()
            .filter(|tier| tier.durable())
            .filter_map(|tier| match tier.holds(key) {
                Ok(true) => None,
                Ok(false) => Some(format!("the {} tier (see the log)", tier.name())),
                Err(e) => Some(format!("the {} tier ({})", tier.name(), e.for_clients())),
            })
            .collect()
    }

    /// Write `entry` to every tier.
    pub fn save(&self, key: &Key, entry: &Entry) {
        for tier in &self.tiers {
            self.report(tier.put(key, entry), tier.as_ref(), key);
        }
    }

    fn report(&self, result: crate::Result<()>, tier: &dyn Tier, key: &Key) {
        if let Err(e) = result {
            tracing::warn!("{} tier: cannot update entry {key}: {e}", tier.name());
        }
    }
}

impl ContextStore for Store {
    fn get(&self, prefix: &[u32], context: &[u32]) -> Option<Arc<KvCache>> {
        let entry = self.lookup(&self.codec.key(prefix, context))?;
        // The key already commits to these; a mismatch would mean a digest collision.
        (entry.prefix_len == prefix.len() && entry.tokens == context).then_some(entry.kv)
    }

    fn put(&self, prefix: &[u32], context: &[u32], kv: Arc<KvCache>) {
        let key = self.codec.key(prefix, context);
        let mut entry = Entry {
            prefix_len: prefix.len(),
            tokens: context.to_vec(),
            kv,
        };
        if self.codec.dtype != KvDtype::F16 {
            // Keep in memory what the other tiers will give back, so that an answer does
            // not depend on which tier it was served from.
            match self.codec.decode(&key, &self.codec.encode(&key, &entry)) {
                Ok(rounded) => entry = rounded,
                Err(e) => return tracing::warn!("cannot store entry {key}: {e}"),
            }
        }
        self.save(&key, &entry);
    }
}
