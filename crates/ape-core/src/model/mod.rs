//! Models: the GGUF file (`gguf`), the hyper-parameters read from its metadata (`config`),
//! one file per family of networks (`llama`: the `llama` and `qwen2` architectures;
//! `gemma3`), and the passes ape runs over any of them (`passes`: sequential reading,
//! contexts encoded after a prefix, APE's query side, recomputing in place, batches of
//! all of these).

mod activations;
mod config;
mod gemma3;
pub mod gguf;
mod llama;
mod passes;
mod weights;

pub use config::{Config, SlidingWindow};
pub use passes::Model;
pub(crate) use passes::{Reads, Step};

use crate::cancel::Cancel;
use crate::error::Result;
use crate::kernels::{Matrix, Rope};

/// Attention supplied to a network's layers: `attend(layer, q, k, v, out)`, with `q` and
/// `k` after RoPE; it keeps `k` and `v` wherever it reads keys from and writes `out`.
type Attend<'a> = dyn FnMut(usize, &[f32], &[f32], &[f32], &mut [f32]) + Send + 'a;

/// One family of networks: its weights and its layers, from a token's embedding to its
/// last hidden state. The passes over a model are written once, over this.
trait Network: Send + Sync {
    /// The layers over `tokens` at `positions`, attention supplied by `attend`; returns
    /// the hidden states after the last layer of the tokens `read` (increasing indices into
    /// `tokens`), in order. The other tokens stop after the last layer's attention: their
    /// keys and values are all a caller keeps of them. Checks `cancel` before each layer.
    fn run_layers(
        &self,
        tokens: &[u32],
        positions: &[usize],
        read: &[usize],
        cancel: &Cancel,
        attend: &mut Attend<'_>,
    ) -> Result<Vec<f32>>;

    /// The rotation a layer's keys were given for their positions.
    fn rope(&self, layer: usize) -> &Rope;

    /// The norm before the output projection, and the projection.
    fn output(&self) -> (&[f32], &Matrix);

    /// Bytes held by the weight matrices.
    fn weight_bytes(&self) -> usize;
}
