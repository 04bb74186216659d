//! RMS normalisation.

use super::dense::dot;

/// RMS normalisation of each `weight.len()`-wide row of `x`, in place.
pub(crate) fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let mean_square = dot(row, row) / row.len() as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v *= scale * w;
        }
    }
}
