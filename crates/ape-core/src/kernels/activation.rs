//! Activation functions.

/// `gate = silu(gate) * up`, elementwise.
pub(crate) fn silu_mul(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `gate = gelu(gate) * up`, elementwise, with GELU's tanh approximation (as Gemma and
/// llama.cpp compute it), written as `x * sigmoid(2z)`, which is `x * (1 + tanh(z)) / 2`
/// at the cost of one `exp`, as SiLU's.
pub(crate) fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    const TWO_SQRT_2_OVER_PI: f32 = 1.595_769;
    for (g, u) in gate.iter_mut().zip(up) {
        let x = *g;
        let two_z = TWO_SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x);
        *g = x / (1.0 + (-two_z).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gelu_is_the_tanh_approximation() {
        for x in [-12.0f32, -3.0, -0.7, -1e-3, 0.0, 0.4, 1.0, 2.5, 9.0] {
            let mut g = [x];
            gelu_mul(&mut g, &[2.0]);
            let z =
                (2.0 / std::f64::consts::PI).sqrt() * (x as f64 + 0.044715 * (x as f64).powi(3));
            let want = 0.5 * x as f64 * (1.0 + z.tanh()) * 2.0;
            assert!(
                (g[0] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{x}: {} vs {want}",
                g[0]
            );
        }
    }
}
