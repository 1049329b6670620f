//! Continuous batching, split the way vLLM v1 splits its engine core: a scheduler that plans
//! each step and owns the KV blocks, a model runner that only computes, and output processing
//! on a thread of its own.
//!
//! The engine thread owns the model and a paged KV cache. Before every step the scheduler
//! decides which sequences run and how many tokens each feeds (first one token for every
//! sequence that is decoding, then chunks of waiting prompts within a token budget, so a long
//! prompt is prefilled over several steps while other streams keep producing tokens), and
//! allocates the KV blocks of those positions ([`KvCache::reserve`]). When the pool cannot hold
//! the plan, it preempts the youngest sequence (its blocks go back to the pool, indexed, so
//! they are usually found again; it is re-queued to be recomputed from its tokens, keeping its
//! sampler state) and plans again, so the model is only ever called with a plan whose blocks
//! are allocated. The model then writes the logits of the rows that sample into one persistent
//! buffer, and each sequence's sampler works in place on its row.
//!
//! A new sequence first attaches the cached blocks of the longest prompt prefix seen before
//! (system prompts, few-shot examples) and computes only the rest.
//!
//! Sampled tokens go to the output thread, which detokenizes, matches stop strings and delivers
//! events while the engine computes the next step (vLLM's asynchronous output processing). A
//! stop string or a client that went away is noticed there, and the sequence is cancelled on
//! the engine thread one step later; tokens it computed meanwhile are never reported. Grammar
//! masks are computed on a persistent worker thread while the forward pass runs.
//!
//! The kernels reduce every row in the same order whatever the batch, and keys and values do not
//! depend on how a prompt was chunked or shared, so a request's greedy output is the same
//! whether it runs alone or beside thirty others.

use std::collections::{HashMap, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use herd_kernels::DType;
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
    /// Element type of the cached keys and values (f32, f16, bf16 or q8_0).
    pub kv_type: DType,
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
            kv_type: herd_models::kv_cache::DEFAULT_KV_TYPE,
            kv_blocks: 2048,
            max_running: 64,
            step_tokens: 512,
            max_waiting: 256,
            context: 8192,
        }
    }
}

/// What the scheduler reports about one request, in order: tokens, then exactly one `Done`,
/// `GrammarFailed` or `Failed`.
#[derive(Clone, Debug)]
pub enum Event {
    /// A sampled token and the text it completes (possibly empty while a multi-byte character
    /// or a possible stop string is held back).
    Token { sampled: Sampled, text: String },
    /// Text released when generation ends (held-back bytes), then the end.
    Done {
        text: String,
        finish: FinishReason,
        usage: Usage,
        /// The stop string that ended generation (`finish` is then `Stop`); `None` for an
        /// end-of-generation token or the token limit.
        stop: Option<String>,
    },
    /// The request's grammar could not go on (a step beyond llguidance's parser limits, such as
    /// a parser row of more than 2,000 items): a fault of the request, not of the server.
    GrammarFailed(String),
    /// The request could not go on for another reason (the engine stopped, an internal error).
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
    /// The prefix-cache partition: a sequence reuses cached blocks only of sequences with the
    /// same salt (0: the shared partition). A server gives each tenant its own, so that one
    /// cannot learn another's prompts from what was cached.
    pub cache_salt: u64,
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
    #[error("{waiting} requests are already waiting to start (the limit is {limit}); retry later")]
    QueueFull { waiting: usize, limit: usize },
    #[error("{requests} sequences at once can never be queued: at most {limit} may wait to start")]
    OverQueueLimit { requests: usize, limit: usize },
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
    /// Time in forward passes, and in sampling on the engine thread (seconds).
    pub forward_seconds: f64,
    pub sample_seconds: f64,
}

enum Command {
    Submit(SeqId, Box<Job>),
    Cancel(SeqId),
    Shutdown { drain: bool },
}

/// What the engine needs of a request (the sink and stop strings go to the output thread).
struct Job {
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
    ignore_eos: bool,
    constraint: Option<Constraint>,
    cache_salt: u64,
    /// Held from `submit` until the request first runs (or ends without running).
    queue_slot: Option<QueueSlot>,
}

/// One of the `max_waiting` places of requests submitted and not yet running: taken in
/// [`Scheduler::submit`], given back (dropped) when the request is first admitted to the batch,
/// or when it ends before that (cancelled, failed, engine stopped).
#[derive(Debug)]
struct QueueSlot(Arc<AtomicUsize>);

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Handle to the engine thread and its output thread.
#[derive(Debug)]
pub struct Scheduler {
    tx: Sender<Command>,
    out: Sender<Output>,
    stats: Arc<Mutex<SchedulerStats>>,
    next_id: Mutex<SeqId>,
    config: SchedulerConfig,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Requests submitted and not yet running ([`QueueSlot`]s held).
    queued: Arc<AtomicUsize>,
}

impl Scheduler {
    pub fn start(
        model: Box<dyn CausalLm>,
        tokenizer: Arc<Tokenizer>,
        mut config: SchedulerConfig,
    ) -> crate::Result<Self> {
        config.context = config.context.min(model.max_context()).max(1);
        config.step_tokens = config.step_tokens.max(1);
        config.max_running = config.max_running.max(1);
        let (tx, rx) = channel();
        let (out, out_rx) = channel();
        let stats = Arc::new(Mutex::new(SchedulerStats {
            kv_blocks_total: config.kv_blocks,
            ..Default::default()
        }));
        let cache = model.new_paged_cache(config.kv_type, config.block_size, config.kv_blocks)?;
        let mut lp = Loop {
            model,
            stop_ids: tokenizer.stop_ids.clone(),
            cache,
            config: config.clone(),
            rx,
            out: out.clone(),
            masker: MaskWorker::start(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            plan: StepPlan::default(),
            logits: Vec::new(),
            stats: stats.clone(),
            counters: SchedulerStats::default(),
            draining: false,
        };
        let engine = std::thread::Builder::new()
            .name("herd-engine".into())
            // It commits sampled tokens to grammars (llguidance recurses over them).
            .stack_size(crate::constraint::GRAMMAR_STACK_BYTES)
            .spawn(move || {
                if catch_unwind(AssertUnwindSafe(|| lp.run())).is_err() {
                    // A bug stopped the engine: no request may wait for it forever.
                    tracing::error!("the engine thread panicked; failing its requests");
                    lp.fail_all("internal error in the engine");
                }
            })
            .expect("spawn the engine thread");
        let cancel = tx.clone();
        let output = std::thread::Builder::new()
            .name("herd-output".into())
            .spawn(move || process_outputs(&tokenizer, &out_rx, &cancel))
            .expect("spawn the output thread");
        Ok(Self {
            tx,
            out,
            stats,
            next_id: Mutex::new(1),
            config,
            threads: Mutex::new(vec![engine, output]),
            queued: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Queue a request; its events go to its sink. Returns its id (for `cancel`).
    pub fn submit(&self, req: GenerationRequest) -> Result<SeqId, SubmitError> {
        self.check(&req)?;
        let slot = self.take_queue_slots(1)?.pop().expect("one slot");
        self.submit_in(req, slot)
    }

    /// Queue several requests (the `n` choices of one API request) all or none: their places
    /// in the queue are taken together, so two such groups cannot each get part of the queue
    /// and refuse each other. Returns their ids in order.
    pub fn submit_all(&self, reqs: Vec<GenerationRequest>) -> Result<Vec<SeqId>, SubmitError> {
        for r in &reqs {
            self.check(r)?;
        }
        let slots = self.take_queue_slots(reqs.len())?;
        let mut ids = Vec::with_capacity(reqs.len());
        for (req, slot) in reqs.into_iter().zip(slots) {
            match self.submit_in(req, slot) {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for &id in &ids {
                        self.cancel(id);
                    }
                    return Err(e);
                }
            }
        }
        Ok(ids)
    }

    /// What makes a request impossible whatever the load: empty, over the context, over the
    /// whole cache.
    fn check(&self, req: &GenerationRequest) -> Result<(), SubmitError> {
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
        Ok(())
    }

    /// Queue a checked request holding its place in the queue.
    fn submit_in(
        &self,
        req: GenerationRequest,
        queue_slot: QueueSlot,
    ) -> Result<SeqId, SubmitError> {
        let id = {
            let mut n = self.next_id.lock().unwrap_or_else(|e| e.into_inner());
            *n += 1;
            *n
        };
        let GenerationRequest {
            prompt,
            max_tokens,
            stop,
            sampling,
            ignore_eos,
            constraint,
            cache_salt,
            sink,
        } = req;
        // The output thread learns of the request before the engine can produce its first token.
        self.out
            .send(Output::Start { id, sink, stop })
            .map_err(|_| SubmitError::Stopped)?;
        let job = Job {
            prompt,
            max_tokens,
            sampling,
            ignore_eos,
            constraint,
            cache_salt,
            queue_slot: Some(queue_slot),
        };
        if self.tx.send(Command::Submit(id, Box::new(job))).is_err() {
            let _ = self.out.send(Output::Forget { id });
            return Err(SubmitError::Stopped);
        }
        Ok(id)
    }

    /// `n` places among the requests waiting to start, all or none, or
    /// [`SubmitError::QueueFull`] ([`SubmitError::OverQueueLimit`] if `n` exceeds the limit
    /// itself): an atomic count, exact however many threads submit at once (the engine's
    /// published `waiting` lags by up to a step).
    fn take_queue_slots(&self, n: usize) -> Result<Vec<QueueSlot>, SubmitError> {
        let limit = self.config.max_waiting;
        // (With a limit of 0 nothing is ever queued: that is a full queue, not a bad request.)
        if n > limit && limit > 0 {
            return Err(SubmitError::OverQueueLimit { requests: n, limit });
        }
        self.queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w + n <= limit).then_some(w + n)
            })
            .map(|_| (0..n).map(|_| QueueSlot(self.queued.clone())).collect())
            .map_err(|waiting| SubmitError::QueueFull { waiting, limit })
    }

    /// Stop a request now: it frees its blocks and reports nothing more.
    pub fn cancel(&self, id: SeqId) {
        let _ = self.tx.send(Command::Cancel(id));
    }

    pub fn stats(&self) -> SchedulerStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stop the engine: with `drain`, requests already admitted or waiting finish first;
    /// without, they end with a `Failed` event. Blocks until the engine and output threads
    /// exit (every event of the engine delivered).
    pub fn shutdown(&self, drain: bool) {
        let _ = self.tx.send(Command::Shutdown { drain });
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        let mut handles = threads.drain(..);
        if let Some(engine) = handles.next() {
            let _ = engine.join();
            // The engine has sent its last output: let the output thread finish the queue.
            let _ = self.out.send(Output::Close);
        }
        for t in handles {
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
    job: Job,
    tokens: Vec<u32>,
    cached: usize,
    prompt_len: usize,
    cached_prompt: usize,
    /// Admitted before (and preempted since): prompt statistics are counted once.
    admitted: bool,
    generated: usize,
    sampler: Sampler,
}

impl Sequence {
    fn new(id: SeqId, job: Job) -> Self {
        Self {
            id,
            tokens: job.prompt.clone(),
            cached: 0,
            prompt_len: job.prompt.len(),
            cached_prompt: 0,
            admitted: false,
            generated: 0,
            sampler: Sampler::new(job.sampling.clone(), &job.prompt),
            job,
        }
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.generated,
            cached_tokens: self.cached_prompt,
        }
    }
}

/// One step's work, decided before the model runs: the flattened batch, what each sequence
/// feeds, and which sequences sample from which logits row. Its KV blocks are allocated before
/// the model sees it. Kept between steps (cleared, not reallocated).
#[derive(Default)]
struct StepPlan {
    batch: Batch,
    /// (index into `running`, tokens fed this step).
    fed: Vec<(usize, usize)>,
    /// Running sequences that sample this step, in the order of their logits rows.
    samplers: Vec<usize>,
}

impl StepPlan {
    fn clear(&mut self) {
        self.batch.clear();
        self.fed.clear();
        self.samplers.clear();
    }
}

struct Loop {
    model: Box<dyn CausalLm>,
    stop_ids: Vec<u32>,
    cache: KvCache,
    config: SchedulerConfig,
    rx: Receiver<Command>,
    out: Sender<Output>,
    masker: MaskWorker,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    plan: StepPlan,
    /// `[plan.samplers.len(), vocab]`, written by the model, sampled in place.
    logits: Vec<f32>,
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
            if !self.running.is_empty() && self.schedule() {
                self.execute();
            }
            self.publish();
        }
        self.fail_all("the server is shutting down");
    }

    /// End every request the engine holds with `why`.
    fn fail_all(&mut self, why: &str) {
        for s in self.running.drain(..).chain(self.waiting.drain(..)) {
            let _ = self.out.send(Output::Failed {
                id: s.id,
                why: why.into(),
                grammar: false,
            });
        }
        self.publish();
    }

    fn fail(&self, id: SeqId, why: impl Into<String>) {
        let _ = self.out.send(Output::Failed {
            id,
            why: why.into(),
            grammar: false,
        });
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
                Command::Submit(id, job) => {
                    if self.draining {
                        self.fail(id, "the server is shutting down");
                    } else {
                        self.waiting.push_back(Sequence::new(id, *job));
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

    /// Forget a sequence (cancelled, or ended by its output): free its blocks, report nothing.
    fn drop_seq(&mut self, id: SeqId) {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            self.running.remove(i);
            self.cache.remove(id);
        }
        self.waiting.retain(|s| s.id != id);
        let _ = self.out.send(Output::Forget { id });
    }

    /// Move waiting sequences into the batch while places and blocks allow (first come, first
    /// served: a large request at the head is not overtaken).
    fn admit(&mut self) {
        while self.running.len() < self.config.max_running {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            let reused =
                match self
                    .cache
                    .attach_prefix_salted(seq.id, &seq.tokens, seq.job.cache_salt)
                {
                    Ok(n) => n,
                    Err(e) => {
                        self.fail(seq.id, e.to_string());
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
                seq.job.queue_slot = None;
                seq.cached_prompt = reused;
                self.counters.prompt_tokens += seq.prompt_len as u64;
                self.counters.prefix_hit_tokens += reused as u64;
            }
            self.running.push(seq);
        }
    }

    /// Plan the step and allocate its KV blocks, preempting the youngest sequences until the
    /// pool holds the plan. Returns false when nothing is left to run.
    fn schedule(&mut self) -> bool {
        loop {
            self.plan_step();
            match self.cache.reserve(&self.plan.batch) {
                Ok(()) => return true,
                Err(herd_models::Error::CacheFull { .. }) => {
                    if !self.preempt() {
                        return false;
                    }
                }
                Err(e) => {
                    self.fail_planned(&e.to_string());
                    return false;
                }
            }
        }
    }

    /// Fill `plan` from the running sequences within the step's token budget.
    fn plan_step(&mut self) {
        let plan = &mut self.plan;
        plan.clear();
        let mut budget = self.config.step_tokens;
        // Decoding sequences first (one token each), then prompt chunks in arrival order.
        let decoding = |s: &Sequence| s.tokens.len() - s.cached == 1;
        let order = (0..self.running.len())
            .filter(|&i| decoding(&self.running[i]))
            .chain((0..self.running.len()).filter(|&i| !decoding(&self.running[i])));
        for i in order {
            if budget == 0 {
                break;
            }
            let s = &self.running[i];
            let n = (s.tokens.len() - s.cached).min(budget);
            plan.fed.push((i, n));
            // Only a chunk that ends the sequence's tokens samples (one logits row, its last).
            let last = s.cached + n == s.tokens.len();
            for pos in s.cached..s.cached + n {
                let want_logits = last && pos + 1 == s.cached + n;
                plan.batch.push(s.id, s.tokens[pos], pos, want_logits);
            }
            if last {
                plan.samplers.push(i);
            }
            budget -= n;
        }
    }

    /// Run the planned step (its blocks are allocated), then sample in place and hand the
    /// tokens to the output thread.
    fn execute(&mut self) {
        // Grammar masks depend only on tokens already committed: the mask worker computes them
        // while the forward pass runs.
        let pending = self.masker.begin(&self.plan.samplers, &mut self.running);
        let (model, cache, plan, logits) =
            (&self.model, &mut self.cache, &self.plan, &mut self.logits);
        let started = Instant::now();
        let result = catch_unwind(AssertUnwindSafe(|| {
            model.forward_into(&plan.batch, cache, None, logits)
        }));
        self.counters.forward_seconds += started.elapsed().as_secs_f64();
        // Sampling and output processing use no pool: its workers leave their cores to the
        // output and HTTP threads until the next step.
        herd_kernels::pool::global().rest();
        let mut masks = self.masker.finish(&pending, &mut self.running);
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return self.fail_planned(&e.to_string()),
            Err(_) => return self.fail_planned("internal error in the forward pass"),
        }
        self.counters.steps += 1;
        // Everything fed is cached now.
        for &(i, n) in &self.plan.fed {
            self.running[i].cached += n;
        }
        let vocab = self.model.vocab_size();
        let started = Instant::now();
        let mut finished: Vec<usize> = Vec::new();
        for (row, &i) in self.plan.samplers.iter().enumerate() {
            let s = &mut self.running[i];
            let l = &mut self.logits[row * vocab..(row + 1) * vocab];
            match masks.get_mut(row).and_then(Option::take) {
                Some(Ok(mask)) => {
                    mask.apply(l);
                    self.counters.masks += 1;
                    self.counters.mask_seconds += mask.elapsed.as_secs_f64();
                }
                Some(Err(e)) => {
                    let (why, grammar) = match e {
                        MaskError::Grammar(e) => {
                            (format!("the output constraint cannot go on: {e}"), true)
                        }
                        MaskError::Internal(e) => (e.to_string(), false),
                    };
                    let _ = self.out.send(Output::Failed {
                        id: s.id,
                        why,
                        grammar,
                    });
                    finished.push(i);
                    continue;
                }
                None => {}
            }
            let Ok(sampled) = catch_unwind(AssertUnwindSafe(|| s.sampler.sample(l))) else {
                let _ = self.out.send(Output::Failed {
                    id: s.id,
                    why: "internal error in the sampler".into(),
                    grammar: false,
                });
                finished.push(i);
                continue;
            };
            let token = sampled.token;
            if let Some(c) = &mut s.job.constraint
                && let Err(e) = c.commit(token)
            {
                let _ = self.out.send(Output::Failed {
                    id: s.id,
                    why: format!("the output constraint cannot go on: {e}"),
                    grammar: true,
                });
                finished.push(i);
                continue;
            }
            s.generated += 1;
            self.counters.generated_tokens += 1;
            let id = s.id;
            if !s.job.ignore_eos && self.stop_ids.contains(&token) {
                let usage = s.usage();
                let _ = self.out.send(Output::Finish {
                    id,
                    reason: Finish::EndToken,
                    usage,
                });
                finished.push(i);
                continue;
            }
            let at_limit =
                s.generated >= s.job.max_tokens || s.tokens.len() + 1 >= self.config.context;
            s.tokens.push(token);
            let usage = s.usage();
            let _ = self.out.send(Output::Token { id, sampled, usage });
            if at_limit {
                let _ = self.out.send(Output::Finish {
                    id,
                    reason: Finish::Length,
                    usage,
                });
                finished.push(i);
            }
        }
        self.counters.sample_seconds += started.elapsed().as_secs_f64();
        finished.sort_unstable();
        for i in finished.into_iter().rev() {
            let s = self.running.remove(i);
            self.cache.remove(s.id);
        }
    }

    /// The pool cannot hold the plan: send the youngest running sequence back to the queue's
    /// head. Returns false when that sequence was alone (it can never fit, and fails).
    fn preempt(&mut self) -> bool {
        let Some(mut s) = self.running.pop() else {
            return false;
        };
        self.counters.preemptions += 1;
        if self.running.is_empty() {
            self.cache.discard(s.id);
            self.fail(s.id, "the KV cache cannot hold this request");
            return false;
        }
        self.cache.remove(s.id);
        s.cached = 0;
        self.waiting.push_front(s);
        true
    }

    /// The planned step failed: its sequences fail (their cached keys cannot be trusted).
    fn fail_planned(&mut self, why: &str) {
        tracing::error!(why, "forward pass failed; failing its requests");
        let ids = &self.plan.batch.seq_ids;
        let mut i = 0;
        while i < self.running.len() {
            if ids.contains(&self.running[i].id) {
                let s = self.running.remove(i);
                self.cache.discard(s.id);
                self.fail(s.id, why);
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

/// Computes grammar masks on a thread of its own while the forward pass runs. A step's
/// constraints travel to it and back (they depend only on committed tokens).
struct MaskWorker {
    tx: Sender<Vec<MaskJob>>,
    rx: Receiver<Vec<MaskJob>>,
}

/// One sequence's constraint on its way to the worker, and its mask on the way back.
struct MaskJob {
    /// Logits row and index into `running`.
    row: usize,
    seq: usize,
    constraint: Constraint,
    mask: Option<Result<Mask, MaskError>>,
}

impl MaskWorker {
    fn start() -> Self {
        let (tx, jobs) = channel::<Vec<MaskJob>>();
        let (done, rx) = channel();
        std::thread::Builder::new()
            .name("herd-masks".into())
            .stack_size(crate::constraint::GRAMMAR_STACK_BYTES)
            .spawn(move || {
                for mut batch in jobs {
                    for j in &mut batch {
                        let c = &mut j.constraint;
                        j.mask = Some(match catch_unwind(AssertUnwindSafe(|| c.next_mask())) {
                            Ok(mask) => mask.map_err(MaskError::Grammar),
                            Err(_) => Err(MaskError::Internal("the grammar engine panicked")),
                        });
                    }
                    if done.send(batch).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the grammar mask thread");
        Self { tx, rx }
    }

    /// Hand the constraints of the sequences that sample this step to the worker; returns
    /// their logits rows (empty: nothing to wait for).
    fn begin(&self, samplers: &[usize], running: &mut [Sequence]) -> Vec<usize> {
        let jobs: Vec<MaskJob> = samplers
            .iter()
            .enumerate()
            .filter_map(|(row, &seq)| {
                let constraint = running[seq].job.constraint.take()?;
                Some(MaskJob {
                    row,
                    seq,
                    constraint,
                    mask: None,
                })
            })
            .collect();
        let rows = jobs.iter().map(|j| j.row).collect();
        // Only a non-empty batch goes: `finish` waits for a reply exactly when rows exist.
        if jobs.is_empty() {
            return rows;
        }
        if let Err(back) = self.tx.send(jobs) {
            // The worker is gone: the constraints stay with their sequences, and `finish`
            // fails those rows.
            for j in back.0 {
                running[j.seq].job.constraint = Some(j.constraint);
            }
        }
        rows
    }

    /// The masks, one slot per logits row; the constraints go back to their sequences. If the
    /// worker is gone, every pending row gets an error (its sequence fails: it must never be
    /// sampled without its grammar).
    fn finish(
        &self,
        rows: &[usize],
        running: &mut [Sequence],
    ) -> Vec<Option<Result<Mask, MaskError>>> {
        let Some(&last) = rows.iter().max() else {
            return Vec::new();
        };
        let mut masks: Vec<Option<Result<Mask, MaskError>>> = (0..=last).map(|_| None).collect();
        match self.rx.recv() {
            Ok(jobs) => {
                for j in jobs {
                    running[j.seq].job.constraint = Some(j.constraint);
                    masks[j.row] = j.mask;
                }
            }
            Err(_) => {
                for &r in rows {
                    masks[r] = Some(Err(MaskError::Internal("the grammar mask worker stopped")));
                }
            }
        }
        masks
    }
}

/// Why a sequence's next mask is missing: its grammar could not go on (the request's fault), or
/// the mask machinery failed (the server's).
#[derive(Debug)]
enum MaskError {
    Grammar(String),
    Internal(&'static str),
}

/// Why the engine ended a sequence.
#[derive(Clone, Copy, Debug)]
enum Finish {
    /// An end-of-generation token (not reported as text).
    EndToken,
    /// The token limit or the context.
    Length,
}

/// What the output thread is told, in order per sequence: `Start`, tokens, then one end.
enum Output {
    Start {
        id: SeqId,
        sink: Sink,
        stop: Vec<String>,
    },
    Token {
        id: SeqId,
        sampled: Sampled,
        usage: Usage,
    },
    Finish {
        id: SeqId,
        reason: Finish,
        usage: Usage,
    },
    Failed {
        id: SeqId,
        why: String,
        /// The request's grammar failed ([`Event::GrammarFailed`]).
        grammar: bool,
    },
    /// Cancelled: drop without a word.
    Forget { id: SeqId },
    /// The engine has stopped: deliver what is queued, then exit.
    Close,
}

/// A request's stream on the output thread.
struct Stream {
    sink: Sink,
    decoder: StreamDecoder,
    stops: StopMatcher,
    usage: Usage,
}

/// The output thread: detokenize, match stop strings and deliver events, off the engine
/// thread. A stream that ends here (stop string, client gone, detokenizer error) is cancelled
/// on the engine through `cancel`.
fn process_outputs(tokenizer: &Tokenizer, rx: &Receiver<Output>, cancel: &Sender<Command>) {
    let mut streams: HashMap<SeqId, Stream> = HashMap::new();
    let end = |streams: &mut HashMap<SeqId, Stream>, id: SeqId| {
        streams.remove(&id);
        let _ = cancel.send(Command::Cancel(id));
    };
    for msg in rx {
        match msg {
            Output::Start { id, sink, stop } => {
                streams.insert(
                    id,
                    Stream {
                        sink,
                        decoder: StreamDecoder::new(true),
                        stops: StopMatcher::new(stop),
                        usage: Usage::default(),
                    },
                );
            }
            Output::Token { id, sampled, usage } => {
                // Tokens of a stream that already ended here are dropped.
                let Some(s) = streams.get_mut(&id) else {
                    continue;
                };
                s.usage = usage;
                let delta = match s.decoder.push(tokenizer, sampled.token) {
                    Ok(d) => d,
                    Err(e) => {
                        (s.sink)(Event::Failed(e.to_string()));
                        end(&mut streams, id);
                        continue;
                    }
                };
                let (text, stopped) = match s.stops.push(&delta) {
                    StopResult::Continue(out) => (out, false),
                    StopResult::Stop(out) => (out, true),
                };
                let alive = (s.sink)(Event::Token { sampled, text });
                if alive && stopped {
                    (s.sink)(Event::Done {
                        text: String::new(),
                        finish: FinishReason::Stop,
                        usage,
                        stop: s.stops.matched().map(str::to_string),
                    });
                }
                if !alive || stopped {
                    end(&mut streams, id);
                }
            }
            Output::Finish { id, reason, usage } => {
                let Some(mut s) = streams.remove(&id) else {
                    continue;
                };
                let rest = s.decoder.finish(tokenizer).unwrap_or_default();
                // Text held back as a possible stop string is released when no stop string
                // ended the sequence (the token limit, or an end-of-generation token).
                let (text, finish) = match (s.stops.push(&rest), reason) {
                    (StopResult::Continue(out), Finish::Length) => {
                        (out + &s.stops.finish(), FinishReason::Length)
                    }
                    (StopResult::Continue(out), _) => (out + &s.stops.finish(), FinishReason::Stop),
                    (StopResult::Stop(out), _) => (out, FinishReason::Stop),
                };
                (s.sink)(Event::Done {
                    text,
                    finish,
                    usage,
                    stop: s.stops.matched().map(str::to_string),
                });
            }
            Output::Failed { id, why, grammar } => {
                if let Some(mut s) = streams.remove(&id) {
                    (s.sink)(if grammar {
                        Event::GrammarFailed(why)
                    } else {
                        Event::Failed(why)
                    });
                }
            }
            Output::Forget { id } => {
                streams.remove(&id);
            }
            Output::Close => break,
        }
    }
    for (_, mut s) in streams {
        (s.sink)(Event::Failed("the server is shutting down".into()));
    }
}
