//! Q5_0 weights repacked sixteen rows at a time, for CPUs with AVX-512 VNNI.
//!
//! In the file a row's blocks follow each other, and the product of one row with a vector
//! sums each block's 32 byte pairs in eight lanes that are then scaled and reduced: per
//! block, as much f32 work as integer work. Repacked, a 512-bit register holds four quants
//! of each of sixteen rows, so one `dpbusd` with four bytes of the vector broadcast
//! advances sixteen rows, and each lane is one row's sum: eight of them cover a block of
//! sixteen rows, whose scales are then applied once. A row's sum runs over its blocks in
//! order, in its own lane, whatever else shares the pass: the result of a token does not
//! depend on the tokens beside it, and a token decoded alone gets what it gets in prefill.
//!
//! Per block, a group of sixteen rows takes exactly the bytes the file gives those rows'
//! blocks (352), laid out as:
//! - the sixteen f16 scales, row by row;
//! - four runs of 64 bytes of nibbles: byte `4r + i` of run `m` holds quant `4m + i` of row
//!   `r` in its low nibble and quant `16 + 4m + i` in its high one;
//! - eight 64-bit masks: bit `4r + i` of mask `j` is the fifth bit of quant `4j + i` of row
//!   `r`.
//!
//! Register `j` (quants `4j..4j + 4` of every row) is thus run `j % 4`'s low or high
//! nibbles, plus 16 where mask `j` says.

use super::QBLOCK;

/// Rows per group.
pub const GROUP_ROWS: usize = 16;
const BLOCK_BYTES: usize = 22;
const GROUP_BLOCK_BYTES: usize = GROUP_ROWS * BLOCK_BYTES;
const NIBBLES_AT: usize = 2 * GROUP_ROWS;
const MASKS_AT: usize = NIBBLES_AT + 4 * 64;

/// The 32 five-bit quants of a Q5_0 block of the file.
fn quants(block: &[u8]) -> [u8; QBLOCK] {
    let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
    std::array::from_fn(|k| {
        let nibble = if k < 16 {
            block[6 + k] & 0x0f
        } else {
            block[6 + k - 16] >> 4
        };
        nibble | (((qh >> k) & 1) as u8) << 4
    })
}

/// Where quant `k` of row `r` of a group block sits: its nibble's byte and shift, and its
/// fifth bit's byte and bit.
fn place(r: usize, k: usize) -> (usize, u32, usize, u32) {
    let (j, i) = (k / 4, k % 4);
    let bit = 4 * r + i;
    (
        NIBBLES_AT + 64 * (j % 4) + bit,
        if j < 4 { 0 } else { 4 },
        MASKS_AT + 8 * j + bit / 8,
        (bit % 8) as u32,
    )
}

/// Q5_0 rows as the file stores them (`rows`, a multiple of 16, of `cols` elements),
/// repacked in groups of sixteen; the same number of bytes.
pub fn pack(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let blocks = cols / QBLOCK;
    let row_bytes = blocks * BLOCK_BYTES;
    assert_eq!(rows % GROUP_ROWS, 0, "rows do not fill whole groups");
    assert_eq!(bytes.len(), rows * row_bytes, "byte length mismatch");
    let mut packed = vec![0u8; bytes.len()];
    for (group, out) in packed
        .chunks_exact_mut(blocks * GROUP_BLOCK_BYTES)
        .enumerate()
    {
        for (b, out) in out.chunks_exact_mut(GROUP_BLOCK_BYTES).enumerate() {
            for r in 0..GROUP_ROWS {
                let at = (group * GROUP_ROWS + r) * row_bytes + b * BLOCK_BYTES;
                let block = &bytes[at..at + BLOCK_BYTES];
                out[2 * r..2 * r + 2].copy_from_slice(&block[..2]);
                for (k, q) in quants(block).into_iter().enumerate() {
                    let (byte, shift, mask_byte, bit) = place(r, k);
                    out[byte] |= (q & 0x0f) << shift;
                    out[mask_byte] |= (q >> 4) << bit;
                }
            }
        }
    }
    packed
}

/// Row `r` of packed groups of `cols` elements as the file stores it, into `out`.
pub fn unpack_row(packed: &[u8], cols: usize, r: usize, out: &mut [u8]) {
    let blocks = cols / QBLOCK;
    let group = &packed[(r / GROUP_ROWS) * blocks * GROUP_BLOCK_BYTES..];
    let r = r % GROUP_ROWS;
    for (b, block) in out.chunks_exact_mut(BLOCK_BYTES).take(blocks).enumerate() {
        let g = &group[b * GROUP_BLOCK_BYTES..(b + 1) * GROUP_BLOCK_BYTES];
        block[..2].copy_from_slice(&g[2 * r..2 * r + 2]);
        block[6..].fill(0);
        let mut qh = 0u32;
        for k in 0..QBLOCK {
            let (byte, shift, mask_byte, bit) = place(r, k);
            let nibble = (g[byte] >> shift) & 0x0f;
            qh |= (((g[mask_byte] >> bit) & 1) as u32) << k;
            if k < 16 {
                block[6 + k] |= nibble;
            } else {
                block[6 + k - 16] |= nibble << 4;
            }
        }
        block[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::super::QuantizedVector;
    use super::*;
    use std::arch::x86_64::*;

    /// The sixteen products of a group's rows (`group`: its packed blocks) with each of
    /// `vs`, one vector in each register.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_group<const N: usize>(
        group: &[u8],
        vs: [&QuantizedVector; N],
    ) -> [[f32; GROUP_ROWS]; N] {
        let blocks = vs[0].d.len();
        assert_eq!(group.len(), blocks * GROUP_BLOCK_BYTES);
        let (low, fifth) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x10));
        let mut acc = [_mm512_setzero_ps(); N];
        for b in 0..blocks {
            let g = group.as_ptr().add(b * GROUP_BLOCK_BYTES);
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(g.cast()));
            let mut w = [_mm512_setzero_si512(); 8];
            for m in 0..4 {
                let z = _mm512_loadu_si512(g.add(NIBBLES_AT + 64 * m).cast());
                w[m] = _mm512_and_si512(z, low);
                w[m + 4] = _mm512_and_si512(_mm512_srli_epi16(z, 4), low);
            }
            for (j, w) in w.iter_mut().enumerate() {
                let mask = g.add(MASKS_AT + 8 * j).cast::<u64>().read_unaligned();
                *w = _mm512_mask_add_epi8(*w, mask, *w, fifth);
            }
            for (acc, v) in acc.iter_mut().zip(vs) {
                let x = v.qs.as_ptr().add(QBLOCK * b).cast::<i32>();
                // The quants are unsigned; their bias of 16 comes off through the
                // block's sum of vector quants.
                let mut p = _mm512_set1_epi32(-16 * v.sums[b]);
                for (j, w) in w.iter().enumerate() {
                    p = _mm512_dpbusd_epi32(p, *w, _mm512_set1_epi32(x.add(j).read_unaligned()));
                }
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(v.d[b]));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, *acc);
            }
        }
        acc.map(|a| {
            let mut out = [0f32; GROUP_ROWS];
            _mm512_storeu_ps(out.as_mut_ptr(), a);
            out
        })
    }
}
