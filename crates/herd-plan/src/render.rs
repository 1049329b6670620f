//! The plan as text for people.

use std::fmt::Write;

use crate::hardware::GIB;
use crate::plan::Report;

fn gib(b: f64) -> String {
    format!("{:.2} GiB", b / GIB)
}

fn billions(p: f64) -> String {
    if p >= 1e9 {
        format!("{:.2}B", p / 1e9)
    } else {
        format!("{:.2}M", p / 1e6)
    }
}

pub fn text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "model: {}", r.model);
    let types: Vec<String> = r
        .weight_types
        .iter()
        .map(|(t, b)| format!("{t} {}", gib(*b as f64)))
        .collect();
    let _ = writeln!(
        s,
        "parameters: {} total, {} active per token; weights {} ({})",
        billions(r.params_total as f64),
        billions(r.params_active),
        gib(r.weight_bytes as f64),
        types.join(", ")
    );
    let _ = writeln!(
        s,
        "\n{:<16} {:>12} {:>14} {:>12} {:>16}",
        "part", "params", "active/token", "bytes", "read/token"
    );
    for p in &r.parts {
        let _ = writeln!(
            s,
            "{:<16} {:>12} {:>14} {:>12} {:>16}",
            p.part.label(),
            billions(p.params as f64),
            billions(p.active_params),
            gib(p.bytes as f64),
            gib(p.read_per_token)
        );
    }
    let kv = &r.kv;
    let _ = writeln!(
        s,
        "\nKV cache ({:?}): {:.0} bytes per token; for {} tokens x {} sequences: {} naive, {} chunk-aware",
        kv.kv_type,
        kv.bytes_per_token,
        r.request.context,
        r.request.sequences,
        gib(kv.naive_total),
        gib(kv.chunk_aware_total)
    );
    let _ = writeln!(s, "\nplacements:");
    for p in &r.placements {
        let fit = if p.fits { "fits" } else { "does NOT fit" };
        let _ = writeln!(s, "  {} — {fit}", p.name);
        if p.gpu_bytes_needed > 0.0 {
            let _ = writeln!(
                s,
                "    GPU: needs {} of {} (headroom {})",
                gib(p.gpu_bytes_needed),
                gib(p.gpu_bytes_available),
                gib(p.gpu_bytes_available - p.gpu_bytes_needed)
            );
        }
        if p.ram_bytes_needed > 0.0 {
            let avail = p.ram_bytes_available.map_or("unknown".into(), |r| {
                format!("{} (headroom {})", gib(r), gib(r - p.ram_bytes_needed))
            });
            let _ = writeln!(s, "    RAM: needs {} of {avail}", gib(p.ram_bytes_needed));
        }
        let read = p.gpu_read_per_token + p.ram_read_per_token;
        match p.decode_tokens_per_s {
            Some(t) => {
                let _ = writeln!(
                    s,
                    "    decode ≤ {t:.1} tokens/s ({} read per token)",
                    gib(read)
                );
            }
            None => {
                let _ = writeln!(
                    s,
                    "    decode: give --mem-bandwidth for a bound ({} read per token)",
                    gib(read)
                );
            }
        }
        if let Some(t) = p.prefill_tokens_per_s {
            let _ = writeln!(s, "    prefill ≤ {t:.0} tokens/s (compute)");
        }
        if let Some(usd) = p.price_per_hour {
            let mut costs = Vec::new();
            if let Some(c) = p.output_cost_per_million {
                costs.push(format!("${c:.2} per million output tokens (one sequence)"));
            }
            if let Some(c) = p.input_cost_per_million {
                costs.push(format!("${c:.2} per million input tokens"));
            }
            if costs.is_empty() {
                costs.push("no speed bound to cost".into());
            }
            let _ = writeln!(
                s,
                "    cost at these bounds: {}, at ${usd:.2}/hour ({})",
                costs.join(", "),
                p.price_source
            );
        }
        if !p.note.is_empty() {
            let _ = writeln!(s, "    ({})", p.note);
        }
    }
    let _ = writeln!(s, "\nrecommendation: {}", r.recommendation);
    if let (Some(t), Some(c), Some(usd)) = (
        r.request.pricing.measured_tokens_per_s,
        r.measured_output_cost_per_million,
        r.measured_price_per_hour,
    ) {
        let _ = writeln!(
            s,
            "measured: {t:.1} tokens/s costs ${c:.2} per million output tokens at ${usd:.2}/hour ({})",
            r.measured_price_source
        );
    } else if r.request.pricing.measured_tokens_per_s.is_some() {
        let _ = writeln!(
            s,
            "measured: no fitting placement has a catalog price; give --price-per-hour to cost it"
        );
    }
    if r.placements.iter().any(|p| p.price_per_hour.is_some()) {
        let _ = writeln!(
            s,
            "(a bound's cost is the least one sequence can cost: a real engine reaches part of the \
             bound, and batching many sequences lowers cost per token; give --tokens-per-s with \
             a measured throughput)"
        );
    }
    s
}
