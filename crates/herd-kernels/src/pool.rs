//! A persistent thread pool for splitting one kernel call across cores.
//!
//! Between jobs a worker first watches for the next one for a short while ([`SPIN`]), then
//! sleeps on a condition variable. Decoding issues a job every few hundred microseconds, and
//! waking a sleeping thread costs tens of microseconds on a virtual machine (the idle vCPU has
//! halted), so the short watch keeps the second core in step; when work stops, the worker sleeps
//! and gives the core back instead of spinning it away. The caller waits for the workers the
//! same way. `run` hands out task indices through an atomic counter; the calling thread works
//! too and returns only when every task is done, which is what lets tasks borrow from the
//! caller's stack.
//!
//! A caller that knows no job is coming for a while (the serving engine after a forward pass,
//! while it samples and the output thread and HTTP runtime want the cores) calls
//! [`ThreadPool::rest`]: watching workers sleep at once instead of spinning out their watch.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a worker watches for the next job, and the caller for the workers' end, before
/// sleeping.
const SPIN: Duration = Duration::from_micros(500);

/// Watch `done()` until it holds or [`SPIN`] has passed (the caller then checks under the lock
/// and sleeps if need be).
fn spin_until(done: impl Fn() -> bool) {
    let start = Instant::now();
    while start.elapsed() <= SPIN {
        for _ in 0..64 {
            if done() {
                return;
            }
            std::hint::spin_loop();
        }
    }
}

type Task<'a> = dyn Fn(usize) + Sync + 'a;

/// One job: a task function called with indices `0..n_tasks`.
#[derive(Clone, Copy)]
struct Job {
    /// Lifetime-erased pointer to the caller's closure (see the SAFETY note in `run`).
    f: *const Task<'static>,
    n_tasks: usize,
}

// SAFETY: the pointee is `Sync` and outlives every use (run() waits for all workers).
unsafe impl Send for Job {}

struct State {
    job: Option<Job>,
    generation: u64,
    busy_workers: usize,
    panicked: bool,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Mirrors of `State::generation` and `State::busy_workers`, written under the lock and
    /// read without it while watching.
    generation: AtomicU64,
    busy: AtomicUsize,
    /// Set by `rest`, cleared by the next job: workers stop watching and sleep.
    resting: AtomicBool,
    work: Condvar,
    done: Condvar,
    next: AtomicUsize,
}

pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// Serialises callers: one job at a time.
    run_lock: Mutex<()>,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ThreadPool({} threads)", self.n_threads())
    }
}

impl ThreadPool {
    /// A pool using `n_threads` threads in all (the caller counts as one).
    pub fn new(n_threads: usize) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                job: None,
                generation: 0,
                busy_workers: 0,
                panicked: false,
                shutdown: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            next: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            resting: AtomicBool::new(false),
        });
        let workers = (1..n_threads.max(1))
            .map(|i| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("herd-worker-{i}"))
                    .spawn(move || worker(&shared))
                    .expect("spawn worker thread")
            })
            .collect();
        Self {
            shared,
            workers,
            run_lock: Mutex::new(()),
        }
    }

    pub fn n_threads(&self) -> usize {
        self.workers.len() + 1
    }

    /// Call `f(i)` for every `i` in `0..n_tasks`, spread over the pool; returns when all are done.
    /// Called from inside a task of a pool (nested), it runs the tasks one by one on the calling
    /// thread instead of waiting for a pool that is busy with the outer job.
    pub fn run<F: Fn(usize) + Sync>(&self, n_tasks: usize, f: F) {
        if n_tasks == 0 {
            return;
        }
        if self.workers.is_empty() || n_tasks == 1 || IN_TASK.get() {
            (0..n_tasks).for_each(f);
            return;
        }
        let _one_job = self.run_lock.lock().unwrap_or_else(|e| e.into_inner());
        let task: &Task<'_> = &f;
        // SAFETY: we erase the closure's lifetime to share it with the workers. This function
        // does not return (and `f` is not dropped) until `busy_workers` is back to zero, i.e.
        // until no worker can touch the pointer again; the job is cleared before we return.
        let task: *const Task<'static> = unsafe { std::mem::transmute(task as *const Task<'_>) };
        self.shared.next.store(0, Ordering::SeqCst);
        self.shared.resting.store(false, Ordering::Release);
        {
            let mut st = self.shared.state.lock().unwrap();
            st.job = Some(Job { f: task, n_tasks });
            st.generation += 1;
            st.busy_workers = self.workers.len();
            st.panicked = false;
            self.shared.busy.store(st.busy_workers, Ordering::Release);
            self.shared
                .generation
                .store(st.generation, Ordering::Release);
        }
        self.shared.work.notify_all();
        let mine = catch_unwind(AssertUnwindSafe(|| {
            IN_TASK.set(true);
            claim_tasks(&self.shared.next, n_tasks, &f);
        }));
        IN_TASK.set(false);
        spin_until(|| self.shared.busy.load(Ordering::Acquire) == 0);
        let mut st = self.shared.state.lock().unwrap();
        while st.busy_workers > 0 {
            st = self.shared.done.wait(st).unwrap();
        }
        st.job = None;
        let worker_panicked = st.panicked;
        drop(st);
        if let Err(p) = mine {
            resume_unwind(p);
        }
        assert!(!worker_panicked, "a thread-pool task panicked");
    }
}

/// The fewest elements [`ThreadPool::for_row_runs`] gives one run: waking the pool costs
/// microseconds, about what one element-wise pass over this many `f32` takes.
pub const MIN_RUN_ELEMENTS: usize = 16 * 1024;

impl ThreadPool {
    /// `f(first_row, rows)` for `data`, rows of `row_len` elements, cut into runs of whole rows
    /// spread over the pool (`first_row`: the index of the run's first row). About four runs
    /// per thread, every run but the last of at least [`MIN_RUN_ELEMENTS`] elements (one row
    /// at the least), so a `data` of at most that many (a decode step's) is one run on the
    /// calling thread and wakes no worker. Each run holds its own rows only: per-row work
    /// gives the same results whatever the thread count.
    ///
    /// # Panics
    /// If `row_len` is 0 or does not divide `data.len()`.
    pub fn for_row_runs<T: Send>(
        &self,
        data: &mut [T],
        row_len: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        assert!(
            row_len > 0 && data.len().is_multiple_of(row_len),
            "for_row_runs: {} elements are not rows of {row_len}",
            data.len()
        );
        let rows = data.len() / row_len;
        let per_run = rows
            .div_ceil(4 * self.n_threads())
            .max(MIN_RUN_ELEMENTS.div_ceil(row_len));
        let shared = SharedMut::new(data);
        self.run(rows.div_ceil(per_run), |i| {
            let first = i * per_run;
            let n = per_run.min(rows - first);
            // SAFETY: first < rows (i < the run count), so 1 ≤ n and first + n ≤ rows: the run
            // is inside `data`, which stays borrowed until `run` returns; runs i ≠ j hold
            // disjoint rows, and `T: Send` lets a worker hold its `&mut [T]`.
            f(first, unsafe { shared.slice(first * row_len, n * row_len) });
        });
    }

    /// No job is coming soon: workers that watch for one go to sleep now and leave their
    /// cores to other threads. The next `run` wakes them (tens of microseconds).
    pub fn rest(&self) {
        self.shared.resting.store(true, Ordering::Release);
    }
}

fn claim_tasks(next: &AtomicUsize, n: usize, f: &(dyn Fn(usize) + Sync + '_)) {
    loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    }
}

thread_local! {
    /// Whether this thread is running a pool task (a worker always is; a caller while it works
    /// on its own job): a nested `run` then runs its tasks inline.
    static IN_TASK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn worker(shared: &Shared) {
    IN_TASK.set(true);
    let mut seen = 0u64;
    loop {
        spin_until(|| {
            shared.generation.load(Ordering::Acquire) != seen
                || shared.resting.load(Ordering::Acquire)
        });
        let job = {
            let mut st = shared.state.lock().unwrap();
            while st.generation == seen && !st.shutdown {
                st = shared.work.wait(st).unwrap();
            }
            if st.shutdown {
                return;
            }
            seen = st.generation;
            st.job
        };
        let ok = match job {
            Some(job) => catch_unwind(AssertUnwindSafe(|| {
                // SAFETY: the job's closure is alive until we decrement busy_workers below.
                let f = unsafe { &*job.f };
                claim_tasks(&shared.next, job.n_tasks, f)
            }))
            .is_ok(),
            None => true,
        };
        let mut st = shared.state.lock().unwrap();
        st.panicked |= !ok;
        st.busy_workers -= 1;
        shared.busy.store(st.busy_workers, Ordering::Release);
        if st.busy_workers == 0 {
            shared.done.notify_all();
        }
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().shutdown = true;
        self.shared.work.notify_all();
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

static GLOBAL: OnceLock<ThreadPool> = OnceLock::new();

/// The process-wide pool: the size given to [`init_global`], else `HERD_THREADS` threads, else
/// one per available CPU.
pub fn global() -> &'static ThreadPool {
    GLOBAL.get_or_init(|| {
        let n = std::env::var("HERD_THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        ThreadPool::new(n)
    })
}

/// Size the process-wide pool before its first use (a `--threads` flag); `false` if it already
/// exists with another size.
pub fn init_global(n_threads: usize) -> bool {
    GLOBAL
        .get_or_init(|| ThreadPool::new(n_threads))
        .n_threads()
        == n_threads.max(1)
}

/// A raw pointer that tasks may share when each writes a disjoint part of the pointee.
#[derive(Clone, Copy, Debug)]
pub struct SharedMut<T>(*mut T);

// SAFETY: users promise disjoint writes (documented at each use).
unsafe impl<T: Send> Send for SharedMut<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    pub fn new(slice: &mut [T]) -> Self {
        Self(slice.as_mut_ptr())
    }

    /// # Safety
    /// `range` must be in bounds of the original slice, and no other task may access it
    /// while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        // SAFETY: forwarded to the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `run` inside a task (of the same pool, from the caller or a worker) runs inline
    /// instead of deadlocking on the busy pool, and still runs every task once.
    #[test]
    fn nested_run_completes() {
        let pool = ThreadPool::new(3);
        let hits: Vec<AtomicUsize> = (0..24).map(|_| AtomicUsize::new(0)).collect();
        pool.run(6, |outer| {
            pool.run(4, |inner| {
                hits[outer * 4 + inner].fetch_add(1, Ordering::Relaxed);
            });
        });
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    }

    /// Every row is handed out once, to the run that says it starts where it does, for sizes
    /// from one small run (on the caller) to many.
    #[test]
    fn row_runs_cover_every_row_once() {
        let pool = ThreadPool::new(3);
        for (rows, row_len) in [
            (1, 7),
            (5, 3),
            (1000, 1),
            (300, 100),
            (64, 2048),
            (2, 10_000),
        ] {
            let mut data = vec![0usize; rows * row_len];
            let runs = AtomicUsize::new(0);
            pool.for_row_runs(&mut data, row_len, |first, run| {
                runs.fetch_add(1, Ordering::Relaxed);
                for (i, row) in run.chunks_exact_mut(row_len).enumerate() {
                    row.iter_mut().for_each(|v| *v += first + i + 1);
                }
            });
            let want: Vec<usize> = (0..rows * row_len).map(|e| e / row_len + 1).collect();
            assert_eq!(data, want, "{rows} rows of {row_len}");
            // One run exactly where one run of at least MIN_RUN_ELEMENTS holds every row.
            let one = rows <= MIN_RUN_ELEMENTS.div_ceil(row_len);
            assert_eq!(runs.load(Ordering::Relaxed) == 1, one, "{rows} × {row_len}");
        }
    }

    #[test]
    fn runs_every_task_once() {
        let pool = ThreadPool::new(3);
        for n in [0, 1, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn a_resting_pool_still_runs_every_task() {
        let pool = ThreadPool::new(2);
        for _ in 0..3 {
            pool.rest();
            let count = AtomicUsize::new(0);
            pool.run(16, |_| {
                count.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(count.load(Ordering::Relaxed), 16);
        }
    }

    #[test]
    fn a_panicking_task_propagates_and_the_pool_survives() {
        let pool = ThreadPool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(8, |i| assert!(i != 5))));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(4, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 4);
    }
}
