//! Constrained decoding with llguidance: a grammar (JSON schema, any JSON object, a regular
//! expression or a Lark grammar) compiled against the model's vocabulary gives, at every step,
//! the set of tokens that keep the output inside the grammar. The sampler only ever sees those,
//! so the output is valid by construction; when the grammar is complete only end-of-generation
//! remains allowed.
//!
//! JSON schemas are compiled strictly: a keyword llguidance cannot enforce is an error naming
//! it, never a silently weaker constraint. Unless the schema says otherwise (`x-guidance`),
//! JSON is generated compactly (fixed separators, no free whitespace), which keeps small models
//! from running on in whitespace.

use std::sync::Arc;
use std::time::{Duration, Instant};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, InferenceCapabilities, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::{Error, Result, Tokenizer};

/// What a request constrains its output to.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// A JSON value matching this schema.
    JsonSchema(Value),
    /// Text matching this regular expression.
    Regex(String),
    /// Text derived from this Lark grammar.
    Lark(String),
    /// A JSON array (of tool calls) matching this schema, closed at the first item that
    /// repeats an earlier one: a small model under a forced list goes round in a loop, and
    /// every boundary of the list would let it end there.
    CallList(Value),
}

impl Grammar {
    /// Any JSON object (OpenAI `response_format: {"type": "json_object"}`).
    pub fn json_object() -> Self {
        Grammar::JsonSchema(serde_json::json!({"type": "object"}))
    }
}

/// The largest JSON schema [`ConstraintCompiler::compile`] takes, counted in JSON values
/// (every object, array, string, number, boolean and null; keys not counted): about 5,000
/// properties of `{"type": "integer"}`. Larger is an error before any compilation. llguidance's
/// compile time grows faster than linearly with the property count (release build, 2 vCPUs:
/// 4,500 optional properties 2 s, 9,000 22 s) and it refuses grammars of more than 65,525
/// symbols (about 12,000 such properties).
pub const MAX_SCHEMA_VALUES: usize = 10_000;

/// The most digits of a JSON number's integer part under a JSON grammar: a u64 or an i64 fits
/// (nanosecond timestamps, 64-bit ids). JSON Schema has no way to bound digits, and a small
/// model at temperature 0 writes `0.4000000…` until `max_tokens`: output valid by construction
/// that never ends. The bound only removes the choice to go on: digits the grammar requires
/// (an `enum` or a `minimum` that needs more) are still allowed.
pub const MAX_INTEGER_DIGITS: usize = 20;

/// The most digits of a JSON number's fraction under a JSON grammar (more than an f64 holds).
pub const MAX_FRACTION_DIGITS: usize = 15;

/// The most digits of a JSON number's exponent under a JSON grammar (an f64's reach: 308).
pub const MAX_EXPONENT_DIGITS: usize = 3;

/// The longest regular expression or Lark grammar [`ConstraintCompiler::compile`] takes, in bytes.
pub const MAX_GRAMMAR_BYTES: usize = 256 * 1024;

/// The stack of every thread that compiles or steps a grammar (the compile thread, the
/// scheduler's engine and mask threads). llguidance recurses over the grammar, about one level
/// per optional property: 4,500 of them overflowed a 2 MiB async worker's stack and aborted the
/// process. 256 MiB is a wide margin at [`MAX_SCHEMA_VALUES`] (9,000 properties compile in
/// 1 GiB); the memory is reserved, and only what is used is committed.
pub const GRAMMAR_STACK_BYTES: usize = 256 << 20;

/// A model's vocabulary indexed for llguidance; built once per model.
#[derive(Clone)]
pub struct ConstraintCompiler {
    factory: Arc<ParserFactory>,
    digits: Arc<DigitTokens>,
}

/// What bounding JSON numbers needs of the vocabulary: each token's bytes, and per run length
/// `k` (0..=[`MAX_INTEGER_DIGITS`]) the tokens whose text begins with more than `k` digits.
struct DigitTokens {
    words: Vec<Vec<u8>>,
    longer_than: Vec<llguidance::toktrie::SimpleVob>,
    /// Tokens whose text begins with `]`.
    closing: llguidance::toktrie::SimpleVob,
    /// Tokens that end an object and go on past a comma (`},`, `}}, `): under a call list an
    /// item ends on a token of its own, so that a repeat is seen before the list goes on.
    close_and_continue: llguidance::toktrie::SimpleVob,
}

impl DigitTokens {
    fn new(words: Vec<Vec<u8>>) -> Self {
        let lead: Vec<usize> = words
            .iter()
            .map(|w| w.iter().take_while(|b| b.is_ascii_digit()).count())
            .collect();
        let longer_than = (0..=MAX_INTEGER_DIGITS)
            .map(|k| {
                let mut v = llguidance::toktrie::SimpleVob::alloc(words.len());
                for (id, &n) in lead.iter().enumerate() {
                    if n > k {
                        v.allow_token(id as u32);
                    }
                }
                v
            })
            .collect();
        let mut closing = llguidance::toktrie::SimpleVob::alloc(words.len());
        let mut close_and_continue = llguidance::toktrie::SimpleVob::alloc(words.len());
        for (id, w) in words.iter().enumerate() {
            if w.first() == Some(&b']') {
                closing.allow_token(id as u32);
            }
            if w.windows(2).any(|p| p == b"},") {
                close_and_continue.allow_token(id as u32);
            }
        }
        Self {
            words,
            longer_than,
            closing,
            close_and_continue,
        }
    }
}

/// Whether the bytes of generated JSON stand inside a string (escapes followed).
#[derive(Clone, Copy, Debug, Default)]
struct JsonString {
    inside: bool,
    escaped: bool,
}

impl JsonString {
    /// Take byte `b`: whether it belongs to a string (its content or a quote), not structure.
    fn step(&mut self, b: u8) -> bool {
        if self.inside {
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.inside = false,
                _ => {}
            }
            true
        } else {
            self.inside = b == b'"';
            self.inside
        }
    }
}

/// The items of a generated JSON array completed so far, and whether the last one repeats an
/// earlier one ([`Grammar::CallList`]).
#[derive(Clone, Debug, Default)]
struct RepeatScan {
    depth: usize,
    string: JsonString,
    /// The bytes of the item being generated.
    item: Vec<u8>,
    items: Vec<Value>,
    repeated: bool,
}

impl RepeatScan {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            let before = self.depth;
            if !self.string.step(b) {
                match b {
                    b'[' | b'{' => self.depth += 1,
                    b']' | b'}' => self.depth = self.depth.saturating_sub(1),
                    _ => {}
                }
            }
            if before >= 2 || self.depth >= 2 {
                self.item.push(b);
            }
            if before >= 2 && self.depth == 1 {
                if let Ok(v) = serde_json::from_slice::<Value>(&self.item) {
                    self.repeated |= self.items.contains(&v);
                    self.items.push(v);
                }
                self.item.clear();
            }
            if self.depth == 0 {
                self.repeated = false;
            }
        }
    }
}

/// Where generated JSON stands as far as numbers go: inside a string or not, which part of a
/// number (integer part, fraction, exponent), and how many digits its current run has.
#[derive(Clone, Debug, Default)]
struct NumberScan {
    string: JsonString,
    in_fraction: bool,
    in_exponent: bool,
    run: usize,
}

impl NumberScan {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.string.step(b) {
                (self.in_fraction, self.in_exponent, self.run) = (false, false, 0);
                continue;
            }
            match b {
                b'0'..=b'9' => self.run += 1,
                b'+' | b'-' if self.in_exponent => {}
                b'e' | b'E' => {
                    self.in_exponent = true;
                    self.in_fraction = false;
                    self.run = 0;
                }
                b'.' => {
                    self.in_fraction = true;
                    self.run = 0;
                }
                _ => (self.in_fraction, self.in_exponent, self.run) = (false, false, 0),
            }
        }
    }

    /// How many more digits the current run may take (`None` inside a string).
    fn room(&self) -> Option<usize> {
        let limit = if self.in_exponent {
            MAX_EXPONENT_DIGITS
        } else if self.in_fraction {
            MAX_FRACTION_DIGITS
        } else {
            MAX_INTEGER_DIGITS
        };
        (!self.string.inside).then(|| limit.saturating_sub(self.run))
    }
}

impl std::fmt::Debug for ConstraintCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConstraintCompiler")
    }
}

impl ConstraintCompiler {
    pub fn new(tok: &Tokenizer) -> Result<Self> {
        let eos =
            tok.stop_ids.first().copied().or(tok.eos).ok_or_else(|| {
                Error::Encode("the tokenizer has no end-of-generation token".into())
            })?;
        // Special tokens carry llguidance's marker byte so that no grammar can produce them as text.
        let words: Vec<Vec<u8>> = tok
            .token_bytes()
            .into_iter()
            .map(|(b, special)| {
                if special {
                    let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                    w.extend(b);
                    w
                } else {
                    b
                }
            })
            .collect();
        let info = TokRxInfo::new(words.len() as u32, eos);
        let trie = TokTrie::from(&info, &words);
        let digits = Arc::new(DigitTokens::new(words.clone()));
        let env: llguidance::toktrie::TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new(
            &env,
            InferenceCapabilities::default(),
            &llguidance::earley::SlicedBiasComputer::general_slices(),
        )
        .map_err(|e| Error::Encode(format!("constraint engine: {e}")))?;
        factory.set_stderr_log_level(0);
        Ok(Self {
            factory: Arc::new(factory),
            digits,
        })
    }

    /// Compile a grammar; errors (too large, invalid or unsupported schema, bad regex) name the
    /// problem. The size limits ([`MAX_SCHEMA_VALUES`], [`MAX_GRAMMAR_BYTES`]) are checked
    /// first; compilation then runs on a thread of its own with a large stack (the caller
    /// blocks until it ends: call it off any async runtime), and a panic inside llguidance is
    /// an error, not a crash.
    pub fn compile(&self, grammar: &Grammar) -> std::result::Result<Constraint, String> {
        check_size(grammar)?;
        let (compiler, grammar) = (self.clone(), grammar.clone());
        std::thread::Builder::new()
            .name("herd-grammar".into())
            .stack_size(GRAMMAR_STACK_BYTES)
            .spawn(move || compiler.compile_here(&grammar))
            .map_err(|e| format!("could not start the grammar compiler: {e}"))?
            .join()
            .unwrap_or_else(|_| Err("the grammar compiler failed on this grammar".into()))
            .map_err(|e| client_message(&e))
    }

    /// [`ConstraintCompiler::compile`] on the calling thread's stack.
    fn compile_here(&self, grammar: &Grammar) -> std::result::Result<Constraint, String> {
        let top = match grammar {
            Grammar::JsonSchema(schema) | Grammar::CallList(schema) => {
                let mut schema = schema.clone();
                if let Value::Object(o) = &mut schema
                    && !o.contains_key("x-guidance")
                {
                    o.insert(
                        "x-guidance".into(),
                        serde_json::json!({"whitespace_flexible": false,
                                           "item_separator": ", ", "key_separator": ": "}),
                    );
                } else if !schema.is_object() && !schema.is_boolean() {
                    return Err("a JSON schema must be an object".into());
                }
                TopLevelGrammar::from_json_schema(schema)
            }
            Grammar::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Grammar::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        };
        let parser = self.factory.create_parser(top).map_err(|e| e.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(e);
        }
        // A grammar can compile and still fail at a later step (llguidance's parser limits: a
        // wide object of optional properties overflows a parser row at its second token); the
        // scheduler reports that as the request's grammar failing, and so is a grammar that
        // accepts nothing (a `$ref` cycle), at its first step. The server answers such a
        // failure at the first step with a 400, streaming or not (a constrained stream's
        // headers wait for its first event). Computing the first mask here as a check would
        // cost every constrained request a mask (~170 ms on a 262k vocabulary) in the compile
        // slots, in series with the prefill it now overlaps, and still miss the later steps.
        Ok(Constraint {
            matcher,
            numbers: matches!(grammar, Grammar::JsonSchema(_) | Grammar::CallList(_))
                .then(NumberScan::default),
            repeats: matches!(grammar, Grammar::CallList(_)).then(RepeatScan::default),
            digits: self.digits.clone(),
        })
    }
}

/// An llguidance error as a client may read it. Its errors carry internal detail after the
/// message: the parser's state and grammar (`<state>…</state><grammar>…`), or for a panic
/// caught inside llguidance its backtrace (`panic: … <backtrace>…`). A mask with no token
/// and no end (`NoExtensionBias`) means the grammar's language is empty from there on.
fn client_message(e: &str) -> String {
    if e.contains("NoExtensionBias") {
        return "the grammar accepts no output from here (a schema or rule that only refers to \
                itself, with no way to end)"
            .to_string();
    }
    let end = ["<backtrace>", "<state>"]
        .iter()
        .filter_map(|tag| e.find(tag))
        .min()
        .unwrap_or(e.len());
    let message = e[..end].trim();
    match message.strip_prefix("panic: ") {
        Some(m) => format!("the grammar is beyond the constraint engine's limits ({m})"),
        None => message.to_string(),
    }
}

/// [`MAX_SCHEMA_VALUES`] and [`MAX_GRAMMAR_BYTES`], checked without recursion (also done by
/// [`ConstraintCompiler::compile`]; callers that queue compilations check first).
///
/// # Errors
/// A message saying which limit the grammar exceeds.
pub fn check_size(grammar: &Grammar) -> std::result::Result<(), String> {
    match grammar {
        Grammar::JsonSchema(schema) | Grammar::CallList(schema) => {
            let (mut values, mut pending) = (0usize, vec![schema]);
            while let Some(v) = pending.pop() {
                values += 1;
                if values > MAX_SCHEMA_VALUES {
                    return Err(format!(
                        "the JSON schema is too large: more than {MAX_SCHEMA_VALUES} values"
                    ));
                }
                match v {
                    Value::Object(o) => pending.extend(o.values()),
                    Value::Array(a) => pending.extend(a),
                    _ => {}
                }
            }
            Ok(())
        }
        Grammar::Regex(text) | Grammar::Lark(text) if text.len() > MAX_GRAMMAR_BYTES => Err(
            format!("the grammar is too large: more than {MAX_GRAMMAR_BYTES} bytes"),
        ),
        Grammar::Regex(_) | Grammar::Lark(_) => Ok(()),
    }
}

/// One sequence's grammar state.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
    /// Under a JSON grammar: where the output stands, to bound its numbers' digits.
    numbers: Option<NumberScan>,
    /// Under a [`Grammar::CallList`]: the items so far, to close the list at a repeat.
    repeats: Option<RepeatScan>,
    digits: Arc<DigitTokens>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").finish_non_exhaustive()
    }
}

/// The tokens a constraint allows next, and how long computing that took.
pub struct Mask {
    allowed: llguidance::toktrie::SimpleVob,
    pub elapsed: Duration,
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mask")
            .field("elapsed", &self.elapsed)
            .finish()
    }
}

impl Mask {
    /// Set every logit the mask does not allow to −∞.
    pub fn apply(&self, logits: &mut [f32]) {
        for (i, l) in logits.iter_mut().enumerate() {
            if !self.allowed.is_allowed(i as u32) {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

impl Constraint {
    /// What may come next. It depends only on the tokens committed so far, so the scheduler
    /// computes it on another thread while the forward pass runs; asking twice without a
    /// commit gives the same mask.
    pub fn next_mask(&mut self) -> std::result::Result<Mask, String> {
        let t = Instant::now();
        let mut allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| client_message(&e.to_string()))?;
        // A number whose digit run is at its bound may not take more digits, unless the
        // grammar allows nothing else (a minimum that needs them).
        if let Some(room) = self.numbers.as_ref().and_then(NumberScan::room)
            && let Some(longer) = self.digits.longer_than.get(room)
        {
            let mut bounded = allowed.clone();
            bounded.sub(longer);
            if !bounded.is_zero() {
                allowed = bounded;
            }
        }
        // A list whose last item repeats an earlier one closes now; until then, items end on
        // tokens of their own.
        if let Some(r) = &self.repeats {
            let mut narrowed = allowed.clone();
            if r.repeated {
                narrowed.and(&self.digits.closing);
            } else {
                narrowed.sub(&self.digits.close_and_continue);
            }
            if !narrowed.is_zero() {
                allowed = narrowed;
            }
        }
        Ok(Mask {
            allowed,
            elapsed: t.elapsed(),
        })
    }

    /// Set every logit the grammar does not allow next to −∞.
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> std::result::Result<(), String> {
        self.next_mask()?.apply(logits);
        Ok(())
    }

    /// Advance past the sampled token.
    pub fn commit(&mut self, token: u32) -> std::result::Result<(), String> {
        if let Some(word) = self.digits.words.get(token as usize) {
            if let Some(scan) = &mut self.numbers {
                scan.push(word);
            }
            if let Some(scan) = &mut self.repeats {
                scan.push(word);
            }
        }
        if self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| client_message(&e.to_string()))
    }
}

#[cfg(test)]
mod scan_tests {
    use super::*;

    #[test]
    fn repeat_scan_sees_a_repeated_item() {
        let mut r = RepeatScan::default();
        r.push(br#"[{"name": "time", "parameters": {"zone": "utc"}}, "#);
        assert!(!r.repeated, "{r:?}");
        r.push(br#"{"name": "time", "parameters": {"zone": "utc"}}"#);
        assert!(r.repeated, "{r:?}");
    }
}
