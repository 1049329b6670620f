//! Choosing a type per tensor and writing a quantized GGUF, as `llama-quantize` does without an
//! importance matrix (`shared/reference/gguf.md` §f): the same mixtures (Q4_K_M, Q5_K_M, …), the
//! same per-tensor rules and fallbacks, ggml's reference quantizers (see `herd_kernels::quant`).

use std::path::Path;

use herd_kernels::{DType, pool, quant};

use crate::gguf::{GgufWriter, Value};
use crate::{Error, Result, TensorBytes};

/// A whole-file quantization recipe (`general.file_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4KS,
    Q4KM,
    Q5KS,
    Q5KM,
    Q6K,
    Q2K,
    Q2KS,
    Q3KS,
    Q3KM,
    Q3KL,
    IQ1S,
    IQ1M,
    IQ2XXS,
    IQ2XS,
    IQ2S,
    IQ2M,
    IQ3XXS,
    IQ3XS,
    IQ3S,
    IQ3M,
    IQ4NL,
    IQ4XS,
    /// MoE expert tensors MXFP4, everything else Q8_0 (as gpt-oss files are published).
    MXFP4MOE,
}

impl FileType {
    pub const ALL: [FileType; 31] = [
        FileType::F32,
        FileType::F16,
        FileType::BF16,
        FileType::Q4_0,
        FileType::Q4_1,
        FileType::Q5_0,
        FileType::Q5_1,
        FileType::Q8_0,
        FileType::Q4KS,
        FileType::Q4KM,
        FileType::Q5KS,
        FileType::Q5KM,
        FileType::Q6K,
        FileType::Q2K,
        FileType::Q2KS,
        FileType::Q3KS,
        FileType::Q3KM,
        FileType::Q3KL,
        FileType::IQ1S,
        FileType::IQ1M,
        FileType::IQ2XXS,
        FileType::IQ2XS,
        FileType::IQ2S,
        FileType::IQ2M,
        FileType::IQ3XXS,
        FileType::IQ3XS,
        FileType::IQ3S,
        FileType::IQ3M,
        FileType::IQ4NL,
        FileType::IQ4XS,
        FileType::MXFP4MOE,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FileType::F32 => "f32",
            FileType::F16 => "f16",
            FileType::BF16 => "bf16",
            FileType::Q4_0 => "q4_0",
            FileType::Q4_1 => "q4_1",
            FileType::Q5_0 => "q5_0",
            FileType::Q5_1 => "q5_1",
            FileType::Q8_0 => "q8_0",
            FileType::Q4KS => "q4_k_s",
            FileType::Q4KM => "q4_k_m",
            FileType::Q5KS => "q5_k_s",
            FileType::Q5KM => "q5_k_m",
            FileType::Q6K => "q6_k",
            FileType::Q2K => "q2_k",
            FileType::Q2KS => "q2_k_s",
            FileType::Q3KS => "q3_k_s",
            FileType::Q3KM => "q3_k_m",
            FileType::Q3KL => "q3_k_l",
            FileType::IQ1S => "iq1_s",
            FileType::IQ1M => "iq1_m",
            FileType::IQ2XXS => "iq2_xxs",
            FileType::IQ2XS => "iq2_xs",
            FileType::IQ2S => "iq2_s",
            FileType::IQ2M => "iq2_m",
            FileType::IQ3XXS => "iq3_xxs",
            FileType::IQ3XS => "iq3_xs",
            FileType::IQ3S => "iq3_s",
            FileType::IQ3M => "iq3_m",
            FileType::IQ4NL => "iq4_nl",
            FileType::IQ4XS => "iq4_xs",
            FileType::MXFP4MOE => "mxfp4_moe",
        }
    }

    pub fn from_name(s: &str) -> Option<FileType> {
        FileType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn id(self) -> u32 {
        match self {
            FileType::F32 => 0,
            FileType::F16 => 1,
            FileType::Q4_0 => 2,
            FileType::Q4_1 => 3,
            FileType::Q8_0 => 7,
            FileType::Q5_0 => 8,
            FileType::Q5_1 => 9,
            FileType::Q4KS => 14,
            FileType::Q4KM => 15,
            FileType::Q5KS => 16,
            FileType::Q5KM => 17,
            FileType::Q6K => 18,
            FileType::Q2K => 10,
            FileType::Q3KS => 11,
            FileType::Q3KM => 12,
            FileType::Q3KL => 13,
            FileType::IQ2XXS => 19,
            FileType::IQ2XS => 20,
            FileType::Q2KS => 21,
            FileType::IQ3XS => 22,
            FileType::IQ3XXS => 23,
            FileType::IQ1S => 24,
            FileType::IQ4NL => 25,
            FileType::IQ3S => 26,
            FileType::IQ3M => 27,
            FileType::IQ2S => 28,
            FileType::IQ2M => 29,
            FileType::IQ4XS => 30,
            FileType::IQ1M => 31,
            FileType::BF16 => 32,
            FileType::MXFP4MOE => 38,
        }
    }

    /// The type most tensors get.
    pub fn default_type(self) -> DType {
        match self {
            FileType::F32 => DType::F32,
            FileType::F16 => DType::F16,
            FileType::BF16 => DType::BF16,
            FileType::Q4_0 => DType::Q4_0,
            FileType::Q4_1 => DType::Q4_1,
            FileType::Q5_0 => DType::Q5_0,
            FileType::Q5_1 => DType::Q5_1,
            FileType::Q8_0 => DType::Q8_0,
            FileType::Q4KS | FileType::Q4KM => DType::Q4K,
            FileType::Q5KS | FileType::Q5KM => DType::Q5K,
            FileType::Q6K => DType::Q6K,
            FileType::Q2K | FileType::Q2KS => DType::Q2K,
            FileType::Q3KS | FileType::Q3KM | FileType::Q3KL => DType::Q3K,
            FileType::IQ1S => DType::IQ1S,
            FileType::IQ1M => DType::IQ1M,
            FileType::IQ2XXS => DType::IQ2XXS,
            FileType::IQ2XS | FileType::IQ2S => DType::IQ2XS,
            FileType::IQ2M => DType::IQ2S,
            FileType::IQ3XXS => DType::IQ3XXS,
            FileType::IQ3XS | FileType::IQ3S | FileType::IQ3M => DType::IQ3S,
            FileType::IQ4NL => DType::IQ4NL,
            FileType::IQ4XS => DType::IQ4XS,
            FileType::MXFP4MOE => DType::MXFP4,
        }
    }

    /// Whether herd can write this file type without an importance matrix (so also while
    /// loading, `--quantize`): every type but those that choose tensor types llama-quantize
    /// quantizes only with a matrix ([`tensor_requires_imatrix`]).
    pub fn herd_writes(self) -> bool {
        !matches!(
            self,
            FileType::IQ1S
                | FileType::IQ1M
                | FileType::IQ2XXS
                | FileType::IQ2XS
                | FileType::IQ2S
                | FileType::IQ2M
                | FileType::IQ3XXS
                | FileType::IQ3XS
                | FileType::Q2KS
        ) && quant::quantize_supported(self.default_type())
    }

    /// Whether files of this type are made with an importance matrix: llama-quantize requires
    /// one for the 1- and 2-bit types, and the IQ files people publish are made with one, so
    /// `herd plan` predicts them that way (it changes IQ3_XXS's and IQ4's attn_v and ffn_down).
    pub fn made_with_imatrix(self) -> bool {
        matches!(
            self,
            FileType::IQ1S
                | FileType::IQ1M
                | FileType::IQ2XXS
                | FileType::IQ2XS
                | FileType::IQ2S
                | FileType::IQ2M
                | FileType::IQ3XXS
                | FileType::IQ3XS
                | FileType::IQ3S
                | FileType::IQ3M
                | FileType::IQ4NL
                | FileType::IQ4XS
        )
    }

    /// The file types whose lowest-bit tensors llama.cpp guards the same way (its IQ1/IQ2
    /// branch: attn_v, the first ffn_down tensors and attn_output get more bits).
    fn is_iq2_or_less(self) -> bool {
        matches!(
            self,
            FileType::IQ2XXS
                | FileType::IQ2XS
                | FileType::IQ1S
                | FileType::IQ2S
                | FileType::IQ2M
                | FileType::IQ1M
        )
    }
}

/// What the rules need to know about the model.
#[derive(Clone, Copy, Debug)]
pub struct ModelShape {
    pub n_layers: usize,
    pub n_experts: usize,
    /// Number of `attn_v` tensors in the file.
    pub n_attn_v: usize,
    /// True when there is no `output.weight` (the embedding doubles as the output head).
    pub tied_embeddings: bool,
    /// Query heads per kv head (llama.cpp's `n_gqa()`).
    pub n_gqa: usize,
    /// Whether an importance matrix guides the quantization (llama-quantize's `has_imatrix`;
    /// it changes IQ3_XXS's and IQ4's choices). herd's own quantization never has one.
    pub imatrix: bool,
}

/// How many tensors of each counted kind llama-quantize has visited before the current one
/// (its `i_attention_wv`, `i_ffn_down`, `i_ffn_gate`, `i_ffn_up`), in its visiting order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Visit {
    pub attn_v: usize,
    pub ffn_down: usize,
    pub ffn_gate: usize,
    pub ffn_up: usize,
}

impl Visit {
    /// The counts before layer `layer`'s tensors in a model whose every layer has one tensor
    /// of each kind (true of the architectures herd quantizes at load, except MoE layers'
    /// several ffn_down tensors, where only the IQ1/IQ2 rules read the count, and those file
    /// types need an importance matrix, so `--quantize` at load refuses them).
    pub fn at_layer(layer: usize) -> Self {
        Visit {
            attn_v: layer,
            ffn_down: layer,
            ffn_gate: layer,
            ffn_up: layer,
        }
    }
}

/// llama.cpp's `tensor_category`, for the names of the architectures herd reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    AttnV,
    AttnK,
    AttnQ,
    AttnOutput,
    FfnUp,
    FfnGate,
    FfnDown,
    Other,
}

fn category(name: &str, shape: &ModelShape) -> Category {
    if name == "output.weight" || (shape.tied_embeddings && name == "token_embd.weight") {
        return Category::Output;
    }
    // In llama.cpp's order: the first name fragment that matches decides.
    [
        ("token_embd.weight", Category::TokenEmbd),
        ("attn_v.weight", Category::AttnV),
        ("attn_k.weight", Category::AttnK),
        ("attn_q.weight", Category::AttnQ),
        ("attn_output.weight", Category::AttnOutput),
        ("ffn_up", Category::FfnUp),
        ("ffn_gate", Category::FfnGate),
        ("ffn_down", Category::FfnDown),
    ]
    .into_iter()
    .find(|(fragment, _)| name.contains(fragment))
    .map_or(Category::Other, |(_, c)| c)
}

/// llama.cpp's `tensor_allows_quantization` for the tensor names of the architectures we read.
pub fn allows_quantization(name: &str, n_dims: usize) -> bool {
    n_dims >= 2
        && name.ends_with("weight")
        && !name.contains("_norm.weight")
        && !name.contains("ffn_gate_inp.weight")
        && !name.contains("altup")
        && !name.contains("laurel")
        && !name.contains("per_layer_model_proj")
}

fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as isize - (n / 8) as isize).rem_euclid(3) == 2
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// The type llama.cpp's `llama_tensor_get_type` picks for one tensor (without `--tensor-type`
/// overrides; architecture-specific rules for Falcon, GLM and Llama 2 70B left out), then its
/// shape fallback. `visit` counts the tensors before this one ([`choose_types`] keeps it).
pub fn choose_type(
    ft: FileType,
    shape: &ModelShape,
    name: &str,
    dims: &[u64],
    current: DType,
    visit: Visit,
) -> DType {
    use FileType as F;
    if !allows_quantization(name, dims.len()) {
        return current;
    }
    let mut t = ft.default_type();
    if !t.is_quantized() {
        return t;
    }
    let cat = category(name, shape);
    let (gqa, n_exp, imatrix) = (shape.n_gqa, shape.n_experts, shape.imatrix);
    let is = |fts: &[FileType]| fts.contains(&ft);
    // llama.cpp's layer_info: MoE models take the layer from the name, others the count.
    let layer = |count: usize| {
        if n_exp > 1 {
            layer_of(name).unwrap_or(count)
        } else {
            count
        }
    };
    let n = shape.n_layers;
    if cat == Category::Output {
        t = if ft == F::MXFP4MOE || !dims[0].is_multiple_of(t.block_size() as u64) {
            DType::Q8_0
        } else if is(&[
            F::IQ2XXS,
            F::IQ2XS,
            F::IQ3XXS,
            F::IQ1S,
            F::IQ2S,
            F::IQ2M,
            F::IQ1M,
        ]) {
            DType::Q5K
        } else if t != DType::Q8_0 {
            DType::Q6K
        } else {
            t
        };
    } else if ft == F::MXFP4MOE {
        t = if dims.len() > 2 && dims[2] > 1 {
            DType::MXFP4
        } else {
            DType::Q8_0
        };
    } else if cat == Category::TokenEmbd {
        if is(&[F::IQ2XXS, F::IQ2XS, F::IQ1S, F::IQ1M]) {
            t = DType::Q2K;
        } else if is(&[F::IQ2S, F::IQ2M, F::IQ3XXS]) {
            t = DType::IQ3S;
        }
    } else if ft.is_iq2_or_less() {
        let wider = if is(&[F::IQ2S, F::IQ2M]) {
            DType::IQ3S
        } else {
            DType::Q2K
        };
        match cat {
            Category::AttnV => {
                t = if gqa >= 4 || n_exp >= 4 {
                    DType::Q4K
                } else {
                    wider
                }
            }
            Category::AttnK if n_exp == 8 => t = DType::Q4K,
            // The count, not the layer: a MoE layer's several ffn_down tensors all count.
            Category::FfnDown if visit.ffn_down < n / 8 => t = wider,
            Category::AttnOutput if n_exp == 8 => t = DType::Q5K,
            Category::AttnOutput if is(&[F::IQ1S, F::IQ1M]) => t = DType::IQ2XXS,
            Category::AttnOutput if is(&[F::IQ2S, F::IQ2M]) => t = DType::IQ3S,
            _ => {}
        }
    } else {
        match cat {
            Category::AttnV => {
                let i = visit.attn_v;
                if ft == F::Q2K {
                    t = if gqa >= 4 { DType::Q4K } else { DType::Q3K };
                } else if ft == F::Q2KS && gqa >= 4 {
                    t = DType::Q4K;
                } else if ft == F::IQ3XXS {
                    t = if gqa >= 4 {
                        DType::Q4K
                    } else if !imatrix {
                        DType::IQ3S
                    } else {
                        DType::IQ3XXS
                    };
                } else if (is(&[F::IQ3XS, F::IQ3S]) && gqa >= 4) || ft == F::IQ3M {
                    t = DType::Q4K;
                } else if ft == F::Q3KM {
                    t = if i < 2 { DType::Q5K } else { DType::Q4K };
                } else if ft == F::Q3KL || (is(&[F::IQ4NL, F::IQ4XS]) && gqa >= 4) {
                    t = DType::Q5K;
                } else if is(&[F::Q4KM, F::Q5KM]) && use_more_bits(i, shape.n_attn_v) {
                    t = DType::Q6K;
                } else if ft == F::Q4KS && i < 4 {
                    t = DType::Q5K;
                }
                if n_exp == 8 {
                    t = DType::Q8_0;
                }
            }
            Category::AttnK => {
                if n_exp == 8 {
                    t = DType::Q8_0;
                } else if ft == F::IQ3XS {
                    t = DType::IQ3XXS;
                } else if ft == F::IQ3XXS {
                    t = DType::IQ2S;
                }
            }
            Category::AttnQ => {
                if ft == F::IQ3XS {
                    t = DType::IQ3XXS;
                } else if ft == F::IQ3XXS {
                    t = DType::IQ2S;
                }
            }
            Category::FfnDown => {
                let i = layer(visit.ffn_down);
                let more = use_more_bits(i, n);
                if ft == F::Q2K {
                    t = DType::Q3K;
                } else if ft == F::Q2KS {
                    if i < n / 8 {
                        t = DType::Q4K;
                    }
                } else if ft == F::IQ3XXS && !imatrix {
                    t = if i < n / 8 { DType::Q4K } else { DType::Q3K };
                } else if ft == F::Q3KM {
                    t = if i < n / 16 { DType::Q5K } else { DType::Q4K };
                } else if ft == F::IQ3M && (i < n / 8 || (n_exp == 8 && more)) {
                    t = DType::Q4K;
                } else if ft == F::Q3KL {
                    t = DType::Q5K;
                } else if ft == F::Q4KM {
                    if more {
                        t = DType::Q6K;
                    }
                } else if i < n / 8 && is(&[F::IQ4NL, F::IQ4XS]) && !imatrix {
                    t = DType::Q5K;
                } else if ft == F::Q5KM && more {
                    t = DType::Q6K;
                } else if ft == F::Q4KS && i < n / 8 {
                    t = DType::Q5K;
                } else if is(&[F::Q4_0, F::Q5_0]) && imatrix && i < n / 8 {
                    t = if ft == F::Q4_0 {
                        DType::Q4_1
                    } else {
                        DType::Q5_1
                    };
                }
            }
            Category::AttnOutput => {
                if n_exp == 8 {
                    let to_q5k = [
                        F::Q2K,
                        F::IQ3XS,
                        F::IQ3XXS,
                        F::Q3KS,
                        F::Q3KM,
                        F::IQ4NL,
                        F::Q4KS,
                        F::Q4KM,
                        F::IQ3S,
                        F::IQ3M,
                        F::IQ4XS,
                    ];
                    if is(&to_q5k) {
                        t = DType::Q5K;
                    }
                } else {
                    t = match ft {
                        F::Q2K => DType::Q3K,
                        F::IQ3XXS => DType::IQ3S,
                        F::Q3KM | F::IQ3M => DType::Q4K,
                        F::Q3KL => DType::Q5K,
                        _ => t,
                    };
                }
            }
            Category::FfnGate | Category::FfnUp => {
                let count = if cat == Category::FfnGate {
                    visit.ffn_gate
                } else {
                    visit.ffn_up
                };
                let i = layer(count);
                if ft == F::IQ3XS && i >= n / 8 && i < 7 * n / 8 {
                    t = DType::IQ3XXS;
                }
            }
            _ => {}
        }
    }
    fallback(t, dims[0])
}

/// The type of every tensor of a file, in file order. `attn_v` tensors are counted as
/// llama-quantize counts them: it visits tensors ordered by layer number, then name
/// (`weight_name_comparer` in llama-model-loader.h), so a file stored in another order (names
/// sorted as text put `blk.10` before `blk.2`) gets the same types as one stored by layer.
pub fn choose_types<'a>(
    ft: FileType,
    shape: &ModelShape,
    tensors: impl IntoIterator<Item = (&'a str, &'a [u64], DType)>,
) -> Vec<DType> {
    choose_types_with(ft, shape, &TypeOverrides::default(), tensors)
}

/// The user's choices that take precedence over the file type's rules, as llama-quantize's
/// `--output-tensor-type`, `--token-embedding-type` and `--tensor-type PATTERN=TYPE`.
#[derive(Clone, Debug, Default)]
pub struct TypeOverrides {
    /// The type of `output.weight`.
    pub output: Option<DType>,
    /// The type of the token embedding.
    pub token_embd: Option<DType>,
    /// A tensor whose name the pattern matches anywhere (the first matching pattern wins) gets
    /// the type, then the shape fallback; the rules' per-kind counts skip it, as in llama.cpp.
    pub tensors: Vec<(regex::Regex, DType)>,
}

/// [`choose_types`] with the user's overrides: llama.cpp's `llama_tensor_get_type` with
/// `tensor_type_patterns`, `output_tensor_type` and `token_embedding_type`.
pub fn choose_types_with<'a>(
    ft: FileType,
    shape: &ModelShape,
    overrides: &TypeOverrides,
    tensors: impl IntoIterator<Item = (&'a str, &'a [u64], DType)>,
) -> Vec<DType> {
    let tensors: Vec<_> = tensors.into_iter().collect();
    let visit = visit_order(tensors.iter().map(|t| t.0));
    let mut types = vec![DType::F32; tensors.len()];
    let mut counts = Visit::default();
    for i in visit {
        let (name, dims, current) = tensors[i];
        if !allows_quantization(name, dims.len()) {
            types[i] = current;
            continue;
        }
        let cat = category(name, shape);
        // By name first (a tied embedding takes --token-embedding-type), ...
        let fixed = match name {
            "token_embd.weight" | "per_layer_token_embd.weight" => overrides.token_embd,
            "output.weight" => overrides.output,
            _ => None,
        };
        if let Some(t) = fixed {
            types[i] = t;
            continue;
        }
        if !ft.default_type().is_quantized() {
            types[i] = choose_type(ft, shape, name, dims, current, counts);
            continue;
        }
        let manual = overrides
            .tensors
            .iter()
            .find(|(pattern, _)| pattern.is_match(name))
            .map(|(_, t)| *t);
        if let Some(t) = manual {
            types[i] = fallback(t, dims[0]);
            continue;
        }
        // ... then by role (else the output head's type by --output-tensor-type).
        if let (Category::Output, Some(t)) = (cat, overrides.output) {
            types[i] = t;
            continue;
        }
        types[i] = choose_type(ft, shape, name, dims, current, counts);
        match cat {
            Category::AttnV => counts.attn_v += 1,
            Category::FfnDown => counts.ffn_down += 1,
            Category::FfnGate => counts.ffn_gate += 1,
            Category::FfnUp => counts.ffn_up += 1,
            _ => {}
        }
    }
    types
}

/// The order llama-quantize visits (and writes) tensors in: its model loader's
/// `weight_name_comparer`, by layer (tensors outside the blocks first), then by name.
pub fn visit_order<'a>(names: impl IntoIterator<Item = &'a str>) -> Vec<usize> {
    let names: Vec<&str> = names.into_iter().collect();
    let mut order: Vec<usize> = (0..names.len()).collect();
    order.sort_by_key(|&i| (layer_of(names[i]).map_or(-1, |l| l as i64), names[i]));
    order
}

/// llama.cpp's `tensor_type_fallback`: rows that are not whole blocks get a smaller block.
fn fallback(t: DType, ncols: u64) -> DType {
    if ncols.is_multiple_of(t.block_size() as u64) {
        return t;
    }
    let smaller = match t {
        DType::IQ1S
        | DType::IQ1M
        | DType::IQ2XXS
        | DType::IQ2XS
        | DType::IQ2S
        | DType::IQ3XXS
        | DType::IQ3S
        | DType::IQ4XS => DType::IQ4NL,
        DType::Q2K | DType::Q3K => DType::Q4_0,
        DType::Q4K => DType::Q5_0,
        DType::Q5K => DType::Q5_1,
        DType::Q6K => DType::Q8_0,
        other => other,
    };
    if ncols.is_multiple_of(smaller.block_size() as u64) {
        smaller
    } else {
        DType::F16
    }
}

/// A tensor's bytes in its own type, produced when the writer reaches it.
pub type RawBytes = Box<dyn Fn() -> TensorBytes + Send + Sync>;

/// One tensor to write: its description and where its data comes from.
pub struct SourceTensor {
    pub name: String,
    /// ggml order.
    pub dims: Vec<u64>,
    pub dtype: DType,
    /// The stored bytes (produced on demand), copied through unchanged when the type stays the
    /// same.
    pub raw: Option<RawBytes>,
    /// The values as f32 in ggml order (row length `dims[0]`), for quantizing.
    pub read: Box<dyn Fn() -> Result<Vec<f32>> + Send + Sync>,
}

impl std::fmt::Debug for SourceTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SourceTensor({} {:?} {})",
            self.name, self.dims, self.dtype
        )
    }
}

impl SourceTensor {
    /// A tensor stored in a file, readable by dequantizing its bytes.
    pub fn stored(name: &str, dims: Vec<u64>, dtype: DType, bytes: TensorBytes) -> Self {
        let n = dims.iter().product::<u64>() as usize;
        let b = bytes.clone();
        Self {
            name: name.to_string(),
            dims,
            dtype,
            raw: Some(Box::new(move || bytes.clone())),
            read: Box::new(move || Ok(herd_kernels::dtype::decode(dtype, b.as_slice(), n))),
        }
    }
}

/// A model ready to be written as GGUF: metadata, tensors in file order, and the facts the
/// type rules need.
#[derive(Debug)]
pub struct GgufPlan {
    pub metadata: Vec<(String, Value)>,
    pub tensors: Vec<SourceTensor>,
    pub shape: ModelShape,
}

/// What was written.
#[derive(Debug, Default)]
pub struct Summary {
    pub tensors: Vec<(String, DType, u64)>,
    pub bytes: u64,
}

/// Write the plan's tensors to `out` with types chosen by `ft`, its metadata plus the file-type keys.
/// `progress(done, total, name)` is called before each tensor.
pub fn write_quantized(
    out: &Path,
    plan: &GgufPlan,
    ft: FileType,
    progress: impl FnMut(usize, usize, &str),
) -> Result<Summary> {
    write_quantized_split(out, plan, ft, None, progress).map(|(summary, _)| summary)
}

/// Where a split set starts a new file: llama.cpp's `llama-gguf-split --split-max-size` or
/// `--split-max-tensors`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitLimit {
    /// At most this many bytes of tensor data per file (each tensor counted padded to the
    /// 32-byte alignment; a file holds at least one tensor).
    Bytes(u64),
    /// At most this many tensors per file.
    Tensors(usize),
}

/// The tensors of each file when tensors of `padded` bytes each (in file order) are cut at
/// `limit`, as `llama-gguf-split` cuts them: a new file starts at tensor `i > 0` when the
/// current file's bytes plus tensor `i`'s would pass the limit, or when `i` is a multiple of
/// the tensor limit.
///
/// # Errors
/// A byte limit below the first tensor's size (the first file would hold no tensor), or a
/// tensor limit of 0.
pub fn split_ranges(padded: &[u64], limit: SplitLimit) -> Result<Vec<std::ops::Range<usize>>> {
    let mut starts = vec![0];
    let mut current = 0u64;
    for (i, &n) in padded.iter().enumerate() {
        let cut = match limit {
            SplitLimit::Bytes(max) => current + n > max,
            SplitLimit::Tensors(0) => {
                return Err(Error::Quantize(
                    "--split-max-tensors must be at least 1".into(),
                ));
            }
            SplitLimit::Tensors(max) => i > 0 && i % max == 0,
        };
        if cut && i == 0 {
            return Err(Error::Quantize(format!(
                "the first tensor alone ({n} bytes) is larger than the split limit"
            )));
        }
        if cut {
            starts.push(i);
            current = n;
        } else {
            current += n;
        }
    }
    let mut ends = starts[1..].to_vec();
    ends.push(padded.len());
    Ok(starts.into_iter().zip(ends).map(|(a, b)| a..b).collect())
}

/// The path of file `no` (0-based) of a `count`-file split set written for `out`: llama.cpp's
/// `PREFIX-%05d-of-%05d.gguf`, the prefix being `out` without its `.gguf` extension.
pub fn split_path(out: &Path, no: usize, count: usize) -> std::path::PathBuf {
    let name = out.file_name().and_then(|n| n.to_str()).unwrap_or("model");
    let prefix = name.strip_suffix(".gguf").unwrap_or(name);
    out.with_file_name(format!("{prefix}-{:05}-of-{count:05}.gguf", no + 1))
}

/// [`write_quantized`], or with `split` a split set as `llama-gguf-split` writes one: the
/// files of [`split_path`], the model's metadata in the first, then in every file `split.no`
/// (u16), `split.count` (u16) and `split.tensors.count` (i32). Returns the summary and the
/// files written.
pub fn write_quantized_split(
    out: &Path,
    plan: &GgufPlan,
    ft: FileType,
    split: Option<SplitLimit>,
    progress: impl FnMut(usize, usize, &str),
) -> Result<(Summary, Vec<std::path::PathBuf>)> {
    write_quantized_with(
        out,
        plan,
        ft,
        split,
        None,
        &TypeOverrides::default(),
        progress,
    )
}

/// [`write_quantized_split`] guided by an importance matrix, as `llama-quantize --imatrix`, and
/// with the user's type `overrides`: the type rules take `has_imatrix`, and each tensor the matrix covers is quantized with its
/// importances (one run of columns per matrix of a MoE tensor).
///
/// # Errors
/// As [`write_quantized_split`], and [`Error::Quantize`] naming the tensor when the matrix's
/// entry has the wrong length or its type has no importance-guided quantizer in herd.
pub fn write_quantized_with(
    out: &Path,
    plan: &GgufPlan,
    ft: FileType,
    split: Option<SplitLimit>,
    imatrix: Option<&crate::imatrix::ImportanceMatrix>,
    overrides: &TypeOverrides,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<(Summary, Vec<std::path::PathBuf>)> {
    let tensors = &plan.tensors;
    let shape = &ModelShape {
        imatrix: imatrix.is_some(),
        ..plan.shape
    };
    let targets = choose_types_with(
        ft,
        shape,
        overrides,
        tensors
            .iter()
            .map(|t| (t.name.as_str(), t.dims.as_slice(), t.dtype)),
    );
    // Written in llama-quantize's order (its loader's: by layer, then by name), so that split
    // sets hold the same tensors in the same files.
    let order = visit_order(tensors.iter().map(|t| t.name.as_str()));
    let ranges = match split {
        None => std::iter::once(0..tensors.len()).collect(),
        Some(limit) => {
            let padded: Vec<u64> = order
                .iter()
                .map(|&i| {
                    let (t, d) = (&tensors[i], targets[i]);
                    let n = d.bytes_for(t.dims.iter().product::<u64>() as usize) as u64;
                    n.div_ceil(crate::gguf::DEFAULT_ALIGNMENT) * crate::gguf::DEFAULT_ALIGNMENT
                })
                .collect();
            split_ranges(&padded, limit)?
        }
    };
    let count = ranges.len();
    if count > u16::MAX as usize {
        return Err(Error::Quantize(format!(
            "{count} files would pass split.count's limit of {}; raise the split limit",
            u16::MAX
        )));
    }
    let mut summary = Summary::default();
    let mut written = Vec::with_capacity(count);
    for (no, range) in ranges.into_iter().enumerate() {
        let mut writer = GgufWriter::new();
        if no == 0 {
            for (k, v) in &plan.metadata {
                writer.set(k, v.clone());
            }
            writer.set("general.file_type", Value::U32(ft.id()));
            writer.set("general.quantization_version", Value::U32(2));
        }
        if split.is_some() {
            writer.set(crate::gguf::SPLIT_NO, Value::U16(no as u16));
            writer.set(crate::gguf::SPLIT_COUNT, Value::U16(count as u16));
            writer.set(
                crate::gguf::SPLIT_TENSORS_COUNT,
                Value::I32(tensors.len() as i32),
            );
        }
        for &i in &order[range.clone()] {
            writer.add_tensor(&tensors[i].name, &tensors[i].dims, targets[i]);
        }
        let path = match split {
            None => out.to_path_buf(),
            Some(_) => split_path(out, no, count),
        };
        writer.write(&path, |j| {
            let i = order[range.start + j];
            let (t, target) = (&tensors[i], targets[i]);
            progress(range.start + j, tensors.len(), &t.name);
            let bytes = match &t.raw {
                Some(raw) if t.dtype == target => raw().as_slice().to_vec(),
                _ => match imatrix.and_then(|m| m.get(&t.name)) {
                    Some(w) if importance_matters(target, t, w) => {
                        quantize_rows_with_importance(&(t.read)()?, t, target, w)?
                    }
                    _ => quantize_rows(&(t.read)()?, t.dims[0] as usize, target, &t.name)?,
                },
            };
            summary.bytes += bytes.len() as u64;
            summary
                .tensors
                .push((t.name.clone(), target, bytes.len() as u64));
            Ok(bytes)
        })?;
        written.push(path);
    }
    Ok((summary, written))
}

/// llama-quantize's `tensor_requires_imatrix`: the tensors it refuses to quantize without an
/// importance matrix ("the result will be garbage"): IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S and
/// IQ3_XXS tensors, and Q2_K tensors of a Q2_K_S file, except the token embedding and the
/// output matrix.
pub fn tensor_requires_imatrix(name: &str, target: DType, ft: FileType) -> bool {
    if matches!(
        name,
        "token_embd.weight" | "per_layer_token_embd.weight" | "output.weight"
    ) {
        return false;
    }
    match target {
        DType::IQ1S | DType::IQ1M | DType::IQ2XXS | DType::IQ2XS | DType::IQ2S | DType::IQ3XXS => {
            true
        }
        DType::Q2K => ft == FileType::Q2KS,
        _ => false,
    }
}

/// Whether quantizing `t` to `target` takes its importances `w`: ggml's Q8_0 and MXFP4
/// quantizers ignore them, float types have none, and as llama-quantize does, a token
/// embedding whose entry does not fit is quantized without.
pub fn importance_matters(target: DType, t: &SourceTensor, w: &[f32]) -> bool {
    let fits = w.len() as u64 == t.dims[0] * t.dims.get(2).copied().unwrap_or(1);
    target.is_quantized()
        && !matches!(target, DType::Q8_0 | DType::MXFP4)
        && (fits || t.name != "token_embd.weight")
}

/// `t`'s values quantized row by row with `importance` (`n_per_row` values per matrix of `t`).
fn quantize_rows_with_importance(
    values: &[f32],
    t: &SourceTensor,
    target: DType,
    importance: &[f32],
) -> Result<Vec<u8>> {
    let row_len = t.dims[0] as usize;
    let n_mat = t.dims.get(2).copied().unwrap_or(1) as usize;
    let rows_per_mat = t.dims.get(1).copied().unwrap_or(1) as usize;
    if t.dims.len() > 3 || values.len() != row_len * rows_per_mat * n_mat {
        return Err(Error::Quantize(format!(
            "{}: an importance matrix needs a 2-D or 3-D tensor of {:?}",
            t.name, t.dims
        )));
    }
    if importance.len() != row_len * n_mat {
        return Err(Error::Quantize(format!(
            "{}: the importance matrix has {} values, the tensor {row_len} per row × {n_mat} \
             matrices",
            t.name,
            importance.len()
        )));
    }
    if !quant::importance_supported(target) {
        return Err(Error::Quantize(format!(
            "{}: ggml's {target} quantizer takes no importance matrix",
            t.name
        )));
    }
    let n_rows = values.len() / row_len;
    let row_bytes = target.bytes_for(row_len);
    let mut out = vec![0u8; n_rows * row_bytes];
    let rows_per_task = (n_rows / (pool::global().n_threads() * 8)).max(1);
    let shared = pool::SharedMut::new(&mut out);
    pool::global().run(n_rows.div_ceil(rows_per_task), |task| {
        let first = task * rows_per_task;
        for r in first..(first + rows_per_task).min(n_rows) {
            let w = &importance[(r / rows_per_mat) * row_len..][..row_len];
            // SAFETY: tasks write disjoint rows.
            let dst = unsafe { shared.slice(r * row_bytes, row_bytes) };
            let x = &values[r * row_len..(r + 1) * row_len];
            quant::quantize_with_importance(target, x, w, dst);
        }
    });
    Ok(out)
}

/// Quantize rows of `row_len` values (`values.len() / row_len` rows) to `target` in parallel on
/// the global pool, each row independently, so the result does not depend on the thread count:
/// the bytes of `target`'s row-major blocks, as ggml's reference quantizers write them.
///
/// # Errors
/// [`Error::Quantize`], naming `name`, if the rows are not whole blocks of `target` or herd
/// cannot quantize to `target`.
pub fn quantize_rows(values: &[f32], row_len: usize, target: DType, name: &str) -> Result<Vec<u8>> {
    if row_len == 0
        || !values.len().is_multiple_of(row_len)
        || !row_len.is_multiple_of(target.block_size())
    {
        return Err(Error::Quantize(format!(
            "{name}: rows of {row_len} cannot be stored as {target}"
        )));
    }
    if target.is_quantized() && !quant::quantize_supported(target) {
        return Err(Error::Quantize(format!(
            "{name}: {target} needs an importance matrix (--imatrix)"
        )));
    }
    let n_rows = values.len() / row_len;
    let row_bytes = target.bytes_for(row_len);
    let mut out = vec![0u8; n_rows * row_bytes];
    let rows_per_task = (n_rows / (pool::global().n_threads() * 8)).max(1);
    let shared = pool::SharedMut::new(&mut out);
    pool::global().run(n_rows.div_ceil(rows_per_task), |task| {
        let first = task * rows_per_task;
        let last = (first + rows_per_task).min(n_rows);
        // SAFETY: tasks write disjoint row ranges.
        let dst = unsafe { shared.slice(first * row_bytes, (last - first) * row_bytes) };
        quant::quantize(target, &values[first * row_len..last * row_len], dst);
    });
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama-gguf-split's cuts: by bytes (a file may be as large as the limit, the first
    /// tensor may not exceed it) and by tensor count.
    #[test]
    fn split_ranges_cut_as_llama_gguf_split() {
        let sizes = [32, 64, 32, 96, 32];
        assert_eq!(
            split_ranges(&sizes, SplitLimit::Bytes(128)).unwrap(),
            vec![0..3, 3..5]
        );
        assert_eq!(
            split_ranges(&sizes, SplitLimit::Bytes(96)).unwrap(),
            vec![0..2, 2..3, 3..4, 4..5]
        );
        assert_eq!(
            split_ranges(&sizes, SplitLimit::Bytes(1000)).unwrap(),
            vec![0..5]
        );
        assert_eq!(
            split_ranges(&sizes, SplitLimit::Tensors(2)).unwrap(),
            vec![0..2, 2..4, 4..5]
        );
        assert!(split_ranges(&sizes, SplitLimit::Bytes(16)).is_err());
        assert!(split_ranges(&sizes, SplitLimit::Tensors(0)).is_err());
        assert_eq!(
            split_path(Path::new("/x/model.gguf"), 1, 3),
            Path::new("/x/model-00002-of-00003.gguf")
        );
    }

    fn shape(n_layers: usize) -> ModelShape {
        ModelShape {
            n_layers,
            n_experts: 16,
            n_attn_v: n_layers,
            tied_embeddings: false,
            n_gqa: 4,
            imatrix: false,
        }
    }

    #[test]
    fn q4_k_m_follows_llama_cpp_rules() {
        let s = shape(32);
        let pick = |name: &str, ne0: u64, v: usize| {
            choose_type(
                FileType::Q4KM,
                &s,
                name,
                &[ne0, 4096],
                DType::F32,
                Visit::at_layer(v),
            )
        };
        assert_eq!(pick("output.weight", 4096, 0), DType::Q6K);
        assert_eq!(pick("token_embd.weight", 4096, 0), DType::Q4K);
        assert_eq!(pick("blk.5.attn_q.weight", 4096, 0), DType::Q4K);
        // use_more_bits for 32: 0-3, 28-31 and 6, 9, …, 27.
        let more: Vec<usize> = (0..32)
            .filter(|&i| pick(&format!("blk.{i}.ffn_down.weight"), 4096, 0) == DType::Q6K)
            .collect();
        assert_eq!(
            more,
            [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        assert_eq!(pick("blk.3.attn_v.weight", 4096, 3), DType::Q6K);
        assert_eq!(pick("blk.4.attn_v.weight", 4096, 4), DType::Q4K);
        assert_eq!(
            pick("blk.4.attn_norm.weight", 4096, 0),
            DType::F32,
            "norms are never quantized"
        );
        assert_eq!(
            choose_type(
                FileType::Q4KM,
                &s,
                "blk.1.ffn_gate_inp.weight",
                &[4096, 16],
                DType::F32,
                Visit::default()
            ),
            DType::F32,
            "routers are never quantized"
        );
        // Fallbacks for rows that are not whole 256-blocks.
        assert_eq!(pick("blk.5.attn_q.weight", 96, 0), DType::Q5_0);
        assert_eq!(pick("blk.0.ffn_down.weight", 96, 0), DType::Q8_0);
        assert_eq!(pick("blk.5.attn_q.weight", 48, 0), DType::F16);
    }

    #[test]
    fn attn_v_is_counted_in_layer_order_whatever_the_file_order() {
        let s = shape(16);
        let names: Vec<String> = (0..16).map(|i| format!("blk.{i}.attn_v.weight")).collect();
        let mut text_order = names.clone();
        text_order.sort();
        let dims = [4096u64, 4096];
        let types = |order: &[String]| -> Vec<(String, DType)> {
            let picked = choose_types(
                FileType::Q4KM,
                &s,
                order.iter().map(|n| (n.as_str(), &dims[..], DType::F32)),
            );
            let mut by_name: Vec<_> = order.iter().cloned().zip(picked).collect();
            by_name.sort();
            by_name
        };
        assert_eq!(types(&names), types(&text_order));
        // use_more_bits for 16 layers: 0, 1, 14, 15 and 4, 7, 10, 13.
        let more: Vec<usize> = (0..16)
            .filter(|&i| {
                types(&text_order)
                    .iter()
                    .any(|(n, t)| *n == names[i] && *t == DType::Q6K)
            })
            .collect();
        assert_eq!(more, [0, 1, 4, 7, 10, 13, 14, 15]);
    }

    #[test]
    fn q8_0_quantizes_everything_the_same() {
        let s = shape(4);
        for name in [
            "output.weight",
            "token_embd.weight",
            "blk.0.attn_v.weight",
            "blk.0.ffn_down_exps.weight",
        ] {
            assert_eq!(
                choose_type(
                    FileType::Q8_0,
                    &s,
                    name,
                    &[256, 8],
                    DType::F32,
                    Visit::default()
                ),
                DType::Q8_0,
                "{name}"
            );
        }
    }
}
