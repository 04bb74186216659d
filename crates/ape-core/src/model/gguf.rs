//! Reader for GGUF model files: metadata, the tensor table, and the tensor bytes
//! (memory-mapped, never copied until a tensor is dequantized).

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::kernels::quant::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// The smallest page size: the header is released up to a multiple of it.
const HEADER_PAGE: usize = 4096;

/// One metadata value. The tokenizer arrays of a 262K-token vocabulary are the biggest
/// thing held here, so arrays of strings and of numbers are held packed.
#[derive(Debug, Clone)]
pub enum Value {
    /// GGUF value type 0.
    U8(u8),
    /// GGUF value type 1.
    I8(i8),
    /// GGUF value type 2.
    U16(u16),
    /// GGUF value type 3.
    I16(i16),
    /// GGUF value type 4.
    U32(u32),
    /// GGUF value type 5.
    I32(i32),
    /// GGUF value type 10.
    U64(u64),
    /// GGUF value type 11.
    I64(i64),
    /// GGUF value type 6.
    F32(f32),
    /// GGUF value type 12.
    F64(f64),
    /// GGUF value type 7 (any non-zero byte is true).
    Bool(bool),
    /// GGUF value type 8, decoded as UTF-8 (invalid bytes replaced).
    String(String),
    /// An array of strings.
    Strings(Strings),
    /// An array of integers or floats, each widened to f64 (exactly).
    Numbers(Vec<f64>),
    /// An array of anything else (booleans, arrays).
    Array(Vec<Value>),
}

/// Strings one after another in one buffer: held one allocation each, the texts of a
/// 262K-token vocabulary would take several times their size.
#[derive(Debug, Clone, Default)]
pub struct Strings {
    text: String,
    /// `ends[i]` is where string `i` ends in `text`; 32 bits, as a vocabulary's texts take
    /// a few megabytes.
    ends: Vec<u32>,
}

impl Strings {
    /// How many strings are held.
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    /// String `i`, or `None` past the end.
    pub(crate) fn get(&self, i: usize) -> Option<&str> {
        let end = *self.ends.get(i)? as usize;
        let start = i.checked_sub(1).map_or(0, |j| self.ends[j] as usize);
        Some(&self.text[start..end])
    }

    /// Every string, in order.
    pub(crate) fn iter(&self) -> impl ExactSizeIterator<Item = &str> + '_ {
        (0..self.len()).map(|i| self.get(i).expect("in range"))
    }

    fn push(&mut self, s: &str) -> std::result::Result<(), String> {
        self.text.push_str(s);
        let end = u32::try_from(self.text.len())
            .map_err(|_| "an array of strings holds more than 4 GiB of text".to_string())?;
        self.ends.push(end);
        Ok(())
    }
}

#[cfg(test)]
impl<'a> FromIterator<&'a str> for Strings {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        let mut strings = Strings::default();
        for s in iter {
            strings.push(s).expect("under 4 GiB of text");
        }
        strings
    }
}

impl Value {
    /// Any integer that is not negative, widened; `None` for the rest.
    pub(crate) fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) if v >= 0 => Some(v as u64),
            Value::I16(v) if v >= 0 => Some(v as u64),
            Value::I32(v) if v >= 0 => Some(v as u64),
            Value::I64(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }

    /// Any integer that fits an i64 (u64 values above `i64::MAX` wrap); `None` for the
    /// rest.
    pub(crate) fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v as i64),
            Value::I16(v) => Some(v as i64),
            Value::I32(v) => Some(v as i64),
            Value::I64(v) => Some(v),
            _ => self.as_u64().map(|v| v as i64),
        }
    }

    /// Any float or integer, as f64; `None` for the rest.
    pub(crate) fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v as f64),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The text of a [`Value::String`].
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// The flag of a [`Value::Bool`].
    pub(crate) fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The strings of a [`Value::Strings`] array.
    pub(crate) fn as_strings(&self) -> Option<&Strings> {
        match self {
            Value::Strings(s) => Some(s),
            _ => None,
        }
    }

    /// The numbers of a [`Value::Numbers`] array.
    pub(crate) fn as_numbers(&self) -> Option<&[f64]> {
        match self {
            Value::Numbers(n) => Some(n),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and what it holds.
#[derive(Debug, Clone)]
pub(crate) struct TensorInfo {
    /// The tensor's GGUF name, e.g. `blk.0.attn_q.weight`.
    pub(crate) name: String,
    /// Dimensions in GGUF order: `dims[0]` is the innermost (contiguous) one, so a
    /// weight matrix of `rows x cols` is stored as `[cols, rows]`.
    pub dims: Vec<usize>,
    /// How the elements are stored.
    pub(crate) ggml_type: GgmlType,
    /// Offset from the start of the tensor data section.
    pub offset: usize,
}

impl TensorInfo {
    /// Elements in all: the product of the dimensions.
    pub(crate) fn element_count(&self) -> usize {
        self.dims.iter().product()
    }

    /// Bytes the tensor takes in the file, in its type.
    pub(crate) fn byte_len(&self) -> usize {
        self.ggml_type.row_bytes(self.element_count())
    }
}

/// A tensor's bytes inside the mapped file.
#[derive(Clone)]
pub(crate) struct TensorData {
    map: Arc<Mmap>,
    range: std::ops::Range<usize>,
}

impl TensorData {
    /// Hands the pages under bytes `part` of this tensor back to the kernel, for bytes
    /// that were copied elsewhere: they stop counting as resident until read again.
    pub(crate) fn release(&self, part: std::ops::Range<usize>) {
        assert!(part.end <= self.range.len(), "past the tensor's end");
        let start = self.range.start + part.start;
        release(&self.map, start..start + part.len());
    }
}

/// Hands the pages of `map` under `range` back to the kernel.
fn release(map: &Mmap, range: std::ops::Range<usize>) {
    // SAFETY: the map is read-only and backed by the file, so a page dropped here reads
    // the same bytes from the file if anything touches it again.
    let _ = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, range.start, range.len())
    };
}

impl std::ops::Deref for TensorData {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

/// An open GGUF file.
pub struct Gguf {
    /// The file as it was opened, for error messages.
    pub(crate) path: PathBuf,
    /// The GGUF format version of the file: 2 or 3.
    pub version: u32,
    /// Every metadata key and its value.
    pub(crate) metadata: HashMap<String, Value>,
    /// The tensor table, in file order.
    pub(crate) tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    data_start: usize,
    mmap: Arc<Mmap>,
}

impl Gguf {
    /// Open and map the file at `path` and read its header: metadata and tensor table,
    /// each tensor checked to lie inside the file. Fails with [`Error::Open`] when the
    /// file cannot be read, [`Error::BadGguf`] when it is not a GGUF file ape reads, and
    /// [`Error::UnsupportedTensorType`] for a tensor type ape has no kernel for.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the file is opened read-only; ape never writes model files, and a
        // model file changing under a running process is outside what we can guard.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        let bad = |reason: String| Error::BadGguf {
            path: path.clone(),
            reason,
        };
        let mut cursor = Cursor {
            bytes: &mmap,
            pos: 0,
        };
        let magic = cursor.take(4).map_err(&bad)?;
        if magic != MAGIC {
            return Err(bad(format!(
                "it starts with {magic:02x?}, not the GGUF magic"
            )));
        }
        let version = cursor.u32().map_err(&bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "GGUF version {version} is not supported (2 and 3 are)"
            )));
        }
        let tensor_count = cursor.u64().map_err(&bad)? as usize;
        let kv_count = cursor.u64().map_err(&bad)? as usize;

        let mut metadata = HashMap::with_capacity(kv_count);
        for _ in 0..kv_count {
            let key = cursor.string().map_err(&bad)?;
            let value_type = cursor.u32().map_err(&bad)?;
            let value = cursor.value(value_type).map_err(&bad)?;
            metadata.insert(key, value);
        }

        let mut tensors = Vec::with_capacity(tensor_count.min(1 << 16));
        for _ in 0..tensor_count {
            let name = cursor.string().map_err(&bad)?;
            let n_dims = cursor.u32().map_err(&bad)? as usize;
            if n_dims > 4 {
                return Err(bad(format!("tensor `{name}` has {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| cursor.u64().map(|d| d as usize))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(&bad)?;
            let type_id = cursor.u32().map_err(&bad)?;
            let ggml_type =
                GgmlType::from_id(type_id).ok_or_else(|| Error::UnsupportedTensorType {
                    tensor: name.clone(),
                    type_name: GgmlType::name_of_id(type_id).to_string(),
                    id: type_id,
                })?;
            let offset = cursor.u64().map_err(&bad)? as usize;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }

        let alignment = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_ALIGNMENT)
            .max(1) as usize;
        let data_start = cursor.pos.div_ceil(alignment) * alignment;
        for t in &tensors {
            if t.element_count() % t.ggml_type.block_len() != 0 {
                return Err(bad(format!(
                    "tensor `{}` has {} elements, not a multiple of its {:?} block",
                    t.name,
                    t.element_count(),
                    t.ggml_type
                )));
            }
            let end = data_start + t.offset + t.byte_len();
            if end > mmap.len() {
                return Err(bad(format!(
                    "tensor `{}` ends at byte {end} but the file has {} bytes (truncated download?)",
                    t.name,
                    mmap.len()
                )));
            }
        }
        let by_name = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        // Everything before the tensors has been copied out (a 262K-token vocabulary is
        // megabytes); the page the first tensor starts in stays.
        release(&mmap, 0..data_start / HEADER_PAGE * HEADER_PAGE);
        Ok(Gguf {
            path,
            version,
            metadata,
            tensors,
            by_name,
            data_start,
            mmap: Arc::new(mmap),
        })
    }

    /// The metadata value under `key`, if the file has one.
    pub(crate) fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// The tensor called `name`, if the file has one.
    pub(crate) fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw (possibly quantized) bytes of a tensor.
    pub(crate) fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        let start = self.data_start + info.offset;
        &self.mmap[start..start + info.byte_len()]
    }

    /// A tensor's bytes, kept readable for as long as the returned value lives, without
    /// copying them: the file's pages are read in as they are used, and shared with every
    /// other process that maps the same file.
    pub(crate) fn tensor_data(&self, info: &TensorInfo) -> TensorData {
        let start = self.data_start + info.offset;
        TensorData {
            map: Arc::clone(&self.mmap),
            range: start..start + info.byte_len(),
        }
    }

    /// Fetch a required metadata value with a typed accessor, or explain what is missing.
    pub fn require<'a, T>(
        &'a self,
        key: &str,
        expected: &'static str,
        get: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<T> {
        self.get(key).and_then(get).ok_or_else(|| Error::Metadata {
            key: key.to_string(),
            expected,
        })
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

type ParseResult<T> = std::result::Result<T, String>;

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> ParseResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| format!("header ends early at byte {} (truncated file?)", self.pos))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> ParseResult<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn u32(&mut self) -> ParseResult<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> ParseResult<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn string(&mut self) -> ParseResult<String> {
        Ok(self.str()?.into_owned())
    }

    fn str(&mut self) -> ParseResult<std::borrow::Cow<'_, str>> {
        let len = self.u64()? as usize;
        let bytes = self.take(len)?;
        Ok(String::from_utf8_lossy(bytes))
    }

    fn value(&mut self, value_type: u32) -> ParseResult<Value> {
        Ok(match value_type {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(self.array::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => Value::Bool(self.array::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                let item_type = self.u32()?;
                let count = self.u64()? as usize;
                // Every element takes at least one byte, so a count beyond the remaining
                // bytes is corruption, not a reason to allocate.
                if count > self.bytes.len() - self.pos {
                    return Err(format!("array of {count} elements overruns the file"));
                }
                match item_type {
                    8 => {
                        let mut strings = Strings::default();
                        for _ in 0..count {
                            strings.push(&self.str()?)?;
                        }
                        Value::Strings(strings)
                    }
                    7 | 9 => {
                        let mut items = Vec::with_capacity(count);
                        for _ in 0..count {
                            items.push(self.value(item_type)?);
                        }
                        Value::Array(items)
                    }
                    _ => {
                        let mut numbers = Vec::with_capacity(count);
                        for _ in 0..count {
                            let item = self.value(item_type)?;
                            numbers.push(item.as_f64().expect("a number type"));
                        }
                        Value::Numbers(numbers)
                    }
                }
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}
