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

/// Load a model from a GGUF file or a Hugging Face directory.
pub fn load_model(path: &Path) -> Result<Box<dyn CausalLm>> {
    if path.is_dir() {
        load_hf_dir(path)
    } else {
        load_gguf(path)
    }
}

/// Load a GGUF file, choosing the architecture from `general.architecture`.
pub fn load_gguf(path: &Path) -> Result<Box<dyn CausalLm>> {
    let start = std::time::Instant::now();
    let model = load_gguf_file(path)?;
    // Loading maps the file and repacks the matrices that have an interleaved layout (a few
    // seconds per 10 GB on two cores): say how long it took.
    tracing::info!(
        "loaded {} in {:.1} s",
        path.display(),
        start.elapsed().as_secs_f64()
    );
    Ok(model)
}

fn load_gguf_file(path: &Path) -> Result<Box<dyn CausalLm>> {
    let file = GgufFile::open(path)?;
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
        "llama4" => Ok(Box::new(llama4::Llama4::from_gguf(&file)?)),
        "gemma3" => Ok(Box::new(gemma3::Gemma3::from_gguf(&file)?)),
        _ => Err(Error::UnknownArchitecture { model_type: arch }),
    }
}

/// Load a Hugging Face model directory, choosing the architecture from `config.json`.
pub fn load_hf_dir(path: &Path) -> Result<Box<dyn CausalLm>> {
    let dir = HfModelDir::open(path)?;
    let model_type = config_json::model_type(&dir.config)?;
    match model_type.as_str() {
        "llama4" | "llama4_text" => Ok(Box::new(llama4::Llama4::from_hf(&dir)?)),
        "gemma3" | "gemma3_text" => Ok(Box::new(gemma3::Gemma3::from_hf(&dir)?)),
        _ => Err(Error::UnknownArchitecture { model_type }),
    }
}
