//! SwiGLU feed-forward blocks and the mixture-of-experts executor.
//!
//! A mixture-of-experts layer routes each token to `k` of its experts ([`Routing`]: which
//! experts, with what weight, applied to the expert's input or output), runs every selected
//! expert on the tokens routed to it, and adds the results (plus a shared expert, where the
//! family has one). The executor groups tokens by expert, so each expert's weights are read
//! once per step, and computes all selected experts together: every gate and up projection of
//! the step (the shared expert's included) as one product batch, every down projection as
//! another (`herd_kernels::matmul::matmul_many`: one pool job to quantize a batch's
//! activations, one to multiply), instead of two jobs per matrix.
//!
//! Sums are formed in one fixed order (experts by index, each expert's tokens in batch order),
//! so a token's output never depends on which other tokens share the step.

use herd_kernels::attention::expf_ggml;
use herd_kernels::matmul::{Product, matmul_many};
use herd_kernels::ops::{sigmoid, silu};
use herd_kernels::pool;
use smallvec::SmallVec;

use crate::rows::silu_mul_into;
use crate::weights::{Matrix, matmul_same_input, set_len};

/// SwiGLU feed-forward: `down(silu(gate(x)) ⊙ up(x))`; `gate`, `up` `[width, hidden]`, `down`
/// `[hidden, width]`.
#[derive(Debug)]
pub(crate) struct Mlp {
    pub gate: Matrix,
    pub up: Matrix,
    pub down: Matrix,
}

/// Buffers of one feed-forward block.
#[derive(Debug, Default)]
pub(crate) struct MlpWork {
    gate: Vec<f32>,
    act: Vec<f32>,
}

impl Mlp {
    /// The block on `n` rows of `x` (`[n, hidden]`), into `out` (`[n, hidden]`).
    pub fn forward(&self, x: &[f32], n: usize, w: &mut MlpWork, out: &mut Vec<f32>) {
        matmul_same_input(x, n, [(&self.gate, &mut w.gate), (&self.up, &mut w.act)]);
        silu_mul_into(&mut w.act, &w.gate, self.gate.out_features);
        self.down.matmul_into(&w.act, n, out);
    }
}

/// One routed expert. HF checkpoints fuse gate and up input-major (`gate_up` `[hidden, 2·I]`,
/// gate first; `down` `[I, hidden]`); GGUF files store three `[out, in]` matrices per expert.
#[derive(Debug)]
pub(crate) enum Expert {
    Fused { gate_up: Matrix, down: Matrix },
    Split(Mlp),
}

/// How a router's logits choose a token's experts and weigh them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Routing {
    /// Llama 4: the top `k` experts by raw logit, each chosen expert's *input* scaled by
    /// `sigmoid(logit)`.
    SigmoidScalesInput,
    /// Mixtral and Qwen3-MoE: the top `k` experts by logit, their *outputs* weighted by the
    /// softmax over all logits, renormalised over the chosen `k` if `renormalize` (Mixtral;
    /// Qwen3-MoE's `norm_topk_prob`), as is otherwise. Exponentials are `expf_ggml`'s (the
    /// same bits on every CPU).
    #[allow(dead_code)] // the routing of the next MoE families; tested below
    SoftmaxTopK { renormalize: bool },
}

impl Routing {
    /// One token's experts and weights: `(expert, weight)` for the `k` largest `logits` (ties
    /// to the lower index), largest first, into `out`; `order` is scratch.
    pub fn route(
        self,
        logits: &[f32],
        k: usize,
        order: &mut Vec<usize>,
        out: &mut Vec<(usize, f32)>,
    ) {
        order.clear();
        order.extend(0..logits.len());
        order.sort_unstable_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let chosen = &order[..k.min(logits.len())];
        out.clear();
        match self {
            Routing::SigmoidScalesInput => {
                out.extend(chosen.iter().map(|&e| (e, sigmoid(logits[e]))));
            }
            Routing::SoftmaxTopK { renormalize } => {
                let max = chosen.first().map_or(0.0, |&e| logits[e]);
                let z: f32 = if renormalize {
                    chosen.iter().map(|&e| expf_ggml(logits[e] - max)).sum()
                } else {
                    logits.iter().map(|&l| expf_ggml(l - max)).sum()
                };
                out.extend(chosen.iter().map(|&e| (e, expf_ggml(logits[e] - max) / z)));
            }
        }
    }

    /// Whether the weight scales the expert's input (else its output).
    pub fn scales_input(self) -> bool {
        matches!(self, Routing::SigmoidScalesInput)
    }
}

/// A mixture-of-experts block: `router` `[experts, hidden]`, the experts, an optional shared
/// expert run on every token, and the routing rule with its `top_k`.
#[derive(Debug)]
pub(crate) struct Moe {
    pub router: Matrix,
    pub experts: Vec<Expert>,
    pub shared: Option<Mlp>,
    pub routing: Routing,
    pub top_k: usize,
}

/// Buffers of one MoE block (kept between steps: once warm, a decode step allocates nothing).
#[derive(Debug, Default)]
pub(crate) struct MoeWork {
    router: Vec<f32>,
    order: Vec<usize>,
    chosen: Vec<(usize, f32)>,
    /// Per expert: the (token, weight) pairs routed to it, in batch order.
    routes: Vec<Vec<(usize, f32)>>,
    /// The selected experts, by index, and where their rows start in the buffers below.
    active: Vec<(usize, usize)>,
    /// Per selected expert, where its outputs start in `gate` and in `up`.
    outputs_at: Vec<(usize, usize)>,
    /// Per row of the selected experts' blocks: its token and routing weight.
    sources: Vec<(usize, f32)>,
    /// Per token, `k` slots: the rows of its experts in index order, `usize::MAX` after.
    slots: Vec<usize>,
    /// Every selected expert's input rows, one after another (`[rows, hidden]`).
    input: Vec<f32>,
    /// Gate and up outputs (split experts) or the fused gate-up outputs, per selected expert.
    gate: Vec<f32>,
    up: Vec<f32>,
    /// `silu(gate) ⊙ up` per selected expert (`[rows, width]`), and the down outputs.
    act: Vec<f32>,
    down: Vec<f32>,
    /// The shared expert's buffers (`[t, width]`) and output (`[t, hidden]`).
    shared_gate: Vec<f32>,
    shared_act: Vec<f32>,
}

impl Moe {
    /// The block on `t` rows of `x` (`[t, hidden]`), into `out` (`[t, hidden]`): the shared
    /// expert's output plus each token's routed sum (experts by index).
    pub fn forward(&self, x: &[f32], t: usize, w: &mut MoeWork, out: &mut Vec<f32>) {
        let n_experts = self.experts.len();
        let h = self.router.in_features;
        self.router.matmul_into(x, t, &mut w.router);
        w.routes.resize_with(n_experts, Vec::new);
        w.routes.iter_mut().for_each(Vec::clear);
        for tok in 0..t {
            let logits = &w.router[tok * n_experts..(tok + 1) * n_experts];
            self.routing
                .route(logits, self.top_k, &mut w.order, &mut w.chosen);
            for &(e, weight) in &w.chosen {
                w.routes[e].push((tok, weight));
            }
        }

        // Inputs of the selected experts, one block of rows each: `sources[row]` is the
        // (token, weight) of that row, and `slots[tok·k + i]` the row of the token's i-th
        // expert by index (`usize::MAX` past its last).
        w.active.clear();
        w.sources.clear();
        w.slots.clear();
        w.slots.resize(t * self.top_k, usize::MAX);
        for (e, tokens) in w.routes.iter().enumerate() {
            if tokens.is_empty() {
                continue;
            }
            w.active.push((e, w.sources.len()));
            for &(tok, weight) in tokens {
                let slot = w.slots[tok * self.top_k..(tok + 1) * self.top_k]
                    .iter_mut()
                    .find(|s| **s == usize::MAX)
                    .expect("a token has at most top_k experts");
                *slot = w.sources.len();
                w.sources.push((tok, weight));
            }
        }
        let rows = w.sources.len();
        set_len(&mut w.input, rows * h);
        let (sources, scales_input) = (&w.sources, self.routing.scales_input());
        pool::global().for_row_runs(&mut w.input, h, |first, run| {
            for (row, &(tok, weight)) in run.chunks_exact_mut(h).zip(&sources[first..]) {
                let x = &x[tok * h..(tok + 1) * h];
                if scales_input {
                    row.iter_mut().zip(x).for_each(|(r, v)| *r = v * weight);
                } else {
                    row.copy_from_slice(x);
                }
            }
        });
        // A layer's routed experts have one width (its intermediate size), which lets the
        // gating below address every selected expert's rows alike.
        let width = |e: usize| match &self.experts[e] {
            Expert::Fused { down, .. } => down.in_features,
            Expert::Split(mlp) => mlp.gate.out_features,
        };
        let wd = w.active.first().map_or(0, |&(e, _)| width(e));
        assert!(
            w.active.iter().all(|&(e, _)| width(e) == wd),
            "MoE layer: routed experts of different widths"
        );
        let rows_of = |i: usize, active: &[(usize, usize)]| {
            active.get(i + 1).map_or(rows, |a| a.1) - active[i].1
        };
        // Gate and up for every selected expert and the shared expert: one product batch. A
        // fused expert's gate-up rows (`2·width` each) go to `gate`; a split expert's gate rows
        // to `gate` and up rows to `up`.
        let fused = |e: usize| matches!(self.experts[e], Expert::Fused { .. });
        let (mut gate_len, mut up_len) = (0, 0);
        w.outputs_at.clear();
        for (i, &(e, _)) in w.active.iter().enumerate() {
            w.outputs_at.push((gate_len, up_len));
            let values = rows_of(i, &w.active) * width(e);
            if fused(e) {
                gate_len += 2 * values;
            } else {
                gate_len += values;
                up_len += values;
            }
        }
        // Product outputs: the products write every value.
        set_len(&mut w.gate, gate_len);
        set_len(&mut w.up, up_len);
        let shared_width = self.shared.as_ref().map_or(0, |s| s.gate.out_features);
        set_len(&mut w.shared_gate, t * shared_width);
        set_len(&mut w.shared_act, t * shared_width);
        {
            let mut products: Products<'_> = SmallVec::new();
            let (mut gate, mut up) = (&mut w.gate[..], &mut w.up[..]);
            for (i, &(e, first)) in w.active.iter().enumerate() {
                let n = rows_of(i, &w.active);
                let input = &w.input[first * h..(first + n) * h];
                match &self.experts[e] {
                    Expert::Fused { gate_up, .. } => {
                        let (g, rest) = gate.split_at_mut(n * gate_up.out_features);
                        gate = rest;
                        products.push(product(gate_up, input, n, g));
                    }
                    Expert::Split(mlp) => {
                        let (g, rest) = gate.split_at_mut(n * mlp.gate.out_features);
                        gate = rest;
                        let (u, rest) = up.split_at_mut(n * mlp.up.out_features);
                        up = rest;
                        products.push(product(&mlp.gate, input, n, g));
                        products.push(product(&mlp.up, input, n, u));
                    }
                }
            }
            if let Some(s) = &self.shared {
                products.push(product(&s.gate, x, t, &mut w.shared_gate));
                products.push(product(&s.up, x, t, &mut w.shared_act));
            }
            matmul_many(&mut products);
        }

        // silu(gate) ⊙ up, per selected expert into `act` (row r of every expert's block at
        // r · wd: one width), the shared expert's in place.
        set_len(&mut w.act, rows * wd);
        let (gate, up, active, outputs_at) = (&w.gate, &w.up, &w.active, &w.outputs_at);
        // (With no selected expert, `act` is empty and the closure never runs: `wd` may be 0.)
        pool::global().for_row_runs(&mut w.act, wd.max(1), |first, run| {
            for (r, act) in (first..).zip(run.chunks_exact_mut(wd)) {
                // Row r is row j of selected expert i, whose outputs start at (g_at, u_at).
                let i = active.partition_point(|a| a.1 <= r) - 1;
                let ((e, first_row), (g_at, u_at)) = (active[i], outputs_at[i]);
                let j = r - first_row;
                let (g, u) = if fused(e) {
                    gate[g_at + j * 2 * wd..g_at + (j + 1) * 2 * wd].split_at(wd)
                } else {
                    let (g, u) = (g_at + j * wd, u_at + j * wd);
                    (&gate[g..g + wd], &up[u..u + wd])
                };
                for ((a, g), u) in act.iter_mut().zip(g).zip(u) {
                    *a = u * silu(*g);
                }
            }
        });
        silu_mul_into(&mut w.shared_act, &w.shared_gate, shared_width.max(1));

        // Every down projection: one product batch (writing every value of `down`, and of
        // `out` where there is a shared expert).
        set_len(&mut w.down, rows * h);
        if self.shared.is_some() {
            set_len(out, t * h);
        } else {
            out.clear();
            out.resize(t * h, 0.0);
        }
        {
            let mut products: Products<'_> = SmallVec::new();
            let (mut act_at, mut down) = (0, &mut w.down[..]);
            for (i, &(e, _)) in w.active.iter().enumerate() {
                let (n, wd) = (rows_of(i, &w.active), width(e));
                let (d, rest) = down.split_at_mut(n * h);
                down = rest;
                let m = match &self.experts[e] {
                    Expert::Fused { down, .. } => down,
                    Expert::Split(mlp) => &mlp.down,
                };
                products.push(product(m, &w.act[act_at..act_at + n * wd], n, d));
                act_at += n * wd;
            }
            if let Some(s) = &self.shared {
                products.push(product(&s.down, &w.shared_act, t, out));
            }
            matmul_many(&mut products);
        }

        // Each token's routed sum, experts in index order from zero, then added to the shared
        // output; per value, in a run of the row's values at a time.
        let (down, slots, k) = (&w.down, &w.slots, self.top_k);
        pool::global().for_row_runs(out, h, |first, run| {
            let mut acc = [0.0f32; SUM_RUN];
            for (tok, o) in (first..).zip(run.chunks_exact_mut(h)) {
                let rows = slots[tok * k..(tok + 1) * k]
                    .iter()
                    .take_while(|&&r| r != usize::MAX);
                for (c, o) in o.chunks_mut(SUM_RUN).enumerate() {
                    let acc = &mut acc[..o.len()];
                    acc.fill(0.0);
                    for &r in rows.clone() {
                        let at = r * h + c * SUM_RUN;
                        let y = &down[at..at + o.len()];
                        if scales_input {
                            acc.iter_mut().zip(y).for_each(|(a, v)| *a += v);
                        } else {
                            let weight = sources[r].1;
                            acc.iter_mut().zip(y).for_each(|(a, v)| *a += weight * v);
                        }
                    }
                    o.iter_mut().zip(&*acc).for_each(|(o, a)| *o += a);
                }
            }
        });
    }
}

/// Values of a token's routed sum formed at a time (on the stack).
const SUM_RUN: usize = 256;

/// The products of one batch: inline for a decode step's experts (so that it allocates
/// nothing: a gate-up batch of split experts holds `2·k + 2` products, up to top-11 routing), on
/// the heap for a large batch's many.
type Products<'a> = SmallVec<[Product<'a>; 24]>;

/// The product `x · m` of `n` rows into `out`.
fn product<'a>(m: &'a Matrix, x: &'a [f32], n: usize, out: &'a mut [f32]) -> Product<'a> {
    Product {
        x,
        n_rows: n,
        w: m.as_ref(),
        out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An f32 `[out, in]` matrix from row-major values.
    fn matrix(v: &[f32], out_features: usize, in_features: usize) -> Matrix {
        let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Matrix::new(
            herd_formats::TensorBytes::owned(bytes),
            herd_kernels::DType::F32,
            in_features,
            out_features,
            herd_kernels::Layout::OutMajor,
        )
    }

    /// The executor equals a token-by-token f64 evaluation of the routed sum, with
    /// output-weighted softmax routing, no shared expert, and experts split (GGUF) and fused
    /// (HF, input-major `[hidden, 2·width]`, gate first) mixed; and each token's output is the
    /// same alone as in the batch.
    #[test]
    fn executor_equals_the_routed_sum() {
        let (h, wd, n_exp, t) = (8, 5, 4, 6);
        let vals = |seed: u64, n: usize| herd_kernels::testing::rand_vec(n, seed, 0.5);
        let mut dense: Vec<[Vec<f32>; 3]> = Vec::new(); // gate, up [wd, h]; down [h, wd]
        let experts: Vec<Expert> = (0..n_exp)
            .map(|e| {
                let (g, u, d) = (
                    vals(10 + e as u64, wd * h),
                    vals(20 + e as u64, wd * h),
                    vals(30 + e as u64, h * wd),
                );
                dense.push([g.clone(), u.clone(), d.clone()]);
                if e % 2 == 0 {
                    Expert::Split(Mlp {
                        gate: matrix(&g, wd, h),
                        up: matrix(&u, wd, h),
                        down: matrix(&d, h, wd),
                    })
                } else {
                    // Input-major [h, 2·wd]: row i holds gate[.., i] then up[.., i].
                    let mut gu = Vec::with_capacity(h * 2 * wd);
                    for i in 0..h {
                        gu.extend((0..wd).map(|o| g[o * h + i]));
                        gu.extend((0..wd).map(|o| u[o * h + i]));
                    }
                    let bytes = gu.iter().flat_map(|x| x.to_le_bytes()).collect();
                    // Input-major down: [wd, h].
                    let dt: Vec<f32> = (0..wd * h).map(|j| d[(j % h) * wd + j / h]).collect();
                    let dbytes = dt.iter().flat_map(|x| x.to_le_bytes()).collect();
                    let im = |b, i, o| {
                        Matrix::new(
                            herd_formats::TensorBytes::owned(b),
                            herd_kernels::DType::F32,
                            i,
                            o,
                            herd_kernels::Layout::InMajor,
                        )
                    };
                    Expert::Fused {
                        gate_up: im(bytes, h, 2 * wd),
                        down: im(dbytes, wd, h),
                    }
                }
            })
            .collect();
        let router = vals(1, n_exp * h);
        let moe = Moe {
            router: matrix(&router, n_exp, h),
            experts,
            shared: None,
            routing: Routing::SoftmaxTopK { renormalize: true },
            top_k: 2,
        };
        let x = vals(2, t * h);
        let mut out = Vec::new();
        moe.forward(&x, t, &mut MoeWork::default(), &mut out);
        let (mut order, mut chosen) = (Vec::new(), Vec::new());
        for tok in 0..t {
            let xt = &x[tok * h..(tok + 1) * h];
            let logits: Vec<f32> = (0..n_exp)
                .map(|e| herd_kernels::matmul::dot(xt, &router[e * h..(e + 1) * h]))
                .collect();
            moe.routing.route(&logits, 2, &mut order, &mut chosen);
            let mut want = vec![0.0f64; h];
            for &(e, weight) in &chosen {
                let [g, u, d] = &dense[e];
                let a: Vec<f64> = (0..wd)
                    .map(|o| {
                        let dot = |m: &[f32]| -> f64 {
                            (0..h).map(|i| m[o * h + i] as f64 * xt[i] as f64).sum()
                        };
                        let gv = dot(g);
                        gv / (1.0 + (-gv).exp()) * dot(u)
                    })
                    .collect();
                for (i, w) in want.iter_mut().enumerate() {
                    let y: f64 = (0..wd).map(|o| d[i * wd + o] as f64 * a[o]).sum();
                    *w += weight as f64 * y;
                }
            }
            for (i, w) in want.iter().enumerate() {
                let got = out[tok * h + i] as f64;
                assert!((got - w).abs() < 1e-5, "token {tok}, {i}: {got} vs {w}");
            }
            let mut alone = Vec::new();
            moe.forward(xt, 1, &mut MoeWork::default(), &mut alone);
            assert_eq!(alone, out[tok * h..(tok + 1) * h], "token {tok} alone");
        }
    }

    /// A batch split over the pool (its gather, gating and routed sums in several runs; the
    /// hidden size not a multiple of the routed sum's run), with a shared expert and Llama 4's
    /// input-scaled routing: each token's output has the bits it has alone (one row, on the
    /// calling thread), and a workspace last used by the larger batch gives a smaller one the
    /// bits a fresh one does.
    #[test]
    fn split_batches_equal_tokens_alone() {
        use herd_kernels::pool::MIN_RUN_ELEMENTS;
        let (h, wd, n_exp, t) = (300, 136, 4, 96);
        let vals = |seed: u64, n: usize| herd_kernels::testing::rand_vec(n, seed, 0.3);
        let mlp = |seed: u64| Mlp {
            gate: matrix(&vals(seed, wd * h), wd, h),
            up: matrix(&vals(seed + 1, wd * h), wd, h),
            down: matrix(&vals(seed + 2, h * wd), h, wd),
        };
        let moe = Moe {
            router: matrix(&vals(1, n_exp * h), n_exp, h),
            experts: (0..n_exp)
                .map(|e| Expert::Split(mlp(10 + 3 * e as u64)))
                .collect(),
            shared: Some(mlp(50)),
            routing: Routing::SigmoidScalesInput,
            top_k: 2,
        };
        // t·k input rows of h and of wd, and t output rows of h: each more than one run.
        let runs_of = |rows: usize, len: usize| rows > MIN_RUN_ELEMENTS.div_ceil(len);
        assert!(runs_of(t, h) && runs_of(2 * t, h) && runs_of(2 * t, wd));
        let x = vals(2, t * h);
        let (mut work, mut out) = (MoeWork::default(), Vec::new());
        moe.forward(&x, t, &mut work, &mut out);
        assert!(out.iter().all(|v| v.is_finite()));
        for tok in 0..t {
            let mut alone = Vec::new();
            moe.forward(
                &x[tok * h..(tok + 1) * h],
                1,
                &mut MoeWork::default(),
                &mut alone,
            );
            assert_eq!(alone, out[tok * h..(tok + 1) * h], "token {tok} alone");
        }
        let (mut again, mut fresh) = (Vec::new(), Vec::new());
        moe.forward(&x[..7 * h], 7, &mut work, &mut again);
        moe.forward(&x[..7 * h], 7, &mut MoeWork::default(), &mut fresh);
        assert_eq!(again, fresh, "a used workspace");
        assert_eq!(again, out[..7 * h], "the first seven tokens");
    }

    #[test]
    fn sigmoid_routing_takes_the_top_k_by_raw_logit() {
        let (mut order, mut out) = (Vec::new(), Vec::new());
        let logits = [0.5, 2.0, -1.0, 2.0, 1.0];
        Routing::SigmoidScalesInput.route(&logits, 3, &mut order, &mut out);
        let want = [(1, sigmoid(2.0)), (3, sigmoid(2.0)), (4, sigmoid(1.0))];
        assert_eq!(out, want, "ties go to the lower index");
        assert!(Routing::SigmoidScalesInput.scales_input());
    }

    #[test]
    fn softmax_routing_weighs_the_chosen_experts() {
        let (mut order, mut out) = (Vec::new(), Vec::new());
        let logits = [1.0f32, 3.0, 0.0, 2.0];
        let r = Routing::SoftmaxTopK { renormalize: true };
        r.route(&logits, 2, &mut order, &mut out);
        // Mixtral: softmax over the two chosen logits (3 and 2).
        let p = 1.0 / (1.0 + (-1.0f32).exp());
        assert_eq!(out.iter().map(|o| o.0).collect::<Vec<_>>(), [1, 3]);
        assert!((out[0].1 - p).abs() < 1e-6 && (out[1].1 - (1.0 - p)).abs() < 1e-6);
        assert!(!r.scales_input());
        // Without renormalising: the full softmax's probabilities of the chosen two.
        Routing::SoftmaxTopK { renormalize: false }.route(&logits, 2, &mut order, &mut out);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((out[0].1 - 3.0f32.exp() / z).abs() < 1e-6);
        assert!((out[1].1 - 2.0f32.exp() / z).abs() < 1e-6);
    }
}
