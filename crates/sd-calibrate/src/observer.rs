//! [`Observer`]: a backend that runs every operation on an inner backend and records
//! the input activations of the transformer's linear layers (and, optionally, the
//! attention Q, K, V and softmax output), per denoising step.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sd_model::backend::{
    Activation, AttentionParams, Backend, Conv2dParams, LinearSpec, TokenPick,
};
use sd_model::{HostTensor, Result, WeightTensor};

use crate::hist::Histogram;

/// Statistics of one observed tensor.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TensorStats {
    pub hist: Histogram,
    /// amax at each denoising step (max over samples); 0 for steps not seen.
    pub step_amax: Vec<f32>,
    pub calls: u64,
}

impl TensorStats {
    fn record(&mut self, step: usize, data: &[f32]) {
        let mut h = Histogram::default();
        h.add_slice(data);
        if self.step_amax.len() <= step {
            self.step_amax.resize(step + 1, 0.0);
        }
        self.step_amax[step] = self.step_amax[step].max(h.amax);
        self.hist.merge(&h);
        self.calls += 1;
    }
}

/// Shared state of an observer: which layers to watch, the current denoising step (set
/// by the driver between steps) and what was seen.
#[derive(Debug, Default)]
pub struct Recorder {
    watch: BTreeSet<String>,
    attention: bool,
    step: AtomicUsize,
    /// The last linear layer run, if it was a watched one (names attention calls).
    last: Mutex<Option<String>>,
    stats: Mutex<BTreeMap<String, TensorStats>>,
}

impl Recorder {
    /// Watches the linear layers named in `watch`; `attention` also records the Q, K, V
    /// and softmax output of attentions that follow a watched layer, under
    /// `<prefix>.attn.{q,k,v,softmax}`.
    pub fn new(watch: impl IntoIterator<Item = String>, attention: bool) -> Arc<Self> {
        Arc::new(Self {
            watch: watch.into_iter().collect(),
            attention,
            ..Default::default()
        })
    }
    pub fn set_step(&self, step: usize) {
        self.step.store(step, Ordering::SeqCst);
    }
    pub fn step(&self) -> usize {
        self.step.load(Ordering::SeqCst)
    }
    fn record(&self, name: &str, data: &[f32]) {
        let step = self.step();
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats
            .entry(name.to_string())
            .or_default()
            .record(step, data);
    }
    /// A copy of everything recorded so far, by tensor name.
    pub fn snapshot(&self) -> BTreeMap<String, TensorStats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A backend that delegates to `inner` and records statistics into `recorder`.
pub struct Observer<B: Backend> {
    pub inner: B,
    pub recorder: Arc<Recorder>,
}

impl<B: Backend> Observer<B> {
    pub fn new(inner: B, recorder: Arc<Recorder>) -> Self {
        Self { inner, recorder }
    }
}

pub struct ObservedLinear<L> {
    /// `Some(name)` when this layer is watched.
    name: Option<String>,
    inner: L,
}

/// `transformer_blocks.3.attn.add_v_proj` -> `transformer_blocks.3.attn`.
fn attention_prefix(layer: &str) -> Option<&str> {
    let (prefix, _leaf) = layer.rsplit_once('.')?;
    let last = prefix.rsplit('.').next()?;
    last.starts_with("attn").then_some(prefix)
}

fn softmax_probs(q: &HostTensor, k: &HostTensor, heads: usize, scale: f32) -> Vec<f32> {
    let (b, sq, hd) = (q.shape[0], q.shape[1], q.shape[2]);
    let sk = k.shape[1];
    let d = hd / heads.max(1);
    let mut out = Vec::with_capacity(b * heads * sq * sk);
    let mut row = vec![0f32; sk];
    for bi in 0..b {
        for h in 0..heads {
            for i in 0..sq {
                let qi = &q.data[(bi * sq + i) * hd + h * d..][..d];
                let mut m = f32::NEG_INFINITY;
                for j in 0..sk {
                    let kj = &k.data[(bi * sk + j) * hd + h * d..][..d];
                    let s: f32 = qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f32>() * scale;
                    row[j] = s;
                    m = m.max(s);
                }
                let mut z = 0.0;
                for v in row.iter_mut() {
                    *v = (*v - m).exp();
                    z += *v;
                }
                out.extend(row.iter().map(|v| v / z));
            }
        }
    }
    out
}

impl<B: Backend> Backend for Observer<B> {
    type Tensor = B::Tensor;
    type Linear = ObservedLinear<B::Linear>;

    fn describe(&self) -> String {
        format!("observer over {}", self.inner.describe())
    }
    fn upload(&self, t: &HostTensor) -> Result<Self::Tensor> {
        self.inner.upload(t)
    }
    fn download(&self, t: &Self::Tensor) -> Result<HostTensor> {
        self.inner.download(t)
    }
    fn dims(&self, t: &Self::Tensor) -> Vec<usize> {
        self.inner.dims(t)
    }
    fn load_param(&self, w: &WeightTensor<'_>) -> Result<Self::Tensor> {
        self.inner.load_param(w)
    }
    fn load_linear(
        &self,
        spec: &LinearSpec,
        weight: &WeightTensor<'_>,
        bias: Option<&WeightTensor<'_>>,
    ) -> Result<Self::Linear> {
        Ok(ObservedLinear {
            name: self
                .recorder
                .watch
                .contains(&spec.name)
                .then(|| spec.name.clone()),
            inner: self.inner.load_linear(spec, weight, bias)?,
        })
    }
    fn linear(&self, x: &Self::Tensor, layer: &Self::Linear) -> Result<Self::Tensor> {
        if let Some(name) = &layer.name {
            let host = self.inner.download(x)?;
            self.recorder.record(name, &host.data);
        }
        *self.recorder.last.lock().unwrap_or_else(|e| e.into_inner()) = layer.name.clone();
        self.inner.linear(x, &layer.inner)
    }
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        gamma: Option<&Self::Tensor>,
        beta: Option<&Self::Tensor>,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.inner.layer_norm(x, gamma, beta, eps)
    }
    fn modulate(
        &self,
        x: &Self::Tensor,
        shift: &Self::Tensor,
        scale: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        self.inner.modulate(x, shift, scale)
    }
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        gamma: Option<&Self::Tensor>,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.inner.rms_norm(x, gamma, eps)
    }
    fn group_norm(
        &self,
        x: &Self::Tensor,
        groups: usize,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.inner.group_norm(x, groups, gamma, beta, eps)
    }
    fn conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        p: Conv2dParams,
    ) -> Result<Self::Tensor> {
        self.inner.conv2d(x, w, b, p)
    }
    fn upsample_nearest2x(&self, x: &Self::Tensor) -> Result<Self::Tensor> {
        self.inner.upsample_nearest2x(x)
    }
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        p: AttentionParams<'_, Self::Tensor>,
    ) -> Result<Self::Tensor> {
        if self.recorder.attention {
            let last = self
                .recorder
                .last
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if let Some(prefix) = last.as_deref().and_then(attention_prefix) {
                let (hq, hk, hv) = (
                    self.inner.download(q)?,
                    self.inner.download(k)?,
                    self.inner.download(v)?,
                );
                self.recorder.record(&format!("{prefix}.q"), &hq.data);
                self.recorder.record(&format!("{prefix}.k"), &hk.data);
                self.recorder.record(&format!("{prefix}.v"), &hv.data);
                if hq.shape.len() == 3 && hk.shape.len() == 3 && p.bias.is_none() && !p.causal {
                    let probs = softmax_probs(&hq, &hk, p.heads, p.scale);
                    self.recorder.record(&format!("{prefix}.softmax"), &probs);
                }
            }
        }
        let inner = AttentionParams {
            heads: p.heads,
            scale: p.scale,
            causal: p.causal,
            bias: p.bias,
        };
        self.inner.attention(q, k, v, inner)
    }
    fn activation(&self, x: &Self::Tensor, act: Activation) -> Result<Self::Tensor> {
        self.inner.activation(x, act)
    }
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        self.inner.add(a, b)
    }
    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor> {
        self.inner.mul(a, b)
    }
    fn scale_shift(&self, x: &Self::Tensor, a: f32, b: f32) -> Result<Self::Tensor> {
        self.inner.scale_shift(x, a, b)
    }
    fn gated_add(
        &self,
        x: &Self::Tensor,
        gate: &Self::Tensor,
        y: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        self.inner.gated_add(x, gate, y)
    }
    fn concat(&self, parts: &[&Self::Tensor], dim: usize) -> Result<Self::Tensor> {
        self.inner.concat(parts, dim)
    }
    fn narrow(
        &self,
        x: &Self::Tensor,
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Self::Tensor> {
        self.inner.narrow(x, dim, start, len)
    }
    fn reshape(&self, x: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor> {
        self.inner.reshape(x, shape)
    }
    fn permute(&self, x: &Self::Tensor, perm: &[usize]) -> Result<Self::Tensor> {
        self.inner.permute(x, perm)
    }
    fn pad_last(&self, x: &Self::Tensor, size: usize) -> Result<Self::Tensor> {
        self.inner.pad_last(x, size)
    }
    fn embedding(
        &self,
        table: &Self::Tensor,
        ids: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<Self::Tensor> {
        self.inner.embedding(table, ids, batch, seq)
    }
    fn select_tokens(&self, x: &Self::Tensor, index: &[usize]) -> Result<Self::Tensor> {
        self.inner.select_tokens(x, index)
    }
    fn guidance(&self, uncond: &Self::Tensor, cond: &Self::Tensor, g: f32) -> Result<Self::Tensor> {
        self.inner.guidance(uncond, cond, g)
    }
    fn euler_step(&self, x: &Self::Tensor, v: &Self::Tensor, dt: f32) -> Result<Self::Tensor> {
        self.inner.euler_step(x, v, dt)
    }
    // Forwarded rather than left to the defaults, so an inner backend's own versions run.
    fn embedding_ids(&self, table: &Self::Tensor, ids: &Self::Tensor) -> Result<Self::Tensor> {
        self.inner.embedding_ids(table, ids)
    }
    fn select_tokens_by_ids(
        &self,
        x: &Self::Tensor,
        ids: &Self::Tensor,
        pick: TokenPick,
    ) -> Result<Self::Tensor> {
        self.inner.select_tokens_by_ids(x, ids, pick)
    }
    fn timestep_embedding(&self, t: &Self::Tensor, dim: usize) -> Result<Self::Tensor> {
        self.inner.timestep_embedding(t, dim)
    }
    fn patchify(&self, x: &Self::Tensor, patch: usize) -> Result<Self::Tensor> {
        self.inner.patchify(x, patch)
    }
    fn unpatchify(
        &self,
        x: &Self::Tensor,
        patch: usize,
        like: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        self.inner.unpatchify(x, patch, like)
    }
    fn cropped_pos_embed(
        &self,
        table: &Self::Tensor,
        like: &Self::Tensor,
        patch: usize,
    ) -> Result<Self::Tensor> {
        self.inner.cropped_pos_embed(table, like, patch)
    }
    fn position_embedding(
        &self,
        table: &Self::Tensor,
        like: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        self.inner.position_embedding(table, like)
    }
    fn relative_position_bias(
        &self,
        table: &HostTensor,
        max_distance: usize,
        like: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        self.inner.relative_position_bias(table, max_distance, like)
    }
}

#[cfg(test)]
mod tests {
    use super::attention_prefix;

    #[test]
    fn prefixes() {
        assert_eq!(
            attention_prefix("transformer_blocks.3.attn.add_v_proj"),
            Some("transformer_blocks.3.attn")
        );
        assert_eq!(
            attention_prefix("transformer_blocks.0.attn2.to_v"),
            Some("transformer_blocks.0.attn2")
        );
        assert_eq!(attention_prefix("transformer_blocks.0.ff.net.2"), None);
        assert_eq!(attention_prefix("proj_out"), None);
    }
}
