use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use sd_model::{HostTensor, ModelError, StorageDType, WeightSource, WeightTensor};

use crate::{CheckpointError, Result, read_text};

struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    start: usize,
    end: usize,
}

/// The safetensors files of one component, memory-mapped, with a name index.
pub struct SafetensorsWeights {
    label: String,
    files: Vec<(PathBuf, Arc<Mmap>)>,
    entries: BTreeMap<String, Entry>,
}

fn invalid(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl SafetensorsWeights {
    /// Opens `dir`'s weights: the shards named by a `*.safetensors.index.json` if there is
    /// one, else every `*.safetensors` file in it.
    pub fn open_dir(dir: &Path, label: &str) -> Result<Self> {
        if !dir.is_dir() {
            return Err(CheckpointError::Missing {
                path: dir.to_path_buf(),
                what: format!("the `{label}` component directory"),
            });
        }
        let listing = std::fs::read_dir(dir).map_err(|source| CheckpointError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut names: Vec<String> = listing
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let files: Vec<PathBuf> = if let Some(index) = names
            .iter()
            .find(|n| n.ends_with(".safetensors.index.json"))
        {
            let path = dir.join(index);
            let json: serde_json::Value = serde_json::from_str(&read_text(&path)?)
                .map_err(|e| invalid(&path, e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| invalid(&path, "no `weight_map` object"))?;
            let mut shards: Vec<String> = map
                .values()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| invalid(&path, "weight_map values must be file names"))?;
            shards.sort();
            shards.dedup();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else {
            names
                .iter()
                .filter(|n| n.ends_with(".safetensors"))
                .map(|n| dir.join(n))
                .collect()
        };
        if files.is_empty() {
            return Err(CheckpointError::Missing {
                path: dir.to_path_buf(),
                what: format!("no *.safetensors weights for `{label}`"),
            });
        }
        Self::open_files(&files, label)
    }

    pub fn open_files(paths: &[PathBuf], label: &str) -> Result<Self> {
        let mut files = Vec::new();
        let mut entries = BTreeMap::new();
        for (fi, path) in paths.iter().enumerate() {
            let file = File::open(path).map_err(|source| {
                if source.kind() == std::io::ErrorKind::NotFound {
                    CheckpointError::Missing {
                        path: path.clone(),
                        what: format!("weights file of `{label}`"),
                    }
                } else {
                    CheckpointError::Io {
                        path: path.clone(),
                        source,
                    }
                }
            })?;
            // SAFETY: the map is read-only; checkpoint files are not modified while a
            // process serves them (the same contract every mmap-based loader has).
            let map = unsafe { Mmap::map(&file) }.map_err(|source| CheckpointError::Io {
                path: path.clone(),
                source,
            })?;
            let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| {
                invalid(path, format!("corrupt or truncated safetensors file ({e})"))
            })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                if entries.contains_key(&name) {
                    return Err(invalid(
                        path,
                        format!("tensor `{name}` appears in two files"),
                    ));
                }
                entries.insert(
                    name,
                    Entry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: base + info.data_offsets.0,
                        end: base + info.data_offsets.1,
                    },
                );
            }
            files.push((path.clone(), Arc::new(map)));
        }
        Ok(Self {
            label: label.to_string(),
            files,
            entries,
        })
    }

    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|(p, _)| p.as_path())
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> usize {
        self.entries.values().map(|e| e.end - e.start).sum()
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }
}

impl WeightSource for SafetensorsWeights {
    fn describe(&self) -> String {
        let dir = self
            .files
            .first()
            .and_then(|(p, _)| p.parent())
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        format!("{} in {dir}", self.label)
    }

    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    fn get(&self, name: &str) -> sd_model::Result<WeightTensor<'_>> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                component: self.label.clone(),
                files: self
                    .files
                    .iter()
                    .map(|(p, _)| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })?;
        let (path, map) = &self.files[e.file];
        let dtype = match e.dtype {
            Dtype::F32 => StorageDType::F32,
            Dtype::F16 => StorageDType::F16,
            Dtype::BF16 => StorageDType::BF16,
            other => {
                return Err(ModelError::UnsupportedDType {
                    name: name.to_string(),
                    file: path.display().to_string(),
                    dtype: format!("{other:?}"),
                });
            }
        };
        Ok(WeightTensor {
            name: name.to_string(),
            origin: path.display().to_string(),
            shape: e.shape.clone(),
            dtype,
            bytes: std::borrow::Cow::Borrowed(&map[e.start..e.end]),
        })
    }
}

/// Writes f32 tensors to a safetensors file atomically (temp file + rename): a reader
/// never sees a half-written file, and an interrupted write leaves no file behind.
pub fn write_tensor_file(path: &Path, tensors: &[(&str, &HostTensor)]) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(n, t)| {
            (
                n.to_string(),
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                t.shape.clone(),
            )
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, b, s)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| invalid(path, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, None).map_err(|e| invalid(path, e.to_string()))?;
    atomic_write(path, &data)
}

/// Writes `data` to `path` through a temporary file in the same directory.
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io)?;
    tmp.write_all(data).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Reads one tensor of a safetensors file as f32 (for `--latents` and fixtures).
pub fn read_tensor_file(path: &Path, name: &str) -> Result<HostTensor> {
    let w = SafetensorsWeights::open_files(&[path.to_path_buf()], "tensor file")?;
    let t = w.get(name).map_err(|_| {
        invalid(
            path,
            format!("no tensor named `{name}` (found: {})", w.names().join(", ")),
        )
    })?;
    Ok(t.to_host())
}
