//! The pieces every decoder shares around its own layer math: validating a batch against the
//! cache, caching keys and values, scaled dot-product attention over cached keys, and picking
//! the rows that need logits.

use std::collections::HashMap;

use herd_kernels::attention::{self, Accum};

use crate::{Batch, Error, KvCache, Result, SeqId};

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
///
/// The arithmetic is llama.cpp's, in its orders (`herd_kernels::attention`): a sequence with one
/// row in the batch (decoding) scores keys as tinyBLAS does, one with several (a prompt) as
/// `ggml_vec_dot_f32` does, and cache position `p` plays the part of llama.cpp's cache cell `p`.
/// Rows are taken in blocks of consecutive positions of one sequence, so each cached key and
/// value is read once per block and head rather than once per row; every row is still computed
/// exactly as it would be alone.
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
    let blocks = row_blocks(batch);
    // (block, head) pairs are independent: split them over the pool.
    let pairs = blocks.len() * nh;
    let pool = herd_kernels::pool::global();
    let per_task = pairs.div_ceil(pool.n_threads() * 4).max(1);
    let shared = herd_kernels::pool::SharedMut::new(&mut out);
    pool.run(pairs.div_ceil(per_task), |task| {
        let mut scores: [Vec<f32>; MAX_BLOCK_ROWS] = Default::default();
        let mut sums: [Accum; MAX_BLOCK_ROWS] = Default::default();
        for pair in task * per_task..((task + 1) * per_task).min(pairs) {
            let (block, head) = (&blocks[pair / nh], pair % nh);
            let rows = block.rows.clone();
            let seq = batch.seq_ids[rows.start];
            // Row i of the block sees the cached positions span(i).
            let span = |i: usize| {
                let pos = batch.positions[rows.start + i];
                first_key(pos)..=pos
            };
            let n = rows.len();
            let lo = (0..n)
                .map(|i| *span(i).start())
                .min()
                .expect("blocks are not empty");
            let hi = (0..n)
                .map(|i| *span(i).end())
                .max()
                .expect("blocks are not empty");
            // Head h of cached position j within a run of positions.
            let key = |j: usize, h: usize| (j * nkv + h) * d..(j * nkv + h + 1) * d;
            let kvh = head / group;
            let qh = |i: usize| {
                let at = ((rows.start + i) * nh + head) * d;
                &q[at..at + d]
            };
            let score = if block.prompt {
                attention::dot_prompt
            } else {
                attention::dot_decode
            };
            scores[..n].iter_mut().for_each(Vec::clear);
            let mut p = lo;
            for (keys, _) in cache.runs(seq, layer, lo, hi) {
                for j in 0..keys.len() / (nkv * d) {
                    let kj = &keys[key(j, kvh)];
                    for (i, s) in scores[..n].iter_mut().enumerate() {
                        if span(i).contains(&p) {
                            s.push(score(qh(i), kj) * scale);
                        }
                    }
                    p += 1;
                }
            }
            for (i, s) in scores[..n].iter_mut().enumerate() {
                attention::softmax(s, *span(i).start());
            }
            sums[..n].iter_mut().for_each(|a| a.reset(d));
            let (mut p, mut next) = (lo, [0usize; MAX_BLOCK_ROWS]);
            for (_, values) in cache.runs(seq, layer, lo, hi) {
                for j in 0..values.len() / (nkv * d) {
                    let vj = &values[key(j, kvh)];
                    for i in 0..n {
                        if span(i).contains(&p) {
                            sums[i].add(p, scores[i][next[i]], vj);
                            next[i] += 1;
                        }
                    }
                    p += 1;
                }
            }
            for (i, sum) in sums[..n].iter().enumerate() {
                // SAFETY: each (row block, head) pair owns the d outputs of its rows and head.
                sum.finish(unsafe { shared.slice(((rows.start + i) * nh + head) * d, d) });
            }
        }
    });
    out
}

/// Rows per attention block (their scores and outputs stay in cache while keys stream by).
const MAX_BLOCK_ROWS: usize = 8;

/// Consecutive rows of the batch at consecutive positions of one sequence.
struct RowBlock {
    rows: std::ops::Range<usize>,
    /// The sequence has several rows in the batch (a prompt, scored in prompt order).
    prompt: bool,
}

/// The batch's rows as blocks of at most [`MAX_BLOCK_ROWS`], in row order.
fn row_blocks(batch: &Batch) -> Vec<RowBlock> {
    let mut rows_of: HashMap<SeqId, usize> = HashMap::new();
    for &seq in &batch.seq_ids {
        *rows_of.entry(seq).or_default() += 1;
    }
    let mut blocks: Vec<RowBlock> = Vec::new();
    for r in 0..batch.len() {
        match blocks.last_mut() {
            Some(b)
                if b.rows.len() < MAX_BLOCK_ROWS
                    && batch.seq_ids[r] == batch.seq_ids[r - 1]
                    && batch.positions[r] == batch.positions[r - 1] + 1 =>
            {
                b.rows.end = r + 1
            }
            _ => blocks.push(RowBlock {
                rows: r..r + 1,
                prompt: rows_of[&batch.seq_ids[r]] > 1,
            }),
        }
    }
    blocks
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
