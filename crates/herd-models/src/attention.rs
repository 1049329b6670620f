//! The pieces every decoder shares around its own layer math: validating a batch against the
//! cache, caching keys and values, scaled dot-product attention over cached keys, and picking
//! the rows that need logits.

use std::cell::RefCell;
use std::ops::Range;

use herd_kernels::attention::{self, Accum};

use crate::{Batch, Error, KvCache, Result};

/// Head counts and size of one attention layer, and the factor applied to its scores.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Heads {
    pub q: usize,
    pub kv: usize,
    pub dim: usize,
    pub scale: f32,
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
/// Writes `[T, q·dim]` to `out`.
///
/// The arithmetic is `herd_kernels::attention`'s, in one order for every row whatever the
/// batch.
/// Rows are taken in blocks of consecutive positions of one sequence, so each cached key and
/// value is read once per block and head rather than once per row; every row is still computed
/// exactly as it would be alone.
pub(crate) fn attend(
    q: &[f32],
    batch: &Batch,
    cache: &KvCache,
    layer: usize,
    heads: Heads,
    first_key: impl Fn(usize) -> usize + Sync,
    out: &mut Vec<f32>,
) {
    out.clear();
    out.resize(batch.len() * heads.q * heads.dim, 0.0);
    BLOCKS.with_borrow_mut(|blocks| {
        row_blocks(batch, blocks);
        attend_blocks(q, batch, cache, layer, heads, &first_key, blocks, out)
    });
}

thread_local! {
    /// The row blocks of the current call (kept for the next one: decoding allocates nothing).
    static BLOCKS: RefCell<Vec<Range<usize>>> = const { RefCell::new(Vec::new()) };
    /// One pool task's scores and output sums, per row of a block (kept likewise).
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    scores: [Vec<f32>; MAX_BLOCK_ROWS],
    sums: [Accum; MAX_BLOCK_ROWS],
}

#[allow(clippy::too_many_arguments)]
fn attend_blocks(
    q: &[f32],
    batch: &Batch,
    cache: &KvCache,
    layer: usize,
    heads: Heads,
    first_key: &(impl Fn(usize) -> usize + Sync),
    blocks: &[Range<usize>],
    out: &mut [f32],
) {
    let (nh, nkv, d, scale) = (heads.q, heads.kv, heads.dim, heads.scale);
    let group = nh / nkv;
    // (block, head) pairs are independent: split them over the pool.
    let pairs = blocks.len() * nh;
    let pool = herd_kernels::pool::global();
    let per_task = pairs.div_ceil(pool.n_threads() * 4).max(1);
    let shared = herd_kernels::pool::SharedMut::new(out);
    pool.run(pairs.div_ceil(per_task), |task| {
        SCRATCH.with_borrow_mut(|Scratch { scores, sums }| {
            for pair in task * per_task..((task + 1) * per_task).min(pairs) {
                let (rows, head) = (blocks[pair / nh].clone(), pair % nh);
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
                scores[..n].iter_mut().for_each(Vec::clear);
                let mut p = lo;
                for (keys, _) in cache.runs(seq, layer, lo, hi) {
                    for j in 0..keys.len() / (nkv * d) {
                        let kj = &keys[key(j, kvh)];
                        for (i, s) in scores[..n].iter_mut().enumerate() {
                            if span(i).contains(&p) {
                                s.push(attention::dot_f32(qh(i), kj) * scale);
                            }
                        }
                        p += 1;
                    }
                }
                for (i, s) in scores[..n].iter_mut().enumerate() {
                    attention::softmax(s, *span(i).start());
                }
                for sum in &mut sums[..n] {
                    sum.reset(d);
                }
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
        })
    });
}

/// Rows per attention block (their scores and outputs stay in cache while keys stream by).
const MAX_BLOCK_ROWS: usize = 8;

/// The batch's rows as blocks of consecutive positions of one sequence, at most
/// [`MAX_BLOCK_ROWS`] each, in row order, into `blocks`.
fn row_blocks(batch: &Batch, blocks: &mut Vec<Range<usize>>) {
    blocks.clear();
    for r in 0..batch.len() {
        match blocks.last_mut() {
            Some(b)
                if b.len() < MAX_BLOCK_ROWS
                    && batch.seq_ids[r] == batch.seq_ids[r - 1]
                    && batch.positions[r] == batch.positions[r - 1] + 1 =>
            {
                b.end = r + 1
            }
            _ => blocks.push(r..r + 1),
        }
    }
}

/// The rows of `hidden` (`[T, h]`) whose logits the batch asks for, concatenated into `out`.
pub(crate) fn logit_rows(hidden: &[f32], batch: &Batch, h: usize, out: &mut Vec<f32>) {
    out.clear();
    for (row, _) in hidden
        .chunks_exact(h)
        .zip(&batch.logits)
        .filter(|(_, want)| **want)
    {
        out.extend_from_slice(row);
    }
}
