//! The buffers a pass of tokens holds through a family's layers. The residual stream and
//! its normed copy live through every layer; the attention's buffers (its output, queries,
//! keys and values) and the MLP's (gate and up) are never needed at the same time, so they
//! take turns in one block, as large as the larger of the two.

use super::config::Config;

/// Bytes of activations a token takes in a pass: the residual stream, its normed copy and
/// its share of the block (f32 each).
pub(super) fn bytes_per_token(c: &Config) -> usize {
    std::mem::size_of::<f32>() * (2 * c.hidden + block_per_token(c))
}

/// Values a token takes in the block: the larger of the attention's and the MLP's.
fn block_per_token(c: &Config) -> usize {
    let (q_dim, kv_dim) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
    (2 * q_dim + 2 * kv_dim).max(2 * c.ffn_hidden)
}

/// The block the attention's and the MLP's buffers take turns in.
pub(super) struct Block {
    values: Vec<f32>,
    q_dim: usize,
    kv_dim: usize,
    ffn_hidden: usize,
}

impl Block {
    /// A block for passes of up to `n` tokens.
    pub(super) fn new(c: &Config, n: usize) -> Self {
        Block {
            values: vec![0.0; n * block_per_token(c)],
            q_dim: c.heads * c.head_dim,
            kv_dim: c.kv_heads * c.head_dim,
            ffn_hidden: c.ffn_hidden,
        }
    }

    /// The attention's output, queries, keys and values for `n` tokens. The output comes
    /// first, so that its rows kept by [`keep_rows`] stay at the start of the block.
    pub(super) fn attention(&mut self, n: usize) -> [&mut [f32]; 4] {
        let (q, kv) = (n * self.q_dim, n * self.kv_dim);
        split(&mut self.values, [q, q, kv, kv])
    }

    /// The MLP's gate and up projections for `n` tokens.
    pub(super) fn mlp(&mut self, n: usize) -> [&mut [f32]; 2] {
        let f = n * self.ffn_hidden;
        split(&mut self.values, [f, f])
    }
}

/// The first `lens` values of `values`, one after another, as separate slices.
fn split<const B: usize>(values: &mut [f32], lens: [usize; B]) -> [&mut [f32]; B] {
    let mut rest = values;
    lens.map(|len| {
        let (part, after) = std::mem::take(&mut rest).split_at_mut(len);
        rest = after;
        part
    })
}

/// Keep only rows `read` (increasing indices among the `n` rows going on) of the residual
/// stream `x`, its normed copy `h` and the attention's output `attn`: each moved to the
/// first rows in order, `x` and `h` cut to them. Returns how many rows go on.
pub(super) fn keep_rows(
    read: &[usize],
    n: usize,
    x: &mut Vec<f32>,
    h: &mut Vec<f32>,
    attn: &mut [f32],
) -> usize {
    let hidden = x.len() / n;
    for rows in [&mut x[..], &mut h[..], attn] {
        let width = rows.len() / n;
        for (to, &from) in read.iter().enumerate() {
            rows.copy_within(from * width..(from + 1) * width, to * width);
        }
    }
    x.truncate(read.len() * hidden);
    h.truncate(read.len() * hidden);
    read.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_rows_move_to_the_front_in_order() {
        let mut wide: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let mut normed = wide.clone();
        let mut narrow: Vec<f32> = (0..8).map(|i| i as f32).collect();
        assert_eq!(
            keep_rows(&[1, 3], 4, &mut wide, &mut normed, &mut narrow),
            2
        );
        assert_eq!(wide, [3.0, 4.0, 5.0, 9.0, 10.0, 11.0]);
        assert_eq!(normed, wide);
        assert_eq!(narrow[..4], [2.0, 3.0, 6.0, 7.0]);
    }

    #[test]
    fn the_buffers_split_off_the_block_lie_one_after_another() {
        let mut block = vec![0.0; 10];
        let [a, b, c] = split(&mut block, [2, 3, 4]);
        (a[0], b[0], c[0], c[3]) = (1.0, 2.0, 3.0, 4.0);
        assert_eq!(block, [1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0, 4.0, 0.0]);
    }
}
