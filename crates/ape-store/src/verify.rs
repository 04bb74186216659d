//! Checking a tier's entries without the model that wrote them (`ape cache verify`).

use crate::entry::verify_entry;
use crate::{Key, Result, Tier};

/// What [`verify`] found in one tier.
pub struct Verified {
    /// How many entries passed every check.
    pub sound: usize,
    /// Each damaged or unreadable entry, with why.
    pub damaged: Vec<(Key, String)>,
    /// How many of the damaged entries were deleted.
    pub removed: usize,
}

/// Read and check every entry of `tier` (format, key, length, checksum); with `remove`,
/// delete each one that fails, so that the context is encoded again when next asked for.
pub fn verify(tier: &dyn Tier, remove: bool) -> Result<Verified> {
    let mut verified = Verified {
        sound: 0,
        damaged: Vec::new(),
        removed: 0,
    };
    for listed in tier.list()? {
        let key = listed.key;
        let problem = match tier.stored_bytes(&key) {
            Ok(Some(bytes)) => verify_entry(&key, &bytes).err().map(|e| e.to_string()),
            // Removed since it was listed.
            Ok(None) => continue,
            Err(e) => Some(format!("cannot be read: {e}")),
        };
        let Some(problem) = problem else {
            verified.sound += 1;
            continue;
        };
        if remove && tier.remove(&key)? {
            verified.removed += 1;
        }
        verified.damaged.push((key, problem));
    }
    Ok(verified)
}
