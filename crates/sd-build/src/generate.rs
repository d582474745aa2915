//! `sd-build generate`: the whole pipeline in-process: a checkpoint on the CPU
//! backend, or an engine bundle on the backend of its target (cpu or cuda).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use sd_checkpoint::{Checkpoint, read_tensor_file, write_tensor_file};
use sd_cpu::{ComputePrecision, CpuBackend};
use sd_model::{Backend, PrecisionPlan};
use sd_pipeline::{GenerateRequest, Sd3Pipeline, encode_png};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Precision {
    Fp32,
    Bf16,
    /// FP8 where the calibration cache says (simulated exactly), BF16 elsewhere: what
    /// an FP8 engine computes.
    Fp8,
}

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// Diffusers-format SD3/SD3.5 checkpoint directory.
    #[arg(long, required_unless_present = "engine")]
    pub model: Option<PathBuf>,
    /// Run an engine bundle (from `sd-build compile --target cpu|cuda`) instead of a
    /// checkpoint; with --model too, the bundle must have been built from that model.
    #[arg(long, conflicts_with_all = ["precision", "calibration"])]
    pub engine: Option<PathBuf>,
    /// GPU ordinal for a cuda engine.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// Prompt for CLIP-G (defaults to --prompt).
    #[arg(long)]
    pub prompt_2: Option<String>,
    /// Prompt for T5 (defaults to --prompt).
    #[arg(long)]
    pub prompt_3: Option<String>,
    #[arg(long, default_value_t = 28)]
    pub steps: usize,
    /// Classifier-free guidance scale; <= 1 disables the unconditional branch.
    #[arg(long, default_value_t = 7.0, allow_negative_numbers = true)]
    pub guidance: f32,
    /// Image width in pixels (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
    /// Calibration cache (from `sd-build calibrate`) for `--precision fp8`.
    #[arg(long)]
    pub calibration: Option<PathBuf>,
    /// T5 token budget.
    #[arg(long, default_value_t = 256)]
    pub max_sequence_length: usize,
    /// Overrides the scheduler's shift.
    #[arg(long, allow_negative_numbers = true)]
    pub shift: Option<f64>,
    /// Initial noise: a safetensors file with an f32 tensor `latents` [1, 16, H/8, W/8].
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Writes the final (pre-VAE) latents in the same form.
    #[arg(long)]
    pub save_latents: Option<PathBuf>,
    /// Output PNG path.
    #[arg(long)]
    pub out: PathBuf,
}

fn check_output_path(path: &Path, what: &str) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        bail!(
            "{what} {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    if path.is_dir() {
        bail!("{what} {} is a directory; give a file name", path.display());
    }
    Ok(())
}

/// A loaded pipeline on the backend its source asks for.
enum Loaded {
    Cpu(Box<Sd3Pipeline<CpuBackend>>),
    Cuda(Box<Sd3Pipeline<sd_cuda::CudaBackend>>),
}

/// The pipeline the flags ask for, and a description of it for the PNG parameters.
fn load_pipeline(args: &GenerateArgs) -> Result<(Loaded, String)> {
    if let Some(engine) = &args.engine {
        let bundle = sd_engine::Bundle::open(engine)
            .with_context(|| format!("cannot open engine {}", engine.display()))?;
        if let Some(model) = &args.model {
            sd_engine::check_bundle_model(&bundle, model)?;
        }
        let label = format!("engine {}", engine.display());
        let loaded = match bundle.manifest.target {
            sd_engine::Target::Cpu => {
                Loaded::Cpu(Box::new(sd_engine::load_cpu_pipeline_from(&bundle)?))
            }
            sd_engine::Target::Cuda => Loaded::Cuda(Box::new(sd_cuda::bundle::load_cuda_pipeline(
                &bundle, args.gpu,
            )?)),
        };
        return Ok((loaded, label));
    }
    let model = args
        .model
        .as_ref()
        .context("--model or --engine is required")?;
    let ckpt = Checkpoint::open(model)
        .with_context(|| format!("cannot open model {}", model.display()))?;
    let precision = args.precision.unwrap_or(Precision::Fp32);
    let (compute, plan) = match precision {
        Precision::Fp32 | Precision::Bf16 if args.calibration.is_some() => {
            bail!("--calibration applies to --precision fp8 only")
        }
        Precision::Fp32 => (ComputePrecision::F32, PrecisionPlan::full_precision()),
        Precision::Bf16 => (ComputePrecision::Bf16, PrecisionPlan::full_precision()),
        Precision::Fp8 => {
            let Some(path) = &args.calibration else {
                bail!(
                    "--precision fp8 needs --calibration CACHE.yaml (make one with `sd-build calibrate --model {} --out CACHE.yaml`)",
                    model.display()
                );
            };
            let cache = sd_calibrate::CalibrationCache::load(path)
                .with_context(|| format!("cannot read calibration cache {}", path.display()))?;
            let fingerprint = sd_checkpoint::fingerprint::ModelFingerprint::compute(&ckpt)
                .with_context(|| format!("cannot fingerprint {}", model.display()))?;
            cache.check_model(&fingerprint)?;
            (ComputePrecision::Bf16, cache.plan())
        }
    };
    let pipeline = Sd3Pipeline::load(&ckpt, CpuBackend::new(compute), &plan)
        .with_context(|| format!("cannot load model {}", model.display()))?;
    let label = format!("{} ({precision:?})", model.display());
    Ok((Loaded::Cpu(Box::new(pipeline)), label))
}

pub fn run(args: GenerateArgs) -> Result<()> {
    // Check everything cheap before loading any weights.
    check_output_path(&args.out, "--out")?;
    if let Some(p) = &args.save_latents {
        check_output_path(p, "--save-latents")?;
    }
    let latents = match &args.latents {
        Some(p) => Some(
            read_tensor_file(p, "latents")
                .with_context(|| format!("cannot read --latents {}", p.display()))?,
        ),
        None => None,
    };
    let (pipeline, source) = load_pipeline(&args)?;
    match pipeline {
        Loaded::Cpu(p) => generate_with(&p, &args, latents, &source),
        Loaded::Cuda(p) => generate_with(&p, &args, latents, &source),
    }
}

fn generate_with<B: Backend>(
    pipeline: &Sd3Pipeline<B>,
    args: &GenerateArgs,
    latents: Option<sd_model::HostTensor>,
    source: &str,
) -> Result<()> {
    let native = pipeline.limits.default_size;
    let request = GenerateRequest {
        prompt: args.prompt.clone(),
        prompt_2: args.prompt_2.clone(),
        prompt_3: args.prompt_3.clone(),
        negative_prompt: args.negative_prompt.clone(),
        width: args.width.unwrap_or(native),
        height: args.height.unwrap_or(native),
        steps: args.steps,
        guidance_scale: args.guidance,
        seed: args.seed,
        max_sequence_length: args.max_sequence_length,
        shift: args.shift,
        latents,
        ..Default::default()
    };
    let params = describe(&request, args, pipeline, source);
    let bar = ProgressBar::new(request.steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "denoising {bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let out = pipeline.generate(request, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    for w in &out.warnings {
        eprintln!("warning: {w}");
    }
    let png = encode_png(&out.image, &[("parameters", &params)])?;
    sd_checkpoint::atomic_write(&args.out, &png)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    if let Some(p) = &args.save_latents {
        write_tensor_file(p, &[("latents", &out.latents)])
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    eprintln!("wrote {}", args.out.display());
    Ok(())
}

/// The generation parameters embedded in the PNG (`parameters` tEXt chunk).
fn describe<B: Backend>(
    r: &GenerateRequest,
    args: &GenerateArgs,
    p: &Sd3Pipeline<B>,
    source: &str,
) -> String {
    format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: flow-match Euler, CFG scale: {}, Seed: {}, Size: {}x{}, Shift: {}, Model: {}, Backend: {}",
        r.prompt,
        r.negative_prompt,
        r.steps,
        r.guidance_scale,
        if args.latents.is_some() {
            "latents file".to_string()
        } else {
            r.seed.to_string()
        },
        r.width,
        r.height,
        r.shift.unwrap_or(p.scheduler.config.shift),
        source,
        sd_model::Backend::describe(&p.backend),
    )
}
