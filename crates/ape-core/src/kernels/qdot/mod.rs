//! Dot products of GGUF-quantized weight rows with activation vectors, read straight from
//! the quantized bytes.
//!
//! Decoding reads every weight once per token, so its speed is set first by how many bytes
//! the weights take and then by the arithmetic spent per weight. To keep that arithmetic
//! small, every vector multiplied with quantized rows is itself quantized once per product
//! (`prepare`), as llama.cpp does: to signed 8-bit values in blocks of 32, each block with
//! an f32 scale `d = max|x| / 127`. A block of the row then meets a block of the vector as
//! one integer dot product of 32 byte pairs, scaled once in f32. The result is exact for
//! the quantized vector up to f32 rounding; quantizing costs each element at most `d / 2`.
//! Prefill multiplies a row with a tile of vectors at once (`dot_rows_tokens`): the row's
//! blocks are unpacked once for the tile, and each vector's sums run exactly as they do
//! alone, so a token's product never depends on the tokens beside it.
//!
//! The 32-element vector blocks line up with every weight format's blocks (Q4_0 to Q8_0)
//! and sub-blocks (Q4_K, Q5_K; Q6_K's 16-element scales pair up inside them), so every
//! product of a weight scale with a vector scale is per 32 elements.
//!
//! Formats whose values are `d * q + m` (Q4_1, Q5_1, and Q4_K and Q5_K with their
//! per-sub-block mins) are computed as `d * sum(q * x) + m * sum(x)`, with the sum of each
//! vector block kept with its scale. In the AVX2 kernels the fixed biases of Q4_0, Q5_0
//! and Q6_K (`-8`, `-16`, `-32`) and Q8_0's sign are kept in the weight bytes, which become
//! signed: the byte multiply needs one unsigned operand, so the weight's sign moves onto
//! the vector byte and its magnitude is used. The AVX-512 kernels (`dpbusd`) take the
//! weights unsigned and take the bias back through the vector's sums.
//!
//! F32, F16 and BF16 rows are multiplied with the f32 vector as it is (AVX2). Every
//! quantized type has an AVX2 kernel (`avx2.rs`) and an AVX-512 one with VNNI
//! (`avx512.rs`) that CPUs having it use; other CPUs dequantize a chunk at a time and
//! multiply.

use crate::kernels::quant::{dequantize, GgmlType};
use sixteen::GROUP_ROWS;

/// Elements per block of a quantized vector.
const QBLOCK: usize = 32;

/// A vector quantized to 8 bits for products with quantized rows.
pub(crate) struct QuantizedVector {
    /// One quant per element, in `-127..=127`.
    qs: Vec<i8>,
    /// Per 32-element block, its scale: element `i` is `qs[i] * d[i / 32]`.
    d: Vec<f32>,
    /// Per block, the sum of its dequantized elements, for the formats with offsets.
    s: Vec<f32>,
    /// Per block, the sums of its quants' first and second halves.
    halves: Vec<i32>,
}

impl QuantizedVector {
    fn len(&self) -> usize {
        self.qs.len()
    }

    /// Elements `start..start + out.len()` dequantized.
    fn dequantize_range(&self, start: usize, out: &mut [f32]) {
        for (i, o) in (start..).zip(out) {
            *o = self.qs[i] as f32 * self.d[i / QBLOCK];
        }
    }
}

/// Quantizes `x` (a multiple of 32 elements long) to 8 bits per element, rounding to nearest.
pub(crate) fn quantize(x: &[f32]) -> QuantizedVector {
    assert_eq!(x.len() % QBLOCK, 0, "length is not a multiple of 32");
    let blocks = x.len() / QBLOCK;
    let mut v = QuantizedVector {
        qs: vec![0; x.len()],
        d: vec![0.0; blocks],
        s: vec![0.0; blocks],
        halves: vec![0; 2 * blocks],
    };
    #[cfg(target_arch = "x86_64")]
    if avx2::available() {
        // SAFETY: `available` checked the CPU features, and `v` was sized for `x` above.
        unsafe { avx2::quantize(x, &mut v) };
        return v;
    }
    quantize_scalar(x, &mut v);
    v
}

/// The portable `quantize`, into a vector sized for `x`.
fn quantize_scalar(x: &[f32], v: &mut QuantizedVector) {
    for ((((x, q), d), s), halves) in x
        .chunks_exact(QBLOCK)
        .zip(v.qs.chunks_exact_mut(QBLOCK))
        .zip(&mut v.d)
        .zip(&mut v.s)
        .zip(v.halves.chunks_exact_mut(2))
    {
        let amax = x.iter().fold(0f32, |m, x| m.max(x.abs()));
        let inverse = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        *d = amax / 127.0;
        let mut sum = 0;
        for (q, x) in q.iter_mut().zip(x) {
            *q = (x * inverse).round_ties_even() as i8;
            sum += *q as i32;
        }
        *s = *d * sum as f32;
        let first: i32 = q[..QBLOCK / 2].iter().map(|&q| q as i32).sum();
        halves.copy_from_slice(&[first, sum - first]);
    }
}

/// An activation vector in the form `dot_row` multiplies with rows of one type.
pub(crate) enum Prepared<'a> {
    /// For F32, F16 and BF16 rows: the vector as it is.
    Dense(&'a [f32]),
    /// For every quantized type.
    Quantized(QuantizedVector),
}

impl Prepared<'_> {
    fn len(&self) -> usize {
        match self {
            Prepared::Dense(x) => x.len(),
            Prepared::Quantized(v) => v.len(),
        }
    }
}

/// Whether rows of `a` and of `b` multiply the same preparation of a vector: every
/// quantized type takes the same 8-bit blocks, every dense type the vector itself.
pub(crate) fn same_preparation(a: GgmlType, b: GgmlType) -> bool {
    is_dense(a) == is_dense(b)
}

fn is_dense(ty: GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16)
}

/// `x` prepared once for any number of `dot_rows_tokens` calls with rows of type `ty`.
pub(crate) fn prepare(ty: GgmlType, x: &[f32]) -> Prepared<'_> {
    if is_dense(ty) {
        Prepared::Dense(x)
    } else {
        Prepared::Quantized(quantize(x))
    }
}

/// The kernels a CPU can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernels {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernels {
    /// The fastest this CPU runs.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if avx512::available() {
                return Kernels::Avx512;
            }
            if avx2::available() {
                return Kernels::Avx2;
            }
        }
        Kernels::Portable
    }
}

/// Tokens a tiled kernel takes at once: each block of a weight row is unpacked once for
/// all of them.
const TILE: usize = 8;

/// Tokens the kernel of rows packed in sixteens takes at once where there are that many:
/// its sixteen accumulators and the eight registers of a run of weights still fit the 32
/// vector registers, and each run is unpacked for twice as many tokens. (The one-row
/// kernels spill at sixteen and stay at [`TILE`].)
pub(crate) const WIDE_TILE: usize = 16;

/// Products over one tile of `N` quantized vectors (`N` up to [`TILE`], or
/// [`WIDE_TILE`]), which share the unpacking of the weights.
#[cfg(target_arch = "x86_64")]
trait TileProducts {
    /// The products of `vs`, vectors `at..at + N` of the batch.
    fn tile<const N: usize>(&mut self, at: usize, vs: [&QuantizedVector; N]);
}

/// Hands `vs`, vectors `start..` of the batch, to `products` in tiles of [`TILE`], the
/// last one as many as are left: the vectors of a tile of any size share the unpacking
/// of the weights, so those left over do too, where one at a time each would unpack every
/// weight again.
#[cfg(target_arch = "x86_64")]
fn in_tiles(vs: &[&QuantizedVector], start: usize, products: &mut impl TileProducts) {
    fn array<'a, const N: usize>(tile: &[&'a QuantizedVector]) -> [&'a QuantizedVector; N] {
        tile.try_into().expect("a tile of the length matched")
    }
    for (tile, at) in vs.chunks(TILE).zip((start..).step_by(TILE)) {
        match tile.len() {
            1 => products.tile::<1>(at, array(tile)),
            2 => products.tile::<2>(at, array(tile)),
            3 => products.tile::<3>(at, array(tile)),
            4 => products.tile::<4>(at, array(tile)),
            5 => products.tile::<5>(at, array(tile)),
            6 => products.tile::<6>(at, array(tile)),
            7 => products.tile::<7>(at, array(tile)),
            TILE => products.tile::<TILE>(at, array(tile)),
            _ => unreachable!("chunks of at most TILE"),
        }
    }
}

/// [`in_tiles`] in tiles of [`WIDE_TILE`] while there are that many vectors left.
#[cfg(target_arch = "x86_64")]
fn in_wide_tiles(vs: &[&QuantizedVector], start: usize, products: &mut impl TileProducts) {
    for (tile, at) in vs.chunks(WIDE_TILE).zip((start..).step_by(WIDE_TILE)) {
        match tile.try_into() {
            Ok(wide) => products.tile::<WIDE_TILE>(at, wide),
            Err(_) => in_tiles(tile, at, products),
        }
    }
}

/// Calls `f(start, vs)` with the quantized vectors of `xs`, [`WIDE_TILE`] at a time,
/// `start` the place of the first in `xs`. They are gathered on the stack: a product's
/// tasks run some thousands of times for each decoded token, too often to gather them in a
/// heap block each time.
#[cfg(target_arch = "x86_64")]
fn quantized_chunks(xs: &[Prepared], mut f: impl FnMut(usize, &[&QuantizedVector])) {
    fn quantized<'v>(x: &'v Prepared) -> &'v QuantizedVector {
        match x {
            Prepared::Quantized(v) => v,
            Prepared::Dense(_) => panic!("vector prepared for another type"),
        }
    }
    for (chunk, start) in xs.chunks(WIDE_TILE).zip((0..).step_by(WIDE_TILE)) {
        let mut vs = [quantized(&chunk[0]); WIDE_TILE];
        for (v, x) in vs.iter_mut().zip(chunk) {
            *v = quantized(x);
        }
        f(start, &vs[..chunk.len()]);
    }
}

/// [`dot_rows_tokens`]' products over one tile, on the one-row kernels.
#[cfg(target_arch = "x86_64")]
struct RowProducts<'a> {
    kernels: Kernels,
    ty: GgmlType,
    rows: &'a [u8],
    row_bytes: usize,
    count: usize,
    out: &'a mut [f32],
}

#[cfg(target_arch = "x86_64")]
impl TileProducts for RowProducts<'_> {
    fn tile<const N: usize>(&mut self, at: usize, vs: [&QuantizedVector; N]) {
        for (r, row) in self.rows.chunks_exact(self.row_bytes).enumerate() {
            // SAFETY: `dot_rows_with` runs these kernels only where `best` (or a test)
            // found the CPU's features, and checked the lengths.
            let products = unsafe { dot_quantized(self.kernels, self.ty, row, vs) };
            for (i, p) in products.into_iter().enumerate() {
                self.out[(at + i) * self.count + r] = p;
            }
        }
    }
}

/// `out[t * count + r]` is the dot product of row `r` of `rows` with `xs[t]`, where
/// `count = out.len() / xs.len()` rows of `ty` fill `rows`. Every product is computed by
/// the same sequence of operations as with that vector alone: a tile of
/// tokens shares the unpacking of the weights, never an accumulator.
pub(crate) fn dot_rows_tokens(ty: GgmlType, rows: &[u8], xs: &[Prepared], out: &mut [f32]) {
    dot_rows_with(Kernels::best(), ty, rows, xs, out);
}

/// Whether a `rows`-row matrix of `ty` is repacked sixteen rows at a time on this CPU
/// ([`sixteen`]): Q5_0, Q8_0, Q4_K and Q6_K in whole groups, where AVX-512 with VNNI runs
/// their kernel.
pub(crate) fn packs_in_sixteens(ty: GgmlType, rows: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    if Kernels::best() == Kernels::Avx512 {
        return sixteen::packs(ty) && rows.is_multiple_of(GROUP_ROWS);
    }
    false
}

/// `out[t * count + r]` is the product of row `r` of the rows of `ty` that
/// [`sixteen::pack_into`] packed into `groups` with `xs[t]` (prepared for `ty`), where `count =
/// out.len() / xs.len()`. As in [`dot_rows_tokens`], a token's products never depend on
/// the others. Only where [`packs_in_sixteens`] is true (never off x86-64).
#[cfg(target_arch = "x86_64")]
pub(crate) fn dot_groups_tokens(ty: GgmlType, groups: &[u8], xs: &[Prepared], out: &mut [f32]) {
    assert_eq!(
        Kernels::best(),
        Kernels::Avx512,
        "no AVX-512 VNNI for packed rows"
    );
    let Some(first) = xs.first() else {
        return;
    };
    let group_bytes = sixteen::group_bytes(ty, first.len());
    let count = out.len() / xs.len();
    assert_eq!(out.len(), count * xs.len());
    assert_eq!(
        groups.len() * GROUP_ROWS,
        count * group_bytes,
        "byte length mismatch"
    );
    assert!(
        xs.iter().all(|x| x.len() == first.len()),
        "vectors of different lengths"
    );
    let mut products = GroupProducts {
        ty,
        groups,
        group_bytes,
        count,
        out,
    };
    quantized_chunks(xs, |start, vs| in_wide_tiles(vs, start, &mut products));
}

/// [`dot_groups_tokens`] over one tile.
#[cfg(target_arch = "x86_64")]
struct GroupProducts<'a> {
    ty: GgmlType,
    groups: &'a [u8],
    group_bytes: usize,
    count: usize,
    out: &'a mut [f32],
}

#[cfg(target_arch = "x86_64")]
impl TileProducts for GroupProducts<'_> {
    fn tile<const N: usize>(&mut self, at: usize, vs: [&QuantizedVector; N]) {
        for (g, group) in self.groups.chunks_exact(self.group_bytes).enumerate() {
            // SAFETY: `dot_groups_tokens` asserted that the CPU has AVX-512 with VNNI and
            // checked the lengths.
            let products = unsafe { sixteen::avx512::dot_group(self.ty, group, vs) };
            for (i, rows) in products.into_iter().enumerate() {
                let start = (at + i) * self.count + g * GROUP_ROWS;
                self.out[start..start + GROUP_ROWS].copy_from_slice(&rows);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn dot_groups_tokens(_: GgmlType, _: &[u8], _: &[Prepared], _: &mut [f32]) {
    unreachable!("rows are packed in sixteens only on x86-64")
}

fn dot_rows_with(kernels: Kernels, ty: GgmlType, rows: &[u8], xs: &[Prepared], out: &mut [f32]) {
    let Some(first) = xs.first() else {
        return;
    };
    let len = first.len();
    assert_eq!(len % ty.block_len(), 0, "row is not whole blocks");
    let row_bytes = ty.row_bytes(len);
    let count = out.len() / xs.len();
    assert_eq!(out.len(), count * xs.len());
    assert_eq!(rows.len(), count * row_bytes, "byte length mismatch");
    let dense = |x: &Prepared| matches!(x, Prepared::Dense(_));
    let all_dense = xs.iter().all(dense);
    assert!(
        xs.iter().all(|x| x.len() == len),
        "vectors of different lengths"
    );
    assert!(
        (all_dense && is_dense(ty)) || (!xs.iter().any(dense) && !is_dense(ty)),
        "vector prepared for another type"
    );
    if row_bytes == 0 {
        out.fill(0.0);
        return;
    }
    let each_row = || rows.chunks_exact(row_bytes).enumerate();
    #[cfg(target_arch = "x86_64")]
    if kernels != Kernels::Portable {
        if all_dense {
            for (t, x) in xs.iter().enumerate() {
                let Prepared::Dense(x) = x else {
                    unreachable!("checked above")
                };
                for (r, row) in each_row() {
                    // SAFETY: `best` (or a test) checked that the CPU has the features the
                    // kernels are compiled for, and the asserts above the lengths.
                    out[t * count + r] = unsafe { avx2::dot_dense(ty, row, x) };
                }
            }
            return;
        }
        let mut products = RowProducts {
            kernels,
            ty,
            rows,
            row_bytes,
            count,
            out,
        };
        quantized_chunks(xs, |start, vs| in_tiles(vs, start, &mut products));
        return;
    }
    for (t, x) in xs.iter().enumerate() {
        for (r, row) in each_row() {
            out[t * count + r] = dot_row_scalar(ty, row, x);
        }
    }
}

/// The products of one row with `N` quantized vectors on the kernels `kernels` names.
///
/// # Safety
/// The CPU has the features of `kernels`, and the row and vectors are of one length.
#[cfg(target_arch = "x86_64")]
unsafe fn dot_quantized<const N: usize>(
    kernels: Kernels,
    ty: GgmlType,
    row: &[u8],
    vs: [&QuantizedVector; N],
) -> [f32; N] {
    match kernels {
        Kernels::Avx512 => avx512::dot_quantized(ty, row, vs),
        _ => avx2::dot_quantized(ty, row, vs),
    }
}

/// Elements dequantized at a time by the portable path: a multiple of every block length.
const SCALAR_CHUNK: usize = 256;

/// The portable path: dequantize a chunk of the row (and of `x`, if quantized) at a time
/// onto the stack and multiply.
fn dot_row_scalar(ty: GgmlType, row: &[u8], x: &Prepared) -> f32 {
    let (mut w, mut xs) = ([0f32; SCALAR_CHUNK], [0f32; SCALAR_CHUNK]);
    let mut total = 0.0;
    for (chunk, bytes) in row.chunks(ty.row_bytes(SCALAR_CHUNK)).enumerate() {
        let (start, n) = (
            chunk * SCALAR_CHUNK,
            bytes.len() / ty.block_bytes() * ty.block_len(),
        );
        let w = &mut w[..n];
        dequantize(ty, bytes, w);
        let xs = match x {
            Prepared::Dense(x) => &x[start..start + n],
            Prepared::Quantized(v) => {
                v.dequantize_range(start, &mut xs[..n]);
                &xs[..n]
            }
        };
        total += w.iter().zip(xs).map(|(w, x)| w * x).sum::<f32>();
    }
    total
}

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub(crate) mod sixteen;

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const ALL_TYPES: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::Bf16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ];

    /// Byte offsets of the f16 scale fields in a block: random bytes there could be huge,
    /// infinite or NaN, anywhere else they are valid quants.
    fn scale_offsets(ty: GgmlType) -> &'static [usize] {
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => &[0],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            GgmlType::Q6K => &[208],
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => &[],
        }
    }

    fn random_row(ty: GgmlType, n: usize, rng: &mut ChaCha8Rng) -> Vec<u8> {
        let mut row = vec![0u8; ty.row_bytes(n)];
        for block in row.chunks_exact_mut(ty.block_bytes()) {
            let value: f32 = rng.gen_range(-1.0..1.0);
            match ty {
                GgmlType::F32 => block.copy_from_slice(&value.to_le_bytes()),
                GgmlType::F16 => block.copy_from_slice(&f16::from_f32(value).to_le_bytes()),
                GgmlType::Bf16 => block.copy_from_slice(&bf16::from_f32(value).to_le_bytes()),
                _ => {
                    rng.fill(block);
                    for &at in scale_offsets(ty) {
                        let scale = f16::from_f32(rng.gen_range(0.01..0.1));
                        block[at..at + 2].copy_from_slice(&scale.to_le_bytes());
                    }
                }
            }
        }
        row
    }

    /// A vector with a mean away from zero, as real activations have: it exercises the
    /// offset terms and would expose a bias cancelling against sum(x).
    fn random_vector(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0..1.5)).collect()
    }

    /// What `dot_row` multiplies the row with: `x` itself, or its quantized values.
    fn effective(x: &Prepared) -> Vec<f32> {
        match x {
            Prepared::Dense(x) => x.to_vec(),
            Prepared::Quantized(v) => {
                let mut out = vec![0f32; v.len()];
                v.dequantize_range(0, &mut out);
                out
            }
        }
    }

    /// The dot product of the dequantized row with `x` in f64, and the sum of the terms'
    /// magnitudes, which bounds the rounding error of any summation order.
    fn reference(ty: GgmlType, row: &[u8], x: &[f32]) -> (f64, f64) {
        let mut w = vec![0f32; x.len()];
        dequantize(ty, row, &mut w);
        let terms = w.iter().zip(x).map(|(&w, &x)| w as f64 * x as f64);
        (terms.clone().sum(), terms.map(f64::abs).sum())
    }

    fn lengths(ty: GgmlType) -> &'static [usize] {
        match ty.block_len() {
            256 => &[256, 512, 4864],
            32 => &[32, 64, 96, 256, 576, 896, 4864],
            _ => &[1, 7, 32, 40, 256, 896, 4864],
        }
    }

    /// Every kernel set this CPU runs.
    fn all_kernels() -> Vec<Kernels> {
        let mut all = vec![Kernels::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::available() {
                all.push(Kernels::Avx2);
            }
            if avx512::available() {
                all.push(Kernels::Avx512);
            }
        }
        all
    }

    fn dot_row(kernels: Kernels, ty: GgmlType, row: &[u8], x: &Prepared) -> f32 {
        let mut out = [0.0];
        dot_rows_with(kernels, ty, row, std::slice::from_ref(x), &mut out);
        out[0]
    }

    /// A vector in a tile of several is multiplied exactly as alone: the same bits, on
    /// every kernel set, for whole tiles and a last tile of every size.
    #[test]
    fn a_vector_in_a_tile_gets_what_it_gets_alone() {
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        for kernels in all_kernels() {
            for (ty, tokens) in ALL_TYPES
                .into_iter()
                .flat_map(|ty| (1..=2 * WIDE_TILE + 1).map(move |t| (ty, t)))
            {
                let (n, rows) = (512, 3);
                let matrix: Vec<u8> = (0..rows)
                    .flat_map(|_| random_row(ty, n, &mut rng))
                    .collect();
                let xs: Vec<Vec<f32>> = (0..tokens).map(|_| random_vector(n, &mut rng)).collect();
                let prepared: Vec<Prepared> = xs.iter().map(|x| prepare(ty, x)).collect();
                let mut together = vec![0.0; tokens * rows];
                dot_rows_with(kernels, ty, &matrix, &prepared, &mut together);
                for (t, x) in prepared.iter().enumerate() {
                    let mut alone = vec![0.0; rows];
                    dot_rows_with(kernels, ty, &matrix, std::slice::from_ref(x), &mut alone);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&together[t * rows..(t + 1) * rows]),
                        bits(&alone),
                        "{kernels:?} {ty:?} token {t}"
                    );
                }
            }
        }
    }

    /// Against the row and the vector the kernels actually multiply, they are exact up to
    /// f32 rounding: the integer products are exact and each block is scaled once.
    #[test]
    fn matches_dequantize_for_every_type() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for kernels in all_kernels() {
            for ty in ALL_TYPES {
                for &n in lengths(ty) {
                    for _ in 0..4 {
                        let row = random_row(ty, n, &mut rng);
                        let x = random_vector(n, &mut rng);
                        let prepared = prepare(ty, &x);
                        let (want, magnitude) = reference(ty, &row, &effective(&prepared));
                        let got = dot_row(kernels, ty, &row, &prepared) as f64;
                        // Relative to the terms' magnitudes, as `want` itself may cancel to
                        // near zero; f32 summation stays around 1e-7 of it.
                        assert!(
                            (got - want).abs() <= 1e-6 * magnitude,
                            "{kernels:?} {ty:?} n={n}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// Rows packed in sixteens give the products of the rows they were packed from, up to
    /// f32 rounding, and a token in a tile of several gets the bits it gets alone.
    #[test]
    fn rows_packed_in_sixteens_match_dequantize_and_keep_a_token_to_itself() {
        let mut rng = ChaCha8Rng::seed_from_u64(16);
        for ty in ALL_TYPES {
            if !packs_in_sixteens(ty, GROUP_ROWS) {
                continue;
            }
            for (&n, tokens) in lengths(ty)
                .iter()
                .flat_map(|n| (1..=2 * WIDE_TILE + 1).map(move |t| (n, t)))
            {
                let rows = 3 * GROUP_ROWS;
                let matrix: Vec<u8> = (0..rows)
                    .flat_map(|_| random_row(ty, n, &mut rng))
                    .collect();
                let packed = sixteen::pack(ty, &matrix, rows, n);
                assert_eq!(packed.len(), 3 * sixteen::group_bytes(ty, n));
                let xs: Vec<Vec<f32>> = (0..tokens).map(|_| random_vector(n, &mut rng)).collect();
                let prepared: Vec<Prepared> = xs.iter().map(|x| prepare(ty, x)).collect();
                let mut together = vec![0.0; tokens * rows];
                dot_groups_tokens(ty, &packed, &prepared, &mut together);
                for (t, x) in prepared.iter().enumerate() {
                    let mut alone = vec![0.0; rows];
                    dot_groups_tokens(ty, &packed, std::slice::from_ref(x), &mut alone);
                    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&together[t * rows..(t + 1) * rows]), bits(&alone));
                    for (r, row) in matrix.chunks_exact(ty.row_bytes(n)).enumerate() {
                        let (want, magnitude) = reference(ty, row, &effective(x));
                        let got = alone[r] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * magnitude,
                            "{ty:?} n={n} token {t} row {r}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn rows_are_taken_in_order() {
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        for ty in ALL_TYPES {
            let (n, rows) = (512, 5);
            let matrix: Vec<u8> = (0..rows)
                .flat_map(|_| random_row(ty, n, &mut rng))
                .collect();
            let x = random_vector(n, &mut rng);
            let prepared = prepare(ty, &x);
            let mut out = vec![0.0; rows];
            dot_rows_tokens(ty, &matrix, std::slice::from_ref(&prepared), &mut out);
            for (r, row) in matrix.chunks_exact(ty.row_bytes(n)).enumerate() {
                assert_eq!(out[r], dot_row(Kernels::best(), ty, row, &prepared));
            }
        }
    }

    /// Against the unquantized vector, the error is what quantizing `x` costs: at most half
    /// a step of each block's scale per element, times the weight there.
    #[test]
    fn quantized_vector_error_is_bounded() {
        let mut rng = ChaCha8Rng::seed_from_u64(10);
        for ty in ALL_TYPES.into_iter().filter(|&ty| !is_dense(ty)) {
            let n = 4864;
            let row = random_row(ty, n, &mut rng);
            let x = random_vector(n, &mut rng);
            let Prepared::Quantized(v) = prepare(ty, &x) else {
                panic!("{ty:?} is quantized");
            };
            let mut w = vec![0f32; n];
            dequantize(ty, &row, &mut w);
            let bound: f64 = w
                .iter()
                .enumerate()
                .map(|(i, w)| w.abs() as f64 * v.d[i / QBLOCK] as f64 / 2.0)
                .sum();
            let (want, magnitude) = reference(ty, &row, &x);
            let got = dot_row(Kernels::best(), ty, &row, &Prepared::Quantized(v)) as f64;
            assert!(
                (got - want).abs() <= bound + 1e-6 * magnitude,
                "{ty:?}: {got} vs {want}, bound {bound}"
            );
        }
    }

    #[test]
    fn quantize_rounds_each_block_to_its_scale() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut x = random_vector(4864, &mut rng);
        // An all-zero block and one with a single large element.
        x[32..64].fill(0.0);
        x[70] = -40.0;
        let v = quantize(&x);
        for (i, (&x, &q)) in x.iter().zip(&v.qs).enumerate() {
            let d = v.d[i / QBLOCK];
            assert!((x - q as f32 * d).abs() <= d * 0.5001, "element {i}");
        }
        assert_eq!(v.qs[70], -127);
        assert!(v.qs[32..64].iter().all(|&q| q == 0) && v.d[1] == 0.0);
        for (b, q) in v.qs.chunks_exact(QBLOCK).enumerate() {
            let sum: i32 = q.iter().map(|&q| q as i32).sum();
            assert_eq!(v.s[b], v.d[b] * sum as f32);
        }
    }

    #[test]
    fn simd_quantize_matches_scalar() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let x = random_vector(4864, &mut rng);
        let v = quantize(&x);
        let mut scalar = QuantizedVector {
            qs: vec![0; x.len()],
            d: vec![0.0; x.len() / QBLOCK],
            s: vec![0.0; x.len() / QBLOCK],
            halves: vec![0; 2 * x.len() / QBLOCK],
        };
        quantize_scalar(&x, &mut scalar);
        assert_eq!(v.qs, scalar.qs);
        assert_eq!(v.d, scalar.d);
        assert_eq!(v.halves, scalar.halves);
        for (a, b) in v.s.iter().zip(&scalar.s) {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
        }
    }

    #[test]
    fn simd_matches_scalar() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        for kernels in all_kernels() {
            for ty in ALL_TYPES {
                for &n in lengths(ty) {
                    let row = random_row(ty, n, &mut rng);
                    let x = random_vector(n, &mut rng);
                    let prepared = prepare(ty, &x);
                    let (_, magnitude) = reference(ty, &row, &effective(&prepared));
                    let scalar = dot_row(Kernels::Portable, ty, &row, &prepared);
                    let fast = dot_row(kernels, ty, &row, &prepared);
                    assert!(
                        (fast - scalar).abs() as f64 <= 1e-6 * magnitude,
                        "{kernels:?} {ty:?} n={n}: {fast} vs {scalar}"
                    );
                }
            }
        }
    }
}
