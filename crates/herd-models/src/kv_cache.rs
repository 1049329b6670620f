//! Keys and values of past tokens, paged and prefix-shared.
//!
//! Storage is a pool of fixed-size blocks (`block_size` positions × every layer); each sequence
//! owns a block table mapping its positions to blocks. Full blocks are indexed by a hash chain
//! over the tokens they hold (parent block's hash, then the block's own tokens), so a new
//! sequence whose prompt starts with the same tokens attaches those blocks instead of computing
//! them again (`attach_prefix`). Blocks are reference counted; a block no sequence uses stays
//! indexed, and so reusable, until the pool needs room and evicts the least recently used one.
//!
//! A cache made with [`KvCache::new`] grows without bound (one-shot generation, tests); one made
//! with [`KvCache::with_capacity`] has a fixed pool, and `reserve` fails with
//! [`Error::CacheFull`] when a step needs more blocks than are free or evictable.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use crate::{Batch, Error, Result, SeqId};

/// Positions per block unless a cache says otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

type BlockId = usize;

#[derive(Debug, Default)]
struct Block {
    refs: u32,
    /// Set while the block is in the prefix index: (its chain hash, parent's chain hash, tokens).
    indexed: Option<(u64, u64, Vec<u32>)>,
    /// When the block was last released, for least-recently-used eviction.
    released_at: u64,
}

#[derive(Debug, Default)]
struct Seq {
    blocks: Vec<BlockId>,
    /// Token of every reserved position.
    tokens: Vec<u32>,
    /// Positions written by the last layer (the sequence's length once a step completes).
    len: usize,
    /// Chain hashes of the leading full blocks that have been hashed.
    hashes: Vec<u64>,
}

/// Counters of prefix reuse, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompt tokens looked up by `attach_prefix`.
    pub queried_tokens: u64,
    /// Of those, tokens whose keys and values came from cached blocks.
    pub hit_tokens: u64,
}

#[derive(Debug)]
pub struct KvCache {
    n_layers: usize,
    /// Floats per token per layer for K (and for V): kv_heads × head_dim.
    kv_dim: usize,
    block_size: usize,
    /// Fixed pool size, or `None` to grow on demand.
    capacity: Option<usize>,
    /// Per layer: keys and values of every block, `[blocks · block_size, kv_dim]`.
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    blocks: Vec<Block>,
    free: Vec<BlockId>,
    /// Unused but indexed blocks by (release time, id): the oldest is evicted first.
    evictable: BTreeSet<(u64, BlockId)>,
    index: HashMap<u64, BlockId>,
    seqs: HashMap<SeqId, Seq>,
    clock: u64,
    stats: PrefixStats,
}

impl KvCache {
    /// A cache that grows as sequences need blocks.
    pub fn new(n_layers: usize, kv_dim: usize) -> Self {
        Self::build(n_layers, kv_dim, DEFAULT_BLOCK_SIZE, None)
    }

    /// A cache with a fixed pool of `num_blocks` blocks of `block_size` positions.
    pub fn with_capacity(
        n_layers: usize,
        kv_dim: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> Self {
        let mut c = Self::build(n_layers, kv_dim, block_size.max(1), Some(num_blocks));
        let floats = num_blocks * c.block_size * kv_dim;
        // Zeroed allocations are lazily backed by the OS: untouched blocks cost no memory.
        c.k = (0..n_layers).map(|_| vec![0.0; floats]).collect();
        c.v = (0..n_layers).map(|_| vec![0.0; floats]).collect();
        c.blocks = (0..num_blocks).map(|_| Block::default()).collect();
        c.free = (0..num_blocks).rev().collect();
        c
    }

    fn build(n_layers: usize, kv_dim: usize, block_size: usize, cap: Option<usize>) -> Self {
        Self {
            n_layers,
            kv_dim,
            block_size,
            capacity: cap,
            k: vec![Vec::new(); n_layers],
            v: vec![Vec::new(); n_layers],
            blocks: Vec::new(),
            free: Vec::new(),
            evictable: BTreeSet::new(),
            index: HashMap::new(),
            seqs: HashMap::new(),
            clock: 0,
            stats: PrefixStats::default(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool (for a growing cache: allocated so far).
    pub fn num_blocks(&self) -> usize {
        self.capacity.unwrap_or(self.blocks.len())
    }

    /// Blocks held by at least one sequence.
    pub fn blocks_used(&self) -> usize {
        self.blocks.iter().filter(|b| b.refs > 0).count()
    }

    /// Blocks a new step can take: free ones and unused cached ones.
    pub fn blocks_available(&self) -> usize {
        match self.capacity {
            Some(_) => self.free.len() + self.evictable.len(),
            None => usize::MAX,
        }
    }

    /// Unused blocks kept for their prefix.
    pub fn blocks_cached(&self) -> usize {
        self.evictable.len()
    }

    pub fn prefix_stats(&self) -> PrefixStats {
        self.stats
    }

    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Tokens cached for `seq` (0 if unknown).
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.len)
    }

    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Forget a sequence whose steps all completed: its full blocks join the prefix index, then
    /// its blocks are released.
    pub fn remove(&mut self, seq: SeqId) {
        if let Some(mut s) = self.seqs.remove(&seq) {
            self.index_full_blocks(&mut s);
            self.release(s);
        }
    }

    /// Forget a sequence without indexing its blocks (its last step failed, so their contents
    /// cannot be trusted).
    pub fn discard(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.release(s);
        }
    }

    fn release(&mut self, s: Seq) {
        self.clock += 1;
        for b in s.blocks {
            let block = &mut self.blocks[b];
            block.refs -= 1;
            if block.refs == 0 {
                if block.indexed.is_some() {
                    block.released_at = self.clock;
                    self.evictable.insert((self.clock, b));
                } else {
                    self.free.push(b);
                }
            }
        }
    }

    /// Start a new sequence `seq` on the longest run of cached full blocks that begins `prompt`,
    /// leaving at least the prompt's last token to compute (its logits are needed). Returns the
    /// number of positions reused; the caller feeds the prompt from there.
    pub fn attach_prefix(&mut self, seq: SeqId, prompt: &[u32]) -> Result<usize> {
        if self.seqs.contains_key(&seq) {
            return Err(Error::Batch(format!("sequence {seq} already exists")));
        }
        let bs = self.block_size;
        let mut s = Seq::default();
        let mut parent = 0u64;
        for chunk in prompt[..prompt.len().saturating_sub(1)].chunks_exact(bs) {
            let h = chain_hash(parent, chunk);
            let Some(&b) = self.index.get(&h) else { break };
            match &self.blocks[b].indexed {
                Some((_, p, toks)) if *p == parent && toks == chunk => {}
                _ => break,
            }
            let block = &mut self.blocks[b];
            if block.refs == 0 {
                self.evictable.remove(&(block.released_at, b));
            }
            block.refs += 1;
            s.blocks.push(b);
            s.hashes.push(h);
            s.tokens.extend_from_slice(chunk);
            parent = h;
        }
        s.len = s.tokens.len();
        let reused = s.len;
        self.stats.queried_tokens += prompt.len() as u64;
        self.stats.hit_tokens += reused as u64;
        self.seqs.insert(seq, s);
        Ok(reused)
    }

    /// Check that every sequence's tokens in `batch` continue its cache without gaps, then
    /// reserve their positions (taking blocks from the pool). Nothing changes on error.
    pub fn reserve(&mut self, batch: &Batch) -> Result<()> {
        self.check_batch(batch)?;
        let mut new_len: HashMap<SeqId, usize> = HashMap::new();
        for &seq in &batch.seq_ids {
            *new_len.entry(seq).or_insert_with(|| self.seq_len(seq)) += 1;
        }
        let needed: usize = new_len
            .iter()
            .map(|(seq, &len)| {
                let have = self.seqs.get(seq).map_or(0, |s| s.blocks.len());
                self.blocks_for(len).saturating_sub(have)
            })
            .sum();
        if needed > self.blocks_available() {
            return Err(Error::CacheFull {
                needed,
                available: self.blocks_available(),
            });
        }
        for (&seq, &tok) in batch.seq_ids.iter().zip(&batch.tokens) {
            let mut s = self.seqs.remove(&seq).unwrap_or_default();
            // Earlier steps of this sequence completed: their full blocks can be shared now.
            self.index_full_blocks(&mut s);
            if s.tokens.len() == s.blocks.len() * self.block_size {
                let b = self.take_block();
                s.blocks.push(b);
            }
            s.tokens.push(tok);
            self.seqs.insert(seq, s);
        }
        Ok(())
    }

    /// Tokens of `batch` follow each sequence's cached positions.
    pub fn check_batch(&self, batch: &Batch) -> Result<()> {
        let n = batch.tokens.len();
        if batch.positions.len() != n || batch.seq_ids.len() != n || batch.logits.len() != n {
            return Err(Error::Batch(
                "tokens, positions, seq_ids and logits differ in length".into(),
            ));
        }
        let mut next: HashMap<SeqId, usize> = HashMap::new();
        for (&seq, &pos) in batch.seq_ids.iter().zip(&batch.positions) {
            let expected = next.entry(seq).or_insert_with(|| self.seq_len(seq));
            if pos != *expected {
                return Err(Error::Batch(format!(
                    "sequence {seq}: token at position {pos}, expected position {expected}"
                )));
            }
            *expected += 1;
        }
        Ok(())
    }

    fn take_block(&mut self) -> BlockId {
        let b = if let Some(b) = self.free.pop() {
            b
        } else if let Some((_, b)) = self.evictable.pop_first() {
            if let Some((h, _, _)) = self.blocks[b].indexed.take() {
                self.index.remove(&h);
            }
            b
        } else {
            debug_assert!(self.capacity.is_none(), "reserve checked the pool");
            let floats = self.block_size * self.kv_dim;
            for arena in self.k.iter_mut().chain(self.v.iter_mut()) {
                arena.resize(arena.len() + floats, 0.0);
            }
            self.blocks.push(Block::default());
            self.blocks.len() - 1
        };
        self.blocks[b].refs = 1;
        b
    }

    /// Put the sequence's completed full blocks into the prefix index.
    fn index_full_blocks(&mut self, s: &mut Seq) {
        let bs = self.block_size;
        while s.hashes.len() < s.len / bs {
            let i = s.hashes.len();
            let parent = if i == 0 { 0 } else { s.hashes[i - 1] };
            let toks = &s.tokens[i * bs..(i + 1) * bs];
            let h = chain_hash(parent, toks);
            s.hashes.push(h);
            let b = s.blocks[i];
            // An identical block may already be indexed (two equal prompts at once): keep that one.
            if self.blocks[b].indexed.is_none() && !self.index.contains_key(&h) {
                self.blocks[b].indexed = Some((h, parent, toks.to_vec()));
                self.index.insert(h, b);
            }
        }
    }

    fn slot(&self, seq: SeqId, pos: usize) -> usize {
        let s = &self.seqs[&seq];
        s.blocks[pos / self.block_size] * self.block_size + pos % self.block_size
    }

    /// Store the key and value of `seq`'s position `pos` (reserved) for `layer`.
    pub(crate) fn write(&mut self, seq: SeqId, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        debug_assert!(k.len() == self.kv_dim && v.len() == self.kv_dim);
        let r = self.slot(seq, pos) * self.kv_dim..(self.slot(seq, pos) + 1) * self.kv_dim;
        self.k[layer][r.clone()].copy_from_slice(k);
        self.v[layer][r].copy_from_slice(v);
        if layer + 1 == self.n_layers {
            let s = self.seqs.get_mut(&seq).expect("reserved sequence");
            s.len = s.len.max(pos + 1);
        }
    }

    /// Keys and values of positions `start..=end` of `seq` in `layer`, as runs of consecutive
    /// positions (`[n, kv_dim]` each), in position order.
    pub(crate) fn runs(
        &self,
        seq: SeqId,
        layer: usize,
        start: usize,
        end: usize,
    ) -> impl Iterator<Item = (&[f32], &[f32])> + '_ {
        let (bs, d) = (self.block_size, self.kv_dim);
        let blocks = &self.seqs[&seq].blocks;
        let (k, v) = (&self.k[layer], &self.v[layer]);
        (start / bs..=end / bs).map(move |bi| {
            let lo = (bi * bs).max(start) - bi * bs;
            let hi = ((bi + 1) * bs).min(end + 1) - bi * bs;
            let base = blocks[bi] * bs;
            let r = (base + lo) * d..(base + hi) * d;
            (&k[r.clone()], &v[r])
        })
    }
}

fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(c: &mut KvCache, seq: SeqId, tokens: &[u32], start: usize) {
        let b = Batch::sequence(seq, tokens, start);
        c.reserve(&b).unwrap();
        for l in 0..c.n_layers {
            for (i, &t) in tokens.iter().enumerate() {
                let val = [t as f32 + l as f32 * 1000.0; 2];
                c.write(seq, l, start + i, &val, &val);
            }
        }
    }

    fn keys(c: &KvCache, seq: SeqId, layer: usize, end: usize) -> Vec<f32> {
        c.runs(seq, layer, 0, end)
            .flat_map(|(k, _)| k.iter().step_by(2).copied())
            .collect()
    }

    #[test]
    fn runs_follow_the_block_table() {
        let mut c = KvCache::with_capacity(2, 2, 4, 8);
        let toks: Vec<u32> = (0..11).collect();
        fill(&mut c, 1, &toks, 0);
        assert_eq!(c.seq_len(1), 11);
        assert_eq!(c.blocks_used(), 3);
        let want: Vec<f32> = (0..11).map(|t| t as f32 + 1000.0).collect();
        assert_eq!(keys(&c, 1, 1, 10), want);
        let part: Vec<f32> = c
            .runs(1, 0, 3, 9)
            .flat_map(|(k, _)| k.iter().step_by(2).copied())
            .collect();
        assert_eq!(part, (3..10).map(|t| t as f32).collect::<Vec<_>>());
    }

    #[test]
    fn shared_prefix_is_reused_and_evicted_last() {
        let mut c = KvCache::with_capacity(1, 2, 4, 6);
        let prompt: Vec<u32> = (10..20).collect(); // 2 full blocks + 2
        fill(&mut c, 1, &prompt, 0);
        c.remove(1);
        assert_eq!(c.blocks_used(), 0);
        assert_eq!(c.blocks_cached(), 2);
        // Same first 8 tokens, different tail: both full blocks are attached.
        let mut other = prompt[..8].to_vec();
        other.extend([99, 98, 97]);
        assert_eq!(c.attach_prefix(2, &other).unwrap(), 8);
        assert_eq!(c.blocks_used(), 2);
        fill(&mut c, 2, &other[8..], 8);
        assert_eq!(
            keys(&c, 2, 0, 10)[..8],
            (10..18).map(|t| t as f32).collect::<Vec<_>>()[..]
        );
        // A prompt that is exactly the cached blocks recomputes its last token.
        assert_eq!(c.attach_prefix(3, &prompt[..8]).unwrap(), 4);
        c.discard(3);
        // A different first block misses entirely.
        assert_eq!(c.attach_prefix(4, &[1, 2, 3, 4, 5, 6]).unwrap(), 0);
        c.discard(4);
        let stats = c.prefix_stats();
        assert_eq!((stats.queried_tokens, stats.hit_tokens), (25, 12));
        c.remove(2);
        assert_eq!(c.blocks_used(), 0);
        // Filling the whole pool with unrelated tokens evicts the cached blocks.
        fill(&mut c, 5, &[7; 24], 0);
        assert_eq!(c.blocks_cached(), 0);
        assert_eq!(c.attach_prefix(6, &prompt).unwrap(), 0);
    }

    #[test]
    fn a_full_pool_refuses_without_changing_anything() {
        let mut c = KvCache::with_capacity(1, 2, 4, 2);
        fill(&mut c, 1, &[1, 2, 3, 4, 5], 0);
        let err = c.reserve(&Batch::sequence(2, &[1, 2, 3, 4, 5], 0));
        assert!(matches!(
            err,
            Err(Error::CacheFull {
                needed: 2,
                available: 0
            })
        ));
        assert_eq!(c.seq_len(2), 0);
        assert_eq!(c.num_seqs(), 1);
        c.remove(1);
        assert_eq!(c.blocks_available(), 2);
    }

    #[test]
    fn growing_cache_never_refuses() {
        let mut c = KvCache::new(1, 2);
        fill(&mut c, 1, &(0..100).collect::<Vec<_>>(), 0);
        assert_eq!(c.num_blocks(), 100usize.div_ceil(DEFAULT_BLOCK_SIZE));
    }
}
