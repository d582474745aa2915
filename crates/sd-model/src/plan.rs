//! The precision plan: for every linear layer, whether it runs in FP8 and with which
//! formats and scales. Produced by calibration, consumed by every backend.

use std::collections::BTreeMap;

use sd_fp8::Fp8Format;

/// How a weight matrix is quantized. Weights are always E4M3 in practice (cuBLASLt and
/// TensorRT both want it), but the format is recorded rather than assumed.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightQuant {
    pub format: Fp8Format,
    /// One scale per output channel, or a single per-tensor scale.
    pub scales: Vec<f32>,
}

/// How the input activation of a linear layer is quantized: one static scale.
#[derive(Clone, Debug, PartialEq)]
pub struct ActivationQuant {
    pub format: Fp8Format,
    pub scale: f32,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub enum LinearQuant {
    /// Runs at the backend's compute precision (FP32 or BF16).
    #[default]
    None,
    /// FP8 weights and FP8 input activations, FP32 accumulation.
    Fp8 {
        weight: WeightQuant,
        input: ActivationQuant,
    },
}

impl LinearQuant {
    pub fn is_fp8(&self) -> bool {
        matches!(self, Self::Fp8 { .. })
    }
}

/// Per-layer decisions, keyed by the linear layer's full parameter prefix
/// (e.g. `transformer_blocks.3.attn.to_q`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PrecisionPlan {
    pub layers: BTreeMap<String, LinearQuant>,
}

impl PrecisionPlan {
    pub fn full_precision() -> Self {
        Self::default()
    }
    pub fn get(&self, layer: &str) -> LinearQuant {
        self.layers.get(layer).cloned().unwrap_or_default()
    }
    pub fn fp8_layer_count(&self) -> usize {
        self.layers.values().filter(|q| q.is_fp8()).count()
    }
}
