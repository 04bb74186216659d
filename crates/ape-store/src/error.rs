use std::path::{Path, PathBuf};

/// Why a stored entry was refused. Every case is handled the same way (the entry is
/// deleted and the context encoded again); the reason goes into the log line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    /// Fewer bytes than a header and a checksum: a write cut short, or an emptied file.
    #[error("shorter than an entry header")]
    Truncated,
    /// The bytes do not begin with the entry format's magic: something else was stored
    /// under the entry's name.
    #[error("not an ape KV entry (bad magic bytes)")]
    NotAnEntry,
    /// Written by a build with another format version of entries, the one held here.
    #[error("written in format version {0}, this build reads version {FORMAT_VERSION}", FORMAT_VERSION = crate::entry::FORMAT_VERSION)]
    Version(u32),
    /// The header's KV data type is unknown, or not the one the reader stores.
    #[error("stored with another KV data type")]
    Dtype,
    /// The header names another key than the one the bytes were read under: an entry
    /// renamed, or copied under another name.
    #[error("stored under another key")]
    Key,
    /// Written for a model file whose fingerprint is not the reader's.
    #[error("encoded by another model file")]
    Model,
    /// The header's layer count, KV head count or head dimension is not the reader's
    /// model's.
    #[error("layer or head shape does not match the model")]
    Shape,
    /// The entry's size is not the one its header implies: cut short, or with bytes added.
    #[error("{found} bytes where the header implies {expected}")]
    Length {
        /// Bytes the header implies; `usize::MAX` when they would not fit in memory.
        expected: usize,
        /// Bytes actually stored.
        found: usize,
    },
    /// The BLAKE3 checksum does not match the bytes: they changed after being written.
    #[error("checksum mismatch")]
    Checksum,
}

/// Why an operation of the store or of one of its tiers failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file or folder could not be created, read, written or removed: in the disk
    /// tier's folder, or the model file read for its fingerprint. Check the path's
    /// permissions and the free space.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder the operation was on.
        path: PathBuf,
        /// What the operating system answered.
        source: std::io::Error,
    },
    /// The Redis URL is malformed, or Redis did not answer or refused a command; after a
    /// failed connection the tier fails at once for a second before it tries again.
    #[error("Redis at {url}: {source}. Check that the server is running and the URL (redis://host:port/db) is right")]
    Redis {
        /// The URL the tier was given, any password in it replaced by `***` (clients get
        /// [`StoreError::for_clients`], which leaves out the address too).
        url: String,
        /// The Redis client's error.
        source: redis::RedisError,
    },
    /// A stored entry was refused; [`Store::lookup`](crate::Store::lookup) deletes such an
    /// entry, so that the context is encoded again.
    #[error("corrupt entry: {0}")]
    Corrupt(#[from] Corrupt),
}

impl StoreError {
    /// The error as a client of a server may see it: what failed, without the server's
    /// file paths or Redis address (log the full error instead).
    pub fn for_clients(&self) -> String {
        match self {
            StoreError::Io { source, .. } => format!("a file of the store failed: {source}"),
            StoreError::Redis { .. } => "the Redis tier is unreachable or failed".to_string(),
            StoreError::Corrupt(corrupt) => format!("corrupt entry: {corrupt}"),
        }
    }

    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The result of an operation of the store, failing with a [`StoreError`].
pub type Result<T> = std::result::Result<T, StoreError>;
