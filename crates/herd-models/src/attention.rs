//! The pieces every decoder shares around its own layer math: validating a batch against the
//! cache, caching keys and values, scaled dot-product attention over cached keys, and picking
//! the rows that need logits.

use std::cell::RefCell;
use std::ops::Range;

use herd_kernels::attention::{self, OnlineSoftmax};

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
/// The arithmetic is `herd_kernels::attention`'s online softmax, fed tiles of [`TILE`]
/// positions in order, read in the cache's element type: one order for every row whatever the
/// batch, the cache's block size or whether a prefix came from the cache.
/// Rows are taken in blocks of consecutive positions of one sequence, and the query heads of a
/// kv head together, so each tile of cached keys and values is read once per block and kv head
/// while it is in cache rather than once per row and head; every row is still computed exactly
/// as it would be alone.
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
    if batch.is_empty() {
        return;
    }
    BLOCKS.with_borrow_mut(|blocks| {
        row_blocks(batch, blocks);
        attend_blocks(q, batch, cache, layer, heads, &first_key, blocks, out)
    });
}

thread_local! {
    /// The row blocks of the current call (kept for the next one: decoding allocates nothing).
    static BLOCKS: RefCell<Vec<Range<usize>>> = const { RefCell::new(Vec::new()) };
    /// One pool task's running softmax states and tile scores (kept likewise).
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

#[derive(Default)]
struct Scratch {
    /// Per row of the block: the running softmax of its query heads that share the kv head.
    states: Vec<OnlineSoftmax>,
    /// One row's scores of a tile, `[heads, positions]`.
    scores: Vec<f32>,
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
    let (nh, d, scale) = (heads.q, heads.dim, heads.scale);
    let group = nh / heads.kv;
    let ty = cache.shape().kv_type;
    // (block, head) pairs are independent: split them over the pool. A task's pairs are
    // consecutive, and tasks take whole kv heads (all their query heads, which then share each
    // key and value read) unless there are fewer (block, kv head) units than threads: then a
    // kv head's query heads are shared out so that every thread has work.
    let pairs = blocks.len() * nh;
    let pool = herd_kernels::pool::global();
    let (units, threads) = (blocks.len() * heads.kv, pool.n_threads());
    let per_task = if units >= threads {
        units.div_ceil(threads * 4) * group
    } else {
        group.div_ceil(threads.div_ceil(units))
    };
    let shared = herd_kernels::pool::SharedMut::new(out);
    let tasks = pairs.div_ceil(per_task);
    pool.run(tasks, |i| {
        // Within a sequence the later blocks see more keys (causal): hand them out first, so
        // that a prefill's job ends on short tasks and no thread waits long for the last (a
        // mixed batch's blocks go in batch order either way).
        let task = tasks - 1 - i;
        SCRATCH.with_borrow_mut(|Scratch { states, scores }| {
            let (mut pair, end) = (task * per_task, ((task + 1) * per_task).min(pairs));
            while pair < end {
                // The run of this task's pairs with the same row block and kv head.
                let (b, head0) = (pair / nh, pair % nh);
                let kvh = head0 / group;
                let head1 = ((kvh + 1) * group).min(nh).min(head0 + end - pair);
                pair += head1 - head0;
                let hn = head1 - head0;
                let rows = blocks[b].clone();
                let seq = batch.seq_ids[rows.start];
                // Row i of the block sees the cached positions span(i).
                let span = |i: usize| {
                    let pos = batch.positions[rows.start + i];
                    first_key(pos)..pos + 1
                };
                let n = rows.len();
                let lo = (0..n)
                    .map(|i| span(i).start)
                    .min()
                    .expect("blocks are not empty");
                let hi = (0..n)
                    .map(|i| span(i).end)
                    .max()
                    .expect("blocks are not empty");
                // Where row i's queries and outputs of heads head0..head1 lie in `[T, nh·d]`.
                let at = |i: usize| {
                    ((rows.start + i) * nh + head0) * d..((rows.start + i) * nh + head1) * d
                };
                if states.len() < n {
                    states.resize_with(n, OnlineSoftmax::default);
                }
                states[..n].iter_mut().for_each(|st| st.reset(hn, d));
                let view = cache.view(seq, layer);
                let mut tile = lo / TILE * TILE..lo / TILE * TILE + TILE;
                while tile.start < hi {
                    // The tile's cached rows of this kv head that some row of the block sees,
                    // looked up once for all rows and heads.
                    let t = tile.start.max(lo)..tile.end.min(hi);
                    let mut keys: [&[u8]; TILE] = [&[]; TILE];
                    let mut values: [&[u8]; TILE] = [&[]; TILE];
                    for (j, p) in t.clone().enumerate() {
                        keys[j] = view.key(p, kvh);
                        values[j] = view.value(p, kvh);
                    }
                    for (i, state) in states[..n].iter_mut().enumerate() {
                        let seen = span(i);
                        let (a, z) = (seen.start.max(t.start), seen.end.min(t.end));
                        if a >= z {
                            continue;
                        }
                        let js = a - t.start..z - t.start;
                        scores.resize(hn * js.len(), 0.0);
                        attention::kv_scores(ty, d, &q[at(i)], &keys[js.clone()], scale, scores);
                        state.add_tile(ty, scores, &values[js]);
                    }
                    tile = tile.end..tile.end + TILE;
                }
                for (i, state) in states[..n].iter().enumerate() {
                    let o = at(i);
                    // SAFETY: each (row block, head) pair belongs to one task, and owns the
                    // d outputs of its row and head; heads head0..head1 are this task's, and
                    // consecutive, so their outputs are this one slice.
                    state.finish(unsafe { shared.slice(o.start, o.len()) });
                }
            }
        })
    });
}

/// Positions per attention tile, aligned to multiples of it: a row's arithmetic depends on
/// where tiles start, so they follow absolute positions, not cache blocks (whose size is a
/// server setting).
const TILE: usize = 16;

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
