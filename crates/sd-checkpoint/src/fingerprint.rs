//! A model's identity: one SHA-256 over everything that determines its numerics.
//!
//! Calibration caches and engine bundles record the fingerprint of the checkpoint they
//! were made from and refuse another one. The digest covers, per component (in a fixed
//! order): the raw bytes of its config file, then every tensor (sorted by name) as
//! name, dtype, shape and the SHA-256 of its stored bytes. Tensor bytes are hashed
//! straight from the memory map, one tensor per task (rayon), so the fingerprint of a
//! multi-GB checkpoint costs one read of the files. Tokenizer files and
//! `model_index.json` are included too (they change what the model is fed).

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use sd_model::{StorageDType, WeightSource};
use sha2::{Digest, Sha256};

use crate::{Checkpoint, CheckpointError, Result, component};

/// Bumped whenever what goes into the digest changes.
pub const FINGERPRINT_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFingerprint {
    /// Hex SHA-256 over the whole checkpoint (see the module docs).
    pub id: String,
    /// Hex SHA-256 of each component on its own (`transformer`, `vae`, ...), so a
    /// consumer that only uses one component can check just that one.
    pub components: BTreeMap<String, String>,
    /// Number of tensors and bytes of tensor data hashed.
    pub tensors: usize,
    pub bytes: u64,
}

impl ModelFingerprint {
    /// The first 12 hex digits, for messages.
    pub fn short(&self) -> &str {
        &self.id[..self.id.len().min(12)]
    }

    /// Hashes `ckpt`'s configs, tokenizers and weights.
    pub fn compute(ckpt: &Checkpoint) -> Result<Self> {
        let mut weighted = vec![
            (component::TRANSFORMER, "config.json"),
            (component::CLIP_L, "config.json"),
            (component::CLIP_G, "config.json"),
            (component::VAE, "config.json"),
        ];
        if ckpt.t5.is_some() {
            weighted.push((component::T5, "config.json"));
        }
        let mut tokenizers = vec![component::TOKENIZER_L, component::TOKENIZER_G];
        if ckpt.t5.is_some() {
            tokenizers.push(component::TOKENIZER_T5);
        }

        let mut components = BTreeMap::new();
        let (mut tensors, mut bytes) = (0usize, 0u64);
        for (comp, config) in &weighted {
            let dir = ckpt.component_dir(comp);
            let mut h = Sha256::new();
            hash_file(&mut h, &dir.join(config))?;
            let w = ckpt.weights(comp)?;
            let (n, b) = hash_weights(&mut h, &w)?;
            tensors += n;
            bytes += b;
            components.insert(comp.to_string(), hex::encode(h.finalize()));
        }
        {
            let mut h = Sha256::new();
            hash_file(
                &mut h,
                &ckpt
                    .component_dir(component::SCHEDULER)
                    .join("scheduler_config.json"),
            )?;
            components.insert(component::SCHEDULER.to_string(), hex::encode(h.finalize()));
        }
        for comp in tokenizers {
            let dir = ckpt.component_dir(comp);
            let mut names: Vec<String> = std::fs::read_dir(&dir)
                .map_err(|source| CheckpointError::Io {
                    path: dir.clone(),
                    source,
                })?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            let mut h = Sha256::new();
            for n in names {
                h.update((n.len() as u64).to_le_bytes());
                h.update(n.as_bytes());
                hash_file(&mut h, &dir.join(&n))?;
            }
            components.insert(comp.to_string(), hex::encode(h.finalize()));
        }

        let mut h = Sha256::new();
        h.update(format!("sd-fp8 model fingerprint v{FINGERPRINT_VERSION}\n").as_bytes());
        hash_file(&mut h, &ckpt.root.join("model_index.json"))?;
        for (name, digest) in &components {
            h.update(format!("{name} {digest}\n").as_bytes());
        }
        Ok(Self {
            id: hex::encode(h.finalize()),
            components,
            tensors,
            bytes,
        })
    }
}

fn hash_file(h: &mut Sha256, path: &Path) -> Result<()> {
    let data = std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            CheckpointError::Missing {
                path: path.to_path_buf(),
                what: "file needed for the model fingerprint".into(),
            }
        } else {
            CheckpointError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    h.update((data.len() as u64).to_le_bytes());
    h.update(&data);
    Ok(())
}

/// Feeds every tensor's name, dtype, shape and content digest into `h`; returns the
/// number of tensors and of data bytes.
fn hash_weights(h: &mut Sha256, w: &dyn WeightSource) -> Result<(usize, u64)> {
    let mut names = w.names();
    names.sort();
    let digests = names
        .par_iter()
        .map(|name| {
            let t = w.get(name)?;
            let digest: [u8; 32] = Sha256::digest(&t.bytes[..]).into();
            Ok::<_, CheckpointError>((t.dtype, t.shape.clone(), t.bytes.len() as u64, digest))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut bytes = 0;
    for (name, (dtype, shape, len, digest)) in names.iter().zip(digests) {
        let dtype = match dtype {
            StorageDType::F32 => "F32",
            StorageDType::F16 => "F16",
            StorageDType::BF16 => "BF16",
        };
        let shape: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        h.update(format!("{name} {dtype} [{}] ", shape.join(",")).as_bytes());
        h.update(digest);
        h.update(b"\n");
        bytes += len;
    }
    Ok((names.len(), bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../models")
            .join(name)
    }

    #[test]
    fn stable_and_distinct() {
        let a = ModelFingerprint::compute(&Checkpoint::open(tiny("tiny-sd3")).unwrap()).unwrap();
        let a2 = ModelFingerprint::compute(&Checkpoint::open(tiny("tiny-sd3")).unwrap()).unwrap();
        let b = ModelFingerprint::compute(&Checkpoint::open(tiny("tiny-sd35m")).unwrap()).unwrap();
        assert_eq!(a, a2);
        assert_ne!(a.id, b.id);
        assert_eq!(a.id.len(), 64);
        assert!(a.tensors > 0 && a.bytes > 0);
        assert!(a.components.contains_key("transformer"));
    }
}
