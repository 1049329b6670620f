//! Choosing the next token from logits: logit bias, penalties, temperature, top-k, top-p,
//! min-p, a seeded generator (same seed, same output), and log-probabilities with alternatives.

use herd_kernels::rng::SplitMix64;
use std::collections::HashMap;

/// Sampling settings, with OpenAI's and llama.cpp's usual meanings.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1 disables.
    pub top_p: f32,
    /// 0 disables: drop tokens below `min_p` × the top token's probability.
    pub min_p: f32,
    /// CTRL-style, over prompt and output: positive logits divided by it, negative multiplied.
    /// 1 disables.
    pub repetition_penalty: f32,
    /// OpenAI: subtracted once from every token that already occurred in the output.
    pub presence_penalty: f32,
    /// OpenAI: subtracted per occurrence in the output.
    pub frequency_penalty: f32,
    /// Added to the logits of the given tokens (OpenAI `logit_bias`, −100…100).
    pub logit_bias: HashMap<u32, f32>,
    pub seed: u64,
    /// Compute each sampled token's log-probability (a log-softmax over the vocabulary per
    /// token; implied by `top_logprobs > 0`).
    pub logprobs: bool,
    /// Return this many most likely alternatives with each token's log-probability.
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: HashMap::new(),
            seed: 0,
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

/// One sampled token.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of the token under the penalised, biased distribution at temperature 1
    /// (NaN unless the parameters ask for log-probabilities).
    pub logprob: f32,
    /// The most likely alternatives under the same distribution.
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    /// Occurrences of each token in the output so far (presence/frequency penalties).
    counts: HashMap<u32, u32>,
    /// Tokens of prompt and output (repetition penalty).
    seen: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let rng = SplitMix64::new(params.seed);
        Self {
            params,
            rng,
            counts: HashMap::new(),
            seen: prompt.iter().copied().collect(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Bias and penalties, in place (the distribution logprobs are reported under).
    pub fn adjust(&self, logits: &mut [f32]) {
        let p = &self.params;
        for (&tok, &b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(tok as usize) {
                *l += b;
            }
        }
        if p.repetition_penalty != 1.0 {
            for &tok in &self.seen {
                if let Some(l) = logits.get_mut(tok as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        for (&tok, &n) in &self.counts {
            if let Some(l) = logits.get_mut(tok as usize) {
                *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
            }
        }
    }

    /// The candidates sampling may pick from after temperature, top-k, top-p and min-p, with
    /// their probabilities (normalised), most likely first. Greedy gives the argmax alone.
    pub fn candidates(&self, logits: &[f32]) -> Vec<(u32, f64)> {
        let p = &self.params;
        let better = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        if p.temperature <= 0.0 {
            // Greedy: the argmax (lowest id on ties), one pass, no copy of the vocabulary.
            let mut best: Option<u32> = None;
            for (i, &l) in logits.iter().enumerate() {
                if !l.is_nan() && best.is_none_or(|b| logits[b as usize].total_cmp(&l).is_lt()) {
                    best = Some(i as u32);
                }
            }
            return best.map(|b| vec![(b, 1.0)]).unwrap_or_default();
        }
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
            .collect();
        if order.is_empty() {
            return Vec::new();
        }
        if p.top_k > 0 && p.top_k < order.len() {
            order.select_nth_unstable_by(p.top_k - 1, better);
            order.truncate(p.top_k);
        }
        order.sort_by(better);
        order.retain(|&i| logits[i as usize] > f32::NEG_INFINITY);
        if order.is_empty() {
            return Vec::new();
        }
        let t = f64::from(p.temperature);
        let max = f64::from(logits[order[0] as usize]);
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((f64::from(logits[i as usize]) - max) / t).exp())
            .collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= sum);
        let mut keep = order.len();
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, q) in probs.iter().enumerate() {
                acc += q;
                if acc >= f64::from(p.top_p) {
                    keep = keep.min(i + 1);
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * f64::from(p.min_p);
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let kept: f64 = probs[..keep].iter().sum();
        order[..keep]
            .iter()
            .zip(&probs[..keep])
            .map(|(&i, &q)| (i, q / kept))
            .collect()
    }

    /// Pick the next token from `logits` (modified in place by bias and penalties).
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        self.adjust(logits);
        let cands = self.candidates(logits);
        let token = if cands.len() == 1 {
            cands[0].0
        } else {
            let mut u = self.rng.next_f64();
            let mut pick = cands.last().map_or(0, |c| c.0);
            for &(tok, q) in &cands {
                if u < q {
                    pick = tok;
                    break;
                }
                u -= q;
            }
            pick
        };
        let (logprob, top) = if self.params.logprobs || self.params.top_logprobs > 0 {
            log_probs(logits, token, self.params.top_logprobs)
        } else {
            (f32::NAN, Vec::new())
        };
        *self.counts.entry(token).or_default() += 1;
        self.seen.insert(token);
        Sampled {
            token,
            logprob,
            top,
        }
    }
}

/// log-softmax of `token` and the `n` most likely tokens.
fn log_probs(logits: &[f32], token: u32, n: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max as f64
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln();
    let lp = |i: u32| (logits[i as usize] as f64 - lse) as f32;
    let mut top = Vec::new();
    if n > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let n = n.min(idx.len());
        idx.select_nth_unstable_by(n - 1, |&a, &b| {
            logits[b as usize].total_cmp(&logits[a as usize])
        });
        idx.truncate(n);
        idx.sort_by(|&a, &b| {
            logits[b as usize]
                .total_cmp(&logits[a as usize])
                .then(a.cmp(&b))
        });
        top = idx.into_iter().map(|i| (i, lp(i))).collect();
    }
    (lp(token), top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_logits(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| (rng.next_f64() * 20.0 - 10.0) as f32)
            .collect()
    }

    #[test]
    fn greedy_is_argmax_and_seeds_reproduce() {
        let mut rng = SplitMix64::new(7);
        let logits = random_logits(&mut rng, 100);
        let argmax = logits
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0 as u32;
        let mut s = Sampler::new(SamplingParams::default(), &[]);
        assert_eq!(s.sample(&mut logits.clone()).token, argmax);
        let params = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone(), &[]);
            (0..50)
                .map(|_| s.sample(&mut logits.clone()).token)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&params), run(&params), "same seed, same tokens");
        assert_ne!(
            run(&params),
            run(&SamplingParams {
                seed: 43,
                ..params.clone()
            }),
            "another seed differs"
        );
    }

    /// Property: whatever the logits, a sampled token is inside the set that top-k, top-p and
    /// min-p allow, computed here independently.
    #[test]
    fn truncation_never_escapes_the_allowed_set() {
        let mut rng = SplitMix64::new(1);
        for case in 0..300 {
            let n = 2 + (rng.next_u64() % 60) as usize;
            let logits = random_logits(&mut rng, n);
            let top_k = (rng.next_u64() % 8) as usize;
            let top_p = [1.0, 0.9, 0.5, 0.1][(rng.next_u64() % 4) as usize];
            let min_p = [0.0, 0.05, 0.3][(rng.next_u64() % 3) as usize];
            let temperature = [0.5, 1.0, 1.7][(rng.next_u64() % 3) as usize];
            let params = SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                seed: case,
                ..Default::default()
            };
            // The allowed set, by definition.
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
            if top_k > 0 {
                order.truncate(top_k);
            }
            let w: Vec<f64> = order
                .iter()
                .map(|&i| ((logits[i] - logits[order[0]]) as f64 / temperature as f64).exp())
                .collect();
            let total: f64 = w.iter().sum();
            let mut allowed = Vec::new();
            let mut acc = 0.0;
            for (k, &i) in order.iter().enumerate() {
                let q = w[k] / total;
                if q < (w[0] / total) * min_p as f64 && k > 0 {
                    break;
                }
                allowed.push(i as u32);
                acc += q;
                if acc >= top_p as f64 {
                    break;
                }
            }
            let mut s = Sampler::new(params, &[]);
            for _ in 0..20 {
                let t = s.sample(&mut logits.clone()).token;
                assert!(
                    allowed.contains(&t),
                    "case {case}: token {t} outside {allowed:?}"
                );
            }
        }
    }

    #[test]
    fn penalties_follow_their_definitions() {
        let logits = vec![2.0, -2.0, 1.0, 0.5];
        let params = SamplingParams {
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            ..Default::default()
        };
        let mut s = Sampler::new(params, &[]);
        s.counts.insert(2, 3);
        let mut l = logits.clone();
        s.adjust(&mut l);
        // OpenAI: mu[j] - c[j]·frequency - (c[j] > 0)·presence.
        assert_eq!(l, vec![2.0, -2.0, 1.0 - 3.0 * 0.25 - 0.5, 0.5]);
        let rep = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..Default::default()
            },
            &[0, 1],
        );
        let mut l = logits.clone();
        rep.adjust(&mut l);
        assert_eq!(l, vec![1.0, -4.0, 1.0, 0.5]);
        let bias = Sampler::new(
            SamplingParams {
                logit_bias: [(3, 10.0)].into(),
                ..Default::default()
            },
            &[],
        );
        let mut l = logits.clone();
        bias.adjust(&mut l);
        assert_eq!(l[3], 10.5);
    }

    #[test]
    fn logprobs_are_a_log_softmax() {
        let mut s = Sampler::new(
            SamplingParams {
                top_logprobs: 2,
                ..Default::default()
            },
            &[],
        );
        let got = s.sample(&mut [0.0f32, (2.0f32).ln(), f32::NEG_INFINITY]);
        assert_eq!(got.token, 1);
        assert!((got.logprob - (2.0f32 / 3.0).ln()).abs() < 1e-6);
        assert_eq!(got.top[0].0, 1);
        assert!((got.top[1].1 - (1.0f32 / 3.0).ln()).abs() < 1e-6);
    }
}
