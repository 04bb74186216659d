//! The one error type of the core, [`Error`], and its [`Result`].

use std::path::PathBuf;

/// Everything that can go wrong in the core. Each message says what was wrong and,
/// where there is one, what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model file could not be opened or memory-mapped (a wrong path, a missing
    /// file, no permission).
    #[error("cannot read model file {path}: {source}. Check the path, or run `ape model pull` to install the default model")]
    Open {
        /// The file as it was given.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is not a GGUF file ape can read: wrong magic or version, a header cut
    /// short, a tensor beyond the end of the file, or an attention shape that does not
    /// add up. Usually a truncated download or another format.
    #[error("{path} is not a valid GGUF file: {reason}")]
    BadGguf {
        /// The file being read.
        path: PathBuf,
        /// The first problem found, in words.
        reason: String,
    },
    /// A metadata key the model, tokenizer or chat template needs is absent or holds
    /// another type of value.
    #[error("GGUF metadata key `{key}` is missing or has the wrong type (expected {expected}); the file was not written for this architecture")]
    Metadata {
        /// The full key, e.g. `llama.block_count`.
        key: String,
        /// The kind of value that was wanted, e.g. `integer`.
        expected: &'static str,
    },
    /// A weight the architecture's forward pass reads is not in the file: a partial
    /// export, or a file of a variant ape does not know.
    #[error("tensor `{name}` is missing from the model file; it does not look like a complete `{arch}` model")]
    MissingTensor {
        /// The GGUF tensor name, e.g. `blk.0.attn_q.weight`.
        name: String,
        /// The architecture the file declares.
        arch: String,
    },
    /// A weight's dimensions do not match what the metadata implies for it.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        /// The GGUF tensor name.
        name: String,
        /// Dimensions found in the file, in GGUF order (innermost first).
        got: Vec<usize>,
        /// Dimensions the hyper-parameters call for, in the same order.
        expected: Vec<usize>,
    },
    /// A tensor is stored in a GGML type ape has no kernel for; a file quantized to
    /// one of the listed types is needed.
    #[error("unsupported tensor type {type_name} (ggml type id {id}) in tensor `{tensor}`; supported types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K")]
    UnsupportedTensorType {
        /// The GGUF tensor name.
        tensor: String,
        /// GGML's name for the type, or `unknown` for an id GGML does not define.
        type_name: String,
        /// The type id as stored in the file.
        id: u32,
    },
    /// `general.architecture` names a network family ape does not run (the name is
    /// carried).
    #[error(
        "unsupported model architecture `{0}`; ape runs `llama`, `qwen2` and `gemma3` GGUF models"
    )]
    UnsupportedArchitecture(String),
    /// The file's vocabulary cannot be turned into a tokenizer (an unknown tokenizer model
    /// or pre-tokenizer, inconsistent merges or special tokens), or a text cannot be
    /// split by it.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The model's chat template does not compile, fails to render a conversation, or
    /// renders it in a way ape cannot split into prefix, contexts and query.
    #[error("chat template: {0}")]
    Template(String),
    /// A chat request was made to a base model, which has no chat template; the caller
    /// should send plain text to continue instead.
    #[error("this model has no chat template (a base model, which continues plain text): send the text to continue instead (`ape generate --raw`, or /v1/completions, which also take documents)")]
    NoChatTemplate,
    /// A sequential request, or a prefix, does not fit the model's window with the new
    /// tokens asked for.
    #[error("the prompt has {tokens} tokens and {max_new} new tokens were asked for, but the model's window is {window} tokens; shorten the prompt or lower the token limit")]
    ContextOverflow {
        /// Prompt tokens.
        tokens: usize,
        /// New tokens asked for (the rest of the window when no limit was given).
        max_new: usize,
        /// The model's context length, in tokens.
        window: usize,
    },
    /// A text is refused before tokenizing because even its shortest possible
    /// tokenization is longer than the window.
    #[error("the text is {bytes} bytes, so at least {at_least} tokens, but the model's window is {window} tokens; shorten it, or send long material as documents (each one its own context)")]
    TextOverflow {
        /// Length of the text in bytes.
        bytes: usize,
        /// A lower bound on its tokens.
        at_least: usize,
        /// The model's context length, in tokens.
        window: usize,
    },
    /// An APE request (or a context encoded after a prefix) does not fit the window: the
    /// query side starts after the prefix and the longest context, and must end inside it.
    #[error("APE needs {prefix} prefix + {longest} (longest context) + {query} query positions and {max_new} new tokens, but the model's window is {window} positions; split the longest context, shorten the query or lower the token limit")]
    ApeWindowOverflow {
        /// Tokens of the shared prefix.
        prefix: usize,
        /// Tokens of the longest context.
        longest: usize,
        /// Tokens of the query (0 when only contexts are encoded).
        query: usize,
        /// New tokens asked for (0 when only contexts are encoded).
        max_new: usize,
        /// The model's context length, in positions.
        window: usize,
    },
    /// A request needs more key/value memory than the whole KV budget, so it can never
    /// run with this budget; retrying does not help.
    #[error("this request needs {} MiB of keys and values, more than the whole budget of {} MiB; ask for fewer tokens or fewer documents, or give the server more with --kv-memory", needed >> 20, limit >> 20)]
    KvMemoryTooSmall {
        /// Bytes the request would hold.
        needed: usize,
        /// The budget's size in bytes.
        limit: usize,
    },
    /// A request would fit the KV budget, but running requests hold too much of it
    /// now; the same request can be retried later.
    #[error("this request needs {} MiB of keys and values and {} MiB of the {} MiB budget are free while the running requests hold the rest; try again shortly", needed >> 20, free >> 20, limit >> 20)]
    KvMemoryBusy {
        /// Bytes the request would hold.
        needed: usize,
        /// Bytes of the budget not charged when it was refused.
        free: usize,
        /// The budget's size in bytes.
        limit: usize,
    },
    /// An APE factor or recompute setting is out of range, or given to a mode that
    /// does not use it.
    #[error("invalid APE setting: {0}")]
    ApeSetting(String),
    /// A mode name other than `sequential`, `parallel` or `ape` (the name is carried).
    #[error("unknown mode `{0}`; choose one of sequential, parallel, ape")]
    UnknownMode(String),
    /// A prompt has no query tokens after its contexts, which APE generation and scoring
    /// both need.
    #[error("empty query: APE needs at least one query token after the contexts")]
    EmptyQuery,
    /// A sampling setting (temperature, top-p, min-p, repetition penalty) is out of its
    /// range.
    #[error("invalid sampling setting: {0}")]
    Sampling(String),
    /// Generation was asked for with no prompt tokens to start from.
    #[error("empty prompt: there is nothing to generate from")]
    EmptyPrompt,
    /// A bug or a failure inside ape, not caused by the request (a batched forward
    /// pass that failed, for one); the log has the details.
    #[error("internal error: {0}")]
    Internal(String),
    /// The request's [`Cancel`](crate::engine::generate::Cancel) flag was raised before
    /// it finished (a client that went away, a deadline that passed).
    #[error("the request was cancelled before it finished")]
    Cancelled,
}

/// The core's results: [`Error`] on failure.
pub type Result<T> = std::result::Result<T, Error>;
