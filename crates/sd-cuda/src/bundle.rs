//! The `cuda` target of engine bundles: what `sd-build compile --target cuda` adds to a
//! bundle ([`CudaTarget`], an [`sd_engine::TargetBuilder`]) and how a bundle is loaded
//! onto a GPU ([`load_cuda_pipeline`]).
//!
//! A cuda bundle is compiled on the GPU it will run on. Besides the weights that
//! sd-engine packs (FP8 codes in cuBLASLt's K-major "TN" layout, scales, BF16 dense
//! tensors), it carries:
//! * the kernels compiled by NVRTC for that GPU's architecture (`kernels/*.ptx`), so a
//!   server loads them without compiling, and a hash of their sources, so a binary
//!   whose kernel launches were written for other sources refuses them;
//! * the GEMM algorithm chosen by timing for every GEMM of one denoising step and one
//!   VAE decode at the model's default size (see `tuning.rs`), with the cuBLASLt
//!   version they are valid for;
//! * the GPU's name, compute capability, CUDA and driver versions.

// These functions return sd-engine's error (the one `sd-build` and `sd-serve` report
// for every bundle problem); it is large, but only ever built once, at compile or load
// time, so boxing it would buy nothing.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::path::Path;

use sd_engine::manifest::KernelEntry;
use sd_engine::{
    Bundle, CompileOptions, Compute, CudaInfo, EngineError, Manifest, Precision, Target,
    TargetBuilder, TargetExtras,
};
use sd_model::PrecisionPlan;
use sd_model::plan::LinearQuant;
use sd_pipeline::{GenerateRequest, Sd3Pipeline};

use crate::kernels::{CompiledKernels, compile_kernels, kernel_sources_id};
use crate::{
    CudaBackend, CudaError, CudaPrecision, Fp8Gemm, PackedFp8Weight, arch_for, check_libraries,
};

/// Builds the cuda part of a bundle on GPU `ordinal` of this machine.
#[derive(Clone, Debug, Default)]
pub struct CudaTarget {
    pub ordinal: usize,
    /// Skip timing GEMM algorithms (the bundle then records none and the loader uses
    /// cuBLASLt's heuristic); for quick test builds.
    pub skip_tuning: bool,
    /// How the engine's FP8 GEMMs accumulate; recorded in the manifest, so the loader
    /// runs (and finds the timed algorithms of) the same GEMMs.
    pub fp8_gemm: Fp8Gemm,
}

/// The backend precision a bundle runs with.
pub fn precision_for(precision: Precision, compute: Compute) -> CudaPrecision {
    match (precision, compute) {
        (Precision::Fp8, Compute::Bf16) => CudaPrecision::Fp8,
        (Precision::Bf16, Compute::Bf16) => CudaPrecision::Bf16,
        // F32 runs FP8 plan entries in FP8 and everything else in f32.
        (_, Compute::Fp32) => CudaPrecision::F32,
    }
}

fn gpu(e: CudaError) -> EngineError {
    EngineError::Gpu(e.to_string())
}

/// Name and compute capability of GPU `ordinal`, without starting a backend.
pub fn probe_gpu(ordinal: usize) -> Result<(String, (i32, i32)), CudaError> {
    check_libraries()?;
    let ctx = cudarc::driver::CudaContext::new(ordinal)?;
    Ok((ctx.name()?, ctx.compute_capability()?))
}

/// The NVIDIA kernel driver's version (`580.159.04`), from `/proc/driver/nvidia`.
fn kernel_driver_version() -> Option<String> {
    let text = std::fs::read_to_string("/proc/driver/nvidia/version").ok()?;
    let line = text.lines().next()?;
    // "NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.159.04  Tue ..."
    line.split_whitespace()
        .find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.'))
        .map(str::to_string)
}

impl TargetBuilder for CudaTarget {
    fn preflight(&self, opts: &CompileOptions, plan: &PrecisionPlan) -> sd_engine::Result<()> {
        let (name, cc) = probe_gpu(self.ordinal).map_err(|e| {
            EngineError::CudaUnavailable(format!(
                "{e}. A cuda bundle is compiled on the GPU it will run on; on a machine without one use `--target cpu`"
            ))
        })?;
        if opts.precision == Precision::Fp8 {
            if cc < (8, 9) {
                return Err(gpu(CudaError::NoFp8 {
                    gpu: name,
                    major: cc.0,
                    minor: cc.1,
                }));
            }
            // cuBLASLt's FP8 GEMMs take E4M3 weights; E5M2 is for activations only.
            if let Some((layer, _)) = plan.layers.iter().find(|(_, q)| {
                matches!(q, LinearQuant::Fp8 { weight, .. } if weight.format != sd_fp8::Fp8Format::E4M3)
            }) {
                return Err(EngineError::PlanMismatch(format!(
                    "layer `{layer}` has E5M2 weights; the cuda target takes E4M3 weights only — recalibrate with `sd-build calibrate --target cuda`"
                )));
            }
        }
        Ok(())
    }

    fn write_extras(&self, staging: &Path, manifest: &Manifest) -> sd_engine::Result<TargetExtras> {
        let (name, cc) = probe_gpu(self.ordinal).map_err(gpu)?;
        let arch = arch_for(cc);
        let kernels = compile_kernels(&arch).map_err(gpu)?;
        let dir = staging.join("kernels");
        std::fs::create_dir_all(&dir).map_err(|source| EngineError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut files = Vec::new();
        let mut entries = Vec::new();
        for (module, ptx) in &kernels.modules {
            let rel = format!("kernels/{module}.{arch}.ptx");
            let path = staging.join(&rel);
            std::fs::write(&path, ptx.as_bytes())
                .and_then(|()| std::fs::File::open(&path)?.sync_all())
                .map_err(|source| EngineError::Io {
                    path: path.clone(),
                    source,
                })?;
            entries.push(KernelEntry {
                name: module.clone(),
                build_id: kernels.build_id.clone(),
                arch: arch.clone(),
                kind: "ptx".into(),
                file: rel.clone(),
            });
            files.push(rel);
        }
        let backend = CudaBackend::with_kernels(
            self.ordinal,
            precision_for(manifest.precision, manifest.compute),
            &kernels,
        )
        .map_err(gpu)?
        .with_fp8_gemm(self.fp8_gemm);
        let cublaslt = backend.cublaslt_version();
        let gemm_algorithms = if self.skip_tuning {
            Default::default()
        } else {
            tune_gemms(staging, manifest, backend)?
        };
        let cuda = CudaInfo {
            gpu_name: Some(name),
            compute_capability: Some([cc.0 as u32, cc.1 as u32]),
            cuda_version: Some(format!(
                "driver API {}, NVRTC {}.{}",
                driver_cuda_version().unwrap_or_else(|| "unknown".into()),
                kernels.nvrtc_version.0,
                kernels.nvrtc_version.1
            )),
            driver_version: kernel_driver_version(),
            cublaslt_version: Some(cublaslt.to_string()),
            gemm_algorithms,
            kernels: entries,
            kernel_sources: Some(kernel_sources_id()),
            fp8_gemm: Some(self.fp8_gemm.name().to_string()),
        };
        Ok(TargetExtras {
            files,
            cuda: Some(cuda),
        })
    }
}

/// The CUDA version the driver supports, `major.minor` (e.g. `13.0`).
fn driver_cuda_version() -> Option<String> {
    let mut v = 0i32;
    // SAFETY: out-pointer to an int; libcuda was loaded by the probe.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .ok()?;
    Some(format!("{}.{}", v / 1000, (v % 1000) / 10))
}

/// Loads the bundle being written (weights complete in `staging`) on `backend` with
/// GEMM timing on, runs one denoising step with guidance and one VAE decode at the
/// model's default size, and returns the algorithms chosen for every GEMM met.
fn tune_gemms(
    staging: &Path,
    manifest: &Manifest,
    backend: CudaBackend,
) -> sd_engine::Result<std::collections::BTreeMap<String, serde_json::Value>> {
    let bundle = Bundle {
        dir: staging.to_path_buf(),
        manifest: manifest.clone(),
    };
    let pipeline = load_onto(&bundle, backend)?;
    pipeline.backend.set_gemm_tuning(true).map_err(gpu)?;
    let size = pipeline.limits.default_size;
    let request = GenerateRequest {
        prompt: "tuning".into(),
        width: size,
        height: size,
        steps: 1,
        guidance_scale: 5.0,
        ..GenerateRequest::default()
    };
    pipeline.generate(request, &mut |_, _| {})?;
    pipeline.backend.synchronize().map_err(gpu)?;
    let chosen = pipeline.backend.gemm_algorithms().map_err(gpu)?;
    Ok(chosen
        .into_iter()
        .map(|(k, words)| {
            let hex: Vec<serde_json::Value> = words
                .iter()
                .map(|w| serde_json::Value::String(format!("{w:016x}")))
                .collect();
            (k, serde_json::Value::Array(hex))
        })
        .collect())
}

/// The algorithms a manifest records, back as the backend takes them; entries that do
/// not parse are reported as a corrupt manifest.
fn stored_algorithms(
    manifest_path: &Path,
    info: &CudaInfo,
) -> sd_engine::Result<crate::GemmAlgorithms> {
    let corrupt = |reason: String| EngineError::Corrupt {
        path: manifest_path.to_path_buf(),
        reason,
    };
    let mut out = crate::GemmAlgorithms::new();
    for (key, value) in &info.gemm_algorithms {
        let words = value
            .as_array()
            .filter(|a| a.len() == 8)
            .ok_or_else(|| corrupt(format!("GEMM algorithm `{key}` is not 8 words")))?;
        let mut data = [0u64; 8];
        for (d, w) in data.iter_mut().zip(words) {
            *d = w
                .as_str()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(|| corrupt(format!("GEMM algorithm `{key}` has a bad word {w}")))?;
        }
        out.insert(key.clone(), data);
    }
    Ok(out)
}

/// Hands the bundle's FP8 codes to `backend` as stored, then loads the pipeline.
fn load_onto(bundle: &Bundle, backend: CudaBackend) -> sd_engine::Result<Sd3Pipeline<CudaBackend>> {
    let mut packed = HashMap::new();
    let mut components: Vec<&str> = bundle
        .manifest
        .layers
        .iter()
        .filter(|l| l.precision == sd_engine::manifest::PRECISION_FP8)
        .map(|l| l.component.as_str())
        .collect();
    components.sort_unstable();
    components.dedup();
    for comp in components {
        let weights = bundle.weights(comp)?;
        for layer in bundle.manifest.layers.iter().filter(|l| {
            l.component == comp
                && (l.precision == sd_engine::manifest::PRECISION_FP8
                    || l.precision == sd_engine::manifest::PRECISION_FP8_WEIGHT_ONLY)
        }) {
            let w = weights
                .fp8(&layer.name)
                .ok_or_else(|| EngineError::Corrupt {
                    path: bundle.dir.join(format!("weights/{comp}.safetensors")),
                    reason: format!("FP8 layer `{}` has no codes", layer.name),
                })?;
            if w.layout != sd_engine::Fp8Layout::CublasltTn {
                return Err(EngineError::Corrupt {
                    path: bundle.dir.join(format!("weights/{comp}.safetensors")),
                    reason: format!(
                        "FP8 layer `{}` is stored in the {:?} layout, not the cuda target's",
                        layer.name, w.layout
                    ),
                });
            }
            let weight = match w.quant {
                LinearQuant::Fp8 { weight, .. } | LinearQuant::Fp8WeightOnly { weight } => weight,
                LinearQuant::None => continue,
            };
            packed.insert(
                layer.name.clone(),
                PackedFp8Weight {
                    codes: w.codes.to_vec(),
                    scales: weight.scales.clone(),
                },
            );
        }
    }
    backend.provide_fp8_weights(packed).map_err(gpu)?;
    let pipeline = sd_engine::load_pipeline_with(bundle, backend)?;
    let unused = pipeline.backend.unused_fp8_weights();
    if !unused.is_empty() {
        return Err(EngineError::PlanMismatch(format!(
            "the bundle has FP8 weights for layers its model does not load: {}",
            unused.join(", ")
        )));
    }
    Ok(pipeline)
}

/// Whether GPU `ordinal` of this machine can run the cuda bundle `m` (for `sd-build
/// inspect`): `Ok(yes: ...)` or `Err(no: why, what to do)`.
pub fn can_run_here(m: &Manifest, ordinal: usize) -> Result<String, String> {
    let info = m
        .cuda
        .as_ref()
        .ok_or("no: the manifest has no `cuda` section")?;
    let (name, cc) = probe_gpu(ordinal).map_err(|e| format!("no: {e}"))?;
    let here = [cc.0 as u32, cc.1 as u32];
    if info.compute_capability != Some(here) {
        return Err(format!(
            "no: built for compute capability {}, GPU {ordinal} ({name}) is {}.{}; rebuild it on this GPU with `sd-build compile --target cuda`",
            info.compute_capability
                .map_or("?".into(), |[a, b]| format!("{a}.{b}")),
            cc.0,
            cc.1
        ));
    }
    if info.kernel_sources.as_deref() != Some(kernel_sources_id().as_str()) {
        return Err(
            "no: its kernels come from another sd-build version's sources; rebuild it with this sd-build".into(),
        );
    }
    Ok(format!(
        "yes: GPU {ordinal} is {name} (compute capability {}.{})",
        cc.0, cc.1
    ))
}

/// Loads a verified `cuda` bundle onto GPU `ordinal`: refuses a bundle for another
/// target, GPU architecture or kernel sources; loads its PTX (no NVRTC compile) and its
/// GEMM algorithms (when this cuBLASLt is the one that chose them); uploads the FP8
/// codes as stored.
pub fn load_cuda_pipeline(
    bundle: &Bundle,
    ordinal: usize,
) -> sd_engine::Result<Sd3Pipeline<CudaBackend>> {
    bundle.check_target(Target::Cuda)?;
    let manifest_path = bundle.dir.join(sd_engine::manifest::MANIFEST_FILE);
    let info = bundle
        .manifest
        .cuda
        .as_ref()
        .ok_or_else(|| EngineError::Corrupt {
            path: manifest_path.clone(),
            reason: "a cuda bundle without its `cuda` section".into(),
        })?;
    let (name, cc) = probe_gpu(ordinal).map_err(gpu)?;
    bundle.check_gpu([cc.0 as u32, cc.1 as u32], &name)?;
    let here = kernel_sources_id();
    if info.kernel_sources.as_deref() != Some(here.as_str()) {
        return Err(EngineError::Usage(format!(
            "engine bundle {} holds kernels compiled from other kernel sources than this build's (another sd-build version); rebuild it with this sd-build: `sd-build compile --target cuda ... --out {} --force`",
            bundle.dir.display(),
            bundle.dir.display()
        )));
    }
    let first = info.kernels.first().ok_or_else(|| EngineError::Corrupt {
        path: manifest_path.clone(),
        reason: "a cuda bundle without kernels".into(),
    })?;
    let mut modules = Vec::new();
    for k in &info.kernels {
        if k.kind != "ptx" {
            return Err(EngineError::Corrupt {
                path: manifest_path.clone(),
                reason: format!("kernel {} is `{}`; this build loads ptx", k.name, k.kind),
            });
        }
        let path = bundle.dir.join(&k.file);
        let text =
            std::fs::read_to_string(&path).map_err(|source| EngineError::Io { path, source })?;
        modules.push((k.name.clone(), text));
    }
    let kernels = CompiledKernels {
        arch: first.arch.clone(),
        modules,
        build_id: first.build_id.clone(),
        nvrtc_version: (0, 0),
        include_dir: Default::default(),
    };
    let fp8_gemm = match info.fp8_gemm.as_deref() {
        None => Fp8Gemm::Native,
        Some(name) => Fp8Gemm::parse(name).map_err(|e| EngineError::Corrupt {
            path: manifest_path.clone(),
            reason: format!("cuda.fp8_gemm: {e}"),
        })?,
    };
    let m = &bundle.manifest;
    let backend =
        CudaBackend::with_kernels(ordinal, precision_for(m.precision, m.compute), &kernels)
            .map_err(gpu)?
            .with_fp8_gemm(fp8_gemm);
    let algorithms = stored_algorithms(&manifest_path, info)?;
    let same_blas =
        info.cublaslt_version.as_deref() == Some(backend.cublaslt_version().to_string().as_str());
    if same_blas {
        backend.load_gemm_algorithms(&algorithms).map_err(gpu)?;
    } else if !algorithms.is_empty() {
        eprintln!(
            "warning: engine bundle {}: its GEMM algorithms were chosen with cuBLASLt {}; this is {} — using cuBLASLt's heuristic instead (recompile the bundle to time them again)",
            bundle.dir.display(),
            info.cublaslt_version.as_deref().unwrap_or("?"),
            backend.cublaslt_version()
        );
    }
    load_onto(bundle, backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precision_follows_the_manifest() {
        assert_eq!(
            precision_for(Precision::Fp8, Compute::Bf16),
            CudaPrecision::Fp8
        );
        assert_eq!(
            precision_for(Precision::Bf16, Compute::Bf16),
            CudaPrecision::Bf16
        );
        assert_eq!(
            precision_for(Precision::Bf16, Compute::Fp32),
            CudaPrecision::F32
        );
        assert_eq!(
            precision_for(Precision::Fp8, Compute::Fp32),
            CudaPrecision::F32
        );
    }

    #[test]
    fn stored_algorithms_round_trip_and_reject_garbage() {
        let mut info = CudaInfo::default();
        let words: Vec<serde_json::Value> = (0..8u64)
            .map(|w| serde_json::Value::String(format!("{:016x}", w * 0x1_0000_0001)))
            .collect();
        info.gemm_algorithms
            .insert("gemm 1 0 8 8 8".into(), serde_json::Value::Array(words));
        let path = Path::new("ENGINE/manifest.json");
        let got = stored_algorithms(path, &info).unwrap();
        assert_eq!(got["gemm 1 0 8 8 8"][3], 3 * 0x1_0000_0001);
        info.gemm_algorithms
            .insert("gemm bad".into(), serde_json::json!(vec!["zz"; 8]));
        let e = stored_algorithms(path, &info).unwrap_err();
        assert!(e.to_string().contains("gemm bad"), "{e}");
    }
}
