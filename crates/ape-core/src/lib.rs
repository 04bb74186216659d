//! ape-core: everything between a GGUF file and generated tokens.
//!
//! A model is read from its GGUF file (`gguf`), its weights dequantized (`quant`) into
//! the layout the kernels want (`kernels`), and run by one forward pass written top to
//! bottom (`model`). Text goes in through the model's own tokenizer (`tokenizer`) and chat
//! template (`chat`); tokens come out through the sampler (`sampler`) and the generation
//! loop (`generate`). Nothing here is asynchronous or knows about HTTP.

pub mod attention;
pub mod chat;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod kernels;
pub mod model;
pub mod qdot;
pub mod quant;
pub mod sampler;
pub mod tokenizer;

pub use error::{Error, Result};
