//! The bundle manifest (`manifest.json`): what the engine is, what it was built from,
//! for which target, and a checksum of every payload file.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Bumped on any change a loader of an older version would misread. Version 2 added
/// weight-only FP8 layers ([`PRECISION_FP8_WEIGHT_ONLY`]), which a version-1 loader
/// would take for dense tensors of an unknown dtype.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this build still reads (every version-1 bundle is a valid
/// version-2 bundle without weight-only layers).
pub const OLDEST_READABLE_FORMAT_VERSION: u32 = 1;

/// [`LayerEntry::precision`] of a layer run as an FP8 GEMM (weights and input FP8).
pub const PRECISION_FP8: &str = "fp8";
/// [`LayerEntry::precision`] of a layer with FP8 weights and a high-precision input.
pub const PRECISION_FP8_WEIGHT_ONLY: &str = "fp8_weight_only";
/// [`LayerEntry::precision`] of a layer the plan keeps at the compute precision.
pub const PRECISION_DENSE: &str = "dense";
/// The `format` field of every manifest.
pub const FORMAT_NAME: &str = "sd-engine-bundle";
/// The manifest's file name inside a bundle directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// What executes the bundle.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Cpu,
    Cuda,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

/// Precision of the transformer's linear layers: `fp8` = as the calibration plan says
/// (layers it excludes stay dense), `bf16` = none in FP8.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp8,
    Bf16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fp8 => "fp8",
            Self::Bf16 => "bf16",
        })
    }
}

/// What everything that is not an FP8 GEMM computes in, and therefore how dense
/// tensors are stored: `bf16` stores them as BF16; `fp32` keeps the checkpoint's dtype
/// (lossless), for bit-exact parity with an FP32 run from the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compute {
    Bf16,
    Fp32,
}

impl std::fmt::Display for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Bf16 => "bf16",
            Self::Fp32 => "fp32",
        })
    }
}

/// How FP8 weight codes are laid out in the payload; a per-target choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fp8Layout {
    /// `[out, in]` row-major, as in the checkpoint (tensor `<layer>.weight`): the cpu target.
    OutIn,
    /// The codes as cuBLASLt's FP8 "TN" GEMM reads them (tensor `<layer>.weight_tn`):
    /// the cuda target. FP8 GEMMs on Hopper/Ada take A transposed, i.e. both operands
    /// K-major; a row-major `[out, in]` matrix is exactly column-major `[in, out]` with
    /// `lda = in`, so the stored shape is `[out, in]` and the GPU uploads the bytes as
    /// they are. It is a separate layout from `OutIn` (and a separate tensor name) so
    /// the payload of one target is never mistaken for the other's.
    CublasltTn,
}

impl Fp8Layout {
    pub fn weight_tensor(self, layer: &str) -> String {
        match self {
            Self::OutIn => format!("{layer}.weight"),
            Self::CublasltTn => format!("{layer}.weight_tn"),
        }
    }
}

/// Safetensors tensor names of a layer's scales.
pub fn weight_scale_tensor(layer: &str) -> String {
    format!("{layer}.weight_scale")
}
pub fn input_scale_tensor(layer: &str) -> String {
    format!("{layer}.input_scale")
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT_NAME`].
    pub format: String,
    pub format_version: u32,
    /// The tool that wrote it (`sd-engine 0.1.0`).
    pub created_by: String,
    pub target: Target,
    pub precision: Precision,
    pub compute: Compute,
    pub model: ModelInfo,
    /// `None` for bundles without FP8 layers.
    pub calibration: Option<CalibrationInfo>,
    /// Raw `config.json` of every component (and `scheduler_config.json`), keyed by
    /// component directory name (`transformer`, `text_encoder`, ...).
    pub configs: BTreeMap<String, serde_json::Value>,
    /// One entry per weight payload.
    pub components: Vec<ComponentEntry>,
    /// Every linear layer the precision plan names, FP8 or not.
    pub layers: Vec<LayerEntry>,
    /// Tokenizer directory name -> files copied into the bundle (paths relative to it).
    pub tokenizers: BTreeMap<String, Vec<String>>,
    /// Checksums of every file in the bundle but the manifest.
    pub files: Vec<FileEntry>,
    /// Filled by the cuda target only.
    pub cuda: Option<CudaInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `ModelFingerprint::id` of the checkpoint compiled.
    pub fingerprint: String,
    /// Per-component fingerprints.
    pub components: BTreeMap<String, String>,
    /// Where it was compiled from (informational).
    pub source: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CalibrationInfo {
    /// Content hash of the calibration cache whose plan was compiled.
    pub hash: String,
    /// Where it was read from (informational).
    pub source: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComponentEntry {
    /// Component directory name: `transformer`, `text_encoder`, `text_encoder_2`,
    /// `text_encoder_3`, `vae`.
    pub name: String,
    /// Payload path relative to the bundle.
    pub file: String,
    pub tensors: usize,
    /// Tensor bytes in the payload (FP8 codes, scales and dense tensors).
    pub bytes: u64,
    /// Bytes of FP8 weight codes among them.
    pub fp8_bytes: u64,
    /// Dtypes of the dense tensors (`bf16`, `f16`, `f32`) with their counts.
    pub dense_dtypes: BTreeMap<String, usize>,
    /// Layout of FP8 weight codes in this payload (`None` when it has none).
    pub fp8_layout: Option<Fp8Layout>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerEntry {
    /// Parameter prefix, e.g. `transformer_blocks.3.attn.to_q`.
    pub name: String,
    pub component: String,
    /// `fp8` or `dense`.
    pub precision: String,
    /// `e4m3` / `e5m2` for FP8 layers.
    pub weight_format: Option<String>,
    pub input_format: Option<String>,
    /// The static activation scale, for reading; the exact value is the payload's
    /// `input_scale` tensor.
    pub input_scale: Option<f32>,
    /// Number of weight scales (1 = per tensor, `out` = per channel), stored in the
    /// payload tensor `weight_scale`.
    pub weight_scales: Option<usize>,
    /// Payload tensors of this layer.
    pub weight_tensor: Option<String>,
    pub weight_scale_tensor: Option<String>,
    pub input_scale_tensor: Option<String>,
    /// `[out, in]`.
    pub shape: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Relative to the bundle directory, `/`-separated.
    pub path: String,
    pub bytes: u64,
    /// Hex SHA-256.
    pub sha256: String,
}

/// What a `cuda` bundle was built for and with. Every field is filled by the cuda
/// target at compile time (on the GPU it targets).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CudaInfo {
    /// e.g. `NVIDIA H100 80GB HBM3`.
    pub gpu_name: Option<String>,
    /// `[major, minor]`, e.g. `[9, 0]`; a loader refuses another architecture.
    pub compute_capability: Option<[u32; 2]>,
    /// CUDA runtime / driver API version the bundle was built against (`13.0`).
    pub cuda_version: Option<String>,
    pub driver_version: Option<String>,
    /// cuBLASLt version used to choose the algorithms.
    pub cublaslt_version: Option<String>,
    /// GEMM shape key (`m x n x k`, dtypes) -> chosen algorithm, opaque to the manifest.
    pub gemm_algorithms: BTreeMap<String, serde_json::Value>,
    /// Compiled kernels.
    pub kernels: Vec<KernelEntry>,
    /// Hash of the kernel sources the PTX was compiled from: a loader whose kernel
    /// launches were written for other sources refuses the bundle.
    #[serde(default)]
    pub kernel_sources: Option<String>,
    /// How the FP8 GEMMs accumulate (`native` or `fast-accum`, sd-cuda's `Fp8Gemm`
    /// names); absent in bundles from before the choice existed, which are `native`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp8_gemm: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelEntry {
    pub name: String,
    /// Hash of the kernel source and compile options.
    pub build_id: String,
    /// `sm_90a`, ...
    pub arch: String,
    /// `ptx` or `cubin`.
    pub kind: String,
    /// Payload path relative to the bundle (listed in `files` too).
    pub file: String,
}

impl Manifest {
    pub fn file(&self, path: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.path == path)
    }
    pub fn component(&self, name: &str) -> Option<&ComponentEntry> {
        self.components.iter().find(|c| c.name == name)
    }
    /// Layers run as FP8 GEMMs.
    pub fn fp8_layer_count(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| l.precision == PRECISION_FP8)
            .count()
    }
    /// Layers with FP8 weights and a high-precision input.
    pub fn fp8_weight_only_layer_count(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| l.precision == PRECISION_FP8_WEIGHT_ONLY)
            .count()
    }
    /// Bytes of every payload file.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::CudaInfo;

    #[test]
    fn fp8_gemm_is_optional_and_kept_when_given() {
        // A bundle written before the field existed still parses (native accumulation).
        let old: CudaInfo = serde_json::from_str(r#"{"gpu_name": null, "compute_capability": null, "cuda_version": null, "driver_version": null, "cublaslt_version": null, "gemm_algorithms": {}, "kernels": []}"#).unwrap();
        assert_eq!(old.fp8_gemm, None);
        assert!(!serde_json::to_string(&old).unwrap().contains("fp8_gemm"));
        let fast = CudaInfo {
            fp8_gemm: Some("fast-accum".into()),
            ..CudaInfo::default()
        };
        let back: CudaInfo = serde_json::from_str(&serde_json::to_string(&fast).unwrap()).unwrap();
        assert_eq!(back.fp8_gemm.as_deref(), Some("fast-accum"));
    }
}
