//! The numeric kernels of the forward pass: products with the quantized weights (here, on
//! the formats of `quant` through the dot products of `qdot`), dense dot products, RMS
//! norm, rotary embeddings and activations. Everything accumulates in f32.
//!
//! The weights stay as the file stores them, or, for the formats `qdot::sixteen` packs,
//! in as many bytes sixteen rows at a time. Each token's activations are quantized to
//! 8 bits on their own and meet the weight rows through integer dot products (`qdot`), a
//! tile of tokens at a time in prefill and one token in decoding, with the same arithmetic
//! for each: what a token computes never depends on the tokens computed with it.

mod activation;
pub(crate) mod dense;
mod norm;
pub(crate) mod qdot;
pub mod quant;
mod rope;

pub(crate) use activation::{gelu_mul, silu_mul};
pub(crate) use dense::dot_f16;
pub(crate) use norm::rms_norm;
pub(crate) use rope::{Rope, RopeAngles, RopeStyle};

use rayon::prelude::*;

use crate::model::gguf::TensorData;
use qdot::{
    dot_groups_tokens, dot_rows_tokens, packs_in_sixteens, prepare, same_preparation, sixteen,
    Prepared,
};
use quant::{dequantize, GgmlType};

/// A weight matrix of `rows x cols`, one row per output feature, held as the GGUF file
/// stores it and read from the mapped file in place (the weights take no memory beyond
/// the file's pages), or, for Q5_0, Q8_0, Q4_K and Q6_K on CPUs with AVX-512 VNNI, repacked
/// sixteen rows at a time, the file's pages handed back (`qdot::sixteen`). Every product
/// reads the quantized rows directly, whatever the number of tokens: one arithmetic for
/// every token.
pub(crate) struct Matrix {
    /// Output features: the values a product gives per token.
    pub(crate) rows: usize,
    /// Input features: the values of each token's activations it is multiplied with.
    pub(crate) cols: usize,
    ty: GgmlType,
    quantized: WeightBytes,
    in_sixteens: bool,
}

/// Where a matrix's bytes live.
enum WeightBytes {
    Mapped(TensorData),
    Owned(Vec<u8>),
}

impl std::ops::Deref for WeightBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            WeightBytes::Mapped(data) => data,
            WeightBytes::Owned(bytes) => bytes,
        }
    }
}

impl Matrix {
    /// A matrix over a tensor of the mapped file (`rows` rows of `cols` elements of `ty`),
    /// read in place.
    pub(crate) fn mapped(rows: usize, cols: usize, ty: GgmlType, data: TensorData) -> Self {
        assert_eq!(data.len(), rows * ty.row_bytes(cols));
        Matrix {
            rows,
            cols,
            ty,
            quantized: WeightBytes::Mapped(data),
            in_sixteens: false,
        }
    }

    /// [`Matrix::mapped`] for a matrix only multiplied with, never looked up by row: packed
    /// in sixteens where this CPU has the kernel for it, the file's pages handed back.
    pub(crate) fn for_products(rows: usize, cols: usize, ty: GgmlType, data: TensorData) -> Self {
        if !packs_in_sixteens(ty, rows) {
            return Matrix::mapped(rows, cols, ty, data);
        }
        let row_bytes = ty.row_bytes(cols);
        assert_eq!(data.len(), rows * row_bytes);
        let group_bytes = sixteen::group_bytes(ty, cols);
        let mut packed = vec![0u8; rows / sixteen::GROUP_ROWS * group_bytes];
        // A slab at a time, its file pages handed back as soon as it is packed: a large
        // matrix (Qwen 0.5B's 145 MB output projection) would otherwise hold its file
        // pages and its packed copy at once, over the file's size in all.
        for first in (0..rows).step_by(PACK_ROWS) {
            let slab = PACK_ROWS.min(rows - first);
            let bytes = first * row_bytes..(first + slab) * row_bytes;
            let out = first / sixteen::GROUP_ROWS * group_bytes;
            let out = &mut packed[out..out + slab / sixteen::GROUP_ROWS * group_bytes];
            sixteen::pack_into(ty, &data[bytes.clone()], slab, cols, out);
            data.release(bytes);
        }
        Matrix {
            rows,
            cols,
            ty,
            quantized: WeightBytes::Owned(packed),
            in_sixteens: true,
        }
    }

    /// Row `r` exactly as stored, widened to f32 (an embedding lookup); not on a matrix
    /// made [`Matrix::for_products`].
    pub(crate) fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert!(
            !self.in_sixteens,
            "rows packed for products are not looked up"
        );
        let len = self.ty.row_bytes(self.cols);
        dequantize(self.ty, &self.quantized[r * len..(r + 1) * len], out);
    }

    /// Bytes holding `rows` rows (a multiple of 16: a whole number of groups when
    /// packed).
    fn bytes_of_rows(&self, rows: usize) -> usize {
        if self.in_sixteens {
            rows / sixteen::GROUP_ROWS * sixteen::group_bytes(self.ty, self.cols)
        } else {
            rows * self.ty.row_bytes(self.cols)
        }
    }

    /// `out[t * count + r]` is the product of row `r` of `rows`, `count` whole rows of
    /// this matrix as it holds them, with `xs[t]`.
    fn products(&self, rows: &[u8], xs: &[Prepared], out: &mut [f32]) {
        if self.in_sixteens {
            dot_groups_tokens(self.ty, rows, xs, out);
        } else {
            dot_rows_tokens(self.ty, rows, xs, out);
        }
    }

    /// Bytes the weights take as held: the mapped tensor, or the packed copy.
    pub(crate) fn bytes(&self) -> usize {
        self.quantized.len()
    }
}

/// Rows packed in sixteens at a time at load, before their file pages are handed back: a
/// whole number of groups.
const PACK_ROWS: usize = 4096;

/// Rows handed to one thread in a product of several tokens: their bytes stay in the
/// core's cache while every token of the batch meets them.
const ROWS_PER_TASK: usize = 32;

/// The most rows handed to one thread in a product of at most [`TOKENS_PER_PASS`] tokens
/// (decoding, a small batch), where each row meets every token in one pass and is not read
/// again: starting each of the 25,000 tasks of 32 rows that a decoded token of Qwen 1.5B
/// made took about a tenth of its decoding time.
const MAX_ROWS_PER_LONG_TASK: usize = 256;

/// Tasks each thread gets of such a product at least, where the rows allow: enough that
/// a thread finishing early finds more.
const LONG_TASKS_PER_THREAD: usize = 4;

/// Tokens that meet a task's rows together: their quantized activations stay in the
/// core's first-level cache while the rows are read. As many as the widest tile a kernel
/// takes.
const TOKENS_PER_PASS: usize = qdot::WIDE_TILE;

/// `out[n][r] = sum_k x[n][k] * w[r][k]` for `n` tokens: `x` is `n x w.cols`, `out` is
/// `n x w.rows`, both row-major. Each token's row is quantized on its own and each output
/// is one call of the same dot-product kernel, so a token's result does not depend on the
/// tokens computed with it.
pub(crate) fn matmul(x: &[f32], w: &Matrix, out: &mut [f32]) {
    matmul_each(x, [w], [out]);
}

/// [`matmul`] of one input with each of several matrices as wide as it (a layer's query,
/// key and value projections; its gate and up projections), `outs[i]` receiving the
/// products with `ws[i]`, in one parallel pass over the rows of all of them: the threads
/// meet once instead of once per matrix, and the input is quantized once where the
/// matrices take the same preparation of it. Each product has the bits [`matmul`] gives.
pub(crate) fn matmul_each<const M: usize>(x: &[f32], ws: [&Matrix; M], outs: [&mut [f32]; M]) {
    let cols = ws[0].cols;
    assert!(
        ws.iter().all(|w| w.cols == cols),
        "matrices of different widths"
    );
    if cols == 0 {
        outs.into_iter().for_each(|out| out.fill(0.0));
        return;
    }
    let n = x.len() / cols;
    assert_eq!(x.len(), n * cols);
    for (w, out) in ws.iter().zip(&outs) {
        assert_eq!(out.len(), n * w.rows);
    }
    // Each preparation the matrices take, made once (for the first matrix taking it).
    let mut made: Vec<(GgmlType, Vec<Prepared>)> = Vec::new();
    for w in ws {
        if !made.iter().any(|(ty, _)| same_preparation(*ty, w.ty)) {
            made.push((w.ty, x.par_chunks(cols).map(|x| prepare(w.ty, x)).collect()));
        }
    }
    let tokens: Vec<&[Prepared]> = ws
        .iter()
        .map(|w| {
            let (_, tokens) = made
                .iter()
                .find(|(ty, _)| same_preparation(*ty, w.ty))
                .expect("made above");
            tokens.as_slice()
        })
        .collect();
    let columns: Vec<Columns> = ws
        .iter()
        .zip(outs)
        .map(|(w, out)| Columns {
            out: out.as_mut_ptr(),
            width: w.rows,
        })
        .collect();
    // Up to `TOKENS_PER_PASS` tokens meet each row once, so tasks can be long; more meet
    // a task's rows in several passes, which short runs of rows keep in cache. A lone
    // token (decoding) gets a tile of its own size: one of `TOKENS_PER_PASS` tokens would
    // zero sixteen times the bytes in every task.
    let long_tasks = long_task_rows(ws.iter().map(|w| w.rows).sum());
    match n {
        1 => products_in_tasks::<1, MAX_ROWS_PER_LONG_TASK>(&ws, &tokens, &columns, long_tasks),
        2..=TOKENS_PER_PASS => products_in_tasks::<TOKENS_PER_PASS, MAX_ROWS_PER_LONG_TASK>(
            &ws, &tokens, &columns, long_tasks,
        ),
        _ => products_in_tasks::<TOKENS_PER_PASS, ROWS_PER_TASK>(
            &ws,
            &tokens,
            &columns,
            ROWS_PER_TASK,
        ),
    }
}

/// Rows per task of a product of few tokens over `rows` rows in all: as many as leave
/// each thread [`LONG_TASKS_PER_THREAD`] tasks, a multiple of [`ROWS_PER_TASK`] (so of the
/// sixteen rows of a packed group) from it up to [`MAX_ROWS_PER_LONG_TASK`].
fn long_task_rows(rows: usize) -> usize {
    let per_task = rows / (LONG_TASKS_PER_THREAD * rayon::current_num_threads());
    (per_task / ROWS_PER_TASK * ROWS_PER_TASK).clamp(ROWS_PER_TASK, MAX_ROWS_PER_LONG_TASK)
}

/// Every product of `ws` with its prepared `tokens`, written to `columns`, in one
/// parallel iteration over tasks of `task_rows` rows (at most `MAX_ROWS`) of every matrix.
fn products_in_tasks<const PASS: usize, const MAX_ROWS: usize>(
    ws: &[&Matrix],
    tokens: &[&[Prepared]],
    columns: &[Columns],
    task_rows: usize,
) {
    assert!(task_rows <= MAX_ROWS && task_rows.is_multiple_of(sixteen::GROUP_ROWS));
    let tasks: Vec<(usize, usize)> = ws
        .iter()
        .enumerate()
        .flat_map(|(m, w)| (0..w.rows.div_ceil(task_rows)).map(move |t| (m, t)))
        .collect();
    tasks.into_par_iter().for_each(|(m, task)| {
        let w = ws[m];
        let task_bytes = w.bytes_of_rows(task_rows);
        let end = ((task + 1) * task_bytes).min(w.quantized.len());
        let rows = &w.quantized[task * task_bytes..end];
        let first = task * task_rows;
        let count = task_rows.min(w.rows - first);
        task_products::<PASS, MAX_ROWS>(w, rows, first, count, tokens[m], &columns[m]);
    });
}

/// The products of the `count` rows of `w` from row `first` on (`rows`, at most
/// `MAX_ROWS` of them) with `tokens`, `PASS` tokens at a time, written to their columns of
/// the output.
fn task_products<const PASS: usize, const MAX_ROWS: usize>(
    w: &Matrix,
    rows: &[u8],
    first: usize,
    count: usize,
    tokens: &[Prepared],
    columns: &Columns,
) {
    let mut tile = [[0f32; MAX_ROWS]; PASS];
    let tile = tile.as_flattened_mut();
    for (pass, xs) in tokens.chunks(PASS).enumerate() {
        let tile = &mut tile[..xs.len() * count];
        w.products(rows, xs, tile);
        for (i, values) in tile.chunks_exact(count).enumerate() {
            // SAFETY: the token is one of the rows of the output, which is
            // `tokens.len() x w.rows` (asserted by `matmul_each`), and columns
            // `first..first + count` are this task's alone: no other task writes them.
            unsafe { columns.put(pass * PASS + i, first, values) };
        }
    }
}

/// The output of one product, shared by its tasks: each writes only the columns of the
/// weight rows it multiplies, straight from its tile, so no task's results are gathered
/// and copied again afterwards.
struct Columns {
    out: *mut f32,
    /// Values per token: the matrix's rows.
    width: usize,
}

// SAFETY: tasks write disjoint columns of the buffer (see `Columns::put`), which outlives
// them: `matmul_each` returns only after every task has finished.
unsafe impl Sync for Columns {}

impl Columns {
    /// Write `values` to token `token`'s row of the output, from column `first` on.
    ///
    /// # Safety
    /// `token` and `first + values.len()` lie within the output, and no other thread
    /// writes those columns meanwhile.
    unsafe fn put(&self, token: usize, first: usize, values: &[f32]) {
        let at = self.out.add(token * self.width + first);
        std::ptr::copy_nonoverlapping(values.as_ptr(), at, values.len());
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Values in [-0.5, 0.5) from a seed, deterministic.
    pub(crate) fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) - 0.5
            })
            .collect()
    }

    /// A matrix of f32 values held in memory.
    fn f32_matrix(rows: usize, cols: usize, values: &[f32]) -> Matrix {
        assert_eq!(values.len(), rows * cols);
        Matrix {
            rows,
            cols,
            ty: GgmlType::F32,
            quantized: WeightBytes::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
            in_sixteens: false,
        }
    }

    /// Several matrices in one pass give each the bits of its own product, whatever their
    /// heights (none a whole number of tasks) and the number of tokens.
    #[test]
    fn matrices_multiplied_together_get_what_each_gets_alone() {
        let cols = 64;
        let heights = [70, 5, 33];
        let ws: Vec<Matrix> = heights
            .iter()
            .zip(1..)
            .map(|(&rows, seed)| f32_matrix(rows, cols, &pseudo_random(rows * cols, seed)))
            .collect();
        for n in [1, 2, 17, 40] {
            let x = pseudo_random(n * cols, 9);
            let mut together: Vec<Vec<f32>> = heights.iter().map(|&r| vec![0.0; n * r]).collect();
            let [a, b, c] = &mut together[..] else {
                unreachable!("three outputs")
            };
            matmul_each(&x, [&ws[0], &ws[1], &ws[2]], [a, b, c]);
            for (w, got) in ws.iter().zip(&together) {
                let mut alone = vec![0.0; n * w.rows];
                matmul(&x, w, &mut alone);
                assert_eq!(&alone, got, "{n} tokens, {} rows", w.rows);
            }
        }
    }

    #[test]
    fn a_token_in_a_batch_gets_what_it_gets_alone() {
        // Tall enough that, on two threads, a token alone or a few are cut into longer
        // tasks than a batch is, the last one shorter than the rest.
        let (rows, cols, n) = (700, 96, 19);
        let two_threads = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        two_threads.install(|| {
            assert!(long_task_rows(rows) > ROWS_PER_TASK);
            let w = f32_matrix(rows, cols, &pseudo_random(rows * cols, 1));
            let x = pseudo_random(n * cols, 2);
            let mut batched = vec![0.0; n * rows];
            matmul(&x, &w, &mut batched);
            for t in 0..n {
                let mut single = vec![0.0; rows];
                matmul(&x[t * cols..(t + 1) * cols], &w, &mut single);
                assert_eq!(single, batched[t * rows..(t + 1) * rows], "token {t}");
            }
            // A few tokens, fewer than a pass takes, go in long tasks too.
            let few = 5;
            let mut small = vec![0.0; few * rows];
            matmul(&x[..few * cols], &w, &mut small);
            assert_eq!(small, batched[..few * rows], "{few} tokens");
        });
    }
}
