//! Model architectures: typed configs whose defaults mirror Hugging Face's config classes, weight
//! loading by tensor name with shape checks, and forward passes that read like the reference
//! notes in `shared/reference/`.
//!
//! A model turns a [`Batch`] of tokens (many sequences flattened, with positions) plus its
//! [`KvCache`] into logits. It knows nothing of tokenizers, sampling, scheduling or HTTP, and
//! does no arithmetic of its own below the level of a layer: the kernels live in `herd-kernels`.

mod attention;
pub mod batch;
pub mod config_json;
pub mod error;
pub mod gemma3;
pub mod kv_cache;
pub mod llama4;
mod moe;
pub mod presets;
mod rows;
pub mod weights;

pub use batch::{Batch, SeqId};
pub use error::{Error, Result};
pub use kv_cache::{KvCache, KvShape, Window};

use std::path::Path;

use herd_formats::{GgufFile, HfModelDir};
use herd_kernels::DType;

/// A decoder-only language model.
pub trait CausalLm: Send + Sync {
    fn vocab_size(&self) -> usize;
    fn hidden_size(&self) -> usize;
    fn num_layers(&self) -> usize;
    /// Values cached per token and layer for keys (and for values): kv heads × head dim.
    fn kv_dim(&self) -> usize;
    /// Values per attention head (the unit a KV cache element type's blocks must divide).
    fn head_dim(&self) -> usize;
    /// Positions the model was trained for (its context length).
    fn max_context(&self) -> usize;
    /// Which keys each layer's queries see (full, sliding window, chunk).
    fn layer_windows(&self) -> Vec<Window>;
    /// The rows this model caches per token and layer, stored as `kv_type`.
    fn kv_shape(&self, kv_type: DType) -> KvShape {
        KvShape {
            kv_dim: self.kv_dim(),
            head_dim: self.head_dim(),
            kv_type,
        }
    }
    /// An empty cache of [`kv_cache::DEFAULT_KV_TYPE`] (f16) shaped for this model that grows as
    /// needed.
    fn new_cache(&self) -> KvCache {
        self.new_cache_of(kv_cache::DEFAULT_KV_TYPE)
            .expect("f16 rows of any head size are valid")
    }
    /// An empty growing cache storing `kv_type`.
    ///
    /// # Errors
    /// [`Error::KvType`] if the type is not a KV cache type or does not fit the head size.
    fn new_cache_of(&self, kv_type: DType) -> Result<KvCache> {
        KvCache::windowed(
            &self.layer_windows(),
            self.kv_shape(kv_type),
            kv_cache::DEFAULT_BLOCK_SIZE,
            None,
        )
    }
    /// An empty cache storing `kv_type` with fixed pools of `num_blocks` blocks.
    ///
    /// # Errors
    /// As [`CausalLm::new_cache_of`].
    fn new_paged_cache(
        &self,
        kv_type: DType,
        block_size: usize,
        num_blocks: usize,
    ) -> Result<KvCache> {
        KvCache::windowed(
            &self.layer_windows(),
            self.kv_shape(kv_type),
            block_size,
            Some(num_blocks),
        )
    }
    /// Run `batch` and return the logits of the rows it asks for, `[n_logit_rows, vocab]`.
    /// With `trace`, also record the hidden state `[n_tokens, hidden]` after the embedding,
    /// after each decoder layer and after the final norm.
    fn forward(
        &self,
        batch: &Batch,
        cache: &mut KvCache,
        trace: Option<&mut Vec<Vec<f32>>>,
    ) -> Result<Vec<f32>> {
        let mut logits = Vec::new();
        self.forward_into(batch, cache, trace, &mut logits)?;
        Ok(logits)
    }

    /// [`CausalLm::forward`] with the logits written to `logits` (resized). The model keeps its
    /// activation buffers between calls, so once warm a decode step (same batch shape, a
    /// `logits` buffer kept by the caller, no `trace`) allocates nothing.
    fn forward_into(
        &self,
        batch: &Batch,
        cache: &mut KvCache,
        trace: Option<&mut Vec<Vec<f32>>>,
        logits: &mut Vec<f32>,
    ) -> Result<()>;
}

/// Architectures this build can load from a Hugging Face directory, by `model_type`.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama4", "llama4_text", "gemma3", "gemma3_text"];

/// Architectures this build can load from GGUF, by `general.architecture`.
pub const SUPPORTED_GGUF_ARCHITECTURES: &[&str] = &["llama4", "gemma3"];

/// How to load a model beyond what its files say.
#[derive(Clone, Default)]
pub struct LoadOptions {
    /// Quantize the weight matrices while loading, typed as `llama-quantize` types this file
    /// type (see [`weights::LoadQuantization`]): a bf16 checkpoint runs at quantized speed with
    /// no conversion step. `None`: compute with the stored types.
    pub quantize: Option<herd_formats::quantize::FileType>,
    /// Called as `(bytes processed, bytes in all)` while matrices are quantized.
    pub progress: Option<weights::ProgressFn>,
}

impl std::fmt::Debug for LoadOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadOptions")
            .field("quantize", &self.quantize.map(|t| t.name()))
            .finish_non_exhaustive()
    }
}

impl LoadOptions {
    /// The load-time quantization for a model of `shape` whose files hold `total_bytes`.
    fn quantization(
        &self,
        shape: herd_formats::quantize::ModelShape,
        total_bytes: u64,
    ) -> Option<weights::LoadQuantization> {
        self.quantize.map(|ft| {
            weights::LoadQuantization::new(ft, shape)
                .with_progress(self.progress.clone(), total_bytes)
        })
    }
}

/// Load a model from a GGUF file or a Hugging Face directory.
pub fn load_model(path: &Path) -> Result<Box<dyn CausalLm>> {
    load_model_with(path, &LoadOptions::default())
}

/// [`load_model`] with options (quantization at load).
pub fn load_model_with(path: &Path, options: &LoadOptions) -> Result<Box<dyn CausalLm>> {
    if path.is_dir() {
        load_hf_dir_with(path, options)
    } else {
        load_gguf_with(path, options)
    }
}

/// Load a GGUF file, choosing the architecture from `general.architecture`.
pub fn load_gguf(path: &Path) -> Result<Box<dyn CausalLm>> {
    load_gguf_with(path, &LoadOptions::default())
}

/// [`load_gguf`] with options (quantization at load: requantizes the file's matrices).
pub fn load_gguf_with(path: &Path, options: &LoadOptions) -> Result<Box<dyn CausalLm>> {
    let start = std::time::Instant::now();
    let model = load_gguf_file(path, options)?;
    // Loading maps the file and repacks the matrices that have an interleaved layout (a few
    // seconds per 10 GB on two cores): say how long it took.
    tracing::info!(
        "loaded {} in {:.1} s",
        path.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(model)
}

fn load_gguf_file(path: &Path, options: &LoadOptions) -> Result<Box<dyn CausalLm>> {
    let file = GgufFile::open(path)?;
    let total_bytes = file.tensors().iter().map(|t| t.n_bytes).sum();
    let arch = file
        .architecture()
        .ok_or_else(|| {
            Error::Config(format!(
                "{}: GGUF key general.architecture is missing",
                path.display()
            ))
        })?
        .to_string();
    match arch.as_str() {
        "llama4" => Ok(Box::new(llama4::Llama4::from_gguf_with(
            &file,
            options,
            total_bytes,
        )?)),
        "gemma3" => Ok(Box::new(gemma3::Gemma3::from_gguf_with(
            &file,
            options,
            total_bytes,
        )?)),
        _ => Err(Error::UnknownArchitecture { model_type: arch }),
    }
}

/// Load a Hugging Face model directory, choosing the architecture from `config.json`.
pub fn load_hf_dir(path: &Path) -> Result<Box<dyn CausalLm>> {
    load_hf_dir_with(path, &LoadOptions::default())
}

/// [`load_hf_dir`] with options (quantization at load).
pub fn load_hf_dir_with(path: &Path, options: &LoadOptions) -> Result<Box<dyn CausalLm>> {
    let start = std::time::Instant::now();
    let dir = HfModelDir::open(path)?;
    let model_type = config_json::model_type(&dir.config)?;
    let model: Box<dyn CausalLm> = match model_type.as_str() {
        "llama4" | "llama4_text" => Box::new(llama4::Llama4::from_hf_with(&dir, options)?),
        "gemma3" | "gemma3_text" => Box::new(gemma3::Gemma3::from_hf_with(&dir, options)?),
        _ => return Err(Error::UnknownArchitecture { model_type }),
    };
    if let Some(ft) = options.quantize {
        tracing::info!(
            "loaded {} as {} in {:.1} s",
            path.display(),
            ft.name(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(model)
}
