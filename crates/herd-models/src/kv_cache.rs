//! Keys and values of past tokens, per sequence and layer.
//!
//! This is the simple contiguous form: each sequence's entries for a layer are stored in position
//! order (entry `p` is position `p`). The paged, prefix-sharing cache of the server issue replaces
//! the storage behind the same questions: how long is a sequence, append, read a range.

use std::collections::HashMap;

use crate::{Batch, Error, Result, SeqId};

#[derive(Debug, Default)]
struct LayerKv {
    k: Vec<f32>,
    v: Vec<f32>,
}

#[derive(Debug)]
pub struct KvCache {
    n_layers: usize,
    /// Floats per token per layer for K (and for V): kv_heads × head_dim.
    kv_dim: usize,
    seqs: HashMap<SeqId, Vec<LayerKv>>,
}

impl KvCache {
    pub fn new(n_layers: usize, kv_dim: usize) -> Self {
        Self {
            n_layers,
            kv_dim,
            seqs: HashMap::new(),
        }
    }

    /// Tokens cached for `seq` (0 if unknown).
    pub fn seq_len(&self, seq: SeqId) -> usize {
        self.seqs
            .get(&seq)
            .map_or(0, |layers| layers[self.n_layers - 1].k.len() / self.kv_dim)
    }

    /// Forget a sequence.
    pub fn remove(&mut self, seq: SeqId) {
        self.seqs.remove(&seq);
    }

    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Check that every sequence's tokens in `batch` continue its cache without gaps.
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

    /// Append one token's key and value for `layer`.
    pub(crate) fn append(&mut self, seq: SeqId, layer: usize, k: &[f32], v: &[f32]) {
        debug_assert!(k.len() == self.kv_dim && v.len() == self.kv_dim);
        let n_layers = self.n_layers;
        let entry = &mut self
            .seqs
            .entry(seq)
            .or_insert_with(|| (0..n_layers).map(|_| LayerKv::default()).collect())[layer];
        entry.k.extend_from_slice(k);
        entry.v.extend_from_slice(v);
    }

    /// Keys and values of positions `start..=end` of `seq` in `layer`, `[n, kv_dim]` each.
    pub(crate) fn range(
        &self,
        seq: SeqId,
        layer: usize,
        start: usize,
        end: usize,
    ) -> (&[f32], &[f32]) {
        let l = &self.seqs[&seq][layer];
        let r = start * self.kv_dim..(end + 1) * self.kv_dim;
        (&l.k[r.clone()], &l.v[r])
    }
}
