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

/// How rotary angles and rotations are evaluated in f32: as transformers does (HF checkpoints)
/// or as ggml does (GGUF files, so that they compute llama.cpp's numbers).
#[derive(Clone, Debug, PartialEq)]
pub enum Rope {
    /// `θ_j = pos·inv_freq[j]`, rotated with separate products and sums.
    Table(Vec<f32>),
    /// ggml's `rope_cache_init`: `θ_0 = pos`, `θ_{j+1} = θ_j·theta_scale` by repeated f32
    /// multiplication (`theta_scale = base^(−2/dim)`), each angle times `freq_scale`; rotated
    /// with one fused multiply-add per output (what llama.cpp's compiled `rotate_pairs` does).
    Ggml { theta_scale: f32, freq_scale: f32 },
}

impl Rope {
    /// ggml's angles for rotary base `base` over `dim` values, linear scaling factor `factor`.
    pub fn ggml(base: f32, dim: usize, factor: f32) -> Self {
        Rope::Ggml {
            theta_scale: base.powf(-2.0 / dim as f32),
            freq_scale: 1.0 / factor,
        }
    }

    /// Rotate every head of `dim` values in `x` in the rotate-half (GPT-NeoX) form: pair `j` is
    /// `(x[j], x[j + dim/2])`.
    pub fn apply_neox(&self, x: &mut [f32], dim: usize, pos: usize) {
        match self {
            Rope::Table(inv_freq) => rope_neox(x, dim, pos, inv_freq),
            &Rope::Ggml {
                theta_scale,
                freq_scale,
            } => {
                let half = dim / 2;
                let mut theta = pos as f32;
                for j in 0..half {
                    let (sin, cos) = (freq_scale * theta).sin_cos();
                    for head in x.chunks_exact_mut(dim) {
                        let (a, b) = (head[j], head[j + half]);
                        head[j] = a.mul_add(cos, -(b * sin));
                        head[j + half] = a.mul_add(sin, b * cos);
                    }
                    theta *= theta_scale;
                }
            }
        }
    }
}

/// GELU with the tanh approximation (`gelu_pytorch_tanh`).
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

/// GELU the way ggml's CPU backend evaluates it (`GGML_GELU_FP16`): the input rounded to f16,
/// looked up in a table of f16 results (65,536 entries, built on first use); inputs beyond ±10
/// pass through (or give 0). llama.cpp runs every GELU model this way, so GGUF models use it to
/// give llama.cpp's numbers.
pub fn gelu_tanh_f16_table(x: f32) -> f32 {
    static TABLE: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        let table = TABLE.get_or_init(|| {
            (0..=u16::MAX)
                .map(|bits| {
                    let xh = half::f16::from_bits(bits).to_f32();
                    half::f16::from_f32(gelu_tanh_f16_value(xh)).to_bits()
                })
                .collect()
        });
        half::f16::from_bits(table[half::f16::from_f32(x).to_bits() as usize]).to_f32()
    }
}

/// The value ggml's GELU table holds for the f16 input `xh` (before rounding to f16).
fn gelu_tanh_f16_value(xh: f32) -> f32 {
    #[allow(clippy::excessive_precision)]
    const SQRT_2_OVER_PI: f32 = 0.797_884_560_802_865_355_879_892_119_868_76;
    // `1 + a·x·x` as llama.cpp's compiled table builder evaluates it: one fused multiply-add
    // (checked against its table for all 65536 inputs).
    let inner = (0.044715 * xh).mul_add(xh, 1.0);
    0.5 * xh * (1.0 + (SQRT_2_OVER_PI * xh * inner).tanh())
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

    /// The table gives what evaluating the formula on the f16-rounded input gives, across the
    /// whole range (and the pass-through beyond ±10).
    #[test]
    fn gelu_table_equals_the_formula() {
        let xs = crate::testing::rand_vec(20_000, 9, 12.0);
        for x in xs
            .into_iter()
            .chain([0.0, -0.0, 9.999, -9.999, 10.0, -10.0, 1e-8])
        {
            let want = if x <= -10.0 {
                0.0
            } else if x >= 10.0 {
                x
            } else {
                let xh = half::f16::from_f32(x).to_f32();
                half::f16::from_f32(gelu_tanh_f16_value(xh)).to_f32()
            };
            assert_eq!(gelu_tanh_f16_table(x).to_bits(), want.to_bits(), "x = {x}");
        }
    }

    /// ggml's angles are `pos·base^(−2j/d)` up to the rounding of repeated multiplication, the
    /// first exactly `pos`; both forms rotate the same way within that rounding and keep norms.
    #[test]
    fn ggml_rope_is_the_table_rope_up_to_rounding() {
        let (d, base) = (64, 10_000.0f32);
        let table = Rope::Table(
            (0..d / 2)
                .map(|j| 1.0 / base.powf((2 * j) as f32 / d as f32))
                .collect(),
        );
        let ggml = Rope::ggml(base, d, 1.0);
        let x = crate::testing::rand_vec(2 * d, 5, 3.0);
        for pos in [0, 1, 17, 300] {
            let (mut a, mut b) = (x.clone(), x.clone());
            table.apply_neox(&mut a, d, pos);
            ggml.apply_neox(&mut b, d, pos);
            for (u, v) in a.iter().zip(&b) {
                assert!(
                    (u - v).abs() < 2e-4 * (1.0 + pos as f32).sqrt(),
                    "pos {pos}: {u} vs {v}"
                );
            }
            let norm = |v: &[f32]| v.iter().map(|t| t * t).sum::<f32>();
            assert!((norm(&b) - norm(&x)).abs() < 1e-3 * norm(&x));
        }
        // Pair 0 turns by exactly `pos` radians.
        let mut y = vec![0.0; d];
        y[0] = 1.0;
        ggml.apply_neox(&mut y, d, 5);
        assert_eq!((y[0], y[d / 2]), (5.0f32.cos(), 5.0f32.sin()));
    }

    #[test]
    fn neox_rotates_halves() {
        let mut x = [1.0, 0.0, 0.0, 0.0];
        rope_neox(&mut x, 4, 1, &[std::f32::consts::FRAC_PI_2, 0.0]);
        assert!(x[0].abs() < 1e-6 && (x[2] - 1.0).abs() < 1e-6);
        assert!((gelu_tanh(1.0) - 0.841_192).abs() < 1e-5);
    }
}
