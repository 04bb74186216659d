//! Prompts whose keys and values are kept for later requests that start the same way:
//! prefixes (a system prompt, the turns before a question over documents) and whole
//! conversations after plain generation. Each entry is charged to the engine's KV budget
//! and kept only while it fits; the least recently used give way to running requests.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use crate::attention::{Charge, Evict, KvBudget, KvCache};

/// Most prompts kept: a lookup compares a prompt with each.
const KEPT_PROMPTS: usize = 8;

pub(crate) struct KeptPrompts {
    budget: Arc<KvBudget>,
    /// Most recently used last.
    entries: Mutex<Vec<Kept>>,
}

struct Kept {
    tokens: Vec<u32>,
    kv: Arc<KvCache>,
    _charge: Charge,
}

impl KeptPrompts {
    /// An empty store of prompts charged to `budget`, which may ask it to give entries up.
    pub(crate) fn new(budget: Arc<KvBudget>) -> Arc<KeptPrompts> {
        let kept = Arc::new(KeptPrompts {
            budget: budget.clone(),
            entries: Mutex::new(Vec::new()),
        });
        budget.register(Arc::downgrade(&kept) as Weak<dyn Evict>);
        kept
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Kept>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The keys and values kept for exactly `tokens`.
    pub(crate) fn exact(&self, tokens: &[u32]) -> Option<Arc<KvCache>> {
        let mut entries = self.lock();
        let at = entries.iter().position(|e| e.tokens == tokens)?;
        let entry = entries.remove(at);
        let kv = entry.kv.clone();
        entries.push(entry);
        Some(kv)
    }

    /// The kept prompt sharing the longest start with `prompt`, and how many tokens they
    /// share (at most `limit`); `None` when none shares any.
    pub(crate) fn longest_shared(
        &self,
        prompt: &[u32],
        limit: usize,
    ) -> Option<(Arc<KvCache>, usize)> {
        let mut entries = self.lock();
        let shared = |tokens: &[u32]| {
            let n = tokens
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count();
            n.min(limit)
        };
        let (n, at) = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (shared(&e.tokens), i))
            .max()?;
        if n == 0 {
            return None;
        }
        let entry = entries.remove(at);
        let kv = entry.kv.clone();
        entries.push(entry);
        Some((kv, n))
    }

    /// Keep `kv`, the keys and values of `tokens`, if the budget has room for it once the
    /// least recently used entries no request reads have given way.
    pub(crate) fn keep(&self, tokens: Vec<u32>, kv: Arc<KvCache>) {
        let mut entries = self.lock();
        entries.retain(|e| e.tokens != tokens);
        let bytes = kv.bytes();
        let charge = self.budget.try_charge(bytes).or_else(|| {
            release_unused(&mut entries, bytes);
            self.budget.try_charge(bytes)
        });
        // Running requests hold the budget: this prompt is read again when it comes back.
        let Some(charge) = charge else {
            return;
        };
        entries.push(Kept {
            tokens,
            kv,
            _charge: charge,
        });
        while entries.len() > KEPT_PROMPTS {
            entries.remove(0);
        }
    }
}

impl Evict for KeptPrompts {
    fn release(&self, bytes: usize) -> usize {
        release_unused(&mut self.lock(), bytes)
    }
}

/// Drop the least recently used entries that no request holds until `bytes` are released
/// or none is left; the bytes released.
fn release_unused(entries: &mut Vec<Kept>, bytes: usize) -> usize {
    let mut released = 0;
    while released < bytes {
        let Some(at) = entries.iter().position(|e| Arc::strong_count(&e.kv) == 1) else {
            break;
        };
        released += entries.remove(at).kv.bytes();
    }
    released
}
