//! Compiling a checkpoint + precision plan into a bundle directory, atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use sd_checkpoint::fingerprint::ModelFingerprint;
use sd_checkpoint::{Checkpoint, component};
use sd_model::{LinearQuant, PrecisionPlan, StorageDType, WeightSource};

use crate::manifest::*;
use crate::payload::{TensorPlan, sha256_file, write_payload};
use crate::{EngineError, Result, host};

/// What to build.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub target: Target,
    pub precision: Precision,
    pub compute: Compute,
    /// The transformer's precision plan (from the calibration cache); ignored for
    /// `Precision::Bf16`.
    pub plan: PrecisionPlan,
    /// Required for `Precision::Fp8`.
    pub calibration: Option<CalibrationInfo>,
    /// Replace an existing bundle at the destination.
    pub force: bool,
    /// Test hook: fail after writing this many payload files.
    #[doc(hidden)]
    pub fail_after_payloads: Option<usize>,
}

impl CompileOptions {
    pub fn new(target: Target, precision: Precision) -> Self {
        Self {
            target,
            precision,
            compute: Compute::Bf16,
            plan: PrecisionPlan::full_precision(),
            calibration: None,
            force: false,
            fail_after_payloads: None,
        }
    }
}

/// The weighted components a bundle carries, in payload order.
pub fn weighted_components(ckpt: &Checkpoint) -> Vec<&'static str> {
    let mut v = vec![component::TRANSFORMER, component::CLIP_L, component::CLIP_G];
    if ckpt.t5.is_some() {
        v.push(component::T5);
    }
    v.push(component::VAE);
    v
}

pub(crate) fn tokenizer_dirs(with_t5: bool) -> Vec<&'static str> {
    let mut v = vec![component::TOKENIZER_L, component::TOKENIZER_G];
    if with_t5 {
        v.push(component::TOKENIZER_T5);
    }
    v
}

/// The checkpoint's configs as raw JSON, keyed by component directory.
fn raw_configs(ckpt: &Checkpoint) -> Result<BTreeMap<String, serde_json::Value>> {
    let mut out = BTreeMap::new();
    let mut files: Vec<(&str, &str)> = weighted_components(ckpt)
        .into_iter()
        .map(|c| (c, "config.json"))
        .collect();
    files.push((component::SCHEDULER, "scheduler_config.json"));
    for (comp, file) in files {
        let path = ckpt.component_dir(comp).join(file);
        let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
            path: path.clone(),
            source,
        })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| EngineError::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        out.insert(comp.to_string(), v);
    }
    Ok(out)
}

/// A directory being built next to its destination; removed on drop unless committed.
struct Staging {
    dir: PathBuf,
    committed: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn sibling(out: &Path, tag: &str) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| EngineError::Usage(format!("--out {} has no file name", out.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(parent.join(format!(".{name}.{tag}-{}-{nanos}", std::process::id())))
}

/// Removes staging directories of `out` left by compiles that were killed (their
/// process is gone). Only where `/proc` tells which processes are alive.
fn remove_stale_staging(out: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let (Some(name), Some(parent)) = (out.file_name(), out.parent()) else {
        return;
    };
    let parent = if parent.as_os_str().is_empty() {
        Path::new(".")
    } else {
        parent
    };
    let name = name.to_string_lossy();
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.filter_map(|e| e.ok()) {
        let file = e.file_name().to_string_lossy().into_owned();
        let rest = file
            .strip_prefix(&format!(".{name}.partial-"))
            .or_else(|| file.strip_prefix(&format!(".{name}.old-")));
        let Some(pid) = rest.and_then(|r| r.split('-').next()) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    let f = std::fs::File::open(dir).map_err(|source| EngineError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    f.sync_all().map_err(|source| EngineError::Io {
        path: dir.to_path_buf(),
        source,
    })
}

/// The components whose linear layers a precision plan may name.
fn planned_components(ckpt: &Checkpoint) -> Vec<&'static str> {
    let mut v = vec![component::TRANSFORMER];
    if ckpt.t5.is_some() {
        v.push(component::T5);
    }
    v
}

fn check_plan(ckpt: &Checkpoint, plan: &PrecisionPlan) -> Result<()> {
    let sources = planned_components(ckpt)
        .into_iter()
        .map(|c| ckpt.weights(c))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    for (name, q) in &plan.layers {
        let Some(weight) = q.weight_quant() else {
            continue;
        };
        let wname = format!("{name}.weight");
        let Some(shape) = sources.iter().find_map(|w| w.shape(&wname)) else {
            return Err(EngineError::PlanMismatch(format!(
                "the precision plan names layer `{name}`, which neither the transformer nor T5 of {} has; the calibration cache is for another model — recalibrate with `sd-build calibrate --model {}`",
                ckpt.root.display(),
                ckpt.root.display()
            )));
        };
        let out = shape[0];
        if weight.scales.len() != 1 && weight.scales.len() != out {
            return Err(EngineError::PlanMismatch(format!(
                "layer `{name}` has {} weight scales for {out} output channels",
                weight.scales.len()
            )));
        }
        if let Some(s) = weight
            .scales
            .iter()
            .chain(q.input_quant().map(|i| &i.scale))
            .find(|s| !(s.is_finite() && **s > 0.0))
        {
            return Err(EngineError::PlanMismatch(format!(
                "layer `{name}` has scale {s}, which is not positive and finite"
            )));
        }
    }
    Ok(())
}

/// What a GPU target adds to a bundle; the cuda executor (crates/sd-cuda) implements
/// it. The weights are packed by [`compile_with`] in the target's layout
/// ([`Fp8Layout::CublasltTn`] for cuda); the builder adds kernels and hardware facts.
pub trait TargetBuilder {
    /// Called before anything is written: refuse here what this GPU cannot run (e.g.
    /// `--precision fp8` on a GPU without FP8 tensor cores: suggest `--precision bf16`).
    fn preflight(&self, opts: &CompileOptions, plan: &PrecisionPlan) -> Result<()>;
    /// Writes extra payload files (kernels as PTX / cubin, timing caches, ...) under
    /// `staging` and returns them (paths relative to `staging`, `/`-separated) and the
    /// manifest's `cuda` section. Files must be complete and fsynced on return; their
    /// checksums are computed by the caller.
    fn write_extras(&self, staging: &Path, manifest: &Manifest) -> Result<TargetExtras>;
}

/// What a [`TargetBuilder`] adds to the manifest.
#[derive(Clone, Debug, Default)]
pub struct TargetExtras {
    pub files: Vec<String>,
    pub cuda: Option<CudaInfo>,
}

/// Builds a bundle from `ckpt` at `out`. Nothing appears at `out` unless the whole
/// bundle was written; with `force` an existing bundle is replaced. The `cpu` target
/// is complete here; `cuda` needs [`compile_with`] and the cuda executor's builder.
pub fn compile(
    ckpt: &Checkpoint,
    fingerprint: &ModelFingerprint,
    opts: &CompileOptions,
    out: &Path,
) -> Result<Manifest> {
    compile_with(ckpt, fingerprint, opts, out, None)
}

/// [`compile`] with a target builder (required for `cuda`).
pub fn compile_with(
    ckpt: &Checkpoint,
    fingerprint: &ModelFingerprint,
    opts: &CompileOptions,
    out: &Path,
    builder: Option<&dyn TargetBuilder>,
) -> Result<Manifest> {
    if opts.target == Target::Cuda && builder.is_none() {
        return Err(EngineError::CudaUnavailable(host::cuda_missing_reason()));
    }
    if opts.precision == Precision::Fp8 && opts.calibration.is_none() {
        return Err(EngineError::NoCalibration);
    }
    if out.exists() && !opts.force {
        return Err(EngineError::Exists(out.to_path_buf()));
    }
    ckpt.validate()?;
    let plan = match opts.precision {
        Precision::Fp8 => opts.plan.clone(),
        Precision::Bf16 => PrecisionPlan::full_precision(),
    };
    check_plan(ckpt, &plan)?;
    if let Some(b) = builder {
        b.preflight(opts, &plan)?;
    }

    remove_stale_staging(out);
    let staging = Staging {
        dir: sibling(out, "partial")?,
        committed: false,
    };
    let mk = |d: &Path| {
        std::fs::create_dir_all(d).map_err(|source| EngineError::Io {
            path: d.to_path_buf(),
            source,
        })
    };
    mk(&staging.dir)?;
    mk(&staging.dir.join("weights"))?;

    let mut files = Vec::new();
    let mut components = Vec::new();
    let mut layers = Vec::new();
    let none = PrecisionPlan::full_precision();
    for (i, comp) in weighted_components(ckpt).into_iter().enumerate() {
        if opts.fail_after_payloads == Some(i) {
            return Err(EngineError::Internal(format!(
                "injected failure after {i} payloads"
            )));
        }
        let src = ckpt.weights(comp)?;
        let comp_plan = if planned_components(ckpt).contains(&comp) {
            &plan
        } else {
            &none
        };
        let rel = format!("weights/{comp}.safetensors");
        let (entry, comp_layers) =
            write_component(comp, &src, comp_plan, opts, &staging.dir.join(&rel), &rel)?;
        files.push(FileEntry {
            path: rel,
            bytes: entry.1,
            sha256: entry.2,
        });
        components.push(entry.0);
        layers.extend(comp_layers);
    }

    let mut tokenizers = BTreeMap::new();
    for tok in tokenizer_dirs(ckpt.t5.is_some()) {
        let src = ckpt.component_dir(tok);
        let dst = staging.dir.join(tok);
        mk(&dst)?;
        let mut names: Vec<String> = std::fs::read_dir(&src)
            .map_err(|source| EngineError::Io {
                path: src.clone(),
                source,
            })?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for n in &names {
            let (from, to) = (src.join(n), dst.join(n));
            std::fs::copy(&from, &to).map_err(|source| EngineError::Io {
                path: from.clone(),
                source,
            })?;
            std::fs::File::open(&to)
                .and_then(|f| f.sync_all())
                .map_err(|source| EngineError::Io {
                    path: to.clone(),
                    source,
                })?;
            let rel = format!("{tok}/{n}");
            files.push(FileEntry {
                bytes: std::fs::metadata(&to).map(|m| m.len()).unwrap_or(0),
                sha256: sha256_file(&to)?,
                path: rel,
            });
        }
        fsync_dir(&dst)?;
        tokenizers.insert(tok.to_string(), names);
    }

    let mut manifest = Manifest {
        format: FORMAT_NAME.to_string(),
        format_version: FORMAT_VERSION,
        created_by: format!("sd-engine {}", env!("CARGO_PKG_VERSION")),
        target: opts.target,
        precision: opts.precision,
        compute: opts.compute,
        model: ModelInfo {
            fingerprint: fingerprint.id.clone(),
            components: fingerprint.components.clone(),
            source: ckpt.root.display().to_string(),
        },
        calibration: match opts.precision {
            Precision::Fp8 => opts.calibration.clone(),
            Precision::Bf16 => None,
        },
        configs: raw_configs(ckpt)?,
        components,
        layers,
        tokenizers,
        files,
        cuda: None,
    };
    if let Some(b) = builder {
        let extras = b.write_extras(&staging.dir, &manifest)?;
        for rel in extras.files {
            let path = staging.dir.join(&rel);
            manifest.files.push(FileEntry {
                bytes: std::fs::metadata(&path)
                    .map_err(|source| EngineError::Io {
                        path: path.clone(),
                        source,
                    })?
                    .len(),
                sha256: sha256_file(&path)?,
                path: rel,
            });
        }
        manifest.cuda = extras.cuda;
    }
    let text = serde_json::to_string_pretty(&manifest)?;
    let mpath = staging.dir.join(MANIFEST_FILE);
    std::fs::write(&mpath, text.as_bytes())
        .and_then(|()| std::fs::File::open(&mpath)?.sync_all())
        .map_err(|source| EngineError::Io {
            path: mpath.clone(),
            source,
        })?;
    fsync_dir(&staging.dir.join("weights"))?;
    fsync_dir(&staging.dir)?;
    if let Some(n) = opts.fail_after_payloads
        && n >= weighted_components(ckpt).len()
    {
        return Err(EngineError::Internal(
            "injected failure before the rename".into(),
        ));
    }
    commit(staging, out, opts.force)?;
    Ok(manifest)
}

/// Swaps two directory entries in one step (`renameat2(RENAME_EXCHANGE)`), so a
/// reader of either path always sees a whole directory.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (ca, cb) = (c(a)?, c(b)?);
    // SAFETY: two NUL-terminated paths that outlive the call; no other memory is
    // touched.
    let r = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Moves the finished staging directory to `out`. An existing `out` (only with
/// `force`) is swapped with the new bundle in one step where the filesystem allows
/// (a server reading `out` meanwhile sees the old or the new bundle, never neither),
/// else renamed aside first; the old bundle is removed once the new one is in place.
fn commit(mut staging: Staging, out: &Path, force: bool) -> Result<()> {
    let rename = |from: &Path, to: &Path| {
        std::fs::rename(from, to).map_err(|source| EngineError::Io {
            path: to.to_path_buf(),
            source,
        })
    };
    let old = if out.exists() {
        if !force {
            return Err(EngineError::Exists(out.to_path_buf()));
        }
        match exchange(&staging.dir, out) {
            Ok(()) => {
                // `staging.dir` now holds the old bundle.
                staging.committed = true;
                if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                    fsync_dir(parent)?;
                }
                let _ = std::fs::remove_dir_all(&staging.dir);
                return Ok(());
            }
            // Filesystems without RENAME_EXCHANGE: rename aside, then into place.
            Err(e)
                if e.kind() == std::io::ErrorKind::Unsupported
                    || matches!(
                        e.raw_os_error(),
                        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
                    ) => {}
            Err(source) => {
                return Err(EngineError::Io {
                    path: out.to_path_buf(),
                    source,
                });
            }
        }
        let aside = sibling(out, "old")?;
        rename(out, &aside)?;
        Some(aside)
    } else {
        None
    };
    if let Err(e) = rename(&staging.dir, out) {
        if let Some(aside) = &old {
            let _ = std::fs::rename(aside, out);
        }
        return Err(e);
    }
    staging.committed = true;
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        fsync_dir(parent)?;
    }
    if let Some(aside) = old {
        let _ = std::fs::remove_dir_all(aside);
    }
    Ok(())
}

fn storage_dtype_of(d: StorageDType) -> (Dtype, &'static str) {
    match d {
        StorageDType::F32 => (Dtype::F32, "f32"),
        StorageDType::F16 => (Dtype::F16, "f16"),
        StorageDType::BF16 => (Dtype::BF16, "bf16"),
    }
}

enum Item {
    /// A dense tensor, converted or copied.
    Dense {
        name: String,
    },
    /// FP8 codes of a layer's weight.
    Codes {
        layer: String,
    },
    WeightScale {
        layer: String,
    },
    InputScale {
        layer: String,
    },
}

/// Writes one component's payload; returns (entry, bytes, sha256) and its layer rows.
fn write_component(
    comp: &str,
    src: &dyn WeightSource,
    plan: &PrecisionPlan,
    opts: &CompileOptions,
    path: &Path,
    rel: &str,
) -> Result<((ComponentEntry, u64, String), Vec<LayerEntry>)> {
    let layout = match opts.target {
        Target::Cpu => Fp8Layout::OutIn,
        Target::Cuda => Fp8Layout::CublasltTn,
    };
    let mut names = src.names();
    names.sort();
    let mut plans = Vec::new();
    let mut items = Vec::new();
    let mut layers = Vec::new();
    let mut dense_dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut fp8_bytes = 0u64;
    for name in &names {
        let t = src.get(name)?;
        let layer = name.strip_suffix(".weight");
        let quant = layer.and_then(|l| plan.layers.get(l));
        if let Some(weight) = quant.and_then(|q| q.weight_quant()) {
            let input = quant.and_then(|q| q.input_quant());
            let layer = layer.unwrap_or_default().to_string();
            let out = t.shape[0];
            let inp = t.numel() / out.max(1);
            let (shape, tname) = match layout {
                Fp8Layout::OutIn => (t.shape.clone(), layout.weight_tensor(&layer)),
                Fp8Layout::CublasltTn => (vec![out, inp], layout.weight_tensor(&layer)),
            };
            plans.push(TensorPlan {
                name: tname.clone(),
                dtype: Dtype::U8,
                shape,
            });
            fp8_bytes += t.numel() as u64;
            items.push(Item::Codes {
                layer: layer.clone(),
            });
            plans.push(TensorPlan {
                name: weight_scale_tensor(&layer),
                dtype: Dtype::F32,
                shape: vec![weight.scales.len()],
            });
            items.push(Item::WeightScale {
                layer: layer.clone(),
            });
            // Weight-only layers have no input quantizer, so no input scale tensor.
            if input.is_some() {
                plans.push(TensorPlan {
                    name: input_scale_tensor(&layer),
                    dtype: Dtype::F32,
                    shape: vec![1],
                });
                items.push(Item::InputScale {
                    layer: layer.clone(),
                });
            }
            layers.push(LayerEntry {
                name: layer.clone(),
                component: comp.to_string(),
                precision: if input.is_some() {
                    PRECISION_FP8
                } else {
                    PRECISION_FP8_WEIGHT_ONLY
                }
                .into(),
                weight_format: Some(weight.format.to_string()),
                input_format: input.map(|i| i.format.to_string()),
                input_scale: input.map(|i| i.scale),
                weight_scales: Some(weight.scales.len()),
                weight_tensor: Some(tname),
                weight_scale_tensor: Some(weight_scale_tensor(&layer)),
                input_scale_tensor: input.map(|_| input_scale_tensor(&layer)),
                shape: vec![out, inp],
            });
        } else {
            let (dtype, label) = match opts.compute {
                Compute::Bf16 => (Dtype::BF16, "bf16"),
                Compute::Fp32 => storage_dtype_of(t.dtype),
            };
            *dense_dtypes.entry(label.to_string()).or_default() += 1;
            plans.push(TensorPlan {
                name: name.clone(),
                dtype,
                shape: t.shape.clone(),
            });
            items.push(Item::Dense { name: name.clone() });
        }
    }
    // Layers the plan names as dense (LinearQuant::None) are listed too.
    for (name, q) in &plan.layers {
        if q.weight_quant().is_none()
            && let Ok(t) = src.get(&format!("{name}.weight"))
        {
            let out = t.shape[0];
            layers.push(LayerEntry {
                name: name.clone(),
                component: comp.to_string(),
                precision: PRECISION_DENSE.into(),
                weight_format: None,
                input_format: None,
                input_scale: None,
                weight_scales: None,
                weight_tensor: Some(name.clone() + ".weight"),
                weight_scale_tensor: None,
                input_scale_tensor: None,
                shape: vec![out, t.numel() / out.max(1)],
            });
        }
    }
    layers.sort_by(|a, b| a.name.cmp(&b.name));

    let mut metadata = BTreeMap::new();
    metadata.insert("component".to_string(), comp.to_string());
    metadata.insert("fp8_layout".to_string(), format!("{layout:?}"));
    let bf16_compute = opts.compute == Compute::Bf16;
    let (bytes, sha) = write_payload(path, &metadata, &plans, |i| {
        Ok(match &items[i] {
            Item::Dense { name } => {
                let t = src.get(name)?;
                match plans[i].dtype {
                    Dtype::BF16 if t.dtype != StorageDType::BF16 => t
                        .to_f32()
                        .into_iter()
                        .flat_map(|v| half::bf16::from_f32(v).to_le_bytes())
                        .collect(),
                    _ => t.bytes.into_owned(),
                }
            }
            Item::Codes { layer } => {
                let Some(weight) = plan.layers.get(layer).and_then(|q| q.weight_quant()) else {
                    return Err(EngineError::Internal(format!("no plan for {layer}")));
                };
                let t = src.get(&format!("{layer}.weight"))?;
                let mut w = t.to_f32();
                if bf16_compute {
                    // What the BF16 backend quantizes: the weight rounded to BF16.
                    for v in &mut w {
                        *v = sd_model::tensor::round_bf16(*v);
                    }
                }
                let out = t.shape[0];
                let inp = w.len() / out.max(1);
                let mut codes = vec![0u8; w.len()];
                for (o, (row, dst)) in w.chunks(inp).zip(codes.chunks_mut(inp)).enumerate() {
                    sd_fp8::quantize_slice(weight.format, row, weight.scale(o), dst);
                }
                // Both layouts store [out, in] row-major (see `Fp8Layout`).
                codes
            }
            Item::WeightScale { layer } => {
                match plan.layers.get(layer).and_then(|q| q.weight_quant()) {
                    Some(weight) => weight.scales.iter().flat_map(|s| s.to_le_bytes()).collect(),
                    None => return Err(EngineError::Internal(format!("no plan for {layer}"))),
                }
            }
            Item::InputScale { layer } => match plan.layers.get(layer) {
                Some(LinearQuant::Fp8 { input, .. }) => input.scale.to_le_bytes().to_vec(),
                _ => return Err(EngineError::Internal(format!("no plan for {layer}"))),
            },
        })
    })?;
    let tensor_bytes: u64 = plans.iter().map(|p| p.nbytes() as u64).sum();
    let entry = ComponentEntry {
        name: comp.to_string(),
        file: rel.to_string(),
        tensors: plans.len(),
        bytes: tensor_bytes,
        fp8_bytes,
        dense_dtypes,
        fp8_layout: (fp8_bytes > 0).then_some(layout),
    };
    Ok(((entry, bytes, sha), layers))
}
