//! The tokens of one forward step: many sequences flattened, each token with its position.

use std::ops::Range;

use herd_kernels::quant::RowOrder;

/// llama.cpp's default physical batch (`n_ubatch`): a prompt is computed in batches of this
/// many rows, which decides the f32 order of each row's products (see [`Batch::order`]).
pub const LLAMA_CPP_UBATCH: usize = 512;

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
    /// How each row's products accumulate in f32: as llama.cpp computes the row when it
    /// evaluates the whole prompt in batches of [`LLAMA_CPP_UBATCH`] and each generated token
    /// on its own (see [`RowOrder`]). Marking rows by what they are (not by how many share the
    /// step) keeps results the same however herd splits a prompt over steps.
    pub order: Vec<RowOrder>,
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
        self.order.clear();
    }

    /// Add one generated token of sequence `seq` at `pos`.
    pub fn push(&mut self, seq: SeqId, token: u32, pos: usize, want_logits: bool) {
        self.push_row(seq, token, pos, want_logits, 0..0);
    }

    /// Add the token at `pos` of sequence `seq`. `prompt` is the span of positions evaluated as
    /// one prompt (llama.cpp: one `llama_decode` call) that the row belongs to, if it does: a
    /// sequence's prompt less any prefix its cache already held, or a later chat turn's new
    /// tokens; a generated token passes an empty span. See [`Batch::order`].
    pub fn push_row(
        &mut self,
        seq: SeqId,
        token: u32,
        pos: usize,
        want_logits: bool,
        prompt: Range<usize>,
    ) {
        self.tokens.push(token);
        self.positions.push(pos);
        self.seq_ids.push(seq);
        self.logits.push(want_logits);
        self.order.push(if prompt.contains(&pos) {
            // llama.cpp splits a prompt into batches of LLAMA_CPP_UBATCH rows.
            let i = pos - prompt.start;
            let first = i / LLAMA_CPP_UBATCH * LLAMA_CPP_UBATCH;
            RowOrder::in_batch(i - first, (prompt.len() - first).min(LLAMA_CPP_UBATCH))
        } else {
            RowOrder::SINGLE
        });
    }

    /// Add prompt tokens of sequence `seq` from `start_pos`, evaluated as one prompt (see
    /// [`Batch::push_row`]), with logits for the last one (or for all).
    pub fn push_sequence(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
        start_pos: usize,
        all_logits: bool,
    ) {
        let span = start_pos..start_pos + tokens.len();
        for (i, &t) in tokens.iter().enumerate() {
            let last = i + 1 == tokens.len();
            self.push_row(seq, t, start_pos + i, all_logits || last, span.clone());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn orders(prompt_len: usize, chunks: &[usize]) -> Vec<RowOrder> {
        // The prompt pushed in steps of the given sizes, then two generated tokens.
        let mut b = Batch::new();
        let mut pos = 0;
        for &n in chunks {
            for _ in 0..n {
                b.push_row(0, 1, pos, false, 0..prompt_len);
                pos += 1;
            }
        }
        b.push(0, 1, pos, true);
        b.push(0, 1, pos + 1, true);
        b.order
    }

    /// A row's order is llama.cpp's for the batch it would compute the row in (the prompt in
    /// batches of 512, each generated token alone), however herd splits the prompt.
    #[test]
    fn row_orders_follow_llama_cpp_batches() {
        let o = orders(10, &[10]);
        assert_eq!(o, orders(10, &[3, 1, 6]));
        assert!(o[..8].iter().all(|r| r.grouped && r.tiled && r.batched));
        assert!(o[8..10].iter().all(|r| !r.grouped && r.tiled && r.batched));
        assert_eq!(o[10..], [RowOrder::SINGLE; 2]);
        // Six rows: groups of four, no tiled product (fewer than eight rows).
        let o = orders(6, &[6]);
        assert!(o[..4].iter().all(|r| r.grouped && !r.tiled && r.batched));
        assert!(!o[4].grouped && !o[5].tiled && o[5].batched);
        // A one-token prompt is a row alone.
        assert_eq!(orders(1, &[1])[0], RowOrder::SINGLE);
        // 513 tokens: a full batch of 512, then one row alone.
        let o = orders(513, &[300, 213]);
        assert!(o[..512].iter().all(|r| r.grouped && r.tiled));
        assert_eq!(o[512], RowOrder::SINGLE);
        // 522: the second batch holds 10 rows.
        let o = orders(522, &[522]);
        assert_eq!(o[512..522], orders(10, &[10])[..10]);
        // A span that starts later (a reused prefix, a chat turn) counts from its start.
        let mut b = Batch::new();
        b.push_sequence(0, &[1; 6], 100, false);
        assert_eq!(b.order, orders(6, &[6])[..6]);
    }
}
