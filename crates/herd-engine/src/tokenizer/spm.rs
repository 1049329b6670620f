//! SentencePiece-style tokenization from a GGUF vocabulary (`tokenizer.ggml.model = "llama"`,
//! as Gemma uses), the way llama.cpp does it: spaces become `▁`, the text is split into UTF-8
//! characters, adjacent pairs are merged best score first (leftmost on ties) while the merged
//! text is a token, and pieces that are not tokens fall back to `<0xXX>` byte tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

pub(crate) struct Spm<'a> {
    pub token_to_id: &'a HashMap<String, u32>,
    pub scores: &'a [f32],
    pub byte_tokens: &'a [Option<u32>; 256],
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: isize,
    next: isize,
}

struct Bigram {
    left: usize,
    right: usize,
    score: f32,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}

impl Spm<'_> {
    /// Tokenize already-escaped text (spaces replaced by `▁`).
    pub fn tokenize(&self, text: &str, out: &mut Vec<u32>) {
        let mut symbols: Vec<Symbol> = Vec::new();
        for (i, (start, ch)) in text.char_indices().enumerate() {
            let len = ch.len_utf8();
            let next = if start + len == text.len() {
                -1
            } else {
                i as isize + 1
            };
            symbols.push(Symbol {
                start,
                len,
                prev: i as isize - 1,
                next,
            });
        }
        let mut queue = BinaryHeap::new();
        let mut rev_merge: HashMap<&str, (usize, usize)> = HashMap::new();
        let try_add = |queue: &mut BinaryHeap<Bigram>,
                       rev: &mut HashMap<_, _>,
                       symbols: &[Symbol],
                       l: isize,
                       r: isize| {
            if l < 0 || r < 0 {
                return;
            }
            let (l, r) = (l as usize, r as usize);
            let piece = &text[symbols[l].start..symbols[l].start + symbols[l].len + symbols[r].len];
            if let Some(&id) = self.token_to_id.get(piece)
                && let Some(&score) = self.scores.get(id as usize)
            {
                queue.push(Bigram {
                    left: l,
                    right: r,
                    score,
                    size: piece.len(),
                });
                rev.insert(piece, (l, r));
            }
        };
        for i in 1..symbols.len() {
            try_add(
                &mut queue,
                &mut rev_merge,
                &symbols,
                i as isize - 1,
                i as isize,
            );
        }
        while let Some(b) = queue.pop() {
            let (l, r) = (symbols[b.left], symbols[b.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
                continue;
            }
            symbols[b.left].len += r.len;
            symbols[b.right].len = 0;
            symbols[b.left].next = r.next;
            if r.next >= 0 {
                symbols[r.next as usize].prev = b.left as isize;
            }
            let (prev, next) = (symbols[b.left].prev, symbols[b.left].next);
            try_add(&mut queue, &mut rev_merge, &symbols, prev, b.left as isize);
            try_add(&mut queue, &mut rev_merge, &symbols, b.left as isize, next);
        }
        let mut i = if symbols.is_empty() { -1 } else { 0 };
        while i >= 0 {
            let s = symbols[i as usize];
            self.resegment(
                text,
                &text[s.start..s.start + s.len],
                &rev_merge,
                &symbols,
                out,
            );
            i = s.next;
        }
    }

    fn resegment(
        &self,
        text: &str,
        piece: &str,
        rev: &HashMap<&str, (usize, usize)>,
        symbols: &[Symbol],
        out: &mut Vec<u32>,
    ) {
        if let Some(&id) = self.token_to_id.get(piece) {
            out.push(id);
            return;
        }
        match rev.get(piece) {
            Some(&(l, r)) => {
                let (sl, sr) = (symbols[l], symbols[r]);
                // The pair's text as it was when merged: left's original extent, then right's.
                let left = &text[sl.start..sr.start];
                let right = &text[sr.start..sl.start + piece.len()];
                self.resegment(text, left, rev, symbols, out);
                self.resegment(text, right, rev, symbols, out);
            }
            None => {
                for b in piece.bytes() {
                    if let Some(id) = self.byte_tokens[b as usize] {
                        out.push(id);
                    }
                }
            }
        }
    }
}
