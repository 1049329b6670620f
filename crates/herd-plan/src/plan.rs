//! The plan: parameters and bytes by part, KV cache, and each placement that makes sense with
//! whether it fits and its speed bounds (decode from memory bandwidth, prefill from compute).

use serde::Serialize;

use crate::hardware::{GIB, Gpu};
use crate::model::{ModelFacts, Part};
use crate::{Error, Result};

/// Element type of the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KvType {
    F32,
    F16,
    Bf16,
    Q8_0,
}

impl KvType {
    pub fn bytes_per_element(self) -> f64 {
        match self {
            KvType::F32 => 4.0,
            KvType::F16 | KvType::Bf16 => 2.0,
            KvType::Q8_0 => 34.0 / 32.0,
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(KvType::F32),
            "f16" => Ok(KvType::F16),
            "bf16" => Ok(KvType::Bf16),
            "q8_0" => Ok(KvType::Q8_0),
            _ => Err(Error::Request(format!(
                "unknown KV cache type {s:?} (f32, f16, bf16, q8_0)"
            ))),
        }
    }
}

/// The machine to plan for.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Hardware {
    pub gpu: Option<Gpu>,
    pub gpu_count: usize,
    /// System memory, bytes.
    pub ram: Option<f64>,
    /// System memory read bandwidth, bytes/s.
    pub ram_bandwidth: Option<f64>,
    /// CPU compute (f32 FMA), FLOP/s, for prefill bounds.
    pub cpu_flops: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Request {
    pub context: usize,
    pub sequences: usize,
    pub kv_type: KvType,
    pub hardware: Hardware,
    pub pricing: Pricing,
}

/// What the machine costs, for turning tokens/s into cost per million tokens.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Pricing {
    /// The whole machine's price, USD per hour (`--price-per-hour`); without it, GPU
    /// placements use the catalog's per-GPU price times the GPU count, where it has one.
    pub price_per_hour: Option<f64>,
    /// A measured decode throughput, tokens/s over all sequences (`herd bench`, a serving
    /// benchmark), costed at the same price instead of a bound.
    pub measured_tokens_per_s: Option<f64>,
}

/// USD per million tokens at `price_per_hour` USD and `tokens_per_s`.
pub fn cost_per_million(price_per_hour: f64, tokens_per_s: f64) -> f64 {
    price_per_hour / 3600.0 / tokens_per_s * 1e6
}

/// Memory a GPU loses to the runtime (CUDA context, activations, fragmentation).
pub const GPU_RUNTIME_BYTES: f64 = 1.0 * GIB;
/// Memory a herd process needs beyond weights and KV cache (binary, runtime, scratch).
pub const PROCESS_BASE_BYTES: f64 = 8.0 * 1024.0 * 1024.0;

#[derive(Clone, Debug, Serialize)]
pub struct PartReport {
    pub part: Part,
    pub params: u64,
    pub active_params: f64,
    pub bytes: u64,
    /// Bytes one decoded token reads from this part.
    pub read_per_token: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct KvReport {
    pub kv_type: KvType,
    /// Bytes per token over all layers with every layer caching everything.
    pub bytes_per_token: f64,
    /// For the requested context and sequences.
    pub naive_total: f64,
    /// Chunked-attention layers keep at most one chunk.
    pub chunk_aware_total: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Placement {
    pub name: String,
    pub fits: bool,
    pub gpu_bytes_needed: f64,
    pub gpu_bytes_available: f64,
    pub ram_bytes_needed: f64,
    pub ram_bytes_available: Option<f64>,
    /// Bytes read per decoded token from GPU memory and from system memory.
    pub gpu_read_per_token: f64,
    pub ram_read_per_token: f64,
    /// Single-stream decode upper bound from memory bandwidth.
    pub decode_tokens_per_s: Option<f64>,
    /// Upper bound from compute.
    pub prefill_tokens_per_s: Option<f64>,
    /// The price this placement is costed at, USD per hour, and where it came from.
    pub price_per_hour: Option<f64>,
    pub price_source: String,
    /// USD per million generated tokens at the decode bound: the least one sequence can cost
    /// here (a real engine reaches part of the bound; batching lowers cost per token).
    pub output_cost_per_million: Option<f64>,
    /// USD per million prompt tokens at the prefill (compute) bound, a least cost likewise.
    pub input_cost_per_million: Option<f64>,
    pub note: String,
}

impl Placement {
    /// The price fields, unset (`price` fills them).
    fn unpriced() -> Self {
        Placement {
            name: String::new(),
            fits: false,
            gpu_bytes_needed: 0.0,
            gpu_bytes_available: 0.0,
            ram_bytes_needed: 0.0,
            ram_bytes_available: None,
            gpu_read_per_token: 0.0,
            ram_read_per_token: 0.0,
            decode_tokens_per_s: None,
            prefill_tokens_per_s: None,
            price_per_hour: None,
            price_source: String::new(),
            output_cost_per_million: None,
            input_cost_per_million: None,
            note: String::new(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub model: String,
    pub weight_types: Vec<(String, u64)>,
    pub params_total: u64,
    pub params_active: f64,
    pub parts: Vec<PartReport>,
    pub weight_bytes: u64,
    pub kv: KvReport,
    pub request: Request,
    /// Resident memory of a herd process running on CPU with this request.
    pub cpu_process_bytes: f64,
    pub placements: Vec<Placement>,
    pub recommendation: String,
    /// USD per million generated tokens at the measured throughput and the machine's price
    /// (the given `--price-per-hour`, else the recommended placement's).
    pub measured_output_cost_per_million: Option<f64>,
    /// The price the measured throughput is costed at, USD per hour, and where it came from.
    pub measured_price_per_hour: Option<f64>,
    pub measured_price_source: String,
}

pub fn plan(m: &ModelFacts, req: &Request) -> Result<Report> {
    if req.sequences == 0 || req.context == 0 {
        return Err(Error::Request(
            "context and sequences must be at least 1".into(),
        ));
    }
    if m.max_context > 0 && req.context > m.max_context {
        return Err(Error::Request(format!(
            "context {} is over the model's maximum of {} tokens",
            req.context, m.max_context
        )));
    }
    let mut parts = Vec::new();
    for part in Part::ALL {
        let ts: Vec<_> = m
            .tensors
            .iter()
            .filter(|t| Part::of(&t.name) == part)
            .collect();
        if ts.is_empty() {
            continue;
        }
        let params: u64 = ts.iter().map(|t| t.params()).sum();
        let bytes: u64 = ts.iter().map(|t| t.bytes()).sum();
        parts.push(PartReport {
            part,
            params,
            active_params: params as f64 * m.active_fraction(part),
            bytes,
            read_per_token: bytes as f64 * m.read_fraction(part),
        });
    }
    let mut types = std::collections::BTreeMap::<String, u64>::new();
    for t in &m.tensors {
        *types.entry(t.dtype.name().to_string()).or_default() += t.bytes();
    }
    let weight_bytes: u64 = parts.iter().map(|p| p.bytes).sum();
    let (naive_one, aware_one) = m.kv_bytes(req.context, req.kv_type.bytes_per_element());
    let seqs = req.sequences as f64;
    let kv = KvReport {
        kv_type: req.kv_type,
        bytes_per_token: m.kv_bytes_per_token_layer(req.kv_type.bytes_per_element())
            * m.n_layers as f64,
        naive_total: naive_one * seqs,
        chunk_aware_total: aware_one * seqs,
    };
    let kv_total = kv.chunk_aware_total;
    // A decoded token reads its sequence's whole (chunk-aware) cache once.
    let kv_read = aware_one;
    let sum = |f: &dyn Fn(&PartReport) -> bool, g: &dyn Fn(&PartReport) -> f64| -> f64 {
        parts.iter().filter(|p| f(p)).map(g).sum()
    };
    let routed = |p: &PartReport| p.part == Part::RoutedExperts;
    let all = |_: &PartReport| true;
    let read_all = sum(&all, &|p| p.read_per_token);
    let read_routed = sum(&routed, &|p| p.read_per_token);
    let bytes_routed = sum(&routed, &|p| p.bytes as f64);
    // Matmul FLOPs per token: 2 per active weight, the embedding lookup excluded.
    let flops_per_token = |f: &dyn Fn(&PartReport) -> bool| -> f64 {
        2.0 * sum(&|p| f(p) && p.part != Part::Embeddings, &|p| {
            p.active_params
        })
    };
    let hw = &req.hardware;
    let cpu_process_bytes = weight_bytes as f64 + kv_total + PROCESS_BASE_BYTES;

    let mut placements = Vec::new();
    if let Some(gpu) = &hw.gpu {
        let n = hw.gpu_count.max(1) as f64;
        let split = if n > 1.0 {
            format!("{}-way split", hw.gpu_count)
        } else {
            "one GPU".into()
        };
        let gpu_avail = n * (gpu.memory - GPU_RUNTIME_BYTES);
        let need = weight_bytes as f64 + kv_total;
        placements.push(Placement {
            name: format!(
                "all on GPU ({split} over {}x {})",
                hw.gpu_count.max(1),
                gpu.name
            ),
            fits: need <= gpu_avail,
            gpu_bytes_needed: need,
            gpu_bytes_available: gpu_avail,
            ram_bytes_needed: 0.0,
            ram_bytes_available: hw.ram,
            gpu_read_per_token: read_all + kv_read,
            ram_read_per_token: 0.0,
            decode_tokens_per_s: Some(n * gpu.bandwidth / (read_all + kv_read)),
            prefill_tokens_per_s: Some(n * gpu.flops / flops_per_token(&all)),
            note: "decode bound assumes ideal tensor parallelism".into(),
            ..Placement::unpriced()
        });
        if bytes_routed > 0.0 {
            let gpu_need = weight_bytes as f64 - bytes_routed + kv_total;
            let ram_need = bytes_routed + PROCESS_BASE_BYTES;
            let gpu_read = read_all - read_routed + kv_read;
            let decode = hw
                .ram_bandwidth
                .map(|rb| 1.0 / (gpu_read / (n * gpu.bandwidth) + read_routed / rb));
            let prefill = hw.cpu_flops.map(|cf| {
                1.0 / (flops_per_token(&|p| !routed(p)) / (n * gpu.flops)
                    + flops_per_token(&routed) / cf)
            });
            placements.push(Placement {
                name: format!(
                    "routed experts in system RAM, the rest on {}x {}",
                    hw.gpu_count.max(1),
                    gpu.name
                ),
                fits: gpu_need <= gpu_avail && hw.ram.is_none_or(|r| ram_need <= r),
                gpu_bytes_needed: gpu_need,
                gpu_bytes_available: gpu_avail,
                ram_bytes_needed: ram_need,
                ram_bytes_available: hw.ram,
                gpu_read_per_token: gpu_read,
                ram_read_per_token: read_routed,
                decode_tokens_per_s: decode,
                prefill_tokens_per_s: prefill,
                note: "experts computed on the CPU where they live".into(),
                ..Placement::unpriced()
            });
        }
    }
    placements.push(Placement {
        name: "CPU only (system RAM)".into(),
        fits: hw.ram.is_none_or(|r| cpu_process_bytes <= r),
        gpu_bytes_needed: 0.0,
        gpu_bytes_available: 0.0,
        ram_bytes_needed: cpu_process_bytes,
        ram_bytes_available: hw.ram,
        gpu_read_per_token: 0.0,
        ram_read_per_token: read_all + kv_read,
        decode_tokens_per_s: hw.ram_bandwidth.map(|rb| rb / (read_all + kv_read)),
        prefill_tokens_per_s: hw.cpu_flops.map(|cf| cf / flops_per_token(&all)),
        note: String::new(),
        ..Placement::unpriced()
    });
    for p in &mut placements {
        price(p, req, hw);
    }
    let recommendation = recommend(&placements);
    // The measured throughput is costed at the user's price, else at the price of the
    // placement recommended (the fastest that fits).
    let (measured_price_per_hour, measured_price_source) = match req.pricing.price_per_hour {
        Some(usd) => (Some(usd), "--price-per-hour".to_string()),
        None => best(&placements)
            .and_then(|p| Some((p.price_per_hour?, p.price_source.clone())))
            .map_or((None, String::new()), |(usd, source)| (Some(usd), source)),
    };
    let measured_output_cost_per_million = req
        .pricing
        .measured_tokens_per_s
        .zip(measured_price_per_hour)
        .map(|(t, usd)| cost_per_million(usd, t));
    Ok(Report {
        model: m.name.clone(),
        weight_types: types.into_iter().collect(),
        params_total: parts.iter().map(|p| p.params).sum(),
        params_active: parts.iter().map(|p| p.active_params).sum(),
        parts,
        weight_bytes,
        kv,
        request: req.clone(),
        cpu_process_bytes,
        placements,
        recommendation,
        measured_output_cost_per_million,
        measured_price_per_hour,
        measured_price_source,
    })
}

/// Set a placement's price (the user's, else the catalog GPU's times the count for placements
/// that use GPUs) and its costs per million tokens at its bounds.
fn price(p: &mut Placement, req: &Request, hw: &Hardware) {
    let catalog = hw
        .gpu
        .as_ref()
        .filter(|_| p.gpu_bytes_needed > 0.0)
        .and_then(|g| Some((g, g.price_per_hour?)));
    (p.price_per_hour, p.price_source) = match (req.pricing.price_per_hour, catalog) {
        (Some(usd), _) => (Some(usd), "--price-per-hour".into()),
        (None, Some((g, usd))) => {
            let n = hw.gpu_count.max(1);
            (
                Some(usd * n as f64),
                format!("catalog: {n}x {} at ${usd:.2} per GPU-hour", g.name),
            )
        }
        (None, None) => (None, String::new()),
    };
    if let Some(usd) = p.price_per_hour {
        p.output_cost_per_million = p.decode_tokens_per_s.map(|t| cost_per_million(usd, t));
        p.input_cost_per_million = p.prefill_tokens_per_s.map(|t| cost_per_million(usd, t));
    }
}

/// The placement to recommend: the fastest decode among those that fit.
fn best(placements: &[Placement]) -> Option<&Placement> {
    placements.iter().filter(|p| p.fits).max_by(|a, b| {
        a.decode_tokens_per_s
            .unwrap_or(0.0)
            .total_cmp(&b.decode_tokens_per_s.unwrap_or(0.0))
    })
}

fn recommend(placements: &[Placement]) -> String {
    match best(placements) {
        Some(p) => match p.decode_tokens_per_s {
            Some(t) => format!("{}: fits, decode at most {t:.1} tokens/s", p.name),
            None => format!("{}: fits (give --mem-bandwidth for a speed bound)", p.name),
        },
        None => {
            let least = placements
                .iter()
                .map(|p| p.ram_bytes_needed.max(p.gpu_bytes_needed))
                .fold(f64::MAX, f64::min);
            format!(
                "does not fit this hardware; the smallest placement needs {:.1} GiB",
                least / GIB
            )
        }
    }
}
