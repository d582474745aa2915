//! Engine bundles: what `sd-build compile` writes, `sd-build inspect` describes, and
//! `sd-build generate --engine` / `sd-serve` load.
//!
//! A bundle is a directory:
//!
//! ```text
//! ENGINE/
//!   manifest.json                    format, version, target, model fingerprint,
//!                                    calibration hash, configs, per-layer plan,
//!                                    sizes, SHA-256 of every file below
//!   weights/transformer.safetensors  FP8 layers: `<layer>.weight` U8 codes (cpu) or
//!                                    `<layer>.weight_tn` (cuda, [out, in]) +
//!                                    `<layer>.weight_scale` F32 + `<layer>.input_scale`
//!                                    F32; everything else dense (BF16 by default)
//!   weights/text_encoder{,_2,_3}.safetensors, weights/vae.safetensors
//!   tokenizer/ tokenizer_2/ tokenizer_3/   copied from the checkpoint
//!   kernels/                         (cuda) PTX / cubin, listed in the manifest
//! ```
//!
//! It is written into a hidden sibling directory and renamed into place, so a reader
//! never sees half a bundle; loading verifies every checksum.

mod bundle;
pub mod compile;
pub mod host;
pub mod manifest;
mod payload;

pub use bundle::{Bundle, BundleWeights, Fp8Weight, Verify, read_manifest, verify_report};
pub use compile::{CompileOptions, TargetBuilder, TargetExtras, compile, compile_with};
pub use manifest::{
    CalibrationInfo, Compute, CudaInfo, FORMAT_VERSION, Fp8Layout, Manifest, Precision, Target,
};

use std::path::{Path, PathBuf};

use sd_checkpoint::component;
use sd_cpu::{ComputePrecision, CpuBackend};
use sd_pipeline::{ComponentWeights, Sd3Pipeline};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(
        "{dir} is not an engine bundle ({reason}); build one with `sd-build compile --model DIR --target cpu --out {dir}`"
    )]
    NotABundle { dir: PathBuf, reason: String },
    #[error(
        "engine bundle {dir} has format version {found}; this build reads versions {oldest} to {expected}. Rebuild it with this sd-build: `sd-build compile ... --out {dir} --force`"
    )]
    Version {
        dir: PathBuf,
        found: u64,
        oldest: u32,
        expected: u32,
    },
    #[error(
        "engine bundle {dir} was compiled from another model (bundle: {bundle} from {bundle_source}; --model {model_dir}: {model}). Rebuild it from this model: `sd-build compile --model {model_dir} ... --out {dir} --force`"
    )]
    ModelMismatch {
        dir: PathBuf,
        bundle: String,
        bundle_source: String,
        model: String,
        model_dir: PathBuf,
    },
    #[error(
        "engine bundle {dir} is for the {bundle} target, not {wanted}; compile one with `--target {wanted}`"
    )]
    TargetMismatch {
        dir: PathBuf,
        bundle: Target,
        wanted: Target,
    },
    #[error(
        "engine bundle {dir} was compiled for {bundle} ({bundle_gpu}); this GPU is {here_gpu} ({here}). Rebuild it on this GPU: `sd-build compile --target cuda ... --out {dir} --force`"
    )]
    GpuMismatch {
        dir: PathBuf,
        bundle: String,
        bundle_gpu: String,
        here: String,
        here_gpu: String,
    },
    #[error(
        "engine bundle {dir}: {file} does not match its checksum (modified or corrupted); rebuild the bundle with `sd-build compile ... --out {dir} --force` or copy it again"
    )]
    Checksum { dir: PathBuf, file: String },
    #[error(
        "engine bundle {dir}: {file} is truncated ({found} bytes, the manifest says {expected}); the copy is incomplete — copy the bundle again or rebuild it with `sd-build compile ... --out {dir} --force`"
    )]
    Truncated {
        dir: PathBuf,
        file: String,
        expected: u64,
        found: u64,
    },
    #[error(
        "engine bundle {dir}: {file} is missing; copy the whole bundle directory again or rebuild it with `sd-build compile ... --out {dir} --force`"
    )]
    MissingFile { dir: PathBuf, file: String },
    #[error("{path} is corrupt: {reason}; rebuild the bundle with `sd-build compile ... --force`")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{0} already exists; pass --force to replace it")]
    Exists(PathBuf),
    #[error(
        "an fp8 engine needs a calibration cache: run `sd-build calibrate --model DIR ...` and pass `--calibration CACHE.yaml`, or compile with `--precision bf16`"
    )]
    NoCalibration,
    #[error("the precision plan does not fit the model: {0}")]
    PlanMismatch(String),
    #[error("cannot compile for --target cuda: {0}")]
    CudaUnavailable(String),
    /// The cuda executor refused or failed (a missing library, no FP8 tensor cores, a
    /// driver error); the message says what to do.
    #[error("{0}")]
    Gpu(String),
    #[error("{0}")]
    Usage(String),
    #[error("cannot access {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Checkpoint(#[from] sd_checkpoint::CheckpointError),
    #[error(transparent)]
    Model(#[from] sd_model::ModelError),
    #[error(transparent)]
    Pipeline(#[from] sd_pipeline::PipelineError),
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// The CPU backend a bundle was compiled for.
pub fn cpu_backend_for(m: &Manifest) -> CpuBackend {
    CpuBackend::new(match m.compute {
        Compute::Bf16 => ComputePrecision::Bf16,
        Compute::Fp32 => ComputePrecision::F32,
    })
}

/// Loads a verified `cpu` bundle into a pipeline on the CPU backend it was compiled
/// for (FP8 layers run the exact FP8 simulation).
pub fn load_cpu_pipeline_from(bundle: &Bundle) -> Result<Sd3Pipeline<CpuBackend>> {
    bundle.check_target(Target::Cpu)?;
    load_pipeline_with(bundle, cpu_backend_for(&bundle.manifest))
}

/// Loads a verified bundle's configs, tokenizers, plan and weights into a pipeline on
/// `backend` (which the caller chose for the bundle's target). FP8 layers' weights
/// reach the backend dequantized (`code * scale`); a backend that runs FP8 GEMMs takes
/// the codes themselves beforehand ([`BundleWeights::fp8`]).
pub fn load_pipeline_with<B: sd_model::Backend>(
    bundle: &Bundle,
    backend: B,
) -> Result<Sd3Pipeline<B>> {
    let configs = bundle.configs()?;
    configs.validate(bundle.dir.clone())?;
    let plan = bundle.plan()?;
    let transformer = bundle.weights(component::TRANSFORMER)?;
    let clip_l = bundle.weights(component::CLIP_L)?;
    let clip_g = bundle.weights(component::CLIP_G)?;
    let t5 = match configs.t5 {
        Some(_) => Some(bundle.weights(component::T5)?),
        None => None,
    };
    let vae = bundle.weights(component::VAE)?;
    let weights = ComponentWeights {
        transformer: &transformer,
        clip_l: &clip_l,
        clip_g: &clip_g,
        t5: t5.as_ref().map(|w| w as &dyn sd_model::WeightSource),
        vae: &vae,
    };
    Ok(Sd3Pipeline::from_parts(
        &configs,
        weights,
        bundle.tokenizers()?,
        backend,
        &plan,
    )?)
}

/// Refuses `bundle` unless it was compiled from the checkpoint at `model_dir` (for
/// `generate --engine E --model M`; hashes the checkpoint's weights once).
pub fn check_bundle_model(bundle: &Bundle, model_dir: &Path) -> Result<()> {
    let ckpt = sd_checkpoint::Checkpoint::open(model_dir)?;
    let fp = sd_checkpoint::fingerprint::ModelFingerprint::compute(&ckpt)?;
    bundle.check_model(&fp, model_dir)
}

/// Opens (verifying every checksum) and loads a `cpu` bundle.
pub fn load_cpu_pipeline(dir: impl AsRef<Path>) -> Result<Sd3Pipeline<CpuBackend>> {
    load_cpu_pipeline_from(&Bundle::open(dir)?)
}
