//! Ollama's API (`/api/*`), as a translation layer: its requests become the same [`Job`]s the
//! OpenAI routes make and run on the same scheduler, sampler, constraints and tool machinery;
//! only the shapes differ. Streams are newline-delimited JSON and on by default (`"stream":
//! false` gives one object), errors are `{"error": "…"}`, durations are nanoseconds and
//! timestamps RFC 3339. Reference: `shared/reference/openai-api.md`, section (h).
//!
//! What herd does differently, on purpose:
//! - Sampling defaults are Ollama's documented ones (temperature 0.8, top_k 40, top_p 0.9),
//!   except `repeat_penalty`, which defaults to 1.0: herd's repetition penalty covers the whole
//!   sequence, not Ollama's last 64 tokens (`repeat_last_n` is refused rather than ignored).
//! - `num_ctx` narrows the context of one request within the server's (`--ctx-size`); a larger
//!   one gets the server's, as Ollama holds `num_ctx` to the model's context length (the KV
//!   cache is sized when the server starts). A prompt longer than the context is a 400, where
//!   Ollama would cut its beginning off.
//! - `num_predict` is a bound: generation stops there or at the end of the context, whichever
//!   comes first (`done_reason: "length"` either way), as in Ollama.
//! - `keep_alive` is accepted and checked; herd keeps its one model loaded while it serves, so
//!   an unload request (`keep_alive: 0` with nothing to generate) is a 400 saying so.
//! - `/api/pull` answers success for the served model (it is here) and 400 for any other:
//!   one server serves one model; `herd pull` fetches others.
//! - `prompt_eval_count` counts the prompt tokens computed for this request (those taken from
//!   the prefix cache are not). `prompt_eval_duration` runs from the request's arrival to its
//!   first token (time in the queue included), `eval_duration` from the first token to the
//!   last, and `eval_count` counts every generated token, the first included (the rate a
//!   client derives is high by one token of `eval_count`).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use herd_engine::constraint::Grammar;
use herd_engine::sampler::SamplingParams;
use herd_engine::scheduler::{Event, Usage};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::conversation::{self, Ending};
use crate::openai::{self, ApiError, ApiResult, Job, PromptSource};
use crate::request::{self, Seed};
use crate::{AppState, CallHold, Finale, Started, Timing, tools};

/// The Ollama API level herd's `/api` routes implement, reported by `/api/version`: clients
/// gate features (tools, structured outputs) on it.
pub const API_VERSION: &str = "0.12.0";

/// Ollama's documented sampling defaults (Modelfile parameters), which its clients rely on.
const DEFAULT_TEMPERATURE: f32 = 0.8;
const DEFAULT_TOP_K: usize = 40;
const DEFAULT_TOP_P: f32 = 0.9;

/// The `/api` routes.
pub fn routes() -> axum::Router<Arc<AppState>> {
    axum::Router::new()
        .route("/api/version", get(version))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .route("/api/chat", post(chat))
        .route("/api/generate", post(generate))
        .route("/api/pull", post(pull))
        .route("/api/{*rest}", any(unknown))
}

/// An error in Ollama's shape: `{"error": "message"}` with the status.
pub(crate) fn error_response(e: &ApiError) -> Response {
    let mut response = (e.status, axum::Json(json!({"error": e.message}))).into_response();
    if e.status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

async fn unknown(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(rest): axum::extract::Path<String>,
) -> Response {
    if let Err(e) = crate::authorize(&st, &headers) {
        return error_response(&e);
    }
    error_response(
        &ApiError::bad_request(format!(
            "herd does not implement /api/{rest} (it serves /api/chat, /api/generate, \
             /api/tags, /api/show, /api/ps, /api/version and /api/pull)"
        ))
        .status(StatusCode::NOT_FOUND, "not_found_error"),
    )
}

async fn version(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = crate::authorize(&st, &headers) {
        return error_response(&e);
    }
    axum::Json(json!({"version": API_VERSION, "herd": env!("CARGO_PKG_VERSION")})).into_response()
}

/// RFC 3339 with microseconds, as Ollama writes times (a time before 1970, which the
/// formatter does not take, is written as 1970).
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t.max(SystemTime::UNIX_EPOCH)).to_string()
}

/// The served model's `details` object.
fn details(st: &AppState) -> Value {
    let Some(e) = st.engine.get() else {
        return json!({});
    };
    let card = &e.card;
    json!({
        "parent_model": "",
        "format": card.format,
        "family": e.family,
        "families": [e.family],
        "parameter_size": card.parameter_size(),
        "quantization_level": card.quantization,
    })
}

/// A digest for listings. Ollama's is its manifest's SHA-256; herd has no manifest and does
/// not hash many gigabytes at start, so this is the SHA-256 of the model's identity (name,
/// size, modification time): it changes when the file does, which is what clients use it for.
fn digest(st: &AppState) -> String {
    use sha2::{Digest, Sha256};
    let card = st.engine.get().map(|e| e.card.clone()).unwrap_or_default();
    let id = format!(
        "{}\n{}\n{:?}",
        st.model_name,
        card.bytes,
        card.modified
            .and_then(|m| m.duration_since(SystemTime::UNIX_EPOCH).ok())
    );
    Sha256::digest(id.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The listing routes answer once the model is loaded, to a valid key when keys are set.
fn listing_ready(st: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    crate::authorize(st, headers)?;
    crate::ready(st).map(|_| ())
}

async fn tags(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = listing_ready(&st, &headers) {
        return error_response(&e);
    }
    let card = st.engine.get().map(|e| e.card.clone()).unwrap_or_default();
    let modified = card.modified.unwrap_or_else(SystemTime::now);
    axum::Json(json!({"models": [{
        "name": st.model_name,
        "model": st.model_name,
        "modified_at": rfc3339(modified),
        "size": card.bytes,
        "digest": digest(&st),
        "details": details(&st),
    }]}))
    .into_response()
}

async fn ps(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = listing_ready(&st, &headers) {
        return error_response(&e);
    }
    let Some(engine) = st.engine.get() else {
        return error_response(&ApiError::bad_request("the model is still loading"));
    };
    // Loaded for as long as the server runs: Ollama's "never" is now + the largest duration
    // (about 292 years).
    let never = SystemTime::now() + Duration::from_secs(292 * 365 * 24 * 3600);
    axum::Json(json!({"models": [{
        "name": st.model_name,
        "model": st.model_name,
        "size": engine.card.bytes,
        "digest": digest(&st),
        "details": details(&st),
        "expires_at": rfc3339(never),
        "size_vram": 0,
        "context_length": engine.scheduler.config().context,
    }]}))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShowRequest {
    model: Option<String>,
    /// Older clients' name for `model`.
    name: Option<String>,
    verbose: Option<bool>,
}

async fn show(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    match show_inner(&st, &headers, body).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

async fn show_inner(st: &Arc<AppState>, headers: &HeaderMap, body: Body) -> ApiResult<Value> {
    listing_ready(st, headers)?;
    let body = crate::read_body(st, body).await?;
    openai::json_object(&body)?;
    let req: ShowRequest = request::parse_as(&body).map_err(openai::parse_error)?;
    let asked = req
        .model
        .or(req.name)
        .ok_or_else(|| ApiError::bad_request("'model' is required").param("model"))?;
    served_model(st, &asked)?;
    let engine = crate::ready(st)?;
    let card = &engine.card;
    let arch = if card.architecture.is_empty() {
        engine.family.clone()
    } else {
        card.architecture.clone()
    };
    let mut info = Map::new();
    info.insert("general.architecture".into(), Value::from(arch.clone()));
    info.insert(
        "general.parameter_count".into(),
        Value::from(card.parameters),
    );
    if let Some(c) = card.context_length {
        info.insert(format!("{arch}.context_length"), Value::from(c));
    }
    if let Some(l) = &card.license {
        info.insert("general.license".into(), Value::from(l.clone()));
    }
    let _ = req.verbose; // Every detail herd has is in the answer either way.
    let capabilities = if engine.template.is_some() {
        json!(["completion", "tools"])
    } else {
        json!(["completion"])
    };
    let mut out = json!({
        "modelfile": format!("FROM {}\n", st.model_name),
        "parameters": format!(
            "temperature {DEFAULT_TEMPERATURE}\ntop_k {DEFAULT_TOP_K}\ntop_p {DEFAULT_TOP_P}"
        ),
        "template": engine.template_source.clone().unwrap_or_default(),
        "details": details(st),
        "model_info": info,
        "capabilities": capabilities,
        "modified_at": rfc3339(card.modified.unwrap_or_else(SystemTime::now)),
    });
    if let Some(l) = &card.license {
        out["license"] = Value::from(l.clone());
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PullRequest {
    model: Option<String>,
    name: Option<String>,
    stream: Option<bool>,
    insecure: Option<bool>,
}

/// `/api/pull`: the served model is here already (success); any other is a 400, since one
/// server serves one model.
async fn pull(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    let answer = async {
        crate::authorize(&st, &headers)?;
        let body = crate::read_body(&st, body).await?;
        openai::json_object(&body)?;
        let req: PullRequest = request::parse_as(&body).map_err(openai::parse_error)?;
        let _ = (req.stream, req.insecure); // Nothing is fetched, so neither changes anything.
        let asked = req
            .model
            .or(req.name)
            .ok_or_else(|| ApiError::bad_request("'model' is required").param("model"))?;
        match canonical_model(&asked, &st.model_name) {
            Some(_) => Ok(json!({"status": "success"})),
            None => Err(ApiError::bad_request(format!(
                "this server serves '{}' only and does not pull models while it serves: fetch \
                 '{asked}' with `herd pull {asked}` and start a server for it",
                st.model_name
            ))
            .param("model")),
        }
    }
    .await;
    match answer {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => error_response(&e),
    }
}

/// `asked` names the served model: as served, or with Ollama's implicit `:latest` tag on
/// either side.
fn canonical_model(asked: &str, served: &str) -> Option<String> {
    let bare = |s: &str| s.strip_suffix(":latest").unwrap_or(s).to_string();
    (asked == served || bare(asked) == bare(served)).then(|| served.to_string())
}

/// The 404 for a model this server does not serve.
fn served_model(st: &AppState, asked: &str) -> ApiResult<String> {
    canonical_model(asked, &st.model_name).ok_or_else(|| {
        ApiError::bad_request(format!(
            "model '{asked}' not found; this server serves '{}'",
            st.model_name
        ))
        .param("model")
        .status(StatusCode::NOT_FOUND, "invalid_request_error")
    })
}

/// `format`: `"json"` (any JSON object) or a JSON Schema object; `""` means none.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "\"json\" or a JSON Schema (an object)")]
enum Format {
    Name(String),
    Schema(Map<String, Value>),
}

/// `keep_alive`: a duration string (`"5m"`, `"1h30m"`, `"-1"`) or a number of seconds.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a duration (\"5m\", \"1h\", \"-1\") or a number of seconds"
)]
enum KeepAlive {
    Text(String),
    Seconds(f64),
}

impl KeepAlive {
    /// Whether it asks to unload at once (`0`), after checking its form.
    fn unloads(&self) -> ApiResult<bool> {
        match self {
            Self::Seconds(s) => Ok(*s == 0.0),
            Self::Text(t) => {
                if !go_duration(t) {
                    return Err(ApiError::bad_request(format!(
                        "'keep_alive' {t:?} is not a duration (e.g. \"5m\", \"1h30m\", \"-1\")"
                    ))
                    .param("keep_alive"));
                }
                // Zero in any unit ("0", "0s", "0m0s"): every digit is a 0.
                Ok(t.chars().filter(char::is_ascii_digit).all(|c| c == '0'))
            }
        }
    }
}

/// A Go duration string (`[-+]?(number unit)+`, units ns us µs ms s m h) or a bare integer of
/// seconds, as Ollama parses `keep_alive`.
fn go_duration(t: &str) -> bool {
    let t = t.strip_prefix(['-', '+']).unwrap_or(t);
    if t.is_empty() {
        return false;
    }
    if t.bytes().all(|b| b.is_ascii_digit()) {
        return true;
    }
    let mut rest = t;
    while !rest.is_empty() {
        let num = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num == 0 {
            return false;
        }
        rest = &rest[num..];
        let Some(unit) = ["ns", "us", "µs", "ms", "s", "m", "h"]
            .into_iter()
            .find(|u| rest.starts_with(u) && !(*u == "m" && rest.starts_with("ms")))
        else {
            return false;
        };
        rest = &rest[unit.len()..];
    }
    true
}

/// `options`: the Modelfile parameters herd implements. Any other is a 400 naming it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Options {
    num_ctx: Option<u64>,
    /// Tokens to generate; -1 (unlimited) and -2 (fill the context) both run to the context.
    num_predict: Option<i64>,
    temperature: Option<f64>,
    top_k: Option<i64>,
    top_p: Option<f64>,
    min_p: Option<f64>,
    /// -1: a random seed.
    seed: Option<Seed>,
    stop: Option<Vec<String>>,
    repeat_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
}

#[derive(Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Role {
    System,
    User,
    Assistant,
    Tool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: Role,
    #[serde(default)]
    content: String,
    tool_calls: Option<Vec<ToolCall>>,
    /// The function whose result a `tool` message holds.
    tool_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ToolCall {
    /// Newer clients echo back the id and type a response gave.
    id: Option<String>,
    #[serde(rename = "type")]
    kind: Option<request::FunctionKind>,
    function: CalledFunction,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CalledFunction {
    /// The call's place in the list (echoed back); the list order says the same.
    index: Option<u32>,
    name: String,
    /// The arguments as a JSON object (Ollama's shape, not OpenAI's string).
    arguments: Map<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChatRequest {
    model: String,
    #[serde(default)]
    messages: Vec<Message>,
    tools: Option<Vec<request::Tool>>,
    format: Option<Format>,
    options: Option<Options>,
    stream: Option<bool>,
    keep_alive: Option<KeepAlive>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateRequest {
    model: String,
    #[serde(default)]
    prompt: String,
    system: Option<String>,
    /// The prompt as is, without the chat template.
    raw: Option<bool>,
    format: Option<Format>,
    options: Option<Options>,
    stream: Option<bool>,
    keep_alive: Option<KeepAlive>,
}

/// The messages as the chat templates read them.
///
/// Errors: `tool_calls` on a message that is not the assistant's, `tool_name` on one that is
/// not a tool result (they would be dropped).
fn template_messages(list: Vec<Message>) -> ApiResult<Vec<Value>> {
    for (i, m) in list.iter().enumerate() {
        if m.tool_calls.is_some() && m.role != Role::Assistant {
            return Err(ApiError::bad_request(format!(
                "messages[{i}]: only an assistant message carries 'tool_calls'"
            ))
            .param("messages"));
        }
        if m.tool_name.is_some() && m.role != Role::Tool {
            return Err(ApiError::bad_request(format!(
                "messages[{i}]: only a tool message carries 'tool_name'"
            ))
            .param("messages"));
        }
    }
    Ok(list
        .into_iter()
        .map(|m| match m.role {
            Role::System => json!({"role": "system", "content": m.content}),
            Role::User => json!({"role": "user", "content": m.content}),
            Role::Assistant => {
                let calls: Vec<Value> = m
                    .tool_calls
                    .unwrap_or_default()
                    .into_iter()
                    .map(|c| {
                        let _ = (c.kind, c.function.index); // The order of the list counts.
                        let mut v = json!({"type": "function", "function": {
                            "name": c.function.name,
                            "arguments": Value::Object(c.function.arguments).to_string()}});
                        if let Some(id) = c.id {
                            v["id"] = Value::String(id);
                        }
                        v
                    })
                    .collect();
                if calls.is_empty() {
                    json!({"role": "assistant", "content": m.content})
                } else {
                    let content = (!m.content.is_empty()).then_some(m.content);
                    json!({"role": "assistant", "content": content, "tool_calls": calls})
                }
            }
            Role::Tool => {
                let mut v = json!({"role": "tool", "content": m.content});
                if let Some(name) = m.tool_name {
                    v["name"] = Value::String(name);
                }
                v
            }
        })
        .collect())
}

/// What a parsed request asks for: a generation, or only that the model be loaded (no
/// messages, or an empty prompt).
enum Parsed {
    Generate(Box<Job>),
    Load { model: String },
}

/// The fields both endpoints share, read into a [`Job`].
struct Common {
    model: String,
    format: Option<Format>,
    options: Option<Options>,
    stream: Option<bool>,
    keep_alive: Option<KeepAlive>,
}

fn job(
    served: &str,
    c: Common,
    source: PromptSource,
    tools: Option<tools::Tools>,
) -> ApiResult<Job> {
    let model = canonical_model(&c.model, served).unwrap_or(c.model);
    if let Some(k) = &c.keep_alive {
        k.unloads()?;
    }
    let o = c.options.unwrap_or_default();
    let range = |key: &str, v: Option<f64>, lo: f64, hi: f64| -> ApiResult<Option<f64>> {
        match v {
            Some(x) if !(lo..=hi).contains(&x) => Err(ApiError::bad_request(format!(
                "'options.{key}' must be between {lo} and {hi}"
            ))
            .param("options")),
            _ => Ok(v),
        }
    };
    let temperature = range("temperature", o.temperature, 0.0, 2.0)?;
    let top_p = range("top_p", o.top_p, 0.0, 1.0)?;
    let min_p = range("min_p", o.min_p, 0.0, 1.0)?;
    let repeat = range("repeat_penalty", o.repeat_penalty, 0.01, 100.0)?;
    let presence = range("presence_penalty", o.presence_penalty, -2.0, 2.0)?;
    let frequency = range("frequency_penalty", o.frequency_penalty, -2.0, 2.0)?;
    let top_k = match o.top_k {
        None => DEFAULT_TOP_K,
        Some(k) if k >= 0 => k as usize,
        Some(_) => {
            return Err(ApiError::bad_request(
                "'options.top_k' must be a non-negative integer (0: no top-k cut)",
            )
            .param("options"));
        }
    };
    let max_tokens = match o.num_predict {
        None | Some(-1) | Some(-2) => None,
        Some(n) if n > 0 => Some(n as usize),
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "'options.num_predict' must be a positive number of tokens, -1 (no limit) or -2 \
                 (fill the context); got {n}"
            ))
            .param("options"));
        }
    };
    let context_limit = match o.num_ctx {
        None => None,
        Some(0) => {
            return Err(
                ApiError::bad_request("'options.num_ctx' must be at least 1").param("options"),
            );
        }
        Some(n) => Some((usize::try_from(n).unwrap_or(usize::MAX), "options.num_ctx")),
    };
    let stop = o.stop.unwrap_or_default();
    if stop.iter().any(String::is_empty) {
        return Err(
            ApiError::bad_request("'options.stop' strings must not be empty").param("options"),
        );
    }
    let seed = match o.seed {
        Some(Seed::Signed(-1)) | None => None,
        Some(s) => Some(s.bits()),
    };
    let grammar = match c.format {
        None => None,
        Some(Format::Name(n)) if n.is_empty() => None,
        Some(Format::Name(n)) if n == "json" => Some(Grammar::json_object()),
        Some(Format::Name(n)) => {
            return Err(ApiError::bad_request(format!(
                "'format' must be \"json\" or a JSON Schema object; got {n:?}"
            ))
            .param("format"));
        }
        Some(Format::Schema(s)) => Some(Grammar::JsonSchema(Value::Object(s))),
    };
    let sampling = SamplingParams {
        temperature: temperature.map_or(DEFAULT_TEMPERATURE, |t| t as f32),
        top_k,
        top_p: top_p.map_or(DEFAULT_TOP_P, |p| p as f32),
        min_p: min_p.unwrap_or(0.0) as f32,
        repetition_penalty: repeat.unwrap_or(1.0) as f32,
        presence_penalty: presence.unwrap_or(0.0) as f32,
        frequency_penalty: frequency.unwrap_or(0.0) as f32,
        ..SamplingParams::default()
    };
    Ok(Job {
        model,
        prompt_source: source,
        max_tokens,
        max_tokens_field: "options.num_predict",
        max_tokens_is_bound: true,
        stop,
        sampling,
        seed,
        n: 1,
        logprobs: false,
        stream: c.stream.unwrap_or(true),
        include_usage: false,
        ignore_eos: false,
        grammar,
        tools,
        cache_salt: None,
        context_limit,
    })
}

/// An unload request (nothing to generate, `keep_alive: 0`) cannot be honoured.
fn load_only(model: String, keep_alive: Option<&KeepAlive>) -> ApiResult<Parsed> {
    if let Some(k) = keep_alive
        && k.unloads()?
    {
        return Err(ApiError::bad_request(
            "herd keeps its one model loaded while it serves and cannot unload it: stop the \
             server to free its memory",
        )
        .param("keep_alive"));
    }
    Ok(Parsed::Load { model })
}

fn parse_chat(body: &[u8], served: &str) -> ApiResult<Parsed> {
    openai::json_object(body)?;
    let req: ChatRequest = request::parse_as(body).map_err(openai::parse_error)?;
    // Nothing to generate asks for the model to be loaded; the other fields are still checked.
    let load = if req.messages.is_empty() {
        Some(load_only(req.model.clone(), req.keep_alive.as_ref())?)
    } else {
        None
    };
    let tools = crate::tools::parse(req.tools, None, None)?;
    let common = Common {
        model: req.model,
        format: req.format,
        options: req.options,
        stream: req.stream,
        keep_alive: req.keep_alive,
    };
    let messages = match load {
        Some(_) => vec![json!({"role": "user", "content": ""})],
        None => conversation::shape(template_messages(req.messages)?, Ending::Answer, "messages")?,
    };
    let job = job(served, common, PromptSource::Messages(messages), tools)?;
    Ok(load.unwrap_or(Parsed::Generate(Box::new(job))))
}

fn parse_generate(body: &[u8], served: &str) -> ApiResult<Parsed> {
    openai::json_object(body)?;
    let req: GenerateRequest = request::parse_as(body).map_err(openai::parse_error)?;
    // Nothing to generate asks for the model to be loaded; the other fields are still checked.
    let load = if req.prompt.is_empty() {
        Some(load_only(req.model.clone(), req.keep_alive.as_ref())?)
    } else {
        None
    };
    let raw = req.raw.unwrap_or(false);
    let source = match (raw, req.system) {
        (true, Some(_)) => {
            return Err(ApiError::bad_request(
                "'system' cannot be combined with 'raw': a raw prompt is sent as written",
            )
            .param("system"));
        }
        (true, None) => PromptSource::Text(req.prompt),
        (false, system) => PromptSource::Messages(
            system
                .map(|s| json!({"role": "system", "content": s}))
                .into_iter()
                .chain(std::iter::once(
                    json!({"role": "user", "content": req.prompt}),
                ))
                .collect(),
        ),
    };
    let common = Common {
        model: req.model,
        format: req.format,
        options: req.options,
        stream: req.stream,
        keep_alive: req.keep_alive,
    };
    let job = job(served, common, source, None)?;
    Ok(load.unwrap_or(Parsed::Generate(Box::new(job))))
}

/// Which endpoint's shapes a response takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Chat,
    Generate,
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    respond(st, headers, body, Shape::Chat).await
}

async fn generate(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    respond(st, headers, body, Shape::Generate).await
}

async fn respond(st: Arc<AppState>, headers: HeaderMap, body: Body, shape: Shape) -> Response {
    let started = async {
        let req = crate::read_request(&st, &headers, body).await?;
        let parsed = match shape {
            Shape::Chat => parse_chat(&req.body, &st.model_name)?,
            Shape::Generate => parse_generate(&req.body, &st.model_name)?,
        };
        match parsed {
            Parsed::Load { model } => {
                crate::ready(&st)?;
                let model = served_model(&st, &model)?;
                Ok(Err(load_answer(&model, shape)))
            }
            Parsed::Generate(job) => {
                served_model(&st, &job.model)?;
                crate::launch(&st, req, *job).await.map(Ok)
            }
        }
    }
    .await;
    match started {
        Ok(Ok(started)) if started.job.stream => stream_response(st, started, shape),
        Ok(Ok(started)) => whole_response(st, started, shape).await,
        Ok(Err(answer)) => {
            st.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
            axum::Json(answer).into_response()
        }
        Err(e) => {
            st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
            error_response(&e)
        }
    }
}

/// The answer to a request with nothing to generate: the model is loaded.
fn load_answer(model: &str, shape: Shape) -> Value {
    let mut v = json!({"model": model, "created_at": rfc3339(SystemTime::now())});
    match shape {
        Shape::Chat => v["message"] = json!({"role": "assistant", "content": ""}),
        Shape::Generate => v["response"] = Value::from(""),
    }
    v["done_reason"] = Value::from("load");
    v["done"] = Value::from(true);
    v
}

/// Durations of one request, for the final object's statistics.
struct Clock {
    arrived: Instant,
    first_token: Option<Instant>,
}

impl Clock {
    /// Ollama's statistics (nanoseconds): prompt evaluation from arrival to the first token,
    /// evaluation from there to the end.
    fn stats(&self, done: Instant, usage: &Usage, prompt_tokens: usize) -> Map<String, Value> {
        let first = self.first_token.unwrap_or(done);
        let ns = |d: Duration| Value::from(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let mut m = Map::new();
        m.insert("total_duration".into(), ns(done - self.arrived));
        m.insert("load_duration".into(), Value::from(0));
        m.insert(
            "prompt_eval_count".into(),
            Value::from(prompt_tokens.saturating_sub(usage.cached_tokens)),
        );
        m.insert(
            "prompt_eval_duration".into(),
            ns(first.saturating_duration_since(self.arrived)),
        );
        m.insert("eval_count".into(), Value::from(usage.completion_tokens));
        m.insert(
            "eval_duration".into(),
            ns(done.saturating_duration_since(first)),
        );
        m
    }
}

/// Ollama's `tool_calls` entries: arguments as a JSON object.
fn tool_calls_json(calls: &[tools::Call]) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let arguments: Value = serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}));
            json!({"function": {"index": k, "name": c.name, "arguments": arguments}})
        })
        .collect()
}

/// One object of a response: `message` (chat) or `response` (generate) with `text`.
fn object(model: &str, shape: Shape, text: &str, calls: Option<Vec<Value>>, done: bool) -> Value {
    let mut v = json!({"model": model, "created_at": rfc3339(SystemTime::now())});
    match shape {
        Shape::Chat => {
            let mut message = json!({"role": "assistant", "content": text});
            if let Some(calls) = calls {
                message["tool_calls"] = Value::Array(calls);
            }
            v["message"] = message;
        }
        Shape::Generate => v["response"] = Value::from(text),
    }
    v["done"] = Value::from(done);
    v
}

fn finished(mut v: Value, reason: &str, stats: Map<String, Value>) -> Value {
    v["done_reason"] = Value::from(reason);
    if let Some(o) = v.as_object_mut() {
        o.extend(stats);
    }
    v
}

async fn whole_response(st: Arc<AppState>, started: Started, shape: Shape) -> Response {
    let Started {
        job,
        mut run,
        prompt_tokens,
    } = started;
    let tools = job.tools.clone().filter(tools::Tools::active);
    let mut hold = CallHold::new(tools.as_ref());
    let mut clock = Clock {
        arrived: run.arrived,
        first_token: None,
    };
    let mut timing = Timing { last: vec![None] };
    let mut text = String::new();
    while let Some((_, event, at)) = run.next().await {
        match event {
            Event::Token { text: piece, .. } => {
                timing.token(&st, run.arrived, 0, at);
                clock.first_token.get_or_insert(at);
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
                let stats = clock.stats(at, &usage, prompt_tokens);
                let body = match hold.done(&last, tools.as_ref()) {
                    Finale::Calls(calls) => {
                        object(&job.model, shape, "", Some(tool_calls_json(&calls)), true)
                    }
                    Finale::Text(t, _) => {
                        text.push_str(&t);
                        object(&job.model, shape, &text, None, true)
                    }
                };
                run.guard.finished = true;
                st.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
                return axum::Json(finished(body, finish.as_str(), stats)).into_response();
            }
            Event::Failed(why) => {
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                return error_response(
                    &ApiError::bad_request(why)
                        .status(StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
                );
            }
            Event::GrammarFailed(why) => {
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                return error_response(&crate::grammar_failed(why));
            }
        }
    }
    error_response(
        &ApiError::bad_request("the engine stopped")
            .status(StatusCode::SERVICE_UNAVAILABLE, "server_error"),
    )
}

/// NDJSON: one object per token's text (`done: false`), the calls (chat, with tools) in one
/// object, then the final object with `done: true`, `done_reason` and the statistics. An error
/// after the headers went out is an `{"error": …}` line, as Ollama sends it.
fn stream_response(st: Arc<AppState>, started: Started, shape: Shape) -> Response {
    crate::streamed("application/x-ndjson", |tx| pump(st, started, shape, tx))
}

async fn pump(
    st: Arc<AppState>,
    started: Started,
    shape: Shape,
    tx: mpsc::Sender<Result<Bytes, std::convert::Infallible>>,
) {
    let Started {
        job,
        mut run,
        prompt_tokens,
    } = started;
    let line = |v: Value| Bytes::from(format!("{v}\n"));
    let send = |b: Bytes| {
        let tx = tx.clone();
        async move { tx.send(Ok(b)).await.is_ok() }
    };
    let tools = job.tools.clone().filter(tools::Tools::active);
    let mut hold = CallHold::new(tools.as_ref());
    let mut clock = Clock {
        arrived: run.arrived,
        first_token: None,
    };
    let mut timing = Timing { last: vec![None] };
    loop {
        // A client that leaves while its request waits is seen at once: the guard then
        // cancels the request.
        let next = tokio::select! {
            next = run.next() => next,
            () = tx.closed() => return,
        };
        let Some((_, event, at)) = next else {
            return;
        };
        let ok = match event {
            Event::Token { text, .. } => {
                timing.token(&st, run.arrived, 0, at);
                clock.first_token.get_or_insert(at);
                match hold.token(&text, None) {
                    Some((t, _)) if !t.is_empty() => {
                        send(line(object(&job.model, shape, &t, None, false))).await
                    }
                    _ => true,
                }
            }
            Event::Done {
                text,
                finish,
                usage,
                ..
            } => {
                let stats = clock.stats(at, &usage, prompt_tokens);
                let last = match hold.done(&text, tools.as_ref()) {
                    Finale::Calls(calls) => Some(object(
                        &job.model,
                        shape,
                        "",
                        Some(tool_calls_json(&calls)),
                        false,
                    )),
                    Finale::Text(t, _) if !t.is_empty() => {
                        Some(object(&job.model, shape, &t, None, false))
                    }
                    Finale::Text(..) => None,
                };
                let sent = match last {
                    Some(v) => send(line(v)).await,
                    None => true,
                };
                let end = finished(
                    object(&job.model, shape, "", None, true),
                    finish.as_str(),
                    stats,
                );
                if sent && send(line(end)).await {
                    run.guard.finished = true;
                    st.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            Event::Failed(why) | Event::GrammarFailed(why) => {
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                let _ = send(line(json!({"error": why}))).await;
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

    #[test]
    fn model_names_match_with_or_without_latest() {
        assert_eq!(canonical_model("m", "m").as_deref(), Some("m"));
        assert_eq!(canonical_model("m:latest", "m").as_deref(), Some("m"));
        assert_eq!(
            canonical_model("gemma3", "gemma3:latest").as_deref(),
            Some("gemma3:latest")
        );
        assert_eq!(canonical_model("gemma3:1b", "gemma3:270m"), None);
    }

    #[test]
    fn keep_alive_reads_go_durations() {
        for ok in [
            "5m", "1h30m", "-1", "0", "300", "1.5h", "10s", "250ms", "-1m",
        ] {
            assert!(go_duration(ok), "{ok}");
        }
        for bad in ["", "five", "5x", "m5", "1h 30m", "--1"] {
            assert!(!go_duration(bad), "{bad}");
        }
        let unloads = |k: KeepAlive| k.unloads().unwrap();
        assert!(unloads(KeepAlive::Seconds(0.0)));
        assert!(unloads(KeepAlive::Text("0".into())));
        assert!(unloads(KeepAlive::Text("0s".into())));
        assert!(!unloads(KeepAlive::Text("5m".into())));
        assert!(!unloads(KeepAlive::Seconds(-1.0)));
        assert!(KeepAlive::Text("soon".into()).unloads().is_err());
    }

    fn chat_job(body: &str) -> ApiResult<Job> {
        match parse_chat(body.as_bytes(), "m")? {
            Parsed::Generate(j) => Ok(*j),
            Parsed::Load { .. } => panic!("{body}: a load request"),
        }
    }

    #[test]
    fn options_map_onto_herds_sampler_with_ollamas_defaults() {
        let j = chat_job(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#).unwrap();
        assert!(j.stream, "Ollama streams unless told not to");
        assert_eq!(
            (j.sampling.temperature, j.sampling.top_k, j.sampling.top_p),
            (0.8, 40, 0.9)
        );
        assert_eq!((j.max_tokens, j.seed, j.context_limit), (None, None, None));
        let j = chat_job(
            r#"{"model":"m:latest","messages":[{"role":"user","content":"hi"}],"stream":false,
                "options":{"temperature":0,"top_k":0,"top_p":0.5,"min_p":0.1,"seed":42,
                "num_predict":7,"num_ctx":512,"stop":["\n"],"repeat_penalty":1.1,
                "presence_penalty":0.5,"frequency_penalty":-0.5},"keep_alive":"10m",
                "format":{"type":"object","properties":{"a":{"type":"integer"}}}}"#,
        )
        .unwrap();
        assert_eq!(j.model, "m");
        assert!(!j.stream);
        assert_eq!(
            (j.sampling.temperature, j.sampling.top_k, j.sampling.top_p),
            (0.0, 0, 0.5)
        );
        assert_eq!(j.sampling.min_p, 0.1);
        assert_eq!(j.sampling.repetition_penalty, 1.1);
        assert_eq!(
            (j.sampling.presence_penalty, j.sampling.frequency_penalty),
            (0.5, -0.5)
        );
        assert_eq!(
            (j.max_tokens, j.seed, j.context_limit),
            (Some(7), Some(42), Some((512, "options.num_ctx")))
        );
        assert_eq!(j.stop, ["\n"]);
        assert!(matches!(j.grammar, Some(Grammar::JsonSchema(ref s)) if s["type"] == "object"));
        let j = chat_job(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"format":"json","options":{"num_predict":-1,"seed":-1}}"#,
        )
        .unwrap();
        assert!(
            matches!(j.grammar, Some(Grammar::JsonSchema(ref s)) if *s == json!({"type": "object"}))
        );
        assert_eq!((j.max_tokens, j.seed), (None, None));
    }

    #[test]
    fn unsupported_fields_and_bad_values_are_400s_naming_them() {
        let user = r#"{"role":"user","content":"x"}"#;
        let cases = [
            (
                format!(r#"{{"model":"m","messages":[{user}],"options":{{"mirostat":2}}}}"#),
                "options.mirostat",
            ),
            (
                format!(r#"{{"model":"m","messages":[{user}],"options":{{"repeat_last_n":64}}}}"#),
                "options.repeat_last_n",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x","images":["aGk="]}]}"#
                    .to_string(),
                "images",
            ),
            (
                format!(r#"{{"model":"m","messages":[{user}],"think":true}}"#),
                "think",
            ),
            (
                format!(r#"{{"model":"m","messages":[{user}],"format":"yaml"}}"#),
                "format",
            ),
            (
                format!(r#"{{"model":"m","messages":[{user}],"options":{{"num_predict":0}}}}"#),
                "num_predict",
            ),
            (
                format!(r#"{{"model":"m","messages":[{user}],"options":{{"temperature":9}}}}"#),
                "temperature",
            ),
            (
                format!(r#"{{"model":"m","messages":[{user}],"keep_alive":"soon"}}"#),
                "keep_alive",
            ),
            (
                r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#.to_string(),
                "role",
            ),
        ];
        for (body, named) in cases {
            let e = chat_job(&body).expect_err(&body);
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
            assert!(
                e.message.contains(named) || e.param.as_deref().is_some_and(|p| p.contains(named)),
                "{body}: {}",
                e.message
            );
        }
        for (body, named) in [
            (r#"{"model":"m","prompt":"x","images":["aGk="]}"#, "images"),
            (
                r#"{"model":"m","prompt":"x","template":"{{ .Prompt }}"}"#,
                "template",
            ),
            (r#"{"model":"m","prompt":"x","suffix":"y"}"#, "suffix"),
            (r#"{"model":"m","prompt":"x","context":[1,2]}"#, "context"),
            (
                r#"{"model":"m","prompt":"x","raw":true,"system":"s"}"#,
                "system",
            ),
        ] {
            let e = parse_generate(body.as_bytes(), "m")
                .err()
                .unwrap_or_else(|| panic!("{body}"));
            assert!(e.message.contains(named), "{body}: {}", e.message);
        }
    }

    #[test]
    fn messages_and_prompts_become_template_input() {
        let j = chat_job(
            r#"{"model":"m","messages":[{"role":"system","content":"be brief"},
               {"role":"user","content":"weather?"},
               {"role":"assistant","content":"","tool_calls":[{"function":{"name":"get","arguments":{"city":"Oslo"}}}]},
               {"role":"tool","content":"5 C","tool_name":"get"}],
               "tools":[{"type":"function","function":{"name":"get","parameters":{"type":"object"}}}]}"#,
        )
        .unwrap();
        let PromptSource::Messages(m) = &j.prompt_source else {
            panic!("messages")
        };
        assert_eq!(m[0], json!({"role": "system", "content": "be brief"}));
        assert_eq!(m[2]["content"], Value::Null);
        assert_eq!(m[2]["tool_calls"][0]["function"]["name"], "get");
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Oslo"}"#
        );
        assert_eq!(
            m[3],
            json!({"role": "tool", "content": "5 C", "name": "get"})
        );
        assert!(j.tools.as_ref().is_some_and(tools::Tools::active));

        let Parsed::Generate(g) =
            parse_generate(br#"{"model":"m","prompt":"hi","system":"s"}"#, "m").unwrap()
        else {
            panic!("generate")
        };
        let PromptSource::Messages(m) = &g.prompt_source else {
            panic!("templated")
        };
        assert_eq!(m.len(), 2);
        let Parsed::Generate(g) =
            parse_generate(br#"{"model":"m","prompt":"hi","raw":true}"#, "m").unwrap()
        else {
            panic!("generate")
        };
        assert!(matches!(g.prompt_source, PromptSource::Text(ref t) if t == "hi"));
        assert!(matches!(
            parse_generate(br#"{"model":"m"}"#, "m").unwrap(),
            Parsed::Load { .. }
        ));
        assert!(matches!(
            parse_chat(br#"{"model":"m","messages":[]}"#, "m").unwrap(),
            Parsed::Load { .. }
        ));
        let e = parse_chat(br#"{"model":"m","keep_alive":0}"#, "m")
            .err()
            .expect("unload");
        assert!(e.message.contains("cannot unload"), "{}", e.message);
    }
}
