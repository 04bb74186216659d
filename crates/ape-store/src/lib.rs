//! ape-store: where encoded contexts live between requests and between processes.
//!
//! A stored context is addressed by a [`Key`], a digest of the model file, the prefix it
//! was encoded after, its tokens, the KV data type and the format version. Entries live in
//! tiers behind one trait, [`Tier`]: [`MemoryTier`] (an LRU bounded by bytes),
//! [`DiskTier`] (the embedded default, a cache folder) and [`RedisTier`] (shared by
//! several servers). A [`Store`] reads through its tiers in order, promotes what it finds
//! to the tiers before, and writes new entries to all of them. It is the engine's
//! [`ape_core::engine::ContextStore`].
//!
//! [`register`] encodes documents into a store ahead of the questions; [`verify`] reads and
//! checks every entry of a tier.
//!
//! A damaged entry (truncated, bit-flipped, another format version, another model) is
//! never used: it is reported in a log line, deleted, and the engine encodes the context
//! again.

#![warn(missing_docs)]

mod disk;
mod entry;
mod error;
mod memory;
mod redis_tier;
mod register;
mod store;
mod verify;

pub use disk::DiskTier;
pub use entry::{Codec, Entry, Fingerprint, Key, KvDtype};
pub use error::{Corrupt, Result, StoreError};
pub use memory::MemoryTier;
pub use redis_tier::RedisTier;
pub use register::{register, Registered, Registration};
pub use store::{Store, TierStats};
pub use verify::{verify, Verified};

/// One place entries can be kept.
pub trait Tier: Send + Sync {
    /// `memory`, `disk` or `redis`: for logs and statistics.
    fn name(&self) -> &'static str;
    /// Whether what it holds outlives the process: a context is stored only once every
    /// durable tier holds it.
    fn durable(&self) -> bool {
        true
    }
    /// The entry under `key`, if this tier has it. A damaged entry is
    /// `Err(StoreError::Corrupt)`.
    fn get(&self, key: &Key) -> Result<Option<Entry>>;
    /// Keep `entry` under `key`; storing a key that is already there changes nothing.
    fn put(&self, key: &Key, entry: &Entry) -> Result<()>;
    /// The bytes stored under `key`, read but not checked, so that [`verify`] can check
    /// them without the model that wrote them; `None` in the memory tier, which keeps
    /// entries decoded.
    fn stored_bytes(&self, key: &Key) -> Result<Option<Vec<u8>>>;
    /// Whether this tier holds an entry under `key` (not read, not checked).
    fn holds(&self, key: &Key) -> Result<bool>;
    /// Delete the entry under `key`; whether there was one.
    fn remove(&self, key: &Key) -> Result<bool>;
    /// Every entry's key and size.
    fn list(&self) -> Result<Vec<Listed>>;
    /// Delete least recently used entries until at most `max_bytes` remain (0 clears the
    /// tier); returns how many were deleted.
    fn prune(&self, max_bytes: u64) -> Result<usize>;
}

/// An entry as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The key the entry is stored under.
    pub key: Key,
    /// Bytes it takes in the tier: encoded on disk or in Redis, decoded in memory.
    pub bytes: u64,
    /// The context's length, where the tier knows it without reading the entry.
    pub tokens: Option<usize>,
}
