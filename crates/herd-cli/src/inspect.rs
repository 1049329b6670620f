//! `herd inspect`: what a GGUF file (or split set) holds, or what a Hugging Face checkpoint
//! directory is; and the model's licence, with Llama 4's licence terms named.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use herd_formats::GgufFile;
use herd_formats::gguf::Value;

pub fn run(path: &Path, full: bool) -> Result<()> {
    if path.is_dir() {
        return checkpoint(path);
    }
    let f = GgufFile::open(path).with_context(|| format!("reading {}", path.display()))?;
    gguf(path, &f, full)?;
    // The licence from the header already read (the modification time is not shown).
    licence(&herd_engine::card::gguf_card(&f, None))
}

/// A checkpoint directory: its card (config.json, the safetensors headers, README.md).
fn checkpoint(path: &Path) -> Result<()> {
    let card = herd_engine::card::model_card(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}: Hugging Face checkpoint", path.display())?;
    writeln!(out, "architecture    {}", card.architecture)?;
    writeln!(
        out,
        "parameters      {} ({})",
        card.parameters,
        card.parameter_size()
    )?;
    writeln!(
        out,
        "weights         {} bytes, mostly {}",
        card.bytes, card.quantization
    )?;
    if let Some(n) = card.context_length {
        writeln!(out, "context length  {n} tokens")?;
    }
    drop(out);
    licence(&card)
}

/// The licence line, and Llama 4's terms where they apply.
fn licence(card: &herd_engine::card::ModelCard) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out)?;
    match card.license_summary() {
        Some(l) => writeln!(out, "licence: {l}")?,
        None => writeln!(
            out,
            "licence: not stated in the file; check where you downloaded it"
        )?,
    }
    if card.is_llama4_licensed() {
        writeln!(out, "{}", herd_engine::card::LLAMA4_LICENSE_NOTICE)?;
    }
    Ok(())
}

fn gguf(path: &Path, f: &GgufFile, full: bool) -> Result<()> {
    let h = &f.header;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}: GGUF v{}, {} metadata keys, {} tensors, alignment {}",
        path.display(),
        h.version,
        h.metadata.len(),
        h.tensors.len(),
        h.alignment
    )?;
    let shards = f.shard_paths();
    if shards.len() > 1 {
        writeln!(
            out,
            "split set of {} files ({} bytes), metadata from the first:",
            shards.len(),
            f.file_len()
        )?;
        for s in shards {
            writeln!(out, "  {}", s.display())?;
        }
    }
    writeln!(out)?;
    for (key, value) in &h.metadata {
        writeln!(out, "{key:<48} {}", show(value, full))?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "{:<40} {:>6} {:>24} {:>14}",
        "tensor", "type", "shape (ggml order)", "bytes"
    )?;
    let mut total = 0u64;
    for t in &h.tensors {
        let dims: Vec<String> = t.dims.iter().map(u64::to_string).collect();
        writeln!(
            out,
            "{:<40} {:>6} {:>24} {:>14}",
            t.name,
            t.dtype.name(),
            dims.join(" x "),
            t.n_bytes
        )?;
        total += t.n_bytes;
    }
    let params: u64 = h.tensors.iter().map(|t| t.n_elements()).sum();
    writeln!(out)?;
    writeln!(
        out,
        "{} tensors, {params} parameters, {total} bytes of tensor data ({:.2} bits per weight)",
        h.tensors.len(),
        total as f64 * 8.0 / params.max(1) as f64
    )?;
    Ok(())
}

fn show(v: &Value, full: bool) -> String {
    match v {
        Value::String(b) => match std::str::from_utf8(b) {
            Ok(s) if s.len() > 120 && !full => format!(
                "{:?}… ({} bytes)",
                &s[..s.floor_char_boundary(100)],
                s.len()
            ),
            Ok(s) => format!("{s:?}"),
            Err(_) => format!("<{} bytes, not UTF-8>", b.len()),
        },
        Value::Array(_, items) => {
            let shown = if full {
                items.len()
            } else {
                items.len().min(8)
            };
            let parts: Vec<String> = items[..shown].iter().map(|i| show(i, full)).collect();
            let more = if shown < items.len() {
                format!(", … ({} items)", items.len())
            } else {
                String::new()
            };
            format!("[{}{more}]", parts.join(", "))
        }
        Value::Bool(b) => b.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        other => other
            .as_i64()
            .map_or_else(|| format!("{other:?}"), |i| i.to_string()),
    }
}
