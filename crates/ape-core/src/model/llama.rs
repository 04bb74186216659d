//! The decoder-only transformer of the `llama` and `qwen2` GGUF architectures, read top
//! to bottom in `Llama::run_layers`: a token from its embedding row to its last hidden
//! state.
//!
//! Both are the same network: RMS norm, grouped-query attention with RoPE, a SwiGLU MLP.
//! `qwen2` adds biases to the Q, K and V projections and rotates the halves of each head
//! instead of adjacent pairs. Everything else is read from the file's metadata.

use rayon::prelude::*;

use super::activations::{keep_rows, Block};
use super::config::{Architecture, Config};
use super::gguf::Gguf;
use super::weights::{add_in_place, Ends, Loader};
use super::{Attend, Network};
use crate::cancel::Cancel;
use crate::error::Result;
use crate::kernels::{matmul, matmul_each, rms_norm, silu_mul, Matrix, Rope};

struct Layer {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    /// Q, K, V biases (`qwen2` only).
    qkv_bias: Option<[Vec<f32>; 3]>,
    wo: Matrix,
    ffn_norm: Vec<f32>,
    w_gate: Matrix,
    w_up: Matrix,
    w_down: Matrix,
}

pub(super) struct Llama {
    config: Config,
    ends: Ends,
    layers: Vec<Layer>,
    rope: Rope,
}

impl Llama {
    pub(super) fn load(gguf: &Gguf, config: &Config) -> Result<Self> {
        let c = config;
        let loader = Loader {
            gguf,
            arch: c.architecture.name(),
        };
        let (q_dim, kv_dim) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let layers = (0..c.layers)
            .into_par_iter()
            .map(|i| {
                let name = |t: &str| format!("blk.{i}.{t}");
                let qkv_bias = match c.architecture {
                    Architecture::Qwen2 => Some([
                        loader.vector(&name("attn_q.bias"), q_dim)?,
                        loader.vector(&name("attn_k.bias"), kv_dim)?,
                        loader.vector(&name("attn_v.bias"), kv_dim)?,
                    ]),
                    _ => None,
                };
                Ok(Layer {
                    attn_norm: loader.vector(&name("attn_norm.weight"), c.hidden)?,
                    wq: loader.matrix(&name("attn_q.weight"), q_dim, c.hidden)?,
                    wk: loader.matrix(&name("attn_k.weight"), kv_dim, c.hidden)?,
                    wv: loader.matrix(&name("attn_v.weight"), kv_dim, c.hidden)?,
                    qkv_bias,
                    wo: loader.matrix(&name("attn_output.weight"), c.hidden, q_dim)?,
                    ffn_norm: loader.vector(&name("ffn_norm.weight"), c.hidden)?,
                    w_gate: loader.matrix(&name("ffn_gate.weight"), c.ffn_hidden, c.hidden)?,
                    w_up: loader.matrix(&name("ffn_up.weight"), c.ffn_hidden, c.hidden)?,
                    w_down: loader.matrix(&name("ffn_down.weight"), c.hidden, c.ffn_hidden)?,
                })
            })
            .collect::<Result<Vec<Layer>>>()?;
        Ok(Llama {
            ends: Ends::load(&loader, c.vocab_size, c.hidden)?,
            layers,
            rope: Rope::new(c.rope_style(), c.head_dim, c.rope_base),
            config: c.clone(),
        })
    }
}

impl Network for Llama {
    fn run_layers(
        &self,
        tokens: &[u32],
        positions: &[usize],
        read: &[usize],
        cancel: &Cancel,
        attend: &mut Attend<'_>,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let n = tokens.len();
        let (q_dim, kv_dim) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let angles = self.rope.angles(positions.iter().copied());

        let mut x = vec![0f32; n * c.hidden];
        for (row, &t) in x.chunks_exact_mut(c.hidden).zip(tokens) {
            self.ends.embedding.dequantize_row(t as usize, row);
        }

        let mut h = vec![0f32; n * c.hidden];
        let mut block = Block::new(c, n);
        // Tokens still going on: only those read are, past the last layer's attention.
        let mut n = n;

        for (li, layer) in self.layers.iter().enumerate() {
            cancel.check()?;
            h.copy_from_slice(&x);
            rms_norm(&mut h, &layer.attn_norm, c.rms_eps);
            let [attn, q, k, v] = block.attention(n);
            matmul_each(
                &h,
                [&layer.wq, &layer.wk, &layer.wv],
                [&mut *q, &mut *k, &mut *v],
            );
            if let Some([bq, bk, bv]) = &layer.qkv_bias {
                add_bias(q, bq);
                add_bias(k, bk);
                add_bias(v, bv);
            }
            for t in 0..n {
                self.rope
                    .apply(&mut q[t * q_dim..(t + 1) * q_dim], &angles, t);
                self.rope
                    .apply(&mut k[t * kv_dim..(t + 1) * kv_dim], &angles, t);
            }
            attend(li, q, k, v, attn);
            if li + 1 == self.layers.len() && read.len() < n {
                n = keep_rows(read, n, &mut x, &mut h, attn);
                if n == 0 {
                    break;
                }
            }
            matmul(&attn[..n * q_dim], &layer.wo, &mut h);
            add_in_place(&mut x, &h);

            h.copy_from_slice(&x);
            rms_norm(&mut h, &layer.ffn_norm, c.rms_eps);
            let [gate, up] = block.mlp(n);
            matmul_each(&h, [&layer.w_gate, &layer.w_up], [&mut *gate, &mut *up]);
            silu_mul(gate, up);
            matmul(gate, &layer.w_down, &mut h);
            add_in_place(&mut x, &h);
        }
        Ok(x)
    }

    fn rope(&self, _layer: usize) -> &Rope {
        &self.rope
    }

    fn output(&self) -> (&[f32], &Matrix) {
        self.ends.output()
    }

    fn weight_bytes(&self) -> usize {
        self.ends.bytes_with(
            self.layers
                .iter()
                .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]),
        )
    }
}

fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len()) {
        add_in_place(row, bias);
    }
}
