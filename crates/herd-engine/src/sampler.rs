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

    /// Pick the next token from `logits` (modified in place by bias and penalties).
    ///
    /// Greedy is one pass (the argmax, lowest id on ties). Otherwise the token is drawn by
    /// inverse transform over the candidates ordered most likely first (ties: lowest id) with
    /// one uniform number, exactly as a full sort would, but only the head of that order that the
    /// truncation and the draw reach is ever sorted (see [`draw`]). A lone candidate draws no
    /// number, so a seed's stream does not depend on how often truncation leaves one token.
    pub fn sample(&mut self, logits: &mut [f32]) -> Sampled {
        self.adjust(logits);
        let token = if self.params.temperature <= 0.0 {
            argmax(logits).unwrap_or(0)
        } else {
            SCRATCH.with_borrow_mut(|scratch| draw(&self.params, logits, &mut self.rng, scratch))
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

/// The largest non-NaN value (−∞ if there is none). Eight running maxima, so the compiler
/// vectorises the pass.
fn max_value(logits: &[f32]) -> f32 {
    let mut m = [f32::NEG_INFINITY; 8];
    let chunks = logits.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for (mi, &v) in m.iter_mut().zip(c) {
            // NaN compares false and is skipped.
            *mi = if v > *mi { v } else { *mi };
        }
    }
    tail.iter()
        .chain(&m)
        .fold(f32::NEG_INFINITY, |a, &v| if v > a { v } else { a })
}

/// The index of the largest non-NaN value, lowest on ties (+0 ranks above −0, as in
/// `f32::total_cmp`).
fn argmax(logits: &[f32]) -> Option<u32> {
    let max = max_value(logits);
    let at = |want: fn(f32, f32) -> bool| logits.iter().position(|&v| want(v, max));
    at(|v, m| v == m && (m != 0.0 || v.is_sign_positive()))
        .or_else(|| at(|v, m| v == m))
        .map(|i| i as u32)
}

/// Buffers a draw reuses, one set per engine thread (a sampler per sequence would hold a
/// vocabulary-sized buffer each).
#[derive(Default)]
struct Scratch {
    /// Relative probability of every vocabulary entry (the most likely is 1).
    weights: Vec<f32>,
    /// Candidates as [`rank_key`]s; a sorted prefix is the most-likely-first order.
    keys: Vec<u64>,
    /// Ids of the first round's candidates.
    ids: Vec<u32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// A candidate as one integer whose ascending order is the sampling order: larger logit first,
/// lower id on ties (`f32::total_cmp` reversed in the high half, the id in the low half).
fn rank_key(logit: f32, id: u32) -> u64 {
    let b = logit.to_bits();
    let ascending = if b >> 31 == 1 { !b } else { b | 0x8000_0000 };
    (u64::from(!ascending) << 32) | u64::from(id)
}

fn key_id(key: u64) -> u32 {
    key as u32
}

/// Candidates at least this likely relative to the best are collected first; the rest only if
/// the truncation or the draw reaches past them (on Gemma 3 270M over text they held all but
/// 0.08% of the mass on average, 0.35% at most).
const FIRST_ROUND: f32 = 1e-6;

/// Candidates sorted first; then four times as many, and so on, only while needed (top-p 0.95
/// on Gemma 3 270M over text: a median of 95 tokens, 701 at the 90th percentile).
const HEAD: usize = 256;

/// Top-k with at most this many candidates keeps them in a sorted buffer during one pass;
/// larger k selects over all candidates.
const INSERTION_TOP_K: usize = 256;

/// Sample at `params.temperature > 0` with top-k, top-p and min-p.
///
/// The distribution is the softmax of `logits / temperature` over the top-k (else all)
/// entries that are neither NaN nor −∞, ordered most likely first (lowest id on ties); top-p
/// keeps the shortest prefix of that order whose mass reaches `top_p`, min-p the entries at
/// least `min_p` times as likely as the first; the draw walks the kept prefix subtracting each
/// renormalised probability from one uniform `u` until `u` falls inside one, as a full sort
/// would. Only the head of the order that the truncation and the draw reach is sorted. The
/// probabilities are f32 exponentials summed in f64 ([`herd_kernels::attention::exp_weights`]),
/// not f64 exponentials: the token is the one an f64 softmax would pick unless `u` lies within
/// about 1e-7 of a boundary between two candidates.
fn draw(
    params: &SamplingParams,
    logits: &[f32],
    rng: &mut SplitMix64,
    scratch: &mut Scratch,
) -> u32 {
    let Scratch { weights, keys, ids } = scratch;
    let scale = 1.0 / params.temperature;
    let live = |l: f32| l > f32::NEG_INFINITY; // false for NaN too
    let max = max_value(logits);
    // A temperature so small that 1/T overflows, or a +∞ logit, leaves no finite softmax: the
    // most likely token wins outright (no number drawn).
    if !scale.is_finite() || max == f32::INFINITY {
        return argmax(logits).unwrap_or(0);
    }
    let mut u = None;
    weights.resize(logits.len(), 0.0);
    if params.top_k > 0 && top_k_into(logits, params.top_k, keys) {
        // The k best are the only candidates: weigh just them.
        keys.retain(|&k| live(logits[key_id(k) as usize]));
        let Some(&first) = keys.first() else {
            // No candidate: token 0, after the one number a draw takes.
            rng.next_f64();
            return 0;
        };
        let max = logits[key_id(first) as usize];
        let mut total = 0.0f64;
        for &k in keys.iter() {
            let i = key_id(k) as usize;
            let w = herd_kernels::attention::expf_ggml((logits[i] - max) * scale);
            weights[i] = w;
            total += f64::from(w);
        }
        return match walk(params, keys, weights, total, 0.0, true, rng, &mut u) {
            Walk::Token(t) => t,
            // A complete order always ends the walk.
            Walk::NeedMore => key_id(first),
        };
    }
    if !live(max) {
        rng.next_f64();
        return 0;
    }
    let above = &mut *ids;
    above.clear();
    let total =
        herd_kernels::attention::exp_weights(logits, max, scale, weights, FIRST_ROUND, above);
    // Round 1: the candidates at least FIRST_ROUND as likely as the best (on real text all but
    // a fraction of a percent of the mass); round 2, when the cut or the draw reaches past
    // them: every live candidate.
    for (theta, complete) in [(FIRST_ROUND, false), (0.0, true)] {
        keys.clear();
        if complete {
            keys.extend(
                (0..logits.len())
                    .filter(|&i| live(logits[i]))
                    .map(|i| rank_key(logits[i], i as u32)),
            );
        } else {
            // Found while weighing (a weight of at least theta > 0 is a live entry's).
            keys.extend(ids.iter().map(|&i| rank_key(logits[i as usize], i)));
        }
        // A lone candidate that is the only live entry is the token, and draws no number.
        let complete =
            complete || (keys.len() == 1 && logits.iter().filter(|&&l| live(l)).count() == 1);
        // Sort a growing head (256, 1024, …): most draws end inside the first.
        let (mut sorted, mut head) = (0, HEAD.min(keys.len()));
        while head < keys.len() {
            keys[sorted..].select_nth_unstable(head - sorted - 1);
            keys[sorted..head].sort_unstable();
            // Every candidate past the head is at most as likely as its last entry.
            let below = weights[key_id(keys[head - 1]) as usize];
            if let Walk::Token(t) = walk(
                params,
                &keys[..head],
                weights,
                total,
                below,
                false,
                rng,
                &mut u,
            ) {
                return t;
            }
            (sorted, head) = (head, (4 * head).min(keys.len()));
        }
        keys[sorted..].sort_unstable();
        if let Walk::Token(t) = walk(params, keys, weights, total, theta, complete, rng, &mut u) {
            return t;
        }
    }
    // The last round holds every candidate, so its walk has ended.
    argmax(logits).unwrap_or(0)
}

enum Walk {
    Token(u32),
    /// The truncation or the draw reaches past the candidates of this round.
    NeedMore,
}

/// One round of [`draw`]: `order` holds (sorted) every candidate more likely than `theta` —
/// all of them when `complete`. `u` is drawn on first need and kept across rounds.
#[allow(clippy::too_many_arguments)]
fn walk(
    params: &SamplingParams,
    order: &[u64],
    weights: &[f32],
    total: f64,
    theta: f32,
    complete: bool,
    rng: &mut SplitMix64,
    u: &mut Option<f64>,
) -> Walk {
    let Some(&best) = order.first() else {
        return Walk::NeedMore;
    };
    let q = |r: usize| f64::from(weights[key_id(order[r]) as usize]) / total;
    // How many candidates the truncation keeps, when this round can tell (a cut that lies
    // past `order` does not bind before one inside it).
    let mut keep = complete.then_some(order.len());
    if params.top_p < 1.0 {
        let mut acc = 0.0;
        for r in 0..order.len() {
            acc += q(r);
            if acc >= f64::from(params.top_p) {
                keep = Some(keep.map_or(r + 1, |k| k.min(r + 1)));
                break;
            }
        }
    }
    let first = weights[key_id(best) as usize];
    if params.min_p > 0.0 && (complete || theta < first * params.min_p) {
        let floor = q(0) * f64::from(params.min_p);
        let k = (0..order.len())
            .take_while(|&r| q(r) >= floor)
            .count()
            .max(1);
        keep = Some(keep.map_or(k, |kk| kk.min(k)));
    }
    let (n, kept) = match keep {
        Some(1) => return Walk::Token(key_id(best)),
        Some(k) => (k, (0..k).map(q).sum::<f64>()),
        // A truncation whose cut lies past this round: a later round finds it (before drawing,
        // so that a lone survivor still draws no number).
        None if params.top_p < 1.0 || params.min_p > 0.0 => return Walk::NeedMore,
        // Nothing truncates: every candidate is kept, and the kept mass is the whole.
        None => (order.len(), 1.0),
    };
    let mut left = *u.get_or_insert_with(|| rng.next_f64());
    for (r, &key) in order[..n].iter().enumerate() {
        let p = q(r) / kept;
        if left < p {
            return Walk::Token(key_id(key));
        }
        left -= p;
    }
    if keep.is_some() {
        // Rounding left `u` past the last kept candidate.
        Walk::Token(key_id(order[n - 1]))
    } else {
        Walk::NeedMore
    }
}

/// The `k` non-NaN entries ranked first (largest logit, lowest id on ties), as sorted
/// [`rank_key`]s in `keys`; false (and `keys` unspecified) when there are no more than `k`.
fn top_k_into(logits: &[f32], k: usize, keys: &mut Vec<u64>) -> bool {
    keys.clear();
    if k <= INSERTION_TOP_K {
        // The k-th key so far; an entry must beat it to enter (most fail one float compare).
        let mut floor = f32::NEG_INFINITY;
        let mut n_valid = 0usize;
        for (i, &l) in logits.iter().enumerate() {
            if l.is_nan() {
                continue;
            }
            n_valid += 1;
            if keys.len() == k && l < floor {
                continue;
            }
            let key = rank_key(l, i as u32);
            if keys.len() == k {
                if key > keys[k - 1] {
                    continue;
                }
                keys.pop();
            }
            let at = keys.partition_point(|&x| x < key);
            keys.insert(at, key);
            if keys.len() == k {
                floor = logits[key_id(keys[k - 1]) as usize];
            }
        }
        n_valid > k
    } else {
        keys.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_nan())
                .map(|(i, &l)| rank_key(l, i as u32)),
        );
        if keys.len() <= k {
            return false;
        }
        keys.select_nth_unstable(k - 1);
        keys.truncate(k);
        keys.sort_unstable();
        true
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

    /// The sampler before partial selection, kept as the reference: every candidate sorted,
    /// f64 softmax, then the same truncation and inverse-transform draw.
    fn reference_candidates(p: &SamplingParams, logits: &[f32]) -> Vec<(u32, f64)> {
        let better = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let mut order: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| !logits[i as usize].is_nan())
            .collect();
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

    fn reference_draw(p: &SamplingParams, logits: &[f32], rng: &mut SplitMix64) -> u32 {
        let cands = reference_candidates(p, logits);
        if cands.len() == 1 {
            return cands[0].0;
        }
        let mut u = rng.next_f64();
        for &(tok, q) in &cands {
            if u < q {
                return tok;
            }
            u -= q;
        }
        cands.last().map_or(0, |c| c.0)
    }

    fn random_params(rng: &mut SplitMix64, case: u64) -> SamplingParams {
        SamplingParams {
            temperature: [0.3, 0.7, 1.0, 1.5][(rng.next_u64() % 4) as usize],
            top_k: [0, 0, 1, 5, 40, 300][(rng.next_u64() % 6) as usize],
            top_p: [1.0, 1.0, 0.95, 0.9, 0.5, 0.05][(rng.next_u64() % 6) as usize],
            min_p: [0.0, 0.0, 0.05, 0.3][(rng.next_u64() % 4) as usize],
            seed: case,
            ..Default::default()
        }
    }

    /// Language-model-like logits: a long flat tail and a few strong candidates, with the odd
    /// NaN and −∞ (masked tokens) and exact ties.
    fn lm_logits(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
        let mut l: Vec<f32> = (0..n)
            .map(|_| (rng.next_f64() * 8.0 - 4.0) as f32)
            .collect();
        for _ in 0..1 + rng.next_u64() % 12 {
            let i = (rng.next_u64() % n as u64) as usize;
            l[i] = 6.0 + (rng.next_f64() * 10.0) as f32;
        }
        if rng.next_u64().is_multiple_of(3) {
            let i = (rng.next_u64() % n as u64) as usize;
            l[i] = f32::NEG_INFINITY;
            let j = (rng.next_u64() % n as u64) as usize;
            l[j] = f32::NAN;
            let (a, b) = (
                (rng.next_u64() % n as u64) as usize,
                (rng.next_u64() % n as u64) as usize,
            );
            l[a] = l[b];
        }
        l
    }

    /// The partial selection draws the same tokens as the full sort, seed for seed, over
    /// random settings and vocabularies from 2 entries to Gemma 3's 262,144 (ragged sizes).
    #[test]
    fn partial_selection_draws_what_a_full_sort_draws() {
        let mut rng = SplitMix64::new(11);
        let mut scratch = Scratch::default();
        let mut compared = 0;
        for case in 0..200u64 {
            let n = match case % 4 {
                0 => 2 + (rng.next_u64() % 30) as usize,
                1 => 1000 + (rng.next_u64() % 1000) as usize,
                2 => 30_000 + (rng.next_u64() % 7) as usize,
                _ if case % 20 == 3 => 262_144,
                _ => 5_000,
            };
            let mut logits = lm_logits(&mut rng, n);
            if case % 5 == 0 {
                // A grammar mask: one to three tokens left (or none).
                let keep: Vec<usize> = (0..case % 4)
                    .map(|_| (rng.next_u64() % n as u64) as usize)
                    .collect();
                for (i, l) in logits.iter_mut().enumerate() {
                    if !keep.contains(&i) {
                        *l = f32::NEG_INFINITY;
                    }
                }
            }
            let params = random_params(&mut rng, case);
            let (mut a, mut b) = (SplitMix64::new(case), SplitMix64::new(case));
            for draw_no in 0..8 {
                let want = reference_draw(&params, &logits, &mut a);
                let got = draw(&params, &logits, &mut b, &mut scratch);
                assert_eq!(got, want, "case {case} draw {draw_no}: {params:?}, n {n}");
                compared += 1;
            }
            // Both consumed the same random numbers.
            assert_eq!(
                a.next_u64(),
                b.next_u64(),
                "case {case}: the streams diverged"
            );
        }
        assert_eq!(compared, 1600);
    }

    /// Frequencies of drawn tokens match the reference probabilities within five standard
    /// errors, with truncation and without.
    #[test]
    fn draws_follow_the_distribution() {
        let mut rng = SplitMix64::new(5);
        let logits = lm_logits(&mut rng, 2_000);
        for params in [
            SamplingParams {
                temperature: 1.0,
                ..Default::default()
            },
            SamplingParams {
                temperature: 0.8,
                top_p: 0.9,
                min_p: 0.01,
                ..Default::default()
            },
        ] {
            let probs = reference_candidates(&params, &logits);
            let mut counts = HashMap::<u32, usize>::new();
            let trials = 40_000;
            let mut g = SplitMix64::new(99);
            let mut scratch = Scratch::default();
            for _ in 0..trials {
                *counts
                    .entry(draw(&params, &logits, &mut g, &mut scratch))
                    .or_default() += 1;
            }
            let allowed: std::collections::HashSet<u32> = probs.iter().map(|c| c.0).collect();
            assert!(counts.keys().all(|t| allowed.contains(t)));
            for &(tok, p) in probs.iter().take(20) {
                let f = counts.get(&tok).copied().unwrap_or(0) as f64 / trials as f64;
                let se = (p * (1.0 - p) / trials as f64).sqrt();
                assert!(
                    (f - p).abs() <= 5.0 * se + 1e-9,
                    "{params:?}: token {tok} drawn {f}, probability {p}"
                );
            }
        }
    }

    /// Degenerate inputs never panic: a temperature whose inverse overflows and a +∞ logit
    /// pick the best token; all-masked rows give token 0.
    #[test]
    fn degenerate_rows_draw_safely() {
        let mut scratch = Scratch::default();
        let mut rng = SplitMix64::new(1);
        let p = |temperature: f32, top_p: f32| SamplingParams {
            temperature,
            top_p,
            ..Default::default()
        };
        let l = [0.5f32, 3.0, f32::NAN, 3.0, -1.0];
        assert_eq!(draw(&p(1e-40, 1.0), &l, &mut rng, &mut scratch), 1);
        let inf = [0.5f32, f32::INFINITY, 2.0];
        assert_eq!(draw(&p(1.0, 0.9), &inf, &mut rng, &mut scratch), 1);
        let dead = [f32::NEG_INFINITY, f32::NAN];
        assert_eq!(draw(&p(1.0, 1.0), &dead, &mut rng, &mut scratch), 0);
        assert_eq!(argmax(&[-0.0, 0.0, -1.0]), Some(1));
    }

    #[test]
    fn top_k_selection_is_the_sorted_head() {
        let mut rng = SplitMix64::new(3);
        let mut keys = Vec::new();
        for k in [1, 2, 7, 256, 257, 900, 1200] {
            let mut l = lm_logits(&mut rng, 1_000);
            l[10] = l[11]; // a tie, broken by id
            let mut all: Vec<u32> = (0..l.len() as u32)
                .filter(|&i| !l[i as usize].is_nan())
                .collect();
            all.sort_by(|&a, &b| l[b as usize].total_cmp(&l[a as usize]).then(a.cmp(&b)));
            let more = top_k_into(&l, k, &mut keys);
            assert_eq!(more, all.len() > k, "k {k}");
            if more {
                all.truncate(k);
                assert_eq!(
                    keys.iter().map(|&x| key_id(x)).collect::<Vec<_>>(),
                    all,
                    "k {k}"
                );
            }
        }
        // Keys order as total_cmp, reversed, then by id.
        let v = [1.5f32, -0.0, 0.0, f32::NEG_INFINITY, -3.0, 1.5];
        let mut ids: Vec<u32> = (0..v.len() as u32).collect();
        ids.sort_by_key(|&i| rank_key(v[i as usize], i));
        assert_eq!(ids, [0, 5, 2, 1, 4, 3]);
        assert_eq!(argmax(&[f32::NAN, 2.0, 7.0, 7.0, -1.0]), Some(2));
        assert_eq!(argmax(&[f32::NAN]), None);
    }

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
