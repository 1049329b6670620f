//! The tokens of one forward step: many sequences flattened, each token with its position.

/// Identifies a sequence across steps (its KV cache entry).
pub type SeqId = u64;

/// One step's input. Tokens of a sequence appear in position order and continue where that
/// sequence's cache ends; sequences may be interleaved.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub positions: Vec<usize>,
    pub seq_ids: Vec<SeqId>,
    /// Rows whose logits the caller wants (typically each sequence's last token).
    pub logits: Vec<bool>,
    /// Rows that are prompt tokens rather than generated ones. Attention scores a prompt's rows
    /// in the order llama.cpp uses for a prompt, generated rows in its decoding order; marking
    /// rows by what they are (not by how many share the step) keeps results the same however
    /// a prompt is split over steps.
    pub prompt: Vec<bool>,
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
        self.prompt.clear();
    }

    /// Add one generated token of sequence `seq` at `pos`.
    pub fn push(&mut self, seq: SeqId, token: u32, pos: usize, want_logits: bool) {
        self.push_row(seq, token, pos, want_logits, false);
    }

    /// Add one token; `prompt` says whether it belongs to the prompt (see [`Batch::prompt`]).
    pub fn push_row(
        &mut self,
        seq: SeqId,
        token: u32,
        pos: usize,
        want_logits: bool,
        prompt: bool,
    ) {
        self.tokens.push(token);
        self.positions.push(pos);
        self.seq_ids.push(seq);
        self.logits.push(want_logits);
        self.prompt.push(prompt);
    }

    /// Add prompt tokens of sequence `seq` from `start_pos`, with logits for the last one (or
    /// for all).
    pub fn push_sequence(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        start_pos: usize,
        all_logits: bool,
    ) {
        for (i, &t) in tokens.iter().enumerate() {
            let last = i + 1 == tokens.len();
            self.push_row(seq, t, start_pos + i, all_logits || last, true);
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
