//! `sd-build calibrate`: FP8 post-training calibration of the transformer, writing a
//! deterministic YAML cache (and optionally an HTML report with the end-to-end
//! fidelity of the FP8 pipeline against FP32, next to the naive baseline).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sd_calibrate::fidelity::{self, EvalConfig};
use sd_calibrate::{
    CalibrationCache, CalibrationConfig, Method, PromptSet, Target, WeightGranularity, report,
};
use sd_checkpoint::Checkpoint;

#[derive(Args, Debug)]
pub struct CalibrateArgs {
    /// Diffusers-format SD3/SD3.5 checkpoint directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompt file: text (one prompt a line, blank and # lines ignored) or YAML (a list,
    /// or {prompts: [...]}). Default: the project's calibration/prompts.txt (built in).
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Where to write the calibration cache (YAML).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Image width (default: the model's native size).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height (default: the model's native size).
    #[arg(long)]
    pub height: Option<usize>,
    #[arg(long, default_value_t = 7.0)]
    pub guidance: f32,
    /// How many prompts to run (spread evenly over the set; cycled if larger).
    #[arg(long, default_value_t = 32)]
    pub samples: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// T5 token budget.
    #[arg(long, default_value_t = 256)]
    pub max_sequence_length: usize,
    /// Activation scale selection: mse (default), max or percentile.
    #[arg(long, default_value = "mse")]
    pub method: Method,
    /// Percentile for --method percentile.
    #[arg(long, default_value_t = 99.99)]
    pub percentile: f64,
    /// Engine target: tensorrt (E4M3 only), cuda (E5M2 activations allowed), cpu.
    #[arg(long, default_value = "cuda")]
    pub target: Target,
    /// Extra layer-name patterns kept in high precision (`*` matches anything).
    #[arg(long, num_args = 1..)]
    pub exclude: Vec<String>,
    /// Do not apply the default exclusions (embedders, final norm and projection).
    #[arg(long)]
    pub no_default_exclusions: bool,
    /// How the per-block adaLN modulation layers run: `fp8-weights` (FP8 weights,
    /// high-precision activations; the default), `fp8` (weights and activations) or
    /// `high` (not quantized). See calibration/README.md for the measurements.
    #[arg(long, value_name = "high|fp8-weights|fp8", default_value_t = sd_calibrate::AdalnPrecision::default())]
    pub adaln: sd_calibrate::AdalnPrecision,
    /// Same as `--adaln fp8` (kept for scripts written before `--adaln`).
    #[arg(long, conflicts_with = "adaln")]
    pub quantize_adaln: bool,
    /// Also run T5's linear layers in FP8 (text encoders otherwise stay in high
    /// precision); the cache then carries their formats and scales too.
    #[arg(long)]
    pub quantize_t5: bool,
    /// One weight scale per tensor instead of per output channel.
    #[arg(long)]
    pub per_tensor_weights: bool,
    /// Also observe attention Q, K, V and softmax output (recorded, advisory).
    #[arg(long)]
    pub observe_attention: bool,
    /// E5M2 is chosen only where it lowers the error by at least this many dB.
    #[arg(long, default_value_t = sd_calibrate::E5M2_MARGIN_DB)]
    pub e5m2_margin_db: f64,
    /// --method mse keeps the largest threshold whose error is within this many dB of
    /// the least.
    #[arg(long, default_value_t = sd_calibrate::MSE_TOLERANCE_DB)]
    pub mse_tolerance_db: f64,
    /// Write report.html (with fidelity vs FP32 and the naive baseline) into DIR.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Held-out prompts for the report (default: calibration/heldout.txt, built in).
    #[arg(long)]
    pub eval_prompts: Option<PathBuf>,
    /// Held-out prompts used by the report.
    #[arg(long, default_value_t = 8)]
    pub eval_samples: usize,
    /// Seeds per held-out prompt in the report.
    #[arg(long, default_value_t = 2)]
    pub eval_seeds: usize,
    /// Denoising steps of the report's generations (default: --steps).
    #[arg(long)]
    pub eval_steps: Option<usize>,
}

fn bar(len: u64, msg: &'static str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:>10} [{bar:40}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_message(msg);
    pb
}

pub fn run(a: CalibrateArgs) -> Result<()> {
    if a.steps == 0 {
        bail!("--steps must be at least 1");
    }
    if a.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let prompts = match &a.prompts {
        Some(p) => PromptSet::load(p)?,
        None => PromptSet::default_set(),
    };
    // Fail before the long run if the outputs cannot be written.
    sd_calibrate::check_writable(&a.out)?;
    if let Some(dir) = &a.report {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create report directory {}", dir.display()))?;
        sd_calibrate::check_writable(&dir.join("report.html"))?;
    }
    let ckpt = Checkpoint::open(&a.model)?;
    let cfg = CalibrationConfig {
        model: a.model.clone(),
        prompts,
        samples: a.samples,
        steps: a.steps,
        width: a.width,
        height: a.height,
        guidance: a.guidance,
        seed: a.seed,
        max_sequence_length: a.max_sequence_length,
        method: a.method,
        percentile: a.percentile,
        target: a.target,
        exclude: a.exclude.clone(),
        default_exclusions: !a.no_default_exclusions,
        adaln: if a.quantize_adaln {
            sd_calibrate::AdalnPrecision::Fp8
        } else {
            a.adaln
        },
        quantize_t5: a.quantize_t5,
        weight_granularity: if a.per_tensor_weights {
            WeightGranularity::PerTensor
        } else {
            WeightGranularity::PerChannel
        },
        observe_attention: a.observe_attention,
        e5m2_margin_db: a.e5m2_margin_db,
        mse_tolerance_db: a.mse_tolerance_db,
    };
    let pb = bar((a.samples * a.steps) as u64, "calibrate");
    let cache = sd_calibrate::calibrate_checkpoint(&ckpt, &cfg, &mut |p| {
        if p.stage == "calibrate" {
            pb.set_position(p.done as u64);
        }
    })?;
    pb.finish_and_clear();
    cache.save(&a.out)?;
    print!("{}", report::terminal_table(&cache));
    eprintln!(
        "wrote {} (content hash {})",
        a.out.display(),
        &cache.content_hash()[..16]
    );
    if let Some(dir) = &a.report {
        write_report(&a, &ckpt, &cache, dir)?;
    }
    Ok(())
}

fn write_report(
    a: &CalibrateArgs,
    ckpt: &Checkpoint,
    cache: &CalibrationCache,
    dir: &std::path::Path,
) -> Result<()> {
    let held = match &a.eval_prompts {
        Some(p) => PromptSet::load(p)?,
        None => PromptSet::heldout(),
    };
    let n = held.prompts.len();
    let k = a.eval_samples.clamp(1, n);
    let prompts: Vec<String> = (0..k)
        .map(|i| held.prompts[sd_calibrate::prompt_index(i, k, n)].clone())
        .collect();
    let ecfg = EvalConfig {
        prompts,
        seeds: (0..a.eval_seeds.max(1) as u64)
            .map(|s| 1000 + a.seed + s)
            .collect(),
        steps: a.eval_steps.unwrap_or(a.steps),
        width: cache.settings.width,
        height: cache.settings.height,
        guidance: a.guidance,
        max_sequence_length: a.max_sequence_length,
    };
    let variants = vec![
        (
            format!("calibrated ({})", cache.settings.method),
            cache.plan(),
        ),
        (
            "naive (E4M3 everywhere, per-tensor max)".to_string(),
            cache.naive_plan(),
        ),
    ];
    let total = ecfg.prompts.len() * ecfg.seeds.len() * (variants.len() + 1);
    let pb = bar(total as u64, "evaluate");
    let scores = fidelity::evaluate(ckpt, &variants, &ecfg, &mut |d, _| {
        pb.set_position(d as u64)
    })?;
    pb.finish_and_clear();
    print!("{}", report::fidelity_table(&scores));
    let html = report::html(cache, Some((&ecfg, &scores)), "FP8 calibration report");
    let path = dir.join("report.html");
    sd_calibrate::cache::atomic_write(&path, html.as_bytes())?;
    eprintln!("wrote {}", path.display());
    Ok(())
}
