//! Models: the GGUF file (`gguf`), the hyper-parameters read from its metadata (`config`),
//! and one file per family of networks (`llama`: the `llama` and `qwen2` architectures).

mod config;
pub mod gguf;
mod llama;

pub use config::{Architecture, Config};
pub use llama::{Model, Reads, Step};
