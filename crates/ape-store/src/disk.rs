//! The disk tier, the embedded default: one file per entry in a cache folder.
//!
//! Writes go to a private temporary file that is synced and then renamed over the entry's
//! name, and the folder is synced after the rename (as SQLite and Redis' AOF do), so a
//! reader sees either no entry or a whole one, whatever crashes or races, and an entry
//! reported stored survives a power loss: two processes storing the same context both
//! succeed and leave one valid file. Reads map the
//! file and verify its checksum before decoding. A file's modification time records its
//! last use; with a size cap, the least recently used files go first.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::entry::{Codec, Entry, Key};
use crate::error::{Result, StoreError};
use crate::{Listed, Tier};

const ENTRY_EXTENSION: &str = "kv";

/// Temporary files older than this were left by a writer that died; they are removed.
const STALE_TEMPORARY: Duration = Duration::from_secs(3600);

/// Entries kept as files in a cache folder, shared by the processes that open the same
/// folder; optionally bounded in bytes, the least recently used files going first.
pub struct DiskTier {
    codec: Codec,
    entries: PathBuf,
    temporary: PathBuf,
    max_bytes: Option<u64>,
    writes: AtomicU64,
}

impl DiskTier {
    /// The cache in folder `root` (created if missing), kept under `max_bytes` if given.
    pub fn open(root: &Path, codec: Codec, max_bytes: Option<u64>) -> Result<Self> {
        let entries = root.join("entries");
        let temporary = root.join("tmp");
        for dir in [&entries, &temporary] {
            fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        }
        let tier = DiskTier {
            codec,
            entries,
            temporary,
            max_bytes,
            writes: AtomicU64::new(0),
        };
        tier.remove_stale_temporaries();
        Ok(tier)
    }

    fn path(&self, key: &Key) -> PathBuf {
        self.entries
            .join(format!("{}.{ENTRY_EXTENSION}", key.to_hex()))
    }

    fn remove_stale_temporaries(&self) {
        let Ok(listing) = fs::read_dir(&self.temporary) else {
            return;
        };
        for item in listing.flatten() {
            let old = item
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > STALE_TEMPORARY);
            if old {
                let _ = fs::remove_file(item.path());
            }
        }
    }

    /// Every entry file with its size and last use.
    fn files(&self) -> Result<Vec<(Key, u64, SystemTime)>> {
        let listing = fs::read_dir(&self.entries).map_err(|e| StoreError::io(&self.entries, e))?;
        let mut files = Vec::new();
        for item in listing.flatten() {
            let path = item.path();
            let key = path
                .file_stem()
                .and_then(|s| s.to_str())
                .filter(|_| path.extension().is_some_and(|e| e == ENTRY_EXTENSION))
                .and_then(Key::from_hex);
            let (Some(key), Ok(meta)) = (key, item.metadata()) else {
                continue;
            };
            files.push((
                key,
                meta.len(),
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            ));
        }
        Ok(files)
    }
}

impl Tier for DiskTier {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn get(&self, key: &Key) -> Result<Option<Entry>> {
        let path = self.path(key);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(&path, e)),
        };
        // SAFETY: entries are never written in place (only renamed into place), so the
        // mapped bytes do not change under us; a file replaced meanwhile stays mapped whole.
        let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| StoreError::io(&path, e))?;
        let entry = self.codec.decode(key, &bytes)?;
        // Record the use for eviction; failing to is harmless.
        let _ = file.set_modified(SystemTime::now());
        Ok(Some(entry))
    }

    fn stored_bytes(&self, key: &Key) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }

    fn put(&self, key: &Key, entry: &Entry) -> Result<()> {
        let path = self.path(key);
        if path.is_file() {
            return Ok(());
        }
        let temporary = self.temporary.join(format!(
            "{}.{}.{}.tmp",
            key.to_hex(),
            std::process::id(),
            self.writes.fetch_add(1, Ordering::Relaxed)
        ));
        let write = || -> std::io::Result<()> {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temporary)?;
            file.write_all(&self.codec.encode(key, entry))?;
            file.sync_all()?;
            fs::rename(&temporary, &path)?;
            // The rename is durable only once the directory holding the new name is.
            File::open(&self.entries)?.sync_all()
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&temporary);
            return Err(StoreError::io(&path, e));
        }
        if let Some(max) = self.max_bytes {
            self.prune(max)?;
        }
        Ok(())
    }

    fn holds(&self, key: &Key) -> Result<bool> {
        let path = self.path(key);
        match fs::metadata(&path) {
            Ok(meta) => Ok(meta.is_file()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }

    fn remove(&self, key: &Key) -> Result<bool> {
        let path = self.path(key);
        // Whatever took the entry's place goes, a folder included, so that it can be
        // written again.
        let removed = match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(&path),
            _ => fs::remove_file(&path),
        };
        match removed {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::io(&path, e)),
        }
    }

    fn list(&self) -> Result<Vec<Listed>> {
        Ok(self
            .files()?
            .into_iter()
            .map(|(key, bytes, _)| Listed {
                key,
                bytes,
                tokens: None,
            })
            .collect())
    }

    fn prune(&self, max_bytes: u64) -> Result<usize> {
        let mut files = self.files()?;
        let mut total: u64 = files.iter().map(|(_, bytes, _)| bytes).sum();
        files.sort_by_key(|(_, _, used)| *used);
        let mut removed = 0;
        for (key, bytes, _) in files {
            if total <= max_bytes {
                break;
            }
            if self.remove(&key)? {
                removed += 1;
            }
            total -= bytes;
        }
        Ok(removed)
    }
}
