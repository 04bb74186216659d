//! The arithmetic of attention on lanes of query rows, written once in plain Rust and
//! compiled for the best vector unit the CPU has. Every lane does the same operations in
//! the same order as it would alone, so the instruction set changes speed, not results.

use super::attend::{Lanes, LANES};

/// Keys scored at once: independent chains of multiply-adds to keep the unit busy.
const KEY_TILE: usize = 8;

/// `out[j][l]`: the score of key `j` (rows of `d` in `keys`, key `first + j` of the
/// job) for row `l` of `q`, `-inf` where the row does not see it.
pub(super) fn score(
    q: &[Lanes],
    keys: &[f32],
    first: usize,
    seen: &[usize; LANES],
    out: &mut [Lanes],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::dense::simd::avx512_available() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { avx512::score(q, keys, first, seen, out) };
        }
        if crate::kernels::dense::simd::available() {
            // SAFETY: as above.
            return unsafe { score_avx2(q, keys, first, seen, out) };
        }
    }
    score_body(q, keys, first, seen, out)
}

/// Turn `scores` into weights `exp(score - max)` in place and add, for each row, the
/// weights to `sum` and the weighted `values` (rows of `d`) to `acc`, key by key. Only the
/// first `rows` lanes hold rows; the others may be left as they are.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(super) fn weigh(
    scores: &mut [Lanes],
    max: &Lanes,
    values: &[f32],
    sum: &mut Lanes,
    acc: &mut [Lanes],
    rows: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        if crate::kernels::dense::simd::avx512_available() {
            // SAFETY: the CPU has the features the function is compiled for.
            return unsafe { avx512::weigh(scores, max, values, sum, acc, rows) };
        }
        if crate::kernels::dense::simd::available() {
            // SAFETY: as above.
            return unsafe { weigh_avx2(scores, max, values, sum, acc) };
        }
    }
    weigh_body(scores, max, values, sum, acc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_avx2(
    q: &[Lanes],
    keys: &[f32],
    first: usize,
    seen: &[usize; LANES],
    out: &mut [Lanes],
) {
    score_body(q, keys, first, seen, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn weigh_avx2(
    scores: &mut [Lanes],
    max: &Lanes,
    values: &[f32],
    sum: &mut Lanes,
    acc: &mut [Lanes],
) {
    weigh_body(scores, max, values, sum, acc)
}

/// The same operations written with AVX-512 intrinsics, one row lane per vector lane:
/// the compiler does not keep the generic version's tiles in registers.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Lanes, FEW_ROWS, FEW_ROWS_TILE, KEY_TILE, LANES, VALUE_TILE};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) unsafe fn score(
        q: &[Lanes],
        keys: &[f32],
        first: usize,
        seen: &[usize; LANES],
        out: &mut [Lanes],
    ) {
        let d = q.len();
        assert_eq!(keys.len(), out.len() * d);
        let seen: [u32; LANES] = seen.map(|s| s.min(u32::MAX as usize) as u32);
        let seen = _mm512_loadu_si512(seen.as_ptr().cast());
        let masked = |s: __m512, key: usize| {
            let visible = _mm512_cmpgt_epu32_mask(seen, _mm512_set1_epi32(key as i32));
            _mm512_mask_mov_ps(_mm512_set1_ps(f32::NEG_INFINITY), visible, s)
        };
        let (k, o) = (keys.as_ptr(), out.as_mut_ptr().cast::<f32>());
        let n = out.len();
        let mut at = 0;
        while at + KEY_TILE <= n {
            let mut s = [_mm512_setzero_ps(); KEY_TILE];
            for (i, q) in q.iter().enumerate() {
                let q = _mm512_loadu_ps(q.as_ptr());
                for (t, s) in s.iter_mut().enumerate() {
                    let key = _mm512_set1_ps(*k.add((at + t) * d + i));
                    *s = _mm512_fmadd_ps(q, key, *s);
                }
            }
            for (t, s) in s.into_iter().enumerate() {
                _mm512_storeu_ps(o.add((at + t) * LANES), masked(s, first + at + t));
            }
            at += KEY_TILE;
        }
        while at < n {
            let mut s = _mm512_setzero_ps();
            for (i, q) in q.iter().enumerate() {
                let key = _mm512_set1_ps(*k.add(at * d + i));
                s = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr()), key, s);
            }
            _mm512_storeu_ps(o.add(at * LANES), masked(s, first + at));
            at += 1;
        }
    }

    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    pub(super) unsafe fn weigh(
        scores: &mut [Lanes],
        max: &Lanes,
        values: &[f32],
        sum: &mut Lanes,
        acc: &mut [Lanes],
        rows: usize,
    ) {
        let d = acc.len();
        assert_eq!(values.len(), scores.len() * d);
        let max = _mm512_loadu_ps(max.as_ptr());
        let none = _mm512_cmp_ps_mask(max, _mm512_set1_ps(f32::NEG_INFINITY), _CMP_EQ_OQ);
        let shift = _mm512_mask_mov_ps(max, none, _mm512_setzero_ps());
        let mut total = _mm512_loadu_ps(sum.as_ptr());
        for s in scores.iter_mut() {
            let w = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s.as_ptr()), shift));
            _mm512_storeu_ps(s.as_mut_ptr(), w);
            total = _mm512_add_ps(total, w);
        }
        _mm512_storeu_ps(sum.as_mut_ptr(), total);
        if rows <= FEW_ROWS && d.is_multiple_of(FEW_ROWS_TILE) {
            for first in (0..rows).step_by(4) {
                match rows - first {
                    1 => weigh_few::<1>(scores, values, acc, first),
                    2 => weigh_few::<2>(scores, values, acc, first),
                    3 => weigh_few::<3>(scores, values, acc, first),
                    _ => weigh_few::<4>(scores, values, acc, first),
                }
            }
            return;
        }
        let v = values.as_ptr();
        for (tile, acc) in (0..d).step_by(VALUE_TILE).zip(acc.chunks_mut(VALUE_TILE)) {
            let width = acc.len();
            let mut a = [_mm512_setzero_ps(); VALUE_TILE];
            for (a, acc) in a.iter_mut().zip(acc.iter()) {
                *a = _mm512_loadu_ps(acc.as_ptr());
            }
            for (j, w) in scores.iter().enumerate() {
                let w = _mm512_loadu_ps(w.as_ptr());
                let row = v.add(j * d + tile);
                if width == VALUE_TILE {
                    for (e, a) in a.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(w, _mm512_set1_ps(*row.add(e)), *a);
                    }
                } else {
                    for (e, a) in a[..width].iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(w, _mm512_set1_ps(*row.add(e)), *a);
                    }
                }
            }
            for (a, acc) in a.iter().zip(acc.iter_mut()) {
                _mm512_storeu_ps(acc.as_mut_ptr(), *a);
            }
        }
    }

    /// The weighted values of `R` rows from lane `first` on, with a row's value elements
    /// in the vector lanes instead: a few rows (a decoded token's heads) then take a few
    /// multiply-adds per key instead of one per element. Each element's sum is the same
    /// chain of multiply-adds in key order as in the row lanes, so the bits are the same.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn weigh_few<const R: usize>(
        weights: &[Lanes],
        values: &[f32],
        acc: &mut [Lanes],
        first: usize,
    ) {
        let d = acc.len();
        const VECTORS: usize = FEW_ROWS_TILE / 16;
        // Element e of row lane l is at `e * LANES + l` in `acc`.
        let stride = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32(LANES as i32),
        );
        let base = acc.as_mut_ptr().cast::<f32>();
        for tile in (0..d).step_by(FEW_ROWS_TILE) {
            let mut a = [[_mm512_setzero_ps(); VECTORS]; R];
            for (r, a) in a.iter_mut().enumerate() {
                for (c, a) in a.iter_mut().enumerate() {
                    let at = base.add((tile + 16 * c) * LANES + first + r);
                    *a = _mm512_i32gather_ps::<4>(stride, at.cast());
                }
            }
            for (j, w) in weights.iter().enumerate() {
                let row = values.as_ptr().add(j * d + tile);
                let v: [__m512; VECTORS] =
                    std::array::from_fn(|c| _mm512_loadu_ps(row.add(16 * c)));
                for (r, a) in a.iter_mut().enumerate() {
                    let w = _mm512_set1_ps(w[first + r]);
                    for (a, v) in a.iter_mut().zip(v) {
                        *a = _mm512_fmadd_ps(w, v, *a);
                    }
                }
            }
            for (r, a) in a.iter().enumerate() {
                for (c, a) in a.iter().enumerate() {
                    let at = base.add((tile + 16 * c) * LANES + first + r);
                    _mm512_i32scatter_ps::<4>(at.cast(), stride, *a);
                }
            }
        }
    }

    /// The generic `exp_nonpositive`, lane for lane.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn exp_nonpositive(x: __m512) -> __m512 {
        let underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0), _CMP_LT_OQ);
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let n = _mm512_roundscale_ps(
            _mm512_mul_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            5.0e-1,
        ] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
        }
        let y = _mm512_add_ps(
            _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r),
            _mm512_set1_ps(1.0),
        );
        let scale = _mm512_slli_epi32::<23>(_mm512_add_epi32(
            _mm512_cvtps_epi32(n),
            _mm512_set1_epi32(127),
        ));
        let y = _mm512_mul_ps(y, _mm512_castsi512_ps(scale));
        _mm512_mask_mov_ps(y, underflow, _mm512_setzero_ps())
    }
}

#[inline(always)]
fn score_body(q: &[Lanes], keys: &[f32], first: usize, seen: &[usize; LANES], out: &mut [Lanes]) {
    let d = q.len();
    assert_eq!(keys.len(), out.len() * d);
    let mut tiles = keys.chunks_exact(KEY_TILE * d);
    let mut at = 0;
    for tile in tiles.by_ref() {
        let mut s = [[0f32; LANES]; KEY_TILE];
        for (i, q) in q.iter().enumerate() {
            for (k, s) in s.iter_mut().enumerate() {
                let key = tile[k * d + i];
                for (s, q) in s.iter_mut().zip(q) {
                    *s = q.mul_add(key, *s);
                }
            }
        }
        for (k, s) in s.into_iter().enumerate() {
            out[at + k] = masked(s, first + at + k, seen);
        }
        at += KEY_TILE;
    }
    for key in tiles.remainder().chunks_exact(d) {
        let mut s = [0f32; LANES];
        for (q, &key) in q.iter().zip(key) {
            for (s, q) in s.iter_mut().zip(q) {
                *s = q.mul_add(key, *s);
            }
        }
        out[at] = masked(s, first + at, seen);
        at += 1;
    }
}

#[inline(always)]
fn masked(s: Lanes, key: usize, seen: &[usize; LANES]) -> Lanes {
    std::array::from_fn(|l| {
        if key < seen[l] {
            s[l]
        } else {
            f32::NEG_INFINITY
        }
    })
}

/// Value elements one pass keeps in registers for every lane.
const VALUE_TILE: usize = 16;

/// At most this many rows are weighed with value elements in the vector lanes.
const FEW_ROWS: usize = 8;

/// Value elements a few-rows pass keeps in registers for each row.
const FEW_ROWS_TILE: usize = 64;

#[inline(always)]
fn weigh_body(
    scores: &mut [Lanes],
    max: &Lanes,
    values: &[f32],
    sum: &mut Lanes,
    acc: &mut [Lanes],
) {
    let d = acc.len();
    assert_eq!(values.len(), scores.len() * d);
    // A row that sees no key has no maximum; its weights are all zero.
    let shift: Lanes = std::array::from_fn(|l| {
        if max[l] == f32::NEG_INFINITY {
            0.0
        } else {
            max[l]
        }
    });
    for s in scores.iter_mut() {
        for ((w, s), m) in s.iter_mut().zip(sum.iter_mut()).zip(&shift) {
            *w = exp_nonpositive(*w - m);
            *s += *w;
        }
    }
    for (tile, acc) in (0..d).step_by(VALUE_TILE).zip(acc.chunks_mut(VALUE_TILE)) {
        let width = acc.len();
        let mut a = [[0f32; LANES]; VALUE_TILE];
        a[..width].copy_from_slice(acc);
        for (w, v) in scores.iter().zip(values.chunks_exact(d)) {
            let v = &v[tile..tile + width];
            for (a, &v) in a.iter_mut().zip(v) {
                for (a, w) in a.iter_mut().zip(w) {
                    *a = w.mul_add(v, *a);
                }
            }
        }
        acc.copy_from_slice(&a[..width]);
    }
}

/// exp(x) for x <= 0 (or -inf), by range reduction to r in [-ln2/2, ln2/2] and a
/// degree-6 polynomial (relative error about 2e-7); inputs below -87 give 0.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    let underflow = x < -87.0;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = (-n).mul_add(0.693_145_75, x);
    let r = (-n).mul_add(1.428_606_8e-6, r);
    let mut p: f32 = 1.987_569_1e-4;
    for c in [
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        5.0e-1,
    ] {
        p = p.mul_add(r, c);
    }
    let y = p.mul_add(r * r, r) + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if underflow {
        0.0
    } else {
        y * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lanes(n: usize, seed: u32) -> Vec<Lanes> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(7);
        (0..n)
            .map(|_| {
                std::array::from_fn(|_| {
                    s ^= s << 13;
                    s ^= s >> 17;
                    s ^= s << 5;
                    (s as f32 / u32::MAX as f32) * 4.0 - 2.0
                })
            })
            .collect()
    }

    #[test]
    fn exp_matches_libm() {
        for i in 0..1000 {
            let x = -(i as f32) * 0.1;
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1e-30),
                "{x}: {got} vs {want}"
            );
        }
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    /// The vector units the CPU has give the portable code's bits.
    #[test]
    fn every_instruction_set_gives_the_same_bits() {
        let (d, keys) = (64, 37);
        let q = lanes(d, 1);
        let k: Vec<f32> = lanes(keys * d / LANES, 2).concat();
        let v: Vec<f32> = lanes(keys * d / LANES, 3).concat();
        let seen: [usize; LANES] = std::array::from_fn(|l| 20 + l);
        let mut portable = vec![[0.0; LANES]; keys];
        score_body(&q, &k, 10, &seen, &mut portable);
        let max: Lanes = std::array::from_fn(|l| {
            portable
                .iter()
                .map(|s| s[l])
                .fold(f32::NEG_INFINITY, f32::max)
        });
        let mut fast = vec![[0.0; LANES]; keys];
        score(&q, &k, 10, &seen, &mut fast);
        assert_eq!(fast, portable);
        let start = lanes(d, 4);
        let (mut sum, mut acc) = ([0.0; LANES], start.clone());
        weigh_body(&mut portable, &max, &v, &mut sum, &mut acc);
        // Every row in the lanes, and a few rows (a decoded token's heads) on their own.
        for rows in [LANES, 7, 4, 3, 1] {
            let (mut weights, mut fast_sum, mut fast_acc) =
                (fast.clone(), [0.0; LANES], start.clone());
            weigh(&mut weights, &max, &v, &mut fast_sum, &mut fast_acc, rows);
            assert_eq!((&weights, fast_sum), (&portable, sum), "{rows} rows");
            for (fast, portable) in fast_acc.iter().zip(&acc) {
                assert_eq!(fast[..rows], portable[..rows], "{rows} rows");
            }
        }
    }
}
