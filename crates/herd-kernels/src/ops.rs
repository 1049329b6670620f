//! Element-wise and per-row operations of transformer layers, in `f32`.

/// RMS norm of each row of `x` (rows of `weight.len()`) in place:
/// `x ← x / sqrt(mean(x²) + eps) · weight`.
pub fn rms_norm(x: &mut [f32], weight: &[f32], eps: f32) {
    for row in x.chunks_exact_mut(weight.len()) {
        let scale = rms_scale(row, eps);
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * scale * w;
        }
    }
}

/// RMS norm without a weight, applied to each `dim`-sized piece of `x` (per attention head).
pub fn rms_norm_unweighted(x: &mut [f32], dim: usize, eps: f32) {
    for piece in x.chunks_exact_mut(dim) {
        let scale = rms_scale(piece, eps);
        for v in piece.iter_mut() {
            *v *= scale;
        }
    }
}

/// `1/sqrt(mean(x²) + eps)`, the sum of squares accumulated in f64 (as ggml does): residual
/// streams reach magnitudes (Gemma's) where an f32 sum loses digits the norm then amplifies.
fn rms_scale(row: &[f32], eps: f32) -> f32 {
    let sum: f64 = row.iter().map(|&v| f64::from(v * v)).sum();
    let mean_sq = (sum / row.len() as f64) as f32;
    1.0 / (mean_sq + eps).sqrt()
}

/// `x·sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Rotary embedding on interleaved pairs (complex-number form; ggml's "normal" mode): each head
/// of `dim` values is read as pairs `(x[2j], x[2j+1])`, each rotated by `angle_j = pos·inv_freq[j]`.
pub fn rope_interleaved(x: &mut [f32], dim: usize, pos: usize, inv_freq: &[f32]) {
    debug_assert_eq!(inv_freq.len() * 2, dim);
    // Angles in f32, as the reference computes `positions · inv_freq` in f32.
    let p = pos as f32;
    for head in x.chunks_exact_mut(dim) {
        for (j, &f) in inv_freq.iter().enumerate() {
            let (sin, cos) = (p * f).sin_cos();
            let (a, b) = (head[2 * j], head[2 * j + 1]);
            head[2 * j] = a * cos - b * sin;
            head[2 * j + 1] = a * sin + b * cos;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_unit_row() {
        let mut x = [3.0, 4.0];
        rms_norm(&mut x, &[1.0, 2.0], 0.0);
        let s = (12.5f32).sqrt();
        assert_eq!(x, [3.0 / s, 8.0 / s]);
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        let mut x = [1.0, 0.0, 0.0, 1.0];
        rope_interleaved(&mut x, 4, 1, &[std::f32::consts::FRAC_PI_2, 0.0]);
        assert!((x[0]).abs() < 1e-6 && (x[1] - 1.0).abs() < 1e-6);
        assert_eq!(&x[2..], &[0.0, 1.0]);
    }
}

/// Rotary embedding in the rotate-half (GPT-NeoX) form: within each head of `dim` values, pair
/// `j` is `(x[j], x[j + dim/2])`, rotated by `angle_j = pos·inv_freq[j]`.
pub fn rope_neox(x: &mut [f32], dim: usize, pos: usize, inv_freq: &[f32]) {
    debug_assert_eq!(inv_freq.len() * 2, dim);
    let half = dim / 2;
    let p = pos as f32;
    for head in x.chunks_exact_mut(dim) {
        for (j, &f) in inv_freq.iter().enumerate() {
            let (sin, cos) = (p * f).sin_cos();
            let (a, b) = (head[j], head[j + half]);
            head[j] = a * cos - b * sin;
            head[j + half] = b * cos + a * sin;
        }
    }
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

/// GELU the way ggml's CPU backend evaluates it (`GGML_GELU_FP16`): the input rounded to f16,
/// looked up in a table of f16 results; inputs beyond ±10 pass through (or give 0). llama.cpp
/// runs every GELU model this way, so GGUF models use it to give llama.cpp's numbers.
pub fn gelu_tanh_f16_table(x: f32) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        let xh = half::f16::from_f32(x).to_f32();
        const SQRT_2_OVER_PI: f32 = 0.797_884_6;
        let g = 0.5 * xh * (1.0 + (SQRT_2_OVER_PI * xh * (1.0 + 0.044715 * xh * xh)).tanh());
        half::f16::from_f32(g).to_f32()
    }
}

/// Soft-capping `c·tanh(x/c)` in place.
pub fn softcap(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = cap * (*v / cap).tanh();
    }
}

#[cfg(test)]
mod more_tests {
    use super::*;

    #[test]
    fn neox_rotates_halves() {
        let mut x = [1.0, 0.0, 0.0, 0.0];
        rope_neox(&mut x, 4, 1, &[std::f32::consts::FRAC_PI_2, 0.0]);
        assert!(x[0].abs() < 1e-6 && (x[2] - 1.0).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
    }
}
