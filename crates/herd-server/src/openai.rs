//! OpenAI request validation and response shapes.
//!
//! Requests are read as JSON objects and checked field by field: every field we implement is
//! parsed and range-checked, and any other field is a 400 that names it, so a client never gets
//! a quiet 200 that ignored what it asked for.

use std::collections::HashMap;

use axum::http::StatusCode;
use herd_engine::constraint::Grammar;

use crate::tools::Tools;
use herd_engine::sampler::{Sampled, SamplingParams};
use herd_engine::{Message, Tokenizer};
use serde_json::{Map, Value, json};

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

const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "seed",
    "stop",
    "n",
    "logprobs",
    "user",
    "stream",
    "stream_options",
    "response_format",
    // Extensions (vLLM's names): generate through end-of-generation tokens; constrain the
    // output to a regular expression or a Lark grammar.
    "ignore_eos",
    "guided_regex",
    "guided_grammar",
];
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];
const COMPLETION_FIELDS: &[&str] = &["prompt"];

/// A validated generation request, ready for the scheduler.
#[derive(Debug, Clone)]
pub struct Job {
    pub model: String,
    pub prompt_source: PromptSource,
    pub max_tokens: Option<usize>,
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
}

#[derive(Debug, Clone)]
pub enum PromptSource {
    Messages(Vec<Message>),
    Text(String),
    Tokens(Vec<u32>),
}

fn num(obj: &Map<String, Value>, key: &str) -> ApiResult<Option<f64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("'{key}' must be a number")).param(key)),
    }
}

fn uint(obj: &Map<String, Value>, key: &str) -> ApiResult<Option<u64>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            ApiError::bad_request(format!("'{key}' must be a non-negative integer")).param(key)
        }),
    }
}

fn in_range(key: &str, v: Option<f64>, lo: f64, hi: f64) -> ApiResult<Option<f64>> {
    match v {
        Some(x) if !(lo..=hi).contains(&x) => {
            Err(ApiError::bad_request(format!("'{key}' must be between {lo} and {hi}")).param(key))
        }
        _ => Ok(v),
    }
}

/// Parse and check a request body.
pub fn parse(body: &[u8], endpoint: Endpoint) -> ApiResult<Job> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    };
    let own = match endpoint {
        Endpoint::Chat => CHAT_FIELDS,
        Endpoint::Completions => COMPLETION_FIELDS,
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !COMMON_FIELDS.contains(&k.as_str()) && !own.contains(&k.as_str()))
    {
        return Err(ApiError::bad_request(format!(
            "unsupported field '{k}': herd does not implement it, and ignoring it would change what you asked for"
        ))
        .param(k)
        .code("unsupported_field"));
    }
    let model = match obj.get("model") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(ApiError::bad_request("'model' is required (a string)").param("model")),
    };
    let prompt_source = match endpoint {
        Endpoint::Chat => PromptSource::Messages(messages(obj.get("messages"))?),
        Endpoint::Completions => prompt(obj.get("prompt"))?,
    };

    let temperature = in_range("temperature", num(&obj, "temperature")?, 0.0, 2.0)?;
    let top_p = in_range("top_p", num(&obj, "top_p")?, 0.0, 1.0)?;
    if top_p == Some(0.0) {
        return Err(ApiError::bad_request("'top_p' must be greater than 0").param("top_p"));
    }
    let min_p = in_range("min_p", num(&obj, "min_p")?, 0.0, 1.0)?;
    let presence = in_range(
        "presence_penalty",
        num(&obj, "presence_penalty")?,
        -2.0,
        2.0,
    )?;
    let frequency = in_range(
        "frequency_penalty",
        num(&obj, "frequency_penalty")?,
        -2.0,
        2.0,
    )?;
    let repetition = num(&obj, "repetition_penalty")?;
    if repetition.is_some_and(|r| r <= 0.0) {
        return Err(
            ApiError::bad_request("'repetition_penalty' must be positive")
                .param("repetition_penalty"),
        );
    }
    let top_k = match obj.get("top_k") {
        // -1 is the common "disabled" value (vLLM).
        Some(v) if v.as_i64() == Some(-1) => Some(0),
        _ => uint(&obj, "top_k")?,
    };
    let max_tokens = match endpoint {
        Endpoint::Chat => uint(&obj, "max_completion_tokens")?.or(uint(&obj, "max_tokens")?),
        Endpoint::Completions => uint(&obj, "max_tokens")?,
    };
    if max_tokens == Some(0) {
        return Err(ApiError::bad_request("'max_tokens' must be at least 1").param("max_tokens"));
    }
    let n = uint(&obj, "n")?.unwrap_or(1);
    if !(1..=16).contains(&n) {
        return Err(ApiError::bad_request("'n' must be between 1 and 16").param("n"));
    }
    let stop = match obj.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|s| s.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::bad_request("'stop' must be a string or a list of strings").param("stop")
            })?,
        Some(_) => {
            return Err(
                ApiError::bad_request("'stop' must be a string or a list of strings").param("stop"),
            );
        }
    };
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::bad_request("'stop' strings must not be empty").param("stop"));
    }
    let mut logit_bias = HashMap::new();
    match obj.get("logit_bias") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            for (k, v) in m {
                let tok: u32 = k.parse().map_err(|_| {
                    ApiError::bad_request(format!("logit_bias key '{k}' is not a token id"))
                        .param("logit_bias")
                })?;
                let b = v
                    .as_f64()
                    .filter(|b| (-100.0..=100.0).contains(b))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "logit_bias values must be numbers between -100 and 100",
                        )
                        .param("logit_bias")
                    })?;
                logit_bias.insert(tok, b as f32);
            }
        }
        Some(_) => {
            return Err(ApiError::bad_request("'logit_bias' must be an object").param("logit_bias"));
        }
    }
    let (logprobs, top_logprobs) = match endpoint {
        Endpoint::Chat => {
            let on = match obj.get("logprobs") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(
                        ApiError::bad_request("'logprobs' must be a boolean").param("logprobs")
                    );
                }
            };
            let top = uint(&obj, "top_logprobs")?;
            if top.is_some() && !on {
                return Err(
                    ApiError::bad_request("'top_logprobs' requires 'logprobs': true")
                        .param("top_logprobs"),
                );
            }
            (on, top.unwrap_or(0))
        }
        Endpoint::Completions => match uint(&obj, "logprobs")? {
            Some(k) => (true, k),
            None => (false, 0),
        },
    };
    if top_logprobs > 20 {
        return Err(ApiError::bad_request("at most 20 top logprobs").param("top_logprobs"));
    }
    let stream = match obj.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad_request("'stream' must be a boolean").param("stream")),
    };
    let include_usage = match obj.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(o)) => {
            if let Some(k) = o.keys().find(|k| k.as_str() != "include_usage") {
                return Err(ApiError::bad_request(format!(
                    "unsupported field 'stream_options.{k}'"
                ))
                .param("stream_options")
                .code("unsupported_field"));
            }
            o.get("include_usage")
                .and_then(Value::as_bool)
                .unwrap_or(false)
        }
        Some(_) => {
            return Err(
                ApiError::bad_request("'stream_options' must be an object").param("stream_options")
            );
        }
    };
    if include_usage && !stream {
        return Err(
            ApiError::bad_request("'stream_options' is only allowed with 'stream': true")
                .param("stream_options"),
        );
    }
    let ignore_eos = match obj.get("ignore_eos") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::bad_request("'ignore_eos' must be a boolean").param("ignore_eos"));
        }
    };
    match obj.get("user") {
        None | Some(Value::Null) | Some(Value::String(_)) => {}
        Some(_) => return Err(ApiError::bad_request("'user' must be a string").param("user")),
    }
    let seed = match obj.get("seed") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_i64()
                .map(|s| s as u64)
                .or(v.as_u64())
                .ok_or_else(|| ApiError::bad_request("'seed' must be an integer").param("seed"))?,
        ),
    };
    let tools = match endpoint {
        Endpoint::Chat => crate::tools::parse(&obj)?,
        Endpoint::Completions => None,
    };
    let mut grammar = grammar(&obj)?;
    if let Some(schema) = tools.as_ref().and_then(Tools::forced_schema) {
        if grammar.is_some() {
            return Err(ApiError::bad_request(
                "a forced tool_choice and an output constraint cannot be combined",
            )
            .param("tool_choice"));
        }
        grammar = Some(Grammar::JsonSchema(schema));
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
        model,
        prompt_source,
        max_tokens: max_tokens.map(|m| m as usize),
        stop,
        sampling,
        seed,
        n: n as usize,
        logprobs,
        stream,
        include_usage,
        ignore_eos,
        grammar,
        tools,
    })
}

/// The output constraint a request asks for, if any (at most one).
fn grammar(obj: &Map<String, Value>) -> ApiResult<Option<Grammar>> {
    let mut found: Vec<(&str, Grammar)> = Vec::new();
    match obj.get("response_format") {
        None | Some(Value::Null) => {}
        Some(Value::Object(rf)) => {
            let bad = |m: String| Err(ApiError::bad_request(m).param("response_format"));
            match rf.get("type").and_then(Value::as_str) {
                Some("text") => {}
                Some("json_object") => found.push(("response_format", Grammar::json_object())),
                Some("json_schema") => {
                    let Some(Value::Object(js)) = rf.get("json_schema") else {
                        return bad("response_format.json_schema must be an object".into());
                    };
                    if let Some(k) = js.keys().find(|k| {
                        !["name", "description", "schema", "strict"].contains(&k.as_str())
                    }) {
                        return bad(format!(
                            "unsupported field 'response_format.json_schema.{k}'"
                        ));
                    }
                    match js.get("schema") {
                        Some(schema @ (Value::Object(_) | Value::Bool(_))) => {
                            found.push(("response_format", Grammar::JsonSchema(schema.clone())))
                        }
                        _ => {
                            return bad(
                                "response_format.json_schema.schema (an object) is required".into(),
                            );
                        }
                    }
                }
                other => {
                    return bad(format!(
                        "response_format type {other:?} is not supported (text, json_object, json_schema)"
                    ));
                }
            }
            if let Some(k) = rf
                .keys()
                .find(|k| !["type", "json_schema"].contains(&k.as_str()))
            {
                return bad(format!("unsupported field 'response_format.{k}'"));
            }
        }
        Some(_) => {
            return Err(ApiError::bad_request("'response_format' must be an object")
                .param("response_format"));
        }
    }
    for (key, make) in [
        ("guided_regex", Grammar::Regex as fn(String) -> Grammar),
        ("guided_grammar", Grammar::Lark),
    ] {
        match obj.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => found.push((key, make(s.clone()))),
            Some(_) => {
                return Err(ApiError::bad_request(format!("'{key}' must be a string")).param(key));
            }
        }
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

fn messages(v: Option<&Value>) -> ApiResult<Vec<Message>> {
    let Some(Value::Array(list)) = v else {
        return Err(ApiError::bad_request("'messages' is required (a list)").param("messages"));
    };
    if list.is_empty() {
        return Err(ApiError::bad_request("'messages' must not be empty").param("messages"));
    }
    for (i, m) in list.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        if !["system", "developer", "user", "assistant", "tool"].contains(&role) {
            return Err(
                ApiError::bad_request(format!("messages[{i}]: unknown role {role:?}"))
                    .param("messages"),
            );
        }
        if let Some(calls) = m.get("tool_calls").filter(|t| !t.is_null()) {
            let ok = role == "assistant"
                && calls.as_array().is_some_and(|a| {
                    a.iter().all(|c| {
                        c["function"]["name"].is_string() && c["function"]["arguments"].is_string()
                    })
                });
            if !ok {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}]: tool_calls must be an assistant's list of {{\"function\": {{\"name\", \"arguments\"}}}}"
                ))
                .param("messages"));
            }
            continue;
        }
        match m.get("content") {
            Some(Value::String(_)) => {}
            Some(Value::Array(parts)) => {
                for p in parts {
                    if p.get("type").and_then(Value::as_str) != Some("text")
                        || !p.get("text").is_some_and(Value::is_string)
                    {
                        return Err(ApiError::bad_request(format!(
                            "messages[{i}]: only text content parts are supported"
                        ))
                        .param("messages")
                        .code("unsupported_field"));
                    }
                }
            }
            Some(Value::Null) | None if role == "assistant" => {}
            _ => {
                return Err(ApiError::bad_request(format!(
                    "messages[{i}]: 'content' must be a string or a list of text parts"
                ))
                .param("messages"));
            }
        }
    }
    // Developer messages are system messages to the templates we know.
    Ok(list
        .iter()
        .map(|m| {
            let mut m = m.clone();
            if m["role"] == "developer" {
                m["role"] = Value::from("system");
            }
            m
        })
        .collect())
}

fn prompt(v: Option<&Value>) -> ApiResult<PromptSource> {
    let bad = || {
        ApiError::bad_request(
            "'prompt' must be a string, a list of one string, or a list of token ids",
        )
        .param("prompt")
    };
    match v {
        Some(Value::String(s)) => Ok(PromptSource::Text(s.clone())),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(PromptSource::Text(a[0].as_str().unwrap_or_default().to_string()))
        }
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_u64) => Ok(PromptSource::Tokens(
            a.iter().map(|t| t.as_u64().unwrap_or_default() as u32).collect(),
        )),
        Some(Value::Array(a)) if a.len() > 1 => Err(ApiError::bad_request(
            "batched prompts (a list of several prompts) are not supported: send one request per prompt",
        )
        .param("prompt")
        .code("unsupported_field")),
        _ => Err(bad()),
    }
}

/// The text of one token as clients see it.
pub fn token_text(tok: &Tokenizer, id: u32) -> String {
    tok.decode(&[id], false).unwrap_or_default()
}

/// Chat `logprobs.content[i]`.
pub fn chat_logprob(tok: &Tokenizer, s: &Sampled) -> Value {
    let entry = |id: u32, lp: f32| {
        let t = token_text(tok, id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
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
