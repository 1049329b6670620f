//! The pieces every decoder shares around its own layer math: validating a batch against the
//! cache, caching keys and values, scaled dot-product attention over cached keys, and picking
//! the rows that need logits.

use herd_kernels::matmul::{axpy, dot};
use herd_kernels::ops::softmax;

use crate::{Batch, Error, KvCache, Result};

/// Head counts and size of one attention layer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub q: usize,
    pub kv: usize,
    pub dim: usize,
}

/// Check that the batch uses only token ids of the vocabulary and continues each sequence's
/// cache, and reserve its positions there. Nothing changes on error.
pub(crate) fn begin_step(batch: &Batch, cache: &mut KvCache, vocab: usize) -> Result<()> {
    if let Some(&bad) = batch.tokens.iter().find(|&&tok| tok as usize >= vocab) {
        return Err(Error::Batch(format!(
            "token id {bad} is outside the vocabulary ({vocab})"
        )));
    }
    cache.reserve(batch)
}

/// Store each row's key and value (`[T, kv·dim]` each) at its position in the cache for `layer`.
pub(crate) fn cache_rows(
    k: &[f32],
    v: &[f32],
    batch: &Batch,
    cache: &mut KvCache,
    layer: usize,
    kv_dim: usize,
) {
    for (row, (&seq, &pos)) in batch.seq_ids.iter().zip(&batch.positions).enumerate() {
        let r = row * kv_dim..(row + 1) * kv_dim;
        cache.write(seq, layer, pos, &k[r.clone()], &v[r]);
    }
}

/// `softmax(q·kᵀ·scale)·v` for every row and query head, over the cached positions
/// `first_key(pos)..=pos` of the row's sequence. Consecutive query heads share a kv head (GQA).
/// Returns `[T, q·dim]`.
pub(crate) fn attend(
    q: &[f32],
    batch: &Batch,
    cache: &KvCache,
    layer: usize,
    heads: Heads,
    scale: f32,
    first_key: impl Fn(usize) -> usize + Sync,
) -> Vec<f32> {
    let (nh, nkv, d) = (heads.q, heads.kv, heads.dim);
    let group = nh / nkv;
    let mut out = vec![0.0f32; batch.len() * nh * d];
    // (row, head) pairs are independent: split them over the pool, each computed exactly as it
    // would be alone.
    let pairs = batch.len() * nh;
    let pool = herd_kernels::pool::global();
    let per_task = pairs.div_ceil(pool.n_threads() * 4).max(1);
    let shared = herd_kernels::pool::SharedMut::new(&mut out);
    pool.run(pairs.div_ceil(per_task), |task| {
        let mut scores = Vec::new();
        for pair in task * per_task..((task + 1) * per_task).min(pairs) {
            let (row, head) = (pair / nh, pair % nh);
            let (seq, pos) = (batch.seq_ids[row], batch.positions[row]);
            let start = first_key(pos);
            // Head h of cached position j within a run of positions.
            let key = |j: usize, h: usize| (j * nkv + h) * d..(j * nkv + h + 1) * d;
            let runs = || cache.runs(seq, layer, start, pos);
            let kvh = head / group;
            let qh = &q[pair * d..(pair + 1) * d];
            scores.clear();
            for (keys, _) in runs() {
                let n = keys.len() / (nkv * d);
                scores.extend((0..n).map(|j| dot(qh, &keys[key(j, kvh)]) * scale));
            }
            softmax(&mut scores);
            // SAFETY: each (row, head) pair owns its d outputs.
            let oh = unsafe { shared.slice(pair * d, d) };
            let mut p = scores.iter();
            for (_, values) in runs() {
                for j in 0..values.len() / (nkv * d) {
                    axpy(
                        *p.next().expect("one score per key"),
                        &values[key(j, kvh)],
                        oh,
                    );
                }
            }
        }
    });
    out
}

/// The rows of `hidden` (`[T, h]`) whose logits the batch asks for, concatenated.
pub(crate) fn logit_rows(hidden: &[f32], batch: &Batch, h: usize) -> Vec<f32> {
    hidden
        .chunks_exact(h)
        .zip(&batch.logits)
        .filter(|(_, want)| **want)
        .flat_map(|(row, _)| row.iter().copied())
        .collect()
}
