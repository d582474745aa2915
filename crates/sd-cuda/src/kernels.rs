//! The project's CUDA kernels: sources embedded in the binary, compiled to PTX by NVRTC
//! for one GPU architecture (at `sd-build compile` time, or when a backend starts).

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{CudaError, Result};

/// Helpers prepended to every source (no `#include` needed for them).
const COMMON: &str = include_str!("../kernels/common.cuh");

/// Every kernel source file: (module name, source).
pub const KERNEL_SOURCES: &[(&str, &str)] = &[
    ("elementwise", include_str!("../kernels/elementwise.cu")),
    ("norm", include_str!("../kernels/norm.cu")),
    ("attention", include_str!("../kernels/attention.cu")),
    ("fp8", include_str!("../kernels/fp8.cu")),
    ("layout", include_str!("../kernels/layout.cu")),
];

/// PTX of every kernel module for one architecture.
#[derive(Clone, Debug)]
pub struct CompiledKernels {
    /// `sm_89`, `sm_90a`, ...
    pub arch: String,
    /// (module name, PTX text)
    pub modules: Vec<(String, String)>,
    /// Hash of the sources, the architecture and the NVRTC version: a bundle's PTX is
    /// valid for a GPU when its arch matches and may be reused while this id matches.
    pub build_id: String,
    /// NVRTC's (major, minor).
    pub nvrtc_version: (i32, i32),
    /// The directory `cuda_fp8.h` was found in.
    pub include_dir: PathBuf,
}

/// The full text handed to NVRTC for one module.
pub fn module_source(src: &str) -> String {
    // The common helpers use bfloat16; include it first so every module sees it.
    format!("#include <cuda_bf16.h>\n{COMMON}\n{src}")
}

/// Whether libnvrtc can be loaded by this process.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library; no NVRTC function is called.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's version, (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    if !nvrtc_available() {
        return Err(CudaError::missing_library("nvrtc"));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Nvrtc(format!("nvrtcVersion failed: {status:?}")));
    }
    Ok((major, minor))
}

fn hash_sources(h: &mut Sha256) {
    h.update(COMMON.as_bytes());
    for (name, src) in KERNEL_SOURCES {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(src.as_bytes());
        h.update([0]);
    }
}

/// sha256 over the kernel sources alone: PTX compiled from other sources than this
/// binary's does not match its kernel launches (names, arguments).
pub fn kernel_sources_id() -> String {
    let mut h = Sha256::new();
    hash_sources(&mut h);
    hex::encode(&h.finalize()[..16])
}

/// `kernel_build_id`: sha256 over the sources, the architecture and NVRTC's version.
pub fn kernel_build_id(arch: &str, nvrtc: (i32, i32)) -> String {
    let mut h = Sha256::new();
    hash_sources(&mut h);
    h.update(arch.as_bytes());
    h.update(format!("nvrtc {}.{}", nvrtc.0, nvrtc.1).as_bytes());
    hex::encode(&h.finalize()[..16])
}

fn has_headers(dir: &Path) -> bool {
    dir.join("cuda_fp8.h").is_file() && dir.join("cuda_bf16.h").is_file()
}

/// `site-packages/nvidia/cu13/include` (or `cuda_runtime/include` of older wheels) of
/// the `python3` found in PATH.
fn python_wheel_include(python: &str) -> Vec<PathBuf> {
    let out = std::process::Command::new(python)
        .args([
            "-c",
            "import site,sys;print('\\n'.join(site.getsitepackages()+[site.getusersitepackages()]))",
        ])
        .output();
    let Ok(out) = out else { return Vec::new() };
    let mut dirs = Vec::new();
    for sp in String::from_utf8_lossy(&out.stdout).lines() {
        let nv = Path::new(sp.trim()).join("nvidia");
        dirs.push(nv.join("cu13/include"));
        dirs.push(nv.join("cuda_runtime/include"));
    }
    dirs
}

/// Where `cuda_fp8.h` and `cuda_bf16.h` are: `SD_CUDA_INCLUDE`, `$CUDA_HOME/include`,
/// `$CUDA_PATH/include`, `/usr/local/cuda*/include`, then the pip wheel's include dir of
/// `$SD_TEST_PYTHON` or the `python3` in PATH.
pub fn find_cuda_include() -> Result<PathBuf> {
    let mut tried: Vec<PathBuf> = Vec::new();
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("SD_CUDA_INCLUDE") {
        candidates.push(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(p) = std::env::var_os(var) {
            candidates.push(PathBuf::from(p).join("include"));
        }
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    if let Ok(rd) = std::fs::read_dir("/usr/local") {
        let mut v: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("cuda-"))
            })
            .map(|p| p.join("include"))
            .collect();
        v.sort();
        v.reverse();
        candidates.extend(v);
    }
    candidates.push(PathBuf::from("/usr/include"));
    if let Some(py) = std::env::var_os("SD_TEST_PYTHON") {
        candidates.extend(python_wheel_include(&py.to_string_lossy()));
    }
    candidates.extend(python_wheel_include("python3"));
    for c in candidates {
        if has_headers(&c) {
            return Ok(c);
        }
        tried.push(c);
    }
    Err(CudaError::HeadersNotFound(
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    ))
}

/// Compiles every kernel source to PTX for `arch` (`sm_89`, `sm_90`, `sm_90a`, ...).
pub fn compile_kernels(arch: &str) -> Result<CompiledKernels> {
    let include_dir = find_cuda_include()?;
    compile_kernels_with(arch, &include_dir)
}

/// [`compile_kernels`] with an explicit include directory.
pub fn compile_kernels_with(arch: &str, include_dir: &Path) -> Result<CompiledKernels> {
    if !arch.starts_with("sm_") && !arch.starts_with("compute_") {
        return Err(CudaError::Nvrtc(format!(
            "architecture {arch:?}: expected sm_XY[a], e.g. sm_89 or sm_90a"
        )));
    }
    let nvrtc_version = nvrtc_version()?;
    // NVRTC wants `compute_XY` for PTX output.
    let virt = format!(
        "compute_{}",
        arch.trim_start_matches("sm_")
            .trim_start_matches("compute_")
    );
    let mut modules = Vec::new();
    for (name, src) in KERNEL_SOURCES {
        let opts = cudarc::nvrtc::CompileOptions {
            include_paths: vec![include_dir.display().to_string()],
            options: vec![format!("--gpu-architecture={virt}"), "--std=c++17".into()],
            name: Some(format!("{name}.cu")),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(module_source(src), opts).map_err(|e| {
            let detail = match &e {
                cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                    log.to_string_lossy().into_owned()
                }
                other => format!("{other:?}"),
            };
            CudaError::Nvrtc(format!("{name}.cu for {arch}: {detail}"))
        })?;
        modules.push((name.to_string(), ptx.to_src()));
    }
    Ok(CompiledKernels {
        arch: arch.to_string(),
        modules,
        build_id: kernel_build_id(arch, nvrtc_version),
        nvrtc_version,
        include_dir: include_dir.to_path_buf(),
    })
}
