//! Continuous batching: one thread owns the model and a paged KV cache and runs steps; requests
//! join the running batch between steps and leave it as soon as they finish or are cancelled.
//!
//! Each step spends a token budget: first one token for every sequence that is decoding, then
//! chunks of waiting prompts, so a long prompt is prefilled over several steps while other
//! streams keep producing tokens. A new sequence first attaches the cached blocks of the longest
//! prompt prefix seen before (system prompts, few-shot examples) and computes only the rest.
//! When the cache runs out of blocks mid-generation, the youngest sequence is preempted: its
//! blocks go back to the pool (indexed, so they are usually found again) and it is re-queued
//! to be recomputed from its tokens, keeping its sampler state.
//!
//! The kernels reduce every row in the same order whatever the batch, and keys and values do not
//! depend on how a prompt was chunked or shared, so a request's greedy output is the same
//! whether it runs alone or beside thirty others.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use herd_models::{Batch, CausalLm, KvCache, SeqId};

use crate::Tokenizer;
use crate::constraint::{Constraint, Mask};
use crate::detokenize::{StopMatcher, StopResult, StreamDecoder};
use crate::generate::FinishReason;
use crate::sampler::{Sampled, Sampler, SamplingParams};

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Positions per KV block.
    pub block_size: usize,
    /// Blocks in the KV pool.
    pub kv_blocks: usize,
    /// Sequences in the running batch at most.
    pub max_running: usize,
    /// Tokens one step computes at most (decode tokens plus prefill chunks).
    pub step_tokens: usize,
    /// Requests waiting for a place at most; more are refused.
    pub max_waiting: usize,
    /// Positions per sequence (prompt plus output).
    pub context: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            kv_blocks: 2048,
            max_running: 64,
            step_tokens: 512,
            max_waiting: 256,
            context: 8192,
        }
    }
}

/// What the scheduler reports about one request, in order: tokens, then exactly one `Done` or
/// `Failed`.
#[derive(Clone, Debug)]
pub enum Event {
    /// A sampled token and the text it completes (possibly empty while a multi-byte character
    /// or a possible stop string is held back).
    Token {
        sampled: Sampled,
        text: String,
    },
    /// Text released when generation ends (held-back bytes), then the end.
    Done {
        text: String,
        finish: FinishReason,
        usage: Usage,
    },
    Failed(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub cached_tokens: usize,
}

/// Receives a request's events; returns `false` when nobody listens any more (the client went
/// away), which cancels the request.
pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub sampling: SamplingParams,
    /// Keep generating through end-of-generation tokens (benchmarks: a fixed output length).
    pub ignore_eos: bool,
    /// A grammar the output must follow (JSON schema, regex, Lark).
    pub constraint: Option<Constraint>,
    pub sink: Sink,
}

impl std::fmt::Debug for GenerationRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GenerationRequest")
            .field("prompt_tokens", &self.prompt.len())
            .field("max_tokens", &self.max_tokens)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubmitError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error(
        "the prompt has {prompt} tokens and the context holds {context}: nothing is left to generate"
    )]
    PromptTooLong { prompt: usize, context: usize },
    #[error("the prompt needs {needed} KV blocks and the whole cache has {total}")]
    TooLargeForCache { needed: usize, total: usize },
    #[error("{0} requests are already waiting")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
}

/// Counters and gauges for metrics.
#[derive(Clone, Copy, Debug, Default)]
pub struct SchedulerStats {
    pub running: usize,
    pub waiting: usize,
    pub kv_blocks_total: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_cached: usize,
    pub prompt_tokens: u64,
    pub prefix_hit_tokens: u64,
    pub generated_tokens: u64,
    pub steps: u64,
    pub preemptions: u64,
    /// Grammar masks computed, and the time they took.
    pub masks: u64,
    pub mask_seconds: f64,
}

enum Command {
    Submit(SeqId, Box<GenerationRequest>),
    Cancel(SeqId),
    Shutdown { drain: bool },
}

/// Handle to the engine thread.
#[derive(Debug)]
pub struct Scheduler {
    tx: Sender<Command>,
    stats: Arc<Mutex<SchedulerStats>>,
    next_id: Mutex<SeqId>,
    config: SchedulerConfig,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Scheduler {
    pub fn start(
        model: Box<dyn CausalLm>,
        tokenizer: Arc<Tokenizer>,
        mut config: SchedulerConfig,
    ) -> Self {
        config.context = config.context.min(model.max_context()).max(1);
        config.step_tokens = config.step_tokens.max(1);
        config.max_running = config.max_running.max(1);
        let (tx, rx) = channel();
        let stats = Arc::new(Mutex::new(SchedulerStats {
            kv_blocks_total: config.kv_blocks,
            ..Default::default()
        }));
        let cache = model.new_paged_cache(config.block_size, config.kv_blocks);
        let mut lp = Loop {
            model,
            tokenizer,
            cache,
            config: config.clone(),
            rx,
            waiting: VecDeque::new(),
            running: Vec::new(),
            stats: stats.clone(),
            counters: SchedulerStats::default(),
            draining: false,
        };
        let thread = std::thread::Builder::new()
            .name("herd-engine".into())
            .spawn(move || lp.run())
            .expect("spawn the engine thread");
        Self {
            tx,
            stats,
            next_id: Mutex::new(1),
            config,
            thread: Mutex::new(Some(thread)),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queue a request; its events go to its sink. Returns its id (for `cancel`).
    pub fn submit(&self, req: GenerationRequest) -> Result<SeqId, SubmitError> {
        let context = self.config.context;
        if req.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        if req.prompt.len() >= context {
            return Err(SubmitError::PromptTooLong {
                prompt: req.prompt.len(),
                context,
            });
        }
        let needed = (req.prompt.len() + 1).div_ceil(self.config.block_size);
        if needed > self.config.kv_blocks {
            return Err(SubmitError::TooLargeForCache {
                needed,
                total: self.config.kv_blocks,
            });
        }
        let waiting = self.stats().waiting;
        if waiting >= self.config.max_waiting {
            return Err(SubmitError::QueueFull(waiting));
        }
        let id = {
            let mut n = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            *n
        };
        self.tx
            .send(Command::Submit(id, Box::new(req)))
            .map_err(|_| SubmitError::Stopped)?;
        Ok(id)
    }

    /// Stop a request now: it frees its blocks and reports nothing more.
    pub fn cancel(&self, id: SeqId) {
        let _ = self.tx.send(Command::Cancel(id));
    }

    pub fn stats(&self) -> SchedulerStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stop the engine: with `drain`, requests already admitted or waiting finish first;
    /// without, they end with a `Failed` event. Blocks until the thread exits.
    pub fn shutdown(&self, drain: bool) {
        let _ = self.tx.send(Command::Shutdown { drain });
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown(false);
    }
}

/// A request in the engine: its tokens so far (prompt, then output) and how many of them the
/// cache holds.
struct Sequence {
    id: SeqId,
    req: GenerationRequest,
    tokens: Vec<u32>,
    cached: usize,
    prompt_len: usize,
    cached_prompt: usize,
    /// Admitted before (and preempted since): prompt statistics are counted once.
    admitted: bool,
    generated: usize,
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
}

impl Sequence {
    fn new(id: SeqId, req: GenerationRequest) -> Self {
        Self {
            id,
            tokens: req.prompt.clone(),
            cached: 0,
            prompt_len: req.prompt.len(),
            cached_prompt: 0,
            admitted: false,
            generated: 0,
            sampler: Sampler::new(req.sampling.clone(), &req.prompt),
            decoder: StreamDecoder::new(true),
            stops: StopMatcher::new(req.stop.clone()),
            req,
        }
    }

    /// Report the end (with any text released at the end).
    fn done(&mut self, text: String, finish: FinishReason) {
        let usage = self.usage();
        (self.req.sink)(Event::Done {
            text,
            finish,
            usage,
        });
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated,
            cached_tokens: self.cached_prompt,
        }
    }
}

struct Loop {
    model: Box<dyn CausalLm>,
    tokenizer: Arc<Tokenizer>,
    cache: KvCache,
    config: SchedulerConfig,
    rx: Receiver<Command>,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    stats: Arc<Mutex<SchedulerStats>>,
    counters: SchedulerStats,
    draining: bool,
}

impl Loop {
    fn run(&mut self) {
        loop {
            let idle = self.running.is_empty() && self.waiting.is_empty();
            if idle && self.draining {
                break;
            }
            // Wait for work when idle; otherwise only look at what has arrived.
            let first = if idle {
                match self.rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            } else {
                None
            };
            if !self.intake(first) {
                break;
            }
            self.admit();
            self.publish();
            if !self.running.is_empty() {
                self.step();
            }
            self.publish();
        }
        for s in self.running.drain(..).chain(self.waiting.drain(..)) {
            let mut s = s;
            (s.req.sink)(Event::Failed("the server is shutting down".into()));
        }
        self.publish();
    }

    /// Take queued commands; returns false when the engine must stop now.
    fn intake(&mut self, first: Option<Command>) -> bool {
        let mut next = first;
        loop {
            let cmd = match next.take() {
                Some(c) => c,
                None => match self.rx.try_recv() {
                    Ok(c) => c,
                    Err(_) => return true,
                },
            };
            match cmd {
                Command::Submit(id, req) => {
                    let mut seq = Sequence::new(id, *req);
                    if self.draining {
                        (seq.req.sink)(Event::Failed("the server is shutting down".into()));
                    } else {
                        self.waiting.push_back(seq);
                    }
                }
                Command::Cancel(id) => self.drop_seq(id),
                Command::Shutdown { drain } => {
                    if !drain {
                        return false;
                    }
                    self.draining = true;
                }
            }
        }
    }

    fn drop_seq(&mut self, id: SeqId) {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i);
            self.cache.remove(id);
        }
        self.waiting.retain(|s| s.id != id);
    }

    /// Move waiting sequences into the batch while places and blocks allow (first come, first
    /// served: a large request at the head is not overtaken).
    fn admit(&mut self) {
        while self.running.len() < self.config.max_running {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let reused = match self.cache.attach_prefix(seq.id, &seq.tokens) {
                Ok(n) => n,
                Err(e) => {
                    (seq.req.sink)(Event::Failed(e.to_string()));
                    continue;
                }
            };
            // Room for the rest of its tokens and the next one, beyond what running sequences
            // will need for their next token.
            let need =
                self.cache.blocks_for(seq.tokens.len() + 1) - reused / self.cache.block_size();
            let reserve_for_running = self.running.len();
            if need + reserve_for_running > self.cache.blocks_available()
                && !self.running.is_empty()
            {
                self.cache.discard(seq.id);
                self.waiting.push_front(seq);
                break;
            }
            seq.cached = reused;
            if !seq.admitted {
                seq.admitted = true;
                seq.cached_prompt = reused;
                self.counters.prompt_tokens += seq.prompt_len as u64;
                self.counters.prefix_hit_tokens += reused as u64;
            }
            self.running.push(seq);
        }
    }

    /// One forward pass over the running batch, then sampling and events.
    fn step(&mut self) {
        let mut batch = Batch::new();
        // Running sequences that sample this step, in the order of their logits rows: each
        // sequence's tokens are pushed together and only a chunk that ends its tokens asks for
        // logits (one row, its last).
        let mut samplers: Vec<usize> = Vec::new();
        // (index into running, tokens fed this step).
        let mut fed: Vec<(usize, usize)> = Vec::new();
        let mut budget = self.config.step_tokens;
        // Decoding sequences first (one token each), then prompt chunks in arrival order.
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| (self.running[i].tokens.len() - self.running[i].cached > 1, i));
        for i in order {
            if budget == 0 {
                break;
            }
            let s = &self.running[i];
            let n = (s.tokens.len() - s.cached).min(budget);
            fed.push((i, n));
            let last = s.cached + n == s.tokens.len();
            for pos in s.cached..s.cached + n {
                let want_logits = last && pos + 1 == s.cached + n;
                batch.push_row(
                    s.id,
                    s.tokens[pos],
                    pos,
                    want_logits,
                    s.cached_prompt..s.prompt_len,
                );
            }
            if last {
                samplers.push(i);
            }
            budget -= n;
        }

        // Grammar masks depend only on tokens already committed: compute them on another
        // thread while the forward pass runs.
        let (model, cache, running) = (&self.model, &mut self.cache, &mut self.running);
        let constrained = samplers
            .iter()
            .any(|&i| running[i].req.constraint.is_some());
        let (result, mut masks) = std::thread::scope(|sc| {
            let masker = constrained.then(|| {
                sc.spawn(|| {
                    // One mask per logits row, in the order of `samplers`.
                    let mut slots: Vec<Option<&mut Sequence>> =
                        (0..samplers.len()).map(|_| None).collect();
                    for (i, s) in running.iter_mut().enumerate() {
                        if let Some(row) = samplers.iter().position(|&x| x == i) {
                            slots[row] = Some(s);
                        }
                    }
                    slots
                        .into_iter()
                        .map(|s| s?.req.constraint.as_mut().map(Constraint::next_mask))
                        .collect::<Vec<Option<Result<Mask, String>>>>()
                })
            });
            let result = catch_unwind(AssertUnwindSafe(|| model.forward(&batch, cache, None)));
            let masks = masker.map(|h| h.join().unwrap_or_default());
            (result, masks.unwrap_or_default())
        });
        let logits = match result {
            Ok(Ok(l)) => l,
            Ok(Err(herd_models::Error::CacheFull { .. })) => {
                self.preempt();
                return;
            }
            Ok(Err(e)) => return self.fail_batch(&batch, &e.to_string()),
            Err(_) => return self.fail_batch(&batch, "internal error in the forward pass"),
        };
        self.counters.steps += 1;
        // Everything fed is cached now.
        for (i, n) in fed {
            self.running[i].cached += n;
        }
        let vocab = self.model.vocab_size();
        let mut finished: Vec<usize> = Vec::new();
        for (row, i) in samplers.into_iter().enumerate() {
            let s = &mut self.running[i];
            let mut l = logits[row * vocab..(row + 1) * vocab].to_vec();
            match masks.get_mut(row).and_then(Option::take) {
                Some(Ok(mask)) => {
                    mask.apply(&mut l);
                    self.counters.masks += 1;
                    self.counters.mask_seconds += mask.elapsed.as_secs_f64();
                }
                Some(Err(e)) => {
                    (s.req.sink)(Event::Failed(format!("grammar: {e}")));
                    finished.push(i);
                    continue;
                }
                None => {}
            }
            let sampled = s.sampler.sample(&mut l);
            let token = sampled.token;
            if let Some(c) = &mut s.req.constraint
                && let Err(e) = c.commit(token)
            {
                (s.req.sink)(Event::Failed(format!("grammar: {e}")));
                finished.push(i);
                continue;
            }
            s.generated += 1;
            self.counters.generated_tokens += 1;
            let at_limit =
                s.generated >= s.req.max_tokens || s.tokens.len() + 1 >= self.config.context;
            if !s.req.ignore_eos && self.tokenizer.stop_ids.contains(&token) {
                let tail = s.decoder.finish(&self.tokenizer).unwrap_or_default();
                let text = match s.stops.push(&tail) {
                    StopResult::Continue(out) | StopResult::Stop(out) => out,
                };
                s.done(text, FinishReason::Stop);
                finished.push(i);
                continue;
            }
            s.tokens.push(token);
            let delta = match s.decoder.push(&self.tokenizer, token) {
                Ok(d) => d,
                Err(e) => {
                    (s.req.sink)(Event::Failed(e.to_string()));
                    finished.push(i);
                    continue;
                }
            };
            let (text, stopped) = match s.stops.push(&delta) {
                StopResult::Continue(out) => (out, false),
                StopResult::Stop(out) => (out, true),
            };
            let alive = (s.req.sink)(Event::Token { sampled, text });
            if !alive {
                finished.push(i);
            } else if stopped {
                s.done(String::new(), FinishReason::Stop);
                finished.push(i);
            } else if at_limit {
                let rest = s.decoder.finish(&self.tokenizer).unwrap_or_default();
                let text = match s.stops.push(&rest) {
                    StopResult::Continue(out) => out + &s.stops.finish(),
                    StopResult::Stop(out) => out,
                };
                s.done(text, FinishReason::Length);
                finished.push(i);
            }
        }
        finished.sort_unstable();
        for i in finished.into_iter().rev() {
            let s = self.running.remove(i);
            self.cache.remove(s.id);
        }
    }

    /// The pool is exhausted: send the youngest running sequence back to the queue's head.
    fn preempt(&mut self) {
        let Some(mut s) = self.running.pop() else {
            return;
        };
        self.counters.preemptions += 1;
        if self.running.is_empty() {
            // Alone and still too big: it cannot ever fit.
            self.cache.discard(s.id);
            (s.req.sink)(Event::Failed(
                "the KV cache cannot hold this request".into(),
            ));
            return;
        }
        self.cache.remove(s.id);
        s.cached = 0;
        self.waiting.push_front(s);
    }

    fn fail_batch(&mut self, batch: &Batch, why: &str) {
        tracing::error!(why, "forward pass failed; failing its requests");
        let mut i = 0;
        while i < self.running.len() {
            if batch.seq_ids.contains(&self.running[i].id) {
                let mut s = self.running.remove(i);
                self.cache.discard(s.id);
                (s.req.sink)(Event::Failed(why.to_string()));
            } else {
                i += 1;
            }
        }
    }

    fn publish(&self) {
        let mut st = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        *st = SchedulerStats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            kv_blocks_total: self.cache.num_blocks(),
            kv_blocks_used: self.cache.blocks_used(),
            kv_blocks_cached: self.cache.blocks_cached(),
            ..self.counters
        };
    }
}
