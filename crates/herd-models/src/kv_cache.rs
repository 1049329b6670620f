//! Keys and values of past tokens, paged and prefix-shared.
//!
//! Storage is pools of fixed-size blocks (`block_size` positions); each sequence owns block
//! tables mapping its positions to blocks. Layers that see the same window of keys form a group
//! with its own pool and tables: full-attention layers keep every block, while sliding-window
//! (Gemma 3 local layers) and chunked (Llama 4 RoPE layers) groups release the blocks no future
//! query of the sequence can see, so a long sequence holds only a window's worth of them.
//!
//! Full blocks are indexed by a hash chain over the tokens they hold (parent block's hash, then
//! the block's own tokens), so a new sequence whose prompt starts with the same tokens attaches
//! those blocks instead of computing them again (`attach_prefix`). Blocks are reference counted;
//! a block no sequence uses stays indexed, and so reusable, until its pool needs room and evicts
//! the least recently used one.
//!
//! A cache made with [`KvCache::new`] grows without bound (one-shot generation, tests); one made
//! with [`KvCache::with_capacity`] has fixed pools of `num_blocks` each, and `reserve` fails
//! with [`Error::CacheFull`] when a step needs more blocks than are free or evictable. Pools are
//! zeroed allocations the OS backs lazily, and freed blocks are reused first, so memory follows
//! the blocks actually in use.
//!
//! Each cached row (one position of one layer: `kv_dim` = kv heads × head size elements of K,
//! and as many of V) is stored as the cache's element type ([`KvShape::kv_type`]): f16 by
//! default, as llama.cpp does; f32, bf16, or Q8_0 blocks of 32 on request. Attention reads the
//! rows in that type (`herd_kernels::attention`). Each kv head has its own arena per layer, so
//! the keys (and values) of one head at consecutive positions are adjacent in memory.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use herd_kernels::DType;
use herd_kernels::attention;

use crate::{Batch, Error, Result, SeqId};

/// Positions per block unless a cache says otherwise.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The element type of the cache unless asked otherwise (llama.cpp's default too).
pub const DEFAULT_KV_TYPE: DType = DType::F16;

/// What one cached row of a layer holds: `kv_dim` = kv heads × `head_dim` elements of K (and
/// as many of V), stored as `kv_type` (one of `herd_kernels::attention::KV_TYPES`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvShape {
    pub kv_dim: usize,
    pub head_dim: usize,
    pub kv_type: DType,
}

impl KvShape {
    /// Bytes of one cached row of K (or of V).
    pub fn row_bytes(&self) -> usize {
        self.kv_type.bytes_for(self.kv_dim)
    }

    /// The number of kv heads.
    pub fn kv_heads(&self) -> usize {
        self.kv_dim / self.head_dim
    }

    /// Bytes of one head of one cached row.
    pub fn head_bytes(&self) -> usize {
        self.kv_type.bytes_for(self.head_dim)
    }

    fn check(&self) -> Result<()> {
        let names = attention::KV_TYPES
            .map(|t| t.name().to_ascii_lowercase())
            .join(", ");
        if !attention::KV_TYPES.contains(&self.kv_type) {
            return Err(Error::KvType(format!(
                "{} is not a KV cache type: choose one of {names}",
                self.kv_type
            )));
        }
        if self.head_dim == 0 || !self.kv_dim.is_multiple_of(self.head_dim) {
            return Err(Error::KvType(format!(
                "kv_dim {} is not a whole number of heads of {}",
                self.kv_dim, self.head_dim
            )));
        }
        if !attention::kv_type_fits(self.kv_type, self.head_dim) {
            return Err(Error::KvType(format!(
                "{} stores blocks of {} elements, and this model's heads have {}: choose one of \
                 {names} whose blocks divide the head size",
                self.kv_type,
                self.kv_type.block_size(),
                self.head_dim
            )));
        }
        Ok(())
    }
}

/// Which cached keys a layer's query at position `p` attends to (besides causality).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Window {
    /// Every earlier position.
    Full,
    /// The last `n` positions, the query's own included.
    Sliding(usize),
    /// Positions of the query's own aligned chunk of `n`.
    Chunked(usize),
}

impl Window {
    /// The first position a query at `pos` sees.
    pub fn first_visible(self, pos: usize) -> usize {
        match self {
            Window::Full => 0,
            Window::Sliding(n) => (pos + 1).saturating_sub(n),
            Window::Chunked(n) => pos / n * n,
        }
    }
}

type BlockId = usize;

#[derive(Debug, Default)]
struct Block {
    refs: u32,
    /// Set while the block is in the prefix index: (its chain hash, parent's chain hash, tokens).
    indexed: Option<(u64, u64, Vec<u32>)>,
    /// When the block was last released, for least-recently-used eviction.
    released_at: u64,
}

/// The layers sharing one window, with their pool of blocks.
#[derive(Debug)]
struct Group {
    window: Window,
    /// Per layer of the group and kv head (index `layer · kv_heads + head`): that head's keys
    /// and values in every block, `[blocks · block_size]` rows of [`KvShape::head_bytes`]
    /// each. A head's rows of consecutive positions are adjacent, so attention, which reads
    /// one kv head at a time, streams through memory rather than striding across heads.
    k: Vec<Vec<u8>>,
    v: Vec<Vec<u8>>,
    blocks: Vec<Block>,
    free: Vec<BlockId>,
    /// Unused but indexed blocks by (release time, id): the oldest is evicted first.
    evictable: BTreeSet<(u64, BlockId)>,
    index: HashMap<u64, BlockId>,
}

impl Group {
    fn available(&self, capacity: Option<usize>) -> usize {
        match capacity {
            Some(_) => self.free.len() + self.evictable.len(),
            None => usize::MAX,
        }
    }

    fn release(&mut self, b: BlockId, clock: u64) {
        let block = &mut self.blocks[b];
        block.refs -= 1;
        if block.refs == 0 {
            if block.indexed.is_some() {
                block.released_at = clock;
                self.evictable.insert((clock, b));
            } else {
                self.free.push(b);
            }
        }
    }

    /// The indexed block for chain hash `h` (parent `parent`, tokens `toks`), if any.
    fn lookup(&self, h: u64, parent: u64, toks: &[u32]) -> Option<BlockId> {
        let &b = self.index.get(&h)?;
        match &self.blocks[b].indexed {
            Some((_, p, t)) if *p == parent && t == toks => Some(b),
            _ => None,
        }
    }

    fn acquire(&mut self, b: BlockId) {
        let block = &mut self.blocks[b];
        if block.refs == 0 {
            self.evictable.remove(&(block.released_at, b));
        }
        block.refs += 1;
    }
}

#[derive(Debug, Default)]
struct Seq {
    /// Per group: block of each block-sized span of positions (`None`: released, out of every
    /// future query's window).
    tables: Vec<Vec<Option<BlockId>>>,
    /// Token of every reserved position.
    tokens: Vec<u32>,
    /// Positions written by the last layer (the sequence's length once a step completes).
    len: usize,
    /// Chain hashes of the leading full blocks that have been hashed.
    hashes: Vec<u64>,
    /// The prefix-cache partition (the root of the chain hashes).
    salt: u64,
}

/// Counters of prefix reuse, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Prompt tokens looked up by `attach_prefix`.
    pub queried_tokens: u64,
    /// Of those, tokens whose keys and values came from cached blocks.
    pub hit_tokens: u64,
}

thread_local! {
    /// Each sequence's next position while a batch is checked (kept: decoding allocates nothing).
    static NEXT_POSITION: std::cell::RefCell<HashMap<SeqId, usize>> =
        std::cell::RefCell::new(HashMap::new());
}

#[derive(Debug)]
pub struct KvCache {
    n_layers: usize,
    shape: KvShape,
    block_size: usize,
    /// Fixed pool size per group, or `None` to grow on demand.
    capacity: Option<usize>,
    groups: Vec<Group>,
    /// Per layer: (group, index within the group).
    layer_slot: Vec<(usize, usize)>,
    /// The group whose counts metrics report: full attention if any layer has it.
    primary: usize,
    seqs: HashMap<SeqId, Seq>,
    clock: u64,
    stats: PrefixStats,
}

impl KvCache {
    /// A growing f32 cache of rows of `kv_dim` whose layers all see every earlier position.
    pub fn new(n_layers: usize, kv_dim: usize) -> Self {
        Self::windowed(
            &vec![Window::Full; n_layers],
            Self::f32_shape(kv_dim),
            DEFAULT_BLOCK_SIZE,
            None,
        )
        .expect("f32 rows of any size are valid")
    }

    /// An f32 cache of rows of `kv_dim` with fixed pools of `num_blocks` blocks of
    /// `block_size` positions.
    pub fn with_capacity(
        n_layers: usize,
        kv_dim: usize,
        block_size: usize,
        num_blocks: usize,
    ) -> Self {
        Self::windowed(
            &vec![Window::Full; n_layers],
            Self::f32_shape(kv_dim),
            block_size,
            Some(num_blocks),
        )
        .expect("f32 rows of any size are valid")
    }

    fn f32_shape(kv_dim: usize) -> KvShape {
        KvShape {
            kv_dim,
            head_dim: kv_dim.max(1),
            kv_type: DType::F32,
        }
    }

    /// A cache for layers with the given windows (`num_blocks`: fixed pools, else growing).
    ///
    /// # Errors
    /// [`Error::KvType`] if `shape.kv_type` is not a KV cache type or its blocks do not divide
    /// the head size.
    pub fn windowed(
        windows: &[Window],
        shape: KvShape,
        block_size: usize,
        num_blocks: Option<usize>,
    ) -> Result<Self> {
        shape.check()?;
        let block_size = block_size.max(1);
        let mut groups: Vec<Group> = Vec::new();
        let mut layer_slot = Vec::with_capacity(windows.len());
        for &w in windows {
            let g = match groups.iter().position(|g| g.window == w) {
                Some(g) => g,
                None => {
                    groups.push(Group {
                        window: w,
                        k: Vec::new(),
                        v: Vec::new(),
                        blocks: Vec::new(),
                        free: Vec::new(),
                        evictable: BTreeSet::new(),
                        index: HashMap::new(),
                    });
                    groups.len() - 1
                }
            };
            let bytes = num_blocks.unwrap_or(0) * block_size * shape.head_bytes();
            // Zeroed allocations are lazily backed by the OS: untouched blocks cost no memory.
            let l = layer_slot.iter().filter(|&&(gg, _)| gg == g).count();
            for _ in 0..shape.kv_heads() {
                groups[g].k.push(vec![0; bytes]);
                groups[g].v.push(vec![0; bytes]);
            }
            layer_slot.push((g, l));
        }
        if let Some(n) = num_blocks {
            for g in &mut groups {
                g.blocks = (0..n).map(|_| Block::default()).collect();
                g.free = (0..n).rev().collect();
            }
        }
        let primary = groups
            .iter()
            .position(|g| g.window == Window::Full)
            .unwrap_or(0);
        Ok(Self {
            n_layers: windows.len(),
            shape,
            block_size,
            capacity: num_blocks,
            groups,
            layer_slot,
            primary,
            seqs: HashMap::new(),
            clock: 0,
            stats: PrefixStats::default(),
        })
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The shape and element type of each cached row.
    pub fn shape(&self) -> KvShape {
        self.shape
    }

    /// Blocks in a pool (for a growing cache: allocated so far in the largest).
    pub fn num_blocks(&self) -> usize {
        self.capacity.unwrap_or_else(|| {
            self.groups
                .iter()
                .map(|g| g.blocks.len())
                .max()
                .unwrap_or(0)
        })
    }

    /// Blocks held by at least one sequence (in the full-attention pool, which holds the most).
    pub fn blocks_used(&self) -> usize {
        Self::used(&self.groups[self.primary])
    }

    /// Blocks held, per window kind.
    pub fn blocks_used_by_window(&self) -> Vec<(Window, usize)> {
        self.groups
            .iter()
            .map(|g| (g.window, Self::used(g)))
            .collect()
    }

    fn used(g: &Group) -> usize {
        g.blocks.iter().filter(|b| b.refs > 0).count()
    }

    /// Blocks a new step can take in every pool: free ones and unused cached ones.
    pub fn blocks_available(&self) -> usize {
        self.groups
            .iter()
            .map(|g| g.available(self.capacity))
            .min()
            .unwrap_or(usize::MAX)
    }

    /// Unused blocks kept for their prefix (full-attention pool).
    pub fn blocks_cached(&self) -> usize {
        self.groups[self.primary].evictable.len()
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

    /// Positions reserved for `seq`: its cached tokens and those of a step in progress.
    pub fn reserved_len(&self, seq: SeqId) -> usize {
        self.seqs.get(&seq).map_or(0, |s| s.tokens.len())
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
        for (g, table) in s.tables.into_iter().enumerate() {
            for b in table.into_iter().flatten() {
                self.groups[g].release(b, self.clock);
            }
        }
    }

    /// Start a new sequence `seq` on the longest run of cached full blocks that begins `prompt`,
    /// leaving at least the prompt's last token to compute (its logits are needed). Windowed
    /// groups need only the blocks the first computed position can see. Returns the number of
    /// positions reused; the caller feeds the prompt from there.
    pub fn attach_prefix(&mut self, seq: SeqId, prompt: &[u32]) -> Result<usize> {
        self.attach_prefix_salted(seq, prompt, 0)
    }

    /// [`attach_prefix`](Self::attach_prefix) within the partition `salt`: only blocks that
    /// sequences of the same salt indexed are reused, and this sequence's blocks are indexed
    /// under it (the salt is the root of the chain hashes).
    pub fn attach_prefix_salted(&mut self, seq: SeqId, prompt: &[u32], salt: u64) -> Result<usize> {
        if self.seqs.contains_key(&seq) {
            return Err(Error::Batch(format!("sequence {seq} already exists")));
        }
        let bs = self.block_size;
        // Chain hashes of the prompt's full blocks (its last token excluded).
        let chunks: Vec<&[u32]> = prompt[..prompt.len().saturating_sub(1)]
            .chunks_exact(bs)
            .collect();
        let mut hashes = Vec::with_capacity(chunks.len());
        let mut parent = salt;
        for c in &chunks {
            parent = chain_hash(parent, c);
            hashes.push(parent);
        }
        let parent_of = |i: usize| if i == 0 { salt } else { hashes[i - 1] };
        // The longest m such that every group has the blocks among the first m that position
        // m·bs (the first one computed) can see.
        let found = |g: &Group, i: usize| g.lookup(hashes[i], parent_of(i), chunks[i]);
        let mut m = chunks.len();
        while m > 0 {
            let ok = self.groups.iter().all(|g| {
                let first = g.window.first_visible(m * bs) / bs;
                (first..m).all(|i| found(g, i).is_some())
            });
            if ok {
                break;
            }
            m -= 1;
        }
        let mut s = Seq {
            tables: vec![Vec::new(); self.groups.len()],
            salt,
            ..Seq::default()
        };
        for (gi, g) in self.groups.iter_mut().enumerate() {
            let first = g.window.first_visible(m * bs) / bs;
            for i in 0..m {
                let b = if i >= first {
                    let b = g.lookup(hashes[i], parent_of(i), chunks[i]);
                    if let Some(b) = b {
                        g.acquire(b);
                    }
                    b
                } else {
                    None
                };
                s.tables[gi].push(b);
            }
        }
        s.hashes = hashes[..m].to_vec();
        s.tokens = prompt[..m * bs].to_vec();
        s.len = m * bs;
        self.stats.queried_tokens += prompt.len() as u64;
        self.stats.hit_tokens += s.len as u64;
        self.seqs.insert(seq, s);
        Ok(m * bs)
    }

    /// Check that every sequence's tokens in `batch` continue its cache without gaps, release
    /// the blocks its windowed layers no longer need, then reserve the batch's positions
    /// (taking blocks from the pools). Positions already reserved for the same tokens stay as
    /// they are, so a scheduler can allocate a step's blocks before the model runs it and the
    /// model's own call changes nothing. On error no position is reserved.
    pub fn reserve(&mut self, batch: &Batch) -> Result<()> {
        self.check_batch(batch)?;
        for (&seq, (&pos, &tok)) in batch
            .seq_ids
            .iter()
            .zip(batch.positions.iter().zip(&batch.tokens))
        {
            if let Some(&held) = self.seqs.get(&seq).and_then(|s| s.tokens.get(pos))
                && held != tok
            {
                return Err(Error::Batch(format!(
                    "sequence {seq}: position {pos} is reserved for token {held}, not {tok}"
                )));
            }
        }
        // After check_batch: each sequence's length once the batch is in.
        NEXT_POSITION.with_borrow_mut(|new_len| self.reserve_checked(batch, new_len))
    }

    fn reserve_checked(&mut self, batch: &Batch, new_len: &HashMap<SeqId, usize>) -> Result<()> {
        self.clock += 1;
        for &seq in new_len.keys() {
            if let Some(mut s) = self.seqs.remove(&seq) {
                // Earlier steps of this sequence completed: their full blocks can be shared now.
                self.index_full_blocks(&mut s);
                self.drop_invisible(&mut s);
                self.seqs.insert(seq, s);
            }
        }
        let needed: usize = new_len
            .iter()
            .map(|(seq, &len)| {
                let have = self
                    .seqs
                    .get(seq)
                    .map_or(0, |s| s.tokens.len().div_ceil(self.block_size));
                self.blocks_for(len).saturating_sub(have)
            })
            .sum();
        if needed > self.blocks_available() {
            return Err(Error::CacheFull {
                needed,
                available: self.blocks_available(),
            });
        }
        let groups = self.groups.len();
        for (&seq, (&pos, &tok)) in batch
            .seq_ids
            .iter()
            .zip(batch.positions.iter().zip(&batch.tokens))
        {
            let mut s = self.seqs.remove(&seq).unwrap_or_else(|| Seq {
                tables: vec![Vec::new(); groups],
                ..Seq::default()
            });
            if pos < s.tokens.len() {
                // Reserved already (checked: for this token).
                self.seqs.insert(seq, s);
                continue;
            }
            if s.tokens.len() == s.tables[0].len() * self.block_size {
                for g in 0..groups {
                    let b = self.take_block(g);
                    s.tables[g].push(Some(b));
                }
            }
            s.tokens.push(tok);
            self.seqs.insert(seq, s);
        }
        Ok(())
    }

    /// Release blocks of windowed groups that no query from position `len` on can see.
    fn drop_invisible(&mut self, s: &mut Seq) {
        for (g, table) in s.tables.iter_mut().enumerate() {
            let first = self.groups[g].window.first_visible(s.len) / self.block_size;
            for slot in table.iter_mut().take(first) {
                if let Some(b) = slot.take() {
                    self.groups[g].release(b, self.clock);
                }
            }
        }
    }

    /// Tokens of `batch` follow each sequence's cached positions.
    pub fn check_batch(&self, batch: &Batch) -> Result<()> {
        let n = batch.tokens.len();
        if [
            batch.positions.len(),
            batch.seq_ids.len(),
            batch.logits.len(),
        ]
        .iter()
        .any(|&len| len != n)
        {
            return Err(Error::Batch(
                "tokens, positions, seq_ids and logits differ in length".into(),
            ));
        }
        NEXT_POSITION.with_borrow_mut(|next| {
            next.clear();
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
        })
    }

    fn take_block(&mut self, g: usize) -> BlockId {
        let bytes = self.block_size * self.shape.head_bytes();
        let capacity = self.capacity;
        let group = &mut self.groups[g];
        let b = if let Some(b) = group.free.pop() {
            b
        } else if let Some((_, b)) = group.evictable.pop_first() {
            if let Some((h, _, _)) = group.blocks[b].indexed.take() {
                group.index.remove(&h);
            }
            b
        } else {
            debug_assert!(capacity.is_none(), "reserve checked the pool");
            for arena in group.k.iter_mut().chain(group.v.iter_mut()) {
                arena.resize(arena.len() + bytes, 0);
            }
            group.blocks.push(Block::default());
            group.blocks.len() - 1
        };
        group.blocks[b].refs = 1;
        b
    }

    /// Put the sequence's completed full blocks into the prefix indexes.
    fn index_full_blocks(&mut self, s: &mut Seq) {
        let bs = self.block_size;
        while s.hashes.len() < s.len / bs {
            let i = s.hashes.len();
            let parent = if i == 0 { s.salt } else { s.hashes[i - 1] };
            let toks = &s.tokens[i * bs..(i + 1) * bs];
            let h = chain_hash(parent, toks);
            s.hashes.push(h);
            for (g, group) in self.groups.iter_mut().enumerate() {
                let Some(b) = s.tables[g][i] else { continue };
                // An identical block may already be indexed (equal prompts at once): keep that.
                if group.blocks[b].indexed.is_none() && !group.index.contains_key(&h) {
                    group.blocks[b].indexed = Some((h, parent, toks.to_vec()));
                    group.index.insert(h, b);
                }
            }
        }
    }

    /// Store the key and value (`kv_dim` values each) of `seq`'s position `pos` (reserved) for
    /// `layer`, encoded as the cache's element type.
    pub(crate) fn write(&mut self, seq: SeqId, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        debug_assert!(k.len() == self.shape.kv_dim && v.len() == self.shape.kv_dim);
        let (g, l) = self.layer_slot[layer];
        let (bs, ty) = (self.block_size, self.shape.kv_type);
        let (heads, d, hb) = (
            self.shape.kv_heads(),
            self.shape.head_dim,
            self.shape.head_bytes(),
        );
        let s = self.seqs.get_mut(&seq).expect("reserved sequence");
        let b = s.tables[g][pos / bs].expect("a reserved position's block is held");
        let slot = b * bs + pos % bs;
        let r = slot * hb..(slot + 1) * hb;
        let group = &mut self.groups[g];
        for h in 0..heads {
            let e = h * d..(h + 1) * d;
            attention::encode_kv(ty, &k[e.clone()], &mut group.k[l * heads + h][r.clone()]);
            attention::encode_kv(ty, &v[e], &mut group.v[l * heads + h][r.clone()]);
        }
        if layer + 1 == self.n_layers {
            s.len = s.len.max(pos + 1);
        }
    }

    /// The cached rows of `seq` in `layer`, by position. The sequence must exist.
    pub(crate) fn view(&self, seq: SeqId, layer: usize) -> KvView<'_> {
        let (g, l) = self.layer_slot[layer];
        let heads = l * self.shape.kv_heads()..(l + 1) * self.shape.kv_heads();
        KvView {
            table: &self.seqs[&seq].tables[g],
            k: &self.groups[g].k[heads.clone()],
            v: &self.groups[g].v[heads],
            block_size: self.block_size,
            head_bytes: self.shape.head_bytes(),
        }
    }
}

/// One sequence's cached keys and values in one layer ([`KvCache::view`]).
pub(crate) struct KvView<'a> {
    table: &'a [Option<BlockId>],
    /// Per kv head, its arena.
    k: &'a [Vec<u8>],
    v: &'a [Vec<u8>],
    block_size: usize,
    head_bytes: usize,
}

impl<'a> KvView<'a> {
    fn slot(&self, pos: usize) -> std::ops::Range<usize> {
        let b = self.table[pos / self.block_size].expect("a visible position's block is held");
        let slot = b * self.block_size + pos % self.block_size;
        slot * self.head_bytes..(slot + 1) * self.head_bytes
    }

    /// Head `head`'s key at `pos` ([`KvShape::head_bytes`] bytes in the cache's element type).
    /// The position must be visible to a query of the sequence (not released).
    pub(crate) fn key(&self, pos: usize, head: usize) -> &'a [u8] {
        &self.k[head][self.slot(pos)]
    }

    /// Head `head`'s value at `pos`, as [`KvView::key`].
    pub(crate) fn value(&self, pos: usize, head: usize) -> &'a [u8] {
        &self.v[head][self.slot(pos)]
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
        first_of_rows(c, seq, layer, 0, end)
    }

    /// The first f32 of the key rows of positions `start..=end` (the tests' caches are f32 of 2).
    fn first_of_rows(c: &KvCache, seq: SeqId, layer: usize, start: usize, end: usize) -> Vec<f32> {
        let view = c.view(seq, layer);
        (start..=end)
            .map(|p| f32::from_le_bytes(view.key(p, 0)[..4].try_into().unwrap()))
            .collect()
    }

    /// Rows of no values (no kv heads) are a valid, empty cache.
    #[test]
    fn zero_width_rows_are_allowed() {
        for mut c in [KvCache::new(2, 0), KvCache::with_capacity(2, 0, 4, 4)] {
            let b = Batch::sequence(1, &[5, 6, 7], 0);
            c.reserve(&b).unwrap();
            for l in 0..2 {
                for p in 0..3 {
                    c.write(1, l, p, &[], &[]);
                }
            }
            assert_eq!(c.seq_len(1), 3);
            assert_eq!(c.shape().kv_heads(), 0);
        }
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
        let part: Vec<f32> = first_of_rows(&c, 1, 0, 3, 9);
        assert_eq!(part, (3..10).map(|t| t as f32).collect::<Vec<_>>());
    }

    /// Partitions: blocks indexed under one salt are invisible to every other salt, and a
    /// salted sequence's own blocks are found again under its salt.
    #[test]
    fn a_salt_partitions_the_prefix_cache() {
        let mut c = KvCache::with_capacity(1, 2, 4, 12);
        let prompt: Vec<u32> = (10..20).collect();
        assert_eq!(c.attach_prefix_salted(1, &prompt, 7).unwrap(), 0);
        fill(&mut c, 1, &prompt, 0);
        c.remove(1);
        assert_eq!(c.blocks_cached(), 2);
        assert_eq!(c.attach_prefix(2, &prompt).unwrap(), 0);
        c.discard(2);
        assert_eq!(c.attach_prefix_salted(3, &prompt, 8).unwrap(), 0);
        c.discard(3);
        assert_eq!(c.attach_prefix_salted(4, &prompt, 7).unwrap(), 8);
        c.discard(4);
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
    fn windowed_layers_keep_only_visible_blocks() {
        let windows = [Window::Full, Window::Sliding(6), Window::Chunked(8)];
        let mut c = KvCache::windowed(&windows, KvCache::f32_shape(2), 4, Some(16)).unwrap();
        let prompt: Vec<u32> = (100..120).collect();
        fill(&mut c, 1, &prompt, 0);
        fill(&mut c, 1, &[120], 20);
        // Position 20 (and later) sees 15.. on the sliding layer and 16.. on the chunked one.
        let used = c.blocks_used_by_window();
        assert_eq!(
            used,
            [
                (Window::Full, 6),
                (Window::Sliding(6), 3),
                (Window::Chunked(8), 2)
            ]
        );
        assert_eq!(c.blocks_used(), 6);
        let visible: Vec<f32> = first_of_rows(&c, 1, 1, 15, 20);
        assert_eq!(
            visible,
            (115..=120).map(|t| (t + 1000) as f32).collect::<Vec<_>>()
        );
        c.remove(1);
        // A new sequence on the same 20 tokens needs, on the windowed layers, only the blocks
        // position 20 sees: they are still indexed, so all 20 positions are reused.
        let mut again = prompt.clone();
        again.push(7);
        assert_eq!(c.attach_prefix(2, &again).unwrap(), 20);
        let used = c.blocks_used_by_window();
        assert_eq!(
            used,
            [
                (Window::Full, 5),
                (Window::Sliding(6), 2),
                (Window::Chunked(8), 1)
            ]
        );
        fill(&mut c, 2, &[7], 20);
        let keys: Vec<f32> = first_of_rows(&c, 2, 2, 16, 20);
        assert_eq!(keys, [116.0, 117.0, 118.0, 119.0, 7.0].map(|t| t + 2000.0));
    }

    /// A scheduler reserves a step before the model does: the second call keeps what the first
    /// took, and a different token at a reserved position is refused without a change.
    #[test]
    fn reserving_a_step_twice_takes_its_blocks_once() {
        let mut c = KvCache::with_capacity(1, 2, 4, 3);
        let step = Batch::sequence(1, &[1, 2, 3, 4, 5], 0);
        c.reserve(&step).unwrap();
        assert_eq!((c.reserved_len(1), c.blocks_used()), (5, 2));
        c.reserve(&step).unwrap();
        assert_eq!((c.reserved_len(1), c.blocks_used()), (5, 2));
        let other = Batch::sequence(1, &[1, 2, 9, 4, 5], 0);
        assert!(matches!(c.reserve(&other), Err(Error::Batch(_))));
        assert_eq!(
            (c.reserved_len(1), c.blocks_used(), c.seq_len(1)),
            (5, 2, 0)
        );
        for (i, t) in [1u32, 2, 3, 4, 5].iter().enumerate() {
            let val = [*t as f32; 2];
            c.write(1, 0, i, &val, &val);
        }
        assert_eq!(c.seq_len(1), 5);
    }

    #[test]
    fn growing_cache_never_refuses() {
        let mut c = KvCache::new(1, 2);
        fill(&mut c, 1, &(0..100).collect::<Vec<_>>(), 0);
        assert_eq!(c.num_blocks(), 100usize.div_ceil(DEFAULT_BLOCK_SIZE));
    }
}
