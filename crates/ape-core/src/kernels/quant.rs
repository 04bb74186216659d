//! GGML tensor types and their dequantization to f32.
//!
//! Dequantizing serves the norms' weights at load, embedding lookups, the portable
//! products and the tests; the fast products read the blocks directly (`qdot`). These
//! routines favour clarity over speed. Each block layout follows the GGML format definition.

use half::{bf16, f16};

/// The tensor element types ape can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgmlType {
    /// 32-bit floats, unquantized.
    F32,
    /// IEEE half-precision floats.
    F16,
    /// bfloat16: f32's exponent with 7 bits of mantissa.
    Bf16,
    /// Blocks of 32 4-bit values, offset by 8, with one f16 scale (18 bytes).
    Q4_0,
    /// Blocks of 32 4-bit values with an f16 scale and an f16 minimum (20 bytes).
    Q4_1,
    /// Blocks of 32 5-bit values, offset by 16, with one f16 scale; the fifth bits are
    /// packed apart (22 bytes).
    Q5_0,
    /// Blocks of 32 5-bit values with an f16 scale and an f16 minimum (24 bytes).
    Q5_1,
    /// Blocks of 32 signed 8-bit values with one f16 scale (34 bytes).
    Q8_0,
    /// Super-blocks of 256: eight groups of 32 4-bit values, each group with a 6-bit
    /// scale and minimum under the block's f16 scales (144 bytes).
    Q4K,
    /// [`GgmlType::Q4K`]'s layout with 5-bit values (176 bytes).
    Q5K,
    /// Super-blocks of 256: sixteen groups of 16 6-bit values, offset by 32, each group
    /// with a signed 8-bit scale under one f16 scale (210 bytes).
    Q6K,
}

const QK_K: usize = 256;

impl GgmlType {
    /// The type of GGML type id `id`, as a GGUF tensor table stores it; `None` for the
    /// types ape cannot load.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            30 => GgmlType::Bf16,
            _ => return None,
        })
    }

    /// The GGML name of any type id, for error messages about types ape cannot load.
    pub(crate) fn name_of_id(id: u32) -> &'static str {
        const NAMES: [&str; 36] = [
            "F32", "F16", "Q4_0", "Q4_1", "Q4_2", "Q4_3", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K",
            "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S",
            "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "I8", "I16", "I32", "I64", "F64", "IQ1_M",
            "BF16", "Q4_0_4_4", "Q4_0_4_8", "Q4_0_8_8", "TQ1_0", "TQ2_0",
        ];
        NAMES.get(id as usize).copied().unwrap_or("unknown")
    }

    /// Elements per block.
    pub(crate) fn block_len(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => 1,
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 | GgmlType::Q8_0 => {
                32
            }
            GgmlType::Q4K | GgmlType::Q5K | GgmlType::Q6K => QK_K,
        }
    }

    /// Bytes per block.
    pub(crate) fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::Bf16 => 2,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
            GgmlType::Q5_0 => 22,
            GgmlType::Q5_1 => 24,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4K => 144,
            GgmlType::Q5K => 176,
            GgmlType::Q6K => 210,
        }
    }

    /// Bytes taken by `n` consecutive elements (`n` a multiple of the block length).
    pub fn row_bytes(self, n: usize) -> usize {
        n / self.block_len() * self.block_bytes()
    }
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// Dequantize `out.len()` elements from `bytes` (which must hold exactly that many).
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len(), ty.row_bytes(out.len()), "byte length mismatch");
    let blocks = bytes
        .chunks_exact(ty.block_bytes())
        .zip(out.chunks_exact_mut(ty.block_len()));
    match ty {
        GgmlType::F32 => {
            for (b, y) in blocks {
                y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, y) in blocks {
                y[0] = f16_at(b, 0);
            }
        }
        GgmlType::Bf16 => {
            for (b, y) in blocks {
                y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        GgmlType::Q4_0 => {
            for (b, y) in blocks {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                for j in 0..16 {
                    y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
                    y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
                }
            }
        }
        GgmlType::Q4_1 => {
            for (b, y) in blocks {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..20];
                for j in 0..16 {
                    y[j] = (qs[j] & 0x0f) as f32 * d + m;
                    y[j + 16] = (qs[j] >> 4) as f32 * d + m;
                }
            }
        }
        GgmlType::Q5_0 => {
            for (b, y) in blocks {
                let d = f16_at(b, 0);
                let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
                let qs = &b[6..22];
                for j in 0..16 {
                    let hi0 = ((qh >> j) << 4) & 0x10;
                    let hi1 = (qh >> (j + 12)) & 0x10;
                    y[j] = (((qs[j] & 0x0f) as u32 | hi0) as i32 - 16) as f32 * d;
                    y[j + 16] = (((qs[j] >> 4) as u32 | hi1) as i32 - 16) as f32 * d;
                }
            }
        }
        GgmlType::Q5_1 => {
            for (b, y) in blocks {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
                let qs = &b[8..24];
                for j in 0..16 {
                    let hi0 = ((qh >> j) << 4) & 0x10;
                    let hi1 = (qh >> (j + 12)) & 0x10;
                    y[j] = ((qs[j] & 0x0f) as u32 | hi0) as f32 * d + m;
                    y[j + 16] = ((qs[j] >> 4) as u32 | hi1) as f32 * d + m;
                }
            }
        }
        GgmlType::Q8_0 => {
            for (b, y) in blocks {
                let d = f16_at(b, 0);
                for j in 0..32 {
                    y[j] = (b[2 + j] as i8) as f32 * d;
                }
            }
        }
        GgmlType::Q4K => {
            for (b, y) in blocks {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qs = &b[16..144];
                for (group, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
                    let (sc0, m0) = k_scale_min(2 * group, scales);
                    let (sc1, m1) = k_scale_min(2 * group + 1, scales);
                    let (d0, min0) = (d * sc0 as f32, dmin * m0 as f32);
                    let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
                    for l in 0..32 {
                        y[l] = d0 * (q[l] & 0x0f) as f32 - min0;
                        y[l + 32] = d1 * (q[l] >> 4) as f32 - min1;
                    }
                }
            }
        }
        GgmlType::Q5K => {
            for (b, y) in blocks {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
                let scales = &b[4..16];
                let qh = &b[16..48];
                let qs = &b[48..176];
                for (group, (q, y)) in qs.chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
                    let (sc0, m0) = k_scale_min(2 * group, scales);
                    let (sc1, m1) = k_scale_min(2 * group + 1, scales);
                    let (d0, min0) = (d * sc0 as f32, dmin * m0 as f32);
                    let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
                    let (bit0, bit1) = (1u8 << (2 * group), 1u8 << (2 * group + 1));
                    for l in 0..32 {
                        let hi0 = if qh[l] & bit0 != 0 { 16 } else { 0 };
                        let hi1 = if qh[l] & bit1 != 0 { 16 } else { 0 };
                        y[l] = d0 * ((q[l] & 0x0f) + hi0) as f32 - min0;
                        y[l + 32] = d1 * ((q[l] >> 4) + hi1) as f32 - min1;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            for (b, y) in blocks {
                let d = f16_at(b, 208);
                for half in 0..2 {
                    let ql = &b[64 * half..64 * half + 64];
                    let qh = &b[128 + 32 * half..128 + 32 * half + 32];
                    let sc = &b[192 + 8 * half..192 + 8 * half + 8];
                    let y = &mut y[128 * half..128 * half + 128];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                        let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                        let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                        let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                        y[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                        y[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                        y[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                        y[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                    }
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` in the packed 12-byte table of Q4_K / Q5_K.
fn k_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_decodes_scale_and_min() {
        let mut block = vec![0u8; 20];
        block[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        block[2..4].copy_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        block[4] = 0x3a; // low nibble 10 -> element 0, high nibble 3 -> element 16
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q4_1, &block, &mut out);
        assert_eq!(out[0], 10.0 * 0.5 - 1.0);
        assert_eq!(out[16], 3.0 * 0.5 - 1.0);
        assert_eq!(out[1], -1.0);
    }

    #[test]
    fn q8_0_block_is_signed() {
        let mut block = vec![0u8; 34];
        block[0..2].copy_from_slice(&f16::from_f32(2.0).to_le_bytes());
        block[2] = (-3i8) as u8;
        block[33] = 127;
        let mut out = [0f32; 32];
        dequantize(GgmlType::Q8_0, &block, &mut out);
        assert_eq!(out[0], -6.0);
        assert_eq!(out[31], 254.0);
    }

    #[test]
    fn unknown_type_ids_have_names() {
        assert_eq!(GgmlType::name_of_id(10), "Q2_K");
        assert!(GgmlType::from_id(10).is_none());
        assert_eq!(GgmlType::name_of_id(999), "unknown");
    }
}
