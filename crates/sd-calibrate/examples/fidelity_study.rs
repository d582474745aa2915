//! The measurements behind calibration/README.md: end-to-end fidelity (PSNR / SSIM vs
//! FP32) of several FP8 plans on a tiny model, separating what the exclusions, the
//! per-channel weight scales, the MSE thresholds and the adaLN decision each bring.
//!
//! cargo run --release -p sd-calibrate --example fidelity_study -- models/tiny-sd35m [size] [steps] [adaln]
//!
//! With `adaln` as the fourth argument only the three adaLN variants run (FP8, FP8
//! weights only, high precision), with every other layer as calibrated.

use sd_calibrate::fidelity::{EvalConfig, evaluate};
use sd_calibrate::{CalibrationCache, CalibrationConfig, Method, PromptSet, Target, report};
use sd_checkpoint::Checkpoint;
use sd_fp8::Fp8Format;
use sd_model::{ActivationQuant, LinearQuant, PrecisionPlan, WeightQuant};

fn plan(
    c: &CalibrationCache,
    f: impl Fn(&sd_calibrate::LayerRecord) -> Option<LinearQuant>,
) -> PrecisionPlan {
    let mut p = PrecisionPlan::default();
    for l in &c.layers {
        if let Some(q) = f(l) {
            p.layers.insert(l.name.clone(), q);
        }
    }
    p
}

fn e4(scale_w: Vec<f32>, amax: f32) -> LinearQuant {
    LinearQuant::Fp8 {
        weight: WeightQuant {
            format: Fp8Format::E4M3,
            scales: scale_w,
        },
        input: ActivationQuant {
            format: Fp8Format::E4M3,
            scale: sd_calibrate::hist::scale_for(Fp8Format::E4M3, amax),
        },
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let model = args.get(1).cloned().unwrap_or("models/tiny-sd35m".into());
    let size: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(128);
    let steps: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(8);
    let ckpt = Checkpoint::open(&model).unwrap();
    let mut cfg = CalibrationConfig::new(&model);
    cfg.samples = 16;
    cfg.steps = steps;
    cfg.width = Some(size);
    cfg.height = Some(size);
    cfg.target = Target::Cpu;
    cfg.adaln = sd_calibrate::AdalnPrecision::Fp8;
    let t = std::time::Instant::now();
    let cal = sd_calibrate::calibrate(&cfg, &mut |_| {}).unwrap();
    eprintln!("calibration {:?}", t.elapsed());
    let only_adaln = args.get(4).is_some_and(|a| a == "adaln");
    // The other calibrations only feed variants the adaLN study leaves out.
    let other = |f: &dyn Fn(&mut CalibrationConfig)| {
        let mut c = cfg.clone();
        f(&mut c);
        if only_adaln {
            cal.clone()
        } else {
            sd_calibrate::calibrate(&c, &mut |_| {}).unwrap()
        }
    };
    let trt = other(&|c| c.target = Target::Tensorrt);
    let maxc = other(&|c| c.method = Method::Max);
    print!("{}", report::terminal_table(&cal));

    let adaln = |n: &str| n.ends_with(".norm1.linear") || n.ends_with(".norm1_context.linear");
    let q = |l: &sd_calibrate::LayerRecord| cal.plan().layers.get(&l.name).cloned();
    let variants = vec![
        ("calibrated mse (adaLN fp8)".to_string(), cal.plan()),
        (
            "calibrated mse, adaLN fp8 weights only".to_string(),
            plan(&cal, |l| match q(l) {
                Some(LinearQuant::Fp8 { weight, .. }) if adaln(&l.name) => {
                    Some(LinearQuant::Fp8WeightOnly { weight })
                }
                other => other,
            }),
        ),
        (
            "calibrated mse, adaLN high".to_string(),
            plan(&cal, |l| if adaln(&l.name) { None } else { q(l) }),
        ),
        ("calibrated mse tensorrt".to_string(), trt.plan()),
        ("max, per-channel w, excl".to_string(), maxc.plan()),
        (
            "max, per-tensor w, excl".to_string(),
            plan(&cal, |l| {
                l.quantized.then(|| {
                    e4(
                        vec![sd_calibrate::hist::scale_for(
                            Fp8Format::E4M3,
                            l.weight.amax,
                        )],
                        l.activation.amax,
                    )
                })
            }),
        ),
        ("naive (all, per-tensor max)".to_string(), cal.naive_plan()),
    ];
    let variants: Vec<_> = variants
        .into_iter()
        .filter(|(name, _)| !only_adaln || name.starts_with("calibrated mse"))
        .filter(|(name, _)| !only_adaln || !name.ends_with("tensorrt"))
        .collect();
    let held = PromptSet::heldout();
    let ecfg = EvalConfig {
        prompts: held.prompts.clone(),
        seeds: vec![1000, 1001],
        steps,
        width: size,
        height: size,
        guidance: 7.0,
        max_sequence_length: 256,
    };
    let t = std::time::Instant::now();
    let scores = evaluate(&ckpt, &variants, &ecfg, &mut |_, _| {}).unwrap();
    eprintln!("evaluation {:?}", t.elapsed());
    println!(
        "model {model}, {size}x{size}, {steps} steps, {} held-out prompts x seeds {:?}; calibration {} samples",
        ecfg.prompts.len(),
        ecfg.seeds,
        cfg.samples
    );
    print!("{}", report::fidelity_table(&scores));
    let dir = std::path::Path::new("/tmp/fidelity_study");
    std::fs::create_dir_all(dir).unwrap();
    let name = std::path::Path::new(&model)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .to_string();
    std::fs::write(
        dir.join(format!("{name}.html")),
        report::html(&cal, Some((&ecfg, &scores)), &name),
    )
    .unwrap();
}
