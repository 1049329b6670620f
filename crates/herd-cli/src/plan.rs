//! `herd plan`: will it fit, where should each part live, how fast can it run.

use anyhow::{Result, bail};
use herd_formats::quantize::FileType;
use herd_plan::hardware::{self, GIB};
use herd_plan::plan::Pricing;
use herd_plan::{Hardware, KvType, Request};

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A GGUF file, an HF directory, or an alias (llama4:scout, llama4:maverick).
    model: String,
    /// Weight type to plan for (bf16, q8_0, q4_k_m, …); default: as stored (GGUF) or bf16.
    #[arg(long = "type", short = 't')]
    weight_type: Option<String>,
    /// Context length per sequence.
    #[arg(long, default_value_t = 8192)]
    context: usize,
    /// Concurrent sequences.
    #[arg(long, default_value_t = 1)]
    sequences: usize,
    /// KV cache element type: f16, bf16, f32, q8_0.
    #[arg(long, default_value = "f16")]
    kv_type: String,
    /// GPU from the catalog, optionally with a count: rtx4090, h100x4.
    #[arg(long)]
    gpu: Option<String>,
    /// GPU memory per device (instead of or overriding the catalog's), e.g. 24GiB.
    #[arg(long)]
    gpu_mem: Option<String>,
    /// System memory, e.g. 128GiB.
    #[arg(long)]
    ram: Option<String>,
    /// System memory read bandwidth, e.g. 90GB/s.
    #[arg(long)]
    mem_bandwidth: Option<String>,
    /// System memory as configured: ddr5-4800x12 (type, MT/s, channels) or a platform name
    /// (epyc-genoa, xeon-sapphire-rapids, desktop-ddr5, …); sets the bandwidth.
    #[arg(long)]
    cpu_mem: Option<String>,
    /// CPU compute for prefill bounds, in TFLOP/s.
    #[arg(long)]
    cpu_tflops: Option<f64>,
    /// Read this machine's RAM and measure its memory bandwidth (about a second).
    #[arg(long)]
    this_machine: bool,
    /// What the machine costs, USD per hour (overrides the catalog's GPU rental prices):
    /// placements are then costed per million tokens, for comparing with a hosted API.
    #[arg(long)]
    price_per_hour: Option<f64>,
    /// A measured decode throughput in tokens/s over all sequences (from `herd bench` or a
    /// serving benchmark), costed per million tokens at the same price.
    #[arg(long)]
    tokens_per_s: Option<f64>,
    /// Print the plan as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(a: &PlanArgs) -> Result<()> {
    let ft = match &a.weight_type {
        Some(t) => Some(FileType::from_name(t).ok_or_else(|| {
            let names: Vec<&str> = FileType::ALL.iter().map(|t| t.name()).collect();
            anyhow::anyhow!("unknown --type {t:?}; choose one of {}", names.join(", "))
        })?),
        None => None,
    };
    let facts = herd_plan::resolve(&a.model, ft)?;
    let mut hw = Hardware::default();
    if let Some(spec) = &a.gpu {
        let (gpu, n) = hardware::parse_gpu(spec)?;
        hw.gpu = Some(gpu);
        hw.gpu_count = n;
    }
    if let Some(mem) = &a.gpu_mem {
        let bytes = hardware::parse_bytes(mem)?;
        if bytes <= GIB {
            bail!("--gpu-mem {mem}: a GPU needs more than the 1 GiB its runtime takes");
        }
        match &mut hw.gpu {
            Some(g) => g.memory = bytes,
            None => {
                hw.gpu = Some(hardware::Gpu {
                    name: format!("GPU with {mem}"),
                    memory: bytes,
                    bandwidth: 1e12,
                    flops: 1e14,
                    price_per_hour: None,
                });
                hw.gpu_count = 1;
                eprintln!(
                    "note: --gpu-mem without --gpu assumes 1 TB/s and 100 TFLOP/s; name a GPU for real bounds"
                );
            }
        }
    }
    if a.this_machine {
        hw.ram = Some(hardware::this_machine_ram()?);
        hw.ram_bandwidth = Some(hardware::measure_read_bandwidth());
        let threads = herd_kernels::pool::global().n_threads() as f64;
        // AVX2 FMA: 2 × 8 f32 lanes × 2 FLOPs per cycle per core, at an assumed 3 GHz.
        hw.cpu_flops = Some(threads * 32.0 * 3e9);
    }
    if let Some(r) = &a.ram {
        hw.ram = Some(hardware::parse_bytes(r)?);
    }
    if let Some(m) = &a.cpu_mem {
        hw.ram_bandwidth = Some(hardware::parse_cpu_memory(m)?);
    }
    if let Some(b) = &a.mem_bandwidth {
        hw.ram_bandwidth = Some(hardware::parse_bandwidth(b)?);
    }
    if let Some(t) = a.cpu_tflops {
        if !(t.is_finite() && t > 0.0) {
            bail!("--cpu-tflops must be positive");
        }
        hw.cpu_flops = Some(t * 1e12);
    }
    for (flag, value) in [
        ("--price-per-hour", a.price_per_hour),
        ("--tokens-per-s", a.tokens_per_s),
    ] {
        if value.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            bail!("{flag} must be a positive number");
        }
    }
    let req = Request {
        context: a.context,
        sequences: a.sequences,
        kv_type: KvType::parse(&a.kv_type)?,
        hardware: hw,
        pricing: Pricing {
            price_per_hour: a.price_per_hour,
            measured_tokens_per_s: a.tokens_per_s,
        },
    };
    let report = herd_plan::plan(&facts, &req)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", herd_plan::render::text(&report));
    }
    Ok(())
}
