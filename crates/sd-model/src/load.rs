//! Loading parameters from a [`WeightSource`] into a backend, with shape checks that
//! name the tensor, the file and the expected shape.

use crate::backend::{Backend, LinearSpec};
use crate::error::Result;
use crate::plan::PrecisionPlan;
use crate::weights::{WeightSource, WeightTensor};

pub(crate) struct Loader<'a, B: Backend> {
    pub backend: &'a B,
    pub src: &'a dyn WeightSource,
    pub plan: &'a PrecisionPlan,
}

impl<B: Backend> Loader<'_, B> {
    /// `name.weight [out, in]` (+ `name.bias [out]`), with this layer's plan entry.
    pub fn linear(&self, name: &str, inp: usize, out: usize, bias: bool) -> Result<B::Linear> {
        let w = self
            .src
            .get_shaped(&format!("{name}.weight"), &[out, inp])?;
        self.linear_from(name, w, inp, out, bias)
    }

    /// A linear layer whose stored weight has another shape with the same row-major
    /// layout (a patch-embedding convolution is a linear layer over flattened patches).
    pub fn linear_reshaped(
        &self,
        name: &str,
        stored_shape: &[usize],
        inp: usize,
        out: usize,
        bias: bool,
    ) -> Result<B::Linear> {
        let mut w = self
            .src
            .get_shaped(&format!("{name}.weight"), stored_shape)?;
        w.shape = vec![out, inp];
        self.linear_from(name, w, inp, out, bias)
    }

    fn linear_from(
        &self,
        name: &str,
        w: WeightTensor<'_>,
        inp: usize,
        out: usize,
        bias: bool,
    ) -> Result<B::Linear> {
        let b = if bias {
            Some(self.src.get_shaped(&format!("{name}.bias"), &[out])?)
        } else {
            None
        };
        let spec = LinearSpec {
            name: name.to_string(),
            in_features: inp,
            out_features: out,
            quant: self.plan.get(name),
        };
        self.backend.load_linear(&spec, &w, b.as_ref())
    }

    pub fn param(&self, name: &str, shape: &[usize]) -> Result<B::Tensor> {
        let w = self.src.get_shaped(name, shape)?;
        self.backend.load_param(&w)
    }

    /// `name.weight` and `name.bias` of a norm with affine parameters of size `n`.
    pub fn norm(&self, name: &str, n: usize) -> Result<(B::Tensor, B::Tensor)> {
        Ok((
            self.param(&format!("{name}.weight"), &[n])?,
            self.param(&format!("{name}.bias"), &[n])?,
        ))
    }
}
