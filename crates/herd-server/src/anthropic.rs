//! Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), as a
//! translation layer: a request becomes the same [`Job`] the OpenAI routes make (system
//! prompt and content blocks as chat-template messages, `tool_use` / `tool_result` blocks as
//! tool calls and tool messages, `tools` with their `input_schema` as functions, `tool_choice`
//! auto/any/tool/none as herd's tool choices) and runs on the same scheduler, sampler,
//! constraints and tool machinery. Responses, the stream's named events and errors take
//! Anthropic's shapes. Reference: `shared/reference/anthropic-messages.md`.
//!
//! Choices made here, each documented because a field is never silently ignored:
//! - `x-api-key` or `Authorization: Bearer` carries the key; `anthropic-version` and
//!   `anthropic-beta` headers are accepted whatever their value.
//! - Accepted with no effect, because herd's models and cache need nothing from them:
//!   `thinking` (read for its shape; the models have no reasoning mode, so no `thinking` block
//!   comes back, and `thinking` / `redacted_thinking` blocks in history are not rendered),
//!   `output_config.effort`, `cache_control` wherever the API takes it, its `scope` included
//!   (herd's prefix cache keeps every prompt's blocks unasked), a tool's
//!   `eager_input_streaming`, `metadata.user_id`, `service_tier`, `speed: "standard"` (any
//!   other speed is a 400), and `context_management` edits that clear thinking (other edits
//!   are 400s: herd does not edit the conversation it is given).
//! - `output_config.format` (or the older beta `output_format`, not both) constrains the
//!   output as `response_format` does on the OpenAI routes. A tool's `input_examples` are
//!   appended to its description; `defer_loading: true` (tool search) is a 400.
//! - `temperature`, `top_p` and `top_k`, which newer SDKs no longer send, are still taken.
//! - `max_tokens` is a bound: a reply the context cuts short first ends with
//!   `stop_reason: "model_context_window_exceeded"`.
//! - Claude Code's per-request attribution block (`x-anthropic-billing-header: …`, different
//!   every request) is left out of the system prompt, so that the prefix cache can serve the
//!   rest of the conversation (llama.cpp does the same).
//! - `usage.input_tokens` is the whole prompt (clients track the context from it); the
//!   optional cache fields are not reported.
//! - A stream silent for 10 s (a long prompt's processing, a held tool call) gets `ping`
//!   events.
//! - Images, documents, server tools and a final assistant message to continue (prefill) are
//!   400s naming them (count_tokens takes a final assistant message: it only counts); unknown
//!   fields are 400s naming them, as on every herd route.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use herd_engine::generate::FinishReason;
use herd_engine::sampler::SamplingParams;
use herd_engine::scheduler::Event;
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::conversation::{self, Ending};
use crate::openai::{self, ApiError, ApiResult, Job, PromptSource};
use crate::request::{self, TextOr};
use crate::{AppState, CallHold, Finale, Started, Timing, tools};

/// The routes.
pub fn routes() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route("/v1/messages", post(messages))
        .route("/v1/messages/count_tokens", post(count_tokens))
}

/// Anthropic's error type for a status (its errors page).
fn error_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        408 => "timeout_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    }
}

/// An error in Anthropic's shape, `{"type": "error", "error": {"type", "message"}}`. A busy
/// or loading server is 529 `overloaded_error` (retried by the SDKs, after `retry-after`); a
/// prompt over the context says "prompt is too long", the words clients look for to compact.
pub(crate) fn error_response(e: &ApiError, request_id: &str) -> Response {
    let status = if e.status == StatusCode::SERVICE_UNAVAILABLE {
        StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
    } else {
        e.status
    };
    let message = if e.code == Some("context_length_exceeded") {
        format!("prompt is too long: {}", e.message)
    } else {
        e.message.clone()
    };
    let body = json!({"type": "error",
                      "error": {"type": error_type(status), "message": message},
                      "request_id": request_id});
    let mut response = (status, axum::Json(body)).into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert("request-id", v);
    }
    if status.as_u16() == 529 {
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CacheControl {
    #[serde(rename = "type")]
    _kind: CacheKind,
    #[serde(rename = "ttl")]
    _ttl: Option<String>,
    #[serde(rename = "scope")]
    _scope: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "snake_case")]
enum CacheKind {
    Ephemeral,
}

/// `system`: a string, or text blocks.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of text blocks")]
enum System {
    Text(String),
    Blocks(Vec<TextBlock>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum TextBlock {
    Text {
        text: String,
        #[serde(rename = "cache_control")]
        _cache_control: Option<CacheControl>,
        #[serde(rename = "citations")]
        _citations: Option<IgnoredAny>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Role {
    User,
    Assistant,
    /// Mid-conversation system text (Claude Code sends it): folded into the system prompt.
    System,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageParam {
    role: Role,
    content: Content,
}

/// A message's content: a string (one text block) or blocks.
type Content = TextOr<Block>;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Block {
    Text {
        text: String,
        #[serde(rename = "cache_control")]
        _cache_control: Option<CacheControl>,
        #[serde(rename = "citations")]
        _citations: Option<IgnoredAny>,
    },
    ToolUse {
        id: String,
        name: String,
        input: Map<String, Value>,
        #[serde(rename = "cache_control")]
        _cache_control: Option<CacheControl>,
    },
    ToolResult {
        tool_use_id: String,
        content: Option<ToolResultContent>,
        is_error: Option<bool>,
        #[serde(rename = "cache_control")]
        _cache_control: Option<CacheControl>,
    },
    /// Reasoning from an earlier turn: not rendered (herd's models have no reasoning mode).
    Thinking {
        #[serde(rename = "thinking")]
        _thinking: String,
        #[serde(rename = "signature")]
        _signature: Option<String>,
    },
    RedactedThinking {
        #[serde(rename = "data")]
        _data: String,
    },
}

/// A tool result's content: a string or text blocks (an image block's own error reaches the
/// client).
type ToolResultContent = TextOr<TextBlock>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolParam {
    name: String,
    description: Option<String>,
    input_schema: Map<String, Value>,
    /// `"custom"` (a client tool) when given; any other type was refused as a server tool
    /// before the fields were read.
    #[serde(rename = "type")]
    _kind: Option<String>,
    #[serde(rename = "cache_control")]
    _cache_control: Option<CacheControl>,
    strict: Option<bool>,
    /// A transport hint (stream the arguments as they come); herd sends them whole.
    #[serde(rename = "eager_input_streaming")]
    _eager_input_streaming: Option<bool>,
    /// Example inputs: written into the description the model reads.
    input_examples: Option<Vec<Value>>,
    /// Tools loaded on demand by a tool search: only `false` (herd offers every tool).
    defer_loading: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ToolChoice {
    Auto {
        disable_parallel_tool_use: Option<bool>,
    },
    Any {
        disable_parallel_tool_use: Option<bool>,
    },
    Tool {
        name: String,
        disable_parallel_tool_use: Option<bool>,
    },
    None {},
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Thinking {
    Enabled {
        #[serde(rename = "budget_tokens")]
        _budget_tokens: u32,
        #[serde(rename = "display")]
        _display: Option<String>,
    },
    Disabled {},
    Adaptive {
        #[serde(rename = "display")]
        _display: Option<String>,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    #[serde(rename = "user_id")]
    _user_id: Option<String>,
}

/// `POST /v1/messages` (and, with no `max_tokens` nor sampling, `count_tokens`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessagesRequest {
    model: String,
    max_tokens: Option<u32>,
    messages: Vec<MessageParam>,
    system: Option<System>,
    stop_sequences: Option<Vec<String>>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<u32>,
    #[serde(rename = "metadata")]
    _metadata: Option<Metadata>,
    /// Read one by one, so that a server tool is named before its fields are.
    tools: Option<Vec<Map<String, Value>>>,
    tool_choice: Option<ToolChoice>,
    /// Read for its shape only: there is no reasoning mode to switch.
    #[serde(rename = "thinking")]
    _thinking: Option<Thinking>,
    stream: Option<bool>,
    #[serde(rename = "service_tier")]
    _service_tier: Option<String>,
    /// Top-level automatic caching: herd caches every prompt's blocks anyway.
    #[serde(rename = "cache_control")]
    _cache_control: Option<CacheControl>,
    output_config: Option<OutputConfig>,
    /// The structured-outputs beta's spelling of `output_config.format`.
    output_format: Option<OutputFormat>,
    context_management: Option<ContextManagement>,
    speed: Option<String>,
}

/// `context_management`: server-side edits of the conversation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ContextManagement {
    edits: Vec<Map<String, Value>>,
}

/// `output_config`: `format` constrains the output to a JSON schema (as `response_format`
/// does on the OpenAI routes); `effort` is accepted and has no effect on models without a
/// reasoning mode.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutputConfig {
    #[serde(rename = "effort")]
    _effort: Option<Effort>,
    format: Option<OutputFormat>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Effort {
    Low,
    Medium,
    High,
    Xhigh,
    Max,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum OutputFormat {
    JsonSchema { schema: Map<String, Value> },
}

/// Claude Code's attribution line, different in every request.
const BILLING_HEADER: &str = "x-anthropic-billing-header:";

/// The text of text blocks, one per line.
fn joined(blocks: Vec<TextBlock>) -> String {
    blocks
        .into_iter()
        .map(|TextBlock::Text { text, .. }| text)
        .collect::<Vec<_>>()
        .join("\n")
}

/// The conversation as chat-template messages: one system message first (the `system` field
/// and any system-role messages), tool results as tool messages right after the assistant
/// turn that made the calls (then the user's text of that turn), consecutive turns of one role
/// merged as the API merges them.
fn template_messages(
    system: Option<System>,
    list: Vec<MessageParam>,
    counting: bool,
) -> ApiResult<Vec<Value>> {
    let mut system_text: Vec<String> = match system {
        None => Vec::new(),
        Some(System::Text(t)) => vec![t],
        Some(System::Blocks(b)) => b
            .into_iter()
            .map(|TextBlock::Text { text, .. }| text)
            .filter(|t| !t.trim_start().starts_with(BILLING_HEADER))
            .collect(),
    };
    if list.is_empty() {
        return Err(ApiError::bad_request("'messages' must not be empty").param("messages"));
    }
    if !counting && list.last().is_some_and(|m| m.role == Role::Assistant) {
        return Err(ApiError::bad_request(
            "a final assistant message (a prefill for the model to continue) is not supported: \
             end the conversation with a user message",
        )
        .param("messages"));
    }
    // The name of each tool call, for the tool messages that answer it.
    let mut call_names: std::collections::HashMap<String, String> = Default::default();
    let mut out: Vec<Value> = Vec::new();
    let push_text = |out: &mut Vec<Value>, role: &str, text: String| match out.last_mut() {
        Some(last)
            if last["role"] == role
                && last.get("tool_calls").is_none()
                && last["content"].is_string() =>
        {
            let merged = format!("{}\n{text}", last["content"].as_str().unwrap_or_default());
            last["content"] = Value::String(merged);
        }
        _ => out.push(json!({"role": role, "content": text})),
    };
    for (i, m) in list.into_iter().enumerate() {
        let blocks = match m.content {
            Content::Text(t) => vec![Block::Text {
                text: t,
                _cache_control: None,
                _citations: None,
            }],
            Content::List(b) => b,
        };
        match m.role {
            Role::System => {
                for b in blocks {
                    match b {
                        Block::Text { text, .. } => system_text.push(text),
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "messages.{i}: a system message holds text blocks only"
                            ))
                            .param("messages"));
                        }
                    }
                }
            }
            Role::User => {
                let mut texts = Vec::new();
                for b in blocks {
                    match b {
                        Block::Text { text, .. } => texts.push(text),
                        Block::ToolResult {
                            tool_use_id,
                            content,
                            is_error,
                            ..
                        } => {
                            let text = match content {
                                None => String::new(),
                                Some(ToolResultContent::Text(t)) => t,
                                Some(ToolResultContent::List(b)) => joined(b),
                            };
                            let text = if is_error == Some(true) {
                                format!("Error: {text}")
                            } else {
                                text
                            };
                            // A result answers a tool_use block earlier in the conversation, as
                            // the API requires.
                            let Some(name) = call_names.get(&tool_use_id) else {
                                return Err(ApiError::bad_request(format!(
                                    "messages.{i}: tool_result block(s) provided when previous \
                                     message does not have a matching tool_use block (id \
                                     '{tool_use_id}')"
                                ))
                                .param("messages"));
                            };
                            out.push(json!({"role": "tool", "content": text,
                                            "tool_call_id": tool_use_id, "name": name}));
                        }
                        Block::ToolUse { .. } => {
                            return Err(ApiError::bad_request(format!(
                                "messages.{i}: a tool_use block belongs to an assistant message"
                            ))
                            .param("messages"));
                        }
                        Block::Thinking { .. } | Block::RedactedThinking { .. } => {}
                    }
                }
                if !texts.is_empty() {
                    push_text(&mut out, "user", texts.join("\n"));
                }
            }
            Role::Assistant => {
                let (mut texts, mut calls) = (Vec::new(), Vec::new());
                for b in blocks {
                    match b {
                        Block::Text { text, .. } => texts.push(text),
                        Block::ToolUse {
                            id, name, input, ..
                        } => {
                            call_names.insert(id.clone(), name.clone());
                            calls.push(json!({"id": id, "type": "function", "function": {
                                "name": name, "arguments": Value::Object(input).to_string()}}));
                        }
                        Block::ToolResult { .. } => {
                            return Err(ApiError::bad_request(format!(
                                "messages.{i}: a tool_result block belongs to a user message"
                            ))
                            .param("messages"));
                        }
                        Block::Thinking { .. } | Block::RedactedThinking { .. } => {}
                    }
                }
                if calls.is_empty() {
                    push_text(&mut out, "assistant", texts.join("\n"));
                } else {
                    let mut content = (!texts.is_empty()).then(|| texts.join("\n"));
                    // An assistant text turn right before joins this one (the API merges
                    // consecutive turns of one role).
                    if let Some(last) = out.last()
                        && last["role"] == "assistant"
                        && last.get("tool_calls").is_none()
                    {
                        let before = last["content"].as_str().unwrap_or_default().to_string();
                        out.pop();
                        content = Some(match content {
                            Some(c) => format!("{before}\n{c}"),
                            None => before,
                        });
                    }
                    out.push(json!({"role": "assistant", "content": content, "tool_calls": calls}));
                }
            }
        }
    }
    if !system_text.is_empty() {
        out.insert(
            0,
            json!({"role": "system", "content": system_text.join("\n")}),
        );
    }
    // Content that renders nothing (empty lists, thinking blocks only) leaves nothing to answer.
    let ending = if counting {
        Ending::Any
    } else {
        Ending::Answer
    };
    conversation::shape(out, ending, "messages")
}

/// The offered tools and the choice, as herd's tools.
fn tools(
    list: Option<Vec<Map<String, Value>>>,
    choice: Option<ToolChoice>,
) -> ApiResult<Option<tools::Tools>> {
    let mut functions = Vec::new();
    for (i, raw) in list.unwrap_or_default().into_iter().enumerate() {
        if let Some(kind) = raw.get("type").and_then(Value::as_str)
            && kind != "custom"
        {
            return Err(ApiError::bad_request(format!(
                "tools.{i}: '{kind}' is a server tool, which herd does not run; give client \
                 tools (name, description, input_schema)"
            ))
            .param("tools"));
        }
        let t: ToolParam = serde_path_to_error::deserialize(Value::Object(raw)).map_err(|e| {
            let path = e.path().to_string();
            ApiError::bad_request(format!("tools.{i}.{path}: {}", e.into_inner()))
                .param("tools")
                .code("unsupported_field")
        })?;
        if t.defer_loading == Some(true) {
            return Err(ApiError::bad_request(format!(
                "tools.{i}: deferred loading (a tool search) is not supported: herd offers every \
                 tool it is given"
            ))
            .param("tools"));
        }
        let description = match (t.description, t.input_examples) {
            (d, None) => d,
            (d, Some(examples)) => {
                let shown: Vec<String> = examples.iter().map(Value::to_string).collect();
                Some(format!(
                    "{}Example inputs: {}",
                    d.map(|d| format!("{d}\n")).unwrap_or_default(),
                    shown.join("; ")
                ))
            }
        };
        functions.push(request::Tool::Function {
            function: request::FunctionDef {
                name: t.name,
                description,
                parameters: Some(t.input_schema),
                strict: t.strict,
            },
        });
    }
    let (mode, parallel) = match choice {
        None => (None, None),
        Some(ToolChoice::Auto {
            disable_parallel_tool_use: d,
        }) => (Some(request::ToolChoice::Mode(request::ToolMode::Auto)), d),
        Some(ToolChoice::Any {
            disable_parallel_tool_use: d,
        }) => (
            Some(request::ToolChoice::Mode(request::ToolMode::Required)),
            d,
        ),
        Some(ToolChoice::Tool {
            name,
            disable_parallel_tool_use: d,
        }) => (
            Some(request::ToolChoice::Named(request::NamedTool::Function {
                function: request::FunctionName { name },
            })),
            d,
        ),
        Some(ToolChoice::None {}) => (
            Some(request::ToolChoice::Mode(request::ToolMode::None)),
            None,
        ),
    };
    let functions = (!functions.is_empty()).then_some(functions);
    crate::tools::parse(functions, mode, parallel.map(|d| !d))
}

/// The 400 for a body that does not read, with image and document blocks said plainly.
fn parse_error(e: request::ParseError) -> ApiError {
    for kind in ["image", "document", "search_result", "container_upload"] {
        if e.message.starts_with(&format!("unknown variant `{kind}`")) {
            return ApiError::bad_request(format!(
                "{}: {kind} blocks are not supported: herd serves text-only models",
                e.path
            ))
            .param("messages");
        }
    }
    openai::parse_error(e)
}

/// Read and check a Messages request. `count` reads it for `count_tokens` (no `max_tokens`).
fn parse(body: &[u8], count: bool) -> ApiResult<Job> {
    openai::json_object(body)?;
    let req: MessagesRequest = request::parse_as(body).map_err(parse_error)?;
    if count {
        // count_tokens takes the prompt's fields only (its parameters are the create
        // parameters less `max_tokens` and those about generating).
        let generating = [
            ("max_tokens", req.max_tokens.is_some()),
            ("stream", req.stream.is_some()),
            ("stop_sequences", req.stop_sequences.is_some()),
            ("temperature", req.temperature.is_some()),
            ("top_p", req.top_p.is_some()),
            ("top_k", req.top_k.is_some()),
            ("metadata", req._metadata.is_some()),
            ("service_tier", req._service_tier.is_some()),
        ];
        if let Some((field, _)) = generating.iter().find(|(_, given)| *given) {
            return Err(ApiError::bad_request(format!(
                "'{field}' is not a count_tokens parameter: it counts the prompt's tokens only"
            ))
            .param(field));
        }
    }
    let max_tokens = match (count, req.max_tokens) {
        (true, _) => None,
        (false, None) => {
            return Err(ApiError::bad_request("'max_tokens' is required").param("max_tokens"));
        }
        (false, Some(0)) => {
            return Err(
                ApiError::bad_request("'max_tokens' must be at least 1").param("max_tokens")
            );
        }
        (false, Some(n)) => Some(n as usize),
    };
    if let Some(cm) = &req.context_management
        && let Some(edit) = cm
            .edits
            .iter()
            .map(|e| e.get("type").and_then(Value::as_str).unwrap_or("(no type)"))
            .find(|t| !t.starts_with("clear_thinking_"))
    {
        return Err(ApiError::bad_request(format!(
            "context_management edit '{edit}' is not supported: herd does not edit the \
             conversation it is given (clearing thinking is accepted: none is rendered)"
        ))
        .param("context_management"));
    }
    if let Some(speed) = req.speed.as_deref()
        && speed != "standard"
    {
        return Err(ApiError::bad_request(format!(
            "'speed' {speed:?} is not offered: herd serves at one speed (\"standard\")"
        ))
        .param("speed"));
    }
    let range = |key: &str, v: Option<f64>| -> ApiResult<Option<f64>> {
        match v {
            Some(x) if !(0.0..=1.0).contains(&x) => {
                Err(ApiError::bad_request(format!("'{key}' must be between 0 and 1")).param(key))
            }
            _ => Ok(v),
        }
    };
    let temperature = range("temperature", req.temperature)?;
    let top_p = range("top_p", req.top_p)?;
    let stop = req.stop_sequences.unwrap_or_default();
    if stop.iter().any(String::is_empty) {
        return Err(
            ApiError::bad_request("'stop_sequences' must not hold empty strings")
                .param("stop_sequences"),
        );
    }
    let tools = tools(req.tools, req.tool_choice)?;
    use herd_engine::constraint::Grammar;
    let forced = tools.as_ref().and_then(|t| {
        t.forced_schema().map(|schema| {
            if t.parallel {
                Grammar::CallList(schema)
            } else {
                Grammar::JsonSchema(schema)
            }
        })
    });
    let format = match (req.output_config.and_then(|o| o.format), req.output_format) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give the JSON schema once: 'output_config.format' or the older \
                 'output_format', not both",
            )
            .param("output_format"));
        }
        (a, b) => a.or(b),
    };
    let format = format
        .map(|OutputFormat::JsonSchema { schema }| Grammar::JsonSchema(Value::Object(schema)));
    let grammar = match (forced, format) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "a forced tool_choice (any or tool) and output_config.format cannot be combined",
            )
            .param("output_config"));
        }
        (forced, format) => forced.or(format),
    };
    let messages = template_messages(req.system, req.messages, count)?;
    let sampling = SamplingParams {
        temperature: temperature.unwrap_or(1.0) as f32,
        top_k: req.top_k.unwrap_or(0) as usize,
        top_p: top_p.unwrap_or(1.0) as f32,
        ..SamplingParams::default()
    };
    Ok(Job {
        model: req.model,
        prompt_source: PromptSource::Messages(messages),
        max_tokens,
        max_tokens_field: "max_tokens",
        max_tokens_is_bound: true,
        stop,
        sampling,
        seed: None,
        n: 1,
        logprobs: false,
        stream: req.stream.unwrap_or(false),
        include_usage: false,
        ignore_eos: false,
        grammar,
        tools,
        cache_salt: None,
        context_limit: None,
    })
}

pub(crate) fn request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("req_{nanos:x}")
}

async fn count_tokens(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let rid = request_id();
    let counted = async {
        let req = crate::read_request(&st, &headers, body).await?;
        let job = parse(&req.body, true)?;
        let st2 = st.clone();
        let (_, prompt) = tokio::task::spawn_blocking(move || crate::prepare(&st2, job))
            .await
            .unwrap_or_else(|_| {
                Err(ApiError::bad_request("internal error preparing the prompt")
                    .status(StatusCode::INTERNAL_SERVER_ERROR, "server_error"))
            })?;
        Ok::<_, ApiError>(prompt.len())
    }
    .await;
    match counted {
        Ok(n) => with_request_id(axum::Json(json!({"input_tokens": n})).into_response(), &rid),
        Err(e) => error_response(&e, &rid),
    }
}

fn with_request_id(mut r: Response, rid: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(rid) {
        r.headers_mut().insert("request-id", v);
    }
    r
}

async fn messages(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let rid = request_id();
    match crate::start(&st, &headers, body, |b| parse(b, false)).await {
        Ok(started) => {
            let id = format!("msg_{:x}", started.run.guard.ids[0]);
            let response = if started.job.stream {
                stream_response(st, started, id)
            } else {
                whole_response(st, started, id, &rid).await
            };
            with_request_id(response, &rid)
        }
        Err(e) => error_response(&e, &rid),
    }
}

/// `stop_reason` and `stop_sequence` for how a turn ended. `max_tokens` is a bound (as the API
/// treats it): a turn the context cut short before it is `model_context_window_exceeded`.
fn stop_reason(
    calls: bool,
    finish: FinishReason,
    stop: Option<String>,
    generated: usize,
    max_tokens: Option<usize>,
) -> (&'static str, Value) {
    match (calls, finish, stop) {
        (true, _, _) => ("tool_use", Value::Null),
        (false, FinishReason::Length, _) if max_tokens.is_some_and(|m| generated < m) => {
            ("model_context_window_exceeded", Value::Null)
        }
        (false, FinishReason::Length, _) => ("max_tokens", Value::Null),
        (false, FinishReason::Stop, Some(s)) => ("stop_sequence", Value::String(s)),
        (false, FinishReason::Stop, None) => ("end_turn", Value::Null),
    }
}

/// `tool_use` blocks; ids are unique per message (`toolu_{message}_{k}`).
fn tool_use_blocks(message_id: &str, calls: &[tools::Call]) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let input: Value = serde_json::from_str(&c.arguments)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}));
            json!({"type": "tool_use",
                   "id": format!("toolu_{}_{k}", message_id.trim_start_matches("msg_")),
                   "name": c.name, "input": input})
        })
        .collect()
}

async fn whole_response(st: Arc<AppState>, started: Started, id: String, rid: &str) -> Response {
    let Started {
        job,
        mut run,
        prompt_tokens,
    } = started;
    let tools = job.tools.clone().filter(tools::Tools::active);
    let mut hold = CallHold::new(tools.as_ref());
    let mut timing = Timing { last: vec![None] };
    let mut text = String::new();
    while let Some((_, event, at)) = run.next().await {
        match event {
            Event::Token { text: piece, .. } => {
                timing.token(&st, run.arrived, 0, at);
                if let Some((t, _)) = hold.token(&piece, None) {
                    text.push_str(&t);
                }
            }
            Event::Done {
                text: last,
                finish,
                usage,
                stop,
            } => {
                let (content, calls) = match hold.done(&last, tools.as_ref()) {
                    Finale::Calls(calls) => (tool_use_blocks(&id, &calls), true),
                    Finale::Text(t, _) => {
                        text.push_str(&t);
                        let blocks = if text.is_empty() {
                            Vec::new()
                        } else {
                            vec![json!({"type": "text", "text": text})]
                        };
                        (blocks, false)
                    }
                };
                let (reason, sequence) =
                    stop_reason(calls, finish, stop, usage.completion_tokens, job.max_tokens);
                run.guard.finished = true;
                st.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
                return axum::Json(json!({
                    "id": id, "type": "message", "role": "assistant", "model": job.model,
                    "content": content, "stop_reason": reason, "stop_sequence": sequence,
                    "usage": {"input_tokens": prompt_tokens, "output_tokens": usage.completion_tokens},
                }))
                .into_response();
            }
            Event::Failed(why) => {
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                return error_response(
                    &ApiError::bad_request(why)
                        .status(StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
                    rid,
                );
            }
            Event::GrammarFailed(why) => {
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                return error_response(&crate::grammar_failed(why), rid);
            }
        }
    }
    error_response(
        &ApiError::bad_request("the engine stopped")
            .status(StatusCode::SERVICE_UNAVAILABLE, "server_error"),
        rid,
    )
}

/// Silence after which a stream sends a `ping`.
const PING_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// One server-sent event, named as its `type` (the SDKs dispatch on the name).
fn event(v: &Value) -> Bytes {
    let name = v["type"].as_str().unwrap_or("error");
    Bytes::from(format!("event: {name}\ndata: {v}\n\n"))
}

/// The stream: `message_start` (usage with the prompt's tokens), a `ping`, the text block
/// (`content_block_start` with empty text, `text_delta`s, `content_block_stop`) when there is
/// text, one block per tool call (`tool_use` with an empty `input`, the arguments in one
/// `input_json_delta`, stop), `message_delta` with the stop reason and output tokens, then
/// `message_stop`. Blocks are indexed from 0 in order and each is closed before the next opens.
fn stream_response(st: Arc<AppState>, started: Started, id: String) -> Response {
    crate::streamed("text/event-stream", |tx| pump(st, started, id, tx))
}

async fn pump(
    st: Arc<AppState>,
    started: Started,
    id: String,
    tx: mpsc::Sender<Result<Bytes, std::convert::Infallible>>,
) {
    let Started {
        job,
        mut run,
        prompt_tokens,
    } = started;
    let send = |v: Value| {
        let tx = tx.clone();
        async move { tx.send(Ok(event(&v))).await.is_ok() }
    };
    let start = json!({"type": "message_start", "message": {
        "id": id, "type": "message", "role": "assistant", "model": job.model, "content": [],
        "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0}}});
    if !send(start).await || !send(json!({"type": "ping"})).await {
        return;
    }
    let tools = job.tools.clone().filter(tools::Tools::active);
    let mut hold = CallHold::new(tools.as_ref());
    let mut timing = Timing { last: vec![None] };
    // The index of the next block, and whether the text block (always the first) is open.
    let (mut next_index, mut text_open) = (0usize, false);
    // A ping every few seconds of silence (a long prefill, or a call held until it is whole),
    // so that clients' read timeouts and stream watchdogs see the stream alive.
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.reset();
    loop {
        let next = tokio::select! {
            next = run.next() => next,
            () = tx.closed() => return,
            _ = ping.tick() => {
                if !send(json!({"type": "ping"})).await {
                    return;
                }
                continue;
            }
        };
        ping.reset();
        let Some((_, ev, at)) = next else {
            return;
        };
        let ok = match ev {
            Event::Token { text, .. } => {
                timing.token(&st, run.arrived, 0, at);
                match hold.token(&text, None) {
                    Some((t, _)) if !t.is_empty() => {
                        let mut ok = true;
                        if !text_open {
                            ok = send(json!({"type": "content_block_start", "index": next_index,
                                             "content_block": {"type": "text", "text": ""}}))
                            .await;
                            text_open = true;
                        }
                        ok && send(json!({"type": "content_block_delta", "index": next_index,
                                          "delta": {"type": "text_delta", "text": t}}))
                        .await
                    }
                    _ => true,
                }
            }
            Event::Done {
                text,
                finish,
                usage,
                stop,
            } => {
                let mut events = Vec::new();
                let calls = match hold.done(&text, tools.as_ref()) {
                    Finale::Calls(calls) => Some(calls),
                    Finale::Text(t, _) => {
                        if !t.is_empty() {
                            if !text_open {
                                events.push(
                                    json!({"type": "content_block_start", "index": next_index,
                                                   "content_block": {"type": "text", "text": ""}}),
                                );
                                text_open = true;
                            }
                            events.push(json!({"type": "content_block_delta", "index": next_index,
                                               "delta": {"type": "text_delta", "text": t}}));
                        }
                        None
                    }
                };
                if text_open {
                    events.push(json!({"type": "content_block_stop", "index": next_index}));
                    next_index += 1;
                }
                for block in tool_use_blocks(&id, calls.as_deref().unwrap_or_default()) {
                    let arguments = block["input"].to_string();
                    let mut start = block.clone();
                    start["input"] = json!({});
                    events.push(json!({"type": "content_block_start", "index": next_index,
                                       "content_block": start}));
                    events.push(json!({"type": "content_block_delta", "index": next_index,
                                       "delta": {"type": "input_json_delta", "partial_json": arguments}}));
                    events.push(json!({"type": "content_block_stop", "index": next_index}));
                    next_index += 1;
                }
                let (reason, sequence) = stop_reason(
                    calls.is_some(),
                    finish,
                    stop,
                    usage.completion_tokens,
                    job.max_tokens,
                );
                events.push(json!({"type": "message_delta",
                                   "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                   "usage": {"output_tokens": usage.completion_tokens}}));
                events.push(json!({"type": "message_stop"}));
                for e in events {
                    if !send(e).await {
                        return;
                    }
                }
                run.guard.finished = true;
                st.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Event::Failed(why) => {
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                let _ = send(json!({"type": "error",
                                    "error": {"type": "api_error", "message": why}}))
                .await;
                return;
            }
            Event::GrammarFailed(why) => {
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                let _ = send(json!({"type": "error",
                                    "error": {"type": "invalid_request_error", "message": why}}))
                .await;
                return;
            }
        };
        if !ok {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(body: &str) -> ApiResult<Job> {
        parse(body.as_bytes(), false)
    }

    fn messages(j: &Job) -> &Vec<Value> {
        match &j.prompt_source {
            PromptSource::Messages(m) => m,
            _ => panic!("messages"),
        }
    }

    #[test]
    fn conversations_become_template_messages() {
        let j = job(r#"{"model":"m","max_tokens":2048,
            "system":[{"type":"text","text":"x-anthropic-billing-header: cc_version=2; cch=1a2b3;"},
                      {"type":"text","text":"You are terse.","cache_control":{"type":"ephemeral"}}],
            "messages":[
              {"role":"user","content":"Weather in Oslo and Rome?"},
              {"role":"assistant","content":[{"type":"thinking","thinking":"hm","signature":"s"},
                 {"type":"text","text":"Checking."},
                 {"type":"tool_use","id":"t1","name":"weather","input":{"city":"Oslo","unit":"C"}},
                 {"type":"tool_use","id":"t2","name":"weather","input":{"city":"Rome"}}]},
              {"role":"user","content":[
                 {"type":"tool_result","tool_use_id":"t1","content":"5 C"},
                 {"type":"tool_result","tool_use_id":"t2","content":[{"type":"text","text":"oops"}],"is_error":true},
                 {"type":"text","text":"Thanks."}]},
              {"role":"system","content":"Answer in French."},
              {"role":"user","content":"And Paris?"}],
            "tools":[{"name":"weather","description":"d","input_schema":{"type":"object"}}],
            "tool_choice":{"type":"auto","disable_parallel_tool_use":true},
            "thinking":{"type":"enabled","budget_tokens":1024},
            "metadata":{"user_id":"u"},"stop_sequences":["END"],"temperature":0.2,"top_k":5}"#)
        .unwrap();
        let m = messages(&j);
        assert_eq!(
            m[0],
            json!({"role": "system", "content": "You are terse.\nAnswer in French."})
        );
        assert_eq!(
            m[1],
            json!({"role": "user", "content": "Weather in Oslo and Rome?"})
        );
        assert_eq!(m[2]["content"], "Checking.");
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"], r#"{"city":"Oslo","unit":"C"}"#,
            "argument keys keep their order"
        );
        assert_eq!(
            m[3],
            json!({"role": "tool", "content": "5 C", "tool_call_id": "t1", "name": "weather"})
        );
        assert_eq!(m[4]["content"], "Error: oops");
        // The user's text of the tool-result turn and the next user turn merge.
        assert_eq!(
            m[5],
            json!({"role": "user", "content": "Thanks.\nAnd Paris?"})
        );
        assert_eq!(m.len(), 6);
        let t = j.tools.as_ref().unwrap();
        assert!(!t.parallel);
        assert_eq!(
            (j.max_tokens, j.stop.as_slice()),
            (Some(2048), &["END".to_string()][..])
        );
        assert_eq!((j.sampling.temperature, j.sampling.top_k), (0.2, 5));
        assert!(!j.stream);
    }

    #[test]
    fn tool_choice_any_and_tool_force_a_call() {
        let base = r#""model":"m","max_tokens":9,"messages":[{"role":"user","content":"x"}],
            "tools":[{"name":"a","input_schema":{"type":"object"}},{"name":"b","input_schema":{"type":"object"}}]"#;
        let any = job(&format!(r#"{{{base},"tool_choice":{{"type":"any"}}}}"#)).unwrap();
        assert!(any.grammar.is_some());
        let named = job(&format!(
            r#"{{{base},"tool_choice":{{"type":"tool","name":"b"}}}}"#
        ))
        .unwrap();
        assert!(named.grammar.is_some());
        let none = job(&format!(r#"{{{base},"tool_choice":{{"type":"none"}}}}"#)).unwrap();
        assert!(none.grammar.is_none() && !none.tools.as_ref().unwrap().active());
        let e = job(&format!(
            r#"{{{base},"tool_choice":{{"type":"tool","name":"zz"}}}}"#
        ))
        .unwrap_err();
        assert!(e.message.contains("zz"), "{}", e.message);
    }

    #[test]
    fn what_herd_cannot_do_is_a_400_naming_it() {
        let user = r#"{"role":"user","content":"x"}"#;
        let cases = [
            (format!(r#"{{"model":"m","messages":[{user}]}}"#), "max_tokens"),
            (format!(r#"{{"model":"m","max_tokens":0,"messages":[{user}]}}"#), "max_tokens"),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"aGk="}}]}]}"#.to_string(),
                "image blocks are not supported",
            ),
            (
                format!(r#"{{"model":"m","max_tokens":5,"messages":[{user},{{"role":"assistant","content":"The answer is"}}]}}"#),
                "prefill",
            ),
            (format!(r#"{{"model":"m","max_tokens":5,"messages":[{user}],"temperature":1.5}}"#), "temperature"),
            (
                format!(r#"{{"model":"m","max_tokens":5,"messages":[{user}],"tools":[{{"type":"web_search_20250305","name":"web_search","input_schema":{{}}}}]}}"#),
                "server tool",
            ),
            (
                format!(r#"{{"model":"m","max_tokens":5,"messages":[{user}],"context_management":{{"edits":[{{"type":"clear_tool_uses_20250919"}}]}}}}"#),
                "clear_tool_uses",
            ),
            (
                format!(r#"{{"model":"m","max_tokens":5,"messages":[{user}],"tools":[{{"type":"web_search_20250305","name":"web_search","max_uses":5}}]}}"#),
                "server tool",
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"aGk="}}]}]}]}"#.to_string(),
                "image blocks are not supported",
            ),
            (format!(r#"{{"model":"m","max_tokens":5,"messages":[{user}],"speed":"fast"}}"#), "speed"),
            (
                format!(r#"{{"model":"m","max_tokens":5,"messages":[{user}],"context_management":{{"edits":[{{"keep":1}}]}}}}"#),
                "context_management",
            ),
            (
                format!(r#"{{"model":"m","max_tokens":5,"messages":[{user}],"output_config":{{"format":{{"type":"json_schema","schema":{{"type":"object"}}}}}},"output_format":{{"type":"json_schema","schema":{{"type":"object"}}}}}}"#),
                "output_format",
            ),
            (format!(r#"{{"model":"m","max_tokens":5,"messages":[{user}],"container":"c"}}"#), "container"),
            (
                format!(r#"{{"model":"m","max_tokens":5,"messages":[{user}],"system":[{{"type":"text","text":"s","cache_control":{{"type":"forever"}}}}]}}"#),
                "system",
            ),
            (r#"{"model":"m","max_tokens":5,"messages":[]}"#.to_string(), "messages"),
        ];
        for (body, needle) in cases {
            let e = job(&body).expect_err(&body);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(
                e.message.contains(needle) || e.param.as_deref() == Some(needle),
                "{body}: {} ({:?})",
                e.message,
                e.param
            );
        }
        // A tool result must answer an earlier tool_use.
        let body = r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"nope","content":"5"}]}]}"#;
        let e = job(body).expect_err(body);
        assert!(e.message.contains("matching tool_use"), "{}", e.message);
        // Content that renders nothing leaves nothing to answer.
        for content in [
            r#"[]"#,
            r#"[{"type":"thinking","thinking":"t","signature":"s"}]"#,
        ] {
            let body = format!(
                r#"{{"model":"m","max_tokens":5,"messages":[{{"role":"user","content":{content}}}]}}"#
            );
            let e = job(&body).expect_err(&body);
            assert!(e.message.contains("no message to answer"), "{}", e.message);
        }
        // count_tokens refuses what is about generating.
        let e = parse(
            format!(r#"{{"model":"m","max_tokens":5,"messages":[{user}]}}"#).as_bytes(),
            true,
        )
        .expect_err("max_tokens when counting");
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        // count_tokens takes no max_tokens.
        assert!(
            parse(
                format!(r#"{{"model":"m","messages":[{user}]}}"#).as_bytes(),
                true
            )
            .is_ok()
        );
    }

    #[test]
    fn stop_reasons_follow_how_the_turn_ended() {
        let m = Some(10);
        assert_eq!(
            stop_reason(true, FinishReason::Stop, None, 3, m).0,
            "tool_use"
        );
        assert_eq!(
            stop_reason(false, FinishReason::Length, None, 10, m).0,
            "max_tokens"
        );
        assert_eq!(
            stop_reason(false, FinishReason::Length, None, 4, m).0,
            "model_context_window_exceeded"
        );
        assert_eq!(
            stop_reason(false, FinishReason::Stop, Some("END".into()), 3, m),
            ("stop_sequence", json!("END"))
        );
        assert_eq!(
            stop_reason(false, FinishReason::Stop, None, 3, m).0,
            "end_turn"
        );
        assert_eq!(error_type(StatusCode::NOT_FOUND), "not_found_error");
        assert_eq!(
            error_type(StatusCode::from_u16(529).unwrap()),
            "overloaded_error"
        );
    }
}
