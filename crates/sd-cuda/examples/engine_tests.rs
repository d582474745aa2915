//! Engine-bundle tests on the GPU: for each tiny model, compiles a `cpu` FP8 bundle, a
//! `cuda` FP8 bundle and a `cuda` BF16 bundle (kernels by NVRTC, GEMM algorithms timed
//! on this GPU), loads them as a server would, and compares whole generations:
//!
//! * cuda FP8 engine vs cpu FP8 engine (the exact FP8 simulation): PSNR >= 35 dB, for
//!   the default (promoted) accumulation and for a bundle compiled with fast
//!   accumulation (`--fp8-accumulation fast`, recorded in the manifest);
//! * cuda BF16 engine vs the CPU BF16 pipeline of the checkpoint: PSNR >= 35 dB;
//!
//! then checks that tampered or foreign bundles are refused with the right error.
//!
//! `engine_tests OUT_DIR MODEL_DIR=CACHE.yaml [MODEL_DIR=CACHE.yaml ...]` (caches from
//! `sd-build calibrate --target cuda`). Writes `engine_tests.txt` to OUT_DIR; exits 1
//! when a bound or a check fails.

use std::path::{Path, PathBuf};
use std::time::Instant;

use sd_calibrate::CalibrationCache;
use sd_checkpoint::Checkpoint;
use sd_checkpoint::fingerprint::ModelFingerprint;
use sd_cpu::{ComputePrecision, CpuBackend};
use sd_cuda::Fp8Gemm;
use sd_cuda::bundle::{CudaTarget, load_cuda_pipeline};
use sd_engine::{Bundle, CalibrationInfo, CompileOptions, Compute, EngineError, Precision, Target};
use sd_model::{Backend, PrecisionPlan};
use sd_pipeline::{GenerateRequest, Sd3Pipeline};

#[path = "common/report.rs"]
mod report;
use report::Report;

type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Prompts of calibration/heldout.txt's kind (not used for calibration), two seeds.
const PROMPTS: &[(&str, u64)] = &[
    (
        "a red circle on the left, a small blue square, green background",
        7,
    ),
    (
        "two yellow triangles above a purple square on a grey background",
        11,
    ),
];
const STEPS: usize = 28;
const GUIDANCE: f32 = 5.0;
const BOUND_DB: f64 = 35.0;

fn psnr(a: &[f32], b: &[f32]) -> f64 {
    // Images in [0, 1].
    let mse: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum::<f64>()
        / a.len().max(1) as f64;
    if mse == 0.0 {
        return f64::INFINITY;
    }
    10.0 * (1.0 / mse).log10()
}

/// Every prompt's image, and the seconds the generations took.
fn images<B: Backend>(p: &Sd3Pipeline<B>) -> R<(Vec<Vec<f32>>, f64)> {
    let t = Instant::now();
    let mut out = Vec::new();
    for (prompt, seed) in PROMPTS {
        let request = GenerateRequest {
            prompt: (*prompt).into(),
            steps: STEPS,
            guidance_scale: GUIDANCE,
            seed: *seed,
            width: p.limits.default_size,
            height: p.limits.default_size,
            ..Default::default()
        };
        out.push(p.generate(request, &mut |_, _| {})?.image.float);
    }
    Ok((out, t.elapsed().as_secs_f64()))
}

/// Every prompt's image from the cuda bundle at `dir` (loaded, run, dropped), and the
/// seconds the generations took.
fn bundle_images(dir: &Path) -> R<(Vec<Vec<f32>>, f64)> {
    let pipeline = load_cuda_pipeline(&Bundle::open(dir)?, 0)?;
    images(&pipeline)
}

/// (mean, min) PSNR over the prompts.
fn compare(a: &[Vec<f32>], b: &[Vec<f32>]) -> (f64, f64) {
    let v: Vec<f64> = a.iter().zip(b).map(|(x, y)| psnr(x, y)).collect();
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    (mean, v.iter().copied().fold(f64::INFINITY, f64::min))
}

fn fp8_options(target: Target, cache: &CalibrationCache, path: &Path) -> CompileOptions {
    let mut o = CompileOptions::new(target, Precision::Fp8);
    o.compute = Compute::Bf16;
    o.plan = cache.plan();
    o.calibration = Some(CalibrationInfo {
        hash: cache.content_hash(),
        source: Some(path.display().to_string()),
    });
    o
}

fn model(rep: &mut Report, dir: &Path, cache_path: &Path, work: &Path) -> R<()> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ckpt = Checkpoint::open(dir)?;
    let fp = ModelFingerprint::compute(&ckpt)?;
    let cache = CalibrationCache::load(cache_path)?;
    cache.check_model(&fp)?;
    let tuned = CudaTarget::default();

    let cpu_fp8 = work.join(format!("{name}-cpu-fp8"));
    let cuda_fp8 = work.join(format!("{name}-cuda-fp8"));
    let cuda_bf16 = work.join(format!("{name}-cuda-bf16"));
    sd_engine::compile(
        &ckpt,
        &fp,
        &fp8_options(Target::Cpu, &cache, cache_path),
        &cpu_fp8,
    )?;
    let t = Instant::now();
    let m = sd_engine::compile_with(
        &ckpt,
        &fp,
        &fp8_options(Target::Cuda, &cache, cache_path),
        &cuda_fp8,
        Some(&tuned),
    )?;
    let compile_s = t.elapsed().as_secs_f64();
    let info = m.cuda.clone().unwrap_or_default();
    rep.line(format!(
        "info: {name}: cuda fp8 bundle compiled in {compile_s:.1}s: {} FP8 layers, {} kernels ({}), {} GEMM algorithms timed, {:.1} MiB",
        m.fp8_layer_count(),
        info.kernels.len(),
        info.kernels.first().map_or("-".into(), |k| k.arch.clone()),
        info.gemm_algorithms.len(),
        m.total_bytes() as f64 / (1 << 20) as f64
    ));
    rep.check(
        &format!("{name} cuda bundle records the GPU"),
        info.gpu_name.is_some()
            && info.compute_capability.is_some()
            && info.driver_version.is_some()
            && info.cublaslt_version.is_some()
            && !info.gemm_algorithms.is_empty()
            && info.kernel_sources.is_some(),
        format!(
            "gpu {:?}, cc {:?}, {:?}, driver {:?}, cuBLASLt {:?}",
            info.gpu_name,
            info.compute_capability,
            info.cuda_version,
            info.driver_version,
            info.cublaslt_version
        ),
    );
    let mut o = CompileOptions::new(Target::Cuda, Precision::Bf16);
    o.compute = Compute::Bf16;
    sd_engine::compile_with(&ckpt, &fp, &o, &cuda_bf16, Some(&tuned))?;

    // FP8: cuda engine vs cpu engine, both from bundles.
    let cpu = sd_engine::load_cpu_pipeline(&cpu_fp8)?;
    let (cpu_imgs, cpu_s) = images(&cpu)?;
    drop(cpu);
    let t = Instant::now();
    let gpu = load_cuda_pipeline(&Bundle::open(&cuda_fp8)?, 0)?;
    let load_s = t.elapsed().as_secs_f64();
    let (gpu_imgs, gpu_s) = images(&gpu)?;
    let mem = gpu.backend.memory_stats()?;
    drop(gpu);
    let (mean, min) = compare(&gpu_imgs, &cpu_imgs);
    rep.check(
        &format!(
            "{name} cuda fp8 engine vs cpu fp8 engine ({} FP8 layers, {} prompts, {STEPS} steps, guidance {GUIDANCE})",
            m.fp8_layer_count(),
            PROMPTS.len()
        ),
        min >= BOUND_DB,
        format!(
            "PSNR mean {mean:.2} / min {min:.2} dB (bound {BOUND_DB}); load {load_s:.2}s, cuda {gpu_s:.2}s, cpu {cpu_s:.2}s, GPU peak {:.1} MiB, params {:.1} MiB",
            mem.peak_used as f64 / (1 << 20) as f64,
            mem.param_bytes as f64 / (1 << 20) as f64
        ),
    );
    // The same bundle again: loading is deterministic and runs are repeatable.
    let (again_imgs, _) = bundle_images(&cuda_fp8)?;
    rep.check(
        &format!("{name} cuda fp8 engine is repeatable"),
        again_imgs == gpu_imgs,
        if again_imgs == gpu_imgs {
            "bit-identical images from a second load".into()
        } else {
            format!(
                "PSNR {:.2} dB between loads",
                compare(&again_imgs, &gpu_imgs).0
            )
        },
    );

    // FP8 with fast accumulation: the mode is recorded in the bundle and the loader runs
    // it (its timed algorithms are keyed by it); the images hold the same bound.
    let cuda_fast = work.join(format!("{name}-cuda-fp8-fast-accum"));
    let fast_target = CudaTarget {
        fp8_gemm: Fp8Gemm::NativeFastAccum,
        ..tuned.clone()
    };
    let mf = sd_engine::compile_with(
        &ckpt,
        &fp,
        &fp8_options(Target::Cuda, &cache, cache_path),
        &cuda_fast,
        Some(&fast_target),
    )?;
    let recorded = mf.cuda.as_ref().and_then(|c| c.fp8_gemm.clone());
    rep.check(
        &format!("{name} cuda bundle records fast accumulation"),
        recorded.as_deref() == Some(Fp8Gemm::NativeFastAccum.name()),
        format!("cuda.fp8_gemm = {recorded:?}"),
    );
    let (fast_imgs, fast_s) = bundle_images(&cuda_fast)?;
    let (fmean, fmin) = compare(&fast_imgs, &cpu_imgs);
    rep.check(
        &format!("{name} cuda fp8 engine, fast accumulation, vs cpu fp8 engine"),
        fmin >= BOUND_DB,
        format!(
            "PSNR mean {fmean:.2} / min {fmin:.2} dB (bound {BOUND_DB}; promoted: {mean:.2} / {min:.2}); vs the promoted cuda engine {:.2} dB; cuda {fast_s:.2}s",
            compare(&fast_imgs, &gpu_imgs).0
        ),
    );

    // BF16: cuda engine vs the CPU BF16 pipeline of the checkpoint.
    let cpu_bf16 = Sd3Pipeline::load(
        &ckpt,
        CpuBackend::new(ComputePrecision::Bf16),
        &PrecisionPlan::full_precision(),
    )?;
    let (cpu_b, _) = images(&cpu_bf16)?;
    drop(cpu_bf16);
    let (gpu_bi, gpu_bs) = bundle_images(&cuda_bf16)?;
    let (mean, min) = compare(&gpu_bi, &cpu_b);
    rep.check(
        &format!("{name} cuda bf16 engine vs cpu bf16 pipeline"),
        min >= BOUND_DB,
        format!("PSNR mean {mean:.2} / min {min:.2} dB (bound {BOUND_DB}); cuda {gpu_bs:.2}s"),
    );
    let (m8, _) = compare(&gpu_imgs, &gpu_bi);
    rep.line(format!(
        "info: {name}: cuda fp8 engine vs cuda bf16 engine (quantization error): PSNR {m8:.2} dB"
    ));

    refusals(rep, &name, &cuda_fp8, &cpu_fp8, work)?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> R<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dst = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dst)?;
        } else {
            std::fs::copy(e.path(), dst)?;
        }
    }
    Ok(())
}

fn edit_manifest(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) -> R<()> {
    let path = dir.join("manifest.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    f(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

/// A copy of `cuda` changed by `f`, then loaded: the error it gives.
fn load_tampered(work: &Path, cuda: &Path, tag: &str, f: impl FnOnce(&Path) -> R<()>) -> R<String> {
    let dir = work.join(format!("tampered-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    copy_dir(cuda, &dir)?;
    f(&dir)?;
    let refusal = match Bundle::open(&dir) {
        Err(e) => format!("{}: {e}", error_kind(&e)),
        Ok(b) => match load_cuda_pipeline(&b, 0) {
            Ok(_) => "loaded (not refused)".into(),
            Err(e) => format!("{}: {e}", error_kind(&e)),
        },
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(refusal)
}

fn error_kind(e: &EngineError) -> &'static str {
    match e {
        EngineError::Checksum { .. } => "Checksum",
        EngineError::GpuMismatch { .. } => "GpuMismatch",
        EngineError::TargetMismatch { .. } => "TargetMismatch",
        EngineError::Usage(_) => "Usage",
        EngineError::Truncated { .. } => "Truncated",
        _ => "other",
    }
}

fn refusals(rep: &mut Report, name: &str, cuda: &Path, cpu: &Path, work: &Path) -> R<()> {
    let e = load_tampered(work, cuda, "kernel", |d| {
        let k = std::fs::read_dir(d.join("kernels"))?
            .next()
            .ok_or("no kernel file")??
            .path();
        // Same size, one byte changed: only the checksum can tell.
        let mut bytes = std::fs::read(&k)?;
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x01;
        std::fs::write(k, bytes)?;
        Ok(())
    })?;
    rep.check(
        &format!("{name} edited kernel refused"),
        e.starts_with("Checksum"),
        e,
    );
    let e = load_tampered(work, cuda, "arch", |d| {
        edit_manifest(d, |v| {
            v["cuda"]["compute_capability"] = serde_json::json!([8, 0])
        })
    })?;
    rep.check(
        &format!("{name} bundle for another GPU architecture refused"),
        e.starts_with("GpuMismatch") && e.contains("Rebuild it on this GPU"),
        e,
    );
    let e = load_tampered(work, cuda, "sources", |d| {
        edit_manifest(d, |v| {
            v["cuda"]["kernel_sources"] = serde_json::json!("0000")
        })
    })?;
    rep.check(
        &format!("{name} kernels of other sources refused"),
        e.starts_with("Usage") && e.contains("rebuild"),
        e,
    );
    let e = match load_cuda_pipeline(&Bundle::open(cpu)?, 0) {
        Ok(_) => "loaded (not refused)".to_string(),
        Err(e) => format!("{}: {e}", error_kind(&e)),
    };
    rep.check(
        &format!("{name} cpu bundle refused by the cuda loader"),
        e.starts_with("TargetMismatch"),
        e,
    );
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 {
        eprintln!("usage: engine_tests OUT_DIR MODEL_DIR=CACHE.yaml [MODEL_DIR=CACHE.yaml ...]");
        std::process::exit(2);
    }
    let out = PathBuf::from(&args[0]);
    let work = std::env::temp_dir().join("sd-engine-tests");
    let _ = std::fs::remove_dir_all(&work);
    let mut rep = Report::new();
    for spec in &args[1..] {
        let Some((dir, cache)) = spec.split_once('=') else {
            eprintln!("`{spec}`: expected MODEL_DIR=CACHE.yaml");
            std::process::exit(2);
        };
        if let Err(e) = std::fs::create_dir_all(&work) {
            eprintln!("cannot create {}: {e}", work.display());
            std::process::exit(2);
        }
        if let Err(e) = model(&mut rep, Path::new(dir), Path::new(cache), &work) {
            rep.check(dir, false, format!("error: {e}"));
        }
        let _ = std::fs::remove_dir_all(&work);
    }
    rep.line(format!("{} checks failed", rep.failures.len()));
    let _ = std::fs::create_dir_all(&out);
    let _ = std::fs::write(out.join("engine_tests.txt"), &rep.text);
    std::process::exit(i32::from(!rep.failures.is_empty()));
}
