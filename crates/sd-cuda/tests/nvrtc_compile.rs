//! CI check (no GPU needed): every kernel source compiles with NVRTC for sm_89 and
//! sm_90a.
//!
//! NVRTC and the CUDA headers come from the `nvidia-cuda-nvrtc` and
//! `nvidia-cuda-runtime` wheels (scripts/ci/requirements-cuda.txt) installed in the venv
//! whose python is `$SD_TEST_PYTHON`. libnvrtc must be on the loader path before the
//! process starts, so the test re-runs itself with `LD_LIBRARY_PATH` pointing into the
//! venv. With `CI` set, a missing NVRTC fails the test; otherwise it is skipped.
//!
//! ptxas (the `nvidia-cuda-nvcc` wheel, same list) then compiles every module to SASS as
//! the driver would, and the check fails on any kernel whose wgmma ptxas serializes or
//! whose registers spill: both only show as lost speed on the GPU otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;

const TEST_NAME: &str = "every_kernel_compiles_for_sm89_and_sm90a";
const CHILD: &str = "SD_CUDA_NVRTC_CHILD";
/// ptxas from the `nvidia-cuda-nvcc` wheel, handed to the child by the parent.
const PTXAS: &str = "SD_CUDA_TEST_PTXAS";

/// (arch, kernel) pairs ptxas (13.0) is known to compile with serialized wgmma (C7512:
/// too few registers to keep the MMAs asynchronous) or register spills; any other kernel
/// doing either fails the check, since both cost speed silently.
/// - `flash_wg3_n128_ov`: three warpgroups of the software-pipelined tiling need a second
///   P buffer over the 168-register budget (serialized, 32 bytes spilled); kept as a
///   measured candidate (benchmarks/README.md), never the default.
/// - the 32-row mma.sync tilings on sm_90a (12 and 28 bytes spilled at 255 registers):
///   Hopper runs the wgmma tilings; on sm_89, where `flash_attn_d64_w8m2` is the
///   default, both compile without spills.
const KNOWN_REGISTER_BOUND: &[(&str, &str)] = &[
    ("sm_90a", "flash_wg3_n128_ov"),
    ("sm_90a", "flash_attn_d64_w8m2"),
    ("sm_90a", "flash_attn_d64_w4m2"),
];

/// What ptxas says of one function.
#[derive(Debug, Default)]
struct PtxasInfo {
    registers: u32,
    spill_store_bytes: u32,
    wgmma_serialized: bool,
}

/// Runs ptxas (`-v`) on one PTX module and parses its per-function report.
fn ptxas_report(
    ptxas: &Path,
    arch: &str,
    module: &str,
    ptx: &str,
) -> std::collections::BTreeMap<String, PtxasInfo> {
    let dir = std::env::temp_dir().join(format!("sd-ptxas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join(format!("{module}.{arch}.ptx"));
    std::fs::write(&file, ptx).expect("writing PTX");
    let out = Command::new(ptxas)
        .arg(format!("-arch={arch}"))
        .args(["-v", "-o", "/dev/null"])
        .arg(&file)
        .output()
        .expect("running ptxas");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "ptxas {arch} {module}: {text}");
    let mut report = std::collections::BTreeMap::<String, PtxasInfo>::new();
    let mut current = String::new();
    for line in text.lines() {
        let quoted = || line.split('\'').nth(1).unwrap_or_default().to_string();
        if line.contains("Compiling entry function") {
            current = quoted();
            report.entry(current.clone()).or_default();
        } else if line.contains("(C7512)")
            || line.contains("wgmma.mma_async instructions are serialized")
        {
            report.entry(quoted()).or_default().wgmma_serialized = true;
        } else if let Some(i) = line.find(" bytes spill stores") {
            let bytes = line[..i]
                .rsplit(' ')
                .next()
                .unwrap_or("0")
                .parse()
                .unwrap_or(0);
            report.entry(current.clone()).or_default().spill_store_bytes = bytes;
        } else if let Some(i) = line.find("Used ") {
            let n = line[i + 5..]
                .split(' ')
                .next()
                .unwrap_or("0")
                .parse()
                .unwrap_or(0);
            report.entry(current.clone()).or_default().registers = n;
        }
    }
    report
}

/// Every kernel compiles to SASS without serialized wgmma or register spills (outside
/// [`KNOWN_REGISTER_BOUND`]).
fn check_register_use(ptxas: &Path, arch: &str, modules: &[(String, String)]) {
    let mut bad = Vec::new();
    for (module, ptx) in modules {
        for (name, info) in ptxas_report(ptxas, arch, module, ptx) {
            if name.starts_with("flash") {
                eprintln!(
                    "{arch} {name}: {} registers, {} bytes spilled{}",
                    info.registers,
                    info.spill_store_bytes,
                    if info.wgmma_serialized {
                        ", wgmma serialized"
                    } else {
                        ""
                    }
                );
            }
            let known = KNOWN_REGISTER_BOUND.contains(&(arch, name.as_str()));
            if !known && info.wgmma_serialized {
                bad.push(format!(
                    "{arch} {name}: ptxas serializes its wgmma (too few registers)"
                ));
            }
            if !known && info.spill_store_bytes > 0 {
                bad.push(format!(
                    "{arch} {name}: ptxas spills {} bytes of registers to local memory",
                    info.spill_store_bytes
                ));
            }
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
}

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
        if let Some(ptxas) = std::env::var_os(PTXAS) {
            check_register_use(Path::new(&ptxas), arch, &k.modules);
        }
        ids.push(k.build_id);
    }
    assert_ne!(ids[0], ids[1], "build ids must differ per arch");
}

/// (lib dir holding libnvrtc, include dir holding cuda_fp8.h, ptxas if its wheel is
/// there too) of a python's wheels.
fn wheel_dirs(python: &str) -> Option<(PathBuf, PathBuf, Option<PathBuf>)> {
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
            let ptxas = Some(cu.join("bin/ptxas")).filter(|p| p.is_file());
            return Some((lib, inc, ptxas));
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
    let Some((lib, inc, ptxas)) = dirs else {
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
    if ptxas.is_none() && ci {
        panic!("ptxas not found next to NVRTC: install scripts/ci/requirements-cuda.txt");
    }
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe);
    child
        .args([TEST_NAME, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, "1")
        .env("LD_LIBRARY_PATH", ld)
        .env("SD_CUDA_INCLUDE", &inc);
    if let Some(p) = &ptxas {
        child.env(PTXAS, p);
    }
    let out = child.output().expect("re-running the test binary");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    assert!(out.status.success(), "NVRTC compile check failed");
    assert!(text.contains("sm_90a:"), "child did not run the check");
}
