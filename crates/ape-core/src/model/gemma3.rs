//! The `gemma3` GGUF architecture, read top to bottom in `Gemma3::run_layers`.
//!
//! Against `llama`: the embedding is scaled by the square root of the hidden size; each
//! head's queries and keys are RMS-normed before RoPE (QK-norm); the attention's and the
//! MLP's outputs are RMS-normed again before they join the residual stream; the MLP is
//! GELU-gated; the heads project to more dimensions than the hidden size. Most layers are
//! local: they see only the last `sliding_window` positions and rotate with their own
//! RoPE base; every sixth sees everything (`Config::sliding_window`). The norm weights
//! are used as stored: the GGUF converter has already added Gemma's 1.

use rayon::prelude::*;

use super::activations::{keep_rows, Block};
use super::config::Config;
use super::gguf::Gguf;
use super::weights::{add_in_place, Ends, Loader};
use super::{Attend, Network};
use crate::cancel::Cancel;
use crate::error::Result;
use crate::kernels::{gelu_mul, matmul, matmul_each, rms_norm, Matrix, Rope};

struct Layer {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    wo: Matrix,
    post_attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    w_gate: Matrix,
    w_up: Matrix,
    w_down: Matrix,
    post_ffn_norm: Vec<f32>,
}

pub(super) struct Gemma3 {
    config: Config,
    ends: Ends,
    layers: Vec<Layer>,
    global_rope: Rope,
    local_rope: Rope,
}

impl Gemma3 {
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
                Ok(Layer {
                    attn_norm: loader.vector(&name("attn_norm.weight"), c.hidden)?,
                    wq: loader.matrix(&name("attn_q.weight"), q_dim, c.hidden)?,
                    wk: loader.matrix(&name("attn_k.weight"), kv_dim, c.hidden)?,
                    wv: loader.matrix(&name("attn_v.weight"), kv_dim, c.hidden)?,
                    q_norm: loader.vector(&name("attn_q_norm.weight"), c.head_dim)?,
                    k_norm: loader.vector(&name("attn_k_norm.weight"), c.head_dim)?,
                    wo: loader.matrix(&name("attn_output.weight"), c.hidden, q_dim)?,
                    post_attn_norm: loader.vector(&name("post_attention_norm.weight"), c.hidden)?,
                    ffn_norm: loader.vector(&name("ffn_norm.weight"), c.hidden)?,
                    w_gate: loader.matrix(&name("ffn_gate.weight"), c.ffn_hidden, c.hidden)?,
                    w_up: loader.matrix(&name("ffn_up.weight"), c.ffn_hidden, c.hidden)?,
                    w_down: loader.matrix(&name("ffn_down.weight"), c.hidden, c.ffn_hidden)?,
                    post_ffn_norm: loader.vector(&name("post_ffw_norm.weight"), c.hidden)?,
                })
            })
            .collect::<Result<Vec<Layer>>>()?;
        let local_base = c.sliding_window.map_or(c.rope_base, |w| w.rope_base);
        Ok(Gemma3 {
            ends: Ends::load(&loader, c.vocab_size, c.hidden)?,
            layers,
            global_rope: Rope::new(c.rope_style(), c.head_dim, c.rope_base),
            local_rope: Rope::new(c.rope_style(), c.head_dim, local_base),
            config: c.clone(),
        })
    }
}

impl Network for Gemma3 {
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
        let global_angles = self.global_rope.angles(positions.iter().copied());
        let local_angles = self.local_rope.angles(positions.iter().copied());

        let mut x = vec![0f32; n * c.hidden];
        let embedding_scale = (c.hidden as f32).sqrt();
        for (row, &t) in x.chunks_exact_mut(c.hidden).zip(tokens) {
            self.ends.embedding.dequantize_row(t as usize, row);
            row.iter_mut().for_each(|v| *v *= embedding_scale);
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
            rms_norm(q, &layer.q_norm, c.rms_eps);
            rms_norm(k, &layer.k_norm, c.rms_eps);
            let (rope, angles) = if c.window(li).is_some() {
                (&self.local_rope, &local_angles)
            } else {
                (&self.global_rope, &global_angles)
            };
            for t in 0..n {
                rope.apply(&mut q[t * q_dim..(t + 1) * q_dim], angles, t);
                rope.apply(&mut k[t * kv_dim..(t + 1) * kv_dim], angles, t);
            }
            attend(li, q, k, v, attn);
            if li + 1 == self.layers.len() && read.len() < n {
                n = keep_rows(read, n, &mut x, &mut h, attn);
                if n == 0 {
                    break;
                }
            }
            matmul(&attn[..n * q_dim], &layer.wo, &mut h);
            rms_norm(&mut h, &layer.post_attn_norm, c.rms_eps);
            add_in_place(&mut x, &h);

            h.copy_from_slice(&x);
            rms_norm(&mut h, &layer.ffn_norm, c.rms_eps);
            let [gate, up] = block.mlp(n);
            matmul_each(&h, [&layer.w_gate, &layer.w_up], [&mut *gate, &mut *up]);
            gelu_mul(gate, up);
            matmul(gate, &layer.w_down, &mut h);
            rms_norm(&mut h, &layer.post_ffn_norm, c.rms_eps);
            add_in_place(&mut x, &h);
        }
        Ok(x)
    }

    fn rope(&self, layer: usize) -> &Rope {
        if self.config.window(layer).is_some() {
            &self.local_rope
        } else {
            &self.global_rope
        }
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
