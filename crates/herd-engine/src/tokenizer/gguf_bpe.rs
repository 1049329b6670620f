//! A byte-level BPE tokenizer (GPT-2 style, llama.cpp's `gpt2` model) rebuilt from a GGUF
//! vocabulary and merge list, with the pre-tokenizer named by `tokenizer.ggml.pre`.

use std::collections::HashMap;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use super::TokenType;

/// Llama 3's pre-tokenizer split (its tokenizer.json; llama.cpp's `llama-bpe`).
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o's (o200k) split, which Llama 4 uses.
const GPT4O: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-2's split.
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// The split regex and whether whole pre-tokens found in the vocabulary skip the merges
/// (llama.cpp's `ignore_merges`), by `tokenizer.ggml.pre`.
fn pre_tokenizer(pre: &str) -> Result<(&'static str, bool), String> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" => Ok((LLAMA3, true)),
        "gpt-4o" | "llama4" => Ok((GPT4O, false)),
        "default" | "gpt2" => Ok((GPT2, false)),
        other => Err(format!(
            "pre-tokenizer {other:?} is not supported (llama-bpe, llama4, gpt-4o, gpt2 are)"
        )),
    }
}

pub(super) fn build(
    tokens: &[String],
    types: &[TokenType],
    merges: &[String],
    pre: &str,
) -> Result<Tokenizer, String> {
    let (pattern, ignore_merges) = pre_tokenizer(pre)?;
    let mut first_id = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        first_id.entry(t.clone()).or_insert(i as u32);
    }
    let vocab: tokenizers::models::bpe::Vocab = first_id.into_iter().collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("bad merge {m:?}"))
        })
        .collect::<Result<_, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| e.to_string())?;
    let mut tok = Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(pattern.into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| e.to_string())?;
    tok.with_pre_tokenizer(Some(Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, false)),
    ])));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(t, ty)| {
            matches!(ty, TokenType::Control | TokenType::UserDefined) && !t.is_empty()
        })
        .map(|(t, ty)| AddedToken::from(t.clone(), *ty == TokenType::Control))
        .collect();
    tok.add_special_tokens(&specials);
    Ok(tok)
}
