//! FP8 post-training calibration of the SD3 / SD3.5 transformer.
//!
//! [`calibrate`] runs the FP32 CPU pipeline over a prompt set with an [`Observer`]
//! backend that records, per transformer linear layer, a histogram of |input| and its
//! amax per denoising step. Per layer it then picks the activation format (E4M3, or
//! E5M2 where the target allows it and it lowers the error by a margin) and a static
//! scale (`mse`: least expected squared error over candidate clipping thresholds on
//! the exact FP8 grid; `max`; `percentile`), computes E4M3 weight scales from the
//! weights, and returns a [`CalibrationCache`] with every decision and its evidence.
//! [`CalibrationCache::plan`] turns it into a [`PrecisionPlan`] for any backend.

pub mod cache;
pub mod fidelity;
pub mod hist;
pub mod observer;
pub mod pattern;
pub mod prompts;
pub mod report;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use sd_checkpoint::fingerprint::ModelFingerprint;
use sd_checkpoint::{Checkpoint, CheckpointError, component};
use sd_cpu::{ComputePrecision, CpuBackend};
use sd_fp8::Fp8Format;
use sd_model::mmdit::Mmdit;
use sd_model::t5::T5Encoder;
use sd_model::{PrecisionPlan, WeightSource};
use sd_pipeline::{GenerateRequest, PipelineError, Sd3Pipeline};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use cache::{CalibrationCache, LayerRecord, TensorRecord, WeightGranularity};
pub use hist::Method;
pub use observer::{Observer, Recorder};
pub use prompts::PromptSet;

#[derive(Debug, Error)]
pub enum CalibrateError {
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("calibration cache {path}: {reason}")]
    Cache { path: String, reason: String },
    #[error(
        "the calibration cache was made for model {cache}, but this model is {model}; re-run `sd-build calibrate` for this model"
    )]
    ModelMismatch { cache: String, model: String },
    #[error(
        "the calibration cache was made for target `{cache}`, not `{wanted}`; re-run `sd-build calibrate --target {wanted}`"
    )]
    TargetMismatch { cache: Target, wanted: Target },
    #[error("cannot write {path}: {reason}")]
    Output { path: String, reason: String },
}

impl From<sd_model::ModelError> for CalibrateError {
    fn from(e: sd_model::ModelError) -> Self {
        Self::Pipeline(PipelineError::Model(e))
    }
}

pub type Result<T, E = CalibrateError> = std::result::Result<T, E>;

/// The engine a calibration is for; it constrains the formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The CPU FP8 simulation: E4M3 or E5M2 activations.
    Cpu,
    /// cuBLASLt: E5M2 activations allowed (E5M2 x E4M3), weights E4M3.
    Cuda,
    /// TensorRT: E4M3 only.
    Tensorrt,
}

impl Target {
    pub fn allows_activation(self, f: Fp8Format) -> bool {
        match self {
            Target::Tensorrt => f == Fp8Format::E4M3,
            Target::Cpu | Target::Cuda => true,
        }
    }
    pub fn activation_formats(self) -> Vec<Fp8Format> {
        Fp8Format::ALL
            .into_iter()
            .filter(|f| self.allows_activation(*f))
            .collect()
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Target::Cpu => "cpu",
            Target::Cuda => "cuda",
            Target::Tensorrt => "tensorrt",
        })
    }
}

impl FromStr for Target {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" => Ok(Target::Cpu),
            "cuda" => Ok(Target::Cuda),
            "tensorrt" | "trt" => Ok(Target::Tensorrt),
            _ => Err(format!(
                "unknown target `{s}` (expected cpu, cuda or tensorrt)"
            )),
        }
    }
}

/// Layers that stay in high precision by default (the practice of TensorRT's SD3 demo
/// and Model Optimizer): patch embedding, time and pooled-text embedders, context
/// embedder, final adaLN and output projection.
pub const DEFAULT_EXCLUDE: &[&str] = &[
    "pos_embed.*",
    "time_text_embed.*",
    "context_embedder",
    "norm_out.*",
    "proj_out",
];
/// The per-block adaLN modulation layers.
pub const ADALN_PATTERNS: &[&str] = &["*.norm1.linear", "*.norm1_context.linear"];
/// How the per-block adaLN modulation layers ([`ADALN_PATTERNS`]) are calibrated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdalnPrecision {
    /// Left at the engine's high precision (excluded from FP8).
    High,
    /// FP8 weights, high-precision activations (W8A16). The default: adaLN is about a
    /// third of a block's parameters, so this is what brings the FP8 weight bytes near
    /// half of BF16, and its input (silu of the timestep embedding, one row per batch
    /// entry) is where activation quantization costs fidelity for no compute gain.
    #[default]
    Fp8Weights,
    /// FP8 weights and activations, like every other quantized layer.
    Fp8,
}

impl fmt::Display for AdalnPrecision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AdalnPrecision::High => "high",
            AdalnPrecision::Fp8Weights => "fp8-weights",
            AdalnPrecision::Fp8 => "fp8",
        })
    }
}

impl FromStr for AdalnPrecision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "high" | "bf16" => Ok(AdalnPrecision::High),
            "fp8-weights" | "fp8_weights" | "w8a16" => Ok(AdalnPrecision::Fp8Weights),
            "fp8" | "w8a8" => Ok(AdalnPrecision::Fp8),
            _ => Err(format!(
                "unknown adaLN precision `{s}` (expected high, fp8-weights or fp8)"
            )),
        }
    }
}
/// E5M2 is chosen only if it lowers the activation MSE by at least this much.
pub const E5M2_MARGIN_DB: f64 = 1.0;
/// `mse` keeps the largest threshold whose error is within this much of the least
/// (see calibration/README.md: clipping for less than this lost fidelity on held-out
/// prompts).
pub const MSE_TOLERANCE_DB: f64 = 0.5;

/// A layer's role, for reports.
pub fn role(name: &str) -> &'static str {
    let leaf_is = |s: &str| name.ends_with(s);
    if name.starts_with("pos_embed") {
        "patch_embed"
    } else if name.starts_with("time_text_embed") {
        "time_text_embed"
    } else if name == "context_embedder" {
        "context_embed"
    } else if name.starts_with("norm_out") {
        "final_adaln"
    } else if name == "proj_out" {
        "final_proj"
    } else if leaf_is(".norm1.linear") || leaf_is(".norm1_context.linear") {
        "adaln"
    } else if leaf_is(".to_out.0") || leaf_is(".to_add_out") {
        "attn_out"
    } else if name.contains(".attn") {
        "attn_qkv"
    } else if leaf_is(".net.0.proj") {
        "mlp_up"
    } else if leaf_is(".net.2") {
        "mlp_down"
    } else if name.starts_with("encoder.block.") {
        if name.contains(".SelfAttention.") {
            "t5_attn"
        } else {
            "t5_mlp"
        }
    } else {
        "other"
    }
}

#[derive(Clone, Debug)]
pub struct CalibrationConfig {
    pub model: PathBuf,
    pub prompts: PromptSet,
    /// Prompts used, spread evenly over the set (cycled if larger than the set);
    /// sample `i` uses seed `seed + i`.
    pub samples: usize,
    pub steps: usize,
    /// Defaults to the model's native size.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub guidance: f32,
    pub seed: u64,
    pub max_sequence_length: usize,
    pub method: Method,
    /// For [`Method::Percentile`], in percent.
    pub percentile: f64,
    pub target: Target,
    /// Patterns added to the defaults.
    pub exclude: Vec<String>,
    /// Use [`DEFAULT_EXCLUDE`].
    pub default_exclusions: bool,
    pub adaln: AdalnPrecision,
    /// Also calibrate T5's linear layers for FP8 (text encoders otherwise stay at the
    /// engine's high precision).
    pub quantize_t5: bool,
    pub weight_granularity: WeightGranularity,
    pub observe_attention: bool,
    pub e5m2_margin_db: f64,
    pub mse_tolerance_db: f64,
}

impl CalibrationConfig {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            prompts: PromptSet::default_set(),
            samples: 32,
            steps: 20,
            width: None,
            height: None,
            guidance: 7.0,
            seed: 0,
            max_sequence_length: 256,
            method: Method::Mse,
            percentile: 99.99,
            target: Target::Cuda,
            exclude: Vec::new(),
            default_exclusions: true,
            adaln: AdalnPrecision::default(),
            quantize_t5: false,
            weight_granularity: WeightGranularity::PerChannel,
            observe_attention: false,
            e5m2_margin_db: E5M2_MARGIN_DB,
            mse_tolerance_db: MSE_TOLERANCE_DB,
        }
    }

    /// The effective exclusion patterns.
    pub fn exclusions(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        if self.default_exclusions {
            v.extend(DEFAULT_EXCLUDE.iter().map(|s| s.to_string()));
        }
        if self.adaln == AdalnPrecision::High {
            v.extend(ADALN_PATTERNS.iter().map(|s| s.to_string()));
        }
        for p in &self.exclude {
            if !v.contains(p) {
                v.push(p.clone());
            }
        }
        v
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(CalibrateError::Input(m));
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        if self.samples == 0 {
            return bad("--samples must be at least 1".into());
        }
        if self.prompts.prompts.is_empty() {
            return bad(format!("prompt set {} is empty", self.prompts.origin));
        }
        if self.method == Method::Percentile && !(self.percentile > 0.0 && self.percentile <= 100.0)
        {
            return bad(format!(
                "--percentile {} must be in (0, 100]",
                self.percentile
            ));
        }
        if !(self.mse_tolerance_db.is_finite() && self.mse_tolerance_db >= 0.0) {
            return bad(format!(
                "the MSE tolerance {} dB must be finite and >= 0",
                self.mse_tolerance_db
            ));
        }
        if !(self.e5m2_margin_db.is_finite() && self.e5m2_margin_db >= 0.0) {
            return bad(format!(
                "the E5M2 margin {} dB must be finite and >= 0",
                self.e5m2_margin_db
            ));
        }
        Ok(())
    }
}

/// What [`calibrate`] is doing, for progress bars.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub stage: &'static str,
    pub done: usize,
    pub total: usize,
}

/// Runs the calibration described by `cfg`.
pub fn calibrate(
    cfg: &CalibrationConfig,
    progress: &mut dyn FnMut(Progress),
) -> Result<CalibrationCache> {
    cfg.check()?;
    let ckpt = Checkpoint::open(&cfg.model)?;
    calibrate_checkpoint(&ckpt, cfg, progress)
}

/// [`calibrate`] for an already opened checkpoint (`cfg.model` is not used).
pub fn calibrate_checkpoint(
    ckpt: &Checkpoint,
    cfg: &CalibrationConfig,
    progress: &mut dyn FnMut(Progress),
) -> Result<CalibrationCache> {
    cfg.check()?;
    progress(Progress {
        stage: "fingerprint",
        done: 0,
        total: 1,
    });
    let fp = ModelFingerprint::compute(ckpt)?;
    let tcfg = ckpt.transformer.clone();
    let mut names = Mmdit::<CpuBackend>::linear_layer_names(&tcfg);
    let t5_names = match (&ckpt.t5, cfg.quantize_t5) {
        (Some(t5), true) => T5Encoder::<CpuBackend>::linear_layer_names(t5),
        (None, true) => {
            return Err(CalibrateError::Input(format!(
                "--quantize-t5: {} has no T5 text encoder",
                ckpt.root.display()
            )));
        }
        (_, false) => Vec::new(),
    };
    names.extend(t5_names.iter().cloned());
    let recorder = Recorder::new(names.iter().cloned(), cfg.observe_attention);
    let backend = Observer::new(CpuBackend::new(ComputePrecision::F32), recorder.clone());
    let pipeline = Sd3Pipeline::load(ckpt, backend, &PrecisionPlan::full_precision())?;
    let native = pipeline.limits.default_size;
    let (width, height) = (cfg.width.unwrap_or(native), cfg.height.unwrap_or(native));

    let total = cfg.samples * cfg.steps;
    let mut done = 0;
    progress(Progress {
        stage: "calibrate",
        done,
        total,
    });
    for i in 0..cfg.samples {
        let prompt = &cfg.prompts.prompts[prompt_index(i, cfg.samples, cfg.prompts.prompts.len())];
        let req = GenerateRequest {
            prompt: prompt.clone(),
            width,
            height,
            steps: cfg.steps,
            guidance_scale: cfg.guidance,
            seed: cfg.seed.wrapping_add(i as u64),
            max_sequence_length: cfg.max_sequence_length,
            ..Default::default()
        };
        // Prompt encoding (T5) happens in `start`: its statistics go to step 0.
        recorder.set_step(0);
        let mut d = pipeline.start(req)?;
        for s in 0..cfg.steps {
            recorder.set_step(s);
            pipeline.step(&mut [&mut d])?;
            done += 1;
            progress(Progress {
                stage: "calibrate",
                done,
                total,
            });
        }
    }
    drop(pipeline);
    let stats = recorder.snapshot();

    // Per-layer decisions, in parallel (each is independent and deterministic).
    let weights = ckpt.weights(component::TRANSFORMER)?;
    let t5_weights = if t5_names.is_empty() {
        None
    } else {
        Some(ckpt.weights(component::T5)?)
    };
    let excl = cfg.exclusions();
    let formats = cfg.target.activation_formats();
    use rayon::prelude::*;
    let layers = names
        .par_iter()
        .map(|name| -> Result<LayerRecord> {
            let st = stats.get(name).ok_or_else(|| {
                CalibrateError::Input(format!(
                    "layer {name} was never executed during calibration"
                ))
            })?;
            let activation = tensor_record(name, st, cfg, &formats)?;
            let source = match &t5_weights {
                Some(t5) if t5_names.contains(name) => t5,
                _ => &weights,
            };
            let w = source.get(&format!("{name}.weight"))?;
            let out = w.shape[0];
            let data = w.to_f32();
            let inp = data.len() / out.max(1);
            let e4 = Fp8Format::E4M3;
            let row_amax: Vec<f32> = data
                .chunks(inp.max(1))
                .map(|r| r.iter().fold(0f32, |m, v| m.max(v.abs())))
                .collect();
            let amax = row_amax.iter().fold(0f32, |m, v| m.max(*v));
            let scales: Vec<f32> = match cfg.weight_granularity {
                WeightGranularity::PerChannel => {
                    row_amax.iter().map(|a| hist::scale_for(e4, *a)).collect()
                }
                WeightGranularity::PerTensor => vec![hist::scale_for(e4, amax)],
            };
            let excluded_by = excl.iter().find(|p| pattern::glob_match(p, name)).cloned();
            let weight_only = excluded_by.is_none()
                && cfg.adaln == AdalnPrecision::Fp8Weights
                && ADALN_PATTERNS.iter().any(|p| pattern::glob_match(p, name));
            Ok(LayerRecord {
                name: name.clone(),
                role: role(name).to_string(),
                in_features: inp,
                out_features: out,
                quantized: excluded_by.is_none(),
                weight_only,
                excluded_by,
                activation,
                weight: cache::WeightRecord {
                    format: e4,
                    granularity: cfg.weight_granularity,
                    sqnr_db: hist::weight_sqnr_db(&data, inp, e4, &scales),
                    scales,
                    amax,
                },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let attention = stats
        .iter()
        .filter(|(n, _)| !names.contains(n))
        .map(|(n, st)| tensor_record(n, st, cfg, &formats))
        .collect::<Result<Vec<_>>>()?;

    // FP8 GEMM layers (weights and activations) and weight-only FP8 layers.
    let q: Vec<&LayerRecord> = layers
        .iter()
        .filter(|l| l.quantized && !l.weight_only)
        .collect();
    let weight_only = layers.iter().filter(|l| l.weight_only).count();
    let summary = cache::Summary {
        layers: layers.len(),
        fp8_layers: q.len(),
        weight_only_layers: weight_only,
        e4m3_activations: q
            .iter()
            .filter(|l| l.activation.format == Fp8Format::E4M3)
            .count(),
        e5m2_activations: q
            .iter()
            .filter(|l| l.activation.format == Fp8Format::E5M2)
            .count(),
        excluded: layers.len() - q.len() - weight_only,
    };
    Ok(CalibrationCache {
        format_version: cache::FORMAT_VERSION,
        model: cache::ModelRecord {
            fingerprint: fp.id.clone(),
            transformer: fp
                .components
                .get(component::TRANSFORMER)
                .cloned()
                .unwrap_or_default(),
            num_layers: tcfg.num_layers,
            inner_dim: tcfg.inner_dim(),
        },
        prompts: cache::PromptRecord {
            sha256: cfg.prompts.hash(),
            count: cfg.prompts.prompts.len(),
        },
        settings: cache::Settings {
            target: cfg.target,
            method: cfg.method,
            percentile: cfg.percentile,
            samples: cfg.samples,
            steps: cfg.steps,
            width,
            height,
            guidance: cfg.guidance,
            seed: cfg.seed,
            max_sequence_length: cfg.max_sequence_length,
            weight_granularity: cfg.weight_granularity,
            quantize_adaln: cfg.adaln != AdalnPrecision::High,
            adaln_weight_only: cfg.adaln == AdalnPrecision::Fp8Weights,
            quantize_t5: cfg.quantize_t5,
            e5m2_margin_db: cfg.e5m2_margin_db,
            mse_tolerance_db: cfg.mse_tolerance_db,
            exclude: excl,
            histogram: format!(
                "|x| binned by the top 13 bits of its f32 pattern (32 bins per octave), {} points per bin",
                hist::SUBSAMPLES
            ),
            candidates: format!(
                "thresholds amax*2^(-k/{}), k = 0..{}",
                hist::CANDIDATE_STEPS_PER_OCTAVE,
                hist::CANDIDATES - 1
            ),
        },
        summary,
        layers,
        attention,
    })
}

fn tensor_record(
    name: &str,
    st: &observer::TensorStats,
    cfg: &CalibrationConfig,
    allowed: &[Fp8Format],
) -> Result<TensorRecord> {
    if st.hist.non_finite > 0 {
        return Err(CalibrateError::Input(format!(
            "{name}: {} NaN or infinite input values observed; the FP32 model itself overflows",
            st.hist.non_finite
        )));
    }
    // Evaluate both formats (evidence), choose among the allowed ones.
    let sel = hist::select(
        &st.hist,
        cfg.method,
        cfg.percentile,
        &Fp8Format::ALL,
        cfg.e5m2_margin_db,
        cfg.mse_tolerance_db,
    );
    let chosen = if allowed.contains(&sel.chosen.format) {
        sel.chosen.clone()
    } else {
        sel.per_format
            .iter()
            .find(|c| allowed.contains(&c.format))
            .cloned()
            .ok_or_else(|| CalibrateError::Input("no activation format allowed".into()))?
    };
    Ok(TensorRecord {
        name: name.to_string(),
        format: chosen.format,
        scale: chosen.scale,
        threshold: chosen.threshold,
        amax: st.hist.amax,
        sqnr_db: chosen.sqnr_db,
        count: st.hist.total,
        mean_square: sel.mean_square,
        step_amax: st.step_amax.clone(),
        evidence: sel
            .per_format
            .iter()
            .map(|c| cache::FormatEvidence {
                format: c.format,
                allowed: allowed.contains(&c.format),
                threshold: c.threshold,
                scale: c.scale,
                mse: c.mse,
                sqnr_db: c.sqnr_db,
                candidate_mse: c.candidates.clone(),
            })
            .collect(),
    })
}

/// Which prompt sample `i` of `samples` uses: spread evenly over the set when
/// `samples <= n`, cycling (with the next seed) beyond.
pub fn prompt_index(i: usize, samples: usize, n: usize) -> usize {
    if samples <= n { i * n / samples } else { i % n }
}

/// The naive baseline (E4M3 everywhere, per-tensor `max`), from a quick `max`
/// calibration with the built-in prompts: 8 prompts x 8 steps at the model's native
/// size, guidance 7. For other settings, run [`calibrate`] and take
/// [`CalibrationCache::naive_plan`].
pub fn naive_plan(ckpt: &Checkpoint) -> Result<PrecisionPlan> {
    let mut cfg = CalibrationConfig::new(&ckpt.root);
    cfg.method = Method::Max;
    cfg.samples = 8;
    cfg.steps = 8;
    cfg.weight_granularity = WeightGranularity::PerTensor;
    Ok(calibrate_checkpoint(ckpt, &cfg, &mut |_| {})?.naive_plan())
}

/// Checks, before a long run, that `path` can be written (its directory exists and
/// accepts a temporary file).
pub fn check_writable(path: &std::path::Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if path.is_dir() {
        return Err(CalibrateError::Output {
            path: path.display().to_string(),
            reason: "it is a directory".into(),
        });
    }
    if !dir.is_dir() {
        return Err(CalibrateError::Output {
            path: path.display().to_string(),
            reason: format!("directory {} does not exist", dir.display()),
        });
    }
    tempfile::NamedTempFile::new_in(&dir)
        .map(drop)
        .map_err(|e| CalibrateError::Output {
            path: path.display().to_string(),
            reason: format!("directory {} is not writable ({e})", dir.display()),
        })
}
