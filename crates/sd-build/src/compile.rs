//! `sd-build compile`: a checkpoint (+ calibration cache) -> an engine bundle.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use sd_checkpoint::Checkpoint;
use sd_checkpoint::fingerprint::ModelFingerprint;
use sd_cuda::bundle::CudaTarget;
use sd_engine::{CalibrationInfo, CompileOptions, Compute, Precision, Target};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum TargetArg {
    /// The CPU reference executor (FP8 simulated exactly).
    Cpu,
    /// NVIDIA GPUs through the project's CUDA executor (compile on the target GPU).
    Cuda,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PrecisionArg {
    /// Transformer linear layers in FP8 as the calibration cache says.
    Fp8,
    /// No FP8 layers.
    Bf16,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ComputeArg {
    /// Everything but FP8 GEMMs in BF16; dense weights stored as BF16.
    Bf16,
    /// FP32 compute; dense weights kept in the checkpoint's dtype (bit-exact with
    /// `generate --model ... --precision fp32`).
    Fp32,
}

/// How a cuda engine's FP8 GEMMs accumulate.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Fp8AccumulationArg {
    /// cuBLASLt's default: partial sums promoted to f32 between K blocks.
    Promoted,
    /// cuBLASLt's fast accumulation: the tensor cores' accumulator over the whole K
    /// (faster; as TensorRT's FP8 GEMMs run).
    Fast,
}

#[derive(Args, Debug)]
pub struct CompileArgs {
    /// Diffusers-format SD3/SD3.5 checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration cache from `sd-build calibrate` (required for --precision fp8).
    #[arg(long, value_name = "CACHE.yaml")]
    pub calibration: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub target: TargetArg,
    #[arg(long, value_enum, default_value_t = PrecisionArg::Fp8)]
    pub precision: PrecisionArg,
    /// What non-FP8 work computes in.
    #[arg(long, value_enum, default_value_t = ComputeArg::Bf16)]
    pub compute: ComputeArg,
    /// GPU ordinal to compile on (cuda target).
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Cuda target: take cuBLASLt's heuristic algorithms at run time instead of timing
    /// them now (faster compile, possibly slower engine).
    #[arg(long)]
    pub no_tuning: bool,
    /// Cuda target: how the FP8 GEMMs accumulate (stored in the bundle).
    #[arg(long, value_enum, default_value_t = Fp8AccumulationArg::Promoted)]
    pub fp8_accumulation: Fp8AccumulationArg,
    /// The bundle directory to write.
    #[arg(long, value_name = "ENGINE")]
    pub out: PathBuf,
    /// Replace an existing bundle at --out.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: CompileArgs) -> Result<()> {
    let target = match args.target {
        TargetArg::Cpu => Target::Cpu,
        TargetArg::Cuda => Target::Cuda,
    };
    let precision = match args.precision {
        PrecisionArg::Fp8 => Precision::Fp8,
        PrecisionArg::Bf16 => Precision::Bf16,
    };
    // Cheap refusals first, before hashing the checkpoint.
    if precision == Precision::Fp8 && args.calibration.is_none() {
        return Err(sd_engine::EngineError::NoCalibration.into());
    }
    let cuda = CudaTarget {
        ordinal: args.gpu,
        skip_tuning: args.no_tuning,
        fp8_gemm: match args.fp8_accumulation {
            Fp8AccumulationArg::Promoted => sd_cuda::Fp8Gemm::Native,
            Fp8AccumulationArg::Fast => sd_cuda::Fp8Gemm::NativeFastAccum,
        },
    };
    if target == Target::Cuda {
        // Before hashing the checkpoint: is there a GPU to compile on?
        if let Err(e) = sd_cuda::bundle::probe_gpu(args.gpu) {
            return Err(sd_engine::EngineError::CudaUnavailable(format!(
                "{e}. A cuda bundle is compiled on the GPU it will run on (kernels and GEMM algorithms are chosen for it); on a machine without one use `--target cpu`"
            ))
            .into());
        }
    }
    if args.out.exists() && !args.force {
        return Err(sd_engine::EngineError::Exists(args.out.clone()).into());
    }
    let ckpt = Checkpoint::open(&args.model)?;
    let fp = ModelFingerprint::compute(&ckpt)
        .with_context(|| format!("fingerprinting {}", args.model.display()))?;
    let mut opts = CompileOptions::new(target, precision);
    opts.compute = match args.compute {
        ComputeArg::Bf16 => Compute::Bf16,
        ComputeArg::Fp32 => Compute::Fp32,
    };
    opts.force = args.force;
    match (&args.calibration, precision) {
        (Some(path), Precision::Fp8) => {
            let cache = sd_calibrate::CalibrationCache::load(path)?;
            cache.check_model(&fp).with_context(|| {
                format!(
                    "calibration cache {} does not fit --model {}; recalibrate with `sd-build calibrate --model {}`",
                    path.display(),
                    args.model.display(),
                    args.model.display()
                )
            })?;
            let cal_target = match target {
                Target::Cpu => sd_calibrate::Target::Cpu,
                Target::Cuda => sd_calibrate::Target::Cuda,
            };
            cache.check_target(cal_target).with_context(|| {
                format!(
                    "calibration cache {} is for another target; recalibrate with `sd-build calibrate --target {target}`",
                    path.display()
                )
            })?;
            opts.plan = cache.plan();
            if opts.plan.fp8_weight_layer_count() == 0 {
                bail!(
                    "calibration cache {} quantizes no layer; compile with --precision bf16 instead",
                    path.display()
                );
            }
            opts.calibration = Some(CalibrationInfo {
                hash: cache.content_hash(),
                source: Some(path.display().to_string()),
            });
        }
        (Some(path), Precision::Bf16) => {
            tracing::warn!(
                "--calibration {} is ignored with --precision bf16",
                path.display()
            );
        }
        (None, _) => {}
    }
    let builder: Option<&dyn sd_engine::TargetBuilder> = match target {
        Target::Cuda => Some(&cuda),
        Target::Cpu => None,
    };
    let m = sd_engine::compile_with(&ckpt, &fp, &opts, &args.out, builder)?;
    println!(
        "wrote {} ({} target, {} precision, {} compute): {} FP8 layers, {} FP8 weight-only, {} files, {}",
        args.out.display(),
        m.target,
        m.precision,
        m.compute,
        m.fp8_layer_count(),
        m.fp8_weight_only_layer_count(),
        m.files.len(),
        crate::inspect::human_bytes(m.total_bytes())
    );
    Ok(())
}
