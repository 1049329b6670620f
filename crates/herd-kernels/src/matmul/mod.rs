//! Products of stored weight matrices with `f32` activation rows.
//!
//! A weight is a borrowed byte slice plus its element type and layout. Two layouts occur in
//! checkpoints: `nn.Linear`'s `[out, in]` (most weights) and input-major `[in, out]` (Llama 4's
//! fused expert tensors). Both are used in place, never transposed at load; the quantized
//! `[out, in]` matrices of the types with group kernels may be repacked at load into a third,
//! `OutMajorX8` (rows interleaved in groups of eight, see [`quant::repack`]).
//!
//! Each output element is reduced in one fixed order (the kernel's), never in an order that
//! depends on what else is in the batch, so batching never changes results.
//!
//! The quantized products' kernels are in [`quant`]; the float dot product's scalar reference
//! is in `scalar.rs` and its AVX form (chosen at run time, the same bits) in `avx2.rs`.

mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;

use crate::dtype::{DType, decode_into};
use crate::pool::{self, SharedMut, ThreadPool};
use crate::quant;

/// How a 2-D weight is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `[out_features, in_features]`, row-major (`nn.Linear`): `y = x·Wᵀ`.
    OutMajor,
    /// `[in_features, out_features]`, row-major: `y = x·W`.
    InMajor,
    /// `[out_features, in_features]` repacked at load: rows interleaved in groups of eight
    /// (see [`quant::repack`]), the last `out_features % 8` rows as in `OutMajor`.
    OutMajorX8,
}

/// A borrowed weight matrix.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub bytes: &'a [u8],
    pub dtype: DType,
    pub in_features: usize,
    pub out_features: usize,
    pub layout: Layout,
}

impl<'a> MatRef<'a> {
    /// A matrix view; `None` if the byte length does not match the shape (or `OutMajorX8` is
    /// asked of a type without that layout).
    pub fn new(
        bytes: &'a [u8],
        dtype: DType,
        in_features: usize,
        out_features: usize,
        layout: Layout,
    ) -> Option<Self> {
        let layout_ok = layout != Layout::OutMajorX8 || quant::repack::repack_supported(dtype);
        (layout_ok && bytes.len() == dtype.bytes_for(in_features * out_features)).then_some(Self {
            bytes,
            dtype,
            in_features,
            out_features,
            layout,
        })
    }

    /// Number of stored rows and their length in elements.
    fn stored_rows(&self) -> (usize, usize) {
        match self.layout {
            Layout::OutMajor | Layout::OutMajorX8 => (self.out_features, self.in_features),
            Layout::InMajor => (self.in_features, self.out_features),
        }
    }

    /// The same matrix with its rows interleaved for the group kernels (`OutMajorX8`), when it
    /// is an `OutMajor` matrix of a type that has that layout and at least one whole group;
    /// `None` otherwise.
    pub fn repacked(&self) -> Option<Vec<u8>> {
        (self.layout == Layout::OutMajor
            && quant::repack::repack_supported(self.dtype)
            && self.out_features >= quant::repack::GROUP)
            .then(|| {
                quant::repack::repack(self.dtype, self.bytes, self.out_features, self.in_features)
            })
    }

    /// Decode stored row `r` into `out` (an embedding lookup when the matrix is `[vocab, hidden]`).
    pub fn decode_row(&self, r: usize, out: &mut [f32]) {
        let (rows, len) = self.stored_rows();
        assert!(
            r < rows && out.len() == len,
            "decode_row: row {r} of {rows}"
        );
        let row_bytes = self.dtype.bytes_for(len);
        if self.layout == Layout::OutMajorX8 {
            ROW_BYTES.with_borrow_mut(|row| {
                row.clear();
                row.resize(row_bytes, 0);
                quant::repack::unpack_row(self.dtype, self.bytes, rows, len, r, row);
                decode_into(self.dtype, row, out);
            });
            return;
        }
        decode_into(
            self.dtype,
            &self.bytes[r * row_bytes..(r + 1) * row_bytes],
            out,
        );
    }
}

/// `out[n_rows, out_features] = x[n_rows, in_features] · W` (W as its layout says), split over
/// the global thread pool by output columns.
pub fn matmul(x: &[f32], n_rows: usize, w: &MatRef<'_>, out: &mut [f32]) {
    matmul_with(pool::global(), x, n_rows, w, out)
}

/// [`matmul`] on a given pool.
pub fn matmul_with(pool: &ThreadPool, x: &[f32], n_rows: usize, w: &MatRef<'_>, out: &mut [f32]) {
    matmul_many_with(
        pool,
        &mut [Product {
            x,
            n_rows,
            w: *w,
            out,
        }],
    )
}

/// One product of a batch that [`matmul_many`] computes as one pool job:
/// `out[n_rows, out_features] = x[n_rows, in_features] · W`.
#[derive(Debug)]
pub struct Product<'a> {
    pub x: &'a [f32],
    pub n_rows: usize,
    pub w: MatRef<'a>,
    pub out: &'a mut [f32],
}

/// Several independent products (e.g. the experts of a mixture-of-experts layer), each with
/// its own activations, weights and output, computed as if by [`matmul`] one after another
/// (the same bits), but with one pool job to quantize every product's activations and one to
/// compute every output: the pool's tasks of all products together, so that small products
/// neither wait on each other nor each pay a job's start and end.
///
/// # Panics
/// If a product's `x` or `out` does not have its shape.
pub fn matmul_many(products: &mut [Product<'_>]) {
    matmul_many_with(pool::global(), products)
}

/// How one product is split into pool tasks.
#[derive(Clone, Copy)]
enum Plan {
    /// Repacked (`OutMajorX8`): `per_task` groups per task, `group_tasks` such tasks, then
    /// one task for the tail rows (if any).
    Groups { per_task: usize, group_tasks: usize },
    /// Quantized `OutMajor`: chunks of `chunk` output columns, each in tiles of `tile` rows.
    Quantized { chunk: usize, tile: usize },
    /// Quantized `OutMajor` of a type whose blocks cost more to unpack than to multiply, in a
    /// batch of [`UNPACK_MIN_ROWS`] or more: chunks of `chunk` (a multiple of eight) output
    /// columns, each eight weight rows unpacked once ([`unpacked_task`]).
    Unpacked { chunk: usize },
    /// Float `OutMajor`: chunks of `chunk` output columns by runs of `row_chunk` activation
    /// rows (all of them unless the columns are too few to give every thread work: a router's
    /// sixteen).
    Float { chunk: usize, row_chunk: usize },
    /// `InMajor`: chunks of `chunk` output columns.
    InMajor { chunk: usize },
}

impl Plan {
    fn new(p: &Product<'_>, threads: usize) -> Self {
        let (k, n, w) = (p.w.in_features, p.w.out_features, &p.w);
        match w.layout {
            Layout::OutMajorX8 => {
                let groups = n / quant::repack::GROUP;
                let mut per_task = groups.div_ceil(threads * 4).max(1);
                if quant::has_x16_kernel(w.dtype) {
                    // The 512-bit kernels take groups in pairs: a task's odd group alone costs
                    // the work of a pair where the type has only those kernels (Q6_K).
                    per_task += per_task % 2;
                }
                Plan::Groups {
                    per_task,
                    group_tasks: groups.div_ceil(per_task),
                }
            }
            Layout::OutMajor
                if p.n_rows >= UNPACK_MIN_ROWS && quant::unpack_x8_supported(w.dtype) =>
            {
                // Whole groups of eight rows per chunk: only the matrix's last rows go pair by
                // pair.
                Plan::Unpacked {
                    chunk: chunk_size(n, threads).next_multiple_of(8),
                }
            }
            Layout::OutMajor if w.dtype.is_quantized() => {
                // A batch of more than four rows (prefill) is computed in tiles: a few weight
                // rows and four activation rows, both staying in L1 while every pair of them is
                // computed, instead of streaming the whole activation matrix past each weight
                // row.
                let tile = if p.n_rows > 4 {
                    (TILE_WEIGHT_BYTES / w.dtype.bytes_for(k)).clamp(1, MAX_TILE_ROWS)
                } else {
                    1
                };
                Plan::Quantized {
                    chunk: chunk_size(n, threads),
                    tile,
                }
            }
            Layout::OutMajor => {
                let chunk = chunk_size(n, threads);
                // About four tasks per thread: what the columns do not give, the rows do.
                let row_tasks = (4 * threads)
                    .div_ceil(n.div_ceil(chunk).max(1))
                    .clamp(1, p.n_rows.max(1));
                Plan::Float {
                    chunk,
                    row_chunk: p.n_rows.div_ceil(row_tasks).max(1),
                }
            }
            Layout::InMajor => {
                assert!(
                    !w.dtype.is_quantized(),
                    "input-major weights must be plain floats"
                );
                Plan::InMajor {
                    chunk: chunk_size(n, threads),
                }
            }
        }
    }

    fn n_tasks(self, p: &Product<'_>) -> usize {
        let n = p.w.out_features;
        if p.n_rows == 0 || n == 0 {
            return 0;
        }
        match self {
            Plan::Groups { group_tasks, .. } => {
                group_tasks + usize::from(!n.is_multiple_of(quant::repack::GROUP))
            }
            Plan::Float { chunk, row_chunk } => n.div_ceil(chunk) * p.n_rows.div_ceil(row_chunk),
            Plan::Quantized { chunk, .. } | Plan::Unpacked { chunk } | Plan::InMajor { chunk } => {
                n.div_ceil(chunk)
            }
        }
    }

    /// Whether the activations are quantized first (to the weight type's dot-product partner).
    fn quantizes(self) -> bool {
        matches!(
            self,
            Plan::Groups { .. } | Plan::Quantized { .. } | Plan::Unpacked { .. }
        )
    }
}

/// A product's activations as its kernels read them: quantized rows, and the Q4_0/Q5_0 group
/// kernels' block sums (kept between calls: once warm, a decode step allocates nothing).
#[derive(Default)]
struct Activations {
    act: Vec<u8>,
    sums: Vec<i32>,
}

/// What one [`matmul_many`] call keeps: per product its activations, plan, first task and
/// output, and where each product's quantization tasks start.
#[derive(Default)]
struct Job {
    prepared: Vec<Activations>,
    plans: Vec<Plan>,
    starts: Vec<usize>,
    outs: Vec<SharedMut<f32>>,
    acts: Vec<SharedMut<u8>>,
}

/// [`matmul_many`] on a given pool.
pub fn matmul_many_with(pool: &ThreadPool, products: &mut [Product<'_>]) {
    for p in products.iter() {
        let (k, n) = (p.w.in_features, p.w.out_features);
        assert_eq!(p.x.len(), p.n_rows * k, "matmul: input shape");
        assert_eq!(p.out.len(), p.n_rows * n, "matmul: output shape");
    }
    let threads = pool.n_threads();
    JOB.with_borrow_mut(|job| {
        let Job {
            prepared,
            plans,
            starts,
            outs,
            acts,
        } = job;
        if prepared.len() < products.len() {
            prepared.resize_with(products.len(), Default::default);
        }
        plans.clear();
        plans.extend(products.iter().map(|p| Plan::new(p, threads)));
        quantize_activations(pool, products, plans, prepared, starts, acts);
        // Task i of the job is task i − starts[p] of product p, starts[p] ≤ i < starts[p + 1].
        starts.clear();
        starts.push(0);
        for (p, plan) in products.iter().zip(plans.iter()) {
            starts.push(starts[starts.len() - 1] + plan.n_tasks(p));
        }
        let total = starts[starts.len() - 1];
        outs.clear();
        outs.extend(products.iter_mut().map(|p| SharedMut::new(p.out)));
        let (prepared, plans, starts, outs) = (&*prepared, &*plans, &*starts, &*outs);
        pool.run(total, |i| {
            let pi = starts.partition_point(|&s| s <= i) - 1;
            let (p, task) = (&products[pi], i - starts[pi]);
            let a = &prepared[pi];
            match plans[pi] {
                Plan::Groups {
                    per_task,
                    group_tasks,
                } => x8_task(p, a, &outs[pi], per_task, group_tasks, task),
                Plan::Quantized { chunk, tile } => {
                    quantized_task(p, &a.act, &outs[pi], chunk, tile, task)
                }
                Plan::Unpacked { chunk } => unpacked_task(p, &a.act, &outs[pi], chunk, task),
                Plan::Float { chunk, row_chunk } => {
                    float_task(p, &outs[pi], chunk, row_chunk, task)
                }
                Plan::InMajor { chunk } => in_major_task(p, &outs[pi], chunk, task),
            }
        });
    });
}

/// Every product's activation rows quantized to its weight type's dot-product partner, in one
/// pool job (tasks of [`ACT_ROWS_PER_TASK`] rows), and the block sums where the group kernels
/// take them.
fn quantize_activations(
    pool: &ThreadPool,
    products: &[Product<'_>],
    plans: &[Plan],
    prepared: &mut [Activations],
    starts: &mut Vec<usize>,
    acts: &mut Vec<SharedMut<u8>>,
) {
    // Task i quantizes rows of product p: starts[p] ≤ i < starts[p + 1].
    starts.clear();
    starts.push(0);
    for ((p, plan), a) in products.iter().zip(plans).zip(prepared.iter_mut()) {
        let tasks = if plan.quantizes() {
            let row_bytes = p.w.dtype.vec_dot_type().bytes_for(p.w.in_features);
            // Every byte of the first n_rows rows is written below: grow the buffer without
            // clearing it (`memset`, among whose callers this was, held ~2% of a pp512
            // profile).
            let need = p.n_rows * row_bytes;
            if a.act.len() < need {
                a.act.resize(need, 0);
            }
            p.n_rows.div_ceil(ACT_ROWS_PER_TASK)
        } else {
            0
        };
        starts.push(starts[starts.len() - 1] + tasks);
    }
    let total = starts[starts.len() - 1];
    acts.clear();
    acts.extend(prepared.iter_mut().map(|a| SharedMut::new(&mut a.act)));
    let (starts, acts) = (&*starts, &*acts);
    pool.run(total, |i| {
        let pi = starts.partition_point(|&s| s <= i) - 1;
        let (p, c) = (&products[pi], i - starts[pi]);
        let (k, at) = (p.w.in_features, p.w.dtype.vec_dot_type());
        let row_bytes = at.bytes_for(k);
        for t in c * ACT_ROWS_PER_TASK..((c + 1) * ACT_ROWS_PER_TASK).min(p.n_rows) {
            // SAFETY: tasks quantize disjoint rows of their product's buffer.
            let ar = unsafe { acts[pi].slice(t * row_bytes, row_bytes) };
            quant::quantize_activation(at, &p.x[t * k..(t + 1) * k], ar);
        }
    });
    for ((p, plan), a) in products.iter().zip(plans).zip(prepared.iter_mut()) {
        // The group kernels that take unsigned quants (Q4_0, Q5_0; Q8_0 and IQ4_NL where the
        // CPU has VNNI) subtract their offset times each block's sum: one pass here instead of
        // once per row group.
        a.sums.clear();
        if matches!(plan, Plan::Groups { .. }) && quant::x8_wants_block_sums(p.w.dtype) {
            let k = p.w.in_features;
            let a_row = p.w.dtype.vec_dot_type().bytes_for(k);
            for t in 0..p.n_rows {
                quant::q8_0_block_sums(&a.act[t * a_row..(t + 1) * a_row], k, &mut a.sums);
            }
        }
    }
}

/// Task `task` of a product with an `OutMajorX8` matrix, given its activations quantized:
/// a run of `per_task` row groups and, per group, every four activation rows in one
/// group-kernel call (the rest one by one, for the same bits); where `has_x16_kernel`, two
/// groups per call (an odd last group alone), and eight activation rows per call where the
/// type's 512-bit kernel takes them (`x16_rows_per_call`). Task `group_tasks` is the tail rows
/// (fewer than eight, in the file's layout), by the one-row kernel.
fn x8_task(
    p: &Product<'_>,
    a: &Activations,
    out: &SharedMut<f32>,
    per_task: usize,
    group_tasks: usize,
    task: usize,
) {
    use quant::repack::GROUP;
    let (w, n_rows) = (&p.w, p.n_rows);
    let (k, n) = (w.in_features, w.out_features);
    let a_row = w.dtype.vec_dot_type().bytes_for(k);
    let act_row = |t: usize| &a.act[t * a_row..(t + 1) * a_row];
    // Row t's block sums (empty for the types that take none).
    let nb = k / w.dtype.block_size();
    let sum_row = |t: usize| {
        if a.sums.is_empty() {
            &[][..]
        } else {
            &a.sums[t * nb..(t + 1) * nb]
        }
    };
    let w_row = w.dtype.bytes_for(k);
    let group_bytes = GROUP * w_row;
    let groups = n / GROUP;
    let put = |t: usize, o: usize, v: f32| {
        // SAFETY: tasks own disjoint output columns o.
        unsafe { out.slice(t * n + o, 1)[0] = v };
    };
    if task == group_tasks {
        for o in groups * GROUP..n {
            let wr = &w.bytes[o * w_row..(o + 1) * w_row];
            for t in 0..n_rows {
                put(t, o, quant::vec_dot(w.dtype, wr, act_row(t), k));
            }
        }
        return;
    }
    let first = task * per_task;
    // No software prefetch of whole groups here: a group is one contiguous run of bytes, and
    // asking for groups ahead made Scout-shaped decode ~10% slower (23.7 vs 21.3 tok/s at
    // Q4_K_M, alternating runs). The one-row kernels ask for their next bytes themselves.
    let end = (first + per_task).min(groups);
    let group = |gi: usize| &w.bytes[gi * group_bytes..(gi + 1) * group_bytes];
    let x16 = quant::has_x16_kernel(w.dtype);
    let rows8 = quant::x16_rows_per_call(w.dtype) == 8;
    let mut gi = first;
    while gi < end {
        let g = group(gi);
        if x16 && gi + 1 < end {
            // Two groups side by side in 512-bit registers: sixteen weight rows per call.
            let g1 = group(gi + 1);
            // Output columns gi·8.. of the two groups are sixteen adjacent ones.
            let emit = |t: usize, v: &[[f32; 16]]| {
                for (i, vi) in v.iter().enumerate() {
                    // SAFETY: tasks own disjoint output columns (whole groups).
                    unsafe {
                        out.slice((t + i) * n + gi * GROUP, 2 * GROUP)
                            .copy_from_slice(vi)
                    };
                }
            };
            let mut t = 0;
            if rows8 {
                while t + 8 <= n_rows {
                    let rows: [usize; 8] = std::array::from_fn(|i| t + i);
                    let (a8, s8) = (rows.map(act_row), rows.map(sum_row));
                    emit(t, &quant::vec_dot_x16_sums(w.dtype, g, g1, a8, s8, k));
                    t += 8;
                }
            }
            while t + 4 <= n_rows {
                let rows = [t, t + 1, t + 2, t + 3];
                let (a4, s4) = (rows.map(act_row), rows.map(sum_row));
                emit(t, &quant::vec_dot_x16_sums(w.dtype, g, g1, a4, s4, k));
                t += 4;
            }
            for t in t..n_rows {
                let (a1, s1) = ([act_row(t)], [sum_row(t)]);
                emit(t, &quant::vec_dot_x16_sums(w.dtype, g, g1, a1, s1, k));
            }
            gi += 2;
            continue;
        }
        let mut t = 0;
        while t + 4 <= n_rows {
            let rows = [t, t + 1, t + 2, t + 3];
            let v = quant::vec_dot_x8_sums(w.dtype, g, rows.map(act_row), rows.map(sum_row), k);
            for (i, vi) in v.iter().enumerate() {
                // SAFETY: tasks own disjoint output columns (whole groups).
                unsafe {
                    out.slice((t + i) * n + gi * GROUP, GROUP)
                        .copy_from_slice(vi)
                };
            }
            t += 4;
        }
        for t in t..n_rows {
            let [v] = quant::vec_dot_x8_sums(w.dtype, g, [act_row(t)], [sum_row(t)], k);
            // SAFETY: tasks own disjoint output columns (whole groups).
            unsafe { out.slice(t * n + gi * GROUP, GROUP).copy_from_slice(&v) };
        }
        gi += 1;
    }
}

/// Chunk `c` (`chunk` output columns) of a product with a quantized `OutMajor` matrix, given
/// its activations quantized (`act`), in tiles of `tile` weight rows.
fn quantized_task(
    p: &Product<'_>,
    act: &[u8],
    out: &SharedMut<f32>,
    chunk: usize,
    tile: usize,
    c: usize,
) {
    let (w, n_rows) = (&p.w, p.n_rows);
    let (k, n) = (w.in_features, w.out_features);
    let row_bytes = w.dtype.vec_dot_type().bytes_for(k);
    let w_row = w.dtype.bytes_for(k);
    let act_row = |t: usize| &act[t * row_bytes..(t + 1) * row_bytes];
    let outputs = c * chunk..((c + 1) * chunk).min(n);
    // Weight rows are requested PREFETCH_ROWS ahead of the tile being read (into L2): the
    // hardware prefetcher alone leaves the memory bus partly idle here. Not where every
    // activation row goes through a one-row kernel (fewer than four) that asks for its weights
    // itself: the two together were slower.
    let l2_prefetch = !(n_rows < 4 && quant::vec_dot_prefetches(w.dtype));
    let mut fetched = outputs.start;
    for first in outputs.clone().step_by(tile) {
        let rows = first..(first + tile).min(outputs.end);
        let want = (rows.end + PREFETCH_ROWS).min(n);
        if l2_prefetch && fetched < want {
            prefetch(&w.bytes[fetched * w_row..want * w_row]);
            fetched = want;
        }
        let wr = |o: usize| &w.bytes[o * w_row..(o + 1) * w_row];
        let put = |t: usize, o: usize, v: f32| {
            // SAFETY: chunks own disjoint output columns o.
            unsafe { out.slice(t * n + o, 1)[0] = v };
        };
        // Each weight row's blocks are unpacked once for four activation rows; the rest one by
        // one.
        let mut t = 0;
        let tile_bytes = &w.bytes[rows.start * w_row..rows.end * w_row];
        let mut v = [[0.0f32; 4]; MAX_TILE_ROWS];
        while t + 4 <= n_rows {
            let ar = [t, t + 1, t + 2, t + 3].map(act_row);
            let v = &mut v[..rows.len()];
            quant::vec_dot_x4_rows(w.dtype, tile_bytes, ar, k, v);
            for (o, vo) in rows.clone().zip(v.iter()) {
                (0..4).for_each(|i| put(t + i, o, vo[i]));
            }
            t += 4;
        }
        for t in t..n_rows {
            for o in rows.clone() {
                put(t, o, quant::vec_dot(w.dtype, wr(o), act_row(t), k));
            }
        }
    }
}

/// Chunk `c` of a product planned [`Plan::Unpacked`] (the IQ1–IQ3 grids), given its
/// activations quantized (`act`): each eight weight rows of the chunk unpacked once
/// ([`quant::unpack_x8`]) and shared by every activation row, four at a time; the chunk's last
/// rows (fewer than eight) pair by pair. The same bits as the pairwise kernels.
fn unpacked_task(p: &Product<'_>, act: &[u8], out: &SharedMut<f32>, chunk: usize, c: usize) {
    let (w, n_rows) = (&p.w, p.n_rows);
    let (k, n) = (w.in_features, w.out_features);
    let row_bytes = w.dtype.vec_dot_type().bytes_for(k);
    let w_row = w.dtype.bytes_for(k);
    let act_row = |t: usize| &act[t * row_bytes..(t + 1) * row_bytes];
    let outputs = c * chunk..((c + 1) * chunk).min(n);
    let put = |t: usize, o: usize, v: f32| {
        // SAFETY: chunks own disjoint output columns o.
        unsafe { out.slice(t * n + o, 1)[0] = v };
    };
    UNPACKED.with_borrow_mut(|u| {
        // Every byte is written by unpack_x8 before it is read: no clearing.
        u.resize(quant::unpacked_x8_bytes(k), 0);
        let mut o = outputs.start;
        while o + 8 <= outputs.end {
            quant::unpack_x8(w.dtype, &w.bytes[o * w_row..(o + 8) * w_row], k, u);
            let emit = |t: usize, v: &[[f32; 8]]| {
                for (i, vi) in v.iter().enumerate() {
                    for (m, &x) in vi.iter().enumerate() {
                        put(t + i, o + m, x);
                    }
                }
            };
            let mut t = 0;
            while t + 4 <= n_rows {
                let rows = [t, t + 1, t + 2, t + 3].map(act_row);
                emit(t, &quant::vec_dot_unpacked_x8(w.dtype, u, rows, k));
                t += 4;
            }
            for t in t..n_rows {
                emit(t, &quant::vec_dot_unpacked_x8(w.dtype, u, [act_row(t)], k));
            }
            o += 8;
        }
        for o in o..outputs.end {
            let wr = &w.bytes[o * w_row..(o + 1) * w_row];
            for t in 0..n_rows {
                put(t, o, quant::vec_dot(w.dtype, wr, act_row(t), k));
            }
        }
    });
}

/// Task `task` of a product with a float `OutMajor` matrix: chunk `task / row_tasks` of
/// `chunk` output columns against run `task % row_tasks` of `row_chunk` activation rows, each
/// weight row decoded once, then dotted with each of the run's rows (every output is one
/// [`dot`], however the product is cut).
fn float_task(p: &Product<'_>, out: &SharedMut<f32>, chunk: usize, row_chunk: usize, task: usize) {
    let (w, x, n_rows) = (&p.w, p.x, p.n_rows);
    let (k, n) = (w.in_features, w.out_features);
    let row_tasks = n_rows.div_ceil(row_chunk);
    let (c, first) = (task / row_tasks, task % row_tasks * row_chunk);
    let rows = first..(first + row_chunk).min(n_rows);
    ROW.with_borrow_mut(|row| {
        row.clear();
        row.resize(k, 0.0);
        for o in c * chunk..((c + 1) * chunk).min(n) {
            w.decode_row(o, row);
            for t in rows.clone() {
                let v = dot(&x[t * k..(t + 1) * k], row);
                // SAFETY: tasks own disjoint (output column, activation row) pairs.
                unsafe { out.slice(t * n + o, 1)[0] = v };
            }
        }
    })
}

/// Chunk `c` of a product with an `InMajor` (float) matrix: each input row of the chunk's
/// columns decoded once and added, times each activation, to every output row.
fn in_major_task(p: &Product<'_>, out: &SharedMut<f32>, chunk: usize, c: usize) {
    let (w, x, n_rows) = (&p.w, p.x, p.n_rows);
    let (k, n) = (w.in_features, w.out_features);
    let cols = c * chunk..((c + 1) * chunk).min(n);
    let width = cols.len();
    let elem = w.dtype.bytes_for(1);
    ROW.with_borrow_mut(|row| {
        row.clear();
        row.resize(width, 0.0);
        for t in 0..n_rows {
            // SAFETY: chunks own disjoint output column ranges.
            unsafe { out.slice(t * n + cols.start, width).fill(0.0) };
        }
        for i in 0..k {
            let start = (i * n + cols.start) * elem;
            decode_into(w.dtype, &w.bytes[start..start + width * elem], row);
            for t in 0..n_rows {
                // SAFETY: as above.
                let o = unsafe { out.slice(t * n + cols.start, width) };
                axpy(x[t * k + i], row, o);
            }
        }
    });
}

thread_local! {
    /// One weight row in the file's layout (decoding a row of a repacked matrix).
    static ROW_BYTES: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The buffers of the current [`matmul_many`] call (kept for the next: once warm, a decode
    /// step allocates nothing).
    static JOB: std::cell::RefCell<Job> = std::cell::RefCell::new(Job::default());
    /// One decoded weight row (float weights), per worker thread.
    static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Eight weight rows unpacked by [`quant::unpack_x8`], per worker thread.
    static UNPACKED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Fewest activation rows for which [`unpacked_task`] unpacks weights: unpacking eight rows
/// costs about what four activation rows cost through the pairwise kernels.
const UNPACK_MIN_ROWS: usize = 8;

/// Activation rows quantized per pool task (a batch's rows are quantized in parallel).
const ACT_ROWS_PER_TASK: usize = 16;

/// Bytes of weight rows per tile of a batched quantized product (with four activation rows,
/// well inside a 32–48 KiB L1 data cache for rows up to ~2k values).
const TILE_WEIGHT_BYTES: usize = 12 * 1024;

/// Most weight rows in one tile.
const MAX_TILE_ROWS: usize = 16;

/// How many weight rows ahead of the current one the quantized product asks for.
const PREFETCH_ROWS: usize = 16;

/// Ask the CPU to start loading `bytes` into its L2 cache (a hint; never faults; nothing where
/// the instruction set has no such hint).
#[inline]
fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    avx2::prefetch_l2(bytes);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Output columns per task: a few tasks per thread for balance, at least 16 columns each.
fn chunk_size(n: usize, threads: usize) -> usize {
    n.div_ceil(threads * 4).max(16)
}

/// Dot product of the common length of `a` and `b`, in one fixed order: element `i` goes to
/// lane `i % 8` of eight running sums (whole groups of eight), the lanes are added as
/// `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))` (one AVX register folded in halves), then the
/// leftover elements in order. The AVX kernel gives the same bits, several times faster than
/// one running sum.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if quant::has_avx2() {
        // SAFETY: has_avx2() confirmed AVX at run time; both slices hold n values.
        return unsafe { avx2::dot(&a[..n], &b[..n]) };
    }
    scalar::dot(&a[..n], &b[..n])
}

/// `y += a·x`.
pub fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (yi, xi) in y.iter_mut().zip(x) {
        *yi += a * xi;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn both_layouts_compute_the_same_product() {
        // W as [out=3, in=2] and its transpose as [in=2, out=3].
        let w_out = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w_in = [1.0, 3.0, 5.0, 2.0, 4.0, 6.0];
        let x = [1.0, -1.0, 0.5, 2.0];
        let (b_out, b_in) = (bytes(&w_out), bytes(&w_in));
        let a = MatRef::new(&b_out, DType::F32, 2, 3, Layout::OutMajor).unwrap();
        let b = MatRef::new(&b_in, DType::F32, 2, 3, Layout::InMajor).unwrap();
        let (mut ya, mut yb) = ([f32::NAN; 6], [f32::NAN; 6]); // every output written
        matmul(&x, 2, &a, &mut ya);
        matmul(&x, 2, &b, &mut yb);
        assert_eq!(ya, [-1.0, -1.0, -1.0, 4.5, 9.5, 14.5]);
        assert_eq!(ya, yb);
    }

    /// The AVX build of `dot` gives the portable build's bits, for every length up to 70
    /// (whole lane groups and ragged tails) and mismatched lengths.
    #[test]
    fn dot_is_the_same_on_every_build() {
        use crate::testing::rand_vec;
        for n in 0..70 {
            let (a, b) = (rand_vec(n, 5, 3.0), rand_vec(n + 3, 6, 0.7));
            let want = scalar::dot(&a, &b[..n]);
            assert_eq!(dot(&a, &b).to_bits(), want.to_bits(), "n = {n}");
            assert_eq!(dot(&b, &a).to_bits(), want.to_bits(), "n = {n}, swapped");
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!(
                (want as f64 - exact).abs() < 1e-4 * (1.0 + n as f64),
                "n = {n}"
            );
        }
    }

    #[test]
    fn rejects_wrong_byte_length() {
        assert!(MatRef::new(&[0u8; 7], DType::F32, 1, 2, Layout::OutMajor).is_none());
    }
}

#[cfg(test)]
mod quantized_tests {
    use super::*;
    use crate::testing::rand_vec;

    /// Quantized matmul equals per-element scalar dot products, for any thread count and any
    /// batch size (each output is computed the same way whatever else is in the batch): 11 rows
    /// take the tiled path (two groups of four and three single rows), one row the decode path.
    #[test]
    fn quantized_matmul_is_thread_and_batch_invariant() {
        // 45 outputs: with one thread, chunks of 16 (two groups of eight for the unpacked
        // kernels) and a last chunk of 13 (a group and a tail).
        let (k, n, rows) = (512, 45, 11);
        for wt in [
            DType::Q8_0,
            DType::Q4_0,
            DType::Q5_0,
            DType::Q4K,
            DType::Q6K,
            DType::Q5K,
            DType::Q2K,
            DType::Q3K,
            // Eleven rows: the IQ types' unpacked kernels (eight weight rows at a time).
            DType::IQ2S,
            DType::IQ3XXS,
            DType::IQ3S,
            DType::IQ1M,
        ] {
            let wf = rand_vec(k * n, 3, 1.0);
            let mut wq = vec![0u8; wt.bytes_for(k * n)];
            quant::quantize(wt, &wf, &mut wq);
            let w = MatRef::new(&wq, wt, k, n, Layout::OutMajor).unwrap();
            let x = rand_vec(rows * k, 4, 1.0);
            // NaN-filled: every output must be written (callers reuse buffers unzeroed).
            let mut one = vec![f32::NAN; rows * n];
            matmul_with(&ThreadPool::new(1), &x, rows, &w, &mut one);
            assert!(
                one.iter().all(|v| v.is_finite()),
                "{wt}: outputs left unwritten"
            );
            let mut three = vec![f32::NAN; rows * n];
            matmul_with(&ThreadPool::new(3), &x, rows, &w, &mut three);
            assert_eq!(one, three, "{wt}: thread count changed results");
            let at = wt.vec_dot_type();
            let w_row = wt.bytes_for(k);
            for t in 0..rows {
                let mut single = vec![0.0; n];
                let xt = &x[t * k..(t + 1) * k];
                matmul_with(&ThreadPool::new(2), xt, 1, &w, &mut single);
                assert_eq!(
                    &one[t * n..(t + 1) * n],
                    &single[..],
                    "{wt}: batch changed row {t}"
                );
                let mut a = vec![0u8; at.bytes_for(k)];
                quant::quantize_activation(at, xt, &mut a);
                for o in 0..n {
                    let wr = &wq[o * w_row..(o + 1) * w_row];
                    let want = quant::vec_dot_scalar(wt, wr, &a, k);
                    assert_eq!(one[t * n + o].to_bits(), want.to_bits(), "{wt}: ({t}, {o})");
                }
            }
        }
    }

    /// A batch of products of every layout (repacked groups with a tail, quantized `[out, in]`
    /// with and without tiles, float `[out, in]` and `[in, out]`), row counts 0 to 9, gives
    /// each product the bits it gets alone, on 1 and 3 threads.
    #[test]
    fn many_products_equal_each_alone() {
        let k = 256;
        let mut mats = Vec::new();
        for (i, (wt, n)) in [
            (DType::Q4K, 21),
            (DType::Q5_0, 16),
            (DType::Q6K, 13),
            (DType::Q8_0, 9),
            (DType::F16, 11),
            (DType::F32, 7),
        ]
        .into_iter()
        .enumerate()
        {
            let mut wq = vec![0u8; wt.bytes_for(k * n)];
            let wf = rand_vec(k * n, 40 + i as u64, 1.0);
            quant::quantize(wt, &wf, &mut wq);
            let plain = MatRef::new(&wq, wt, k, n, Layout::OutMajor).unwrap();
            let packed = plain.repacked();
            mats.push((wq.clone(), wt, n, Layout::OutMajor));
            if let Some(p) = packed {
                mats.push((p, wt, n, Layout::OutMajorX8));
            }
            if wt == DType::F32 {
                // The transpose, input-major.
                let t: Vec<f32> = (0..k * n).map(|j| wf[(j % n) * k + j / n]).collect();
                let mut tb = vec![0u8; 4 * k * n];
                quant::quantize(wt, &t, &mut tb);
                mats.push((tb, wt, n, Layout::InMajor));
            }
        }
        let refs: Vec<MatRef<'_>> = mats
            .iter()
            .map(|(b, t, n, l)| MatRef::new(b, *t, k, *n, *l).unwrap())
            .collect();
        let rows: Vec<usize> = (0..refs.len())
            .map(|i| [1, 9, 0, 4, 5, 2, 7][i % 7])
            .collect();
        let xs: Vec<Vec<f32>> = rows
            .iter()
            .enumerate()
            .map(|(i, &r)| rand_vec(r * k, 90 + i as u64, 1.0))
            .collect();
        for threads in [1, 3] {
            let pool = ThreadPool::new(threads);
            let mut outs: Vec<Vec<f32>> = refs
                .iter()
                .zip(&rows)
                .map(|(w, &r)| vec![f32::NAN; r * w.out_features])
                .collect();
            let mut products: Vec<Product<'_>> = refs
                .iter()
                .zip(&rows)
                .zip(&xs)
                .zip(outs.iter_mut())
                .map(|(((w, &n_rows), x), out)| Product {
                    x,
                    n_rows,
                    w: *w,
                    out,
                })
                .collect();
            matmul_many_with(&pool, &mut products);
            for (i, w) in refs.iter().enumerate() {
                let mut alone = vec![0.0; rows[i] * w.out_features];
                matmul_with(&pool, &xs[i], rows[i], w, &mut alone);
                let same = alone
                    .iter()
                    .zip(&outs[i])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "product {i} ({} {:?}), {threads} threads",
                    w.dtype, w.layout
                );
            }
        }
    }

    /// A float product with few output columns (a router's) and many rows, cut by rows over
    /// the pool, gives every row the bits it has alone.
    #[test]
    fn few_column_float_products_split_by_rows() {
        let (k, n, rows) = (200, 16, 77);
        for wt in [DType::F32, DType::F16, DType::BF16] {
            let mut wq = vec![0u8; wt.bytes_for(k * n)];
            quant::quantize(wt, &rand_vec(k * n, 5, 1.0), &mut wq);
            let w = MatRef::new(&wq, wt, k, n, Layout::OutMajor).unwrap();
            let x = rand_vec(rows * k, 6, 1.0);
            let pool = ThreadPool::new(3);
            let mut out = vec![f32::NAN; rows * n];
            let p = Product {
                x: &x,
                n_rows: rows,
                w,
                out: &mut out,
            };
            assert!(Plan::new(&p, 3).n_tasks(&p) > 3, "{wt}: cut by rows");
            matmul_with(&pool, &x, rows, &w, &mut out);
            for t in 0..rows {
                let mut alone = vec![f32::NAN; n];
                matmul_with(&pool, &x[t * k..(t + 1) * k], 1, &w, &mut alone);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&out[t * n..(t + 1) * n]),
                    bits(&alone),
                    "{wt}, row {t}"
                );
            }
        }
    }

    /// A matrix repacked into interleaved row groups gives the file layout's bits, for every
    /// batch size 1..=9 (group calls of eight rows where the 512-bit kernel takes them, four,
    /// single rows, mixes), 1 and 3 threads, and output counts with and without tail rows; its
    /// rows decode to the file's values.
    #[test]
    fn repacked_matmul_equals_the_file_layout() {
        let k = 768;
        for (wt, n) in crate::quant::repack::GROUP_TYPES
            .into_iter()
            .flat_map(|t| [(t, 8), (t, 21), (t, 40), (t, 56)])
        {
            let mut wq = vec![0u8; wt.bytes_for(k * n)];
            quant::quantize(wt, &rand_vec(k * n, 13, 1.0), &mut wq);
            let plain = MatRef::new(&wq, wt, k, n, Layout::OutMajor).unwrap();
            let packed_bytes = plain.repacked().unwrap();
            let packed = MatRef::new(&packed_bytes, wt, k, n, Layout::OutMajorX8).unwrap();
            for rows in 1..=9 {
                let x = rand_vec(rows * k, 14 + rows as u64, 1.0);
                let mut want = vec![0.0; rows * n];
                matmul_with(&ThreadPool::new(1), &x, rows, &plain, &mut want);
                for threads in [1, 3] {
                    // NaN-filled: every output must be written.
                    let mut got = vec![f32::NAN; rows * n];
                    matmul_with(&ThreadPool::new(threads), &x, rows, &packed, &mut got);
                    assert!(
                        got.iter().all(|v| v.is_finite()),
                        "{wt}: outputs left unwritten"
                    );
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{wt}: n {n}, rows {rows}, threads {threads}");
                }
            }
            let (mut a, mut b) = (vec![0.0; k], vec![0.0; k]);
            for r in 0..n {
                plain.decode_row(r, &mut a);
                packed.decode_row(r, &mut b);
                assert_eq!(a, b, "{wt}: n {n}: row {r} decodes differently");
            }
        }
    }

    /// The group kernels at their integer extremes (every quant and scale at its maximum,
    /// activations at ±127, which the i16 sums of the kernels must hold without saturating)
    /// equal the file layout's scalar reference.
    #[test]
    fn group_kernels_hold_extreme_blocks() {
        let k = 512;
        for t in crate::quant::repack::GROUP_TYPES {
            for sign in [1i8, -1] {
                let nb = k / t.block_size();
                let mut row = vec![0u8; t.bytes_for(k)];
                for blk in row.chunks_exact_mut(t.type_size()) {
                    // The IQ4 types' largest magnitudes are at index 0 (−127) and, for IQ4_XS,
                    // block scale 0 (−32); Q6_K's at quant 0 (−32) and 63 (+31), one per sign.
                    let low =
                        matches!(t, DType::IQ4NL | DType::IQ4XS) || (t == DType::Q6K && sign < 0);
                    blk.fill(if low { 0 } else { 0xFF });
                    // Finite scales (f16 1.0; Q4_K's dmin 0.5; Q6_K's `d` last, and its
                    // sub-block scales at their largest magnitude, −128).
                    let one = half::f16::from_f32(1.0).to_le_bytes();
                    if t == DType::Q6K {
                        blk[192..208].fill(0x80);
                        blk[208..210].copy_from_slice(&one);
                    } else {
                        blk[0..2].copy_from_slice(&one);
                    }
                    if t == DType::Q4K {
                        blk[2..4].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
                    }
                    if t == DType::Q8_0 {
                        blk[2..34].fill((127 * sign) as u8);
                    }
                }
                let w = row.repeat(16);
                let g = quant::repack::repack(t, &w, 16, k);
                let (g0, g1) = g.split_at(g.len() / 2);
                let at = t.vec_dot_type();
                let mut a = vec![0u8; at.bytes_for(k)];
                // All equal (every product at its largest), or mixed signs.
                let x: Vec<f32> = (0..k)
                    .map(|i| if sign < 0 && i % 3 == 0 { -1.0 } else { 1.0 })
                    .collect();
                quant::quantize_activation(at, &x, &mut a);
                let want = quant::vec_dot_scalar(t, &row, &a, k);
                let [got] = quant::vec_dot_x8(t, g0, [&a[..]], k);
                let [got4, ..] = quant::vec_dot_x8(t, g0, [&a[..]; 4], k);
                for m in 0..8 {
                    assert_eq!(got[m].to_bits(), want.to_bits(), "{t} {sign}: row {m}");
                    assert_eq!(got4[m].to_bits(), want.to_bits(), "{t} {sign}: row {m}, x4");
                }
                if quant::has_x16_kernel(t) {
                    let mut sums = Vec::new();
                    if quant::x8_wants_block_sums(t) {
                        quant::q8_0_block_sums(&a, k, &mut sums);
                    }
                    let [got16, ..] =
                        quant::vec_dot_x16_sums(t, g0, g1, [&a[..]; 4], [&sums[..]; 4], k);
                    for (m, x) in got16.iter().enumerate() {
                        assert_eq!(x.to_bits(), want.to_bits(), "{t} {sign}: row {m}, x16");
                    }
                }
                assert!(
                    want.is_finite() && want != 0.0,
                    "{t}: {want} over {nb} blocks"
                );
            }
        }
    }

    /// The group kernel this CPU runs equals the scalar reference bit for bit, for one to four
    /// activation rows, on random weights and activations of 1..=5 super-blocks (without AVX2,
    /// or with `HERD_NO_SIMD`, both sides are the scalar reference).
    #[test]
    fn group_kernel_equals_the_scalar_reference() {
        fn check<const N: usize>(t: DType, g: &[u8], acts: &[Vec<u8>], k: usize) {
            let a: [&[u8]; N] = std::array::from_fn(|r| &acts[r][..]);
            let got = quant::vec_dot_x8(t, g, a, k);
            let want = quant::vec_dot_x8_scalar(t, g, a, k);
            for (gr, wr) in got.iter().zip(&want) {
                for (x, y) in gr.iter().zip(wr) {
                    assert_eq!(x.to_bits(), y.to_bits(), "{t}: N {N}, k {k}");
                }
            }
        }
        for t in crate::quant::repack::GROUP_TYPES {
            for nb in 1..=5 {
                let k = t.block_size() * nb;
                let mut wq = vec![0u8; t.bytes_for(8 * k)];
                quant::quantize(t, &rand_vec(8 * k, 20 + nb as u64, 3.0), &mut wq);
                let g = quant::repack::repack(t, &wq, 8, k);
                let at = t.vec_dot_type();
                let acts: Vec<Vec<u8>> = (0..4)
                    .map(|r| {
                        let mut a = vec![0u8; at.bytes_for(k)];
                        let x = rand_vec(k, 40 + r, 1.0 + r as f32);
                        quant::quantize_activation(at, &x, &mut a);
                        a
                    })
                    .collect();
                check::<1>(t, &g, &acts, k);
                check::<2>(t, &g, &acts, k);
                check::<3>(t, &g, &acts, k);
                check::<4>(t, &g, &acts, k);
            }
        }
    }
}
