use std::path::{Path, PathBuf};

/// Why a stored entry was refused. Every case is handled the same way (the entry is
/// deleted and the context encoded again); the reason goes into the log line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Corrupt {
    #[error("shorter than an entry header")]
    Truncated,
    #[error("not an ape KV entry (bad magic bytes)")]
    NotAnEntry,
    #[error("written in format version {0}, this build reads version {FORMAT_VERSION}", FORMAT_VERSION = crate::entry::FORMAT_VERSION)]
    Version(u32),
    #[error("stored with another KV data type")]
    Dtype,
    #[error("stored under another key")]
    Key,
    #[error("encoded by another model file")]
    Model,
    #[error("layer or head shape does not match the model")]
    Shape,
    #[error("{found} bytes where the header implies {expected}")]
    Length { expected: usize, found: usize },
    #[error("checksum mismatch")]
    Checksum,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Redis at {url}: {source}. Check that the server is running and the URL (redis://host:port/db) is right")]
    Redis {
        url: String,
        source: redis::RedisError,
    },
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

pub type Result<T> = std::result::Result<T, StoreError>;
