//! Opening a bundle: manifest checks, payload checksums, and the weight sources and
//! precision plan a pipeline is loaded from.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;
use sd_checkpoint::component;
use sd_checkpoint::fingerprint::ModelFingerprint;
use sd_fp8::Fp8Format;
use sd_model::config::{ClipConfig, SchedulerConfig, T5Config, TransformerConfig, VaeConfig};
use sd_model::{
    ActivationQuant, LinearQuant, ModelError, PrecisionPlan, StorageDType, WeightQuant,
    WeightSource, WeightTensor,
};
use sd_pipeline::{ModelConfigs, Tokenizers};

use crate::manifest::*;
use crate::payload::{Payload, sha256_file};
use crate::{EngineError, Result};

/// An opened, verified bundle.
#[derive(Debug)]
pub struct Bundle {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// How thoroughly [`Bundle::open_with`] checks payloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Sizes and SHA-256 of every file (the default for loading).
    Checksums,
    /// Sizes only (cheap; `inspect` uses it before reporting checksum status).
    Sizes,
}

/// Reads and checks `manifest.json` (format, version) without touching payloads.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    if !dir.is_dir() {
        return Err(EngineError::NotABundle {
            dir: dir.to_path_buf(),
            reason: "no such directory".into(),
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|e| EngineError::NotABundle {
        dir: dir.to_path_buf(),
        reason: format!("cannot read {MANIFEST_FILE}: {e}"),
    })?;
    let raw: serde_json::Value = serde_json::from_str(&text).map_err(|e| EngineError::Corrupt {
        path: path.clone(),
        reason: format!("not valid JSON ({e})"),
    })?;
    if raw.get("format").and_then(|v| v.as_str()) != Some(FORMAT_NAME) {
        return Err(EngineError::NotABundle {
            dir: dir.to_path_buf(),
            reason: format!("{MANIFEST_FILE} does not say format \"{FORMAT_NAME}\""),
        });
    }
    let version = raw
        .get("format_version")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    if !(u64::from(OLDEST_READABLE_FORMAT_VERSION)..=u64::from(FORMAT_VERSION)).contains(&version) {
        return Err(EngineError::Version {
            dir: dir.to_path_buf(),
            found: version,
            oldest: OLDEST_READABLE_FORMAT_VERSION,
            expected: FORMAT_VERSION,
        });
    }
    serde_json::from_value(raw).map_err(|e| EngineError::Corrupt {
        path,
        reason: format!("manifest fields: {e}"),
    })
}

/// Checks one listed file's size and (optionally) checksum.
pub(crate) fn verify_file(dir: &Path, f: &FileEntry, checksums: bool) -> Result<()> {
    if f.path.split('/').any(|p| p == ".." || p.is_empty()) {
        return Err(EngineError::Corrupt {
            path: dir.join(MANIFEST_FILE),
            reason: format!("file path `{}` leaves the bundle", f.path),
        });
    }
    let path = dir.join(&f.path);
    let len = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(_) => {
            return Err(EngineError::MissingFile {
                dir: dir.to_path_buf(),
                file: f.path.clone(),
            });
        }
    };
    if len != f.bytes {
        return Err(EngineError::Truncated {
            dir: dir.to_path_buf(),
            file: f.path.clone(),
            expected: f.bytes,
            found: len,
        });
    }
    if checksums {
        let sha = sha256_file(&path)?;
        if sha != f.sha256 {
            return Err(EngineError::Checksum {
                dir: dir.to_path_buf(),
                file: f.path.clone(),
            });
        }
    }
    Ok(())
}

impl Bundle {
    /// Opens `dir`, checking format, version, and every payload's size and SHA-256.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, Verify::Checksums)
    }

    pub fn open_with(dir: impl AsRef<Path>, verify: Verify) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let manifest = read_manifest(&dir)?;
        // Sizes of all first (a truncated copy is named as such), then checksums, one
        // file per task.
        for f in &manifest.files {
            verify_file(&dir, f, false)?;
        }
        if verify == Verify::Checksums {
            use rayon::prelude::*;
            manifest
                .files
                .par_iter()
                .map(|f| verify_file(&dir, f, true))
                .collect::<Result<Vec<()>>>()?;
        }
        for c in &manifest.components {
            if manifest.file(&c.file).is_none() {
                return Err(EngineError::Corrupt {
                    path: dir.join(MANIFEST_FILE),
                    reason: format!("payload {} has no checksum entry", c.file),
                });
            }
        }
        Ok(Self { dir, manifest })
    }

    /// Refuses a bundle compiled from another checkpoint.
    pub fn check_model(&self, fp: &ModelFingerprint, model_dir: &Path) -> Result<()> {
        if self.manifest.model.fingerprint != fp.id {
            return Err(EngineError::ModelMismatch {
                dir: self.dir.clone(),
                bundle: self.manifest.model.fingerprint.clone(),
                bundle_source: self.manifest.model.source.clone(),
                model: fp.id.clone(),
                model_dir: model_dir.to_path_buf(),
            });
        }
        Ok(())
    }

    /// Refuses a bundle built for another target.
    pub fn check_target(&self, target: Target) -> Result<()> {
        if self.manifest.target != target {
            return Err(EngineError::TargetMismatch {
                dir: self.dir.clone(),
                bundle: self.manifest.target,
                wanted: target,
            });
        }
        Ok(())
    }

    /// For cuda bundles: refuses a GPU of another architecture than the one the bundle
    /// was compiled on (`cc` = the GPU's compute capability, `gpu` its name).
    pub fn check_gpu(&self, cc: [u32; 2], gpu: &str) -> Result<()> {
        let built = self
            .manifest
            .cuda
            .as_ref()
            .and_then(|c| c.compute_capability);
        match built {
            Some(b) if b == cc => Ok(()),
            _ => Err(EngineError::GpuMismatch {
                dir: self.dir.clone(),
                bundle: built
                    .map(|[a, b]| format!("compute capability {a}.{b}"))
                    .unwrap_or_else(|| "an unrecorded GPU architecture".into()),
                bundle_gpu: self
                    .manifest
                    .cuda
                    .as_ref()
                    .and_then(|c| c.gpu_name.clone())
                    .unwrap_or_else(|| "unknown GPU".into()),
                here: format!("compute capability {}.{}", cc[0], cc[1]),
                here_gpu: gpu.to_string(),
            }),
        }
    }

    fn config_text(&self, comp: &str) -> Result<String> {
        let v = self
            .manifest
            .configs
            .get(comp)
            .ok_or_else(|| EngineError::Corrupt {
                path: self.dir.join(MANIFEST_FILE),
                reason: format!("no config for component `{comp}`"),
            })?;
        Ok(serde_json::to_string(v)?)
    }

    /// The parsed configs of every component.
    pub fn configs(&self) -> Result<ModelConfigs> {
        let t5 = if self.manifest.configs.contains_key(component::T5) {
            Some(T5Config::from_json(&self.config_text(component::T5)?)?)
        } else {
            None
        };
        Ok(ModelConfigs {
            transformer: TransformerConfig::from_json(&self.config_text(component::TRANSFORMER)?)?,
            clip_l: ClipConfig::from_json(
                "text_encoder config in the bundle manifest",
                &self.config_text(component::CLIP_L)?,
            )?,
            clip_g: ClipConfig::from_json(
                "text_encoder_2 config in the bundle manifest",
                &self.config_text(component::CLIP_G)?,
            )?,
            t5,
            vae: VaeConfig::from_json(&self.config_text(component::VAE)?)?,
            scheduler: SchedulerConfig::from_json(&self.config_text(component::SCHEDULER)?)?,
        })
    }

    /// The tokenizers copied into the bundle.
    pub fn tokenizers(&self) -> Result<Tokenizers> {
        let with_t5 = self.manifest.configs.contains_key(component::T5);
        Ok(Tokenizers::load(&self.dir, with_t5)?)
    }

    /// A component's weights (`transformer`, `text_encoder`, ...), memory-mapped.
    pub fn weights(&self, comp: &str) -> Result<BundleWeights> {
        let entry = self
            .manifest
            .component(comp)
            .ok_or_else(|| EngineError::Corrupt {
                path: self.dir.join(MANIFEST_FILE),
                reason: format!("no payload for component `{comp}`"),
            })?;
        let payload = Payload::open(&self.dir.join(&entry.file))?;
        let mut fp8 = BTreeMap::new();
        for l in self.manifest.layers.iter().filter(|l| {
            l.component == comp
                && (l.precision == PRECISION_FP8 || l.precision == PRECISION_FP8_WEIGHT_ONLY)
        }) {
            let q = layer_quant(&payload, l)?;
            let wt = l.weight_tensor.clone().unwrap_or_default();
            fp8.insert(
                format!("{}.weight", l.name),
                Fp8Entry {
                    layer: l.name.clone(),
                    tensor: wt,
                    quant: q,
                },
            );
        }
        let layout = entry.fp8_layout.unwrap_or(Fp8Layout::OutIn);
        Ok(BundleWeights {
            label: format!("{comp} in engine bundle {}", self.dir.display()),
            payload,
            fp8,
            layout,
        })
    }

    /// The transformer's precision plan, with scales read exactly from the payload.
    pub fn plan(&self) -> Result<PrecisionPlan> {
        let mut plan = PrecisionPlan::full_precision();
        let mut comps = vec![component::TRANSFORMER];
        if self.manifest.configs.contains_key(component::T5) {
            comps.push(component::T5);
        }
        for comp in comps {
            for (_, e) in self.weights(comp)?.fp8 {
                plan.layers.insert(e.layer, e.quant);
            }
        }
        Ok(plan)
    }
}

fn parse_format(path: &Path, layer: &str, f: &Option<String>) -> Result<Fp8Format> {
    f.as_deref()
        .unwrap_or("")
        .parse()
        .map_err(|_| EngineError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("layer `{layer}` has FP8 format {f:?}"),
        })
}

fn layer_quant(p: &Payload, l: &LayerEntry) -> Result<LinearQuant> {
    let corrupt = |reason: String| EngineError::Corrupt {
        path: p.path.clone(),
        reason,
    };
    let ws = p.f32s(l.weight_scale_tensor.as_deref().unwrap_or_default())?;
    let out = l.shape.first().copied().unwrap_or(0);
    if ws.len() != 1 && ws.len() != out {
        return Err(corrupt(format!(
            "layer `{}` has {} weight scales for {out} channels",
            l.name,
            ws.len()
        )));
    }
    let weight = WeightQuant {
        format: parse_format(&p.path, &l.name, &l.weight_format)?,
        scales: ws,
    };
    if l.precision == PRECISION_FP8_WEIGHT_ONLY {
        return Ok(LinearQuant::Fp8WeightOnly { weight });
    }
    let is = p.f32s(l.input_scale_tensor.as_deref().unwrap_or_default())?;
    if is.len() != 1 {
        return Err(corrupt(format!(
            "layer `{}` input scale is not one value",
            l.name
        )));
    }
    Ok(LinearQuant::Fp8 {
        weight,
        input: ActivationQuant {
            format: parse_format(&p.path, &l.name, &l.input_format)?,
            scale: is[0],
        },
    })
}

struct Fp8Entry {
    layer: String,
    /// Payload tensor holding the codes.
    tensor: String,
    quant: LinearQuant,
}

/// FP8 codes of one layer as stored, for executors that run FP8 GEMMs directly.
#[derive(Debug)]
pub struct Fp8Weight<'a> {
    pub codes: &'a [u8],
    /// Stored shape: `[out, in]` in both layouts.
    pub shape: Vec<usize>,
    pub layout: Fp8Layout,
    pub quant: &'a LinearQuant,
}

/// One component's payload as a [`WeightSource`]. Dense tensors are handed out as
/// stored (borrowed from the map); FP8 layers' weights are handed out dequantized
/// (`code * scale`, f32) — exactly the values a backend's FP8 simulation computes from
/// the original weight — so any backend can load them; [`BundleWeights::fp8`] gives
/// the codes themselves.
pub struct BundleWeights {
    label: String,
    payload: Payload,
    /// `<layer>.weight` -> codes tensor and quantization.
    fp8: BTreeMap<String, Fp8Entry>,
    layout: Fp8Layout,
}

impl BundleWeights {
    /// The FP8 codes of `layer` (a parameter prefix), if it is an FP8 layer here.
    pub fn fp8(&self, layer: &str) -> Option<Fp8Weight<'_>> {
        let e = self.fp8.get(&format!("{layer}.weight"))?;
        let t = self.payload.entries.get(&e.tensor)?;
        Some(Fp8Weight {
            codes: self.payload.bytes(t),
            shape: t.shape.clone(),
            layout: self.layout,
            quant: &e.quant,
        })
    }

    fn missing(&self, name: &str) -> ModelError {
        ModelError::MissingTensor {
            name: name.to_string(),
            component: self.label.clone(),
            files: self.payload.path.display().to_string(),
        }
    }
}

impl WeightSource for BundleWeights {
    fn describe(&self) -> String {
        self.label.clone()
    }

    fn names(&self) -> Vec<String> {
        let fp8_tensors: std::collections::BTreeSet<&str> =
            self.fp8.values().map(|e| e.tensor.as_str()).collect();
        let mut v: Vec<String> = self
            .payload
            .entries
            .keys()
            .filter(|n| {
                !(n.ends_with(".weight_scale")
                    || n.ends_with(".input_scale")
                    || fp8_tensors.contains(n.as_str()))
            })
            .cloned()
            .collect();
        v.extend(self.fp8.keys().cloned());
        v.sort();
        v
    }

    fn contains(&self, name: &str) -> bool {
        self.fp8.contains_key(name) || self.payload.entries.contains_key(name)
    }

    fn get(&self, name: &str) -> sd_model::Result<WeightTensor<'_>> {
        let origin = self.payload.path.display().to_string();
        if let Some(e) = self.fp8.get(name) {
            let t = self
                .payload
                .entries
                .get(&e.tensor)
                .ok_or_else(|| self.missing(&e.tensor))?;
            let Some(weight) = e.quant.weight_quant() else {
                return Err(self.missing(name));
            };
            let codes = self.payload.bytes(t);
            // Both layouts are [out, in] row-major (see `Fp8Layout`).
            let out = t.shape.first().copied().unwrap_or(1).max(1);
            let cols = codes.len() / out;
            let shape = t.shape.clone();
            let mut vals = vec![0f32; codes.len()];
            for (o, (src, dst)) in codes.chunks(cols).zip(vals.chunks_mut(cols)).enumerate() {
                sd_fp8::dequantize_slice(weight.format, src, weight.scale(o), dst);
            }
            let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
            return Ok(WeightTensor {
                name: name.to_string(),
                origin,
                shape,
                dtype: StorageDType::F32,
                bytes: Cow::Owned(bytes),
            });
        }
        let e = self
            .payload
            .entries
            .get(name)
            .ok_or_else(|| self.missing(name))?;
        let dtype = match e.dtype {
            Dtype::F32 => StorageDType::F32,
            Dtype::F16 => StorageDType::F16,
            Dtype::BF16 => StorageDType::BF16,
            other => {
                return Err(ModelError::UnsupportedDType {
                    name: name.to_string(),
                    file: origin,
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok(WeightTensor {
            name: name.to_string(),
            origin,
            shape: e.shape.clone(),
            dtype,
            bytes: Cow::Borrowed(self.payload.bytes(e)),
        })
    }
}

/// Checks every file the manifest lists (size, then SHA-256) and reports each one:
/// `(path, None)` when it is intact.
pub fn verify_report(dir: &Path, manifest: &Manifest) -> Vec<(String, Option<EngineError>)> {
    manifest
        .files
        .iter()
        .map(|f| (f.path.clone(), verify_file(dir, f, true).err()))
        .collect()
}
