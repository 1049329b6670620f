//! Hardware: a catalog of GPUs (memory, bandwidth, bf16 compute) and system memory, user-
//! extensible from a JSON file, and measurement of this machine.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

pub const GIB: f64 = (1u64 << 30) as f64;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpu {
    pub name: String,
    /// Bytes of device memory.
    pub memory: f64,
    /// Bytes per second.
    pub bandwidth: f64,
    /// Dense bf16 FLOP/s.
    pub flops: f64,
    /// A rental price, USD per GPU-hour, when the catalog or the user's file has one.
    pub price_per_hour: Option<f64>,
}

/// Built-in GPUs: name, memory GiB (as sold, GB where vendors quote GB), bandwidth GB/s, dense
/// bf16 TFLOP/s (vendor datasheet figures), and a rental price in USD per GPU-hour where one
/// provider publishes it: RunPod Serverless active-worker rates per second × 3600, as listed at
/// docs.runpod.io/serverless/pricing in 2026 (A100 80 GB $0.00060, H100 $0.00093, H200
/// $0.00124, B200 $0.00190, L40S $0.00037, RTX 4090 $0.00021, RTX 3090 $0.00013). Prices
/// move and differ between providers: `--price-per-hour` or a `price_per_hour` entry in
/// `HERD_HARDWARE` overrides them.
const GPUS: &[(&str, f64, f64, f64, Option<f64>)] = &[
    ("rtx3060", 12.0, 360.0, 51.0, None),
    ("rtx3080", 10.0, 760.0, 119.0, None),
    ("rtx3090", 24.0, 936.0, 142.0, Some(0.468)),
    ("rtx4060ti", 16.0, 288.0, 88.0, None),
    ("rtx4070", 12.0, 504.0, 117.0, None),
    ("rtx4080", 16.0, 717.0, 195.0, None),
    ("rtx4090", 24.0, 1008.0, 330.0, Some(0.756)),
    ("rtx5070", 12.0, 672.0, 247.0, None),
    ("rtx5080", 16.0, 960.0, 450.0, None),
    ("rtx5090", 32.0, 1792.0, 838.0, None),
    ("l40s", 48.0, 864.0, 362.0, Some(1.332)),
    ("a100-40gb", 40.0, 1555.0, 312.0, None),
    ("a100-80gb", 80.0, 2039.0, 312.0, Some(2.16)),
    ("h100-pcie", 80.0, 2000.0, 756.0, None),
    ("h100-sxm", 80.0, 3350.0, 989.0, Some(3.348)),
    ("h100", 80.0, 3350.0, 989.0, Some(3.348)),
    ("h200", 141.0, 4800.0, 989.0, Some(4.464)),
    ("b200", 180.0, 8000.0, 2250.0, Some(6.84)),
    ("mi300x", 192.0, 5300.0, 1307.0, None),
    // Apple unified memory: the "GPU" is the SoC; memory is what the machine has.
    ("m2-max", 96.0, 400.0, 27.0, None),
    ("m2-ultra", 192.0, 800.0, 54.0, None),
    ("m3-max", 128.0, 400.0, 28.0, None),
    ("m4-max", 128.0, 546.0, 34.0, None),
];

/// The catalog, plus entries from the JSON file in `HERD_HARDWARE` (a list of
/// `{"name", "memory_gib", "bandwidth_gbs", "tflops"}`, optionally `"price_per_hour"` in USD
/// per GPU-hour), which may add or override.
pub fn catalog() -> Result<Vec<Gpu>> {
    let mut gpus: Vec<Gpu> = GPUS
        .iter()
        .map(|&(name, mem, bw, tf, price)| Gpu {
            name: name.into(),
            memory: mem * GIB,
            bandwidth: bw * 1e9,
            flops: tf * 1e12,
            price_per_hour: price,
        })
        .collect();
    if let Ok(path) = std::env::var("HERD_HARDWARE") {
        #[derive(Deserialize)]
        struct Entry {
            name: String,
            memory_gib: f64,
            bandwidth_gbs: f64,
            tflops: f64,
            #[serde(default)]
            price_per_hour: Option<f64>,
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::Hardware(format!("{path}: {e}")))?;
        let extra: Vec<Entry> =
            serde_json::from_str(&text).map_err(|e| Error::Hardware(format!("{path}: {e}")))?;
        for e in extra {
            let positive = |v: f64| v.is_finite() && v > 0.0;
            if ![e.memory_gib, e.bandwidth_gbs, e.tflops]
                .into_iter()
                .all(positive)
                || e.price_per_hour.is_some_and(|p| !positive(p))
            {
                return Err(Error::Hardware(format!(
                    "{path}: {}: memory_gib, bandwidth_gbs, tflops and price_per_hour must be \
                     positive numbers",
                    e.name
                )));
            }
            gpus.retain(|g| g.name != e.name);
            gpus.push(Gpu {
                name: e.name,
                memory: e.memory_gib * GIB,
                bandwidth: e.bandwidth_gbs * 1e9,
                flops: e.tflops * 1e12,
                price_per_hour: e.price_per_hour,
            });
        }
    }
    Ok(gpus)
}

/// `rtx4090`, `h100x4`, `2xa100-80gb`: a catalog GPU and a count.
pub fn parse_gpu(spec: &str) -> Result<(Gpu, usize)> {
    let s = spec.trim().to_ascii_lowercase();
    let catalog = catalog()?;
    let find = |name: &str| catalog.iter().find(|g| g.name == name).cloned();
    if let Some(g) = find(&s) {
        return Ok((g, 1));
    }
    // `NAMExN` or `NxNAME`.
    let suffix = s
        .rsplit_once('x')
        .and_then(|(n, c)| Some((n, c.parse::<usize>().ok()?)));
    let prefix = s
        .split_once('x')
        .and_then(|(c, n)| Some((n, c.parse::<usize>().ok()?)));
    for (name, count) in [suffix, prefix].into_iter().flatten() {
        if let Some(g) = find(name).filter(|_| count > 0) {
            return Ok((g, count));
        }
    }
    Err(unknown_gpu(spec, &catalog))
}

fn unknown_gpu(spec: &str, catalog: &[Gpu]) -> Error {
    let names: Vec<&str> = catalog.iter().map(|g| g.name.as_str()).collect();
    Error::Hardware(format!(
        "unknown GPU {spec:?}; known: {} (add more with a JSON file in HERD_HARDWARE)",
        names.join(", ")
    ))
}

/// `24GiB`, `24GB`, `512MiB`, `1.5TiB`, or plain bytes.
pub fn parse_bytes(s: &str) -> Result<f64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| Error::Hardware(format!("cannot read a size from {s:?}")))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => GIB,
        "tib" => GIB * 1024.0,
        other => {
            return Err(Error::Hardware(format!(
                "unknown size unit {other:?} in {s:?}"
            )));
        }
    };
    if !(v.is_finite() && v > 0.0) {
        return Err(Error::Hardware(format!("{s:?}: sizes must be positive")));
    }
    Ok(v * mult)
}

/// `90GB/s`, `22.5 GB/s`, `800GiB/s`.
pub fn parse_bandwidth(s: &str) -> Result<f64> {
    let t = s.trim();
    let t = t
        .strip_suffix("/s")
        .or_else(|| t.strip_suffix("ps"))
        .unwrap_or(t);
    parse_bytes(t)
}

/// System memory bandwidth from its configuration, `ddr5-4800x12` (type, MT/s, channels): each
/// channel moves 8 bytes per transfer. Common platforms by name too (`epyc-genoa`, …).
pub fn parse_cpu_memory(spec: &str) -> Result<f64> {
    let s = spec.trim().to_ascii_lowercase();
    let named = match s.as_str() {
        "desktop-ddr4" => Some("ddr4-3200x2"),
        "desktop-ddr5" => Some("ddr5-5600x2"),
        "threadripper-7000" => Some("ddr5-5200x4"),
        "threadripper-pro-7000" => Some("ddr5-5200x8"),
        "xeon-sapphire-rapids" => Some("ddr5-4800x8"),
        "xeon-granite-rapids" => Some("ddr5-6400x12"),
        "epyc-genoa" => Some("ddr5-4800x12"),
        "epyc-turin" => Some("ddr5-6000x12"),
        _ => None,
    };
    let s = named.map_or(s.clone(), str::to_owned);
    let bad = || {
        Error::Hardware(format!(
            "cannot read CPU memory {spec:?}: use ddrN-SPEEDxCHANNELS (e.g. ddr5-4800x12) or one of \
             desktop-ddr4, desktop-ddr5, threadripper-7000, threadripper-pro-7000, xeon-sapphire-rapids, \
             xeon-granite-rapids, epyc-genoa, epyc-turin"
        ))
    };
    let rest = s
        .strip_prefix("ddr")
        .and_then(|r| r.split_once('-'))
        .map(|(_, r)| r)
        .ok_or_else(bad)?;
    let (speed, channels) = rest.split_once('x').ok_or_else(bad)?;
    let (speed, channels): (f64, f64) = (
        speed.parse().map_err(|_| bad())?,
        channels.parse().map_err(|_| bad())?,
    );
    if speed <= 0.0 || channels <= 0.0 {
        return Err(bad());
    }
    Ok(speed * 1e6 * 8.0 * channels)
}

/// System RAM of this machine, bytes (`MemTotal`).
pub fn this_machine_ram() -> Result<f64> {
    meminfo("MemTotal")
}

/// Memory this machine could give a new process now, bytes (`MemAvailable`).
pub fn this_machine_available_ram() -> Result<f64> {
    meminfo("MemAvailable")
}

/// A `/proc/meminfo` field, bytes.
fn meminfo(field: &str) -> Result<f64> {
    let text = std::fs::read_to_string("/proc/meminfo")
        .map_err(|e| Error::Hardware(format!("/proc/meminfo: {e}")))?;
    let kb = text
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .ok_or_else(|| Error::Hardware(format!("no {field} in /proc/meminfo")))?;
    Ok(kb * 1024.0)
}

/// Memory read bandwidth of this machine, bytes/s: all threads summing a 256 MiB buffer for
/// about a second, best of several passes.
pub fn measure_read_bandwidth() -> f64 {
    let words = 32usize << 20;
    let data: Vec<u64> = (0..words as u64).collect();
    let pool = herd_kernels::pool::global();
    let threads = pool.n_threads();
    let chunk = words / threads;
    let mut best = 0.0f64;
    let start = std::time::Instant::now();
    while start.elapsed().as_secs_f64() < 1.0 {
        let t0 = std::time::Instant::now();
        let sink = std::sync::atomic::AtomicU64::new(0);
        pool.run(threads, |t| {
            let mut acc = [0u64; 4];
            for w in data[t * chunk..(t + 1) * chunk].chunks_exact(4) {
                for k in 0..4 {
                    acc[k] = acc[k].wrapping_add(w[k]);
                }
            }
            sink.fetch_add(
                acc.iter().fold(0, |a, b| a.wrapping_add(*b)),
                std::sync::atomic::Ordering::Relaxed,
            );
        });
        std::hint::black_box(sink.load(std::sync::atomic::Ordering::Relaxed));
        best = best.max((chunk * threads * 8) as f64 / t0.elapsed().as_secs_f64());
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gpu_specs_and_sizes() {
        let (g, n) = parse_gpu("h100x4").unwrap();
        assert_eq!((g.name.as_str(), n), ("h100", 4));
        assert_eq!(parse_gpu("2xrtx4090").unwrap().1, 2);
        assert_eq!(parse_gpu("RTX4090").unwrap().0.memory, 24.0 * GIB);
        assert!(
            parse_gpu("rtx9999")
                .unwrap_err()
                .to_string()
                .contains("unknown GPU")
        );
        assert!(parse_gpu("h100x0").is_err());
        assert_eq!(parse_bytes("24GiB").unwrap(), 24.0 * GIB);
        assert_eq!(parse_bytes("512 MB").unwrap(), 512e6);
        assert_eq!(parse_bandwidth("90GB/s").unwrap(), 90e9);
        assert!(parse_bytes("0GiB").is_err());
        assert!(parse_bytes("lots").is_err());
        assert_eq!(
            parse_cpu_memory("ddr5-4800x12").unwrap(),
            4800e6 * 8.0 * 12.0
        );
        assert_eq!(parse_cpu_memory("epyc-genoa").unwrap(), 460.8e9);
        assert!(parse_cpu_memory("ddr5-fastx2").is_err());
    }
}
