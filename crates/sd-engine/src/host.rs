//! Can this machine run a bundle? Cheap probes only (no driver calls).

use std::path::{Path, PathBuf};

use crate::manifest::{Manifest, Target};

/// What a cheap look at the machine finds about NVIDIA GPUs.
#[derive(Clone, Debug, Default)]
pub struct CudaProbe {
    /// `libcuda.so.1`, if found in the usual places or on `LD_LIBRARY_PATH`.
    pub driver_library: Option<PathBuf>,
    /// From `/proc/driver/nvidia/version`.
    pub driver_version: Option<String>,
    /// `/dev/nvidia0`, `/dev/nvidia1`, ...
    pub devices: Vec<PathBuf>,
}

impl CudaProbe {
    pub fn run() -> Self {
        let mut dirs: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
            .map(|v| std::env::split_paths(&v).collect())
            .unwrap_or_default();
        for d in [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
            "/usr/local/cuda/lib64",
            "/usr/lib/wsl/lib",
        ] {
            dirs.push(PathBuf::from(d));
        }
        let driver_library = dirs
            .iter()
            .map(|d| d.join("libcuda.so.1"))
            .find(|p| p.exists());
        let driver_version = std::fs::read_to_string("/proc/driver/nvidia/version")
            .ok()
            .and_then(|t| {
                t.lines().next().map(|l| {
                    l.split_whitespace()
                        .find(|w| {
                            w.chars().next().is_some_and(|c| c.is_ascii_digit()) && w.contains('.')
                        })
                        .unwrap_or(l)
                        .to_string()
                })
            });
        let devices = (0..16)
            .map(|i| PathBuf::from(format!("/dev/nvidia{i}")))
            .filter(|p| Path::new(p).exists())
            .collect();
        Self {
            driver_library,
            driver_version,
            devices,
        }
    }

    /// `None` when a driver and a GPU are present; else what is missing.
    pub fn missing(&self) -> Option<String> {
        let mut missing = Vec::new();
        if self.driver_library.is_none() {
            missing.push("the NVIDIA driver library libcuda.so.1 (not in LD_LIBRARY_PATH, /usr/lib/x86_64-linux-gnu, /usr/lib64, /usr/lib)");
        }
        if self.devices.is_empty() {
            missing.push("an NVIDIA GPU (no /dev/nvidia* device)");
        }
        (!missing.is_empty()).then(|| missing.join("; "))
    }
}

/// The message for `--target cuda` when it cannot be built here.
pub fn cuda_missing_reason() -> String {
    let probe = CudaProbe::run();
    let found = match probe.missing() {
        Some(m) => format!("this machine has no usable GPU: missing {m}"),
        None => format!(
            "this machine has a GPU (driver {}), but this build of sd-build has no CUDA executor yet",
            probe.driver_version.as_deref().unwrap_or("unknown")
        ),
    };
    format!(
        "{found}. A cuda bundle is compiled on the GPU it will run on (the kernels and GEMM algorithms are chosen for that GPU): run `sd-build compile --target cuda` there, with a build that includes the CUDA executor (crates/sd-cuda). On this machine, use `--target cpu`."
    )
}

/// Whether this machine can run a bundle, and why not.
pub fn can_run(m: &Manifest) -> Result<String, String> {
    match m.target {
        Target::Cpu => Ok("yes: cpu bundles run on any machine".into()),
        Target::Cuda => {
            let probe = CudaProbe::run();
            if let Some(missing) = probe.missing() {
                return Err(format!("no: missing {missing}"));
            }
            let wanted = m
                .cuda
                .as_ref()
                .and_then(|c| c.compute_capability)
                .map(|[a, b]| format!("compute capability {a}.{b}"))
                .unwrap_or_else(|| "an unrecorded compute capability".into());
            Ok(format!(
                "probably: a GPU and driver {} are present; the bundle needs {wanted}, checked when it is loaded",
                probe
                    .driver_version
                    .as_deref()
                    .unwrap_or("(version unknown)")
            ))
        }
    }
}
