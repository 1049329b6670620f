//! One sequence's generation loop: prefill the prompt, then sample token by token until an end
//! token, a stop string or the token limit, streaming text as it completes.

use std::time::{Duration, Instant};

use herd_models::{Batch, CausalLm, KvCache};

use crate::detokenize::{StopMatcher, StopResult, StreamDecoder};
use crate::sampler::{Sampled, Sampler, SamplingParams};
use crate::{Error, Result, Tokenizer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// The token limit.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
}

#[derive(Debug)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<Sampled>,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Generate for one request, calling `on_text` with each new piece of text, with a KV cache of
/// the default element type (f16).
pub fn generate(
    model: &dyn CausalLm,
    tok: &Tokenizer,
    req: &Request,
    on_text: impl FnMut(&str),
) -> Result<Generation> {
    generate_in(model.new_cache(), model, tok, req, on_text)
}

/// [`generate`] in the given (empty) KV cache, e.g. one of another element type
/// ([`CausalLm::new_cache_of`]).
pub fn generate_in(
    mut cache: KvCache,
    model: &dyn CausalLm,
    tok: &Tokenizer,
    req: &Request,
    mut on_text: impl FnMut(&str),
) -> Result<Generation> {
    if req.prompt.is_empty() {
        return Err(Error::Encode("the prompt is empty".into()));
    }
    let mut sampler = Sampler::new(req.sampling.clone(), &req.prompt);
    let mut decoder = StreamDecoder::new(true);
    let mut stops = StopMatcher::new(req.stop.clone());
    let (mut text, mut tokens) = (String::new(), Vec::new());
    let vocab = model.vocab_size();

    let t0 = Instant::now();
    let mut batch = Batch::new();
    batch.push_sequence(0, &req.prompt, 0, false);
    let mut logits = model
        .forward(&batch, &mut cache, None)
        .map_err(|e| Error::Encode(e.to_string()))?;
    let prefill_time = t0.elapsed();
    let t1 = Instant::now();
    let mut finish = FinishReason::Length;
    // Whether a stop string ended the text (else held-back text is released at the end).
    let mut stopped_by_string = false;
    while tokens.len() < req.max_tokens {
        let s = sampler.sample(&mut logits[..vocab]);
        let token = s.token;
        tokens.push(s);
        if tok.stop_ids.contains(&token) {
            finish = FinishReason::Stop;
            break;
        }
        let delta = decoder.push(tok, token)?;
        match stops.push(&delta) {
            StopResult::Continue(out) => {
                on_text(&out);
                text.push_str(&out);
            }
            StopResult::Stop(out) => {
                on_text(&out);
                text.push_str(&out);
                finish = FinishReason::Stop;
                stopped_by_string = true;
                break;
            }
        }
        if tokens.len() == req.max_tokens {
            break;
        }
        // One batch and one logits buffer for every step: the model step allocates nothing.
        batch.clear();
        batch.push(0, token, req.prompt.len() + tokens.len() - 1, true);
        model
            .forward_into(&batch, &mut cache, None, &mut logits)
            .map_err(|e| Error::Encode(e.to_string()))?;
    }
    if !stopped_by_string {
        let rest = decoder.finish(tok)?;
        let out = match stops.push(&rest) {
            StopResult::Continue(out) => out + &stops.finish(),
            StopResult::Stop(out) => out,
        };
        on_text(&out);
        text.push_str(&out);
    }
    Ok(Generation {
        text,
        tokens,
        finish_reason: finish,
        prompt_tokens: req.prompt.len(),
        prefill_time,
        decode_time: t1.elapsed(),
    })
}
