//! The context store of an evaluation run: contexts encoded once are reused by every mode,
//! every APE setting of a sweep and every question that shares them (the demonstrations
//! of an ICL run), as a server's store would reuse them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ape_core::attention::KvCache;
use ape_core::engine::ContextStore;

/// Encoded contexts in memory, dropped all at once when they pass a byte budget.
pub struct RunStore {
    budget: usize,
    state: Mutex<Kept>,
}

#[derive(Default)]
struct Kept {
    entries: HashMap<(Vec<u32>, Vec<u32>), Arc<KvCache>>,
    bytes: usize,
}

impl RunStore {
    /// An empty store of at most `budget` bytes of encoded contexts (keys and values): a
    /// context that would pass the budget drops every context kept before it.
    pub fn new(budget: usize) -> Self {
        RunStore {
            budget,
            state: Mutex::new(Kept::default()),
        }
    }

    /// Forget every context (a new run's contexts will not repeat the last one's).
    pub fn clear(&self) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = Kept::default();
    }
}

impl ContextStore for RunStore {
    fn get(&self, prefix: &[u32], context: &[u32]) -> Option<Arc<KvCache>> {
        let kept = self.state.lock().unwrap_or_else(|e| e.into_inner());
        kept.entries
            .get(&(prefix.to_vec(), context.to_vec()))
            .cloned()
    }

    fn put(&self, prefix: &[u32], context: &[u32], kv: Arc<KvCache>) {
        let mut kept = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if kept.bytes + kv.bytes() > self.budget {
            *kept = Kept::default();
        }
        kept.bytes += kv.bytes();
        kept.entries.insert((prefix.to_vec(), context.to_vec()), kv);
    }
}
