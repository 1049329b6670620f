//! OpenAI's Responses API (`POST /v1/responses`), stateless, as a translation layer: `input`
//! (a string, or message, `function_call` and `function_call_output` items) and
//! `instructions` become chat-template messages, flat function tools and `tool_choice`
//! (including `allowed_tools`) become herd's tools, `text.format` an output constraint, and
//! the [`Job`] runs on the same scheduler, sampler, constraints and tool machinery as Chat
//! Completions. The answer is a full response object, or a stream of typed events numbered by
//! `sequence_number`. Reference: `shared/reference/openai-responses.md`.
//!
//! Stateless, so: nothing is stored (`store` is accepted and reported `false`);
//! `previous_response_id`, `background`, `item_reference` items and `GET`/`DELETE
//! /v1/responses/{id}` are clear 400s and 404s rather than silently context-free answers.
//! `reasoning` is accepted and produces no reasoning item (herd's models have no reasoning
//! mode); reasoning items sent back in `input` are not rendered. `metadata` is echoed;
//! `user`, `safety_identifier`, `prompt_cache_key` and `service_tier` are informational
//! (herd's prefix cache needs no key). Images, files, built-in tools, `include` of anything
//! but reasoning content, `truncation: "auto"` and `top_logprobs` are 400s naming them.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use herd_engine::constraint::Grammar;
use herd_engine::generate::FinishReason;
use herd_engine::sampler::SamplingParams;
use herd_engine::scheduler::{Event, Usage};
use serde::Deserialize;
use serde::de::IgnoredAny;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::conversation::{self, Ending};
use crate::openai::{self, ApiError, ApiResult, Job, PromptSource};
use crate::request::{self, Schema, TextOr};
use crate::{AppState, CallHold, Finale, Started, Timing, tools};

/// The routes.
pub fn routes() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route("/v1/responses", post(create))
        .route("/v1/responses/{*rest}", any(stored))
}

/// Stored responses (`GET /v1/responses/{id}`, `DELETE`, `/cancel`, `/input_items`): herd keeps
/// none.
async fn stored(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = crate::authorize(&st, &headers) {
        return crate::error_response(&e);
    }
    crate::error_response(
        &ApiError::bad_request(
            "herd stores no responses: there is nothing to retrieve, cancel or delete (send \
             the conversation in 'input' instead)",
        )
        .status(StatusCode::NOT_FOUND, "not_found_error"),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    model: String,
    input: Input,
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    text: Option<TextConfig>,
    tools: Option<Vec<Tool>>,
    tool_choice: Option<ToolChoice>,
    parallel_tool_calls: Option<bool>,
    store: Option<bool>,
    previous_response_id: Option<String>,
    background: Option<bool>,
    reasoning: Option<Reasoning>,
    metadata: Option<Map<String, Value>>,
    include: Option<Vec<String>>,
    truncation: Option<String>,
    top_logprobs: Option<u32>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    #[serde(rename = "user")]
    _user: Option<String>,
    #[serde(rename = "safety_identifier")]
    _safety_identifier: Option<String>,
    #[serde(rename = "prompt_cache_key")]
    _prompt_cache_key: Option<String>,
    #[serde(rename = "service_tier")]
    _service_tier: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamOptions {
    #[serde(rename = "include_obfuscation")]
    _include_obfuscation: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Reasoning {
    #[serde(rename = "effort")]
    _effort: Option<String>,
    #[serde(rename = "summary")]
    _summary: Option<String>,
    #[serde(rename = "generate_summary")]
    _generate_summary: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TextConfig {
    format: Option<Format>,
    #[serde(rename = "verbosity")]
    _verbosity: Option<String>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Format {
    Text,
    JsonObject,
    JsonSchema {
        name: Option<String>,
        schema: Schema,
        #[serde(skip_serializing_if = "Option::is_none")]
        description: Option<String>,
        /// Always enforced; `false` is accepted and still enforced.
        #[serde(skip_serializing_if = "Option::is_none")]
        strict: Option<bool>,
    },
}

impl serde::Serialize for Schema {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.clone().into_value().serialize(s)
    }
}

/// A tool: functions only (flat, as Responses writes them).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
struct Tool {
    #[serde(rename = "type")]
    kind: String,
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    parameters: Option<Map<String, Value>>,
    strict: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(
    untagged,
    expecting = "\"none\", \"auto\", \"required\", a function or allowed tools"
)]
enum ToolChoice {
    Mode(String),
    Object(Map<String, Value>),
}

/// `tool_choice: {"type": "function", "name"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FunctionChoice {
    #[serde(rename = "type")]
    _kind: String,
    name: String,
}

/// `tool_choice: {"type": "allowed_tools", "mode", "tools": [{"type": "function", "name"}]}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowedTools {
    #[serde(rename = "type")]
    _kind: String,
    mode: Option<String>,
    tools: Vec<AllowedTool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowedTool {
    #[serde(rename = "type")]
    kind: String,
    name: String,
}

/// A `tool_choice` object read into its shape; a field it does not have is a 400 naming it.
fn choice_as<T: serde::de::DeserializeOwned>(o: Map<String, Value>) -> ApiResult<T> {
    serde_json::from_value(Value::Object(o))
        .map_err(|e| bad(format!("tool_choice: {e}"), "tool_choice"))
}

/// `input`: a string (one user message) or items.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a string or a list of input items")]
enum Input {
    Text(String),
    Items(Vec<Map<String, Value>>),
}

/// A message item (the `type` may be absent: an "easy" message).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageItem {
    #[serde(rename = "type")]
    _kind: Option<String>,
    role: String,
    content: MessageContent,
    /// Echoed back from an earlier response's output.
    #[serde(rename = "id")]
    _id: Option<String>,
    #[serde(rename = "status")]
    _status: Option<String>,
    #[serde(rename = "phase")]
    _phase: Option<IgnoredAny>,
}

/// A string or content parts (a part's own error, an `input_image`, reaches the client).
type MessageContent = TextOr<Part>;

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Part {
    InputText {
        text: String,
    },
    OutputText {
        text: String,
        #[serde(rename = "annotations")]
        _annotations: Option<IgnoredAny>,
        #[serde(rename = "logprobs")]
        _logprobs: Option<IgnoredAny>,
    },
    Refusal {
        refusal: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FunctionCallItem {
    #[serde(rename = "type")]
    _kind: String,
    call_id: String,
    name: String,
    arguments: String,
    #[serde(rename = "id")]
    _id: Option<String>,
    #[serde(rename = "status")]
    _status: Option<String>,
    /// Namespaced (MCP) tools are not run here: accepted only when empty, as clients echo it.
    #[serde(rename = "namespace")]
    _namespace: Option<request::Echoed>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FunctionCallOutputItem {
    #[serde(rename = "type")]
    _kind: String,
    call_id: String,
    output: MessageContent,
    #[serde(rename = "id")]
    _id: Option<String>,
    #[serde(rename = "status")]
    _status: Option<String>,
}

fn bad(message: String, param: &str) -> ApiError {
    ApiError::bad_request(message).param(param)
}

/// Read one item as `T`, a 400 naming the item and field when it does not read.
fn item_as<T: serde::de::DeserializeOwned>(i: usize, item: Map<String, Value>) -> ApiResult<T> {
    serde_path_to_error::deserialize(Value::Object(item)).map_err(|e| {
        let path = e.path().to_string();
        let at = if path == "." {
            format!("input[{i}]")
        } else {
            format!("input[{i}].{path}")
        };
        let message = e.into_inner().to_string();
        let unknown = message.starts_with("unknown field");
        let err = bad(format!("{at}: {message}"), "input");
        if unknown || message.starts_with("unknown variant") {
            err.code("unsupported_field")
        } else {
            err
        }
    })
}

fn content_text(i: usize, c: MessageContent) -> String {
    let _ = i;
    match c {
        MessageContent::Text(t) => t,
        MessageContent::List(parts) => parts
            .into_iter()
            .map(|p| match p {
                Part::InputText { text } | Part::OutputText { text, .. } => text,
                Part::Refusal { refusal } => refusal,
            })
            .collect::<Vec<_>>()
            .join(""),
    }
}

/// `instructions` and `input` as chat-template messages: consecutive function calls join the
/// assistant turn before them; outputs become tool messages naming their function.
fn template_messages(instructions: Option<String>, input: Input) -> ApiResult<Vec<Value>> {
    let mut out: Vec<Value> = Vec::new();
    if let Some(s) = instructions {
        out.push(json!({"role": "system", "content": s}));
    }
    let items = match input {
        Input::Text(t) => {
            out.push(json!({"role": "user", "content": t}));
            return conversation::shape(out, Ending::Answer, "input");
        }
        Input::Items(items) => items,
    };
    if items.is_empty() {
        return Err(bad("'input' must not be empty".into(), "input"));
    }
    let mut names: HashMap<String, String> = HashMap::new();
    for (i, item) in items.into_iter().enumerate() {
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message")
            .to_string();
        match kind.as_str() {
            "message" => {
                let m: MessageItem = item_as(i, item)?;
                let role = match m.role.as_str() {
                    "user" | "assistant" | "system" => m.role.clone(),
                    "developer" => "system".into(),
                    other => {
                        return Err(bad(format!("input[{i}]: unknown role '{other}'"), "input"));
                    }
                };
                out.push(json!({"role": role, "content": content_text(i, m.content)}));
            }
            "function_call" => {
                let c: FunctionCallItem = item_as(i, item)?;
                names.insert(c.call_id.clone(), c.name.clone());
                let call = json!({"id": c.call_id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}});
                match out.last_mut() {
                    Some(last) if last["role"] == "assistant" => match last.get_mut("tool_calls") {
                        Some(Value::Array(calls)) => calls.push(call),
                        _ => last["tool_calls"] = json!([call]),
                    },
                    _ => out
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            "function_call_output" => {
                let o: FunctionCallOutputItem = item_as(i, item)?;
                let mut m = json!({"role": "tool", "content": content_text(i, o.output),
                                   "tool_call_id": o.call_id});
                if let Some(n) = names.get(&o.call_id) {
                    m["name"] = Value::String(n.clone());
                }
                out.push(m);
            }
            // Reasoning from an earlier turn: herd's models have none to continue.
            "reasoning" => {}
            "item_reference" => {
                return Err(bad(
                    format!("input[{i}]: item_reference needs stored items, and herd stores none"),
                    "input",
                ));
            }
            other => {
                return Err(bad(
                    format!("input[{i}]: items of type '{other}' are not supported"),
                    "input",
                )
                .code("unsupported_field"));
            }
        }
    }
    // Developer and system items lead as one system message, runs of one role join, and
    // items that render nothing (reasoning only) leave nothing to answer.
    conversation::shape(out, Ending::Answer, "input")
}

/// The tools and `tool_choice` as herd's tools.
fn tools_of(
    list: Option<Vec<Tool>>,
    choice: Option<ToolChoice>,
    parallel: Option<bool>,
) -> ApiResult<Option<tools::Tools>> {
    let mut functions = Vec::new();
    for (i, t) in list.unwrap_or_default().into_iter().enumerate() {
        if t.kind != "function" {
            return Err(bad(
                format!(
                    "tools[{i}]: the built-in tool '{}' is not supported: herd runs function tools",
                    t.kind
                ),
                "tools",
            )
            .code("unsupported_field"));
        }
        let Some(name) = t.name else {
            return Err(bad(format!("tools[{i}]: 'name' is required"), "tools"));
        };
        functions.push(request::Tool::Function {
            function: request::FunctionDef {
                name,
                description: t.description,
                parameters: t.parameters,
                strict: t.strict,
            },
        });
    }
    let mode = |m: &str| -> ApiResult<request::ToolMode> {
        match m {
            "none" => Ok(request::ToolMode::None),
            "auto" => Ok(request::ToolMode::Auto),
            "required" => Ok(request::ToolMode::Required),
            other => Err(bad(
                format!("tool_choice: unknown mode '{other}'"),
                "tool_choice",
            )),
        }
    };
    let choice = match choice {
        None => None,
        Some(ToolChoice::Mode(m)) => Some(request::ToolChoice::Mode(mode(&m)?)),
        Some(ToolChoice::Object(o)) => match o.get("type").and_then(Value::as_str) {
            Some("function") => {
                let f: FunctionChoice = choice_as(o)?;
                Some(request::ToolChoice::Named(request::NamedTool::Function {
                    function: request::FunctionName { name: f.name },
                }))
            }
            Some("allowed_tools") => {
                // Only the listed functions are offered, in the given mode; each must be one
                // of `tools`.
                let a: AllowedTools = choice_as(o)?;
                for (i, t) in a.tools.iter().enumerate() {
                    let known = functions
                        .iter()
                        .any(|request::Tool::Function { function }| function.name == t.name);
                    if t.kind != "function" || !known {
                        return Err(bad(
                            format!(
                                "tool_choice.tools[{i}]: '{}' is not a function in 'tools'",
                                t.name
                            ),
                            "tool_choice",
                        ));
                    }
                }
                functions.retain(|request::Tool::Function { function }| {
                    a.tools.iter().any(|t| t.name == function.name)
                });
                Some(request::ToolChoice::Mode(mode(
                    a.mode.as_deref().unwrap_or("auto"),
                )?))
            }
            other => {
                return Err(bad(
                    format!(
                        "tool_choice: '{}' is not supported: herd runs function tools",
                        other.unwrap_or("?")
                    ),
                    "tool_choice",
                )
                .code("unsupported_field"));
            }
        },
    };
    let functions = (!functions.is_empty()).then_some(functions);
    crate::tools::parse(functions, choice, parallel)
}

/// What the response object echoes of the request.
#[derive(Debug, Clone)]
struct Echo {
    instructions: Option<String>,
    max_output_tokens: Option<u32>,
    temperature: f64,
    top_p: f64,
    tools: Vec<Tool>,
    tool_choice: Value,
    parallel_tool_calls: bool,
    format: Format,
    metadata: Map<String, Value>,
}

fn parse(body: &[u8]) -> ApiResult<(Job, Echo)> {
    openai::json_object(body)?;
    let req: CreateRequest = request::parse_as(body).map_err(openai::parse_error)?;
    if req.previous_response_id.is_some() {
        return Err(bad(
            "herd stores no responses, so 'previous_response_id' has nothing to refer to: send \
             the conversation in 'input'"
                .into(),
            "previous_response_id",
        ));
    }
    if req.background == Some(true) {
        return Err(bad(
            "'background' responses need storage, which herd does not keep".into(),
            "background",
        ));
    }
    if let Some(t) = req.truncation.as_deref()
        && t != "disabled"
    {
        return Err(bad(
            format!("'truncation' {t:?} is not supported: an input over the context is a 400"),
            "truncation",
        ));
    }
    if req.top_logprobs.is_some_and(|n| n > 0) {
        return Err(bad(
            "'top_logprobs' is not supported on /v1/responses".into(),
            "top_logprobs",
        )
        .code("unsupported_field"));
    }
    if let Some(bad_include) = req
        .include
        .iter()
        .flatten()
        .find(|i| !i.starts_with("reasoning."))
    {
        return Err(bad(
            format!("'include' of {bad_include:?} is not supported"),
            "include",
        )
        .code("unsupported_field"));
    }
    let _ = (req.reasoning, req.stream_options, req.store);
    let range = |key: &str, v: Option<f64>, hi: f64| -> ApiResult<f64> {
        match v {
            Some(x) if !(0.0..=hi).contains(&x) => {
                Err(bad(format!("'{key}' must be between 0 and {hi}"), key))
            }
            v => Ok(v.unwrap_or(1.0)),
        }
    };
    let temperature = range("temperature", req.temperature, 2.0)?;
    let top_p = range("top_p", req.top_p, 1.0)?;
    if req.max_output_tokens == Some(0) {
        return Err(bad(
            "'max_output_tokens' must be at least 1".into(),
            "max_output_tokens",
        ));
    }
    let tool_choice = req.tool_choice.clone().map_or(json!("auto"), |c| {
        serde_json::to_value(c).unwrap_or(Value::Null)
    });
    let echoed_tools = req.tools.clone().unwrap_or_default();
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    let tools = tools_of(req.tools, req.tool_choice, req.parallel_tool_calls)?;
    let format = req.text.and_then(|t| t.format).unwrap_or(Format::Text);
    let mut grammar = match &format {
        Format::Text => None,
        Format::JsonObject => Some(Grammar::json_object()),
        Format::JsonSchema { schema, .. } => Some(Grammar::JsonSchema(schema.clone().into_value())),
    };
    if let Some(t) = &tools
        && let Some(schema) = t.forced_schema()
    {
        if grammar.is_some() {
            return Err(bad(
                "a required tool call and 'text.format' cannot be combined".into(),
                "tool_choice",
            ));
        }
        grammar = Some(if t.parallel {
            Grammar::CallList(schema)
        } else {
            Grammar::JsonSchema(schema)
        });
    }
    let messages = template_messages(req.instructions.clone(), req.input)?;
    let echo = Echo {
        instructions: req.instructions,
        max_output_tokens: req.max_output_tokens,
        temperature,
        top_p,
        tools: echoed_tools,
        tool_choice,
        parallel_tool_calls: parallel,
        format,
        metadata: req.metadata.unwrap_or_default(),
    };
    let job = Job {
        model: req.model,
        prompt_source: PromptSource::Messages(messages),
        max_tokens: req.max_output_tokens.map(|m| m as usize),
        max_tokens_field: "max_output_tokens",
        max_tokens_is_bound: false,
        stop: Vec::new(),
        sampling: SamplingParams {
            temperature: temperature as f32,
            top_p: top_p as f32,
            ..SamplingParams::default()
        },
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
    };
    Ok((job, echo))
}

async fn create(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let mut echo = None;
    let started = crate::start(&st, &headers, body, |b| {
        parse(b).map(|(job, e)| {
            echo = Some(e);
            job
        })
    })
    .await;
    match (started, echo) {
        (Ok(started), Some(echo)) => {
            let ids = Ids::new(started.run.guard.ids.first().copied().unwrap_or_default());
            let shell = Shell {
                ids,
                model: started.job.model.clone(),
                created_at: crate::unix_now(),
                echo,
            };
            if started.job.stream {
                stream_response(st, started, shell)
            } else {
                whole_response(st, started, shell).await
            }
        }
        (Err(e), _) => crate::error_response(&e),
        (Ok(_), None) => crate::error_response(
            &ApiError::bad_request("internal error")
                .status(StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        ),
    }
}

/// The ids of one response and its items, made once (stable across a stream's events).
#[derive(Debug, Clone)]
struct Ids {
    response: String,
    message: String,
    tag: String,
}

impl Ids {
    fn new(seq: u64) -> Self {
        let tag = format!("{:x}{seq:x}", crate::unix_now());
        Self {
            response: format!("resp_{tag}"),
            message: format!("msg_{tag}"),
            tag,
        }
    }

    fn call(&self, k: usize) -> (String, String) {
        (
            format!("fc_{}_{k}", self.tag),
            format!("call_{}_{k}", self.tag),
        )
    }
}

/// The response object's fields that do not change while it is produced.
struct Shell {
    ids: Ids,
    model: String,
    created_at: u64,
    echo: Echo,
}

impl Shell {
    /// The full response object with `status`, `output` and `usage`.
    fn object(&self, status: &str, output: Vec<Value>, usage: Option<(usize, &Usage)>) -> Value {
        let e = &self.echo;
        let usage = usage.map_or(Value::Null, |(prompt, u)| {
            json!({"input_tokens": prompt,
                   "input_tokens_details": {"cached_tokens": u.cached_tokens},
                   "output_tokens": u.completion_tokens,
                   "output_tokens_details": {"reasoning_tokens": 0},
                   "total_tokens": prompt + u.completion_tokens})
        });
        json!({
            "id": self.ids.response, "object": "response", "created_at": self.created_at,
            "status": status, "model": self.model, "output": output, "usage": usage,
            "error": null,
            "incomplete_details": if status == "incomplete" {
                json!({"reason": "max_output_tokens"})
            } else {
                Value::Null
            },
            "instructions": e.instructions, "max_output_tokens": e.max_output_tokens,
            "parallel_tool_calls": e.parallel_tool_calls, "tool_choice": e.tool_choice,
            "tools": e.tools, "temperature": e.temperature, "top_p": e.top_p,
            "text": {"format": e.format}, "store": false, "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "metadata": e.metadata,
        })
    }

    fn message_item(&self, text: &str, status: &str) -> Value {
        json!({"type": "message", "id": self.ids.message, "role": "assistant", "status": status,
               "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
    }

    fn call_item(&self, k: usize, call: &tools::Call, arguments: &str, status: &str) -> Value {
        let (id, call_id) = self.ids.call(k);
        json!({"type": "function_call", "id": id, "call_id": call_id, "name": call.name,
               "arguments": arguments, "status": status})
    }
}

/// `completed`, or `incomplete` when the token limit ended it.
fn status_of(finish: FinishReason, calls: bool) -> &'static str {
    match (finish, calls) {
        (FinishReason::Length, false) => "incomplete",
        _ => "completed",
    }
}

async fn whole_response(st: Arc<AppState>, started: Started, shell: Shell) -> Response {
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
                ..
            } => {
                let (output, calls) = match hold.done(&last, tools.as_ref()) {
                    Finale::Calls(calls) => (
                        calls
                            .iter()
                            .enumerate()
                            .map(|(k, c)| shell.call_item(k, c, &c.arguments, "completed"))
                            .collect(),
                        true,
                    ),
                    Finale::Text(t, _) => {
                        text.push_str(&t);
                        let status = status_of(finish, false);
                        (vec![shell.message_item(&text, status)], false)
                    }
                };
                run.guard.finished = true;
                st.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
                let status = status_of(finish, calls);
                return axum::Json(shell.object(status, output, Some((prompt_tokens, &usage))))
                    .into_response();
            }
            Event::Failed(why) => {
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                return crate::error_response(
                    &ApiError::bad_request(why)
                        .status(StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
                );
            }
            Event::GrammarFailed(why) => {
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                return crate::error_response(&crate::grammar_failed(why));
            }
        }
    }
    crate::error_response(
        &ApiError::bad_request("the engine stopped")
            .status(StatusCode::SERVICE_UNAVAILABLE, "server_error"),
    )
}

/// The event stream: `response.created`, `response.in_progress`; the message item when text
/// comes (`output_item.added`, `content_part.added`, `output_text.delta`s, then the `.done`
/// events); one `function_call` item per call (added with empty arguments, the arguments in
/// one delta, done); then `response.completed` or `response.incomplete` with the whole
/// response, or `response.failed`. Every event carries its `sequence_number`, from 0.
fn stream_response(st: Arc<AppState>, started: Started, shell: Shell) -> Response {
    crate::streamed("text/event-stream", |tx| pump(st, started, shell, tx))
}

/// Numbers events and sends them.
struct Events {
    tx: mpsc::Sender<Result<Bytes, std::convert::Infallible>>,
    next: u64,
}

impl Events {
    async fn send(&mut self, mut v: Value) -> bool {
        v["sequence_number"] = Value::from(self.next);
        self.next += 1;
        let name = v["type"].as_str().unwrap_or("error").to_string();
        self.tx
            .send(Ok(Bytes::from(format!("event: {name}\ndata: {v}\n\n"))))
            .await
            .is_ok()
    }
}

async fn pump(
    st: Arc<AppState>,
    started: Started,
    shell: Shell,
    tx: mpsc::Sender<Result<Bytes, std::convert::Infallible>>,
) {
    let Started {
        job,
        mut run,
        prompt_tokens,
    } = started;
    let mut ev = Events {
        tx: tx.clone(),
        next: 0,
    };
    let shell_now = shell.object("in_progress", Vec::new(), None);
    if !ev
        .send(json!({"type": "response.created", "response": shell_now}))
        .await
        || !ev
            .send(json!({"type": "response.in_progress",
                         "response": shell.object("in_progress", Vec::new(), None)}))
            .await
    {
        return;
    }
    let tools = job.tools.clone().filter(tools::Tools::active);
    let mut hold = CallHold::new(tools.as_ref());
    let mut timing = Timing { last: vec![None] };
    let mut text = String::new();
    let mut message_open = false;
    let msg_id = shell.ids.message.clone();
    let opening = [
        json!({"type": "response.output_item.added", "output_index": 0,
               "item": {"type": "message", "id": msg_id, "role": "assistant",
                        "status": "in_progress", "content": []}}),
        json!({"type": "response.content_part.added", "item_id": msg_id,
               "output_index": 0, "content_index": 0,
               "part": {"type": "output_text", "text": "", "annotations": []}}),
    ];
    loop {
        let next = tokio::select! {
            next = run.next() => next,
            () = tx.closed() => return,
        };
        let Some((_, event, at)) = next else {
            return;
        };
        match event {
            Event::Token { text: piece, .. } => {
                timing.token(&st, run.arrived, 0, at);
                if let Some((t, _)) = hold.token(&piece, None)
                    && !t.is_empty()
                {
                    if !message_open {
                        message_open = true;
                        for e in opening.clone() {
                            if !ev.send(e).await {
                                return;
                            }
                        }
                    }
                    text.push_str(&t);
                    let delta = json!({"type": "response.output_text.delta", "item_id": msg_id,
                                       "output_index": 0, "content_index": 0, "delta": t,
                                       "logprobs": []});
                    if !ev.send(delta).await {
                        return;
                    }
                }
            }
            Event::Done {
                text: last,
                finish,
                usage,
                ..
            } => {
                let calls = match hold.done(&last, tools.as_ref()) {
                    Finale::Calls(calls) => calls,
                    Finale::Text(t, _) => {
                        if !t.is_empty() {
                            if !message_open {
                                message_open = true;
                                for e in opening.clone() {
                                    if !ev.send(e).await {
                                        return;
                                    }
                                }
                            }
                            text.push_str(&t);
                            let delta = json!({"type": "response.output_text.delta",
                                               "item_id": msg_id, "output_index": 0,
                                               "content_index": 0, "delta": t, "logprobs": []});
                            if !ev.send(delta).await {
                                return;
                            }
                        }
                        Vec::new()
                    }
                };
                let mut output = Vec::new();
                let mut events = Vec::new();
                if message_open {
                    let status = status_of(finish, false);
                    events.push(
                        json!({"type": "response.output_text.done", "item_id": msg_id,
                                       "output_index": 0, "content_index": 0, "text": text,
                                       "logprobs": []}),
                    );
                    events.push(json!({"type": "response.content_part.done", "item_id": msg_id,
                                       "output_index": 0, "content_index": 0,
                                       "part": {"type": "output_text", "text": text, "annotations": []}}));
                    let item = shell.message_item(&text, status);
                    events.push(
                        json!({"type": "response.output_item.done", "output_index": 0,
                                       "item": item}),
                    );
                    output.push(item);
                }
                for (k, c) in calls.iter().enumerate() {
                    let index = output.len();
                    let (item_id, _) = shell.ids.call(k);
                    events.push(
                        json!({"type": "response.output_item.added", "output_index": index,
                                       "item": shell.call_item(k, c, "", "in_progress")}),
                    );
                    events.push(json!({"type": "response.function_call_arguments.delta",
                                       "item_id": item_id, "output_index": index,
                                       "delta": c.arguments}));
                    events.push(json!({"type": "response.function_call_arguments.done",
                                       "item_id": item_id, "output_index": index, "name": c.name,
                                       "arguments": c.arguments}));
                    let item = shell.call_item(k, c, &c.arguments, "completed");
                    events.push(
                        json!({"type": "response.output_item.done", "output_index": index,
                                       "item": item}),
                    );
                    output.push(item);
                }
                let status = status_of(finish, !calls.is_empty());
                let kind = if status == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                events.push(json!({"type": kind,
                                   "response": shell.object(status, output, Some((prompt_tokens, &usage)))}));
                for e in events {
                    if !ev.send(e).await {
                        return;
                    }
                }
                run.guard.finished = true;
                st.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Event::Failed(why) | Event::GrammarFailed(why) => {
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                let mut failed = shell.object("failed", Vec::new(), None);
                failed["error"] = json!({"code": "server_error", "message": why});
                let _ = ev
                    .send(json!({"type": "response.failed", "response": failed}))
                    .await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(body: &str) -> ApiResult<(Job, Echo)> {
        parse(body.as_bytes())
    }

    #[test]
    fn input_items_become_template_messages() {
        let (job, echo) = parsed(
            r#"{"model":"m","instructions":"Be brief.","input":[
                {"role":"user","content":"Weather in Oslo?"},
                {"type":"reasoning","id":"rs_1","summary":[]},
                {"type":"message","id":"msg_1","role":"assistant","status":"completed",
                 "content":[{"type":"output_text","text":"Checking.","annotations":[],"logprobs":[]}]},
                {"type":"function_call","id":"fc_1","call_id":"c1","name":"weather","arguments":"{\"city\":\"Oslo\"}","status":"completed"},
                {"type":"function_call_output","call_id":"c1","output":"5 C"},
                {"role":"developer","content":[{"type":"input_text","text":"Use Celsius."}]}],
              "tools":[{"type":"function","name":"weather","parameters":{"type":"object"},"strict":null},
                       {"type":"function","name":"time","parameters":null,"strict":null}],
              "tool_choice":{"type":"allowed_tools","mode":"auto","tools":[{"type":"function","name":"weather"}]},
              "store":true,"metadata":{"k":"v"},"include":["reasoning.encrypted_content"],
              "reasoning":{"effort":"low"},"max_output_tokens":50,"stream":true}"#,
        )
        .unwrap();
        let PromptSource::Messages(m) = &job.prompt_source else {
            panic!("messages")
        };
        // System and developer text leads, as one system message.
        assert_eq!(
            m[0],
            json!({"role": "system", "content": "Be brief.\n\nUse Celsius."})
        );
        assert_eq!(m[1], json!({"role": "user", "content": "Weather in Oslo?"}));
        assert_eq!(m[2]["content"], "Checking.");
        assert_eq!(m[2]["tool_calls"][0]["id"], "c1");
        assert_eq!(
            m[3],
            json!({"role": "tool", "content": "5 C", "tool_call_id": "c1", "name": "weather"})
        );
        assert_eq!(m.len(), 4);
        // allowed_tools keeps only the listed functions.
        let t = job.tools.as_ref().unwrap();
        assert_eq!(t.functions.len(), 1);
        assert_eq!((job.max_tokens, job.stream), (Some(50), true));
        assert_eq!(echo.metadata["k"], "v");
        let (one, _) =
            parsed(r#"{"model":"m","input":"hi","text":{"format":{"type":"json_object"}}}"#)
                .unwrap();
        assert!(one.grammar.is_some());
    }

    #[test]
    fn what_needs_state_or_is_missing_is_a_400_naming_it() {
        let cases = [
            (
                r#"{"model":"m","input":"x","previous_response_id":"resp_1"}"#,
                "previous_response_id",
            ),
            (
                r#"{"model":"m","input":"x","background":true}"#,
                "background",
            ),
            (
                r#"{"model":"m","input":"x","conversation":"c"}"#,
                "conversation",
            ),
            (
                r#"{"model":"m","input":"x","truncation":"auto"}"#,
                "truncation",
            ),
            (
                r#"{"model":"m","input":"x","include":["message.output_text.logprobs"]}"#,
                "include",
            ),
            (
                r#"{"model":"m","input":"x","tools":[{"type":"web_search"}]}"#,
                "web_search",
            ),
            (
                r#"{"model":"m","input":[{"type":"item_reference","id":"msg_1"}]}"#,
                "item_reference",
            ),
            (
                r#"{"model":"m","input":[{"role":"user","content":[{"type":"input_image","image_url":"data:"}]}]}"#,
                "input_image",
            ),
            (
                r#"{"model":"m","input":[{"type":"computer_call","id":"x"}]}"#,
                "computer_call",
            ),
            (r#"{"model":"m","input":[]}"#, "input"),
            (
                r#"{"model":"m","input":"x","tools":[{"type":"function","name":"f","parameters":{"type":"object"}}],"tool_choice":{"type":"function","name":"f","bogus":1}}"#,
                "bogus",
            ),
            (
                r#"{"model":"m","input":"x","tools":[{"type":"function","name":"f","parameters":{"type":"object"}}],"tool_choice":{"type":"allowed_tools","mode":"auto","tools":[{"type":"function","name":"g"}]}}"#,
                "'g' is not a function in 'tools'",
            ),
            (
                r#"{"model":"m","input":[{"type":"reasoning","summary":[]}]}"#,
                "no message to answer",
            ),
            (
                r#"{"model":"m","input":[{"role":"user","content":"hi"},{"role":"assistant","content":"Hel"}]}"#,
                "final assistant message",
            ),
            (
                r#"{"model":"m","input":"x","tools":[{"type":"function","name":"f","parameters":{"type":"object"},"strict":true}],"tool_choice":"required","text":{"format":{"type":"json_object"}}}"#,
                "tool_choice",
            ),
        ];
        for (body, needle) in cases {
            let e = parsed(body).err().unwrap_or_else(|| panic!("{body}"));
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(
                e.message.contains(needle) || e.param.as_deref() == Some(needle),
                "{body}: {} ({:?})",
                e.message,
                e.param
            );
        }
    }
}
