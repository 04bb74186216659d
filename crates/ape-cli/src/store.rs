//! Where `ape` keeps encoded contexts: the options every command shares, and `ape encode`
//! and `ape cache`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use ape_core::engine::generate::Cancel;
use ape_core::engine::Engine;
use ape_store::{
    register, Codec, DiskTier, Fingerprint, Key, KvDtype, MemoryTier, RedisTier, Store, Tier,
};

#[derive(Args, Clone)]
pub(crate) struct StoreArgs {
    /// Folder of the on-disk context store [default: $APE_CACHE_DIR, else ~/.cache/ape].
    #[arg(long, value_name = "DIR", global = true)]
    cache_dir: Option<PathBuf>,
    /// Keep the disk store under this size, least recently used entries going first
    /// (e.g. 500M, 20G).
    #[arg(long, value_name = "SIZE", value_parser = parse_size, global = true)]
    cache_max_bytes: Option<u64>,
    /// Also share contexts through this Redis (redis://host:port/db).
    #[arg(long, value_name = "URL", global = true)]
    redis: Option<String>,
    /// How the disk and Redis tiers store keys and values: `f16` (exact) or `q8` (8-bit,
    /// about half the bytes; see README for its measured accuracy cost).
    #[arg(long, value_name = "DTYPE", default_value = "f16", value_parser = parse_dtype, global = true)]
    kv_dtype: KvDtype,
    /// Use no store: encode every context every time.
    #[arg(long, conflicts_with_all = ["cache_dir", "redis"], global = true)]
    no_cache: bool,
}

impl StoreArgs {
    fn dir(&self) -> Result<PathBuf> {
        if let Some(dir) = &self.cache_dir {
            return Ok(dir.clone());
        }
        if let Some(dir) = std::env::var_os("APE_CACHE_DIR") {
            return Ok(dir.into());
        }
        let home = std::env::var_os("HOME")
            .context("no store folder: pass --cache-dir DIR or set APE_CACHE_DIR")?;
        Ok(Path::new(&home).join(".cache").join("ape"))
    }

    /// The persistent tiers, disk then Redis, as the options ask.
    fn tiers(&self, codec: Codec) -> Result<Vec<Box<dyn Tier>>> {
        let dir = self.dir()?;
        let mut tiers: Vec<Box<dyn Tier>> = vec![Box::new(
            DiskTier::open(&dir, codec, self.cache_max_bytes)
                .with_context(|| format!("opening the context store in {}", dir.display()))?,
        )];
        if let Some(url) = &self.redis {
            tiers.push(Box::new(RedisTier::connect(url, codec)?));
        }
        Ok(tiers)
    }

    /// The store for `engine`'s model (file `model_path`): memory, then disk, then Redis;
    /// `None` with `--no-cache`.
    pub(crate) fn open(&self, engine: &Engine, model_path: &Path) -> Result<Option<Arc<Store>>> {
        if self.no_cache {
            return Ok(None);
        }
        self.open_with_memory(engine, model_path).map(Some)
    }

    /// [`StoreArgs::open`], but with `--no-cache` a store in memory only, for a server
    /// whose registered contexts must live somewhere.
    pub(crate) fn open_with_memory(
        &self,
        engine: &Engine,
        model_path: &Path,
    ) -> Result<Arc<Store>> {
        let codec = Codec::for_model(model_path, &engine.model.config, self.kv_dtype)?;
        let mut tiers: Vec<Box<dyn Tier>> =
            vec![Box::new(MemoryTier::new(engine.kv_budget().clone()))];
        if !self.no_cache {
            tiers.extend(self.tiers(codec)?);
        }
        Ok(Arc::new(Store::new(codec, tiers)))
    }
}

fn parse_dtype(name: &str) -> Result<KvDtype, String> {
    KvDtype::from_name(name).ok_or_else(|| format!("`{name}` is not a KV dtype; use f16 or q8"))
}

/// `500`, `64K`, `500M`, `20G`: bytes, with binary multiples.
pub(crate) fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last() {
        Some((at, 'K' | 'k')) => (&text[..at], 10),
        Some((at, 'M' | 'm')) => (&text[..at], 20),
        Some((at, 'G' | 'g')) => (&text[..at], 30),
        _ => (text, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or_else(|| format!("`{text}` is not a size; write bytes, or a number with K, M or G"))
}

#[derive(Args)]
pub(crate) struct EncodeArgs {
    #[command(flatten)]
    model: crate::ModelArg,
    /// Documents: text files, or folders whose files are each one document.
    #[arg(required = true, value_name = "FILES|DIR")]
    paths: Vec<PathBuf>,
    /// The system text the documents will be asked about under (part of the prefix).
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    store: StoreArgs,
}

/// `ape encode`: encode documents after the chat prefix and keep them in the store.
pub(crate) fn encode(args: EncodeArgs) -> Result<()> {
    anyhow::ensure!(
        !args.store.no_cache,
        "`ape encode` fills the store; --no-cache leaves nothing to do"
    );
    let mut files = Vec::new();
    for path in &args.paths {
        if path.is_dir() {
            files.extend(crate::read_folder(path)?);
        } else {
            files.push(path.clone());
        }
    }
    let documents = crate::read_files(&files)?;
    let engine = args.model.load()?;
    let store = args
        .store
        .open(&engine, &args.model.model)?
        .expect("a store is open");
    let engine = engine.with_store(store.clone());

    let bar = ProgressBar::new(documents.len() as u64).with_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} documents [{elapsed} < {eta}]")
            .expect("the template is valid"),
    );
    let start = Instant::now();
    let registration = register(
        &engine,
        &store,
        args.system.as_deref(),
        &documents,
        &Cancel::default(),
        |_| bar.inc(1),
    )?;
    bar.finish_and_clear();
    let contexts = &registration.contexts;
    let encoded: Vec<_> = contexts.iter().filter(|c| !c.already_stored).collect();
    let tokens: usize = encoded.iter().map(|c| c.tokens).sum();
    let stored = encoded
        .iter()
        .filter(|c| c.not_stored_in.is_empty())
        .count();
    let not_stored: Vec<String> = contexts
        .iter()
        .filter(|c| !c.not_stored_in.is_empty())
        .map(|c| {
            let file = files[c.document].display();
            format!("{file}: not in {}", c.not_stored_in.join(", "))
        })
        .collect();
    println!(
        "{stored} contexts encoded and stored ({tokens} tokens in {:.1} s), {} already stored",
        start.elapsed().as_secs_f64(),
        contexts.len() - encoded.len()
    );
    anyhow::ensure!(
        not_stored.is_empty(),
        "{} contexts could not be stored:\n  {}\nfree the space or fix the store and run \
         `ape encode` again: what was stored is kept",
        not_stored.len(),
        not_stored.join("\n  ")
    );
    Ok(())
}

#[derive(Subcommand)]
pub(crate) enum CacheCommand {
    /// Entries and bytes per tier.
    Stats,
    /// Every entry: tier, key, size (listed, not read: `verify` checks them).
    Ls,
    /// Read every entry and check it (format, key, length, checksum); exits non-zero
    /// when some are damaged or unreadable, unless `--remove` deleted them all.
    Verify {
        /// Delete the damaged entries; their contexts are encoded again when next used.
        #[arg(long)]
        remove: bool,
    },
    /// Delete entries by key.
    Rm { keys: Vec<String> },
    /// Delete least recently used entries until the disk store is at most this size.
    Prune {
        #[arg(long, value_parser = parse_size)]
        max_bytes: u64,
    },
    /// Delete every entry.
    Clear,
}

#[derive(Args)]
pub(crate) struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
    #[command(flatten)]
    store: StoreArgs,
}

/// `ape cache`: look after the persistent tiers. Nothing here decodes an entry, so it
/// needs no model.
pub(crate) fn cache(args: CacheArgs) -> Result<()> {
    let codec = Codec {
        model: Fingerprint([0; 32]),
        layers: 0,
        kv_heads: 0,
        head_dim: 0,
        dtype: KvDtype::F16,
    };
    let tiers = args.store.tiers(codec)?;
    match args.command {
        CacheCommand::Stats => {
            println!("| tier | entries | bytes |\n|---|---:|---:|");
            for tier in &tiers {
                let listed = tier.list()?;
                let bytes: u64 = listed.iter().map(|l| l.bytes).sum();
                println!("| {} | {} | {bytes} |", tier.name(), listed.len());
            }
        }
        CacheCommand::Ls => {
            for tier in &tiers {
                for l in tier.list()? {
                    println!("{}\t{}\t{}", tier.name(), l.key, l.bytes);
                }
            }
        }
        CacheCommand::Verify { remove } => {
            let mut left = 0;
            for tier in &tiers {
                let verified = ape_store::verify(tier.as_ref(), remove)?;
                for (key, problem) in &verified.damaged {
                    println!("{}\t{key}\t{problem}", tier.name());
                }
                println!(
                    "{}: {} sound, {} damaged, {} removed",
                    tier.name(),
                    verified.sound,
                    verified.damaged.len(),
                    verified.removed
                );
                left += verified.damaged.len() - verified.removed;
            }
            anyhow::ensure!(
                left == 0,
                "{left} damaged entries are left; `ape cache verify --remove` deletes them \
                 (their contexts are encoded again when next used)"
            );
        }
        CacheCommand::Rm { keys } => {
            for text in keys {
                let key = Key::from_hex(&text).with_context(|| {
                    format!("`{text}` is not an entry key (64 hex digits, as `ape cache ls` shows)")
                })?;
                let mut found = false;
                for tier in &tiers {
                    found |= tier.remove(&key)?;
                }
                anyhow::ensure!(found, "no entry {key} in the store");
            }
        }
        CacheCommand::Prune { max_bytes } => {
            let removed = tiers[0].prune(max_bytes)?;
            println!("{removed} entries removed from the disk store");
        }
        CacheCommand::Clear => {
            for tier in &tiers {
                println!("{}: {} entries removed", tier.name(), tier.prune(0)?);
            }
        }
    }
    Ok(())
}
