//! `herd serve`: the OpenAI HTTP API, and Ollama's (`ollama`) and Anthropic's Messages API
//! (`anthropic`) as translations onto it, over the continuous-batching scheduler.
//!
//! The listener opens before the model loads (`/health` answers 503 until it is ready). Each
//! request is validated (`openai`), rendered through the chat template, tokenized and submitted
//! to the scheduler once per choice; its events come back over a channel and become one JSON
//! response or a stream of server-sent events shaped exactly like OpenAI's. A client that goes
//! away cancels its sequences at once, freeing their KV blocks.

pub mod anthropic;
pub mod conn;
mod conversation;
pub mod metrics;
pub mod ollama;
pub mod openai;
pub mod request;
pub mod responses;
pub mod tools;
pub mod ui;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use herd_engine::chat::{ChatTemplate, RenderOptions};
use herd_engine::constraint::{Constraint, ConstraintCompiler};
use herd_engine::generate::FinishReason;
use herd_engine::scheduler::{Event, GenerationRequest, Scheduler, SubmitError, Usage};
use herd_engine::{Tokenizer, scheduler::SchedulerConfig};
use herd_models::SeqId;
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub use crate::conn::Timeouts;
use crate::metrics::Metrics;
use crate::openai::{ApiError, ApiResult, Endpoint, Job, PromptSource};

/// What the server needs once the model is loaded.
pub struct Engine {
    pub scheduler: Scheduler,
    pub tokenizer: Arc<Tokenizer>,
    /// The chat template (the model's, or its family's built-in one).
    pub template: Option<ChatTemplate>,
    /// Grammar compiler over the model's vocabulary (`response_format` and friends).
    pub constraints: ConstraintCompiler,
    /// The model family (whose call format and template tools follow).
    pub family: String,
    /// The most bytes of text one token stands for: a text of more than `context ×` this many
    /// bytes cannot fit the context, which is said before tokenizing it.
    pub max_token_bytes: usize,
    /// Each token's bytes as it adds them to text (logprobs report them).
    pub token_bytes: Arc<Vec<Vec<u8>>>,
    /// What the model is (listings: Ollama's `/api/tags`, `/api/show`).
    pub card: herd_engine::ModelCard,
    /// The model's own chat template source, when it has one.
    pub template_source: Option<String>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct AppState {
    /// The name clients use for the model (`model` field, `/v1/models`).
    pub model_name: String,
    /// Accepted bearer keys; empty means no authentication.
    pub api_keys: Vec<String>,
    pub engine: OnceLock<Engine>,
    pub metrics: Metrics,
    pub started: u64,
    /// Permits for grammar compilations ([`CONCURRENT_COMPILES`]).
    compile_slots: Arc<tokio::sync::Semaphore>,
    pub options: ServerOptions,
    /// Generation requests being handled (from their arrival to their response's end).
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
}

/// One generation request in flight (counted in [`AppState`] for the shutdown to wait on):
/// held by the handler, and by the stream of a streamed response.
struct InFlight(Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    fn begin(st: &AppState) -> Self {
        st.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(st.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How `herd serve` treats connections.
#[derive(Clone, Debug, Default)]
pub struct ServerOptions {
    pub timeouts: Timeouts,
    /// Origins whose browser pages may call the API (`*`: any); empty: no CORS headers, so
    /// browsers refuse cross-origin calls.
    pub cors_origins: Vec<String>,
    /// Do not serve the chat page at `/` (`herd serve --no-webui`).
    pub no_webui: bool,
}

impl AppState {
    pub fn new(model_name: String, api_keys: Vec<String>) -> Arc<Self> {
        Self::with_options(model_name, api_keys, ServerOptions::default())
    }

    pub fn with_options(
        model_name: String,
        api_keys: Vec<String>,
        options: ServerOptions,
    ) -> Arc<Self> {
        Arc::new(Self {
            model_name,
            api_keys,
            engine: OnceLock::new(),
            metrics: Metrics::default(),
            started: unix_now(),
            compile_slots: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_COMPILES)),
            options,
            in_flight: Arc::default(),
        })
    }
}

/// Build the engine for a loaded model.
pub fn engine(loaded: herd_engine::Loaded, config: SchedulerConfig) -> herd_engine::Result<Engine> {
    let herd_engine::Loaded {
        model,
        tokenizer,
        family,
        path,
    } = loaded;
    let card = herd_engine::model_card(&path).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot describe the model for listings");
        herd_engine::ModelCard::default()
    });
    let template_source = tokenizer.chat_template.clone();
    let template = match ChatTemplate::for_model(tokenizer.chat_template.as_deref(), &family) {
        Ok((t, source)) => {
            if source == herd_engine::chat::TemplateSource::Builtin {
                tracing::info!(
                    family,
                    "the model has no chat template; using herd's built-in one for its family"
                );
            }
            Some(t)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no chat template: /v1/chat/completions will answer 400");
            None
        }
    };
    let constraints = ConstraintCompiler::new(&tokenizer)?;
    let token_bytes: Vec<Vec<u8>> = tokenizer
        .token_bytes()
        .into_iter()
        .map(|(bytes, _)| bytes)
        .collect();
    let max_token_bytes = token_bytes.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let tokenizer = Arc::new(tokenizer);
    Ok(Engine {
        scheduler: Scheduler::start(model, tokenizer.clone(), config)?,
        tokenizer,
        template,
        constraints,
        family,
        max_token_bytes,
        token_bytes: Arc::new(token_bytes),
        card,
        template_source,
    })
}

pub fn router(state: Arc<AppState>) -> Router {
    let cors = cors_layer(&state.options.cors_origins);
    let router = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        // A wildcard: the default served name is the model argument, often a path.
        .route("/v1/models/{*id}", get(model))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .merge(ollama::routes())
        .merge(anthropic::routes())
        .merge(responses::routes());
    let router = if state.options.no_webui {
        router
    } else {
        router.merge(ui::routes())
    };
    let router = router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    match cors {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

/// CORS for the `--cors-origin` origins (`*`: any): browsers may then call the API from those
/// pages, with an `Authorization` header, and preflight `OPTIONS` requests are answered.
/// Origins that are not valid header values are skipped with a warning.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    // An origin is compared without a trailing slash (browsers send none).
    let origins: Vec<&str> = origins.iter().map(|o| o.trim_end_matches('/')).collect();
    let allow = if origins.contains(&"*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| {
            let v = HeaderValue::from_str(o);
            if v.is_err() {
                tracing::warn!(origin = o, "not a valid origin; ignored");
            }
            v.ok()
        }))
    };
    // Request headers are mirrored: the official JavaScript client sends its own
    // (`x-stainless-*`) besides `Authorization` and `Content-Type`.
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
            .allow_headers(tower_http::cors::AllowHeaders::mirror_request())
            .max_age(std::time::Duration::from_secs(600)),
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn error_response(e: &ApiError) -> Response {
    let mut response = (e.status, axum::Json(e.body())).into_response();
    // Loading, a full queue, stopping: all pass; say when to come back.
    if e.status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}

async fn not_found(uri: axum::http::Uri) -> Response {
    error_in_shape_of(
        &uri,
        &ApiError::bad_request("no such endpoint").status(StatusCode::NOT_FOUND, "not_found_error"),
    )
}

/// An error in the shape of the API that `uri` belongs to: Ollama's under `/api/`,
/// Anthropic's under `/v1/messages`, OpenAI's elsewhere.
fn error_in_shape_of(uri: &axum::http::Uri, e: &ApiError) -> Response {
    let path = uri.path();
    if path.starts_with("/api/") {
        ollama::error_response(e)
    } else if path == "/v1/messages" || path.starts_with("/v1/messages/") {
        anthropic::error_response(e, &anthropic::request_id())
    } else {
        error_response(e)
    }
}

async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.engine.get().is_some() {
        (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "1")],
            axum::Json(json!({"status": "loading"})),
        )
            .into_response()
    }
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let stats = st.engine.get().map(|e| e.scheduler.stats());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(stats.as_ref()),
    )
        .into_response()
}

/// Who a request comes from: the index of its API key (`None` when the server takes none).
type Tenant = Option<usize>;

fn authorize(st: &AppState, headers: &HeaderMap) -> ApiResult<Tenant> {
    if st.api_keys.is_empty() {
        return Ok(None);
    }
    // `Authorization: Bearer KEY` or Anthropic's `x-api-key: KEY`; either may carry the key
    // (Claude Code can send a placeholder in one and the key in the other).
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    // Compared in constant time, as SHA-256 digests (so neither a key's prefix nor its length
    // shows in the response time); every key is compared, whichever matches.
    let find = |k: &str| {
        use sha2::{Digest, Sha256};
        use subtle::{ConditionallySelectable, ConstantTimeEq};
        let given = Sha256::digest(k.as_bytes());
        let (mut found, mut index) = (subtle::Choice::from(0), 0u64);
        for (i, key) in st.api_keys.iter().enumerate() {
            let eq = Sha256::digest(key.as_bytes()).ct_eq(&given);
            index.conditional_assign(&(i as u64), eq);
            found |= eq;
        }
        bool::from(found).then_some(index as usize)
    };
    match bearer.and_then(find).or_else(|| x_api_key.and_then(find)) {
        Some(i) => Ok(Some(i)),
        None => Err(ApiError::bad_request(
            "a valid API key is required (Authorization: Bearer <key>, or x-api-key: <key>)",
        )
        .status(StatusCode::UNAUTHORIZED, "authentication_error")
        .code("invalid_api_key")),
    }
}

/// The prefix-cache partition of a request: one per API key and `cache_salt`, so that a tenant
/// cannot learn from `cached_tokens` (or timing) which prompts another sent. 0, the shared
/// partition, when the server takes no keys and the request names no salt.
fn cache_salt(tenant: Tenant, salt: Option<&str>) -> u64 {
    use std::hash::{Hash, Hasher};
    if tenant.is_none() && salt.is_none() {
        return 0;
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    ("herd prefix-cache partition", tenant, salt).hash(&mut h);
    h.finish().max(1)
}

fn ready(st: &AppState) -> ApiResult<&Engine> {
    st.engine.get().ok_or_else(|| {
        ApiError::bad_request("the model is still loading")
            .status(StatusCode::SERVICE_UNAVAILABLE, "server_error")
    })
}

/// The served model as OpenAI's model object.
fn model_object(st: &AppState) -> Value {
    json!({"id": st.model_name, "object": "model", "created": st.started, "owned_by": "herd"})
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&st, &headers) {
        return error_response(&e);
    }
    axum::Json(json!({"object": "list", "data": [model_object(&st)]})).into_response()
}

/// `GET /v1/models/{id}` (the openai client's `models.retrieve`).
async fn model(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    if let Err(e) = authorize(&st, &headers) {
        return error_response(&e);
    }
    if id != st.model_name {
        return error_response(
            &ApiError::bad_request(format!(
                "the model '{id}' does not exist here; this server serves '{}'",
                st.model_name
            ))
            .param("model")
            .code("model_not_found")
            .status(StatusCode::NOT_FOUND, "invalid_request_error"),
        );
    }
    axum::Json(model_object(&st)).into_response()
}

/// A method the route does not take, in its API's error shape (axum's own 405 has no body).
async fn method_not_allowed(uri: axum::http::Uri) -> Response {
    error_in_shape_of(
        &uri,
        &ApiError::bad_request("this route does not take that method")
            .status(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error"),
    )
}

/// The largest request body read, in bytes; a larger one is answered 413.
pub const MAX_BODY_BYTES: usize = 2 << 20;

/// The request body, read within [`Timeouts::body`] and [`MAX_BODY_BYTES`]; otherwise 408 or
/// 413 in OpenAI's error shape.
async fn read_body(st: &AppState, body: Body) -> ApiResult<Bytes> {
    let limit = st.options.timeouts.body;
    match tokio::time::timeout(limit, axum::body::to_bytes(body, MAX_BODY_BYTES)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Err(_) => Err(ApiError::bad_request(format!(
            "the request body did not arrive within {} s",
            limit.as_secs()
        ))
        .status(StatusCode::REQUEST_TIMEOUT, "invalid_request_error")),
        Ok(Err(e)) => {
            let over_limit = std::iter::successors(std::error::Error::source(&e), |e| e.source())
                .any(|e| e.is::<http_body_util::LengthLimitError>());
            Err(if over_limit {
                ApiError::bad_request(format!(
                    "the request body is larger than {} MiB",
                    MAX_BODY_BYTES >> 20
                ))
                .status(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error")
            } else {
                ApiError::bad_request(format!("the request body could not be read: {e}"))
            })
        }
    }
}

async fn chat(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    handle(st, headers, body, Endpoint::Chat).await
}

async fn completions(State(st): State<Arc<AppState>>, headers: HeaderMap, body: Body) -> Response {
    handle(st, headers, body, Endpoint::Completions).await
}

/// A generation request the scheduler accepted: what every API's response writer reads.
struct Started {
    job: Job,
    run: Running,
    prompt_tokens: usize,
}

/// What every API does with a generation request before its response takes shape:
/// [`read_request`], the API's own `parse` into a [`Job`], then [`launch`]. Errors are counted
/// in the metrics.
async fn start(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    body: Body,
    parse: impl FnOnce(&[u8]) -> ApiResult<Job>,
) -> ApiResult<Started> {
    let started = match read_request(st, headers, body).await {
        Ok(req) => match parse(&req.body) {
            Ok(job) => launch(st, req, job).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    if started.is_err() {
        st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
    }
    started
}

/// A generation request's body, read and authorized.
struct Arrived {
    in_flight: InFlight,
    tenant: Tenant,
    body: Bytes,
    /// When the whole body had arrived (latency counts from here: a slow upload is the
    /// client's time).
    at: Instant,
}

/// Count the request in flight, check the key (before the body is read: a client without one
/// sends nothing more), and read the body within its limits.
async fn read_request(st: &Arc<AppState>, headers: &HeaderMap, body: Body) -> ApiResult<Arrived> {
    let in_flight = InFlight::begin(st);
    let tenant = authorize(st, headers)?;
    let body = read_body(st, body).await?;
    Ok(Arrived {
        in_flight,
        tenant,
        body,
        at: Instant::now(),
    })
}

/// Render and tokenize a job's prompt, check it fits, compile its output constraint, and
/// submit it. A constrained stream waits for its first event here, so that a grammar that
/// fails at its first step is a 400 like a whole response's, not a 200 stream that fails (its
/// first token comes no later for it).
async fn launch(st: &Arc<AppState>, req: Arrived, job: Job) -> ApiResult<Started> {
    // Templating and tokenizing (linear, but a long prompt still takes milliseconds) run on a
    // blocking thread, never on the runtime that serves every connection.
    let (job, prompt) = {
        let st = st.clone();
        tokio::task::spawn_blocking(move || prepare(&st, job))
            .await
            .unwrap_or_else(|_| {
                Err(ApiError::bad_request("internal error preparing the prompt")
                    .status(StatusCode::INTERNAL_SERVER_ERROR, "server_error"))
            })?
    };
    // The prompt must fit before a grammar is compiled for it (seconds for a large schema).
    fits_context(st, &job, &prompt)?;
    let constraint = compile_constraint(st, &job).await?;
    let constrained = constraint.is_some();
    let salt = cache_salt(req.tenant, job.cache_salt.as_deref());
    let mut run = submit(st, &job, &prompt, constraint, salt, req.at, req.in_flight)?;
    if job.stream && constrained {
        match run.rx.recv().await {
            Some((_, Event::GrammarFailed(why), _)) => return Err(grammar_failed(why)),
            first => run.first = first,
        }
    }
    Ok(Started {
        job,
        run,
        prompt_tokens: prompt.len(),
    })
}

async fn handle(st: Arc<AppState>, headers: HeaderMap, body: Body, ep: Endpoint) -> Response {
    let Started {
        job,
        run,
        prompt_tokens,
    } = match start(&st, &headers, body, |b| openai::parse(b, ep)).await {
        Ok(s) => s,
        Err(e) => return error_response(&e),
    };
    let created = unix_now();
    let id = format!(
        "{}-{:x}{:x}",
        if ep == Endpoint::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        created,
        run.guard.ids[0]
    );
    let meta = Meta {
        id,
        created,
        model: st.model_name.clone(),
        tools: job.tools.clone().filter(tools::Tools::active),
        endpoint: ep,
        logprobs: job.logprobs,
        include_usage: job.include_usage,
        prompt_tokens,
    };
    if job.stream {
        stream_response(st, run, meta)
    } else {
        whole_response(st, run, meta, job.n).await
    }
}

/// Check the model name and build the prompt's token ids.
fn prepare(st: &AppState, job: Job) -> ApiResult<(Job, Vec<u32>)> {
    let engine = ready(st)?;
    if job.model != st.model_name {
        return Err(ApiError::bad_request(format!(
            "the model '{}' does not exist here; this server serves '{}'",
            job.model, st.model_name
        ))
        .param("model")
        .code("model_not_found")
        .status(StatusCode::NOT_FOUND, "invalid_request_error"));
    }
    let tok = &engine.tokenizer;
    let enc = |e: herd_engine::Error| ApiError::bad_request(e.to_string());
    let prompt = match &job.prompt_source {
        PromptSource::Messages(messages) => {
            let template = engine.template.as_ref().ok_or_else(|| {
                ApiError::bad_request("this model has no chat template: use /v1/completions")
            })?;
            let mut opts = RenderOptions::generation(tok);
            let (messages, listed) =
                tools::for_template(&engine.family, job.tools.as_ref(), messages);
            opts.tools = listed;
            let text = template.render(&messages, &opts).map_err(enc)?;
            surely_over_context(engine, &text, "messages")?;
            if let Some(listed) = &opts.tools
                && tok.contains_special_text(&Value::from(listed.clone()).to_string())
            {
                return Err(ApiError::bad_request(
                    "a tool definition holds special-token text, which the chat template would \
                     render as a special token",
                )
                .param("tools"));
            }
            let contents = locate_contents(tok, template, &opts, &messages, &text)
                .map_err(|e| e.with_family(&engine.family))?;
            // Message text stays text: a `<end_of_turn>` typed in a message cannot end a turn.
            tok.encode_prompt_guarded(&text, &contents).map_err(enc)?
        }
        PromptSource::Text(t) => {
            surely_over_context(engine, t, "prompt")?;
            // Special-token text in a raw prompt is parsed (as llama-server does: a raw prompt
            // is the caller's own template); BOS is added unless the text starts with it.
            tok.encode_prompt(t).map_err(enc)?
        }
        PromptSource::Tokens(ids) => {
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= tok.vocab_size()) {
                return Err(ApiError::bad_request(format!(
                    "token id {bad} is outside the vocabulary"
                ))
                .param("prompt"));
            }
            ids.clone()
        }
    };
    if let Some(&bad) = job
        .sampling
        .logit_bias
        .keys()
        .find(|&&id| id as usize >= tok.vocab_size())
    {
        return Err(ApiError::bad_request(format!(
            "logit_bias names token id {bad}, outside the vocabulary of {} tokens",
            tok.vocab_size()
        ))
        .param("logit_bias"));
    }
    Ok((job, prompt))
}

/// Where each message's text stands in the rendered prompt (byte ranges, in order), so that it
/// is encoded as text only. Found exactly: the messages are rendered again with each text
/// replaced by a placeholder, and putting the texts (trimmed, as templates trim them, or as
/// sent) back into that shape must give the prompt. A system or user message whose placeholder
/// the shape lacks (a template that drops it, as Gemma 3's drops a system message with no user
/// turn after it) is an error rather than silently lost. When the texts cannot be put back (a
/// template that rewrites them), a message holding special-token text is refused, since it
/// could not be kept as text; others go unguarded (they hold none).
fn locate_contents(
    tok: &Tokenizer,
    template: &ChatTemplate,
    opts: &RenderOptions,
    messages: &[Value],
    rendered: &str,
) -> Result<Vec<std::ops::Range<usize>>, ContentError> {
    const OPEN: char = '\u{E000}';
    const CLOSE: char = '\u{E001}';
    // (message index, role, text) per placeholder.
    let mut texts: Vec<(usize, String, String)> = Vec::new();
    let mut marked = messages.to_vec();
    let mut mark = |i: usize, role: &str, text: &mut Value| {
        if let Value::String(t) = text
            && !t.trim().is_empty()
        {
            texts.push((i, role.to_string(), std::mem::take(t)));
            *t = format!("{OPEN}{}{CLOSE}", texts.len() - 1);
        }
    };
    for (i, m) in marked.iter_mut().enumerate() {
        // Whatever else of the message a template may render (names, tool calls and their
        // arguments) must not hold special-token text either.
        let mut rest = m.clone();
        if let Some(o) = rest.as_object_mut() {
            o.remove("content");
        }
        if tok.contains_special_text(&rest.to_string()) {
            return Err(ContentError::Unguardable(i));
        }
        let role = m["role"].as_str().unwrap_or_default().to_string();
        match &mut m["content"] {
            Value::Array(parts) => parts
                .iter_mut()
                .for_each(|p| mark(i, &role, &mut p["text"])),
            content => mark(i, &role, content),
        }
    }
    let Ok(shape) = template.render(&marked, opts) else {
        // Unguarded: refused if the prompt holds special-token text beyond any text alone.
        return match texts.iter().find(|(_, _, t)| tok.contains_special_text(t)) {
            Some((i, _, _)) => Err(ContentError::Unguardable(*i)),
            None => Ok(Vec::new()),
        };
    };
    // Unguarded, when the texts cannot be placed: the prompt may hold no more special-token
    // texts than the template wrote itself (texts split across parts can form one).
    let unguarded = || {
        let count = |t: &str| tok.special_text_count(t);
        if count(rendered) == count(&shape) {
            Ok(Vec::new())
        } else {
            Err(ContentError::Unguardable(
                texts.iter().map(|(i, _, _)| *i).next().unwrap_or(0),
            ))
        }
    };
    // The shape's pieces: template text, and placeholder numbers.
    let mut pieces: Vec<Result<&str, usize>> = Vec::new();
    let mut rest = shape.as_str();
    while let Some(a) = rest.find(OPEN) {
        let Some(b) = rest[a..].find(CLOSE).map(|b| a + b) else {
            break;
        };
        let Ok(k) = rest[a + OPEN.len_utf8()..b].parse::<usize>() else {
            break;
        };
        pieces.push(Ok(&rest[..a]));
        pieces.push(Err(k));
        rest = &rest[b + CLOSE.len_utf8()..];
    }
    pieces.push(Ok(rest));
    let present: std::collections::HashSet<usize> = pieces.iter().filter_map(|p| p.err()).collect();
    if let Some((i, _, _)) = texts
        .iter()
        .enumerate()
        .find(|(k, (_, role, _))| {
            !present.contains(k) && matches!(role.as_str(), "system" | "user")
        })
        .map(|(_, t)| t)
    {
        return Err(ContentError::Dropped(*i));
    }
    // Walk the prompt along the shape: template text must match as it is; each text as sent or
    // trimmed (templates trim some roles' text and not others'), the form that the next piece
    // of template text follows.
    let mut spans = Vec::new();
    let mut at = 0;
    for (n, p) in pieces.iter().enumerate() {
        match p {
            Ok(lit) => {
                if !rendered[at..].starts_with(lit) {
                    return unguarded();
                }
                at += lit.len();
            }
            Err(k) => {
                let t = texts.get(*k).map_or("", |(_, _, t)| t.as_str());
                let next = match pieces.get(n + 1) {
                    Some(Ok(lit)) => *lit,
                    _ => "",
                };
                let fits = [t, t.trim(), t.trim_start(), t.trim_end()]
                    .into_iter()
                    .find(|v| {
                        rendered[at..].starts_with(v) && rendered[at + v.len()..].starts_with(next)
                    });
                let Some(v) = fits else {
                    return unguarded();
                };
                spans.push(at..at + v.len());
                at += v.len();
            }
        }
    }
    if at != rendered.len() {
        return unguarded();
    }
    Ok(spans)
}

/// Why a conversation's messages cannot be encoded as sent.
enum ContentError {
    /// The template leaves message `i` out of the prompt.
    Dropped(usize),
    /// Message `i` holds special-token text the template rewrites.
    Unguardable(usize),
}

impl ContentError {
    fn with_family(self, family: &str) -> ApiError {
        match self {
            Self::Dropped(i) => ApiError::bad_request(format!(
                "messages[{i}] would not reach the model: this model's chat template leaves it \
                 out of the prompt ({family} templates render a system message only with a user \
                 turn after it); add a user message"
            )),
            Self::Unguardable(i) => ApiError::bad_request(format!(
                "messages[{i}] holds special-token text where herd cannot keep it as text (in a \
                 name or a tool call, or in content the chat template rewrites)"
            )),
        }
        .param("messages")
    }
}

/// Cancels a request's sequences unless it finished; dropped with the response (a client that
/// disconnects drops it).
struct CancelGuard {
    state: Arc<AppState>,
    ids: Vec<SeqId>,
    finished: bool,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.finished {
            if let Some(e) = self.state.engine.get() {
                for &id in &self.ids {
                    e.scheduler.cancel(id);
                }
            }
            self.state
                .metrics
                .requests_cancelled
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Running {
    _in_flight: InFlight,
    rx: mpsc::UnboundedReceiver<(usize, Event, Instant)>,
    /// An event taken from `rx` before the response started, to be handled first.
    first: Option<(usize, Event, Instant)>,
    guard: CancelGuard,
    arrived: Instant,
}

impl Running {
    async fn next(&mut self) -> Option<(usize, Event, Instant)> {
        match self.first.take() {
            Some(e) => Some(e),
            None => self.rx.recv().await,
        }
    }
}

/// A text that needs more tokens than the context holds whatever its tokenization is refused
/// before it is tokenized: each token stands for at most `max_token_bytes` bytes, so a text of
/// more than `context × max_token_bytes` bytes cannot fit. The bound allows 4 times that, for
/// normalizers that shrink text (NFKC, lowercasing: about 3× at most). A tokenizer that drops
/// bytes outright (a SentencePiece vocabulary without byte tokens) could see a long junk prompt
/// refused here that would have fit; herd's supported vocabularies do not.
fn surely_over_context(engine: &Engine, text: &str, param: &str) -> ApiResult<()> {
    let context = engine.scheduler.config().context;
    let limit = context
        .saturating_mul(engine.max_token_bytes)
        .saturating_mul(4);
    if text.len() > limit {
        return Err(ApiError::bad_request(format!(
            "the prompt has {} bytes, far more than {context} tokens can hold (a token stands \
             for at most {} bytes): this server's context is {context} tokens",
            text.len(),
            engine.max_token_bytes
        ))
        .param(param)
        .code("context_length_exceeded"));
    }
    Ok(())
}

/// A request whose grammar could not go on mid-generation (beyond llguidance's parser limits):
/// the request's fault, a 400 like a grammar refused at compile time.
fn grammar_failed(why: String) -> ApiError {
    ApiError::bad_request(why)
        .param("response_format")
        .code("invalid_grammar")
}

/// A prompt leaves room for at least one generated token in the server's context, and for
/// `max_tokens` when the client set it (OpenAI answers 400 there too, rather than cutting the
/// output short).
fn fits_context(st: &AppState, job: &Job, prompt: &[u32]) -> ApiResult<()> {
    let context = job_context(ready(st)?, job);
    let whose = match job.context_limit {
        Some((_, field)) => format!("the request's context ({field})"),
        None => "this server's context".to_string(),
    };
    let prompt_param = match job.prompt_source {
        PromptSource::Messages(_) => "messages",
        _ => "prompt",
    };
    if prompt.len() >= context {
        return Err(ApiError::bad_request(format!(
            "the prompt has {} tokens; {whose} is {context} tokens",
            prompt.len()
        ))
        .param(prompt_param)
        .code("context_length_exceeded"));
    }
    if let Some(max) = job.max_tokens
        && !job.max_tokens_is_bound
        && prompt.len() + max > context
    {
        return Err(ApiError::bad_request(format!(
            "{whose} is {context} tokens, and the request asks for {} ({} in the \
             prompt, {max} to generate): lower {} or shorten the prompt",
            prompt.len() + max,
            prompt.len(),
            job.max_tokens_field
        ))
        .param(job.max_tokens_field)
        .code("context_length_exceeded"));
    }
    Ok(())
}

/// The context a job's prompt and output must fit: the server's, or the job's own if smaller
/// (a larger one is the server's: as Ollama holds `num_ctx` to the model's context length).
fn job_context(engine: &Engine, job: &Job) -> usize {
    let server = engine.scheduler.config().context;
    job.context_limit.map_or(server, |(c, _)| c.min(server))
}

/// Grammar compilations running at once; more wait their turn (each can take seconds of CPU on
/// a large schema, and must not crowd out the engine).
const CONCURRENT_COMPILES: usize = 2;

/// The request's output constraint, compiled off the async runtime (on a blocking thread, which
/// hands the work to a thread with a large stack: see `ConstraintCompiler::compile`).
async fn compile_constraint(st: &Arc<AppState>, job: &Job) -> ApiResult<Option<Constraint>> {
    let Some(grammar) = job.grammar.clone() else {
        return Ok(None);
    };
    let compiler = ready(st)?.constraints.clone();
    let invalid = |e: String| {
        ApiError::bad_request(format!("the output constraint cannot be enforced: {e}"))
            .param("response_format")
            .code("invalid_grammar")
    };
    // Too large is said at once, not after waiting for a slot.
    herd_engine::constraint::check_size(&grammar).map_err(invalid)?;
    let slot = st
        .compile_slots
        .clone()
        .acquire_owned()
        .await
        .map_err(|_| ApiError::bad_request("the server is shutting down"))?;
    // The slot goes with the compilation, which runs to its end even if the client leaves:
    // a client that hangs up cannot start more than the slots allow.
    let compiled = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        compiler.compile(&grammar)
    })
    .await
    .unwrap_or_else(|_| Err("the grammar compiler failed on this grammar".into()));
    compiled.map(Some).map_err(invalid)
}

fn submit(
    st: &Arc<AppState>,
    job: &Job,
    prompt: &[u32],
    constraint: Option<Constraint>,
    cache_salt: u64,
    arrived: Instant,
    in_flight: InFlight,
) -> ApiResult<Running> {
    fits_context(st, job, prompt)?;
    let engine = ready(st)?;
    let context = job_context(engine, job);
    let room = context - prompt.len();
    let max_tokens = job.max_tokens.map_or(room, |m| m.min(room));
    let seed = job.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let mut guard = CancelGuard {
        state: st.clone(),
        ids: Vec::new(),
        finished: false,
    };
    let requests = (0..job.n)
        .map(|index| {
            let tx = tx.clone();
            let mut sampling = job.sampling.clone();
            sampling.seed = choice_seed(seed, index);
            GenerationRequest {
                prompt: prompt.to_vec(),
                max_tokens,
                stop: job.stop.clone(),
                sampling,
                ignore_eos: job.ignore_eos,
                constraint: constraint.clone(),
                cache_salt,
                sink: Box::new(move |e| tx.send((index, e, Instant::now())).is_ok()),
            }
        })
        .collect();
    // All choices or none: they take their places in the queue together.
    match engine.scheduler.submit_all(requests) {
        Ok(ids) => guard.ids = ids,
        Err(e) => {
            guard.finished = true;
            return Err(match e {
                SubmitError::QueueFull { .. } | SubmitError::Stopped => {
                    ApiError::bad_request(e.to_string())
                        .status(StatusCode::SERVICE_UNAVAILABLE, "server_error")
                }
                SubmitError::OverQueueLimit { .. } => {
                    ApiError::bad_request(e.to_string()).param("n")
                }
                SubmitError::PromptTooLong { .. } | SubmitError::TooLargeForCache { .. } => {
                    ApiError::bad_request(e.to_string()).code("context_length_exceeded")
                }
                SubmitError::EmptyPrompt => ApiError::bad_request(e.to_string()),
            });
        }
    }
    Ok(Running {
        _in_flight: in_flight,
        rx,
        first: None,
        guard,
        arrived,
    })
}

/// The seed of choice `index` of a request seeded `seed`: the seed itself for the first choice
/// (so that `n: 1` samples as `herd run --seed` does), and for the others a SplitMix64 mix of
/// both, so that requests with neighbouring seeds share no choice (with `seed + index`, choice
/// 1 of seed 7 was choice 0 of seed 8).
pub fn choice_seed(seed: u64, index: usize) -> u64 {
    if index == 0 {
        return seed;
    }
    let mut z = seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Response fields shared by every chunk of one request.
struct Meta {
    id: String,
    /// Tools in play: output that parses as calls becomes `tool_calls`.
    tools: Option<tools::Tools>,
    created: u64,
    model: String,
    endpoint: Endpoint,
    logprobs: bool,
    include_usage: bool,
    prompt_tokens: usize,
}

/// Per-choice timing for the latency histograms.
struct Timing {
    last: Vec<Option<Instant>>,
}

impl Timing {
    fn token(&mut self, st: &AppState, arrived: Instant, index: usize, at: Instant) {
        match self.last[index] {
            None => st
                .metrics
                .time_to_first_token
                .observe((at - arrived).as_secs_f64()),
            Some(prev) => st
                .metrics
                .inter_token_latency
                .observe((at - prev).as_secs_f64()),
        }
        self.last[index] = Some(at);
    }
}

#[derive(Default)]
struct Choice {
    text: String,
    logprobs: Vec<Value>,
    tokens: Vec<String>,
    /// Each token's length in bytes of text (for `text_offset`).
    token_lens: Vec<usize>,
    token_logprobs: Vec<f32>,
    top: Vec<Value>,
    finish: Option<FinishReason>,
    usage: Usage,
}

impl Choice {
    fn record(&mut self, tok: &[Vec<u8>], s: &herd_engine::sampler::Sampled, text: &str) {
        self.text.push_str(text);
        self.logprobs.push(openai::chat_logprob(tok, s));
        self.tokens.push(openai::token_text(tok, s.token));
        self.token_lens
            .push(tok.get(s.token as usize).map_or(0, Vec::len));
        self.token_logprobs.push(s.logprob);
        // Tokens that hold parts of one character have distinct names (`token_text`), so they
        // no longer collapse into one key. (Two tokens with the same whole text, a special one
        // and a plain one, still share a key: the map's shape is OpenAI's.)
        let top: serde_json::Map<String, Value> = s
            .top
            .iter()
            .map(|&(id, lp)| (openai::token_text(tok, id), Value::from(lp)))
            .collect();
        self.top.push(Value::Object(top));
    }
}

fn finish_str(f: Option<FinishReason>) -> Value {
    f.map_or(Value::Null, |f| Value::from(f.as_str()))
}

async fn whole_response(st: Arc<AppState>, mut run: Running, meta: Meta, n: usize) -> Response {
    let tok = match st.engine.get() {
        Some(e) => e.token_bytes.clone(),
        None => return error_response(&ApiError::bad_request("the engine is gone")),
    };
    let mut choices: Vec<Choice> = (0..n).map(|_| Choice::default()).collect();
    let mut timing = Timing {
        last: vec![None; n],
    };
    let mut open = n;
    while open > 0 {
        let Some((i, event, at)) = run.next().await else {
            break;
        };
        match event {
            Event::Token { sampled, text } => {
                timing.token(&st, run.arrived, i, at);
                choices[i].record(&tok, &sampled, &text);
            }
            Event::Done {
                text,
                finish,
                usage,
                ..
            } => {
                choices[i].text.push_str(&text);
                choices[i].finish = Some(finish);
                choices[i].usage = usage;
                open -= 1;
            }
            Event::Failed(why) => {
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                run.guard.finished = false;
                return error_response(
                    &ApiError::bad_request(why)
                        .status(StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
                );
            }
            Event::GrammarFailed(why) => {
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                run.guard.finished = false;
                return error_response(&grammar_failed(why));
            }
        }
    }
    if open > 0 {
        return error_response(
            &ApiError::bad_request("the engine stopped")
                .status(StatusCode::SERVICE_UNAVAILABLE, "server_error"),
        );
    }
    run.guard.finished = true;
    st.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
    let completion: usize = choices.iter().map(|c| c.usage.completion_tokens).sum();
    let cached = choices
        .iter()
        .map(|c| c.usage.cached_tokens)
        .max()
        .unwrap_or(0);
    let usage = openai::usage_json(meta.prompt_tokens, completion, cached);
    let body = match meta.endpoint {
        Endpoint::Chat => json!({
            "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
            "choices": choices.iter().enumerate().map(|(i, c)| {
                let calls = meta.tools.as_ref().and_then(|t| t.parse_calls(&c.text));
                let (message, finish) = match calls {
                    Some(calls) => (
                        json!({"role": "assistant", "content": null,
                               "tool_calls": tool_calls_json(&meta.id, i, &calls, false)}),
                        Value::from("tool_calls"),
                    ),
                    None => (json!({"role": "assistant", "content": c.text}), finish_str(c.finish)),
                };
                json!({
                    "index": i,
                    "message": message,
                    "logprobs": if meta.logprobs { json!({"content": c.logprobs}) } else { Value::Null },
                    "finish_reason": finish,
                })
            }).collect::<Vec<_>>(),
            "usage": usage,
        }),
        Endpoint::Completions => json!({
            "id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": choices.iter().enumerate().map(|(i, c)| json!({
                "index": i,
                "text": c.text,
                "logprobs": if meta.logprobs { completion_logprobs(c) } else { Value::Null },
                "finish_reason": finish_str(c.finish),
            })).collect::<Vec<_>>(),
            "usage": usage,
        }),
    };
    axum::Json(body).into_response()
}

/// OpenAI `tool_calls` entries (with `index` in stream deltas).
fn tool_calls_json(id: &str, choice: usize, calls: &[tools::Call], delta: bool) -> Vec<Value> {
    calls
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let mut v = json!({"id": format!("call_{}_{choice}_{k}", id.rsplit('-').next().unwrap_or("0")),
                               "type": "function",
                               "function": {"name": c.name, "arguments": c.arguments}});
            if delta {
                v["index"] = Value::from(k);
            }
            v
        })
        .collect()
}

fn completion_logprobs(c: &Choice) -> Value {
    let mut offset = 0;
    let offsets: Vec<usize> = c
        .token_lens
        .iter()
        .map(|len| {
            let o = offset;
            offset += len;
            o
        })
        .collect();
    json!({"tokens": c.tokens, "token_logprobs": c.token_logprobs, "top_logprobs": c.top, "text_offset": offsets})
}

/// One choice's output on its way to a client. With tools in play, text is held back while it
/// may be a call: from the start when a call is forced, else until its first non-blank
/// character shows whether it opens JSON (`{` or `[`); held text that parses as calls to the
/// offered tools becomes calls at the end. Shared by every API's stream writer.
struct CallHold {
    /// The text held so far (`None`: not holding, text passes through).
    held: Option<String>,
    /// Holding until the first non-blank character decides.
    undecided: bool,
    /// Logprob entries of the held tokens, sent with their text.
    logprobs: Vec<Value>,
}

/// How a choice ends: as calls, or as its last text (with the logprob entries of held tokens).
enum Finale {
    Calls(Vec<tools::Call>),
    Text(String, Vec<Value>),
}

impl CallHold {
    fn new(tools: Option<&tools::Tools>) -> Self {
        let forced = tools.is_some_and(|t| t.forced_schema().is_some());
        Self {
            held: tools.map(|_| String::new()),
            undecided: tools.is_some() && !forced,
            logprobs: Vec::new(),
        }
    }

    /// A token's text (and its logprob entry): what to send now, or `None` while it is held.
    fn token(&mut self, text: &str, logprob: Option<Value>) -> Option<(String, Vec<Value>)> {
        let Some(buf) = self.held.as_mut() else {
            return Some((text.to_string(), logprob.into_iter().collect()));
        };
        buf.push_str(text);
        self.logprobs.extend(logprob);
        match buf.trim_start().chars().next() {
            // Plain text after all: send what was held and stream from here.
            Some(c) if self.undecided && c != '{' && c != '[' => Some((
                self.held.take().unwrap_or_default(),
                std::mem::take(&mut self.logprobs),
            )),
            Some(_) => {
                self.undecided = false;
                None
            }
            None => None,
        }
    }

    /// The choice's last text arrived: held text that parses as calls is calls.
    fn done(&mut self, text: &str, tools: Option<&tools::Tools>) -> Finale {
        let Some(mut buf) = self.held.take() else {
            return Finale::Text(text.to_string(), Vec::new());
        };
        buf.push_str(text);
        match tools.and_then(|t| t.parse_calls(&buf)) {
            Some(calls) => Finale::Calls(calls),
            None => Finale::Text(buf, std::mem::take(&mut self.logprobs)),
        }
    }
}

/// The sending end of a streamed response's body.
pub(crate) type ChunkSender = mpsc::Sender<Result<Bytes, std::convert::Infallible>>;

/// A streamed response of `content_type` (uncached) whose body `pump` writes, on a task of its
/// own, into the channel it is given; the body ends when `pump` drops the sender.
pub(crate) fn streamed<Fut>(
    content_type: &'static str,
    pump: impl FnOnce(ChunkSender) -> Fut,
) -> Response
where
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(pump(tx));
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Server-sent events as OpenAI sends them: per choice a role chunk first (chat), content
/// chunks, a chunk with the finish reason; then with `include_usage` a chunk with empty choices
/// and the usage; then `[DONE]`.
fn stream_response(st: Arc<AppState>, run: Running, meta: Meta) -> Response {
    streamed("text/event-stream", |tx| pump(st, run, meta, tx))
}

async fn pump(
    st: Arc<AppState>,
    mut run: Running,
    meta: Meta,
    tx: mpsc::Sender<Result<Bytes, std::convert::Infallible>>,
) {
    let Some(tok) = st.engine.get().map(|e| e.token_bytes.clone()) else {
        return;
    };
    let n = run.guard.ids.len();
    let usage_field = |u: Value| if meta.include_usage { u } else { Value::Null };
    let chunk = |choices: Vec<Value>, usage: Value| -> Bytes {
        let object = match meta.endpoint {
            Endpoint::Chat => "chat.completion.chunk",
            Endpoint::Completions => "text_completion",
        };
        let mut v = json!({"id": meta.id, "object": object, "created": meta.created,
                           "model": meta.model, "choices": choices});
        if meta.include_usage {
            v["usage"] = usage;
        }
        Bytes::from(format!("data: {v}\n\n"))
    };
    let send = |b: Bytes| {
        let tx = tx.clone();
        async move { tx.send(Ok(b)).await.is_ok() }
    };
    if meta.endpoint == Endpoint::Chat {
        for i in 0..n {
            let c = json!({"index": i, "delta": {"role": "assistant", "content": ""},
                           "logprobs": null, "finish_reason": null});
            if !send(chunk(vec![c], usage_field(Value::Null))).await {
                return;
            }
        }
    }
    let piece = |i: usize, text: &str, lp: Value, finish: Value| match meta.endpoint {
        Endpoint::Chat => {
            let delta = if finish.is_null() {
                json!({"content": text})
            } else {
                json!({})
            };
            json!({"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish})
        }
        Endpoint::Completions => {
            json!({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
        }
    };
    let mut timing = Timing {
        last: vec![None; n],
    };
    let (mut open, mut completion, mut cached) = (n, 0, 0);
    let mut holds: Vec<CallHold> = (0..n).map(|_| CallHold::new(meta.tools.as_ref())).collect();
    while open > 0 {
        // A client that leaves while its request waits (queued, or in a long prefill) is seen
        // at once, not at the next event: the guard then cancels the request before compute.
        let next = tokio::select! {
            next = run.next() => next,
            () = tx.closed() => return,
        };
        let Some((i, event, at)) = next else {
            return;
        };
        let ok = match event {
            Event::Token { sampled, text } => {
                timing.token(&st, run.arrived, i, at);
                let lp = if !meta.logprobs {
                    None
                } else if meta.endpoint == Endpoint::Chat {
                    Some(openai::chat_logprob(&tok, &sampled))
                } else {
                    let mut c = Choice::default();
                    c.record(&tok, &sampled, &text);
                    Some(completion_logprobs(&c))
                };
                match holds[i].token(&text, lp) {
                    None => true,
                    // Held-back text (a partial character or stop string) sends nothing yet,
                    // unless logprobs are asked for: every token then has its chunk.
                    Some((text, lps)) if text.is_empty() && lps.is_empty() => true,
                    Some((text, lps)) => {
                        let lp = match (meta.logprobs, meta.endpoint) {
                            (false, _) => Value::Null,
                            (true, Endpoint::Chat) => json!({"content": lps}),
                            (true, Endpoint::Completions) => {
                                lps.into_iter().next().unwrap_or(Value::Null)
                            }
                        };
                        send(chunk(
                            vec![piece(i, &text, lp, Value::Null)],
                            usage_field(Value::Null),
                        ))
                        .await
                    }
                }
            }
            Event::Done {
                text,
                finish,
                usage,
                ..
            } => {
                open -= 1;
                completion += usage.completion_tokens;
                cached = cached.max(usage.cached_tokens);
                let (body, reason) = match holds[i].done(&text, meta.tools.as_ref()) {
                    Finale::Calls(calls) => (
                        Some(
                            json!({"index": i, "delta": {"tool_calls": tool_calls_json(&meta.id, i, &calls, true)},
                                    "logprobs": null, "finish_reason": null}),
                        ),
                        "tool_calls",
                    ),
                    Finale::Text(text, lps) => {
                        let lp = if meta.logprobs && !lps.is_empty() {
                            json!({"content": lps})
                        } else {
                            Value::Null
                        };
                        let body = (!text.is_empty() || !lp.is_null())
                            .then(|| piece(i, &text, lp, Value::Null));
                        (body, finish.as_str())
                    }
                };
                let sent = match body {
                    Some(b) => send(chunk(vec![b], usage_field(Value::Null))).await,
                    None => true,
                };
                sent && send(chunk(
                    vec![piece(i, "", Value::Null, Value::from(reason))],
                    usage_field(Value::Null),
                ))
                .await
            }
            Event::Failed(why) => {
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                let e = ApiError::bad_request(why)
                    .status(StatusCode::INTERNAL_SERVER_ERROR, "server_error");
                // The error is the stream's last event; `[DONE]` still ends it, as clients
                // that wait for it expect.
                if send(Bytes::from(format!("data: {}\n\n", e.body()))).await {
                    let _ = send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                }
                return;
            }
            Event::GrammarFailed(why) => {
                // The headers went out with the first chunk: the error is the stream's last
                // event, typed as the request's fault.
                st.metrics.requests_error.fetch_add(1, Ordering::Relaxed);
                let e = grammar_failed(why);
                if send(Bytes::from(format!("data: {}\n\n", e.body()))).await {
                    let _ = send(Bytes::from_static(b"data: [DONE]\n\n")).await;
                }
                return;
            }
        };
        if !ok {
            // The client went away: the guard cancels the sequences when this task ends.
            return;
        }
    }
    if meta.include_usage {
        let u = openai::usage_json(meta.prompt_tokens, completion, cached);
        if !send(chunk(Vec::new(), u)).await {
            return;
        }
    }
    if send(Bytes::from_static(b"data: [DONE]\n\n")).await {
        run.guard.finished = true;
        st.metrics.requests_ok.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serve on `listener` until `shutdown` resolves; then stop accepting, give in-flight requests
/// [`Timeouts::shutdown_grace`] to finish, and stop the engine (failing what is left).
pub async fn serve(
    state: Arc<AppState>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = router(state.clone());
    let timeouts = state.options.timeouts;
    let requests = state.clone();
    let in_flight = move || requests.in_flight.load(Ordering::Acquire);
    let finished = conn::accept_loop(listener, app, timeouts, shutdown, in_flight).await;
    if !finished {
        tracing::warn!(
            grace_s = timeouts.shutdown_grace.as_secs(),
            "in-flight requests did not finish within the shutdown grace; stopping them"
        );
    }
    if let Some(e) = state.engine.get() {
        e.scheduler.shutdown(finished);
    }
    Ok(())
}
