//! Registering documents: encoding them once, ahead of the questions, into the store.
//! `ape encode` and the server's `POST /v1/contexts` both go through [`register`].

use ape_core::engine::generate::Cancel;
use ape_core::engine::Engine;

use crate::{Key, Store};

/// What became of one context of a registered document.
pub struct Registered {
    /// Which of the documents it belongs to (a long document is several contexts).
    pub document: usize,
    /// Where the context is stored; its hex form is the context's id in the server's API.
    pub key: Key,
    /// The context's length in tokens.
    pub tokens: usize,
    /// Whether the store already held it, so that nothing was encoded.
    pub already_stored: bool,
    /// The durable tiers that do not hold it, each with why; empty when it is stored.
    pub not_stored_in: Vec<String>,
}

/// The contexts of every registered document, and the prefix they were encoded after.
pub struct Registration {
    /// Length in tokens of the chat prefix every context was encoded after.
    pub prefix_tokens: usize,
    /// Every context of every document, in order, document after document.
    pub contexts: Vec<Registered>,
}

/// Encode `documents` after the chat prefix (with the system message `system`, if any)
/// and keep them in `store`, one document after another: each context is stored as soon
/// as it is encoded, so that a call stopped by `cancel` has kept every document it
/// finished (and the contexts of the one it was in). `done(i)` is called once document
/// `i` is registered. The engine must have `store` as its context store.
pub fn register(
    engine: &Engine,
    store: &Store,
    system: Option<&str>,
    documents: &[impl AsRef<str>],
    cancel: &Cancel,
    mut done: impl FnMut(usize),
) -> ape_core::Result<Registration> {
    let prefix = engine.split_chat(system, &[] as &[&str], "")?.prefix;
    let mut prefix_kv = None;
    let mut contexts = Vec::new();
    for (document, text) in documents.iter().enumerate() {
        let tokens = engine.document_contexts(text.as_ref(), cancel)?;
        let keys: Vec<Key> = tokens.iter().map(|c| store.codec.key(&prefix, c)).collect();
        let found: Vec<_> = keys.iter().map(|k| store.lookup(k)).collect();
        let missing: Vec<&[u32]> = tokens
            .iter()
            .zip(&found)
            .filter(|(_, entry)| entry.is_none())
            .map(|(context, _)| context.as_slice())
            .collect();
        if !missing.is_empty() {
            let prefix_kv = match &prefix_kv {
                Some(kv) => kv,
                None => prefix_kv.insert(engine.prefix_kv(&prefix)?),
            };
            engine.contexts_kv(&prefix, prefix_kv, &missing, cancel)?;
        }
        for ((key, context), entry) in keys.into_iter().zip(&tokens).zip(found) {
            let mut not_stored_in = store.missing_from_durable(&key);
            if let Some(entry) = &entry {
                if !not_stored_in.is_empty() {
                    // Kept in memory only by an earlier registration whose writes failed.
                    store.save(&key, entry);
                    not_stored_in = store.missing_from_durable(&key);
                }
            }
            contexts.push(Registered {
                document,
                key,
                tokens: context.len(),
                already_stored: entry.is_some(),
                not_stored_in,
            });
        }
        done(document);
    }
    Ok(Registration {
        prefix_tokens: prefix.len(),
        contexts,
    })
}
