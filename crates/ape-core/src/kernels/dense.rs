//! Dot products of dense vectors (f32, and f16 against f32), with the CPU-feature checks and
//! AVX2 helpers the other kernels share.

use half::f16;

/// Dot product of f16 values with f32 values, accumulated in f32.
pub(crate) fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: `available` checked the CPU features the function is compiled for.
        return unsafe { simd::dot_f16(a, b) };
    }
    a.iter().zip(b).map(|(a, b)| a.to_f32() * b).sum()
}

/// `out[i] = src[i]` widened to f32 (exact). Attention widens every stored key and value
/// it reads, so this runs 16 at a time where the CPU can.
pub(crate) fn widen(src: &[f16], out: &mut [f32]) {
    assert_eq!(src.len(), out.len());
    #[cfg(target_arch = "x86_64")]
    if simd::avx512_available() {
        // SAFETY: the CPU has the features the function is compiled for; lengths checked.
        return unsafe { simd::widen_avx512(src, out) };
    }
    for (o, x) in out.iter_mut().zip(src) {
        *o = x.to_f32();
    }
}

pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: as in `dot_f16`.
        return unsafe { simd::dot_f32(a, b) };
    }
    a.iter().zip(b).map(|(a, b)| a * b).sum()
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod simd {
    use half::f16;
    use std::arch::x86_64::*;

    /// Whether this CPU runs the AVX2 kernels here and in `qdot`.
    pub(crate) fn available() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c")
    }

    /// Whether it also has the 512-bit vectors of AVX-512F and VL.
    pub(crate) fn avx512_available() -> bool {
        available() && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl")
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_f16(p: *const f16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let off = i + 8 * j;
                *acc = _mm256_fmadd_ps(load_f16(pa.add(off)), _mm256_loadu_ps(pb.add(off)), *acc);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(load_f16(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum(sum);
        for j in i..n {
            total += a[j].to_f32() * b[j];
        }
        total
    }

    /// [`super::widen`] on AVX-512: `src` and `out` of one length.
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma,f16c")]
    pub(crate) unsafe fn widen_avx512(src: &[f16], out: &mut [f32]) {
        let n = src.len();
        let (s, o) = (src.as_ptr(), out.as_mut_ptr());
        let mut i = 0;
        while i + 16 <= n {
            let halves = _mm256_loadu_si256(s.add(i).cast());
            _mm512_storeu_ps(o.add(i), _mm512_cvtph_ps(halves));
            i += 16;
        }
        for j in i..n {
            *o.add(j) = (*s.add(j)).to_f32();
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, acc) in acc.iter_mut().enumerate() {
                let off = i + 8 * j;
                *acc = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(off)),
                    _mm256_loadu_ps(pb.add(off)),
                    *acc,
                );
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i)),
                _mm256_loadu_ps(pb.add(i)),
                acc[0],
            );
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum(sum);
        for j in i..n {
            total += a[j] * b[j];
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::pseudo_random;

    #[test]
    fn widening_is_exact_on_every_length() {
        for len in [0, 1, 15, 16, 17, 100] {
            let src: Vec<f16> = pseudo_random(len, 5)
                .iter()
                .map(|&v| f16::from_f32(v))
                .collect();
            let mut out = vec![f32::NAN; len];
            widen(&src, &mut out);
            let want: Vec<f32> = src.iter().map(|x| x.to_f32()).collect();
            assert_eq!(out, want, "len {len}");
        }
    }

    #[test]
    fn simd_dot_matches_scalar_on_odd_lengths() {
        for len in [0, 1, 7, 8, 31, 33, 100] {
            let a = pseudo_random(len, 3);
            let b = pseudo_random(len, 4);
            let a16: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
            let scalar: f32 = a16.iter().zip(&b).map(|(a, b)| a.to_f32() * b).sum();
            assert!((dot_f16(&a16, &b) - scalar).abs() < 1e-5, "len {len}");
        }
    }
}
