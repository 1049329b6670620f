//! Weights looked up by name, with their shapes checked against the config, kept in place
//! (memory-mapped) or, for the quantized matrices the CPU kernels multiply, repacked at load
//! into interleaved row groups, and viewed as matrices for the kernels.

use herd_formats::gguf::GgufFile;
use herd_formats::quantize::{FileType, ModelShape, Visit, choose_type, quantize_rows};
use herd_formats::{TensorBytes, TensorSet};
use herd_kernels::{DType, Layout, MatRef};

use crate::{Error, Result};

/// A stored weight matrix: its bytes (mapped, or repacked and owned) plus how to read them.
#[derive(Clone, Debug)]
pub struct Matrix {
    bytes: TensorBytes,
    dtype: DType,
    pub in_features: usize,
    pub out_features: usize,
    layout: Layout,
}

impl Matrix {
    pub fn new(
        bytes: TensorBytes,
        dtype: DType,
        in_features: usize,
        out_features: usize,
        layout: Layout,
    ) -> Self {
        assert_eq!(
            bytes.len(),
            dtype.bytes_for(in_features * out_features),
            "Matrix::new: size"
        );
        Self {
            bytes,
            dtype,
            in_features,
            out_features,
            layout,
        }
    }

    /// This matrix in the layout the CPU kernels read fastest: rows interleaved in groups of
    /// eight for the types that have such a layout (`OutMajorX8`, same size, same results),
    /// the file's pages released (the copy is anonymous memory: not shared with other
    /// processes mapping the file). Unchanged when repacking is off ([`set_weight_repacking`],
    /// `HERD_NO_REPACK`), on CPUs without the group kernels (for Q6_K: without AVX-512 VNNI,
    /// [`repack_at_load`](herd_kernels::quant::repack::repack_at_load)), for other types and
    /// layouts, and for matrices of fewer than eight rows.
    pub fn repacked_for_cpu(self) -> Self {
        if !weight_repacking() || !herd_kernels::quant::repack::repack_at_load(self.dtype) {
            return self;
        }
        let Some(packed) = self.as_ref().repacked() else {
            return self;
        };
        self.bytes.release_pages();
        Self {
            bytes: TensorBytes::owned(packed),
            layout: Layout::OutMajorX8,
            ..self
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The matrix as f32 values `[out_features, in_features]`, whatever its layout.
    pub fn out_major_values(&self) -> Vec<f32> {
        let (rows, cols) = (self.out_features, self.in_features);
        let mut out = vec![0.0; rows * cols];
        match self.layout {
            Layout::InMajor => {
                let stored =
                    herd_kernels::dtype::decode(self.dtype, self.bytes.as_slice(), rows * cols);
                transpose(&stored, cols, rows, &mut out);
            }
            Layout::OutMajor | Layout::OutMajorX8 => {
                let m = self.as_ref();
                for (r, row) in out.chunks_exact_mut(cols.max(1)).enumerate().take(rows) {
                    m.decode_row(r, row);
                }
            }
        }
        out
    }

    pub fn as_ref(&self) -> MatRef<'_> {
        MatRef {
            bytes: self.bytes.as_slice(),
            dtype: self.dtype,
            in_features: self.in_features,
            out_features: self.out_features,
            layout: self.layout,
        }
    }

    /// `out = x · W` for `n_rows` activation rows.
    pub fn matmul(&self, x: &[f32], n_rows: usize) -> Vec<f32> {
        let mut out = Vec::new();
        self.matmul_into(x, n_rows, &mut out);
        out
    }

    /// [`Matrix::matmul`] into `out` (resized; no allocation once its capacity suffices).
    pub fn matmul_into(&self, x: &[f32], n_rows: usize, out: &mut Vec<f32>) {
        set_len(out, n_rows * self.out_features);
        herd_kernels::matmul::matmul(x, n_rows, &self.as_ref(), out);
    }
}

/// Quantization of a float checkpoint's matrices while it loads (`--quantize TYPE`, in-situ
/// quantization as mistral.rs's ISQ does): each matrix gets the type `llama-quantize` would give
/// the same tensor for `file_type` ([`choose_type`] on its GGUF name), with ggml's reference
/// quantizers, so the model computes what the GGUF `herd quantize` writes from the same
/// checkpoint computes. One matrix at a time is decoded to f32 and quantized; the checkpoint's
/// pages of it are released, so resident memory ends near the quantized model's size.
#[derive(Clone)]
pub struct LoadQuantization {
    /// The recipe whose per-tensor types are given (`q4_k_m`, …).
    pub file_type: FileType,
    /// The facts the type rules need (layer count, expert count, tied output head).
    pub shape: ModelShape,
    progress: Option<LoadProgress>,
    /// Whether requantizing an already-quantized matrix has been warned about (once a load).
    warned: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// Called as `(bytes of the checkpoint processed, bytes in all)` while matrices are quantized.
pub type ProgressFn = std::sync::Arc<dyn Fn(u64, u64) + Send + Sync>;

#[derive(Clone)]
struct LoadProgress {
    report: ProgressFn,
    total: u64,
    done: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for LoadQuantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LoadQuantization({}, {:?})",
            self.file_type.name(),
            self.shape
        )
    }
}

impl LoadQuantization {
    /// Quantization to `file_type`'s types for a model of `shape`, without progress reports.
    pub fn new(file_type: FileType, shape: ModelShape) -> Self {
        Self {
            file_type,
            shape,
            progress: None,
            warned: Default::default(),
        }
    }

    /// Report progress to `report` as matrices are quantized, out of `total` checkpoint bytes.
    pub fn with_progress(mut self, report: Option<ProgressFn>, total: u64) -> Self {
        self.progress = report.map(|report| LoadProgress {
            report,
            total,
            done: Default::default(),
        });
        self
    }

    /// The type `m` gets as the tensor `gguf_name` (GGUF naming, `blk.N.…`).
    pub fn target(&self, m: &Matrix, gguf_name: &str) -> DType {
        // Every layer of the architectures herd loads has one attn_v, so the count of attn_v
        // tensors before layer N's is N (see `Visit::at_layer` for the other counts).
        let layer = gguf_name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        choose_type(
            self.file_type,
            &self.shape,
            gguf_name,
            &[m.in_features as u64, m.out_features as u64],
            m.dtype,
            Visit::at_layer(layer),
        )
    }

    /// `m` stored as [`LoadQuantization::target`] in `OutMajor` layout (not repacked), or `m`
    /// itself when the type stays.
    ///
    /// # Errors
    /// [`Error::Format`] if the rows cannot be stored as the target type.
    pub fn apply(&self, m: Matrix, gguf_name: &str) -> Result<Matrix> {
        let target = self.target(&m, gguf_name);
        let source_bytes = m.bytes.len() as u64;
        let out = if target == m.dtype {
            m
        } else {
            if m.dtype.is_quantized()
                && !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(
                    "requantizing already quantized weights loses precision ({gguf_name}: {} as {target}, and others)",
                    m.dtype
                );
            }
            let values = m.out_major_values();
            let bytes = quantize_rows(&values, m.in_features, target, gguf_name)?;
            m.bytes.release_pages();
            Matrix::new(
                TensorBytes::owned(bytes),
                target,
                m.in_features,
                m.out_features,
                Layout::OutMajor,
            )
        };
        if let Some(p) = &self.progress {
            let done = p
                .done
                .fetch_add(source_bytes, std::sync::atomic::Ordering::Relaxed)
                + source_bytes;
            (p.report)(done.min(p.total), p.total);
        }
        Ok(out)
    }
}

/// `out` at `len` values for a pass that overwrites every one (a matrix product: every matmul
/// plan writes every output, which the kernels' tests check on NaN-filled buffers): grown with
/// zeros where it is short, and otherwise left as it is, so that a prefill step's buffers of
/// the same shape as the last are not zero-filled first (megabytes per product at 512 tokens).
pub(crate) fn set_len(out: &mut Vec<f32>, len: usize) {
    out.resize(len, 0.0);
}

/// `outs[i] = x · W_i` for `n_rows` activation rows and several matrices that read the same
/// input (a layer's q, k and v; an MLP's gate and up), as one product batch
/// (`herd_kernels::matmul::matmul_many`: one pool job quantizes the activations for every
/// matrix, one multiplies): the same bits as [`Matrix::matmul_into`] one by one, with two jobs
/// in all instead of two per matrix. (Each matrix still quantizes `x` for itself.)
pub fn matmul_same_input<const N: usize>(
    x: &[f32],
    n_rows: usize,
    products: [(&Matrix, &mut Vec<f32>); N],
) {
    let mut products = products.map(|(m, out)| {
        set_len(out, n_rows * m.out_features);
        herd_kernels::matmul::Product {
            x,
            n_rows,
            w: m.as_ref(),
            out,
        }
    });
    herd_kernels::matmul::matmul_many(&mut products);
}

/// `dst[c, r] = src[r, c]` for a row-major `src` of `rows × cols`, in tiles that stay in cache.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const TILE: usize = 32;
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                for c in c0..(c0 + TILE).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

/// 0: not yet read from the environment; 1: repack; 2: keep the file's layout.
static REPACKING: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Whether models loaded from now on repack their quantized matrices for the CPU kernels
/// ([`Matrix::repacked_for_cpu`]): on by default, off when `HERD_NO_REPACK` is set.
pub fn weight_repacking() -> bool {
    use std::sync::atomic::Ordering;
    match REPACKING.load(Ordering::Relaxed) {
        0 => {
            let on = std::env::var_os("HERD_NO_REPACK").is_none();
            REPACKING.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
        v => v == 1,
    }
}

/// Turn repacking at load on or off for models loaded from now on (see [`weight_repacking`]);
/// results are the same bits either way.
pub fn set_weight_repacking(on: bool) {
    REPACKING.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// Where an HF checkpoint keeps its decoder (`…embed_tokens`, `…layers`) and its output head:
/// `(decoder prefix, head prefix)` for the causal-LM class, the multimodal class of
/// transformers 4 (`language_model.model.`) and of transformers 5 (`model.language_model.`).
pub fn hf_prefixes(tensors: &TensorSet) -> Result<(&'static str, &'static str)> {
    const LAYOUTS: [(&str, &str); 3] = [
        ("model.", ""),
        ("language_model.model.", "language_model."),
        ("model.language_model.", ""),
    ];
    LAYOUTS
        .into_iter()
        .find(|(decoder, _)| tensors.contains(&format!("{decoder}embed_tokens.weight")))
        .ok_or_else(|| Error::MissingTensor {
            name: "model.embed_tokens.weight (or language_model.model.embed_tokens.weight)".into(),
        })
}

/// Looks tensors up under a name prefix (`language_model.` for multimodal checkpoints).
#[derive(Debug)]
pub struct WeightLoader<'a> {
    tensors: &'a TensorSet,
    prefix: String,
}

impl<'a> WeightLoader<'a> {
    pub fn new(tensors: &'a TensorSet, prefix: impl Into<String>) -> Self {
        Self {
            tensors,
            prefix: prefix.into(),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains(&format!("{}{name}", self.prefix))
    }

    /// The tensor `name` with exactly `shape`, and its element type.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<(TensorBytes, DType)> {
        let full = format!("{}{name}", self.prefix);
        let t = self
            .tensors
            .get(&full)
            .ok_or_else(|| Error::MissingTensor { name: full.clone() })?;
        if t.shape != shape {
            return Err(Error::TensorShape {
                name: full,
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        let dtype = t
            .dtype
            .clone()
            .map_err(|dtype| Error::TensorDtype { name: full, dtype })?;
        Ok((t.bytes.clone(), dtype))
    }

    /// An `nn.Linear` weight `[out, in]`.
    pub fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<Matrix> {
        let (bytes, dtype) = self.tensor(name, &[out_features, in_features])?;
        Ok(Matrix {
            bytes,
            dtype,
            in_features,
            out_features,
            layout: Layout::OutMajor,
        })
    }

    /// A stack of `n` input-major matrices `[n, in, out]` (Llama 4's fused experts), one view each.
    pub fn stacked_in_major(
        &self,
        name: &str,
        n: usize,
        in_features: usize,
        out_features: usize,
    ) -> Result<Vec<Matrix>> {
        let (bytes, dtype) = self.tensor(name, &[n, in_features, out_features])?;
        let each = dtype.bytes_for(in_features * out_features);
        Ok((0..n)
            .map(|e| Matrix {
                bytes: bytes.slice(e * each..(e + 1) * each),
                dtype,
                in_features,
                out_features,
                layout: Layout::InMajor,
            })
            .collect())
    }

    /// A 1-D weight (norms), decoded to f32.
    pub fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        let (bytes, dtype) = self.tensor(name, &[n])?;
        Ok(herd_kernels::dtype::decode(dtype, bytes.as_slice(), n))
    }
}

/// Looks tensors up in a GGUF file by their GGUF names, checking ggml dimensions.
#[derive(Debug)]
pub struct GgufLoader<'a> {
    pub file: &'a GgufFile,
}

impl GgufLoader<'_> {
    pub fn has(&self, name: &str) -> bool {
        self.file.tensor_info(name).is_some()
    }

    /// A tensor with exactly `dims` (ggml order, row length first).
    fn tensor(&self, name: &str, dims: &[usize]) -> Result<(TensorBytes, DType)> {
        let t = self
            .file
            .tensor_info(name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
            })?;
        if t.dims.iter().map(|&d| d as usize).ne(dims.iter().copied()) {
            return Err(Error::TensorShape {
                name: name.to_string(),
                expected: dims.to_vec(),
                found: t.dims.iter().map(|&d| d as usize).collect(),
            });
        }
        Ok((self.file.tensor_bytes(t), t.dtype))
    }

    /// A weight `{in, out}` in ggml order, i.e. `[out, in]` rows of `in` elements, in the
    /// file's layout, for row lookups (an untied token embedding: only the looked-up rows are
    /// ever read, and they stay in the page cache).
    pub fn embedding(&self, name: &str, out_features: usize, in_features: usize) -> Result<Matrix> {
        let (bytes, dtype) = self.tensor(name, &[in_features, out_features])?;
        Ok(Matrix {
            bytes,
            dtype,
            in_features,
            out_features,
            layout: Layout::OutMajor,
        })
    }

    /// A weight `{in, out}` in ggml order, i.e. `[out, in]` rows of `in` elements (repacked
    /// for the kernels, [`Matrix::repacked_for_cpu`]).
    pub fn linear(&self, name: &str, out_features: usize, in_features: usize) -> Result<Matrix> {
        Ok(self
            .embedding(name, out_features, in_features)?
            .repacked_for_cpu())
    }

    /// A stack `{in, out, n}` of `n` row-major `[out, in]` matrices (llama.cpp's expert tensors),
    /// each repacked for the kernels ([`Matrix::repacked_for_cpu`]).
    pub fn stacked(
        &self,
        name: &str,
        n: usize,
        out_features: usize,
        in_features: usize,
    ) -> Result<Vec<Matrix>> {
        Ok(self
            .stacked_as_stored(name, n, out_features, in_features)?
            .into_iter()
            .map(Matrix::repacked_for_cpu)
            .collect())
    }

    /// [`GgufLoader::stacked`] in the file's layout (not repacked).
    pub fn stacked_as_stored(
        &self,
        name: &str,
        n: usize,
        out_features: usize,
        in_features: usize,
    ) -> Result<Vec<Matrix>> {
        let (bytes, dtype) = self.tensor(name, &[in_features, out_features, n])?;
        let each = dtype.bytes_for(in_features * out_features);
        Ok((0..n)
            .map(|e| Matrix {
                bytes: bytes.slice(e * each..(e + 1) * each),
                dtype,
                in_features,
                out_features,
                layout: Layout::OutMajor,
            })
            .collect())
    }

    pub fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        let (bytes, dtype) = self.tensor(name, &[n])?;
        Ok(herd_kernels::dtype::decode(dtype, bytes.as_slice(), n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_covers_ragged_tiles() {
        for (rows, cols) in [(1, 1), (3, 70), (33, 31), (64, 65), (100, 7)] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut dst = vec![0.0; rows * cols];
            transpose(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }

    #[test]
    fn out_major_values_read_every_layout_the_same() {
        let (out_features, in_features) = (9, 32);
        let values: Vec<f32> = (0..out_features * in_features)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 16.0)
            .collect();
        let bytes =
            |v: &[f32]| TensorBytes::owned(v.iter().flat_map(|x| x.to_le_bytes()).collect());
        let out_major = Matrix::new(
            bytes(&values),
            DType::F32,
            in_features,
            out_features,
            Layout::OutMajor,
        );
        let mut in_major_values = vec![0.0; values.len()];
        transpose(&values, out_features, in_features, &mut in_major_values);
        let in_major = Matrix::new(
            bytes(&in_major_values),
            DType::F32,
            in_features,
            out_features,
            Layout::InMajor,
        );
        assert_eq!(out_major.out_major_values(), values);
        assert_eq!(in_major.out_major_values(), values);
        // Quantized and repacked (the layout loaded GGUF matrices have), rows read back in order.
        let q8 = quantize_rows(&values, in_features, DType::Q8_0, "t").unwrap();
        let plain = Matrix::new(
            TensorBytes::owned(q8),
            DType::Q8_0,
            in_features,
            out_features,
            Layout::OutMajor,
        );
        let want = plain.out_major_values();
        if let Some(packed) = plain.as_ref().repacked() {
            let x8 = Matrix::new(
                TensorBytes::owned(packed),
                DType::Q8_0,
                in_features,
                out_features,
                Layout::OutMajorX8,
            );
            assert_eq!(x8.out_major_values(), want);
        }
    }
}
