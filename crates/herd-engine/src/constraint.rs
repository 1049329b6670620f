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
}

impl Grammar {
    /// Any JSON object (OpenAI `response_format: {"type": "json_object"}`).
    pub fn json_object() -> Self {
        Grammar::JsonSchema(serde_json::json!({"type": "object"}))
    }
}

/// A model's vocabulary indexed for llguidance; built once per model.
pub struct ConstraintCompiler {
    factory: Arc<ParserFactory>,
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
        })
    }

    /// Compile a grammar; errors (invalid or unsupported schema, bad regex) name the problem.
    pub fn compile(&self, grammar: &Grammar) -> std::result::Result<Constraint, String> {
        let top = match grammar {
            Grammar::JsonSchema(schema) => {
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
        Ok(Constraint { matcher })
    }
}

/// One sequence's grammar state.
#[derive(Clone)]
pub struct Constraint {
    matcher: Matcher,
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
        let allowed = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| e.to_string())?;
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
        if self.matcher.is_stopped() {
            return Ok(());
        }
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }
}
