//! A model's hyper-parameters, read once from its GGUF metadata.

use super::gguf::{Gguf, Value};
use crate::error::{Error, Result};
use crate::kernels::RopeStyle;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Qwen2,
}

impl Architecture {
    fn from_name(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
        }
    }
}

/// Hyper-parameters, read once from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct Config {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden: usize,
    pub ffn_hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
    /// The window the model was trained for (`<arch>.context_length`).
    pub context_length: usize,
}

impl Config {
    pub fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let arch_name = gguf.require("general.architecture", "string", Value::as_str)?;
        let architecture = Architecture::from_name(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let count = |k: &str| -> Result<usize> {
            gguf.require(&key(k), "integer", Value::as_u64)
                .map(|v| v as usize)
        };
        let hidden = count("embedding_length")?;
        let heads = count("attention.head_count")?;
        let kv_heads = gguf
            .get(&key("attention.head_count_kv"))
            .and_then(Value::as_u64)
            .map_or(heads, |v| v as usize);
        let head_dim = gguf
            .get(&key("rope.dimension_count"))
            .and_then(Value::as_u64)
            .map_or(hidden / heads, |v| v as usize);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim * heads != hidden {
            return Err(Error::BadGguf {
                path: gguf.path.clone(),
                reason: format!(
                    "inconsistent attention shape: {heads} heads, {kv_heads} KV heads, \
                     head size {head_dim}, hidden size {hidden}"
                ),
            });
        }
        let vocab_size = match gguf.get(&key("vocab_size")).and_then(Value::as_u64) {
            Some(v) => v as usize,
            None => gguf
                .require("tokenizer.ggml.tokens", "string array", Value::as_array)?
                .len(),
        };
        Ok(Config {
            architecture,
            vocab_size,
            hidden,
            ffn_hidden: count("feed_forward_length")?,
            layers: count("block_count")?,
            heads,
            kv_heads,
            head_dim,
            rope_base: gguf
                .get(&key("rope.freq_base"))
                .and_then(Value::as_f64)
                .unwrap_or(10_000.0) as f32,
            rms_eps: gguf.require(
                &key("attention.layer_norm_rms_epsilon"),
                "float",
                Value::as_f64,
            )? as f32,
            context_length: count("context_length")?,
        })
    }

    pub(crate) fn rope_style(&self) -> RopeStyle {
        match self.architecture {
            Architecture::Llama => RopeStyle::Adjacent,
            Architecture::Qwen2 => RopeStyle::Halves,
        }
    }
}
