//! `herd quantize`: GGUF or Hugging Face directory in, quantized GGUF out.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use herd_formats::quantize::{
    FileType, GgufPlan, ModelShape, SourceTensor, SplitLimit, TypeOverrides, write_quantized_with,
};
use herd_formats::{GgufFile, HfModelDir};
use herd_kernels::DType;

/// The file type called `name`, or an error listing them.
pub fn file_type(name: &str) -> Result<FileType> {
    file_type_of_flag("--type", name)
}

/// The file type called `name`, given with `flag`, or an error naming the flag and the types.
pub fn file_type_of_flag(flag: &str, name: &str) -> Result<FileType> {
    FileType::from_name(name).ok_or_else(|| {
        let names: Vec<&str> = FileType::ALL.iter().map(|t| t.name()).collect();
        anyhow!(
            "unknown {flag} {name:?}; choose one of {}",
            names.join(", ")
        )
    })
}

/// The split limit of `--split-max-size` (N followed by M or G, decimal units as
/// llama-gguf-split reads them) or `--split-max-tensors`.
pub fn split_limit(size: Option<&str>, tensors: Option<usize>) -> Result<Option<SplitLimit>> {
    if let Some(n) = tensors {
        if n == 0 {
            bail!("--split-max-tensors must be at least 1");
        }
        return Ok(Some(SplitLimit::Tensors(n)));
    }
    let Some(size) = size else {
        return Ok(None);
    };
    let (digits, scale) = if let Some(d) = size.strip_suffix('M') {
        (d, 1_000_000u64)
    } else if let Some(d) = size.strip_suffix('G') {
        (d, 1_000_000_000)
    } else {
        bail!("--split-max-size {size:?}: give a number followed by M or G, e.g. 48G")
    };
    match digits.parse::<u64>() {
        Ok(n) if n > 0 => Ok(Some(SplitLimit::Bytes(n.saturating_mul(scale)))),
        _ => bail!("--split-max-size {size:?}: give a positive number followed by M or G"),
    }
}

pub fn run(
    input: &Path,
    output: &Path,
    file_type_name: &str,
    split: Option<SplitLimit>,
    imatrix: Option<&Path>,
    overrides: &TypeOverrides,
) -> Result<()> {
    let ft = file_type(file_type_name)?;
    let imatrix = imatrix
        .map(herd_formats::imatrix::ImportanceMatrix::open)
        .transpose()?;
    if output.exists() && output.canonicalize().ok() == input.canonicalize().ok() {
        bail!("output would overwrite the input");
    }
    // Nor may any file of a split output replace one of a split input.
    if split.is_some() && !input.is_dir() {
        let inputs: Vec<_> = GgufFile::open(input)
            .map(|f| {
                f.shard_paths()
                    .iter()
                    .filter_map(|p| p.canonicalize().ok())
                    .collect()
            })
            .unwrap_or_default();
        let first = herd_formats::quantize::split_path(output, 0, 1);
        let first = first.to_string_lossy();
        let stem = first.strip_suffix("-00001-of-00001.gguf").unwrap_or(&first);
        let stem = Path::new(stem)
            .parent()
            .and_then(|d| d.canonicalize().ok())
            .map(|d| d.join(Path::new(stem).file_name().unwrap_or_default()))
            .unwrap_or_else(|| Path::new(stem).to_path_buf());
        let stem = format!("{}-", stem.display());
        if inputs
            .iter()
            .any(|p| p.to_string_lossy().starts_with(&stem))
        {
            bail!("the split output {stem}*.gguf could overwrite the input's files");
        }
    }
    let plan = if input.is_dir() {
        let dir = HfModelDir::open(input)?;
        let model_type = herd_models::config_json::model_type(&dir.config)?;
        if !matches!(model_type.as_str(), "llama4" | "llama4_text") {
            bail!("converting {model_type} checkpoints to GGUF is not supported (llama4 is)");
        }
        herd_models::llama4::export::gguf_from_hf(&dir)?
    } else {
        let f = GgufFile::open(input).with_context(|| format!("reading {}", input.display()))?;
        from_gguf(&f)?
    };
    let tensors = &plan.tensors;
    let requantized = tensors.iter().filter(|t| t.dtype.is_quantized()).count();
    if requantized > 0 {
        eprintln!(
            "warning: {requantized} input tensors are already quantized; requantizing loses precision"
        );
    }
    let shape = ModelShape {
        imatrix: imatrix.is_some(),
        ..plan.shape
    };
    let types = herd_formats::quantize::choose_types_with(
        ft,
        &shape,
        overrides,
        tensors
            .iter()
            .map(|t| (t.name.as_str(), t.dims.as_slice(), t.dtype)),
    );
    // As llama-quantize: the very low-bit types are written only from an importance matrix,
    // and every tensor they are chosen for must have its entry.
    let needs_matrix: Vec<(&str, DType)> = tensors
        .iter()
        .zip(&types)
        .filter(|(t, ty)| {
            **ty != t.dtype
                && (herd_formats::quantize::tensor_requires_imatrix(&t.name, **ty, ft)
                    || herd_kernels::quant::requires_importance(**ty))
        })
        .map(|(t, ty)| (t.name.as_str(), *ty))
        .collect();
    match (&imatrix, needs_matrix.first()) {
        (None, Some((name, ty))) => bail!(
            "{} needs an importance matrix (--imatrix FILE, made by llama.cpp's llama-imatrix): \
             {name} would be {ty}{}",
            ft.name(),
            match needs_matrix.len() - 1 {
                0 => String::new(),
                n => format!(", and {n} more tensors of such types"),
            }
        ),
        (Some(m), _) => {
            if let Some((name, ty)) = needs_matrix.iter().find(|(name, _)| m.get(name).is_none()) {
                bail!(
                    "--imatrix has no entry for {name}, which {} quantizes to {ty}: an {ty} \
                     tensor without one would be garbage (llama-quantize refuses it too)",
                    ft.name()
                );
            }
        }
        (None, None) => {}
    }
    if let Some(m) = &imatrix {
        let guided = tensors.iter().zip(&types).filter_map(|(t, ty)| {
            let w = m.get(&t.name)?;
            (*ty != t.dtype && herd_formats::quantize::importance_matters(*ty, t, w))
                .then_some((t, w))
        });
        for (t, w) in guided {
            let want = t.dims[0] * t.dims.get(2).copied().unwrap_or(1);
            if w.len() as u64 != want {
                bail!(
                    "--imatrix: {} has {} importances, the tensor {want} ({:?})",
                    t.name,
                    w.len(),
                    t.dims
                );
            }
        }
    }
    write_split_with_progress(&plan, ft, output, split, imatrix.as_ref(), overrides)
}

/// Write `plan` as a GGUF typed for `ft`, with a progress bar and a per-type summary.
pub fn write_with_progress(plan: &GgufPlan, ft: FileType, output: &Path) -> Result<()> {
    write_split_with_progress(plan, ft, output, None, None, &TypeOverrides::default())
}

/// [`write_with_progress`], as a split set when `split` is given.
fn write_split_with_progress(
    plan: &GgufPlan,
    ft: FileType,
    output: &Path,
    split: Option<SplitLimit>,
    imatrix: Option<&herd_formats::imatrix::ImportanceMatrix>,
    overrides: &TypeOverrides,
) -> Result<()> {
    let tensors = &plan.tensors;
    let start = Instant::now();
    let bar = indicatif::ProgressBar::new(tensors.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} tensors {msg}")
            .expect("valid template"),
    );
    let (summary, files) =
        write_quantized_with(output, plan, ft, split, imatrix, overrides, |i, _, name| {
            bar.set_position(i as u64);
            bar.set_message(name.to_string());
        })?;
    bar.finish_and_clear();
    let mut by_type = std::collections::BTreeMap::new();
    for (_, t, bytes) in &summary.tensors {
        let e = by_type.entry(t.name()).or_insert((0, 0u64));
        e.0 += 1;
        e.1 += bytes;
    }
    for (t, (n, bytes)) in by_type {
        eprintln!("  {t:>6}: {n:>4} tensors, {bytes:>12} bytes");
    }
    let written = match files.as_slice() {
        [one] => one.display().to_string(),
        [first, .., last] => format!(
            "{} files, {} … {}",
            files.len(),
            first.display(),
            last.display()
        ),
        [] => String::new(),
    };
    eprintln!(
        "wrote {written} ({} bytes of tensors, {}) in {:.1}s",
        summary.bytes,
        ft.name(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A GGUF file's metadata (minus the keys the writer sets) and tensors, read in place.
fn from_gguf(f: &GgufFile) -> Result<GgufPlan> {
    // A split input's split keys describe the input's files, not the output's.
    let skip = [
        "general.file_type",
        "general.quantization_version",
        "general.alignment",
        herd_formats::gguf::SPLIT_NO,
        herd_formats::gguf::SPLIT_COUNT,
        herd_formats::gguf::SPLIT_TENSORS_COUNT,
    ];
    let meta: Vec<_> = f
        .header
        .metadata
        .iter()
        .filter(|(k, _)| !skip.contains(&k.as_str()))
        .cloned()
        .collect();
    let arch = f.architecture().unwrap_or_default();
    let key = |k: &str| f.arch_usize(k);
    let tensors: Vec<SourceTensor> = f
        .tensors()
        .iter()
        .map(|t| SourceTensor::stored(&t.name, t.dims.clone(), t.dtype, f.tensor_bytes(t)))
        .collect();
    let shape = ModelShape {
        n_layers: key("block_count")
            .ok_or_else(|| anyhow!("GGUF key {arch}.block_count is missing"))?,
        n_experts: key("expert_count").unwrap_or(0),
        n_attn_v: tensors
            .iter()
            .filter(|t| t.name.contains("attn_v.weight"))
            .count(),
        tied_embeddings: f.tensor_info("output.weight").is_none(),
        // llama.cpp's n_gqa(): heads per kv head (1 when a key is missing or per layer).
        n_gqa: match (key("attention.head_count"), key("attention.head_count_kv")) {
            (Some(h), Some(kv)) if kv > 0 => h / kv,
            _ => 1,
        },
        imatrix: false,
    };
    Ok(GgufPlan {
        metadata: meta,
        tensors,
        shape,
    })
}

/// The GGUF plan of a random-weight model shaped as a Llama 4 preset, or as a `config.json` file.
pub fn random_plan(shape: &str, ft: FileType, seed: u64) -> Result<GgufPlan> {
    let config = if let Some(p) = herd_models::presets::preset(shape) {
        if p.family != "llama4" {
            bail!(
                "random weights are written for llama4 shapes only, not {shape} ({})",
                p.family
            );
        }
        p.config()
    } else if shape.ends_with(".json") {
        herd_formats::hf::read_json(Path::new(shape))?
    } else {
        let names: Vec<&str> = herd_models::presets::PRESETS
            .iter()
            .filter(|p| p.family == "llama4")
            .map(|p| p.alias)
            .collect();
        bail!(
            "unknown preset {shape:?}; choose one of {} or give a config.json",
            names.join(", ")
        );
    };
    let c = herd_models::llama4::Llama4Config::from_json(&config)?;
    Ok(herd_models::llama4::random::random_gguf_plan(&c, ft, seed))
}

/// Bytes a random plan's tensors take in the file (they already carry the types `ft` chose).
pub fn random_plan_bytes(plan: &GgufPlan) -> u64 {
    plan.tensors
        .iter()
        .map(|t| t.dtype.bytes_for(t.dims.iter().product::<u64>() as usize) as u64)
        .sum()
}

/// `herd random-model`: write a random-weight GGUF of a preset's shape.
pub fn random_model(preset: &str, output: &Path, file_type_name: &str, seed: u64) -> Result<()> {
    let ft = file_type(file_type_name)?;
    let plan = random_plan(preset, ft, seed)?;
    write_with_progress(&plan, ft, output)
}

/// llama-quantize's type overrides from `herd quantize`'s flags: `--tensor-type PATTERN=TYPE`
/// (a regular expression searched in each tensor name; the first match wins),
/// `--output-tensor-type TYPE`, `--token-embedding-type TYPE`; TYPE a ggml type name (q4_k,
/// iq2_xxs, q8_0, f16, …).
pub fn type_overrides(
    tensor_types: &[String],
    output: Option<&str>,
    token_embd: Option<&str>,
) -> Result<TypeOverrides> {
    let dtype = |flag: &str, name: &str| -> Result<DType> {
        DType::from_name(name)
            .filter(|t| !matches!(t, DType::Q8K | DType::Q8_1))
            .ok_or_else(|| {
                anyhow!(
                    "{flag} {name}: not a tensor type (one of {})",
                    DType::ALL
                        .iter()
                        .filter(|t| !matches!(t, DType::Q8K | DType::Q8_1))
                        .map(|t| t.name().to_lowercase())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    };
    let mut tensors = Vec::new();
    for arg in tensor_types {
        let (pattern, ty) = arg.rsplit_once('=').ok_or_else(|| {
            anyhow!("--tensor-type {arg}: expected PATTERN=TYPE, e.g. ffn_.*_exps=iq2_xxs")
        })?;
        let re = regex::Regex::new(pattern).map_err(|e| {
            anyhow!("--tensor-type {arg}: {pattern} is not a regular expression: {e}")
        })?;
        tensors.push((re, dtype("--tensor-type", ty)?));
    }
    Ok(TypeOverrides {
        output: output
            .map(|t| dtype("--output-tensor-type", t))
            .transpose()?,
        token_embd: token_embd
            .map(|t| dtype("--token-embedding-type", t))
            .transpose()?,
        tensors,
    })
}
