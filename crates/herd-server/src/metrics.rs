//! Prometheus text exposition of the server's counters, the scheduler's gauges and latency
//! histograms.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use herd_engine::scheduler::SchedulerStats;

/// Cumulative histogram with fixed upper bounds (seconds).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            inner: Mutex::new((vec![0; bounds.len()], 0.0, 0)),
        }
    }

    pub fn observe(&self, v: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for (b, c) in self.bounds.iter().zip(g.0.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        g.1 += v;
        g.2 += 1;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&g.0) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", g.2);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", g.1, g.2);
    }
}

const TTFT_BOUNDS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
const ITL_BOUNDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

#[derive(Debug)]
pub struct Metrics {
    pub requests_ok: AtomicU64,
    pub requests_error: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            requests_ok: AtomicU64::new(0),
            requests_error: AtomicU64::new(0),
            requests_cancelled: AtomicU64::new(0),
            time_to_first_token: Histogram::new(TTFT_BOUNDS),
            inter_token_latency: Histogram::new(ITL_BOUNDS),
        }
    }
}

impl Metrics {
    pub fn render(&self, s: Option<&SchedulerStats>) -> String {
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, kind: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
            );
        };
        gauge(
            "herd_model_loaded",
            "1 once the model is loaded and serving.",
            "gauge",
            f64::from(u8::from(s.is_some())),
        );
        let s = s.copied().unwrap_or_default();
        gauge(
            "herd_requests_running",
            "Sequences in the running batch.",
            "gauge",
            s.running as f64,
        );
        gauge(
            "herd_requests_waiting",
            "Sequences queued for a place in the batch.",
            "gauge",
            s.waiting as f64,
        );
        gauge(
            "herd_prompt_tokens_total",
            "Prompt tokens admitted.",
            "counter",
            s.prompt_tokens as f64,
        );
        gauge(
            "herd_generation_tokens_total",
            "Tokens generated.",
            "counter",
            s.generated_tokens as f64,
        );
        gauge(
            "herd_kv_blocks_total",
            "Blocks in the KV cache pool.",
            "gauge",
            s.kv_blocks_total as f64,
        );
        gauge(
            "herd_kv_blocks_used",
            "KV blocks held by sequences.",
            "gauge",
            s.kv_blocks_used as f64,
        );
        gauge(
            "herd_kv_blocks_free",
            "KV blocks not held by any sequence (including cached prefixes).",
            "gauge",
            (s.kv_blocks_total - s.kv_blocks_used) as f64,
        );
        gauge(
            "herd_kv_blocks_cached",
            "Unused KV blocks kept for prefix reuse.",
            "gauge",
            s.kv_blocks_cached as f64,
        );
        gauge(
            "herd_prefix_cache_hit_tokens_total",
            "Prompt tokens whose keys and values were reused from the prefix cache.",
            "counter",
            s.prefix_hit_tokens as f64,
        );
        let rate = if s.prompt_tokens > 0 {
            s.prefix_hit_tokens as f64 / s.prompt_tokens as f64
        } else {
            0.0
        };
        gauge(
            "herd_prefix_cache_hit_rate",
            "Share of admitted prompt tokens served from the prefix cache.",
            "gauge",
            rate,
        );
        gauge(
            "herd_grammar_masks_total",
            "Token masks computed for constrained requests.",
            "counter",
            s.masks as f64,
        );
        gauge(
            "herd_grammar_mask_seconds_total",
            "Time spent computing those masks.",
            "counter",
            s.mask_seconds,
        );
        gauge(
            "herd_forward_seconds_total",
            "Time the engine spent in forward passes.",
            "counter",
            s.forward_seconds,
        );
        gauge(
            "herd_sampling_seconds_total",
            "Time the engine spent sampling (masks applied, penalties, selection, draw).",
            "counter",
            s.sample_seconds,
        );
        gauge(
            "herd_preemptions_total",
            "Sequences sent back to the queue when the KV cache ran out.",
            "counter",
            s.preemptions as f64,
        );
        let _ = writeln!(
            out,
            "# HELP herd_requests_total Finished requests by outcome.\n# TYPE herd_requests_total counter"
        );
        for (label, c) in [
            ("ok", &self.requests_ok),
            ("error", &self.requests_error),
            ("cancelled", &self.requests_cancelled),
        ] {
            let _ = writeln!(
                out,
                "herd_requests_total{{outcome=\"{label}\"}} {}",
                c.load(Ordering::Relaxed)
            );
        }
        self.time_to_first_token.render(
            "herd_time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
            &mut out,
        );
        self.inter_token_latency.render(
            "herd_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            &mut out,
        );
        out
    }
}
