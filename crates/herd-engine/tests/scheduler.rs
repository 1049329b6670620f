//! Continuous batching on the real default model (Gemma 3 270M Q4_K_M from
//! tests/fixtures/fetch.sh): concurrent, chunked, prefix-shared and preempted requests produce
//! exactly what each request produces alone with `generate`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};

use herd_engine::generate::{FinishReason, Request, generate};
use herd_engine::sampler::{Sampled, SamplingParams};
use herd_engine::scheduler::{
    Event, GenerationRequest, Scheduler, SchedulerConfig, SubmitError, Usage,
};
use herd_engine::{Loaded, Tokenizer};

fn model_path() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/downloaded/gemma-3-270m-q4_k_m.gguf");
    assert!(
        p.exists(),
        "{} is missing: run tests/fixtures/fetch.sh",
        p.display()
    );
    p
}

fn load() -> Loaded {
    herd_engine::load(model_path().to_str().unwrap()).unwrap()
}

const PROMPTS: [&str; 6] = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
    "The three primary colors are",
    "Water boils at a temperature of",
];

struct Outcome {
    tokens: Vec<u32>,
    text: String,
    finish: FinishReason,
    usage: Usage,
    /// The stop string that ended it.
    stop: Option<String>,
}

fn submit(
    s: &Scheduler,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
) -> Receiver<Event> {
    let (tx, rx) = channel();
    s.submit(GenerationRequest {
        cache_salt: 0,
        prompt,
        max_tokens,
        stop: Vec::new(),
        sampling,
        ignore_eos: false,
        constraint: None,
        sink: Box::new(move |e| tx.send(e).is_ok()),
    })
    .unwrap();
    rx
}

fn collect(rx: Receiver<Event>) -> Outcome {
    let (mut tokens, mut text) = (Vec::new(), String::new());
    for e in rx {
        match e {
            Event::Token { sampled, text: t } => {
                tokens.push(sampled.token);
                text.push_str(&t);
            }
            Event::Done {
                text: t,
                finish,
                usage,
                stop,
            } => {
                text.push_str(&t);
                return Outcome {
                    tokens,
                    text,
                    finish,
                    usage,
                    stop,
                };
            }
            Event::Failed(why) | Event::GrammarFailed(why) => panic!("request failed: {why}"),
        }
    }
    panic!("the event stream ended without Done")
}

fn alone(
    l: &Loaded,
    prompt: &[u32],
    max_tokens: usize,
    sampling: SamplingParams,
) -> (Vec<u32>, String) {
    let g = generate(
        l.model.as_ref(),
        &l.tokenizer,
        &Request {
            prompt: prompt.to_vec(),
            max_tokens,
            stop: Vec::new(),
            sampling,
        },
        |_| {},
    )
    .unwrap();
    (g.tokens.iter().map(|s| s.token).collect(), g.text)
}

fn encode(t: &Tokenizer, s: &str) -> Vec<u32> {
    t.encode(s, true).unwrap()
}

fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.95,
        seed,
        ..SamplingParams::default()
    }
}

#[test]
fn concurrent_requests_equal_the_same_requests_alone() {
    let reference = load();
    let Loaded {
        model, tokenizer, ..
    } = load();
    let tok = Arc::new(tokenizer);
    // Small steps and a small pool: prompts are prefilled in chunks beside decoding streams, and
    // the pool runs out so that sequences are preempted and recomputed.
    let config = SchedulerConfig {
        block_size: 4,
        kv_blocks: 14,
        step_tokens: 7,
        ..SchedulerConfig::default()
    };
    let s = Scheduler::start(model, tok.clone(), config).unwrap();
    let mut jobs = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        let ids = encode(&tok, p);
        let params = if i % 2 == 0 {
            SamplingParams::default()
        } else {
            sampled(i as u64)
        };
        let rx = submit(&s, ids.clone(), 12, params.clone());
        jobs.push((ids, params, rx));
    }
    for (ids, params, rx) in jobs {
        let got = collect(rx);
        let (want_tokens, want_text) = alone(&reference, &ids, 12, params);
        assert_eq!(got.tokens, want_tokens, "prompt {ids:?}");
        assert_eq!(got.text, want_text);
        assert_eq!(got.usage.prompt_tokens, ids.len());
        assert_eq!(got.usage.completion_tokens, got.tokens.len());
        if got.finish == FinishReason::Length {
            assert_eq!(got.tokens.len(), 12);
        }
        assert_eq!(got.stop, None, "no stop strings were given");
    }
    let st = s.stats();
    assert!(
        st.preemptions > 0,
        "the small pool should have forced preemption: {st:?}"
    );
    assert_eq!((st.running, st.waiting, st.kv_blocks_used), (0, 0, 0));
}

#[test]
fn a_shared_prompt_prefix_is_not_computed_twice() {
    let reference = load();
    let Loaded {
        model, tokenizer, ..
    } = load();
    let tok = Arc::new(tokenizer);
    let s = Scheduler::start(model, tok.clone(), SchedulerConfig::default()).unwrap();
    let system = "You are a careful assistant. Answer briefly and precisely. ".repeat(6);
    let first = encode(&tok, &format!("{system}Question: what is two plus two?"));
    let second = encode(&tok, &format!("{system}Question: name a colour."));
    let a = collect(submit(&s, first.clone(), 6, SamplingParams::default()));
    assert_eq!(a.usage.cached_tokens, 0);
    let b = collect(submit(&s, second.clone(), 6, SamplingParams::default()));
    let common = first
        .iter()
        .zip(&second)
        .take_while(|(x, y)| x == y)
        .count();
    let block = s.config().block_size;
    assert_eq!(b.usage.cached_tokens, common / block * block);
    assert!(b.usage.cached_tokens >= 64, "{:?}", b.usage);
    assert_eq!(
        b.tokens,
        alone(&reference, &second, 6, SamplingParams::default()).0
    );
    let st = s.stats();
    assert_eq!(st.prefix_hit_tokens as usize, b.usage.cached_tokens);
    assert_eq!(st.prompt_tokens as usize, first.len() + second.len());
}

#[test]
fn a_cancelled_or_abandoned_request_frees_its_blocks() {
    let Loaded {
        model, tokenizer, ..
    } = load();
    let tok = Arc::new(tokenizer);
    let s = Scheduler::start(model, tok.clone(), SchedulerConfig::default()).unwrap();
    let prompt = encode(&tok, PROMPTS[2]);
    // The receiver goes away after two tokens: the engine notices on its next event.
    let rx = submit(&s, prompt.clone(), 1000, SamplingParams::default());
    for _ in 0..2 {
        assert!(matches!(rx.recv().unwrap(), Event::Token { .. }));
    }
    drop(rx);
    // An explicit cancel.
    let (tx, rx2) = channel();
    let id = s
        .submit(GenerationRequest {
            cache_salt: 0,
            prompt,
            max_tokens: 1000,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
            ignore_eos: false,
            constraint: None,
            sink: Box::new(move |e| tx.send(e).is_ok()),
        })
        .unwrap();
    assert!(matches!(rx2.recv().unwrap(), Event::Token { .. }));
    s.cancel(id);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let st = s.stats();
        if st.running == 0 && st.kv_blocks_used == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "blocks still held: {st:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(s.stats().generated_tokens < 100);
}

#[test]
fn requests_that_cannot_run_are_refused_up_front() {
    let Loaded {
        model, tokenizer, ..
    } = load();
    let tok = Arc::new(tokenizer);
    let config = SchedulerConfig {
        context: 32,
        kv_blocks: 4,
        block_size: 4,
        ..SchedulerConfig::default()
    };
    let s = Scheduler::start(model, tok, config).unwrap();
    let req = |n: usize| GenerationRequest {
        cache_salt: 0,
        prompt: vec![2; n],
        max_tokens: 4,
        stop: Vec::new(),
        sampling: SamplingParams::default(),
        ignore_eos: false,
        constraint: None,
        sink: Box::new(|_| true),
    };
    assert_eq!(s.submit(req(0)).unwrap_err(), SubmitError::EmptyPrompt);
    assert_eq!(
        s.submit(req(32)).unwrap_err(),
        SubmitError::PromptTooLong {
            prompt: 32,
            context: 32
        }
    );
    assert_eq!(
        s.submit(req(20)).unwrap_err(),
        SubmitError::TooLargeForCache {
            needed: 6,
            total: 4
        }
    );
    s.shutdown(true);
    assert_eq!(s.submit(req(3)).unwrap_err(), SubmitError::Stopped);
}

#[test]
fn constrained_and_free_requests_share_a_batch() {
    use herd_engine::constraint::{ConstraintCompiler, Grammar};
    let reference = load();
    let Loaded {
        model, tokenizer, ..
    } = load();
    let compiler = ConstraintCompiler::new(&tokenizer).unwrap();
    let tok = Arc::new(tokenizer);
    // Small steps: prompts of different lengths are in prefill and decode at once, so the
    // order of sampled rows differs from the order of running sequences.
    let config = SchedulerConfig {
        step_tokens: 5,
        ..SchedulerConfig::default()
    };
    let s = Scheduler::start(model, tok.clone(), config).unwrap();
    let mut jobs = Vec::new();
    for (i, p) in PROMPTS.iter().enumerate() {
        let ids = encode(&tok, p);
        let constraint = (i % 2 == 1).then(|| {
            compiler
                .compile(&Grammar::Regex(format!("[0-9]{{{}}}-[a-z]{{2}}", i + 1)))
                .unwrap()
        });
        let (tx, rx) = channel();
        s.submit(GenerationRequest {
            cache_salt: 0,
            prompt: ids.clone(),
            max_tokens: 10,
            stop: Vec::new(),
            sampling: sampled(i as u64),
            ignore_eos: false,
            constraint,
            sink: Box::new(move |e| tx.send(e).is_ok()),
        })
        .unwrap();
        jobs.push((i, ids, rx));
    }
    for (i, ids, rx) in jobs {
        let got = collect(rx);
        if i % 2 == 1 {
            let (digits, letters) = got
                .text
                .split_once('-')
                .unwrap_or_else(|| panic!("the pattern's dash: {:?} {:?}", got.text, got.tokens));
            assert!(digits.len() == i + 1 && digits.bytes().all(|b| b.is_ascii_digit()));
            assert!(letters.len() == 2 && letters.bytes().all(|b| b.is_ascii_lowercase()));
            assert_eq!(got.finish, FinishReason::Stop);
        } else {
            assert_eq!(got.tokens, alone(&reference, &ids, 10, sampled(i as u64)).0);
        }
    }
    assert!(s.stats().masks > 0);
}

/// The model wrapped so that it checks, before computing, that every position of the step was
/// allocated by the scheduler (the model's own reservation is then a no-op).
struct AllocationChecked {
    inner: Box<dyn herd_models::CausalLm>,
    unallocated: Arc<std::sync::atomic::AtomicUsize>,
    steps: Arc<std::sync::atomic::AtomicUsize>,
}

impl herd_models::CausalLm for AllocationChecked {
    fn vocab_size(&self) -> usize {
        self.inner.vocab_size()
    }
    fn hidden_size(&self) -> usize {
        self.inner.hidden_size()
    }
    fn num_layers(&self) -> usize {
        self.inner.num_layers()
    }
    fn kv_dim(&self) -> usize {
        self.inner.kv_dim()
    }
    fn head_dim(&self) -> usize {
        self.inner.head_dim()
    }
    fn max_context(&self) -> usize {
        self.inner.max_context()
    }
    fn layer_windows(&self) -> Vec<herd_models::Window> {
        self.inner.layer_windows()
    }
    fn forward_into(
        &self,
        batch: &herd_models::Batch,
        cache: &mut herd_models::KvCache,
        trace: Option<&mut Vec<Vec<f32>>>,
        logits: &mut Vec<f32>,
    ) -> herd_models::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        self.steps.fetch_add(1, Relaxed);
        let missing = batch
            .seq_ids
            .iter()
            .zip(&batch.positions)
            .filter(|&(&seq, &pos)| cache.reserved_len(seq) <= pos)
            .count();
        self.unallocated.fetch_add(missing, Relaxed);
        self.inner.forward_into(batch, cache, trace, logits)
    }
}

#[test]
fn the_model_only_runs_steps_whose_blocks_are_allocated() {
    let reference = load();
    let Loaded {
        model, tokenizer, ..
    } = load();
    let tok = Arc::new(tokenizer);
    let unallocated = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let steps = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let checked = AllocationChecked {
        inner: model,
        unallocated: unallocated.clone(),
        steps: steps.clone(),
    };
    // A pool of eight blocks of four positions for six prompts of 6–12 tokens and 10 new
    // tokens each: the scheduler must preempt to make every step fit.
    let config = SchedulerConfig {
        block_size: 4,
        kv_blocks: 8,
        step_tokens: 16,
        ..SchedulerConfig::default()
    };
    let s = Scheduler::start(Box::new(checked), tok.clone(), config).unwrap();
    let jobs: Vec<_> = PROMPTS
        .iter()
        .map(|p| {
            let ids = encode(&tok, p);
            let rx = submit(&s, ids.clone(), 10, SamplingParams::default());
            (ids, rx)
        })
        .collect();
    for (ids, rx) in jobs {
        let got = collect(rx);
        assert_eq!(
            got.tokens,
            alone(&reference, &ids, 10, SamplingParams::default()).0
        );
    }
    let st = s.stats();
    assert!(
        st.preemptions > 0,
        "the pool should have forced preemption: {st:?}"
    );
    assert!(steps.load(std::sync::atomic::Ordering::Relaxed) > 0);
    assert_eq!(
        unallocated.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the model ran positions the scheduler had not allocated"
    );
    assert_eq!((st.running, st.kv_blocks_used), (0, 0));
}

/// A stop string is found on the output thread: the request ends there with the text before
/// it, and the engine frees the sequence's blocks.
#[test]
fn a_stop_string_ends_the_request_and_frees_its_blocks() {
    let reference = load();
    let Loaded {
        model, tokenizer, ..
    } = load();
    let tok = Arc::new(tokenizer);
    let s = Scheduler::start(model, tok.clone(), SchedulerConfig::default()).unwrap();
    let prompt = encode(&tok, PROMPTS[3]);
    let (_, full) = alone(&reference, &prompt, 12, SamplingParams::default());
    // Stop at the second character of the greedy continuation's text.
    let stop: String = full.chars().skip(1).take(2).collect();
    assert!(!stop.trim().is_empty(), "continuation {full:?}");
    let (tx, rx) = channel();
    s.submit(GenerationRequest {
        cache_salt: 0,
        prompt,
        max_tokens: 12,
        stop: vec![stop.clone()],
        sampling: SamplingParams::default(),
        ignore_eos: false,
        constraint: None,
        sink: Box::new(move |e| tx.send(e).is_ok()),
    })
    .unwrap();
    let got = collect(rx);
    assert_eq!(got.finish, FinishReason::Stop);
    assert_eq!(got.stop.as_deref(), Some(stop.as_str()));
    assert_eq!(got.text, full[..full.find(&stop).unwrap()]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.stats().kv_blocks_used != 0 || s.stats().running != 0 {
        assert!(std::time::Instant::now() < deadline, "{:?}", s.stats());
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Greedy tokens with their log-probabilities, and the usage, for `text` on `s`.
fn sampled_run(s: &Scheduler, tok: &Tokenizer, text: &str) -> (Vec<Sampled>, Usage) {
    let (tx, rx) = channel();
    s.submit(GenerationRequest {
        cache_salt: 0,
        prompt: encode(tok, text),
        max_tokens: 24,
        stop: Vec::new(),
        sampling: SamplingParams {
            logprobs: true,
            top_logprobs: 3,
            ..SamplingParams::default()
        },
        ignore_eos: true,
        constraint: None,
        sink: Box::new(move |e| tx.send(e).is_ok()),
    })
    .unwrap();
    let mut got = Vec::new();
    for e in rx {
        match e {
            Event::Token { sampled, .. } => got.push(sampled),
            Event::Done { usage, .. } => return (got, usage),
            Event::Failed(why) | Event::GrammarFailed(why) => panic!("{why}"),
        }
    }
    panic!("the event stream ended without Done")
}

/// A prompt computed cold, then served from the prefix cache in full and in part, gives the same
/// tokens and the same log-probabilities: every row is computed the same way wherever its
/// prompt span starts (the case from a user's report: 16 cached tokens used to change the
/// greedy continuation; this test fails on the code before RowOrder was removed).
#[test]
fn cached_prefixes_give_the_same_tokens_and_logprobs() {
    let Loaded {
        model, tokenizer, ..
    } = load();
    let tok = Arc::new(tokenizer);
    let config = SchedulerConfig {
        block_size: 4,
        ..SchedulerConfig::default()
    };
    let s = Scheduler::start(model, tok.clone(), config).unwrap();
    let base = "Zebra1: The history of the Roman empire is a long story that begins with";
    let (cold, u0) = sampled_run(&s, &tok, base);
    let (warm, u1) = sampled_run(&s, &tok, base);
    assert_eq!(u0.cached_tokens, 0);
    assert!(u1.cached_tokens >= 12, "{u1:?}");
    assert_eq!(warm, cold, "a fully cached prefix changed the output");
    // A different continuation of the prompt's start: only part of it is cached, and its
    // output equals the same prompt computed from scratch by a fresh scheduler.
    let other = format!("{base} the founding");
    let (partial, u2) = sampled_run(&s, &tok, &other);
    assert!(u2.cached_tokens > 0 && u2.cached_tokens < u2.prompt_tokens);
    drop(s);
    let Loaded {
        model, tokenizer, ..
    } = load();
    let fresh = Scheduler::start(model, Arc::new(tokenizer), SchedulerConfig::default()).unwrap();
    let (want, u3) = sampled_run(&fresh, &tok, &other);
    assert_eq!(u3.cached_tokens, 0);
    assert_eq!(partial, want, "a partly cached prefix changed the output");
}

/// `max_waiting` is exact under a burst: 32 requests submitted at once from 8 threads, one
/// running (a long generation) and room for 2 to wait, get at most 1 + 2 places (the running
/// one gives its place back when it starts) and every other one `QueueFull` with the limit.
/// Before, the check read a count the engine published once per step, and all 32 got in.
/// Places come back when requests start or end: after cancelling, new ones get in again.
#[test]
fn max_waiting_is_exact_under_a_burst() {
    let Loaded {
        model, tokenizer, ..
    } = load();
    let s = Arc::new(
        Scheduler::start(
            model,
            Arc::new(tokenizer),
            SchedulerConfig {
                max_running: 1,
                max_waiting: 2,
                ..SchedulerConfig::default()
            },
        )
        .unwrap(),
    );
    let req = || GenerationRequest {
        cache_salt: 0,
        prompt: vec![2, 651, 6037],
        max_tokens: 100_000,
        stop: Vec::new(),
        sampling: SamplingParams::default(),
        ignore_eos: true,
        constraint: None,
        sink: Box::new(|_| true),
    };
    let barrier = Arc::new(std::sync::Barrier::new(8));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let (s, barrier) = (s.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                (0..4).map(|_| s.submit(req())).collect::<Vec<_>>()
            })
        })
        .collect();
    let results: Vec<_> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let accepted: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert!(
        (2..=3).contains(&accepted.len()),
        "{} of 32 accepted",
        accepted.len()
    );
    for r in &results {
        if let Err(e) = r {
            assert!(
                matches!(e, SubmitError::QueueFull { limit: 2, .. }),
                "{e:?}"
            );
        }
    }
    for &&id in &accepted {
        s.cancel(id);
    }
    // The places come back once the engine has dropped the cancelled requests.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let again = loop {
        match s.submit(req()) {
            Ok(id) => break id,
            Err(SubmitError::QueueFull { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    s.cancel(again);
    // A group (the `n` choices of one request) takes its places together: more than the limit
    // can never be queued, which is not a full queue but a request that cannot be served.
    let group = |n: usize| s.submit_all((0..n).map(|_| req()).collect());
    assert_eq!(
        group(3).unwrap_err(),
        SubmitError::OverQueueLimit {
            requests: 3,
            limit: 2
        }
    );
    let ids = loop {
        match group(2) {
            Ok(ids) => break ids,
            Err(SubmitError::QueueFull { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("{e:?}"),
        }
    };
    assert_eq!(ids.len(), 2);
    s.shutdown(false);
}
