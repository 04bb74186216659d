//! A model's hyper-parameters, read once from its GGUF metadata.

use super::gguf::{Gguf, Value};
use crate::error::{Error, Result};
use crate::kernels::RopeStyle;

/// The network families ape runs, as GGUF's `general.architecture` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Architecture {
    /// `llama`: Llama and the models built like it (SmolLM2, for one).
    Llama,
    /// `qwen2`: Llama's network with biases on the Q, K and V projections.
    Qwen2,
    /// `gemma3`: Gemma 3, with local (sliding-window) layers and extra norms.
    Gemma3,
}

impl Architecture {
    fn from_name(name: &str) -> Result<Self> {
        match name {
            "llama" => Ok(Architecture::Llama),
            "qwen2" => Ok(Architecture::Qwen2),
            "gemma3" => Ok(Architecture::Gemma3),
            other => Err(Error::UnsupportedArchitecture(other.to_string())),
        }
    }

    /// The name GGUF files give the architecture, which also prefixes its metadata keys.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Gemma3 => "gemma3",
        }
    }
}

/// Local attention: the layers that see only the last `size` positions, and their own
/// RoPE base.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlidingWindow {
    /// A query sees the keys fewer than `size` positions behind it (itself included).
    pub size: usize,
    /// Every `pattern`-th layer (the last of each run of `pattern`) sees every position;
    /// the others are local.
    pub pattern: usize,
    /// The RoPE base of the local layers.
    pub(crate) rope_base: f32,
}

impl SlidingWindow {
    /// Whether `layer` (counted from 0) is one of the local layers.
    pub(crate) fn is_local(&self, layer: usize) -> bool {
        layer % self.pattern < self.pattern - 1
    }
}

/// Hyper-parameters, read once from the GGUF metadata.
#[derive(Debug, Clone)]
pub struct Config {
    /// The network family, which picks the forward pass.
    pub(crate) architecture: Architecture,
    /// Tokens in the vocabulary: the length of a logits row.
    pub vocab_size: usize,
    /// Width of the hidden state (the embedding length).
    pub(crate) hidden: usize,
    /// Width of the feed-forward block's inner layer.
    pub(crate) ffn_hidden: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads per layer.
    pub heads: usize,
    /// Key/value heads per layer: `heads` divided by a whole number (grouped-query
    /// attention when fewer).
    pub kv_heads: usize,
    /// Values per head, in queries, keys and values alike.
    pub head_dim: usize,
    /// The RoPE base frequency (of the global layers, where there are local ones).
    pub(crate) rope_base: f32,
    /// The epsilon added to the mean square in every RMS norm.
    pub(crate) rms_eps: f32,
    /// The window the model was trained for (`<arch>.context_length`).
    pub context_length: usize,
    /// Local layers, where the model has them (`gemma3`).
    pub sliding_window: Option<SlidingWindow>,
    /// Logits pass through `c * tanh(logits / c)` when the file names a cap `c`.
    pub logit_softcap: Option<f32>,
}

/// Gemma 3 makes every sixth layer global unless the file says otherwise.
const GEMMA3_WINDOW_PATTERN: usize = 6;
/// The RoPE base of Gemma 3's local layers unless the file names one.
const GEMMA3_LOCAL_ROPE_BASE: f32 = 10_000.0;

impl Config {
    /// The hyper-parameters `gguf`'s metadata gives; fails on a missing key, an unknown
    /// architecture or an attention shape that does not add up.
    pub(crate) fn from_gguf(gguf: &Gguf) -> Result<Self> {
        let arch_name = gguf.require("general.architecture", "string", Value::as_str)?;
        let architecture = Architecture::from_name(arch_name)?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let count = |k: &str| -> Result<usize> {
            gguf.require(&key(k), "integer", Value::as_u64)
                .map(|v| v as usize)
        };
        let optional = |k: &str| {
            gguf.get(&key(k))
                .and_then(Value::as_u64)
                .map(|v| v as usize)
        };
        let float = |k: &str| gguf.get(&key(k)).and_then(Value::as_f64).map(|v| v as f32);
        let hidden = count("embedding_length")?;
        let heads = count("attention.head_count")?;
        let kv_heads = optional("attention.head_count_kv").unwrap_or(heads);
        let head_dim = optional("attention.key_length")
            .or(optional("rope.dimension_count"))
            .unwrap_or(hidden / heads.max(1));
        let value_dim = optional("attention.value_length").unwrap_or(head_dim);
        let projects_heads = architecture == Architecture::Gemma3;
        if heads == 0
            || kv_heads == 0
            || heads % kv_heads != 0
            || value_dim != head_dim
            || (!projects_heads && head_dim * heads != hidden)
        {
            return Err(Error::BadGguf {
                path: gguf.path.clone(),
                reason: format!(
                    "inconsistent attention shape: {heads} heads, {kv_heads} KV heads, \
                     key size {head_dim}, value size {value_dim}, hidden size {hidden}"
                ),
            });
        }
        let vocab_size = match optional("vocab_size") {
            Some(v) => v,
            None => gguf
                .require("tokenizer.ggml.tokens", "string array", Value::as_strings)?
                .len(),
        };
        let sliding_window = match (architecture, optional("attention.sliding_window")) {
            (Architecture::Gemma3, Some(size)) if size > 0 => Some(SlidingWindow {
                size,
                pattern: optional("attention.sliding_window_pattern")
                    .unwrap_or(GEMMA3_WINDOW_PATTERN)
                    .max(1),
                rope_base: float("rope.freq_base_swa").unwrap_or(GEMMA3_LOCAL_ROPE_BASE),
            }),
            _ => None,
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
            rope_base: float("rope.freq_base").unwrap_or(10_000.0),
            rms_eps: gguf.require(
                &key("attention.layer_norm_rms_epsilon"),
                "float",
                Value::as_f64,
            )? as f32,
            context_length: count("context_length")?,
            sliding_window,
            logit_softcap: float("final_logit_softcapping").filter(|&c| c > 0.0),
        })
    }

    pub(crate) fn rope_style(&self) -> RopeStyle {
        match self.architecture {
            Architecture::Llama => RopeStyle::Adjacent,
            Architecture::Qwen2 | Architecture::Gemma3 => RopeStyle::Halves,
        }
    }

    /// How far back a layer's queries see: `None` where they see every earlier position.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.sliding_window
            .filter(|w| w.is_local(layer))
            .map(|w| w.size)
    }
}
