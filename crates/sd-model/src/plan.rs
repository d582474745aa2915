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

impl WeightQuant {
    /// The scale of output channel `row` (a per-tensor scale serves every row).
    pub fn scale(&self, row: usize) -> f32 {
        if self.scales.len() == 1 {
            self.scales[0]
        } else {
            self.scales[row]
        }
    }

    /// Checks the scales of `layer`'s `[out, in]` weight: one per output channel or one
    /// for the tensor, each positive and finite. The message names the layer.
    pub fn check(&self, layer: &str, out: usize) -> Result<(), String> {
        if self.scales.len() != out && self.scales.len() != 1 {
            return Err(format!(
                "layer {layer}: {} weight scales for {out} output channels",
                self.scales.len()
            ));
        }
        if let Some(bad) = self.scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
            return Err(format!(
                "layer {layer}: weight scale {bad} is not positive and finite"
            ));
        }
        Ok(())
    }

    /// Replaces `weight` (`[out, in]` row-major, `in_features` per row) by the values
    /// its FP8 codes stand for (`code * scale`). The caller checks the scale count.
    pub fn fake_quantize(&self, weight: &mut [f32], in_features: usize) {
        for (o, row) in weight.chunks_mut(in_features.max(1)).enumerate() {
            sd_fp8::fake_quantize_slice(self.format, row, self.scale(o));
        }
    }
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
    /// FP8 weights, input activations at the backend's compute precision ("W8A16"):
    /// halves the weight bytes of layers whose activation quantization costs too much
    /// fidelity for what it buys (adaLN modulation: one row per batch entry, so its
    /// GEMM is bound by weight bytes, never by FP8 math).
    Fp8WeightOnly { weight: WeightQuant },
}

impl LinearQuant {
    /// Runs as an FP8 x FP8 GEMM (weights and activations quantized).
    pub fn is_fp8(&self) -> bool {
        matches!(self, Self::Fp8 { .. })
    }

    /// The weight quantization, for every variant that stores FP8 weights.
    pub fn weight_quant(&self) -> Option<&WeightQuant> {
        match self {
            Self::None => None,
            Self::Fp8 { weight, .. } | Self::Fp8WeightOnly { weight } => Some(weight),
        }
    }

    /// The activation quantization, where the input is quantized.
    pub fn input_quant(&self) -> Option<&ActivationQuant> {
        match self {
            Self::Fp8 { input, .. } => Some(input),
            Self::None | Self::Fp8WeightOnly { .. } => None,
        }
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
    /// Layers that run as FP8 x FP8 GEMMs.
    pub fn fp8_layer_count(&self) -> usize {
        self.layers.values().filter(|q| q.is_fp8()).count()
    }
    /// Layers that store FP8 weights (FP8 GEMMs and weight-only layers).
    pub fn fp8_weight_layer_count(&self) -> usize {
        self.layers
            .values()
            .filter(|q| q.weight_quant().is_some())
            .count()
    }
}
