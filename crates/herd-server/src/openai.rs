//! OpenAI request validation and response shapes.
//!
//! Requests are read into the serde types of [`crate::request`] (closed objects, so any field
//! herd does not implement is a 400 that names it), then range-checked here into a [`Job`]: a
//! client never gets a quiet 200 that ignored what it asked for.

use std::collections::HashMap;

use axum::http::StatusCode;
use herd_engine::constraint::Grammar;

use crate::request::{
    self, ChatMessage, Content, ContentPart, Logprobs, Prompt, ResponseFormat, Seed, Stop,
};
use crate::tools::Tools;
use herd_engine::Message;
use herd_engine::sampler::{Sampled, SamplingParams};
use serde_json::{Value, json};

/// An error in OpenAI's JSON shape.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    pub fn param(mut self, p: &str) -> Self {
        self.param = Some(p.to_string());
        self
    }

    pub fn code(mut self, c: &'static str) -> Self {
        self.code = Some(c);
        self
    }

    pub fn status(mut self, s: StatusCode, kind: &'static str) -> Self {
        self.status = s;
        self.kind = kind;
        self
    }

    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Which endpoint a body is for (their field sets differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// A validated generation request, ready for the scheduler.
#[derive(Debug, Clone)]
pub struct Job {
    pub model: String,
    pub prompt_source: PromptSource,
    pub max_tokens: Option<usize>,
    /// The field `max_tokens` came from (`max_tokens` or `max_completion_tokens`).
    pub max_tokens_field: &'static str,
    /// `max_tokens` is an upper bound that generation stops at or at the end of the context,
    /// whichever comes first (Ollama's `num_predict`), rather than a promise that the context
    /// must hold (OpenAI's `max_tokens`, a 400 when prompt and it do not fit).
    pub max_tokens_is_bound: bool,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Random seed given by the client (otherwise one is drawn per request).
    pub seed: Option<u64>,
    pub n: usize,
    /// Chat: `logprobs: true`; completions: `logprobs: N`.
    pub logprobs: bool,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
    /// What the output must follow (`response_format`, `guided_regex`, `guided_grammar`, or
    /// the call schema of a forced tool choice).
    pub grammar: Option<Grammar>,
    /// Chat: the tools offered and how they may be used.
    pub tools: Option<Tools>,
    /// The prefix-cache partition the client asked for (vLLM's `cache_salt`).
    pub cache_salt: Option<String>,
    /// A context smaller than the server's that prompt and output must fit in (Ollama's
    /// `num_ctx`), and the field it came from.
    pub context_limit: Option<(usize, &'static str)>,
}

#[derive(Debug, Clone)]
pub enum PromptSource {
    Messages(Vec<Message>),
    Text(String),
    Tokens(Vec<u32>),
}

/// A range check on an optional number: `Ok(v)` when absent or within `[lo, hi]`.
fn in_range(key: &str, v: Option<f64>, lo: f64, hi: f64) -> ApiResult<Option<f64>> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => {
            Err(ApiError::bad_request(format!("'{key}' must be between {lo} and {hi}")).param(key))
        }
        _ => Ok(v),
    }
}

/// The 400 for a body that does not read as a request (`request::parse`'s error). Inside
/// objects read by a tag (`role`, `type`) the path ends at the tagged object.
pub(crate) fn parse_error(e: request::ParseError) -> ApiError {
    let backticked = |prefix: &str| {
        e.message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name.to_string())
    };
    if let Some(field) = &e.unknown_field {
        let (param, message) = if e.path.is_empty() || e.path == *field {
            (field.clone(), format!("unsupported field '{field}'"))
        } else if e.path.ends_with(&format!(".{field}")) {
            (e.path.clone(), format!("unsupported field '{}'", e.path))
        } else {
            (
                e.path.clone(),
                format!("unsupported field '{field}' in {}", e.path),
            )
        };
        return ApiError::bad_request(format!(
            "{message}: herd does not implement it, and ignoring it would change what you asked for"
        ))
        .param(&param)
        .code("unsupported_field");
    }
    if e.path.is_empty() {
        let err = ApiError::bad_request(format!(
            "the request body is not a valid request: {}",
            e.message
        ));
        return match backticked("missing field `") {
            Some(field) => err.param(&field),
            None => err,
        };
    }
    let top = e
        .path
        .split(['.', '['])
        .next()
        .unwrap_or_default()
        .to_string();
    let err = ApiError::bad_request(format!("{}: {}", e.path, e.message)).param(&top);
    // A content part or tool of another kind (an image, a retrieval tool) is a feature herd
    // lacks, not a typo.
    let other_kind = e.message.starts_with("unknown variant")
        && (e.message.contains("expected `text`") || e.message.contains("expected `function`"));
    if other_kind {
        err.code("unsupported_field")
    } else {
        err
    }
}

/// A body that is not JSON at all gets serde_json's own message; one that is JSON but not an
/// object is said so (before any field is read).
pub(crate) fn json_object(body: &[u8]) -> ApiResult<()> {
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(body) {
        return Err(ApiError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        )));
    }
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    Ok(())
}

/// Parse and check a request body.
pub fn parse(body: &[u8], endpoint: Endpoint) -> ApiResult<Job> {
    json_object(body)?;
    let req = request::parse(body).map_err(parse_error)?;
    let chat = endpoint == Endpoint::Chat;
    if let Some(k) = req.foreign_fields(chat).first() {
        let path = if chat {
            "/v1/chat/completions"
        } else {
            "/v1/completions"
        };
        return Err(ApiError::bad_request(format!(
            "unsupported field '{k}': {path} does not take it"
        ))
        .param(k)
        .code("unsupported_field"));
    }
    let prompt_source = match endpoint {
        Endpoint::Chat => PromptSource::Messages(messages(req.messages)?),
        Endpoint::Completions => prompt(req.prompt)?,
    };

    let temperature = in_range("temperature", req.temperature, 0.0, 2.0)?;
    // OpenAI's range; 0 keeps only the most likely token.
    let top_p = in_range("top_p", req.top_p, 0.0, 1.0)?;
    let min_p = in_range("min_p", req.min_p, 0.0, 1.0)?;
    let presence = in_range("presence_penalty", req.presence_penalty, -2.0, 2.0)?;
    let frequency = in_range("frequency_penalty", req.frequency_penalty, -2.0, 2.0)?;
    // Logits are divided (or multiplied) by the penalty in f32: a value that rounds to 0 or to
    // infinity there turns the logits into garbage, so the range is a sane one.
    let repetition = in_range("repetition_penalty", req.repetition_penalty, 0.01, 100.0)?;
    let top_k = match req.top_k {
        // -1 is the common "disabled" value (vLLM).
        None | Some(-1) => None,
        Some(k) if k >= 0 => Some(k as u64),
        Some(_) => {
            return Err(ApiError::bad_request(
                "'top_k' must be -1 (disabled) or a non-negative integer",
            )
            .param("top_k"));
        }
    };
    let (max_tokens, max_key) = match endpoint {
        Endpoint::Chat if req.max_completion_tokens.is_some() => {
            (req.max_completion_tokens, "max_completion_tokens")
        }
        _ => (req.max_tokens, "max_tokens"),
    };
    if max_tokens == Some(0) {
        return Err(
            ApiError::bad_request(format!("'{max_key}' must be at least 1")).param(max_key),
        );
    }
    let n = req.n.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::bad_request("'n' must be between 1 and 16").param("n"));
    }
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("'stop' strings must not be empty").param("stop"));
    }
    let mut logit_bias = HashMap::new();
    for (k, b) in req.logit_bias.unwrap_or_default() {
        let tok: u32 = k.parse().map_err(|_| {
            ApiError::bad_request(format!("logit_bias key '{k}' is not a token id"))
                .param("logit_bias")
        })?;
        if !(-100.0..=100.0).contains(&b) {
            return Err(ApiError::bad_request(
                "logit_bias values must be numbers between -100 and 100",
            )
            .param("logit_bias"));
        }
        logit_bias.insert(tok, b as f32);
    }
    let (logprobs, top_logprobs) = match (endpoint, req.logprobs) {
        (_, None) => {
            if req.top_logprobs.is_some() {
                return Err(
                    ApiError::bad_request("'top_logprobs' requires 'logprobs': true")
                        .param("top_logprobs"),
                );
            }
            (false, 0)
        }
        (Endpoint::Chat, Some(Logprobs::On(on))) => {
            if req.top_logprobs.is_some() && !on {
                return Err(
                    ApiError::bad_request("'top_logprobs' requires 'logprobs': true")
                        .param("top_logprobs"),
                );
            }
            (on, req.top_logprobs.unwrap_or(0))
        }
        (Endpoint::Completions, Some(Logprobs::Top(k))) => (true, k),
        (Endpoint::Chat, Some(Logprobs::Top(_))) => {
            return Err(ApiError::bad_request("'logprobs' must be a boolean").param("logprobs"));
        }
        (Endpoint::Completions, Some(Logprobs::On(_))) => {
            return Err(ApiError::bad_request(
                "'logprobs' must be the number of top log-probabilities (an integer)",
            )
            .param("logprobs"));
        }
    };
    if top_logprobs > 20 {
        return Err(ApiError::bad_request("at most 20 top logprobs").param("top_logprobs"));
    }
    if req.cache_salt.as_deref() == Some("") {
        return Err(ApiError::bad_request("'cache_salt' must not be empty").param("cache_salt"));
    }
    let cache_salt = req.cache_salt;
    let stream = req.stream.unwrap_or(false);
    let include_usage = match req.stream_options {
        None => false,
        Some(o) => {
            if !stream {
                return Err(ApiError::bad_request(
                    "'stream_options' is only allowed with 'stream': true",
                )
                .param("stream_options"));
            }
            o.include_usage.unwrap_or(false)
        }
    };
    let tools = match endpoint {
        Endpoint::Chat => crate::tools::parse(req.tools, req.tool_choice, req.parallel_tool_calls)?,
        Endpoint::Completions => None,
    };
    let mut grammar = grammar(req.response_format, req.guided_regex, req.guided_grammar)?;
    if let Some(t) = &tools
        && let Some(schema) = t.forced_schema()
    {
        if grammar.is_some() {
            return Err(ApiError::bad_request(
                "a forced tool_choice and an output constraint cannot be combined",
            )
            .param("tool_choice"));
        }
        // A forced list of parallel calls closes at the first call that repeats one.
        grammar = Some(if t.parallel {
            Grammar::CallList(schema)
        } else {
            Grammar::JsonSchema(schema)
        });
    }
    let sampling = SamplingParams {
        temperature: temperature.unwrap_or(1.0) as f32,
        top_k: top_k.unwrap_or(0) as usize,
        top_p: top_p.unwrap_or(1.0) as f32,
        min_p: min_p.unwrap_or(0.0) as f32,
        repetition_penalty: repetition.unwrap_or(1.0) as f32,
        presence_penalty: presence.unwrap_or(0.0) as f32,
        frequency_penalty: frequency.unwrap_or(0.0) as f32,
        logit_bias,
        seed: 0,
        logprobs,
        top_logprobs: top_logprobs as usize,
    };
    Ok(Job {
        model: req.model,
        prompt_source,
        max_tokens: max_tokens.map(|m| m as usize),
        max_tokens_field: max_key,
        max_tokens_is_bound: false,
        stop,
        sampling,
        seed: req.seed.map(Seed::bits),
        n: n as usize,
        logprobs,
        stream,
        include_usage,
        ignore_eos: req.ignore_eos.unwrap_or(false),
        grammar,
        tools,
        cache_salt,
        context_limit: None,
    })
}

/// The output constraint a request asks for, if any (at most one).
fn grammar(
    response_format: Option<ResponseFormat>,
    regex: Option<String>,
    lark: Option<String>,
) -> ApiResult<Option<Grammar>> {
    let mut found: Vec<(&str, Grammar)> = Vec::new();
    match response_format {
        None | Some(ResponseFormat::Text) => {}
        Some(ResponseFormat::JsonObject) => found.push(("response_format", Grammar::json_object())),
        Some(ResponseFormat::JsonSchema { json_schema }) => match json_schema.schema {
            Some(schema) => {
                found.push(("response_format", Grammar::JsonSchema(schema.into_value())))
            }
            None => {
                return Err(ApiError::bad_request(
                    "response_format.json_schema.schema (an object) is required",
                )
                .param("response_format"));
            }
        },
    }
    if let Some(r) = regex {
        found.push(("guided_regex", Grammar::Regex(r)));
    }
    if let Some(g) = lark {
        found.push(("guided_grammar", Grammar::Lark(g)));
    }
    if found.len() > 1 {
        return Err(ApiError::bad_request(format!(
            "at most one output constraint per request; got {}",
            found.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
        ))
        .param(found[1].0));
    }
    Ok(found.pop().map(|(_, g)| g))
}

/// A message's content as templates read it: a string, or the list of text parts.
fn content_value(c: Content) -> Value {
    match c {
        Content::Text(s) => Value::String(s),
        Content::List(parts) => Value::Array(
            parts
                .into_iter()
                .map(|ContentPart::Text { text }| json!({"type": "text", "text": text}))
                .collect(),
        ),
    }
}

/// The messages as the chat templates read them (developer messages are system messages to
/// the templates we know).
fn messages(list: Option<Vec<ChatMessage>>) -> ApiResult<Vec<Message>> {
    let Some(list) = list else {
        return Err(ApiError::bad_request("'messages' is required (a list)").param("messages"));
    };
    if list.is_empty() {
        return Err(ApiError::bad_request("'messages' must not be empty").param("messages"));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.into_iter().enumerate() {
        let (mut message, name) = match m {
            ChatMessage::System { content, name } | ChatMessage::Developer { content, name } => (
                json!({"role": "system", "content": content_value(content)}),
                name,
            ),
            ChatMessage::User { content, name } => (
                json!({"role": "user", "content": content_value(content)}),
                name,
            ),
            ChatMessage::Assistant {
                content,
                tool_calls,
                name,
                ..
            } => {
                let mut m = json!({"role": "assistant", "content": content.map(content_value)});
                match tool_calls {
                    Some(calls) if !calls.is_empty() => {
                        m["tool_calls"] = calls
                            .into_iter()
                            .map(|c| {
                                let mut v = json!({"type": "function", "function": {
                                    "name": c.function.name, "arguments": c.function.arguments}});
                                if let Some(id) = c.id {
                                    v["id"] = Value::String(id);
                                }
                                v
                            })
                            .collect();
                    }
                    _ if m["content"].is_null() => {
                        return Err(ApiError::bad_request(format!(
                            "messages[{i}]: an assistant message needs 'content' or 'tool_calls'"
                        ))
                        .param("messages"));
                    }
                    _ => {}
                }
                (m, name)
            }
            ChatMessage::Tool {
                content,
                tool_call_id,
                name,
            } => {
                let mut m = json!({"role": "tool", "content": content_value(content)});
                if let Some(id) = tool_call_id {
                    m["tool_call_id"] = Value::String(id);
                }
                (m, name)
            }
        };
        if let Some(name) = name {
            message["name"] = Value::String(name);
        }
        out.push(message);
    }
    Ok(out)
}

fn prompt(p: Option<Prompt>) -> ApiResult<PromptSource> {
    let bad = |m: &str| ApiError::bad_request(m).param("prompt");
    match p {
        None => Err(bad(
            "'prompt' is required (a string, a list of one string, or a list of token ids)",
        )),
        Some(Prompt::Text(s)) => Ok(PromptSource::Text(s)),
        Some(Prompt::Texts(mut v)) if v.len() == 1 => Ok(PromptSource::Text(v.remove(0))),
        Some(Prompt::Texts(v)) if v.len() > 1 => Err(ApiError::bad_request(
            "batched prompts (a list of several prompts) are not supported: send one request per prompt",
        )
        .param("prompt")
        .code("unsupported_field")),
        Some(Prompt::Tokens(t)) if !t.is_empty() => Ok(PromptSource::Tokens(t)),
        Some(_) => Err(bad("'prompt' must not be empty")),
    }
}

/// A token as clients see it in logprobs: its text when its bytes are whole UTF-8, otherwise
/// `bytes:` and each byte as `\xNN` (vLLM's rendering), so that tokens holding parts of one
/// character stay distinct.
pub fn token_text(token_bytes: &[Vec<u8>], id: u32) -> String {
    let bytes = token_bytes.get(id as usize).map_or(&[][..], Vec::as_slice);
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_string(),
        Err(_) => {
            let mut s = String::from("bytes:");
            for b in bytes {
                s.push_str(&format!("\\x{b:02x}"));
            }
            s
        }
    }
}

/// Chat `logprobs.content[i]`: `bytes` are the token's own bytes (their concatenation over a
/// response is its content's UTF-8, characters split across tokens included).
pub fn chat_logprob(token_bytes: &[Vec<u8>], s: &Sampled) -> Value {
    let entry = |id: u32, lp: f32| {
        let bytes = token_bytes.get(id as usize).map_or(&[][..], Vec::as_slice);
        json!({"token": token_text(token_bytes, id), "logprob": lp, "bytes": bytes})
    };
    let mut e = entry(s.token, s.logprob);
    e["top_logprobs"] = Value::Array(s.top.iter().map(|&(id, lp)| entry(id, lp)).collect());
    e
}

pub fn usage_json(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Item 7 of the hostile-request issue: each of these was accepted (and the field ignored
    /// or garbled) when requests were checked by hand on `Value`.
    #[test]
    fn closed_objects_wrong_types_and_ranges_are_400s() {
        let chat = |extra: &str, message: &str| {
            format!(r#"{{"model":"m","messages":[{message}]{extra}}}"#)
        };
        let user = r#"{"role":"user","content":"x"}"#;
        let cases: Vec<(String, &str, Option<&str>)> = vec![
            (
                chat("", r#"{"role":"user","content":"hi","images":["x"]}"#),
                "messages[0]",
                Some("unsupported_field"),
            ),
            (
                chat("", r#"{"role":"user","content":"hi","audio":{"data":"x"}}"#),
                "messages[0]",
                Some("unsupported_field"),
            ),
            (
                chat("", r#"{"role":"assistant","content":"hi","refusal":"no"}"#),
                "messages",
                None,
            ),
            (chat("", r#"{"role":"user"}"#), "messages", None),
            (
                chat(
                    r#","tools":[{"type":"function","function":{"name":"a"},"extra":1}]"#,
                    user,
                ),
                "tools[0]",
                Some("unsupported_field"),
            ),
            (
                chat(
                    r#","tools":[{"type":"function","function":{"name":"a","x":2}}]"#,
                    user,
                ),
                "tools[0]",
                Some("unsupported_field"),
            ),
            (
                chat(
                    r#","stream":true,"stream_options":{"include_usage":"yes"}"#,
                    user,
                ),
                "stream_options",
                None,
            ),
            (
                chat(
                    r#","response_format":{"type":"json_schema","json_schema":{"name":"a","strict":"yes","schema":{}}}"#,
                    user,
                ),
                "response_format",
                None,
            ),
            (
                chat(
                    r#","response_format":{"type":"json_schema","json_schema":{"name":123,"schema":{}}}"#,
                    user,
                ),
                "response_format",
                None,
            ),
            (
                chat(r#","repetition_penalty":1e-300"#, user),
                "repetition_penalty",
                None,
            ),
            (
                chat(r#","max_tokens":9223372036854775808"#, user),
                "max_tokens",
                None,
            ),
            (
                chat(r#","max_completion_tokens":-1"#, user),
                "max_completion_tokens",
                None,
            ),
            (chat(r#","stop":5"#, user), "stop", None),
            (
                chat(r#","tool_choice":"sometimes""#, user),
                "tool_choice",
                None,
            ),
            (chat(r#","temperature":"hot""#, user), "temperature", None),
            (chat(r#","top_k":-2"#, user), "top_k", None),
            (
                chat(r#","prompt":"x""#, user),
                "prompt",
                Some("unsupported_field"),
            ),
            (
                r#"{"model":"m","prompt":[1,-2]}"#.to_string(),
                "prompt",
                None,
            ),
            (
                r#"{"model":"m","prompt":"x","messages":[]}"#.to_string(),
                "messages",
                Some("unsupported_field"),
            ),
            (
                r#"{"model":"m","prompt":"x","logprobs":true}"#.to_string(),
                "logprobs",
                None,
            ),
        ];
        for (body, param, code) in cases {
            let ep = if body.contains(r#""prompt":"x","#)
                || body.starts_with(r#"{"model":"m","prompt""#)
            {
                Endpoint::Completions
            } else {
                Endpoint::Chat
            };
            let e = parse(body.as_bytes(), ep).expect_err(&body);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert_eq!(e.code, code, "{body}: {}", e.message);
        }
        // What the official clients send back from a response is accepted when empty.
        let echoed = chat(
            "",
            r#"{"role":"user","content":"hi","name":"ann"},{"role":"assistant","content":"{}","refusal":null,"audio":null,"function_call":null,"annotations":[],"parsed":{}},{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"c","type":"function","function":{"name":"f","arguments":"{}","parsed_arguments":{}}}]},{"role":"tool","tool_call_id":"c","name":"f","content":"r"}"#,
        );
        let job = parse(echoed.as_bytes(), Endpoint::Chat).unwrap();
        let PromptSource::Messages(m) = job.prompt_source else {
            panic!("chat")
        };
        assert_eq!((m.len(), &m[0]["name"]), (4, &json!("ann")));
        // Trailing garbage and non-objects are not requests.
        assert!(
            err(&format!("{} x", chat("", user)), Endpoint::Chat)
                .message
                .contains("not valid JSON")
        );
        assert!(err("[1]", Endpoint::Chat).message.contains("JSON object"));
    }

    fn err(body: &str, e: Endpoint) -> ApiError {
        parse(body.as_bytes(), e).unwrap_err()
    }

    #[test]
    fn fields_are_checked() {
        let ok = parse(
            br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"temperature":0.5,
                "stop":"x","seed":7,"n":2,"logprobs":true,"top_logprobs":3,"user":"u",
                "logit_bias":{"5":-100},"max_completion_tokens":9,"ignore_eos":true}"#,
            Endpoint::Chat,
        )
        .unwrap();
        assert_eq!(ok.sampling.temperature, 0.5);
        assert_eq!((ok.n, ok.max_tokens, ok.seed), (2, Some(9), Some(7)));
        assert_eq!(ok.stop, ["x"]);
        assert_eq!(ok.sampling.top_logprobs, 3);
        assert_eq!(ok.sampling.logit_bias[&5], -100.0);
        assert!(ok.ignore_eos);

        let e = err(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"functions":[]}"#,
            Endpoint::Chat,
        );
        assert_eq!(e.param.as_deref(), Some("functions"));
        assert!(e.message.contains("'functions'"));
        let e = err(
            r#"{"model":"m","prompt":"x","echo":true}"#,
            Endpoint::Completions,
        );
        assert_eq!(e.param.as_deref(), Some("echo"));
        assert!(
            err("{not json", Endpoint::Chat)
                .message
                .contains("not valid JSON")
        );
        assert_eq!(
            err(
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                Endpoint::Chat
            )
            .param
            .as_deref(),
            Some("temperature")
        );
        assert_eq!(
            err(r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#, Endpoint::Chat)
                .code,
            Some("unsupported_field")
        );
        assert_eq!(
            err(r#"{"model":"m","prompt":["a","b"]}"#, Endpoint::Completions).code,
            Some("unsupported_field")
        );
        assert_eq!(
            err(r#"{"messages":[]}"#, Endpoint::Chat).param.as_deref(),
            Some("model")
        );
    }
}
