//! One sampled token over Gemma 3's vocabulary (262,144 logits): greedy, temperature 1.0 alone,
//! temperature 1.0 with top-p 0.95 (what OpenAI clients send), and with top-k 40.
//!
//! `cargo bench -p herd-engine --bench sampler`. The logits are shaped like a language model's:
//! sorted, they fall by 1.5 per e-fold of rank from the top (as Gemma 3 270M's do over text:
//! about 3.5 per decade), plus a little noise, at random token ids.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use herd_engine::sampler::{Sampler, SamplingParams};
use herd_kernels::rng::SplitMix64;

const VOCAB: usize = 262_144;

fn logits() -> Vec<f32> {
    let mut rng = SplitMix64::new(1);
    let mut ids: Vec<usize> = (0..VOCAB).collect();
    for i in (1..VOCAB).rev() {
        ids.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    let mut l = vec![0.0f32; VOCAB];
    for (rank, &id) in ids.iter().enumerate() {
        l[id] = 20.0 - 1.5 * ((rank + 1) as f32).ln() + 0.3 * rng.normal();
    }
    l
}

fn sampling(c: &mut Criterion) {
    let base = logits();
    let mut g = c.benchmark_group("sample_262144");
    let cases = [
        ("greedy", SamplingParams::default()),
        (
            "t1",
            SamplingParams {
                temperature: 1.0,
                ..Default::default()
            },
        ),
        (
            "t1_top_p_0.95",
            SamplingParams {
                temperature: 1.0,
                top_p: 0.95,
                ..Default::default()
            },
        ),
        (
            "t1_top_k_40",
            SamplingParams {
                temperature: 1.0,
                top_k: 40,
                ..Default::default()
            },
        ),
    ];
    for (name, params) in cases {
        let mut sampler = Sampler::new(params, &[]);
        let mut l = base.clone();
        g.bench_function(name, |b| {
            b.iter(|| {
                l.copy_from_slice(&base);
                black_box(sampler.sample(&mut l).token)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, sampling);
criterion_main!(benches);
