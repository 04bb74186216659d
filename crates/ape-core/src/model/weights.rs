//! Reading a family's tensors out of a GGUF file, checking names and shapes.

use super::gguf::TensorData;
use super::gguf::{Gguf, TensorInfo};
use crate::error::{Error, Result};
use crate::kernels::quant::{dequantize, GgmlType};
use crate::kernels::Matrix;

pub(super) struct Loader<'a> {
    pub(super) gguf: &'a Gguf,
    pub(super) arch: &'static str,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.gguf.tensor(name).ok_or_else(|| Error::MissingTensor {
            name: name.to_string(),
            arch: self.arch.to_string(),
        })
    }

    /// A vector of `len` values, widened to f32.
    pub(super) fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        check_shape(info, &[len])?;
        let mut out = vec![0f32; info.element_count()];
        dequantize(info.ggml_type, self.gguf.tensor_bytes(info), &mut out);
        Ok(out)
    }

    /// A `rows x cols` matrix, stored by GGUF as dims `[cols, rows]`, for products.
    pub(super) fn matrix(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        self.matrix_as(name, rows, cols, Matrix::for_products)
    }

    /// A `rows x cols` table whose rows are also looked up (the token embedding).
    fn table(&self, name: &str, rows: usize, cols: usize) -> Result<Matrix> {
        self.matrix_as(name, rows, cols, Matrix::mapped)
    }

    fn matrix_as(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        make: fn(usize, usize, GgmlType, TensorData) -> Matrix,
    ) -> Result<Matrix> {
        let info = self.info(name)?;
        check_shape(info, &[cols, rows])?;
        Ok(make(
            rows,
            cols,
            info.ggml_type,
            self.gguf.tensor_data(info),
        ))
    }
}

/// The weights at both ends of a network: the token embedding, and the norm and the
/// projection to logits (the embedding again where the file ties the two).
pub(super) struct Ends {
    pub(super) embedding: Matrix,
    output_norm: Vec<f32>,
    output: Option<Matrix>,
}

impl Ends {
    pub(super) fn load(loader: &Loader<'_>, vocab_size: usize, hidden: usize) -> Result<Self> {
        let output = match loader.gguf.tensor("output.weight") {
            Some(_) => Some(loader.matrix("output.weight", vocab_size, hidden)?),
            None => None,
        };
        Ok(Ends {
            embedding: loader.table("token_embd.weight", vocab_size, hidden)?,
            output_norm: loader.vector("output_norm.weight", hidden)?,
            output,
        })
    }

    pub(super) fn output(&self) -> (&[f32], &Matrix) {
        (
            &self.output_norm,
            self.output.as_ref().unwrap_or(&self.embedding),
        )
    }

    /// Bytes of the ends' matrices and of `layer_matrices`.
    pub(super) fn bytes_with<'a>(&self, layer_matrices: impl Iterator<Item = &'a Matrix>) -> usize {
        layer_matrices.map(Matrix::bytes).sum::<usize>()
            + self.embedding.bytes()
            + self.output.as_ref().map_or(0, Matrix::bytes)
    }
}

fn check_shape(info: &TensorInfo, expected: &[usize]) -> Result<()> {
    if info.dims != expected {
        return Err(Error::TensorShape {
            name: info.name.clone(),
            got: info.dims.clone(),
            expected: expected.to_vec(),
        });
    }
    Ok(())
}

/// `x += y`, elementwise.
pub(super) fn add_in_place(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
