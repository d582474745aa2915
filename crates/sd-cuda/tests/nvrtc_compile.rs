//! CI check (no GPU needed): every kernel source compiles with NVRTC for sm_89 and
//! sm_90a.
//!
//! NVRTC and the CUDA headers come from the `nvidia-cuda-nvrtc` and
//! `nvidia-cuda-runtime` wheels (scripts/ci/requirements-cuda.txt) installed in the venv
//! whose python is `$SD_TEST_PYTHON`. libnvrtc must be on the loader path before the
//! process starts, so the test re-runs itself with `LD_LIBRARY_PATH` pointing into the
//! venv. With `CI` set, a missing NVRTC fails the test; otherwise it is skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

const TEST_NAME: &str = "every_kernel_compiles_for_sm89_and_sm90a";
const CHILD: &str = "SD_CUDA_NVRTC_CHILD";

fn compile_all() {
    let include = sd_cuda::find_cuda_include().expect("CUDA headers");
    eprintln!("CUDA headers: {}", include.display());
    let mut ids = Vec::new();
    for arch in ["sm_89", "sm_90a"] {
        let k = sd_cuda::compile_kernels_with(arch, &include)
            .unwrap_or_else(|e| panic!("NVRTC for {arch}: {e}"));
        assert_eq!(k.modules.len(), sd_cuda::KERNEL_SOURCES.len());
        for (name, ptx) in &k.modules {
            assert!(ptx.contains(".entry"), "{arch} {name}: PTX without kernels");
            let target = arch.trim_end_matches('a');
            assert!(
                ptx.contains(&format!(".target {target}")),
                "{arch} {name}: wrong PTX target"
            );
        }
        eprintln!(
            "{arch}: {} modules, NVRTC {}.{}, build id {}",
            k.modules.len(),
            k.nvrtc_version.0,
            k.nvrtc_version.1,
            k.build_id
        );
        // Every kernel the backend looks up at start is an entry of some module: a
        // missing or misspelt one would only show as a failed start on a GPU.
        for name in sd_cuda::kernel_names() {
            let entry = format!(".entry {name}(");
            assert!(
                k.modules.iter().any(|(_, ptx)| ptx.contains(&entry)),
                "{arch}: kernel {name} is not an entry of any module"
            );
        }
        ids.push(k.build_id);
    }
    assert_ne!(ids[0], ids[1], "build ids must differ per arch");
}

/// (lib dir holding libnvrtc, include dir holding cuda_fp8.h) of a python's wheels.
fn wheel_dirs(python: &str) -> Option<(PathBuf, PathBuf)> {
    let out = Command::new(python)
        .args([
            "-c",
            "import site;print('\\n'.join(site.getsitepackages()))",
        ])
        .output()
        .ok()?;
    for sp in String::from_utf8_lossy(&out.stdout).lines() {
        let cu = Path::new(sp.trim()).join("nvidia/cu13");
        let (lib, inc) = (cu.join("lib"), cu.join("include"));
        if lib.join("libnvrtc.so.13").is_file() && inc.join("cuda_fp8.h").is_file() {
            return Some((lib, inc));
        }
    }
    None
}

#[test]
fn every_kernel_compiles_for_sm89_and_sm90a() {
    if std::env::var_os(CHILD).is_some() {
        compile_all();
        return;
    }
    let ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false");
    let python = std::env::var("SD_TEST_PYTHON").ok();
    let dirs = python.as_deref().and_then(wheel_dirs);
    let Some((lib, inc)) = dirs else {
        // Already loadable (a CUDA toolkit on the loader path)?
        if sd_cuda::nvrtc_version().is_ok() && sd_cuda::find_cuda_include().is_ok() {
            compile_all();
            return;
        }
        let msg = format!(
            "NVRTC + CUDA headers not found (SD_TEST_PYTHON={python:?}); install \
             scripts/ci/requirements-cuda.txt into a venv and export SD_TEST_PYTHON=<venv>/bin/python"
        );
        if ci {
            panic!("{msg}");
        }
        eprintln!("skipped: {msg}");
        return;
    };
    let ld = match std::env::var("LD_LIBRARY_PATH") {
        Ok(old) if !old.is_empty() => format!("{}:{old}", lib.display()),
        _ => lib.display().to_string(),
    };
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new(exe)
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("LD_LIBRARY_PATH", ld)
        .env("SD_CUDA_INCLUDE", &inc)
        .output()
        .expect("re-running the test binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "NVRTC compile check failed");
    assert!(text.contains("sm_90a:"), "child did not run the check");
}
