//! ape-core: everything between a GGUF file and generated tokens.
//!
//! A model is read from its GGUF file and metadata (`model::gguf`, `model::Config`) and run
//! by one forward pass per family, written top to bottom (`model`), on the numeric kernels
//! (`kernels`: quantized and dense products, norms, RoPE) and the attention kernel with its
//! KV cache (`attention`). Text goes in through the model's own tokenizer (`tokenizer`);
//! the engine (`engine`) splits a request by the chat template into prefix, contexts and
//! query, caches and encodes, recomputes, scores, and runs the generation loop and the
//! sampler. Nothing here is asynchronous or knows about HTTP.

#![warn(missing_docs)]

pub mod attention;
mod cancel;
pub mod engine;
mod error;
pub mod kernels;
pub mod model;
pub mod tokenizer;

pub use error::{Error, Result};
