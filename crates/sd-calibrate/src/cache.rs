//! The calibration cache: a YAML file with every decision and its evidence.
//!
//! Deterministic byte for byte: records are in execution order, maps are structs
//! (fixed field order), floats are written by the YAML serializer's shortest
//! round-trip formatting (the same f32 always gives the same text, and reads back to
//! the same bits), and there is no timestamp or path in it.

use std::path::Path;

use sd_checkpoint::fingerprint::ModelFingerprint;
use sd_fp8::Fp8Format;
use sd_model::{ActivationQuant, LinearQuant, PrecisionPlan, WeightQuant};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::hist::Method;
use crate::{CalibrateError, Result, Target};

pub const FORMAT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationCache {
    pub format_version: u32,
    pub model: ModelRecord,
    pub prompts: PromptRecord,
    pub settings: Settings,
    pub summary: Summary,
    /// Every linear layer of the transformer, in execution order.
    pub layers: Vec<LayerRecord>,
    /// Attention Q, K, V and softmax statistics (with `--observe-attention`); the
    /// chosen formats are advisory (no backend quantizes attention yet).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attention: Vec<TensorRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// [`ModelFingerprint::id`].
    pub fingerprint: String,
    /// The transformer component's own digest.
    pub transformer: String,
    pub num_layers: usize,
    pub inner_dim: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    /// SHA-256 of the prompt set (see `PromptSet::hash`).
    pub sha256: String,
    pub count: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    pub target: Target,
    pub method: Method,
    pub percentile: f64,
    pub samples: usize,
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    pub guidance: f32,
    pub seed: u64,
    pub max_sequence_length: usize,
    pub weight_granularity: WeightGranularity,
    /// adaLN modulation weights are stored in FP8 (`fp8` or `fp8_weights`, see
    /// [`Settings::adaln`]).
    pub quantize_adaln: bool,
    /// ... with their activations left unquantized (absent in older caches: false).
    #[serde(default, skip_serializing_if = "is_false")]
    pub adaln_weight_only: bool,
    /// T5's linear layers were calibrated too (absent in older caches: false).
    #[serde(default)]
    pub quantize_t5: bool,
    /// E5M2 is chosen only when its error is lower than E4M3's by this many dB.
    pub e5m2_margin_db: f64,
    /// `mse` keeps the largest threshold within this many dB of the least error.
    pub mse_tolerance_db: f64,
    /// Effective exclusion patterns (defaults + user's).
    pub exclude: Vec<String>,
    pub histogram: String,
    pub candidates: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightGranularity {
    PerChannel,
    PerTensor,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub layers: usize,
    /// Layers run as FP8 GEMMs (weights and activations).
    pub fp8_layers: usize,
    /// Layers with FP8 weights and high-precision activations (absent in older caches).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub weight_only_layers: usize,
    pub e4m3_activations: usize,
    pub e5m2_activations: usize,
    pub excluded: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub name: String,
    pub role: String,
    pub in_features: usize,
    pub out_features: usize,
    pub quantized: bool,
    /// Only the weights are FP8; the input stays at the engine's high precision (the
    /// activation record is evidence, not used). Absent in older caches: false.
    #[serde(default, skip_serializing_if = "is_false")]
    pub weight_only: bool,
    /// The pattern that kept this layer in high precision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub excluded_by: Option<String>,
    pub activation: TensorRecord,
    pub weight: WeightRecord,
}

/// An observed tensor: the decision and its evidence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorRecord {
    pub name: String,
    pub format: Fp8Format,
    pub scale: f32,
    pub threshold: f32,
    pub amax: f32,
    pub sqnr_db: f64,
    /// Values observed and their mean square.
    pub count: u64,
    pub mean_square: f64,
    /// amax at each denoising step (max over samples).
    pub step_amax: Vec<f32>,
    /// The best threshold per format under the method, with every candidate's MSE.
    pub evidence: Vec<FormatEvidence>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FormatEvidence {
    pub format: Fp8Format,
    pub allowed: bool,
    pub threshold: f32,
    pub scale: f32,
    pub mse: f64,
    pub sqnr_db: f64,
    /// MSE at thresholds `amax * 2^(-k/16)`, k = 0, 1, ...
    pub candidate_mse: Vec<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WeightRecord {
    pub format: Fp8Format,
    pub granularity: WeightGranularity,
    /// Per output channel (or one) scales: channel amax / 448.
    pub scales: Vec<f32>,
    /// Per-tensor amax (the naive baseline's weight scale is amax / 448).
    pub amax: f32,
    pub sqnr_db: f64,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl Settings {
    /// How the adaLN modulation layers were calibrated.
    pub fn adaln(&self) -> crate::AdalnPrecision {
        match (self.quantize_adaln, self.adaln_weight_only) {
            (false, _) => crate::AdalnPrecision::High,
            (true, true) => crate::AdalnPrecision::Fp8Weights,
            (true, false) => crate::AdalnPrecision::Fp8,
        }
    }
}

impl CalibrationCache {
    pub fn to_yaml(&self) -> Result<String> {
        serde_norway::to_string(self)
            .map_err(|e| CalibrateError::Input(format!("cannot serialize the cache: {e}")))
    }

    pub fn from_yaml(origin: &str, text: &str) -> Result<Self> {
        let bad = |reason: String| CalibrateError::Cache {
            path: origin.to_string(),
            reason,
        };
        // Check the version before the schema, so an old cache says why.
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let v: Version = serde_norway::from_str(text)
            .map_err(|e| bad(format!("not a calibration cache ({e})")))?;
        if v.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {} is not supported (this build reads {FORMAT_VERSION}); re-run `sd-build calibrate`",
                v.format_version
            )));
        }
        let c: Self = serde_norway::from_str(text).map_err(|e| bad(e.to_string()))?;
        c.validate().map_err(bad)?;
        Ok(c)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        let ok = |s: f32| s.is_finite() && s > 0.0;
        for l in &self.layers {
            if !l.quantized {
                if l.weight_only {
                    return Err(format!(
                        "layer {}: weight_only is set on a layer that is not quantized",
                        l.name
                    ));
                }
                continue;
            }
            if !l.weight_only && !ok(l.activation.scale) {
                return Err(format!(
                    "layer {}: activation scale {} is not positive and finite",
                    l.name, l.activation.scale
                ));
            }
            if !(l.weight.scales.len() == 1 || l.weight.scales.len() == l.out_features) {
                return Err(format!(
                    "layer {}: {} weight scales for {} output channels",
                    l.name,
                    l.weight.scales.len(),
                    l.out_features
                ));
            }
            if let Some(s) = l.weight.scales.iter().find(|s| !ok(**s)) {
                return Err(format!(
                    "layer {}: weight scale {s} is not positive and finite",
                    l.name
                ));
            }
            if !l.weight_only && !self.settings.target.allows_activation(l.activation.format) {
                return Err(format!(
                    "layer {}: {} activations are not allowed for target {}",
                    l.name, l.activation.format, self.settings.target
                ));
            }
        }
        Ok(())
    }

    /// Reads and validates a cache file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| CalibrateError::Cache {
            path: path.display().to_string(),
            reason: format!("cannot read it: {e}"),
        })?;
        Self::from_yaml(&path.display().to_string(), &text)
    }

    /// Writes the cache atomically (temporary file in the target directory, then
    /// rename): an interrupted write leaves no partial cache.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let text = self.to_yaml()?;
        atomic_write(path.as_ref(), text.as_bytes())
    }

    /// Refuses a cache made for another model.
    pub fn check_model(&self, fp: &ModelFingerprint) -> Result<()> {
        if fp.id != self.model.fingerprint {
            return Err(CalibrateError::ModelMismatch {
                cache: short(&self.model.fingerprint).to_string(),
                model: fp.short().to_string(),
            });
        }
        Ok(())
    }

    /// Refuses a cache made for another engine target.
    pub fn check_target(&self, target: Target) -> Result<()> {
        if target != self.settings.target {
            return Err(CalibrateError::TargetMismatch {
                cache: self.settings.target,
                wanted: target,
            });
        }
        Ok(())
    }

    pub fn target(&self) -> Target {
        self.settings.target
    }

    /// The precision plan: FP8 entries (weights E4M3 with the stored scales, inputs
    /// with the chosen format and scale) for every quantized layer; weight-only
    /// entries for the layers calibrated that way.
    pub fn plan(&self) -> PrecisionPlan {
        let mut plan = PrecisionPlan::default();
        for l in self.layers.iter().filter(|l| l.quantized) {
            let weight = WeightQuant {
                format: l.weight.format,
                scales: l.weight.scales.clone(),
            };
            let quant = if l.weight_only {
                LinearQuant::Fp8WeightOnly { weight }
            } else {
                LinearQuant::Fp8 {
                    weight,
                    input: ActivationQuant {
                        format: l.activation.format,
                        scale: l.activation.scale,
                    },
                }
            };
            plan.layers.insert(l.name.clone(), quant);
        }
        plan
    }

    /// The naive baseline from the same observations: every transformer linear in
    /// E4M3, activation scale amax/448, one weight scale amax/448 per tensor.
    pub fn naive_plan(&self) -> PrecisionPlan {
        let e4 = Fp8Format::E4M3;
        let mut plan = PrecisionPlan::default();
        for l in &self.layers {
            plan.layers.insert(
                l.name.clone(),
                LinearQuant::Fp8 {
                    weight: WeightQuant {
                        format: e4,
                        scales: vec![crate::hist::scale_for(e4, l.weight.amax)],
                    },
                    input: ActivationQuant {
                        format: e4,
                        scale: crate::hist::scale_for(e4, l.activation.amax),
                    },
                },
            );
        }
        plan
    }

    /// Hex SHA-256 of the cache's canonical YAML.
    pub fn content_hash(&self) -> String {
        let text = self.to_yaml().unwrap_or_default();
        hex::encode(Sha256::digest(text.as_bytes()))
    }
}

fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// Writes `data` through a temporary file in `path`'s directory, then renames it.
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let io = |e: std::io::Error| CalibrateError::Output {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if path.is_dir() {
        return Err(CalibrateError::Output {
            path: path.display().to_string(),
            reason: "it is a directory".into(),
        });
    }
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io)?;
    // Temporary files are created 0600; a cache or report is an ordinary output file.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(io)?;
    }
    tmp.write_all(data).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}
