//! Text ↔ token ids, from a Hugging Face `tokenizer.json` (through the `tokenizers` crate) or
//! from the vocabulary embedded in a GGUF file (byte-level BPE like llama.cpp's `gpt2` model, or
//! SentencePiece-style like its `llama` model), with the special-token facts generation needs.

mod gguf_bpe;
mod spm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use herd_formats::GgufFile;
use herd_formats::gguf::Value;

use crate::{Error, Result};

/// GGUF `tokenizer.ggml.token_type` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_gguf(v: i64) -> TokenType {
        match v {
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Normal,
        }
    }
}

enum Backend {
    Hf(Box<tokenizers::Tokenizer>),
    Spm(Box<SpmVocab>),
}

/// A GGUF SentencePiece vocabulary.
struct SpmVocab {
    tokens: Vec<String>,
    types: Vec<TokenType>,
    scores: Vec<f32>,
    token_to_id: HashMap<String, u32>,
    byte_tokens: [Option<u32>; 256],
    /// Control and user-defined tokens, longest first (lowest id first among equal texts):
    /// matched in the text before SPM runs.
    specials: Vec<(String, u32, TokenType)>,
    /// Finds `specials` in one pass over the text, leftmost then longest (pattern `i` is
    /// `specials[i]`): linear in the text, where searching the rest of the text for every
    /// special token after each hit was quadratic.
    special_matcher: aho_corasick::AhoCorasick,
    add_space_prefix: bool,
}

pub struct Tokenizer {
    backend: Backend,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Ids that end a generated turn (EOS, end-of-turn, end-of-message, …).
    pub stop_ids: Vec<u32>,
    pub pad: Option<u32>,
    /// Whether encoding with special tokens prepends BOS.
    pub add_bos: bool,
    /// The chat template shipped with the tokenizer, if any.
    pub chat_template: Option<String>,
    source: PathBuf,
    /// Built on first use by [`Tokenizer::encode_prompt_guarded`].
    guards: Guards,
}

/// What encoding text as text only needs (built on first use: most prompts never do).
#[derive(Default)]
struct Guards {
    /// Finds the text of every special token, leftmost then longest.
    special_texts: std::sync::OnceLock<aho_corasick::AhoCorasick>,
    /// The Hugging Face tokenizer with special-token matching off.
    plain_hf: std::sync::OnceLock<tokenizers::Tokenizer>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tokenizer({}, vocab {})",
            self.source.display(),
            self.vocab_size()
        )
    }
}

fn json_token_id(tok: &tokenizers::Tokenizer, v: Option<&serde_json::Value>) -> Option<u32> {
    match v? {
        serde_json::Value::String(s) => tok.token_to_id(s),
        serde_json::Value::Object(o) => tok.token_to_id(o.get("content")?.as_str()?),
        serde_json::Value::Number(n) => n.as_u64().map(|n| n as u32),
        _ => None,
    }
}

impl Tokenizer {
    /// From a Hugging Face directory: `tokenizer.json`, plus `tokenizer_config.json` (special
    /// tokens, BOS policy, chat template) and `generation_config.json` / `config.json` (stop ids).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bad = |reason: String| Error::Tokenizer {
            path: path.clone(),
            reason,
        };
        let bytes = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
        let tok = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?;
        let read = |name: &str| -> Option<serde_json::Value> {
            std::fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
        };
        let tc = read("tokenizer_config.json").unwrap_or(serde_json::Value::Null);
        let bos = json_token_id(&tok, tc.get("bos_token"));
        let eos = json_token_id(&tok, tc.get("eos_token"));
        let pad = json_token_id(&tok, tc.get("pad_token"));
        // Does the post-processor add BOS? Ask it rather than trust a flag.
        let add_bos = match (bos, tok.encode("a", true)) {
            (Some(b), Ok(enc)) => enc.get_ids().first() == Some(&b),
            _ => false,
        };
        let mut stop_ids: Vec<u32> = eos.into_iter().collect();
        for name in ["generation_config.json", "config.json"] {
            if let Some(v) = read(name) {
                let v = v.get("text_config").cloned().unwrap_or(v);
                match v.get("eos_token_id") {
                    Some(serde_json::Value::Array(a)) => {
                        stop_ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                    }
                    Some(x) => stop_ids.extend(x.as_u64().map(|x| x as u32)),
                    None => {}
                }
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let chat_template = match tc.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: the default one.
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(str::to_owned)),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        Ok(Self {
            backend: Backend::Hf(Box::new(tok)),
            bos,
            eos,
            stop_ids,
            pad,
            add_bos,
            chat_template,
            source: path,
            guards: Guards::default(),
        })
    }

    /// From the vocabulary embedded in a GGUF file.
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let path = f.path.clone();
        let bad = |reason: String| Error::Tokenizer {
            path: path.clone(),
            reason,
        };
        let model = f
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no tokenizer.ggml.model".into()))?;
        let tokens: Vec<String> = match f.get("tokenizer.ggml.tokens").and_then(Value::as_array) {
            Some(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_str()
                        .map(str::to_owned)
                        .ok_or_else(|| bad(format!("token {i} is not valid UTF-8")))
                })
                .collect::<Result<_>>()?,
            None => return Err(bad("no tokenizer.ggml.tokens".into())),
        };
        let types: Vec<TokenType> =
            match f.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
                Some(items) => items
                    .iter()
                    .map(|v| TokenType::from_gguf(v.as_i64().unwrap_or(1)))
                    .collect(),
                None => vec![TokenType::Normal; tokens.len()],
            };
        if types.len() != tokens.len() {
            return Err(bad(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        let n = tokens.len() as u64;
        let id = |key: &str| -> Result<Option<u32>> {
            match f.get(key).and_then(Value::as_u64) {
                Some(v) if v < n => Ok(Some(v as u32)),
                Some(v) => Err(bad(format!("{key} = {v} is outside the vocabulary ({n})"))),
                None => Ok(None),
            }
        };
        let (bos, eos, pad) = (
            id("tokenizer.ggml.bos_token_id")?,
            id("tokenizer.ggml.eos_token_id")?,
            id("tokenizer.ggml.padding_token_id")?,
        );
        let mut stop_ids: Vec<u32> = [
            eos,
            id("tokenizer.ggml.eot_token_id")?,
            id("tokenizer.ggml.eom_token_id")?,
        ]
        .into_iter()
        .flatten()
        .collect();
        // Files often omit the end-of-turn id; like llama.cpp, recognise the usual markers.
        const TURN_ENDS: [&str; 7] = [
            "<|eot_id|>",
            "<|eot|>",
            "<|eom|>",
            "<end_of_turn>",
            "<|im_end|>",
            "<|end|>",
            "<|endoftext|>",
        ];
        for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            if matches!(ty, TokenType::Control | TokenType::UserDefined)
                && TURN_ENDS.contains(&t.as_str())
            {
                stop_ids.push(i as u32);
            }
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        let flag = |key: &str| f.get(key).and_then(Value::as_bool);
        let chat_template = f
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_owned);
        let backend = match model {
            "gpt2" => {
                let merges: Vec<String> = f
                    .get("tokenizer.ggml.merges")
                    .and_then(Value::as_array)
                    .map(|m| {
                        m.iter()
                            .filter_map(|v| v.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                let pre = f
                    .get("tokenizer.ggml.pre")
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                Backend::Hf(Box::new(
                    gguf_bpe::build(&tokens, &types, &merges, pre).map_err(bad)?,
                ))
            }
            "llama" => {
                let scores: Vec<f32> =
                    match f.get("tokenizer.ggml.scores").and_then(Value::as_array) {
                        Some(items) => items
                            .iter()
                            .map(|v| v.as_f64().unwrap_or(0.0) as f32)
                            .collect(),
                        None => vec![0.0; tokens.len()],
                    };
                let mut token_to_id = HashMap::with_capacity(tokens.len());
                let mut byte_tokens = [None; 256];
                let mut specials = Vec::new();
                for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
                    token_to_id.entry(t.clone()).or_insert(i as u32);
                    match ty {
                        TokenType::Byte => {
                            if let Some(b) = t
                                .strip_prefix("<0x")
                                .and_then(|h| h.strip_suffix('>'))
                                .and_then(|h| u8::from_str_radix(h, 16).ok())
                            {
                                byte_tokens[b as usize] = Some(i as u32);
                            }
                        }
                        TokenType::Control | TokenType::UserDefined if !t.is_empty() => {
                            specials.push((t.clone(), i as u32, *ty))
                        }
                        _ => {}
                    }
                }
                specials.sort_by(|a, b| {
                    (std::cmp::Reverse(a.0.len()), &a.0, a.1).cmp(&(
                        std::cmp::Reverse(b.0.len()),
                        &b.0,
                        b.1,
                    ))
                });
                specials.dedup_by(|later, first| later.0 == first.0);
                let special_matcher = aho_corasick::AhoCorasick::builder()
                    .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                    .build(specials.iter().map(|(t, _, _)| t.as_str()))
                    .map_err(|e| bad(format!("indexing the special tokens: {e}")))?;
                Backend::Spm(Box::new(SpmVocab {
                    tokens,
                    types,
                    scores,
                    token_to_id,
                    byte_tokens,
                    specials,
                    special_matcher,
                    add_space_prefix: flag("tokenizer.ggml.add_space_prefix").unwrap_or(true),
                }))
            }
            other => {
                return Err(bad(format!(
                    "tokenizer model {other:?} is not supported (gpt2 and llama are)"
                )));
            }
        };
        let add_bos =
            flag("tokenizer.ggml.add_bos_token").unwrap_or(bos.is_some() && model == "llama");
        Ok(Self {
            backend,
            bos,
            eos,
            stop_ids,
            pad,
            add_bos,
            chat_template,
            source: path,
            guards: Guards::default(),
        })
    }

    pub fn vocab_size(&self) -> usize {
        match &self.backend {
            Backend::Hf(t) => t.get_vocab_size(true),
            Backend::Spm(v) => v.tokens.len(),
        }
    }

    /// The id of a token given by its text (e.g. `<|eot|>`).
    pub fn token_id(&self, text: &str) -> Result<u32> {
        let id = match &self.backend {
            Backend::Hf(t) => t.token_to_id(text),
            Backend::Spm(v) => v.token_to_id.get(text).copied(),
        };
        id.ok_or_else(|| Error::Encode(format!("unknown token {text:?}")))
    }

    /// The text of a token id, if it exists.
    pub fn token_text(&self, id: u32) -> Option<String> {
        match &self.backend {
            Backend::Hf(t) => t.id_to_token(id),
            Backend::Spm(v) => v.tokens.get(id as usize).cloned(),
        }
    }

    /// Encode `text`; special-token text in it (`<|eot|>`) becomes the special token. With
    /// `add_special`, BOS is prepended when the tokenizer adds one.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Hf(t) => {
                // GGUF-built tokenizers have no post-processor; add BOS ourselves there.
                let has_post = t.get_post_processor().is_some();
                let enc = t
                    .encode(text, add_special && has_post)
                    .map_err(|e| Error::Encode(e.to_string()))?;
                let mut ids = enc.get_ids().to_vec();
                if add_special && !has_post && self.add_bos {
                    ids.insert(
                        0,
                        self.bos.ok_or_else(|| {
                            Error::Encode("tokenizer adds BOS but has no BOS id".into())
                        })?,
                    );
                }
                Ok(ids)
            }
            Backend::Spm(v) => {
                let mut out = Vec::new();
                if add_special && self.add_bos {
                    out.push(self.bos.ok_or_else(|| {
                        Error::Encode("tokenizer adds BOS but has no BOS id".into())
                    })?);
                }
                v.encode(text, &mut out);
                Ok(out)
            }
        }
    }

    /// Encode a rendered chat prompt: special tokens parsed, BOS added only if the template did
    /// not already write it (so it is never doubled).
    pub fn encode_prompt(&self, rendered: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(rendered, false)?;
        if self.add_bos
            && let Some(bos) = self.bos
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// [`encode_prompt`](Self::encode_prompt) for a rendered chat prompt whose byte ranges
    /// `text_only` (the messages' contents, sorted, disjoint) must stay text: special-token
    /// text inside them (`<end_of_turn>` in a user's message) is encoded as the characters it
    /// is made of, never as the special token, so no message can forge a turn. Special tokens
    /// elsewhere (the template's own markers) are parsed. A prompt with no special-token text
    /// inside those ranges is encoded exactly as by `encode_prompt`; otherwise the text is
    /// split around each such occurrence, which may tokenize the characters next to it
    /// differently than a whole-text encoding would.
    pub fn encode_prompt_guarded(
        &self,
        rendered: &str,
        text_only: &[std::ops::Range<usize>],
    ) -> Result<Vec<u32>> {
        // The ranges are sorted: the first that ends after `start` is the only candidate.
        let inside = |start: usize, end: usize| {
            let i = text_only.partition_point(|r| r.end <= start);
            text_only.get(i).is_some_and(|r| r.start < end)
        };
        let mut forged: Vec<(usize, usize)> = Vec::new();
        for m in self.special_texts().find_iter(rendered) {
            if !inside(m.start(), m.end()) {
                continue;
            }
            // Adjacent forged texts are encoded as one piece.
            match forged.last_mut() {
                Some(last) if last.1 == m.start() => last.1 = m.end(),
                _ => forged.push((m.start(), m.end())),
            }
        }
        if forged.is_empty() {
            return self.encode_prompt(rendered);
        }
        let mut ids = Vec::new();
        let mut at = 0;
        for (a, b) in forged {
            ids.extend(self.encode(&rendered[at..a], false)?);
            ids.extend(self.encode_text_only(&rendered[a..b])?);
            at = b;
        }
        ids.extend(self.encode(&rendered[at..], false)?);
        if self.add_bos
            && let Some(bos) = self.bos
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Whether `text` holds the text of a special token (which encoding would parse as it).
    pub fn contains_special_text(&self, text: &str) -> bool {
        self.special_texts().is_match(text)
    }

    /// How many special-token texts `text` holds.
    pub fn special_text_count(&self, text: &str) -> usize {
        self.special_texts().find_iter(text).count()
    }

    /// The texts of the special tokens (control tokens of a GGUF vocabulary; added special
    /// tokens of a Hugging Face one), found leftmost-longest. User-defined tokens (Gemma's runs
    /// of spaces, `<b>`) are not: they are text, matched as single tokens in messages too, as
    /// llama.cpp and Hugging Face do.
    fn special_texts(&self) -> &aho_corasick::AhoCorasick {
        self.guards.special_texts.get_or_init(|| {
            let texts: Vec<String> = match &self.backend {
                Backend::Spm(v) => v
                    .specials
                    .iter()
                    .filter(|(_, _, ty)| *ty == TokenType::Control)
                    .map(|(t, _, _)| t.clone())
                    .collect(),
                Backend::Hf(t) => t
                    .get_added_tokens_decoder()
                    .values()
                    .filter(|a| a.special && !a.content.is_empty())
                    .map(|a| a.content.clone())
                    .collect(),
            };
            aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(&texts)
                .unwrap_or_else(|e| {
                    // Not expected (the same texts build the GGUF matcher); without it, message
                    // text is not guarded, which is said.
                    tracing::error!(error = %e, "indexing special-token texts failed: message text is not guarded");
                    aho_corasick::AhoCorasick::new(Vec::<String>::new()).expect("empty matcher")
                })
        })
    }

    /// `text` encoded with no special-token matching (and no BOS).
    fn encode_text_only(&self, text: &str) -> Result<Vec<u32>> {
        match &self.backend {
            Backend::Spm(v) => {
                let mut out = Vec::new();
                v.encode_plain(text, &mut out);
                Ok(out)
            }
            Backend::Hf(t) => {
                let plain = self.guards.plain_hf.get_or_init(|| {
                    let mut plain = (**t).clone();
                    plain.set_encode_special_tokens(true);
                    plain
                });
                Ok(plain
                    .encode(text, false)
                    .map_err(|e| Error::Encode(e.to_string()))?
                    .get_ids()
                    .to_vec())
            }
        }
    }

    /// Decode ids to text (special tokens dropped when `skip_special`).
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &self.backend {
            Backend::Hf(t) => t
                .decode(ids, skip_special)
                .map_err(|e| Error::Encode(e.to_string())),
            Backend::Spm(v) => Ok(v.decode(ids, skip_special)),
        }
    }

    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Every token's bytes as it adds them to text (no leading-space stripping), and whether it
    /// is a special token (control, unknown, unused, added special) that text never contains.
    /// Constrained decoding matches grammars against these bytes.
    pub fn token_bytes(&self) -> Vec<(Vec<u8>, bool)> {
        match &self.backend {
            Backend::Spm(v) => v
                .tokens
                .iter()
                .zip(&v.types)
                .map(|(t, ty)| match ty {
                    TokenType::Byte => (byte_token(t).map(|b| vec![b]).unwrap_or_default(), false),
                    TokenType::Control | TokenType::Unknown | TokenType::Unused => {
                        (t.as_bytes().to_vec(), true)
                    }
                    _ => (t.replace('\u{2581}', " ").into_bytes(), false),
                })
                .collect(),
            Backend::Hf(t) => {
                let byte_level = matches!(
                    t.get_decoder(),
                    Some(tokenizers::DecoderWrapper::ByteLevel(_))
                );
                let specials: std::collections::HashSet<u32> = t
                    .get_added_tokens_decoder()
                    .iter()
                    .filter(|(_, a)| a.special)
                    .map(|(&id, _)| id)
                    .collect();
                let unbyte = gpt2_unicode_to_byte();
                (0..t.get_vocab_size(true) as u32)
                    .map(|id| {
                        let text = t.id_to_token(id).unwrap_or_default();
                        if specials.contains(&id) {
                            return (text.into_bytes(), true);
                        }
                        if byte_level {
                            if let Some(bytes) =
                                text.chars().map(|c| unbyte.get(&c).copied()).collect()
                            {
                                return (bytes, false);
                            }
                            return (text.into_bytes(), false);
                        }
                        match byte_token(&text) {
                            Some(b) => (vec![b], false),
                            None => (text.replace('\u{2581}', " ").into_bytes(), false),
                        }
                    })
                    .collect()
            }
        }
    }
}

/// `<0xAB>` → 0xAB (SentencePiece byte-fallback tokens).
fn byte_token(t: &str) -> Option<u8> {
    t.strip_prefix("<0x")
        .and_then(|h| h.strip_suffix('>'))
        .and_then(|h| u8::from_str_radix(h, 16).ok())
}

/// GPT-2's byte-level alphabet, reversed: printable bytes stand for themselves, the others for
/// code points from 256 on, in byte order.
fn gpt2_unicode_to_byte() -> HashMap<char, u8> {
    let mut map = HashMap::with_capacity(256);
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("valid code point");
            next += 1;
            c
        };
        map.insert(c, b);
    }
    map
}

impl SpmVocab {
    /// `text` as SentencePiece pieces only: no special tokens, no space prefix (it continues
    /// text).
    fn encode_plain(&self, text: &str, out: &mut Vec<u32>) {
        let spm = spm::Spm {
            token_to_id: &self.token_to_id,
            scores: &self.scores,
            byte_tokens: &self.byte_tokens,
        };
        spm.tokenize(&text.replace(' ', "\u{2581}"), out);
    }

    fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let spm = spm::Spm {
            token_to_id: &self.token_to_id,
            scores: &self.scores,
            byte_tokens: &self.byte_tokens,
        };
        let raw = |raw: &str, out: &mut Vec<u32>| {
            if raw.is_empty() {
                return;
            }
            // Raw text always starts the input or follows a special token: llama.cpp prefixes
            // a space there when the vocabulary asks for it.
            let mut piece = String::with_capacity(raw.len() + 3);
            if self.add_space_prefix {
                piece.push(' ');
            }
            piece.push_str(raw);
            spm.tokenize(&piece.replace(' ', "\u{2581}"), out);
        };
        // Special tokens split the text: at each position the earliest, longest on ties.
        let mut at = 0;
        for hit in self.special_matcher.find_iter(text) {
            raw(&text[at..hit.start()], out);
            out.push(self.specials[hit.pattern().as_usize()].1);
            at = hit.end();
        }
        raw(&text[at..], out);
    }

    fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(t) = self.tokens.get(id as usize) else {
                continue;
            };
            match self.types[id as usize] {
                TokenType::Byte => bytes.extend(byte_token(t)),
                TokenType::Control | TokenType::Unknown | TokenType::Unused if skip_special => {}
                _ => bytes.extend_from_slice(t.replace('\u{2581}', " ").as_bytes()),
            }
        }
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if self.add_space_prefix && text.starts_with(' ') {
            text.remove(0);
        }
        text
    }
}
