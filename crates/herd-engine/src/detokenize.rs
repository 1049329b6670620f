//! Streaming detokenization: text deltas as tokens arrive, never splitting a UTF-8 character
//! (byte-fallback tokens may carry a fraction of one), and stop strings that may span tokens.

use crate::{Result, Tokenizer};

/// Turns a growing id sequence into text deltas. It decodes a short window of recent ids twice
/// (before and after the newest) and emits the difference, so decoders that depend on context
/// (leading-space stripping, byte fallback) see the same neighbours as a full decode; text that
/// ends in an incomplete character (U+FFFD) is held back until it completes.
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special: bool,
}

impl StreamDecoder {
    pub fn new(skip_special: bool) -> Self {
        Self {
            skip_special,
            ..Self::default()
        }
    }

    /// Add one token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let after = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        if after.len() > before.len() && !after.ends_with('\u{FFFD}') && after.starts_with(&before)
        {
            let delta = after[before.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character at the very end).
    pub fn finish(&mut self, tok: &Tokenizer) -> Result<String> {
        let before = tok.decode(
            &self.ids[self.prefix_offset..self.read_offset],
            self.skip_special,
        )?;
        let after = tok.decode(&self.ids[self.prefix_offset..], self.skip_special)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(after
            .strip_prefix(before.as_str())
            .unwrap_or("")
            .to_string())
    }
}

/// Finds stop strings in streamed text. Text that could be the start of a stop string is held
/// back until it is clearly not one; a match ends the stream with the text before it.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
    /// The stop string that matched, once one has.
    matched: Option<String>,
}

/// What a chunk of streamed text amounts to.
#[derive(Debug, PartialEq, Eq)]
pub enum StopResult {
    /// Text that can be sent now.
    Continue(String),
    /// A stop string matched: send this text, then end.
    Stop(String),
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            matched: None,
        }
    }

    /// The stop string that ended the text, once [`StopMatcher::push`] returned
    /// [`StopResult::Stop`] (the earliest in the text; the first listed of those starting there).
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    pub fn push(&mut self, delta: &str) -> StopResult {
        self.held.push_str(delta);
        if let Some((pos, stop)) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|p| (p, s)))
            .min_by_key(|&(p, _)| p)
        {
            self.matched = Some(stop.clone());
            let out = self.held[..pos].to_string();
            self.held.clear();
            return StopResult::Stop(out);
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for k in (1..s.len()).rev() {
                if k <= self.held.len() && s.is_char_boundary(k) && self.held.ends_with(&s[..k]) {
                    keep = keep.max(k);
                    break;
                }
            }
        }
        let split = self.held.len() - keep;
        let out = self.held[..split].to_string();
        self.held.drain(..split);
        StopResult::Continue(out)
    }

    /// End of stream without a stop: release what was held.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_across_chunks() {
        let mut m = StopMatcher::new(vec!["</end>".into(), "STOP".into()]);
        assert_eq!(m.push("hello </"), StopResult::Continue("hello ".into()));
        assert_eq!(m.push("e"), StopResult::Continue(String::new()));
        assert_eq!(m.matched(), None);
        assert_eq!(m.push("nd> more"), StopResult::Stop("".into()));
        assert_eq!(m.matched(), Some("</end>"));
        let mut m = StopMatcher::new(vec!["STOP".into()]);
        assert_eq!(m.push("aST"), StopResult::Continue("a".into()));
        assert_eq!(m.push("x"), StopResult::Continue("STx".into()));
        assert_eq!(m.push("S"), StopResult::Continue(String::new()));
        assert_eq!(m.finish(), "S");
        let mut m = StopMatcher::new(vec!["é!".into()]);
        assert_eq!(m.push("caf"), StopResult::Continue("caf".into()));
        assert_eq!(m.push("é"), StopResult::Continue(String::new()));
        assert_eq!(m.push("!x"), StopResult::Stop("".into()));
    }
}
