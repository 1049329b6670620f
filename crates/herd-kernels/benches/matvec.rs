//! Quantized matrix-vector products (one decode step's shape), reported as GB/s of weights
//! streamed, next to a plain memory-read benchmark of this machine on the same run; and
//! matrix-matrix products (a prompt's shape), reported as multiply-adds per second.
//!
//! `cargo bench -p herd-kernels --bench matvec` (HERD_THREADS sets the thread count).

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use herd_kernels::matmul::matmul;
use herd_kernels::quant::{quantize, repack};
use herd_kernels::testing::rand_vec;
use herd_kernels::{DType, Layout, MatRef};

/// Read bandwidth: sum 512 MiB of u64 with a few independent accumulators, split over the
/// same pool the kernels use.
fn memory_read(c: &mut Criterion) {
    let words = 64 << 20;
    let data: Vec<u64> = (0..words as u64).collect();
    let pool = herd_kernels::pool::global();
    let threads = pool.n_threads();
    let mut g = c.benchmark_group("memory");
    g.throughput(Throughput::Bytes((words * 8) as u64));
    g.sample_size(10);
    g.bench_function(format!("read_{threads}t"), |b| {
        b.iter(|| {
            let chunk = words / threads;
            let sums: Vec<std::sync::atomic::AtomicU64> =
                (0..threads).map(|_| Default::default()).collect();
            pool.run(threads, |t| {
                let s = &data[t * chunk..(t + 1) * chunk];
                let mut acc = [0u64; 4];
                for w in s.chunks_exact(4) {
                    for k in 0..4 {
                        acc[k] = acc[k].wrapping_add(w[k]);
                    }
                }
                sums[t].store(
                    acc.iter().fold(0, |a, b| a.wrapping_add(*b)),
                    std::sync::atomic::Ordering::Relaxed,
                );
            });
            black_box(sums)
        })
    });
    g.finish();
}

fn matvec(c: &mut Criterion) {
    // Scout-shaped expert / attention matrix: 2048 in, 8192 out (decoding one token).
    let (k, n) = (2048, 8192);
    let w = rand_vec(k * n, 1, 1.0);
    let x = rand_vec(k, 2, 1.0);
    let mut g = c.benchmark_group("matvec_2048x8192");
    g.sample_size(20);
    for t in [DType::Q4K, DType::Q6K, DType::Q8_0, DType::Q4_0] {
        let mut q = vec![0u8; t.bytes_for(k * n)];
        quantize(t, &w, &mut q);
        let m = MatRef::new(&q, t, k, n, Layout::OutMajor).unwrap();
        let mut out = vec![0.0f32; n];
        g.throughput(Throughput::Bytes(q.len() as u64));
        g.bench_function(t.name(), |b| {
            b.iter(|| matmul(black_box(&x), 1, &m, &mut out))
        });
        // The interleaved layout the models load where the type has one.
        if let Some(packed) = m.repacked().filter(|_| repack::repack_at_load(t)) {
            let m = MatRef::new(&packed, t, k, n, Layout::OutMajorX8).unwrap();
            g.bench_function(format!("{}_x8", t.name()), |b| {
                b.iter(|| matmul(black_box(&x), 1, &m, &mut out))
            });
        }
    }
    g.finish();
}

fn gemm(c: &mut Criterion) {
    // A Scout-shaped 2048 × 2048 weight against 64 activation rows (prefill), in the file's
    // layout and, where the type has one, the interleaved layout the models load.
    let (k, n, rows) = (2048, 2048, 64);
    let w = rand_vec(k * n, 1, 1.0);
    let x = rand_vec(k * rows, 2, 1.0);
    let mut g = c.benchmark_group("gemm_2048x2048x64");
    g.sample_size(10);
    g.throughput(Throughput::Elements((k * n * rows) as u64));
    for t in [
        DType::Q4K,
        DType::Q6K,
        DType::Q8_0,
        DType::Q5_0,
        DType::IQ4NL,
        DType::IQ4XS,
    ] {
        let mut q = vec![0u8; t.bytes_for(k * n)];
        quantize(t, &w, &mut q);
        let m = MatRef::new(&q, t, k, n, Layout::OutMajor).unwrap();
        let mut out = vec![0.0f32; n * rows];
        g.bench_function(t.name(), |b| {
            b.iter(|| matmul(black_box(&x), rows, &m, &mut out))
        });
        // The interleaved layout where a model loaded here would hold it (Q6_K's needs
        // AVX-512 VNNI; elsewhere it would measure the scalar group reference).
        if let Some(packed) = m.repacked().filter(|_| repack::repack_at_load(t)) {
            let m = MatRef::new(&packed, t, k, n, Layout::OutMajorX8).unwrap();
            g.bench_function(format!("{}_x8", t.name()), |b| {
                b.iter(|| matmul(black_box(&x), rows, &m, &mut out))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, memory_read, matvec, gemm);
criterion_main!(benches);
