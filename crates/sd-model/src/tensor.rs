//! A plain host-side f32 tensor: the currency between the pipeline and any backend
//! (inputs go up with [`crate::Backend::upload`], results come back with `download`).

use crate::error::{ModelError, Result};

#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(ModelError::input(format!(
                "tensor of shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(Self { shape, data })
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            data: vec![0.0; n],
        }
    }

    pub fn from_fn(shape: Vec<usize>, f: impl FnMut(usize) -> f32) -> Self {
        let n = shape.iter().product();
        Self {
            shape,
            data: (0..n).map(f).collect(),
        }
    }

    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Concatenates tensors of equal shape but for dimension 0.
    pub fn cat0(parts: &[&HostTensor]) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| ModelError::input("cat0 of no tensors"))?;
        let tail = &first.shape[1..];
        let mut data = Vec::new();
        let mut n0 = 0;
        for p in parts {
            if &p.shape[1..] != tail {
                return Err(ModelError::input(format!(
                    "cat0: shape {:?} does not match {:?}",
                    p.shape, first.shape
                )));
            }
            n0 += p.shape[0];
            data.extend_from_slice(&p.data);
        }
        let mut shape = first.shape.clone();
        shape[0] = n0;
        Ok(Self { shape, data })
    }

    /// Rows `start..start+len` of dimension 0.
    pub fn slice0(&self, start: usize, len: usize) -> Result<Self> {
        if self.shape.is_empty() || start + len > self.shape[0] {
            return Err(ModelError::input(format!(
                "slice0 {start}..{} out of range for shape {:?}",
                start + len,
                self.shape
            )));
        }
        let inner: usize = self.shape[1..].iter().product();
        let mut shape = self.shape.clone();
        shape[0] = len;
        Ok(Self {
            shape,
            data: self.data[start * inner..(start + len) * inner].to_vec(),
        })
    }
}

/// Rounds an f32 to the nearest bfloat16 (ties to even), returned as f32. NaN stays NaN.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}
