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

fn rms_scale(row: &[f32], eps: f32) -> f32 {
    let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (mean_sq + eps).sqrt()
}

/// `x·sigmoid(x)`.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Softmax of `x` in place (max-subtracted).
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in x.iter_mut() {
        *v /= sum;
    }
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
    fn softmax_sums_to_one() {
        let mut x = [1.0, 2.0, 3.0, f32::NEG_INFINITY];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[3], 0.0);
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_norm() {
        let mut x = [1.0, 0.0, 0.0, 1.0];
        rope_interleaved(&mut x, 4, 1, &[std::f32::consts::FRAC_PI_2, 0.0]);
        assert!((x[0]).abs() < 1e-6 && (x[1] - 1.0).abs() < 1e-6);
        assert_eq!(&x[2..], &[0.0, 1.0]);
    }
}
