//! The seam between the server and whatever executes a model: [`ServedModel`].
//!
//! One implementation serves everything: [`PipelineModel`] over any `Sd3Pipeline<B>`,
//! made by [`load_diffusers_cpu`] (a diffusers checkpoint on the cpu backend),
//! [`load_engine`] (a cpu engine bundle) and [`load_cuda_engine`] (a cuda engine bundle
//! on one GPU, which also reports GPU memory).

use std::path::{Path, PathBuf};

use sd_cpu::{ComputePrecision, CpuBackend};
use sd_model::{Backend, HostTensor, PrecisionPlan};
use sd_pipeline::{Denoising, GenerateRequest, Generated, Limits, PipelineError, Sd3Pipeline};

/// What a loaded model is, as `ListModels` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelDescription {
    /// Execution target: `cpu`, `cuda`, ...
    pub target: String,
    /// Human-readable precision summary, e.g. `fp32, no fp8 layers`.
    pub precision: String,
    /// The device it runs on.
    pub device: String,
    /// Identifies the build that produces the images (engine bundle id, or checkpoint +
    /// backend for diffusers directories).
    pub engine_id: String,
    pub limits: Limits,
}

/// Shapes that may share one denoising call (height, width, sequence length).
pub type BatchKey = (usize, usize, usize);

/// A model the server can run with step-level continuous batching. Everything is
/// called from the model's owner thread only, so nothing here needs to be `Sync`; the
/// value is created on that thread by the loader.
pub trait ServedModel: 'static {
    /// One image in the middle of denoising.
    type State;

    fn describe(&self) -> ModelDescription;

    /// Runs once after loading, before the model reports SERVING (compile kernels, touch
    /// memory). The default runs one minimal generation.
    fn warm_up(&mut self) -> Result<(), PipelineError> {
        let limits = self.describe().limits;
        let request = GenerateRequest {
            prompt: "warm-up".into(),
            width: limits.size_multiple,
            height: limits.size_multiple,
            steps: 1,
            guidance_scale: 2.0,
            max_sequence_length: limits.max_sequence_length.min(8),
            ..GenerateRequest::default()
        };
        let mut state = self.start(request)?;
        self.step(&mut [&mut state])?;
        self.finish(state).map(|_| ())
    }

    /// Validates a request (fields the server could not check), encodes the prompts and
    /// draws the initial noise from `request.seed`.
    fn start(&self, request: GenerateRequest) -> Result<Self::State, PipelineError>;
    /// Which states may be stepped together.
    fn batch_key(&self, state: &Self::State) -> BatchKey;
    /// (steps done, total steps).
    fn progress(&self, state: &Self::State) -> (usize, usize);
    /// One denoising step for every state of `batch` (all of one batch key, none done).
    /// The result of each state must not depend on the others in the batch.
    fn step(&self, batch: &mut [&mut Self::State]) -> Result<(), PipelineError>;
    /// Decodes a finished state.
    fn finish(&self, state: Self::State) -> Result<Generated, PipelineError>;
    /// The current latents `[1, C, h, w]`, for previews.
    fn latents(&self, state: &Self::State) -> Option<HostTensor>;
    /// Device memory in use and in total, in bytes (GPU targets), for the
    /// `sd_device_memory_bytes` metric. `None`: not applicable.
    fn device_memory(&self) -> Option<(u64, u64)> {
        None
    }
}

/// Reads a backend's device memory: (used, total) bytes.
pub type MemoryProbe<B> = fn(&B) -> Option<(u64, u64)>;

/// Any [`Sd3Pipeline`] served as is.
pub struct PipelineModel<B: Backend> {
    pub pipeline: Sd3Pipeline<B>,
    pub description: ModelDescription,
    /// Device memory (used, total) of the backend, for GPU backends.
    pub memory_probe: Option<MemoryProbe<B>>,
}

impl<B: Backend + 'static> ServedModel for PipelineModel<B> {
    type State = Denoising<B::Tensor>;

    fn describe(&self) -> ModelDescription {
        self.description.clone()
    }
    fn start(&self, request: GenerateRequest) -> Result<Self::State, PipelineError> {
        self.pipeline.start(request)
    }
    fn batch_key(&self, state: &Self::State) -> BatchKey {
        state.batch_key()
    }
    fn progress(&self, state: &Self::State) -> (usize, usize) {
        (state.step, state.schedule.steps())
    }
    fn step(&self, batch: &mut [&mut Self::State]) -> Result<(), PipelineError> {
        self.pipeline.step(batch)
    }
    fn finish(&self, state: Self::State) -> Result<Generated, PipelineError> {
        self.pipeline.finish(state)
    }
    fn latents(&self, state: &Self::State) -> Option<HostTensor> {
        self.pipeline.backend.download(&state.latents).ok()
    }
    fn device_memory(&self) -> Option<(u64, u64)> {
        self.memory_probe
            .and_then(|probe| probe(&self.pipeline.backend))
    }
}

/// Where a served model comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A diffusers checkpoint directory run on the cpu backend.
    DiffusersCpu {
        dir: PathBuf,
        precision: ComputePrecision,
    },
    /// An engine bundle from `sd-build compile` (a directory with `manifest.json`); its
    /// target and checksums are checked when it loads.
    Engine { dir: PathBuf },
}

/// Whether `dir` is an engine bundle rather than a diffusers checkpoint.
pub fn is_engine_bundle(dir: &Path) -> bool {
    dir.join(sd_engine::manifest::MANIFEST_FILE).is_file()
}

/// One `--model` entry: `NAME=DIR[,precision=fp32|bf16]`; DIR is a diffusers checkpoint
/// or an engine bundle (which takes no options).
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub source: ModelSource,
}

impl std::str::FromStr for ModelSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected NAME=DIR[,precision=fp32|bf16]"))?;
        let name = name.trim();
        validate_model_name(name)?;
        let mut parts = rest.split(',');
        let dir = parts.next().unwrap_or_default().trim();
        if dir.is_empty() {
            return Err(format!("`{s}`: empty directory"));
        }
        let mut precision = ComputePrecision::F32;
        let is_engine = is_engine_bundle(Path::new(dir));
        for opt in parts {
            if is_engine {
                return Err(format!(
                    "`{s}`: {dir} is an engine bundle; its precision was fixed when it was compiled (no options allowed)"
                ));
            }
            match opt.trim().split_once('=') {
                Some(("precision", p)) => precision = parse_precision(p)?,
                _ => {
                    return Err(format!(
                        "`{s}`: unknown option `{opt}` (precision=fp32|bf16)"
                    ));
                }
            }
        }
        let source = if is_engine {
            ModelSource::Engine {
                dir: PathBuf::from(dir),
            }
        } else {
            ModelSource::DiffusersCpu {
                dir: PathBuf::from(dir),
                precision,
            }
        };
        Ok(Self {
            name: name.to_string(),
            source,
        })
    }
}

pub fn parse_precision(p: &str) -> Result<ComputePrecision, String> {
    match p.trim().to_ascii_lowercase().as_str() {
        "fp32" | "f32" => Ok(ComputePrecision::F32),
        "bf16" => Ok(ComputePrecision::Bf16),
        other => Err(format!("unknown precision `{other}` (fp32 or bf16)")),
    }
}

pub fn validate_model_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "model name `{name}` must be 1-128 characters of [A-Za-z0-9._-]"
        ));
    }
    Ok(())
}

/// Every subdirectory of `dir` holding a `model_index.json`, named after the subdirectory.
pub fn scan_models_dir(dir: &Path, precision: ComputePrecision) -> anyhow::Result<Vec<ModelSpec>> {
    let mut specs = Vec::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("--models-dir {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let engine = is_engine_bundle(&path);
        if !engine && !path.join("model_index.json").is_file() {
            continue;
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if validate_model_name(name).is_err() {
            tracing::warn!("skipping {}: not a valid model name", path.display());
            continue;
        }
        let source = if engine {
            ModelSource::Engine { dir: path.clone() }
        } else {
            ModelSource::DiffusersCpu {
                dir: path.clone(),
                precision,
            }
        };
        specs.push(ModelSpec {
            name: name.to_string(),
            source,
        });
    }
    specs.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(specs)
}

fn engine_error(dir: &Path) -> impl Fn(sd_engine::EngineError) -> PipelineError + '_ {
    move |e| {
        PipelineError::Model(sd_model::ModelError::Weights(format!(
            "engine {}: {e}",
            dir.display()
        )))
    }
}

/// The target an engine bundle was compiled for (read from its manifest only), so the
/// server starts the right loader; `None` if the manifest cannot be read (the loader
/// then reports why).
pub fn engine_target(dir: &Path) -> Option<sd_engine::Target> {
    sd_engine::read_manifest(dir).ok().map(|m| m.target)
}

/// Loads a cpu engine bundle: checksums verified, target checked, then the pipeline.
pub fn load_engine(name: &str, dir: &Path) -> Result<PipelineModel<CpuBackend>, PipelineError> {
    let bundle = sd_engine::Bundle::open(dir).map_err(engine_error(dir))?;
    bundle
        .check_target(sd_engine::Target::Cpu)
        .map_err(engine_error(dir))?;
    let pipeline = sd_engine::load_cpu_pipeline_from(&bundle).map_err(engine_error(dir))?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let device = format!("{} ({threads} threads)", pipeline.backend.describe());
    let description = engine_description(name, &bundle.manifest, device, &pipeline.limits);
    Ok(PipelineModel {
        pipeline,
        description,
        memory_probe: None,
    })
}

/// Loads a cuda engine bundle onto GPU `gpu`: checksums, target, GPU architecture and
/// kernel sources checked, then the pipeline with the bundle's kernels and GEMM
/// algorithms.
pub fn load_cuda_engine(
    name: &str,
    dir: &Path,
    gpu: usize,
) -> Result<PipelineModel<sd_cuda::CudaBackend>, PipelineError> {
    let bundle = sd_engine::Bundle::open(dir).map_err(engine_error(dir))?;
    let pipeline = sd_cuda::bundle::load_cuda_pipeline(&bundle, gpu).map_err(engine_error(dir))?;
    let device = pipeline.backend.describe();
    let description = engine_description(name, &bundle.manifest, device, &pipeline.limits);
    Ok(PipelineModel {
        pipeline,
        description,
        memory_probe: Some(|b: &sd_cuda::CudaBackend| {
            b.memory_stats()
                .ok()
                .map(|m| (m.device_total - m.device_free, m.device_total))
        }),
    })
}

fn engine_description(
    name: &str,
    m: &sd_engine::Manifest,
    device: String,
    limits: &Limits,
) -> ModelDescription {
    let fp8_layers = m.fp8_layer_count() + m.fp8_weight_only_layer_count();
    ModelDescription {
        target: m.target.to_string(),
        precision: format!(
            "{} ({fp8_layers} fp8 layers of {}), {} compute",
            m.precision,
            m.layers.len(),
            m.compute
        ),
        device,
        engine_id: format!(
            "engine:{name}:{}:{}",
            &m.model.fingerprint[..m.model.fingerprint.len().min(16)],
            m.calibration
                .as_ref()
                .map_or("no-calibration".to_string(), |c| c.hash
                    [..c.hash.len().min(16)]
                    .to_string())
        ),
        limits: limits.clone(),
    }
}

/// Loads a diffusers checkpoint directory on the cpu backend.
pub fn load_diffusers_cpu(
    name: &str,
    dir: &Path,
    precision: ComputePrecision,
) -> Result<PipelineModel<CpuBackend>, PipelineError> {
    let backend = CpuBackend::new(precision);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let device = format!("{} ({threads} threads)", backend.describe());
    let pipeline = Sd3Pipeline::from_dir(dir, backend, &PrecisionPlan::full_precision())?;
    let p = match precision {
        ComputePrecision::F32 => "fp32",
        ComputePrecision::Bf16 => "bf16",
    };
    let description = ModelDescription {
        target: "cpu".into(),
        precision: format!("{p} compute, no fp8 layers"),
        device,
        engine_id: format!(
            "diffusers:{}:{name}:cpu-{p}",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
        limits: pipeline.limits.clone(),
    };
    Ok(PipelineModel {
        pipeline,
        description,
        memory_probe: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_model_specs() {
        let s: ModelSpec = "tiny=models/tiny-sd3,precision=bf16"
            .parse()
            .expect("parse");
        assert_eq!(s.name, "tiny");
        assert_eq!(
            s.source,
            ModelSource::DiffusersCpu {
                dir: "models/tiny-sd3".into(),
                precision: ComputePrecision::Bf16
            }
        );
        assert!("nodir".parse::<ModelSpec>().is_err());
        assert!("a=".parse::<ModelSpec>().is_err());
        assert!("bad name=x".parse::<ModelSpec>().is_err());
        assert!("a=x,precision=fp8".parse::<ModelSpec>().is_err());
        assert!("a=x,speed=fast".parse::<ModelSpec>().is_err());
    }
}
