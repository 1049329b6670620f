//! Model-loading flags shared by `run`, `chat`, `serve` and `bench`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use herd_formats::quantize::FileType;
use herd_models::LoadOptions;

#[derive(clap::Args, Debug, Clone, Default)]
pub struct LoadArgs {
    /// Quantize the weights while loading, each tensor typed as `herd quantize --type` types it
    /// (q8_0, q4_k_m, q6_k, …): a bf16 Hugging Face checkpoint runs at quantized speed and
    /// memory with no conversion step. Default: compute with the stored types.
    #[arg(long, value_name = "TYPE")]
    pub quantize: Option<String>,
}

impl LoadArgs {
    /// The file type of `--quantize`, checked.
    pub fn file_type(&self) -> Result<Option<FileType>> {
        let ft = self
            .quantize
            .as_deref()
            .map(|t| crate::quantize::file_type_of_flag("--quantize", t))
            .transpose()?;
        // MXFP4_MOE types the 3-D expert tensors of a file; at load each expert is its own
        // 2-D matrix, so it would silently become Q8_0 everywhere.
        if let Some(ft) = ft
            && (!ft.herd_writes() || ft == FileType::MXFP4MOE)
        {
            anyhow::bail!(
                "--quantize {}: herd runs files of this type but does not quantize to it while \
                 loading (write the file with herd quantize{})",
                ft.name(),
                if ft.herd_writes() {
                    ""
                } else {
                    " or llama.cpp's llama-quantize"
                }
            );
        }
        Ok(ft)
    }

    /// Options for the loader, with a progress bar while matrices are quantized (cleared when
    /// the returned guard drops).
    fn options(&self) -> Result<(LoadOptions, Option<indicatif::ProgressBar>)> {
        let Some(ft) = self.file_type()? else {
            return Ok((LoadOptions::default(), None));
        };
        let bar = indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(&format!(
                "quantizing to {} {{bar:40}} {{bytes}}/{{total_bytes}} {{elapsed}}",
                ft.name()
            ))
            .expect("valid template"),
        );
        let report = bar.clone();
        let options = LoadOptions {
            quantize: Some(ft),
            progress: Some(Arc::new(move |done, total| {
                report.set_length(total);
                report.set_position(done);
            })),
        };
        Ok((options, Some(bar)))
    }

    /// Resolve and load a model reference (path or alias) with its tokenizer.
    pub fn load(&self, reference: &str) -> Result<herd_engine::Loaded> {
        let (options, bar) = self.options()?;
        let loaded = herd_engine::load_with(reference, &options);
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        loaded.context("loading the model")
    }

    /// Load a model file or directory (no tokenizer).
    pub fn load_model(&self, path: &Path) -> Result<Box<dyn herd_models::CausalLm>> {
        let (options, bar) = self.options()?;
        let model = herd_models::load_model_with(path, &options);
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        model.with_context(|| format!("loading {}", path.display()))
    }
}
