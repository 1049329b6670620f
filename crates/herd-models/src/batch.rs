//! The tokens of one forward step: many sequences flattened, each token with its position.

/// Identifies a sequence across steps (its KV cache entry).
pub type SeqId = u64;

/// One step's input. Tokens of a sequence appear in position order and continue where that
/// sequence's cache ends; sequences may be interleaved. Every row is computed the same way
/// whatever else the batch holds, so how a prompt is split into steps, batched with others or
/// partly served from cached blocks never changes a result.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub seq_ids: Vec<SeqId>,
    /// Rows whose logits the caller wants (typically each sequence's last token).
    pub logits: Vec<bool>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// A batch holding one sequence's tokens starting at `start_pos`, with logits for every row.
    pub fn sequence(seq: SeqId, tokens: &[u32], start_pos: usize) -> Self {
        let mut b = Self::new();
        b.push_sequence(seq, tokens, start_pos, true);
        b
    }

    /// Empty the batch, keeping its capacity (a decode loop reuses one batch).
    pub fn clear(&mut self) {
        self.tokens.clear();
        self.positions.clear();
        self.seq_ids.clear();
        self.logits.clear();
    }

    /// Add the token at `pos` of sequence `seq`.
    pub fn push(&mut self, seq: SeqId, token: u32, pos: usize, want_logits: bool) {
        self.tokens.push(token);
        self.positions.push(pos);
        self.seq_ids.push(seq);
        self.logits.push(want_logits);
    }

    /// Add tokens of sequence `seq` from `start_pos`, with logits for the last one (or for all).
    pub fn push_sequence(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        start_pos: usize,
        all_logits: bool,
    ) {
        for (i, &t) in tokens.iter().enumerate() {
            let last = i + 1 == tokens.len();
            self.push(seq, t, start_pos + i, all_logits || last);
        }
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    pub fn n_logit_rows(&self) -> usize {
        self.logits.iter().filter(|&&l| l).count()
    }
}
