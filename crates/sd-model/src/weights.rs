//! Where model parameters come from: a checkpoint directory, an engine bundle, a test.
//!
//! A [`WeightSource`] hands out [`WeightTensor`]s that borrow their bytes (usually from a
//! memory map) in the dtype stored on disk; a backend converts them once, to whatever it
//! computes with.

use std::borrow::Cow;

use half::{bf16, f16};

use crate::error::{ModelError, Result};
use crate::tensor::HostTensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDType {
    F32,
    F16,
    BF16,
}

impl StorageDType {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

/// One parameter tensor as stored: little-endian bytes of `dtype`.
#[derive(Clone, Debug)]
pub struct WeightTensor<'a> {
    pub name: String,
    /// The file (or bundle entry) it came from, for error messages.
    pub origin: String,
    pub shape: Vec<usize>,
    pub dtype: StorageDType,
    pub bytes: Cow<'a, [u8]>,
}

impl WeightTensor<'_> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Decodes to f32 (exact for every supported dtype).
    pub fn to_f32(&self) -> Vec<f32> {
        let b = &self.bytes[..];
        match self.dtype {
            StorageDType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            StorageDType::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            StorageDType::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        }
    }

    pub fn to_host(&self) -> HostTensor {
        HostTensor {
            shape: self.shape.clone(),
            data: self.to_f32(),
        }
    }

    /// A weight owned by nobody's file: for tests and computed parameters.
    pub fn from_host(name: &str, t: &HostTensor) -> WeightTensor<'static> {
        let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        WeightTensor {
            name: name.to_string(),
            origin: "<memory>".to_string(),
            shape: t.shape.clone(),
            dtype: StorageDType::F32,
            bytes: Cow::Owned(bytes),
        }
    }
}

/// A set of named parameter tensors, one model component's worth.
pub trait WeightSource: Sync {
    /// What this source holds, for messages ("transformer in /models/sd35/transformer").
    fn describe(&self) -> String;
    /// Every tensor name in the source.
    fn names(&self) -> Vec<String>;
    fn contains(&self, name: &str) -> bool;
    /// The tensor, or [`ModelError::MissingTensor`].
    fn get(&self, name: &str) -> Result<WeightTensor<'_>>;

    /// The tensor, checked to have exactly `shape`.
    fn get_shaped(&self, name: &str, shape: &[usize]) -> Result<WeightTensor<'_>> {
        let t = self.get(name)?;
        if t.shape != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                file: t.origin.clone(),
                expected: shape.to_vec(),
                found: t.shape.clone(),
            });
        }
        Ok(t)
    }
}

/// An in-memory source, used by tests and by engines that compute parameters.
#[derive(Default, Debug)]
pub struct MemoryWeights {
    pub label: String,
    pub tensors: std::collections::BTreeMap<String, HostTensor>,
}

impl MemoryWeights {
    pub fn new(label: &str) -> Self {
        Self {
            label: label.to_string(),
            tensors: Default::default(),
        }
    }
    pub fn insert(&mut self, name: &str, t: HostTensor) {
        self.tensors.insert(name.to_string(), t);
    }
}

impl WeightSource for MemoryWeights {
    fn describe(&self) -> String {
        self.label.clone()
    }
    fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn get(&self, name: &str) -> Result<WeightTensor<'_>> {
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                component: self.label.clone(),
                files: "<memory>".to_string(),
            })?;
        Ok(WeightTensor::from_host(name, t))
    }
}
