//! `herd serve MODEL`: the OpenAI-compatible server.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use herd_engine::scheduler::SchedulerConfig;
use herd_server::AppState;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// A GGUF file, an HF directory or a catalog alias, e.g. gemma3:270m.
    #[arg(default_value = herd_engine::registry::DEFAULT_MODEL)]
    model: String,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model name clients send and /v1/models lists (default: the model argument).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1 (repeatable). HERD_API_KEY also sets one.
    #[arg(long, env = "HERD_API_KEY")]
    api_key: Vec<String>,
    /// A file of accepted keys, one per line.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Positions per sequence (prompt + output); capped at the model's context length.
    #[arg(long, default_value_t = 8192)]
    ctx_size: usize,
    /// Positions the KV cache holds in all (shared by all sequences and cached prefixes).
    #[arg(long, default_value_t = 65536)]
    kv_tokens: usize,
    /// Positions per KV block.
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// Element type of the KV cache: f16, bf16, f32 or q8_0 (blocks of 32: half of f16's
    /// memory, so twice the positions in the same RAM, a little less precise).
    #[arg(long, default_value = "f16", value_parser = crate::parse_kv_type)]
    kv_type: herd_kernels::DType,
    /// Sequences decoding at once.
    #[arg(long, default_value_t = 64)]
    max_running: usize,
    /// Tokens per engine step (decode tokens plus prefill chunks).
    #[arg(long, default_value_t = 512)]
    step_tokens: usize,
    /// Requests allowed to wait for a place; more get 503.
    #[arg(long, default_value_t = 256)]
    max_waiting: usize,
    /// Seconds a client gets to send a request's head; a keep-alive connection idle this long
    /// is closed.
    #[arg(long, default_value_t = 30)]
    header_timeout: u64,
    /// Seconds a client gets to send a request's body, and that a response may wait on a
    /// client that does not read it before the connection is closed (its request cancelled).
    #[arg(long, default_value_t = 60)]
    stall_timeout: u64,
    /// Seconds in-flight requests get to finish after SIGTERM or Ctrl-C; a second signal exits
    /// at once.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// An origin whose browser pages may call the API (repeatable; `*` for any), e.g.
    /// `--cors-origin http://localhost:3000`. Without it browsers refuse cross-origin calls.
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// Do not serve the chat page at `/`.
    #[arg(long)]
    no_webui: bool,
    /// Compute threads, the engine thread included (default: one per CPU).
    #[arg(short = 't', long, env = "HERD_THREADS")]
    threads: Option<usize>,
    #[command(flatten)]
    load: crate::load::LoadArgs,
}

/// The thread policy of `herd serve`, on 2 vCPUs as on 64 cores:
/// - compute: `--threads` (or `HERD_THREADS`, else one per CPU) threads run the forward pass:
///   the engine thread and the pool's workers. Workers watch for the next kernel call for at
///   most 0.5 ms inside a step and sleep as soon as the step's forward pass ends;
/// - the output thread (detokenization, stop strings, delivery) and the grammar-mask worker
///   block on their queues and run only when there is work;
/// - HTTP: a Tokio runtime of [`http_threads`] workers; no model compute runs there.
///
/// Compute takes every core, the rest is light: the few threads beside it share cores with it
/// through the scheduler of the OS, and none of them spins while the others work.
fn http_threads(compute: usize) -> usize {
    (compute / 8).clamp(1, 4)
}

pub fn run(args: &ServeArgs) -> Result<()> {
    // A bad --quantize fails now, not after the server has started loading.
    args.load.file_type()?;
    let mut keys = args.api_key.clone();
    if let Some(f) = &args.api_key_file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading the API key file {}", f.display()))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
        if keys.is_empty() {
            bail!("{} holds no keys", f.display());
        }
    }
    if args.block_size == 0 || args.kv_tokens < args.block_size {
        bail!("--kv-tokens must hold at least one block of --block-size positions");
    }
    let config = SchedulerConfig {
        block_size: args.block_size,
        kv_type: args.kv_type,
        kv_blocks: args.kv_tokens / args.block_size,
        max_running: args.max_running,
        step_tokens: args.step_tokens,
        max_waiting: args.max_waiting,
        context: args.ctx_size,
    };
    let name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| args.model.clone());
    for t in [args.header_timeout, args.stall_timeout] {
        if t == 0 {
            bail!("--header-timeout and --stall-timeout must be at least 1 second");
        }
    }
    let secs = std::time::Duration::from_secs;
    let options = herd_server::ServerOptions {
        timeouts: herd_server::Timeouts {
            header: secs(args.header_timeout),
            body: secs(args.stall_timeout),
            write_stall: secs(args.stall_timeout),
            shutdown_grace: secs(args.shutdown_grace),
        },
        cors_origins: args.cors_origins.clone(),
        no_webui: args.no_webui,
    };
    let state = AppState::with_options(name, keys, options);
    let compute = match args.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(t) => {
            if !herd_kernels::pool::init_global(t) {
                bail!("the thread pool was already started with another size");
            }
            t
        }
        None => herd_kernels::pool::global().n_threads(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(http_threads(compute))
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        eprintln!(
            "herd: listening on http://{} (loading {})",
            listener.local_addr()?,
            args.model
        );
        // Load in the background: /health answers 503 until the engine is set.
        let (model, st, load) = (args.model.clone(), state.clone(), args.load.clone());
        let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<String>();
        tokio::task::spawn_blocking(move || {
            let loaded = load.load(&model).map_err(|e| format!("{e:#}"));
            let engine = loaded.and_then(|l| {
                cache_holds_a_context(&config, l.model.max_context())?;
                herd_server::engine(l, config).map_err(|e| e.to_string())
            });
            match engine {
                Ok(engine) => {
                    let ctx = engine.scheduler.config().context;
                    let _ = st.engine.set(engine);
                    eprintln!("herd: {model} ready (context {ctx} tokens)");
                }
                Err(e) => {
                    let _ = fail_tx.send(e);
                }
            }
        });
        let shutdown = shutdown_signal(fail_rx.map_or_pending());
        herd_server::serve(state.clone(), listener, shutdown).await?;
        if state.engine.get().is_none() {
            bail!("the model did not load");
        }
        eprintln!("herd: stopped");
        Ok(())
    });
    // Blocking work still running (a model still loading when a signal came) is not waited for.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// A request may use the whole context (`--ctx-size`, capped at the model's): a cache smaller
/// than that could accept a request and fail it after generating, so the server refuses to
/// start.
fn cache_holds_a_context(
    config: &SchedulerConfig,
    model_context: usize,
) -> std::result::Result<(), String> {
    let context = config.context.min(model_context);
    let positions = config.kv_blocks * config.block_size;
    if positions < context {
        return Err(format!(
            "--kv-tokens {} holds {positions} positions, fewer than one full context ({context} \
             tokens: --ctx-size, capped at the model's): a request could be accepted and then \
             not finish. Raise --kv-tokens to at least {} or lower --ctx-size to at most \
             {positions}",
            positions,
            context.div_ceil(config.block_size) * config.block_size
        ));
    }
    Ok(())
}

trait OrPending {
    fn map_or_pending(self) -> impl std::future::Future<Output = ()> + Send;
}

impl OrPending for tokio::sync::oneshot::Receiver<String> {
    /// Resolves when loading failed (after printing why); never when it succeeded.
    async fn map_or_pending(self) {
        match self.await {
            Ok(why) => eprintln!("Error: loading the model: {why}"),
            Err(_) => std::future::pending::<()>().await,
        }
    }
}

async fn shutdown_signal(load_failed: impl std::future::Future<Output = ()>) {
    let term = || async {
        #[cfg(unix)]
        {
            if let Ok(mut s) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            {
                s.recv().await;
                return;
            }
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => eprintln!("herd: interrupted, finishing in-flight requests (again to exit now)"),
        _ = term() => eprintln!("herd: SIGTERM, finishing in-flight requests (again to exit now)"),
        _ = load_failed => return,
    }
    // A second signal while requests finish: exit now, with the shell's status for it.
    tokio::spawn(async move {
        let code = tokio::select! {
            _ = tokio::signal::ctrl_c() => 130,
            _ = term() => 143,
        };
        eprintln!("herd: second signal, exiting without waiting");
        std::process::exit(code);
    });
}
