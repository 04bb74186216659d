use std::path::PathBuf;

/// Everything that can go wrong in the core. Each message says what was wrong and,
/// where there is one, what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read model file {path}: {source}. Check the path, or run `ape model pull` to install the default model")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid GGUF file: {reason}")]
    BadGguf { path: PathBuf, reason: String },
    #[error("GGUF metadata key `{key}` is missing or has the wrong type (expected {expected}); the file was not written for this architecture")]
    Metadata { key: String, expected: &'static str },
    #[error("tensor `{name}` is missing from the model file; it does not look like a complete `{arch}` model")]
    MissingTensor { name: String, arch: String },
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?}")]
    TensorShape {
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("unsupported tensor type {type_name} (ggml type id {id}) in tensor `{tensor}`; supported types: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K")]
    UnsupportedTensorType {
        tensor: String,
        type_name: String,
        id: u32,
    },
    #[error(
        "unsupported model architecture `{0}`; ape runs `llama`, `qwen2` and `gemma3` GGUF models"
    )]
    UnsupportedArchitecture(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("this model has no chat template (a base model, which continues plain text): send the text to continue instead (`ape generate --raw`, or /v1/completions, which also take documents)")]
    NoChatTemplate,
    #[error("the prompt has {tokens} tokens and {max_new} new tokens were asked for, but the model's window is {window} tokens; shorten the prompt or lower the token limit")]
    ContextOverflow {
        tokens: usize,
        max_new: usize,
        window: usize,
    },
    #[error("the text is {bytes} bytes, so at least {at_least} tokens, but the model's window is {window} tokens; shorten it, or send long material as documents (each one its own context)")]
    TextOverflow {
        bytes: usize,
        at_least: usize,
        window: usize,
    },
    #[error("APE needs {prefix} prefix + {longest} (longest context) + {query} query positions and {max_new} new tokens, but the model's window is {window} positions; split the longest context, shorten the query or lower the token limit")]
    ApeWindowOverflow {
        prefix: usize,
        longest: usize,
        query: usize,
        max_new: usize,
        window: usize,
    },
    #[error("this request needs {} MiB of keys and values, more than the whole budget of {} MiB; ask for fewer tokens or fewer documents, or give the server more with --kv-memory", needed >> 20, limit >> 20)]
    KvMemoryTooSmall { needed: usize, limit: usize },
    #[error("this request needs {} MiB of keys and values and {} MiB of the {} MiB budget are free while the running requests hold the rest; try again shortly", needed >> 20, free >> 20, limit >> 20)]
    KvMemoryBusy {
        needed: usize,
        free: usize,
        limit: usize,
    },
    #[error("invalid APE setting: {0}")]
    ApeSetting(String),
    #[error("unknown mode `{0}`; choose one of sequential, parallel, ape")]
    UnknownMode(String),
    #[error("empty query: APE needs at least one query token after the contexts")]
    EmptyQuery,
    #[error("invalid sampling setting: {0}")]
    Sampling(String),
    #[error("empty prompt: there is nothing to generate from")]
    EmptyPrompt,
    #[error("internal error: {0}")]
    Internal(String),
    #[error("the request was cancelled before it finished")]
    Cancelled,
}

pub type Result<T> = std::result::Result<T, Error>;
