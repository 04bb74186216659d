//! Rotary position embeddings.

/// How a model pairs the dimensions it rotates: GGUF `llama` files rotate adjacent pairs
/// (their converter permuted Q and K to make it so), `qwen2` rotates dimension `i` with
/// `i + d/2` (the "NeoX" layout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeStyle {
    /// Dimension `2i` turns with `2i + 1` (`llama`).
    Adjacent,
    /// Dimension `i` turns with `i + head_dim / 2` (`qwen2`, `gemma3`).
    Halves,
}

/// Rotary position embeddings with the model's base frequency.
pub(crate) struct Rope {
    /// Which dimensions of a head are rotated together.
    pub(crate) style: RopeStyle,
    head_dim: usize,
    inv_freq: Vec<f32>,
}

/// cos and sin of `position * theta_i` for a run of positions, computed once per forward
/// call and shared by every layer and head.
pub(crate) struct RopeAngles {
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    /// Rotations of heads of `head_dim` values, pair `i` turning at frequency
    /// `base^(-2i / head_dim)` per position.
    pub(crate) fn new(style: RopeStyle, head_dim: usize, base: f32) -> Self {
        let inv_freq = (0..head_dim / 2)
            .map(|i| 1.0 / base.powf(2.0 * i as f32 / head_dim as f32))
            .collect();
        Rope {
            style,
            head_dim,
            inv_freq,
        }
    }

    /// The angles of `positions`, in order: the `t`-th is what [`Rope::apply`] takes as
    /// `t`.
    pub(crate) fn angles(&self, positions: impl Iterator<Item = usize>) -> RopeAngles {
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for p in positions {
            for &freq in &self.inv_freq {
                let (s, c) = (p as f32 * freq).sin_cos();
                cos.push(c);
                sin.push(s);
            }
        }
        RopeAngles { cos, sin }
    }

    /// Rotate every head in `x` (a row of `heads * head_dim` values) by the angles of the
    /// `t`-th position in `angles`.
    pub(crate) fn apply(&self, x: &mut [f32], angles: &RopeAngles, t: usize) {
        self.rotate(x, angles, t, 1.0);
    }

    /// Undo [`Rope::apply`]: turn each head of `x` back by the angles of entry `t`.
    pub(crate) fn unapply(&self, x: &mut [f32], angles: &RopeAngles, t: usize) {
        self.rotate(x, angles, t, -1.0);
    }

    fn rotate(&self, x: &mut [f32], angles: &RopeAngles, t: usize, direction: f32) {
        let half = self.head_dim / 2;
        let cos = &angles.cos[t * half..(t + 1) * half];
        let sin = &angles.sin[t * half..(t + 1) * half];
        for head in x.chunks_exact_mut(self.head_dim) {
            for i in 0..half {
                let (a, b) = match self.style {
                    RopeStyle::Adjacent => (2 * i, 2 * i + 1),
                    RopeStyle::Halves => (i, i + half),
                };
                let (x0, x1, sin) = (head[a], head[b], direction * sin[i]);
                head[a] = x0 * cos[i] - x1 * sin;
                head[b] = x0 * sin + x1 * cos[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rope_styles_rotate_different_pairs() {
        let rope = Rope::new(RopeStyle::Adjacent, 4, 10000.0);
        let mut adjacent = vec![1.0, 0.0, 0.0, 0.0];
        rope.apply(&mut adjacent, &rope.angles(1..2), 0);
        assert!((adjacent[1] - 1f32.sin()).abs() < 1e-6 && adjacent[2] == 0.0);
        let rope = Rope::new(RopeStyle::Halves, 4, 10000.0);
        let mut halves = vec![1.0, 0.0, 0.0, 0.0];
        rope.apply(&mut halves, &rope.angles(1..2), 0);
        assert!((halves[2] - 1f32.sin()).abs() < 1e-6 && halves[1] == 0.0);
    }
}
