//! Q5_0, Q8_0, Q4_K and Q6_K weights repacked sixteen rows at a time, for CPUs with
//! AVX-512 VNNI.
//!
//! In the file a row's blocks follow each other, and the product of one row with a vector
//! sums each 32-element block's byte pairs in eight lanes that are then scaled and reduced:
//! per block, as much f32 work as integer work. Repacked, a 512-bit register holds four
//! quants of each of sixteen rows, so one `dpbusd` with four bytes of the vector broadcast
//! advances sixteen rows, and each lane is one row's sum: eight of them cover 32 elements
//! of sixteen rows, whose scales are then applied once. A row's sum runs over its blocks in
//! order, in its own lane, whatever else shares the pass: the result of a token does not
//! depend on the tokens beside it, and a token decoded alone gets what it gets in prefill.
//!
//! A group of sixteen rows holds, per block of the format (32 elements for Q5_0 and Q8_0,
//! 256 for the K-quants), the rows' scales side by side (each field sixteen times, row by
//! row), then each 32-element run of quants as
//! - four runs of 64 bytes of nibbles: byte `4r + i` of run `m` holds quant `4m + i` of row
//!   `r` in its low nibble and quant `16 + 4m + i` in its high one;
//! - for each bit above the fourth (Q5_0 one, Q6_K two), eight 64-bit masks: bit `4r + i`
//!   of mask `j` is that bit of quant `4j + i` of row `r`.
//!
//! Register `j` (quants `4j..4j + 4` of every row) is thus run `j % 4`'s low or high
//! nibbles plus the high bits its masks set. Q8_0's quants are whole bytes, so its run is
//! the eight registers themselves: byte `4r + i` of register `j` is quant `4j + i` of row
//! `r`, plus 128. The scales: Q5_0 and Q8_0 their f16 `d`; Q4_K `d` and `dmin`, then the
//! twelve bytes its eight 6-bit scales and eight mins are packed in, as the file packs
//! them (unpacked in the kernel, so the group holds as many bytes as the file); Q6_K `d`,
//! then its sixteen signed scales.

use super::QBLOCK;
use crate::kernels::quant::GgmlType;
use rayon::prelude::*;

/// Rows per group.
pub(crate) const GROUP_ROWS: usize = 16;
const NIBBLE_BYTES: usize = 256;

/// The layout of one format's group blocks.
#[derive(Clone, Copy)]
struct Layout {
    /// Elements per block.
    block_len: usize,
    /// Bytes of the scales at the start of a group block.
    scale_bytes: usize,
    /// Quant bits above the fourth.
    high_bits: usize,
    /// Whole bytes per quant (Q8_0), not nibbles and masks.
    whole_bytes: bool,
}

impl Layout {
    fn of(ty: GgmlType) -> Option<Layout> {
        let (block_len, scale_bytes, high_bits, whole_bytes) = match ty {
            GgmlType::Q5_0 => (QBLOCK, 2 * GROUP_ROWS, 1, false),
            GgmlType::Q8_0 => (QBLOCK, 2 * GROUP_ROWS, 0, true),
            GgmlType::Q4K => (256, 4 * GROUP_ROWS + 12 * GROUP_ROWS, 0, false),
            GgmlType::Q6K => (256, 2 * GROUP_ROWS + 16 * GROUP_ROWS, 2, false),
            _ => return None,
        };
        Some(Layout {
            block_len,
            scale_bytes,
            high_bits,
            whole_bytes,
        })
    }

    fn run_bytes(self) -> usize {
        match self.whole_bytes {
            true => QBLOCK * GROUP_ROWS,
            false => NIBBLE_BYTES + 64 * self.high_bits,
        }
    }

    fn block_bytes(self) -> usize {
        self.scale_bytes + self.block_len / QBLOCK * self.run_bytes()
    }
}

/// Whether rows of `ty` can be packed in sixteens.
pub(crate) fn packs(ty: GgmlType) -> bool {
    Layout::of(ty).is_some()
}

/// Bytes of one group of sixteen packed rows of `cols` elements of `ty`.
pub(crate) fn group_bytes(ty: GgmlType, cols: usize) -> usize {
    let layout = Layout::of(ty).expect("a format packed in sixteens");
    cols / layout.block_len * layout.block_bytes()
}

/// Writes row `r`'s scales from its file block `b` into the group block `out`, each field
/// beside the other rows' values of it.
fn put_scales(ty: GgmlType, b: &[u8], r: usize, out: &mut [u8]) {
    out[2 * r..2 * r + 2].copy_from_slice(&b[if ty == GgmlType::Q6K { 208 } else { 0 }..][..2]);
    match ty {
        GgmlType::Q4K => {
            out[32 + 2 * r..32 + 2 * r + 2].copy_from_slice(&b[2..4]);
            for k in 0..12 {
                out[64 + 16 * k + r] = b[4 + k];
            }
        }
        GgmlType::Q6K => {
            for g in 0..16 {
                out[32 + 16 * g + r] = b[192 + g];
            }
        }
        _ => {}
    }
}

/// The quants of file block `b`, unsigned, in element order.
fn quants(ty: GgmlType, b: &[u8], out: &mut [u8]) {
    match ty {
        GgmlType::Q5_0 => {
            let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
            for l in 0..16 {
                out[l] = b[6 + l] & 0x0f | (((qh >> l) & 1) as u8) << 4;
                out[l + 16] = b[6 + l] >> 4 | (((qh >> (l + 16)) & 1) as u8) << 4;
            }
        }
        GgmlType::Q8_0 => {
            for (q, out) in b[2..34].iter().zip(out) {
                *out = q ^ 0x80;
            }
        }
        GgmlType::Q4K => {
            for (qs, out) in b[16..144].chunks_exact(32).zip(out.chunks_exact_mut(64)) {
                for l in 0..32 {
                    out[l] = qs[l] & 0x0f;
                    out[l + 32] = qs[l] >> 4;
                }
            }
        }
        GgmlType::Q6K => {
            for half in 0..2 {
                let (ql, qh) = (&b[64 * half..64 * half + 64], &b[128 + 32 * half..][..32]);
                let out = &mut out[128 * half..128 * half + 128];
                for l in 0..32 {
                    out[l] = ql[l] & 0x0f | (qh[l] & 3) << 4;
                    out[l + 32] = ql[l + 32] & 0x0f | ((qh[l] >> 2) & 3) << 4;
                    out[l + 64] = ql[l] >> 4 | ((qh[l] >> 4) & 3) << 4;
                    out[l + 96] = ql[l + 32] >> 4 | ((qh[l] >> 6) & 3) << 4;
                }
            }
        }
        _ => unreachable!("a format packed in sixteens"),
    }
}

/// Writes the 32 quants `q` of row `r` into a run: quants `4j..4j + 4` are four
/// consecutive nibbles of run `j % 4`, and their bits above the fourth half a byte of
/// mask `j` of each set; or, as whole bytes, four consecutive bytes of register `j`.
fn put_run(area: &mut [u8], r: usize, q: &[u8], layout: Layout) {
    if layout.whole_bytes {
        for (j, q) in q.chunks_exact(4).enumerate() {
            area[64 * j + 4 * r..64 * j + 4 * r + 4].copy_from_slice(q);
        }
        return;
    }
    let high_bits = layout.high_bits;
    let word = |j: usize| u32::from_le_bytes([q[4 * j], q[4 * j + 1], q[4 * j + 2], q[4 * j + 3]]);
    for m in 0..4 {
        let nibbles = word(m) & 0x0f0f_0f0f | (word(m + 4) & 0x0f0f_0f0f) << 4;
        area[64 * m + 4 * r..64 * m + 4 * r + 4].copy_from_slice(&nibbles.to_le_bytes());
    }
    for h in 0..high_bits {
        for j in 0..8 {
            // Bit 4 + h of each byte to bits 24..28, byte i to bit 24 + i.
            let ones = (word(j) >> (4 + h)) & 0x0101_0101;
            let bits = (ones.wrapping_mul(0x0102_0408) >> 24) as u8;
            area[NIBBLE_BYTES + 64 * h + 8 * j + r / 2] |= bits << (4 * (r % 2));
        }
    }
}

/// Rows of `ty` as the file stores them (`rows`, a multiple of 16, of `cols` elements),
/// repacked in groups of sixteen.
#[cfg(test)]
pub(crate) fn pack(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let mut packed = vec![0u8; rows / GROUP_ROWS * group_bytes(ty, cols)];
    pack_into(ty, bytes, rows, cols, &mut packed);
    packed
}

/// [`pack`] into `packed`, which is zeroed and as long as the groups take.
pub(crate) fn pack_into(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize, packed: &mut [u8]) {
    let layout = Layout::of(ty).expect("a format packed in sixteens");
    let blocks = cols / layout.block_len;
    let row_bytes = ty.row_bytes(cols);
    assert_eq!(rows % GROUP_ROWS, 0, "rows do not fill whole groups");
    assert_eq!(bytes.len(), rows * row_bytes, "byte length mismatch");
    assert_eq!(packed.len(), rows / GROUP_ROWS * group_bytes(ty, cols));
    packed
        .par_chunks_exact_mut(blocks * layout.block_bytes())
        .enumerate()
        .for_each(|(group, out)| {
            let mut q = [0u8; 256];
            for (b, out) in out.chunks_exact_mut(layout.block_bytes()).enumerate() {
                for r in 0..GROUP_ROWS {
                    let at = (group * GROUP_ROWS + r) * row_bytes + b * ty.block_bytes();
                    let block = &bytes[at..at + ty.block_bytes()];
                    put_scales(ty, block, r, out);
                    let q = &mut q[..layout.block_len];
                    quants(ty, block, q);
                    for (run, q) in q.chunks_exact(QBLOCK).enumerate() {
                        let area = &mut out[layout.scale_bytes + run * layout.run_bytes()..];
                        put_run(area, r, q, layout);
                    }
                }
            }
        });
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::super::QuantizedVector;
    use super::*;
    use std::arch::x86_64::*;

    /// The eight registers of a 32-element run of sixteen rows (quants `4j..4j + 4` of
    /// every row in register `j`), unsigned.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn run(area: *const u8, layout: Layout) -> [__m512i; 8] {
        if layout.whole_bytes {
            return std::array::from_fn(|j| _mm512_loadu_si512(area.add(64 * j).cast()));
        }
        let low = _mm512_set1_epi8(0x0f);
        let mut w = [_mm512_setzero_si512(); 8];
        for m in 0..4 {
            let z = _mm512_loadu_si512(area.add(64 * m).cast());
            w[m] = _mm512_and_si512(z, low);
            w[m + 4] = _mm512_and_si512(_mm512_srli_epi16(z, 4), low);
        }
        for h in 0..layout.high_bits {
            let bit = _mm512_set1_epi8(16 << h);
            for (j, w) in w.iter_mut().enumerate() {
                let at = area.add(NIBBLE_BYTES + 64 * h + 8 * j);
                *w = _mm512_mask_add_epi8(*w, at.cast::<u64>().read_unaligned(), *w, bit);
            }
        }
        w
    }

    /// `sum` over registers `js` of `w` with the matching four quants of the vector block
    /// whose quants start at `x`, starting from `start` in every lane. Two chains of
    /// `dpbusd` (even and odd registers) run side by side and are added at the end: integer
    /// sums, so the order does not change a bit.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn sum(
        w: &[__m512i; 8],
        js: std::ops::Range<usize>,
        x: *const i32,
        start: i32,
    ) -> __m512 {
        let mut p = [_mm512_set1_epi32(start), _mm512_setzero_si512()];
        for j in js {
            let quads = _mm512_set1_epi32(x.add(j).read_unaligned());
            p[j % 2] = _mm512_dpbusd_epi32(p[j % 2], w[j], quads);
        }
        _mm512_cvtepi32_ps(_mm512_add_epi32(p[0], p[1]))
    }

    /// The 6-bit scale and min of sub-block `s` of sixteen Q4_K rows, one byte per row,
    /// from the twelve planes at `planes` (plane `k`: byte `k` of each row's packed
    /// scales). The first four scales and mins are the low six bits of bytes 0-3 and 4-7;
    /// the last four take their low four bits from a nibble of bytes 8-11 and their top
    /// two from the top two bits of bytes 0-3 (scales) and 4-7 (mins).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn k_scale_min(planes: *const u8, s: usize) -> (__m128i, __m128i) {
        let plane = |k: usize| _mm_loadu_si128(planes.add(16 * k).cast());
        let low4 = _mm_set1_epi8(0x0f);
        if s < 4 {
            let low6 = _mm_set1_epi8(0x3f);
            return (
                _mm_and_si128(plane(s), low6),
                _mm_and_si128(plane(s + 4), low6),
            );
        }
        // Bits 6 and 7 of each byte to bits 4 and 5 (what a 16-bit shift brings in from
        // the neighbouring byte is masked off).
        let top2 = |v: __m128i| _mm_and_si128(_mm_srli_epi16(v, 2), _mm_set1_epi8(0x30));
        let nibbles = plane(s + 4);
        (
            _mm_or_si128(_mm_and_si128(nibbles, low4), top2(plane(s - 4))),
            _mm_or_si128(
                _mm_and_si128(_mm_srli_epi16(nibbles, 4), low4),
                top2(plane(s)),
            ),
        )
    }

    /// Sixteen unsigned bytes, one per row, as f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn widen(b: __m128i) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b))
    }

    /// Sixteen signed bytes at `p`, one per row, as f32.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    unsafe fn signed_bytes(p: *const u8) -> __m512 {
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p.cast())))
    }

    /// The sixteen products of a group's rows of `ty` (`group`: its packed blocks) with
    /// each of `vs`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub(crate) unsafe fn dot_group<const N: usize>(
        ty: GgmlType,
        group: &[u8],
        vs: [&QuantizedVector; N],
    ) -> [[f32; GROUP_ROWS]; N] {
        let layout = Layout::of(ty).expect("a format packed in sixteens");
        let blocks = vs[0].d.len() * QBLOCK / layout.block_len;
        assert_eq!(group.len(), blocks * layout.block_bytes());
        assert!(vs.iter().all(|v| v.d.len() == vs[0].d.len()));
        // Each vector's fields as pointers, read once here rather than through the
        // vector in every block: all are as long as the first's (asserted), which holds
        // `blocks` blocks of the format.
        let qs = vs.map(|v| v.qs.as_ptr().cast::<i32>());
        let ds = vs.map(|v| v.d.as_ptr());
        let sums = vs.map(|v| v.s.as_ptr());
        let halves = vs.map(|v| v.halves.as_ptr());
        // Four quants per i32: a 32-element vector block is eight of them.
        let quads = |i: usize, vb: usize| qs[i].add(QBLOCK / 4 * vb);
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..blocks {
            let g = group.as_ptr().add(b * layout.block_bytes());
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(g.cast()));
            let runs = g.add(layout.scale_bytes);
            match ty {
                GgmlType::Q5_0 | GgmlType::Q8_0 => {
                    let w = run(runs, layout);
                    let bias = if layout.whole_bytes { 128 } else { 16 };
                    for (i, acc) in acc.iter_mut().enumerate() {
                        // Unsigned quants: the bias comes off through the block's sum of
                        // vector quants.
                        let block_sum = *halves[i].add(2 * b) + *halves[i].add(2 * b + 1);
                        let p = sum(&w, 0..8, quads(i, b), -bias * block_sum);
                        let x_scale = _mm512_mul_ps(d, _mm512_set1_ps(*ds[i].add(b)));
                        *acc = _mm512_fmadd_ps(p, x_scale, *acc);
                    }
                }
                GgmlType::Q4K => {
                    let dmin = _mm512_cvtph_ps(_mm256_loadu_si256(g.add(32).cast()));
                    for s in 0..8 {
                        let (scale, min) = k_scale_min(g.add(64), s);
                        let scale = _mm512_mul_ps(d, widen(scale));
                        let min = _mm512_mul_ps(dmin, widen(min));
                        let w = run(runs.add(s * NIBBLE_BYTES), layout);
                        let vb = 8 * b + s;
                        for (i, acc) in acc.iter_mut().enumerate() {
                            let p = sum(&w, 0..8, quads(i, vb), 0);
                            let x_scale = _mm512_mul_ps(scale, _mm512_set1_ps(*ds[i].add(vb)));
                            *acc = _mm512_fmadd_ps(p, x_scale, *acc);
                            *acc = _mm512_fnmadd_ps(min, _mm512_set1_ps(*sums[i].add(vb)), *acc);
                        }
                    }
                }
                GgmlType::Q6K => {
                    for s in 0..8 {
                        let scales = [2 * s, 2 * s + 1]
                            .map(|h| _mm512_mul_ps(d, signed_bytes(g.add(32 + 16 * h))));
                        let w = run(runs.add(s * layout.run_bytes()), layout);
                        let vb = 8 * b + s;
                        for (i, acc) in acc.iter_mut().enumerate() {
                            // Each 16 quants have their own scale; their bias of 32 comes
                            // off through the sums of each half of the vector block.
                            for (half, scale) in scales.iter().enumerate() {
                                let js = 4 * half..4 * half + 4;
                                let bias = -32 * *halves[i].add(2 * vb + half);
                                let p = sum(&w, js, quads(i, vb), bias);
                                let x_scale = _mm512_mul_ps(*scale, _mm512_set1_ps(*ds[i].add(vb)));
                                *acc = _mm512_fmadd_ps(p, x_scale, *acc);
                            }
                        }
                    }
                }
                _ => unreachable!("a format packed in sixteens"),
            }
        }
        acc.map(|a| {
            let mut out = [0f32; GROUP_ROWS];
            _mm512_storeu_ps(out.as_mut_ptr(), a);
            out
        })
    }
}
