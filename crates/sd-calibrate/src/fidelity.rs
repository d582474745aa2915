//! End-to-end fidelity of FP8 plans against the FP32 pipeline: PSNR and SSIM of the
//! decoded images over held-out prompts and seeds, on the CPU (FP8 layers run as exact
//! FP8 simulation by `sd-cpu`).
//!
//! SSIM is the standard one (Wang et al. 2004): 11x11 Gaussian window with sigma 1.5,
//! K1 = 0.01, K2 = 0.03, data range 1, computed per RGB channel over the valid windows
//! (no padding) and averaged. PSNR uses the float images in [0, 1] (before 8-bit
//! rounding), capped at 100 dB for identical images.

use sd_checkpoint::Checkpoint;
use sd_cpu::{ComputePrecision, CpuBackend};
use sd_model::PrecisionPlan;
use sd_pipeline::{GenerateRequest, Image, Sd3Pipeline};

use crate::Result;

pub const PSNR_CAP_DB: f64 = 100.0;

#[derive(Clone, Debug)]
pub struct EvalConfig {
    pub prompts: Vec<String>,
    pub seeds: Vec<u64>,
    pub steps: usize,
    pub width: usize,
    pub height: usize,
    pub guidance: f32,
    pub max_sequence_length: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ImageScore {
    pub prompt: usize,
    pub seed: u64,
    pub psnr_db: f64,
    pub ssim: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct VariantScore {
    pub name: String,
    pub fp8_layers: usize,
    pub images: Vec<ImageScore>,
    pub mean_psnr_db: f64,
    pub min_psnr_db: f64,
    pub mean_ssim: f64,
    pub min_ssim: f64,
}

pub fn psnr_db(a: &[f32], b: &[f32]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64;
    if mse <= 0.0 {
        return PSNR_CAP_DB;
    }
    (10.0 * (1.0 / mse).log10()).min(PSNR_CAP_DB)
}

fn gaussian_window() -> [f64; 11] {
    let mut w = [0.0; 11];
    for (i, v) in w.iter_mut().enumerate() {
        let d = i as f64 - 5.0;
        *v = (-d * d / (2.0 * 1.5 * 1.5)).exp();
    }
    let s: f64 = w.iter().sum();
    w.map(|v| v / s)
}

/// Separable valid-mode filtering of a `h x w` plane with the 11-tap window.
fn filter(p: &[f64], h: usize, w: usize, g: &[f64; 11]) -> Vec<f64> {
    let (oh, ow) = (h - 10, w - 10);
    let mut rows = vec![0.0; h * ow];
    for y in 0..h {
        for x in 0..ow {
            rows[y * ow + x] = (0..11).map(|k| g[k] * p[y * w + x + k]).sum();
        }
    }
    let mut out = vec![0.0; oh * ow];
    for y in 0..oh {
        for x in 0..ow {
            out[y * ow + x] = (0..11).map(|k| g[k] * rows[(y + k) * ow + x]).sum();
        }
    }
    out
}

/// Mean SSIM of two `[H, W, 3]` images in [0, 1] (see the module docs).
pub fn ssim(a: &[f32], b: &[f32], width: usize, height: usize) -> f64 {
    assert!(
        width >= 11 && height >= 11,
        "SSIM needs images of at least 11x11"
    );
    let g = gaussian_window();
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let mut total = 0.0;
    for c in 0..3 {
        let pa: Vec<f64> = (0..width * height).map(|i| a[i * 3 + c] as f64).collect();
        let pb: Vec<f64> = (0..width * height).map(|i| b[i * 3 + c] as f64).collect();
        let sq = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(x, y)| x * y).collect::<Vec<_>>();
        let mu_a = filter(&pa, height, width, &g);
        let mu_b = filter(&pb, height, width, &g);
        let saa = filter(&sq(&pa, &pa), height, width, &g);
        let sbb = filter(&sq(&pb, &pb), height, width, &g);
        let sab = filter(&sq(&pa, &pb), height, width, &g);
        let mut acc = 0.0;
        for i in 0..mu_a.len() {
            let (ma, mb) = (mu_a[i], mu_b[i]);
            let va = saa[i] - ma * ma;
            let vb = sbb[i] - mb * mb;
            let cov = sab[i] - ma * mb;
            acc += ((2.0 * ma * mb + c1) * (2.0 * cov + c2))
                / ((ma * ma + mb * mb + c1) * (va + vb + c2));
        }
        total += acc / mu_a.len() as f64;
    }
    total / 3.0
}

fn render(
    ckpt: &Checkpoint,
    plan: &PrecisionPlan,
    cfg: &EvalConfig,
    tick: &mut dyn FnMut(),
) -> Result<Vec<Image>> {
    let p = Sd3Pipeline::load(ckpt, CpuBackend::new(ComputePrecision::F32), plan)?;
    let mut out = Vec::new();
    for prompt in &cfg.prompts {
        for &seed in &cfg.seeds {
            let req = GenerateRequest {
                prompt: prompt.clone(),
                width: cfg.width,
                height: cfg.height,
                steps: cfg.steps,
                guidance_scale: cfg.guidance,
                seed,
                max_sequence_length: cfg.max_sequence_length,
                ..Default::default()
            };
            out.push(p.generate(req, &mut |_, _| {})?.image);
            tick();
        }
    }
    Ok(out)
}

/// Scores each named plan against the FP32 pipeline.
pub fn evaluate(
    ckpt: &Checkpoint,
    variants: &[(String, PrecisionPlan)],
    cfg: &EvalConfig,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<VariantScore>> {
    let per = cfg.prompts.len() * cfg.seeds.len();
    let total = per * (variants.len() + 1);
    let mut done = 0;
    let mut tick = || {
        done += 1;
        progress(done, total);
    };
    let reference = render(ckpt, &PrecisionPlan::full_precision(), cfg, &mut tick)?;
    let mut scores = Vec::new();
    for (name, plan) in variants {
        let imgs = render(ckpt, plan, cfg, &mut tick)?;
        let mut images = Vec::new();
        for (i, (a, b)) in reference.iter().zip(&imgs).enumerate() {
            images.push(ImageScore {
                prompt: i / cfg.seeds.len(),
                seed: cfg.seeds[i % cfg.seeds.len()],
                psnr_db: psnr_db(&a.float, &b.float),
                ssim: ssim(&a.float, &b.float, a.width, a.height),
            });
        }
        let n = images.len().max(1) as f64;
        scores.push(VariantScore {
            name: name.clone(),
            fp8_layers: plan.fp8_weight_layer_count(),
            mean_psnr_db: images.iter().map(|s| s.psnr_db).sum::<f64>() / n,
            min_psnr_db: images
                .iter()
                .map(|s| s.psnr_db)
                .fold(f64::INFINITY, f64::min),
            mean_ssim: images.iter().map(|s| s.ssim).sum::<f64>() / n,
            min_ssim: images.iter().map(|s| s.ssim).fold(f64::INFINITY, f64::min),
            images,
        });
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssim_identity_and_noise() {
        let (w, h) = (24, 20);
        let a: Vec<f32> = (0..w * h * 3)
            .map(|i| ((i * 7919) % 101) as f32 / 100.0)
            .collect();
        assert!((ssim(&a, &a, w, h) - 1.0).abs() < 1e-12);
        let b: Vec<f32> = a.iter().map(|v| (v * 0.9 + 0.05).clamp(0.0, 1.0)).collect();
        let s = ssim(&a, &b, w, h);
        assert!(s < 1.0 && s > 0.5, "{s}");
        assert_eq!(psnr_db(&a, &a), PSNR_CAP_DB);
        let c: Vec<f32> = a.iter().map(|v| v + 0.01).collect();
        assert!((psnr_db(&a, &c) - 40.0).abs() < 1e-3);
    }
}
