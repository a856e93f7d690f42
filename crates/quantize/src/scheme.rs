//! Quantization schemes (`--type`) and the policy that picks each tensor's GGML type, following
//! llama.cpp's `llama-quant.cpp` (`llama_tensor_get_type`) so that a file Kiln writes has the types
//! `llama-quantize` would choose.
//!
//! The policy, in order:
//! 1. Only 2-D `*.weight` tensors are quantized; norms (`*_norm.weight`), 1-D tensors (biases,
//!    norm scales) and position embeddings keep their type (F32 stays F32, a quantized source
//!    tensor is written as F32).
//! 2. The output head, or the token embedding when it doubles as the head (tied embeddings), gets
//!    Q6_K (Q8_0 under `q8_0`), or Q8_0 when its rows do not split into 256-element super-blocks.
//! 3. The K-quant mixes give a few tensors more bits: `q4_k_m`/`q5_k_m` give the value projection
//!    (`attn_v`) and the MLP down projection (`ffn_down`) Q6_K in the first and last eighth of the
//!    layers and every third layer between (`use_more_bits`); `q4_k_s` gives the first four
//!    `attn_v` and the first eighth of `ffn_down` Q5_K; a fused `attn_qkv` gets Q5_K (`q4_k_m`) or
//!    Q6_K (`q5_k_m`).
//! 4. A tensor whose rows do not divide into the chosen type's blocks falls back: Q4_K → Q5_0,
//!    Q5_K → Q5_1, Q6_K → Q8_0, and to F16 when even 32-element blocks do not fit.

use std::fmt;
use std::str::FromStr;

use kiln_gguf::GgmlType;

use crate::error::QuantizeError;

/// A quantization scheme: one GGML type for the bulk of the weights, or one of llama.cpp's mixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scheme {
    /// No quantization: every tensor dequantized to F32 (a reference to quantize from).
    F32,
    /// Weights in F16, the rest F32.
    F16,
    /// 8-bit, one f16 scale per 32 weights (8.5 bits per weight).
    Q8_0,
    /// 4-bit, one scale per 32 (4.5 bpw).
    Q4_0,
    /// 4-bit, scale and minimum per 32 (5.0 bpw).
    Q4_1,
    /// 5-bit, one scale per 32 (5.5 bpw).
    Q5_0,
    /// 5-bit, scale and minimum per 32 (6.0 bpw).
    Q5_1,
    /// Every weight Q4_K (4.5 bpw), apart from the output rule.
    Q4K,
    /// Every weight Q5_K (5.5 bpw), apart from the output rule.
    Q5K,
    /// Every weight Q6_K (6.56 bpw).
    Q6K,
    /// llama.cpp's Q4_K_S: Q4_K with a few early layers in Q5_K.
    Q4KS,
    /// llama.cpp's Q4_K_M: Q4_K with `attn_v`/`ffn_down` of chosen layers in Q6_K.
    Q4KM,
    /// llama.cpp's Q5_K_S: Q5_K.
    Q5KS,
    /// llama.cpp's Q5_K_M: Q5_K with `attn_v`/`ffn_down` of chosen layers in Q6_K.
    Q5KM,
}

impl Scheme {
    /// Every scheme, in the order `--help` lists them.
    pub const ALL: [Scheme; 14] = [
        Scheme::F32,
        Scheme::F16,
        Scheme::Q8_0,
        Scheme::Q4_0,
        Scheme::Q4_1,
        Scheme::Q5_0,
        Scheme::Q5_1,
        Scheme::Q4K,
        Scheme::Q5K,
        Scheme::Q6K,
        Scheme::Q4KS,
        Scheme::Q4KM,
        Scheme::Q5KS,
        Scheme::Q5KM,
    ];

    /// The scheme's name as `--type` spells it (`"q4_k_m"`).
    pub fn name(self) -> &'static str {
        match self {
            Scheme::F32 => "f32",
            Scheme::F16 => "f16",
            Scheme::Q8_0 => "q8_0",
            Scheme::Q4_0 => "q4_0",
            Scheme::Q4_1 => "q4_1",
            Scheme::Q5_0 => "q5_0",
            Scheme::Q5_1 => "q5_1",
            Scheme::Q4K => "q4_k",
            Scheme::Q5K => "q5_k",
            Scheme::Q6K => "q6_k",
            Scheme::Q4KS => "q4_k_s",
            Scheme::Q4KM => "q4_k_m",
            Scheme::Q5KS => "q5_k_s",
            Scheme::Q5KM => "q5_k_m",
        }
    }

    /// The type most weights get.
    pub fn base_type(self) -> GgmlType {
        match self {
            Scheme::F32 => GgmlType::F32,
            Scheme::F16 => GgmlType::F16,
            Scheme::Q8_0 => GgmlType::Q8_0,
            Scheme::Q4_0 => GgmlType::Q4_0,
            Scheme::Q4_1 => GgmlType::Q4_1,
            Scheme::Q5_0 => GgmlType::Q5_0,
            Scheme::Q5_1 => GgmlType::Q5_1,
            Scheme::Q4K | Scheme::Q4KS | Scheme::Q4KM => GgmlType::Q4_K,
            Scheme::Q5K | Scheme::Q5KS | Scheme::Q5KM => GgmlType::Q5_K,
            Scheme::Q6K => GgmlType::Q6_K,
        }
    }

    /// llama.cpp's `llama_ftype` number for `general.file_type` (the plain K types report the
    /// matching `_S` mix, the closest llama.cpp has).
    pub fn file_type(self) -> u32 {
        match self {
            Scheme::F32 => 0,
            Scheme::F16 => 1,
            Scheme::Q8_0 => 7,
            Scheme::Q4_0 => 2,
            Scheme::Q4_1 => 3,
            Scheme::Q5_0 => 8,
            Scheme::Q5_1 => 9,
            Scheme::Q4K | Scheme::Q4KS => 14,
            Scheme::Q4KM => 15,
            Scheme::Q5K | Scheme::Q5KS => 16,
            Scheme::Q5KM => 17,
            Scheme::Q6K => 18,
        }
    }

    /// The type of tensor `name` with ggml dims `dims` (innermost first) whose source type is
    /// `source`, in a model of `layers` layers; `tied` says whether the token embedding is also the
    /// output head. See the module documentation for the rules.
    pub fn tensor_type(
        self,
        name: &str,
        dims: &[u64],
        source: GgmlType,
        layers: usize,
        tied: bool,
    ) -> GgmlType {
        if self == Scheme::F32 || !is_quantizable(name, dims) {
            return if source.block_size() == 1 {
                source
            } else {
                GgmlType::F32
            };
        }
        if self == Scheme::F16 {
            return GgmlType::F16;
        }
        let role = Role::of(name);
        let ty = match role {
            Role::Output | Role::TokenEmbedding if role == Role::Output || tied => {
                let base = self.base_type();
                if base == GgmlType::Q8_0 || !dims[0].is_multiple_of(base.block_size() as u64) {
                    GgmlType::Q8_0
                } else {
                    GgmlType::Q6_K
                }
            }
            Role::AttnV(i) => self.attn_v(i, layers),
            Role::FfnDown(i) => self.ffn_down(i, layers),
            Role::AttnQkv => match self {
                Scheme::Q4KM => GgmlType::Q5_K,
                Scheme::Q5KM => GgmlType::Q6_K,
                _ => self.base_type(),
            },
            _ => self.base_type(),
        };
        fallback(ty, dims[0])
    }

    fn attn_v(self, layer: usize, layers: usize) -> GgmlType {
        match self {
            Scheme::Q4KM | Scheme::Q5KM if use_more_bits(layer, layers) => GgmlType::Q6_K,
            Scheme::Q4KS if layer < 4 => GgmlType::Q5_K,
            _ => self.base_type(),
        }
    }

    fn ffn_down(self, layer: usize, layers: usize) -> GgmlType {
        match self {
            Scheme::Q4KM | Scheme::Q5KM if use_more_bits(layer, layers) => GgmlType::Q6_K,
            Scheme::Q4KS if layer < layers / 8 => GgmlType::Q5_K,
            _ => self.base_type(),
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scheme {
    type Err = QuantizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        Scheme::ALL
            .into_iter()
            .find(|t| t.name() == lower)
            .ok_or_else(|| QuantizeError::UnknownScheme {
                name: s.to_owned(),
                known: Scheme::ALL.map(Scheme::name).join(", "),
            })
    }
}

/// What a tensor is, as far as the policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    TokenEmbedding,
    Output,
    AttnQ(usize),
    AttnK(usize),
    AttnV(usize),
    AttnQkv,
    AttnOutput(usize),
    FfnGate(usize),
    FfnUp(usize),
    FfnDown(usize),
    Other,
}

impl Role {
    pub(crate) fn of(name: &str) -> Role {
        match name {
            "token_embd.weight" => return Role::TokenEmbedding,
            "output.weight" => return Role::Output,
            _ => {}
        }
        let Some((layer, rest)) = name
            .strip_prefix("blk.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest)))
        else {
            return Role::Other;
        };
        match rest {
            "attn_q.weight" => Role::AttnQ(layer),
            "attn_k.weight" => Role::AttnK(layer),
            "attn_v.weight" => Role::AttnV(layer),
            "attn_qkv.weight" => Role::AttnQkv,
            "attn_output.weight" => Role::AttnOutput(layer),
            "ffn_gate.weight" => Role::FfnGate(layer),
            "ffn_up.weight" => Role::FfnUp(layer),
            "ffn_down.weight" => Role::FfnDown(layer),
            _ => Role::Other,
        }
    }
}

/// llama.cpp's rule for which weights are quantized at all.
fn is_quantizable(name: &str, dims: &[u64]) -> bool {
    dims.len() >= 2
        && name.ends_with("weight")
        && !name.contains("_norm.weight")
        && name != "position_embd.weight"
        && name != "token_types.weight"
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third between.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    let (i, n) = (layer as i64, layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// llama.cpp's `tensor_type_fallback`: a type whose blocks fit rows of `row_len` elements.
fn fallback(ty: GgmlType, row_len: u64) -> GgmlType {
    if row_len.is_multiple_of(ty.block_size() as u64) {
        return ty;
    }
    let smaller = match ty {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        other => other,
    };
    if row_len.is_multiple_of(smaller.block_size() as u64) {
        smaller
    } else {
        GgmlType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_list_the_known_ones() {
        for s in Scheme::ALL {
            assert_eq!(s.name().parse::<Scheme>().unwrap(), s);
        }
        assert_eq!("Q4_K_M".parse::<Scheme>().unwrap(), Scheme::Q4KM);
        let err = "q3_k_xl".parse::<Scheme>().unwrap_err().to_string();
        assert!(err.contains("q3_k_xl") && err.contains("q4_k_m"), "{err}");
    }

    #[test]
    fn use_more_bits_matches_llama_cpp_for_thirty_layers() {
        // n/8 = 3, 7n/8 = 26: layers 0-2, 26-29, and (i - 3) % 3 == 2 → 5, 8, ..., 23.
        let more: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(more, [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]);
    }

    #[test]
    fn policy_follows_llama_cpp() {
        let w = |d0: u64| [d0, 64u64];
        let q =
            |s: Scheme, name: &str, d0: u64| s.tensor_type(name, &w(d0), GgmlType::F32, 30, true);
        // Norms and 1-D tensors keep their type; quantized 1-D sources are written as F32.
        assert_eq!(
            Scheme::Q4_0.tensor_type("blk.0.attn_norm.weight", &[576], GgmlType::F32, 30, true),
            GgmlType::F32
        );
        assert_eq!(
            Scheme::Q4_0.tensor_type("blk.0.ffn_norm.weight", &[576, 1], GgmlType::Q8_0, 30, true),
            GgmlType::F32
        );
        // The tied embedding is the head: Q6_K on 256-divisible rows, else Q8_0.
        assert_eq!(q(Scheme::Q4_0, "token_embd.weight", 512), GgmlType::Q6_K);
        assert_eq!(q(Scheme::Q4_0, "token_embd.weight", 576), GgmlType::Q8_0);
        assert_eq!(q(Scheme::Q8_0, "token_embd.weight", 512), GgmlType::Q8_0);
        // Untied: the embedding gets the base type, the head the output rule.
        assert_eq!(
            Scheme::Q4_0.tensor_type("token_embd.weight", &w(512), GgmlType::F32, 30, false),
            GgmlType::Q4_0
        );
        assert_eq!(q(Scheme::Q4_1, "output.weight", 512), GgmlType::Q6_K);
        // Q4_K_M's extra bits, and the shape fallback.
        assert_eq!(q(Scheme::Q4KM, "blk.0.attn_v.weight", 512), GgmlType::Q6_K);
        assert_eq!(q(Scheme::Q4KM, "blk.3.attn_v.weight", 512), GgmlType::Q4_K);
        assert_eq!(
            q(Scheme::Q4KM, "blk.5.ffn_down.weight", 1536),
            GgmlType::Q6_K
        );
        assert_eq!(
            q(Scheme::Q4KM, "blk.5.ffn_down.weight", 1000 * 32),
            GgmlType::Q6_K
        );
        assert_eq!(
            q(Scheme::Q4KM, "blk.4.ffn_down.weight", 1536),
            GgmlType::Q4_K
        );
        assert_eq!(q(Scheme::Q4KM, "blk.4.attn_q.weight", 576), GgmlType::Q5_0);
        assert_eq!(q(Scheme::Q4KM, "blk.0.attn_v.weight", 576), GgmlType::Q8_0);
        assert_eq!(q(Scheme::Q5K, "blk.4.attn_q.weight", 576), GgmlType::Q5_1);
        assert_eq!(q(Scheme::Q4KS, "blk.3.attn_v.weight", 512), GgmlType::Q5_K);
        assert_eq!(q(Scheme::Q4KS, "blk.4.attn_v.weight", 512), GgmlType::Q4_K);
        assert_eq!(q(Scheme::Q4_0, "blk.4.attn_q.weight", 48), GgmlType::F16);
    }
}
