//! `sd-build export`: a checkpoint (+ calibration cache) -> ONNX models with FP8 Q/DQ.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use sd_checkpoint::Checkpoint;
use sd_checkpoint::fingerprint::ModelFingerprint;
use sd_model::PrecisionPlan;
use sd_onnx::{ElemType, ExportOptions};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ExportPrecision {
    /// float32 (what ONNX Runtime's CPU validation uses).
    Fp32,
    /// float16.
    Fp16,
    /// bfloat16 (ONNX Runtime's CPU provider cannot run its FP8 Q/DQ).
    Bf16,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Diffusers-format SD3/SD3.5 checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration cache from `sd-build calibrate`: the transformer's FP8 layers. Without
    /// one, nothing is quantized.
    #[arg(long, value_name = "CACHE.yaml")]
    pub calibration: Option<PathBuf>,
    /// TensorRT conventions: refuse E5M2 layers, one shared QuantizeLinear per
    /// quantized tensor.
    #[arg(long)]
    pub for_tensorrt: bool,
    /// Element type of everything that is not FP8.
    #[arg(long, value_enum, default_value_t = ExportPrecision::Bf16)]
    pub precision: ExportPrecision,
    /// Image height in pixels the transformer and VAE graphs are traced at (default:
    /// the transformer's sample_size x 8, 1024 for SD3). The graphs' latent height and
    /// width are dynamic axes; this only has to be a size the model accepts.
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (default as --height).
    #[arg(long)]
    pub width: Option<usize>,
    /// T5 token count (diffusers' max_sequence_length) the T5 graph is traced at, and the
    /// transformer at 77 + this; both lengths are dynamic axes of the graphs.
    #[arg(long, default_value_t = 256)]
    pub max_sequence_length: usize,
    /// The directory to write (written atomically).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Replace an existing directory at --out.
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: ExportArgs) -> Result<()> {
    // Cheap refusals first, before reading any weights.
    if args.out.exists() && !args.force {
        bail!(
            "{} already exists; pass --force to replace it",
            args.out.display()
        );
    }
    let ckpt = Checkpoint::open(&args.model)?;
    ckpt.validate()?;
    let plan = match &args.calibration {
        Some(path) => {
            let cache = sd_calibrate::CalibrationCache::load(path)?;
            let fp = ModelFingerprint::compute(&ckpt)
                .with_context(|| format!("fingerprinting {}", args.model.display()))?;
            cache.check_model(&fp).with_context(|| {
                format!(
                    "calibration cache {} does not belong to {}",
                    path.display(),
                    args.model.display()
                )
            })?;
            cache.plan()
        }
        None => {
            eprintln!("note: no --calibration cache: exporting without FP8 layers");
            PrecisionPlan::default()
        }
    };
    let tcfg = &ckpt.transformer;
    let default_px = tcfg.sample_size * 8;
    let (h, w) = (
        args.height.unwrap_or(default_px),
        args.width.or(args.height).unwrap_or(default_px),
    );
    let step = 8 * tcfg.patch_size;
    if h == 0 || w == 0 || !h.is_multiple_of(step) || !w.is_multiple_of(step) {
        bail!("--height and --width must be positive multiples of {step}, got {h}x{w}");
    }
    let opts = ExportOptions {
        compute: match args.precision {
            ExportPrecision::Fp32 => ElemType::F32,
            ExportPrecision::Fp16 => ElemType::F16,
            ExportPrecision::Bf16 => ElemType::Bf16,
        },
        for_tensorrt: args.for_tensorrt,
        latent_size: Some((h / 8, w / 8)),
        text_len: None,
        clip_len: None,
        t5_len: args.max_sequence_length,
        ..Default::default()
    };
    let models = sd_onnx::export_opened(&ckpt, &plan, &opts, &args.out, args.force)?;
    println!("wrote {}:", args.out.display());
    for m in &models {
        let ins: Vec<String> = m
            .inputs
            .iter()
            .map(|s| format!("{} {} {}", s.name, s.elem.name(), s.shape_string()))
            .collect();
        let outs: Vec<String> = m
            .outputs
            .iter()
            .map(|s| format!("{} {} {}", s.name, s.elem.name(), s.shape_string()))
            .collect();
        println!(
            "  {:<18} {:>9.1} MB  {:>3} FP8 layers  in: {}  out: {}",
            m.file,
            m.initializer_bytes as f64 / 1e6,
            m.quantized.len(),
            ins.join(", "),
            outs.join(", ")
        );
    }
    Ok(())
}
