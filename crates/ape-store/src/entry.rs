//! Keys and the byte format of one stored context.
//!
//! A key is a BLAKE3 digest of everything the keys and values depend on: the model file,
//! the prefix tokens, the context tokens, the KV data type and this format's version. The
//! same inputs give the same key in every process; any change gives another.
//!
//! An entry is, in little-endian order:
//!
//! ```text
//! magic "APE-KV\r\n" | format version u32 | dtype u8 | 3 zero bytes
//! key [32] | model fingerprint [32]
//! layers u32 | kv heads u32 | head dim u32 | prefix length u32 | context length u32
//! context tokens (u32 each)
//! for each layer, for each KV head: keys then values, each context length rows of
//!   f16:  head dim f16 values
//!   q8:   an f16 scale, then head dim i8 values (value = scale * q)
//! BLAKE3 of everything above [32]
//! ```
//!
//! Decoding checks every field against what the reader expects (its key, its model, its
//! shape) and the checksum over the whole entry, so a torn, truncated, foreign or
//! bit-flipped entry is an error, never a wrong cache.

use std::fmt;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use ape_core::attention::KvCache;
use half::f16;

use crate::error::{Corrupt, Result, StoreError};

const MAGIC: &[u8; 8] = b"APE-KV\r\n";

/// Bumped whenever the entry layout or the meaning of a key changes.
pub(crate) const FORMAT_VERSION: u32 = 1;

const HEADER_BYTES: usize = 8 + 4 + 4 + 32 + 32 + 5 * 4;
const CHECKSUM_BYTES: usize = 32;

/// How keys and values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// Exactly as the engine computes them.
    F16,
    /// Each row of `head_dim` values as 8-bit integers with one f16 scale (absmax / 127):
    /// about half the bytes, at a measured accuracy cost.
    Q8,
}

impl KvDtype {
    fn code(self) -> u8 {
        match self {
            KvDtype::F16 => 0,
            KvDtype::Q8 => 1,
        }
    }

    fn from_code(code: u8) -> Option<KvDtype> {
        [KvDtype::F16, KvDtype::Q8]
            .into_iter()
            .find(|dtype| dtype.code() == code)
    }

    /// `f16` or `q8`.
    pub fn from_name(name: &str) -> Option<KvDtype> {
        match name {
            "f16" => Some(KvDtype::F16),
            "q8" => Some(KvDtype::Q8),
            _ => None,
        }
    }

    /// Stored bytes of one row of `head_dim` values.
    fn row_bytes(self, head_dim: usize) -> Option<usize> {
        match self {
            KvDtype::F16 => head_dim.checked_mul(2),
            KvDtype::Q8 => head_dim.checked_add(2),
        }
    }

    fn write_row(self, row: &[f16], out: &mut Vec<u8>) {
        match self {
            KvDtype::F16 => {
                for x in row {
                    out.extend_from_slice(&x.to_bits().to_le_bytes());
                }
            }
            KvDtype::Q8 => {
                let max = row.iter().map(|x| x.to_f32().abs()).fold(0.0, f32::max);
                let scale = f16::from_f32(max / 127.0);
                let inverse = if scale.to_f32() > 0.0 {
                    1.0 / scale.to_f32()
                } else {
                    0.0
                };
                out.extend_from_slice(&scale.to_bits().to_le_bytes());
                for x in row {
                    let q = (x.to_f32() * inverse).round().clamp(-127.0, 127.0) as i8;
                    out.push(q as u8);
                }
            }
        }
    }

    fn read_row(self, reader: &mut Reader<'_>, row: &mut [f16]) {
        match self {
            KvDtype::F16 => row
                .iter_mut()
                .for_each(|x| *x = f16::from_bits(reader.u16())),
            KvDtype::Q8 => {
                let scale = f16::from_bits(reader.u16()).to_f32();
                let quants = reader.take(row.len());
                for (x, q) in row.iter_mut().zip(quants) {
                    *x = f16::from_f32(scale * (*q as i8) as f32);
                }
            }
        }
    }
}

/// How much of a model file is read and hashed at a time: enough for the threads to share.
const HASHED_PIECE_BYTES: usize = 4 << 20;

/// A digest of a model file: two files share it only if their bytes are the same.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// BLAKE3 of the whole file, read a piece at a time, each piece hashed by all
    /// threads. Not through a memory map: the pages of a mapped file count as the
    /// process's own while mapped, so hashing a model that way held a second copy of its
    /// packed weights' size in resident memory.
    pub fn of_file(path: &Path) -> Result<Fingerprint> {
        let io = |source| StoreError::io(path, source);
        let mut file = std::fs::File::open(path).map_err(io)?;
        let mut hasher = blake3::Hasher::new();
        let mut piece = vec![0; HASHED_PIECE_BYTES];
        loop {
            match file.read(&mut piece) {
                Ok(0) => break,
                Ok(n) => {
                    hasher.update_rayon(&piece[..n]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(Fingerprint(*hasher.finalize().as_bytes()))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex(&self.0[..8]))
    }
}

/// The address of one stored context.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// The key of `context` encoded after `prefix` by the model `model` and stored as
    /// `dtype`; it also commits to the entries' format version.
    pub fn new(model: &Fingerprint, prefix: &[u32], context: &[u32], dtype: KvDtype) -> Key {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"ape context kv");
        hasher.update(&FORMAT_VERSION.to_le_bytes());
        hasher.update(&model.0);
        hasher.update(&[dtype.code()]);
        for tokens in [prefix, context] {
            hasher.update(&(tokens.len() as u64).to_le_bytes());
            for t in tokens {
                hasher.update(&t.to_le_bytes());
            }
        }
        Key(*hasher.finalize().as_bytes())
    }

    /// The key as 64 lowercase hex digits: its name in files, Redis and the API.
    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// The key written as by [`Key::to_hex`] (either case); `None` for anything but 64
    /// hex digits.
    pub fn from_hex(text: &str) -> Option<Key> {
        if text.len() != 64 || !text.is_ascii() {
            return None;
        }
        let mut key = [0u8; 32];
        for (byte, pair) in key.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
            *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
        }
        Some(Key(key))
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One stored context: its tokens, the length of the prefix it was encoded after, and its
/// keys and values.
#[derive(Clone)]
pub struct Entry {
    /// Tokens of the prefix the context was encoded after (the prefix is not stored).
    pub prefix_len: usize,
    /// The context's own tokens.
    pub tokens: Vec<u32>,
    /// The context's keys and values, every layer and KV head; the prefix's are not in it.
    pub kv: Arc<KvCache>,
}

impl Entry {
    /// Bytes the entry takes encoded as `dtype`.
    pub fn encoded_len(&self, dtype: KvDtype) -> usize {
        let kv = &self.kv;
        entry_bytes(kv.layer_count(), kv.kv_heads, kv.head_dim, kv.len(), dtype)
            .expect("an entry held in memory has a size that fits in memory")
    }

    /// Bytes the entry takes decoded, in memory.
    pub fn memory_bytes(&self) -> usize {
        self.encoded_len(KvDtype::F16)
    }
}

/// Bytes of an entry of this shape; `None` when a (damaged) header claims more than any
/// memory holds.
fn entry_bytes(
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    len: usize,
    dtype: KvDtype,
) -> Option<usize> {
    let rows = layers
        .checked_mul(kv_heads)?
        .checked_mul(2)?
        .checked_mul(len)?;
    rows.checked_mul(dtype.row_bytes(head_dim)?)?
        .checked_add(HEADER_BYTES + CHECKSUM_BYTES)?
        .checked_add(len.checked_mul(4)?)
}

/// What a reader expects of every entry it decodes: written for this model, in this
/// shape and dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    /// Fingerprint of the model file; entries written for another are refused
    /// ([`Corrupt::Model`]).
    pub model: Fingerprint,
    /// The model's layers; with `kv_heads` and `head_dim`, the shape every entry must
    /// have ([`Corrupt::Shape`] otherwise).
    pub layers: usize,
    /// Key/value heads per layer (as many as the query heads, or fewer with grouped-query
    /// attention).
    pub kv_heads: usize,
    /// Values per head and token, in keys and in values alike.
    pub head_dim: usize,
    /// How entries are written; it is part of the key, and entries stored otherwise are
    /// refused ([`Corrupt::Dtype`]).
    pub dtype: KvDtype,
}

impl Codec {
    /// The codec of entries made by `model` (its file at `path`), stored as `dtype`.
    pub fn for_model(
        path: &Path,
        model: &ape_core::model::Config,
        dtype: KvDtype,
    ) -> Result<Codec> {
        Ok(Codec {
            model: Fingerprint::of_file(path)?,
            layers: model.layers,
            kv_heads: model.kv_heads,
            head_dim: model.head_dim,
            dtype,
        })
    }

    /// The key of `context` encoded after `prefix` with this codec's model and dtype.
    pub fn key(&self, prefix: &[u32], context: &[u32]) -> Key {
        Key::new(&self.model, prefix, context, self.dtype)
    }

    /// The bytes that store `entry` under `key`: header, tokens, keys and values in this
    /// codec's dtype, and a checksum over all of it.
    pub fn encode(&self, key: &Key, entry: &Entry) -> Vec<u8> {
        let kv = &entry.kv;
        let mut out = Vec::with_capacity(entry.encoded_len(self.dtype));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&[self.dtype.code(), 0, 0, 0]);
        out.extend_from_slice(&key.0);
        out.extend_from_slice(&self.model.0);
        for n in [
            kv.layer_count(),
            kv.kv_heads,
            kv.head_dim,
            entry.prefix_len,
            kv.len(),
        ] {
            out.extend_from_slice(&(n as u32).to_le_bytes());
        }
        for t in &entry.tokens {
            out.extend_from_slice(&t.to_le_bytes());
        }
        for layer in 0..kv.layer_count() {
            for g in 0..kv.kv_heads {
                let (k, v) = kv.head(layer, g);
                for row in k
                    .chunks_exact(kv.head_dim)
                    .chain(v.chunks_exact(kv.head_dim))
                {
                    self.dtype.write_row(row, &mut out);
                }
            }
        }
        let checksum = blake3::hash(&out);
        out.extend_from_slice(checksum.as_bytes());
        out
    }

    /// Decode an entry read for `key`, checking everything it claims.
    pub fn decode(&self, key: &Key, bytes: &[u8]) -> std::result::Result<Entry, Corrupt> {
        let header = check(key, bytes)?;
        if header.dtype != self.dtype {
            return Err(Corrupt::Dtype);
        }
        if header.model != self.model {
            return Err(Corrupt::Model);
        }
        let Header {
            layers,
            kv_heads,
            head_dim,
            prefix_len,
            len,
            ..
        } = header;
        if (layers, kv_heads, head_dim) != (self.layers, self.kv_heads, self.head_dim) {
            return Err(Corrupt::Shape);
        }
        let mut reader = Reader {
            bytes,
            at: HEADER_BYTES,
        };
        let tokens: Vec<u32> = (0..len).map(|_| reader.u32()).collect();
        let kv = KvCache::from_fn(layers, kv_heads, head_dim, len, |_, _, k, v| {
            for row in k
                .chunks_exact_mut(head_dim)
                .chain(v.chunks_exact_mut(head_dim))
            {
                self.dtype.read_row(&mut reader, row);
            }
            Ok::<(), Corrupt>(())
        })?;
        Ok(Entry {
            prefix_len,
            tokens,
            kv: Arc::new(kv),
        })
    }
}

/// What an entry's header says of it.
struct Header {
    dtype: KvDtype,
    model: Fingerprint,
    layers: usize,
    kv_heads: usize,
    head_dim: usize,
    prefix_len: usize,
    len: usize,
}

/// Whether `bytes` are a whole, sound entry stored under `key`, whatever model wrote it:
/// the format, the key, the length the header implies and the checksum. Needs no model,
/// so that `ape cache verify` can check every entry of a shared store.
pub(crate) fn verify_entry(key: &Key, bytes: &[u8]) -> std::result::Result<(), Corrupt> {
    check(key, bytes).map(|_| ())
}

fn check(key: &Key, bytes: &[u8]) -> std::result::Result<Header, Corrupt> {
    if bytes.len() < HEADER_BYTES + CHECKSUM_BYTES {
        return Err(Corrupt::Truncated);
    }
    if &bytes[..8] != MAGIC {
        return Err(Corrupt::NotAnEntry);
    }
    let mut reader = Reader { bytes, at: 8 };
    let version = reader.u32();
    if version != FORMAT_VERSION {
        return Err(Corrupt::Version(version));
    }
    let dtype = KvDtype::from_code(reader.take(4)[0]).ok_or(Corrupt::Dtype)?;
    if reader.take(32) != key.0 {
        return Err(Corrupt::Key);
    }
    let model = Fingerprint(reader.take(32).try_into().expect("32 bytes"));
    let [layers, kv_heads, head_dim, prefix_len, len] = [(); 5].map(|_| reader.u32() as usize);
    let expected = entry_bytes(layers, kv_heads, head_dim, len, dtype);
    if expected != Some(bytes.len()) {
        return Err(Corrupt::Length {
            expected: expected.unwrap_or(usize::MAX),
            found: bytes.len(),
        });
    }
    let expected = bytes.len();
    let body = &bytes[..expected - CHECKSUM_BYTES];
    if blake3::hash(body).as_bytes() != &bytes[expected - CHECKSUM_BYTES..] {
        return Err(Corrupt::Checksum);
    }
    Ok(Header {
        dtype,
        model,
        layers,
        kv_heads,
        head_dim,
        prefix_len,
        len,
    })
}

/// Reads little-endian numbers from bytes whose length was checked beforehand.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        out
    }

    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take(2).try_into().unwrap())
    }
}
