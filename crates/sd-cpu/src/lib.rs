//! The CPU backend: the reference executor that runs everywhere.
//!
//! Tensors are f32 in memory. In [`ComputePrecision::Bf16`] every parameter and every
//! operation's output is rounded to bfloat16 (accumulation stays f32), which is what a
//! BF16 GPU engine computes. Linear layers whose plan entry is FP8 run the exact FP8
//! simulation: weights quantized once at load (per-channel scales), input activations
//! quantized and dequantized at every call, f32 accumulation.
//!
//! Work is spread over all cores with rayon. Linear layers run one batch entry at a time
//! (a GEMM of the entry's own rows), so a request's result never depends on which other
//! requests share its batch.

mod ops;
mod tensor;

pub use tensor::CpuTensor;

use sd_model::backend::{Activation, AttentionParams, Backend, Conv2dParams, LinearSpec};
use sd_model::plan::{ActivationQuant, LinearQuant};
use sd_model::{HostTensor, ModelError, Result, WeightTensor};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ComputePrecision {
    #[default]
    F32,
    Bf16,
}

#[derive(Clone, Debug, Default)]
pub struct CpuBackend {
    pub precision: ComputePrecision,
}

/// A prepared linear layer: the effective f32 weight (already FP8-rounded when quantized).
pub struct CpuLinear {
    pub spec: LinearSpec,
    /// `[out, in]` row-major.
    weight: Vec<f32>,
    bias: Option<Vec<f32>>,
    input_quant: Option<ActivationQuant>,
}

impl CpuLinear {
    /// The effective weight as the GEMM sees it (for tests and exporters).
    pub fn effective_weight(&self) -> &[f32] {
        &self.weight
    }
}

impl CpuBackend {
    pub fn new(precision: ComputePrecision) -> Self {
        Self { precision }
    }

    fn round(&self, mut v: Vec<f32>) -> Vec<f32> {
        if self.precision == ComputePrecision::Bf16 {
            ops::round_bf16_slice(&mut v);
        }
        v
    }

    fn out(&self, shape: Vec<usize>, data: Vec<f32>) -> CpuTensor {
        CpuTensor::new(shape, self.round(data))
    }
}

/// Quantizes a `[out, in]` weight to FP8 with per-output-channel (or one) scale and
/// returns its dequantized values: what an FP8 GEMM multiplies.
pub fn fp8_weight(
    spec: &LinearSpec,
    weight: &[f32],
    q: &sd_model::plan::WeightQuant,
) -> Result<Vec<f32>> {
    q.check(&spec.name, spec.out_features)
        .map_err(ModelError::backend)?;
    let inp = spec.in_features;
    let mut w = weight.to_vec();
    q.fake_quantize(&mut w, inp);
    Ok(w)
}

impl Backend for CpuBackend {
    type Tensor = CpuTensor;
    type Linear = CpuLinear;

    fn describe(&self) -> String {
        match self.precision {
            ComputePrecision::F32 => "cpu fp32".into(),
            ComputePrecision::Bf16 => "cpu bf16".into(),
        }
    }

    fn upload(&self, t: &HostTensor) -> Result<CpuTensor> {
        Ok(self.out(t.shape.clone(), t.data.clone()))
    }

    fn download(&self, t: &CpuTensor) -> Result<HostTensor> {
        Ok(HostTensor {
            shape: t.shape().to_vec(),
            data: t.data().to_vec(),
        })
    }

    fn dims(&self, t: &CpuTensor) -> Vec<usize> {
        t.shape().to_vec()
    }

    fn load_param(&self, w: &WeightTensor<'_>) -> Result<CpuTensor> {
        Ok(self.out(w.shape.clone(), w.to_f32()))
    }

    fn load_linear(
        &self,
        spec: &LinearSpec,
        weight: &WeightTensor<'_>,
        bias: Option<&WeightTensor<'_>>,
    ) -> Result<CpuLinear> {
        if weight.shape != [spec.out_features, spec.in_features] {
            return Err(ModelError::ShapeMismatch {
                name: format!("{}.weight", spec.name),
                file: weight.origin.clone(),
                expected: vec![spec.out_features, spec.in_features],
                found: weight.shape.clone(),
            });
        }
        let raw = self.round(weight.to_f32());
        let (weight, input_quant) = match &spec.quant {
            LinearQuant::None => (raw, None),
            LinearQuant::Fp8 { weight: wq, input } => {
                if !(input.scale.is_finite() && input.scale > 0.0) {
                    return Err(ModelError::backend(format!(
                        "layer {}: activation scale {} is not positive and finite",
                        spec.name, input.scale
                    )));
                }
                (fp8_weight(spec, &raw, wq)?, Some(input.clone()))
            }
            LinearQuant::Fp8WeightOnly { weight: wq } => (fp8_weight(spec, &raw, wq)?, None),
        };
        Ok(CpuLinear {
            spec: spec.clone(),
            weight,
            bias: bias.map(|b| self.round(b.to_f32())),
            input_quant,
        })
    }

    fn linear(&self, x: &CpuTensor, layer: &CpuLinear) -> Result<CpuTensor> {
        let shape = x.shape();
        let inp = layer.spec.in_features;
        if shape.last() != Some(&inp) {
            return Err(ModelError::backend(format!(
                "layer {}: input shape {shape:?} does not end in {inp}",
                layer.spec.name
            )));
        }
        // FP8 layers see their input quantized and dequantized, as an FP8 GEMM would.
        let quantized;
        let input: &[f32] = match &layer.input_quant {
            Some(q) => {
                let mut v = x.data().to_vec();
                ops::par_fake_quantize(q.format, &mut v, q.scale);
                quantized = v;
                &quantized
            }
            None => x.data(),
        };
        // One GEMM per batch entry: results independent of batch composition.
        let per_entry = if shape.len() >= 3 {
            shape[1..shape.len() - 1].iter().product()
        } else {
            1
        };
        let out = ops::linear(
            input,
            per_entry,
            inp,
            layer.spec.out_features,
            &layer.weight,
            layer.bias.as_deref(),
        );
        let mut oshape = shape.to_vec();
        *oshape.last_mut().unwrap_or(&mut 0) = layer.spec.out_features;
        Ok(self.out(oshape, out))
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        gamma: Option<&CpuTensor>,
        beta: Option<&CpuTensor>,
        eps: f32,
    ) -> Result<CpuTensor> {
        let c = *x.shape().last().unwrap_or(&1);
        let out = ops::layer_norm(
            x.data(),
            c,
            gamma.map(|g| g.data()),
            beta.map(|b| b.data()),
            eps,
        );
        Ok(self.out(x.shape().to_vec(), out))
    }

    fn modulate(&self, x: &CpuTensor, shift: &CpuTensor, scale: &CpuTensor) -> Result<CpuTensor> {
        let (b, c) = ops::batch_channels(x.shape(), shift.shape(), "modulate")?;
        ops::check_same(shift.shape(), scale.shape(), "modulate")?;
        let out = ops::modulate(x.data(), b, c, shift.data(), scale.data());
        Ok(self.out(x.shape().to_vec(), out))
    }

    fn rms_norm(&self, x: &CpuTensor, gamma: Option<&CpuTensor>, eps: f32) -> Result<CpuTensor> {
        let c = *x.shape().last().unwrap_or(&1);
        let out = ops::rms_norm(x.data(), c, gamma.map(|g| g.data()), eps);
        Ok(self.out(x.shape().to_vec(), out))
    }

    fn group_norm(
        &self,
        x: &CpuTensor,
        groups: usize,
        gamma: &CpuTensor,
        beta: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        let s = x.shape();
        if s.len() != 4 || groups == 0 || !s[1].is_multiple_of(groups) {
            return Err(ModelError::backend(format!(
                "group_norm: shape {s:?} with {groups} groups"
            )));
        }
        let out = ops::group_norm(x.data(), s, groups, gamma.data(), beta.data(), eps);
        Ok(self.out(s.to_vec(), out))
    }

    fn conv2d(
        &self,
        x: &CpuTensor,
        w: &CpuTensor,
        b: Option<&CpuTensor>,
        p: Conv2dParams,
    ) -> Result<CpuTensor> {
        let (shape, out) = ops::conv2d(
            x.data(),
            x.shape(),
            w.data(),
            w.shape(),
            b.map(|b| b.data()),
            p,
        )?;
        Ok(self.out(shape, out))
    }

    fn upsample_nearest2x(&self, x: &CpuTensor) -> Result<CpuTensor> {
        let (shape, out) = ops::upsample_nearest2x(x.data(), x.shape())?;
        Ok(CpuTensor::new(shape, out))
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        p: AttentionParams<'_, CpuTensor>,
    ) -> Result<CpuTensor> {
        let out = ops::attention(
            q.data(),
            q.shape(),
            k.data(),
            k.shape(),
            v.data(),
            v.shape(),
            p.heads,
            p.scale,
            p.causal,
            p.bias.map(|b| (b.data(), b.shape())),
        )?;
        Ok(self.out(q.shape().to_vec(), out))
    }

    fn activation(&self, x: &CpuTensor, act: Activation) -> Result<CpuTensor> {
        Ok(self.out(x.shape().to_vec(), ops::activation(x.data(), act)))
    }

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        let out = ops::add_broadcast(a.data(), a.shape(), b.data(), b.shape())?;
        Ok(self.out(a.shape().to_vec(), out))
    }

    fn mul(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        ops::check_same(a.shape(), b.shape(), "mul")?;
        let out = ops::zip(a.data(), b.data(), |x, y| x * y);
        Ok(self.out(a.shape().to_vec(), out))
    }

    fn scale_shift(&self, x: &CpuTensor, a: f32, b: f32) -> Result<CpuTensor> {
        let out = x.data().iter().map(|v| v * a + b).collect();
        Ok(self.out(x.shape().to_vec(), out))
    }

    fn gated_add(&self, x: &CpuTensor, gate: &CpuTensor, y: &CpuTensor) -> Result<CpuTensor> {
        ops::check_same(x.shape(), y.shape(), "gated_add")?;
        let (b, c) = ops::batch_channels(x.shape(), gate.shape(), "gated_add")?;
        let out = ops::gated_add(x.data(), b, c, gate.data(), y.data());
        Ok(self.out(x.shape().to_vec(), out))
    }

    fn concat(&self, parts: &[&CpuTensor], dim: usize) -> Result<CpuTensor> {
        let (shape, out) = ops::concat(parts, dim)?;
        Ok(CpuTensor::new(shape, out))
    }

    fn narrow(&self, x: &CpuTensor, dim: usize, start: usize, len: usize) -> Result<CpuTensor> {
        let (shape, out) = ops::narrow(x.data(), x.shape(), dim, start, len)?;
        Ok(CpuTensor::new(shape, out))
    }

    fn reshape(&self, x: &CpuTensor, shape: &[usize]) -> Result<CpuTensor> {
        x.reshaped(shape)
    }

    fn permute(&self, x: &CpuTensor, perm: &[usize]) -> Result<CpuTensor> {
        let (shape, out) = ops::permute(x.data(), x.shape(), perm)?;
        Ok(CpuTensor::new(shape, out))
    }

    fn pad_last(&self, x: &CpuTensor, size: usize) -> Result<CpuTensor> {
        let s = x.shape();
        let c = *s.last().unwrap_or(&0);
        if size < c {
            return Err(ModelError::backend(format!("pad_last: {c} > {size}")));
        }
        let mut out = Vec::with_capacity(x.numel() / c.max(1) * size);
        for row in x.data().chunks(c.max(1)) {
            out.extend_from_slice(row);
            out.extend(std::iter::repeat_n(0.0, size - c));
        }
        let mut shape = s.to_vec();
        *shape.last_mut().unwrap_or(&mut 0) = size;
        Ok(CpuTensor::new(shape, out))
    }

    fn embedding(
        &self,
        table: &CpuTensor,
        ids: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<CpuTensor> {
        let s = table.shape();
        if s.len() != 2 || ids.len() != batch * seq {
            return Err(ModelError::backend("embedding: bad table or id count"));
        }
        let (v, c) = (s[0], s[1]);
        let mut out = Vec::with_capacity(ids.len() * c);
        for &id in ids {
            let id = id as usize;
            if id >= v {
                return Err(ModelError::input(format!(
                    "token id {id} outside vocabulary of {v}"
                )));
            }
            out.extend_from_slice(&table.data()[id * c..(id + 1) * c]);
        }
        Ok(CpuTensor::new(vec![batch, seq, c], out))
    }

    fn select_tokens(&self, x: &CpuTensor, index: &[usize]) -> Result<CpuTensor> {
        let s = x.shape();
        if s.len() != 3 || index.len() != s[0] || index.iter().any(|&i| i >= s[1]) {
            return Err(ModelError::backend("select_tokens: bad index"));
        }
        let (sq, c) = (s[1], s[2]);
        let mut out = Vec::with_capacity(s[0] * c);
        for (b, &i) in index.iter().enumerate() {
            out.extend_from_slice(&x.data()[(b * sq + i) * c..(b * sq + i + 1) * c]);
        }
        Ok(CpuTensor::new(vec![s[0], c], out))
    }

    fn guidance(&self, uncond: &CpuTensor, cond: &CpuTensor, g: f32) -> Result<CpuTensor> {
        ops::check_same(uncond.shape(), cond.shape(), "guidance")?;
        let out = ops::zip(uncond.data(), cond.data(), |u, c| u + g * (c - u));
        Ok(self.out(uncond.shape().to_vec(), out))
    }

    fn euler_step(&self, x: &CpuTensor, v: &CpuTensor, dt: f32) -> Result<CpuTensor> {
        ops::check_same(x.shape(), v.shape(), "euler_step")?;
        let out = ops::zip(x.data(), v.data(), |a, b| a + dt * b);
        Ok(self.out(x.shape().to_vec(), out))
    }
}
