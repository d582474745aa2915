//! The execution-backend trait every executor implements.
//!
//! Operations are deliberately coarse (a linear layer with its precision-plan entry, a
//! modulated layer norm, a whole multi-head attention) so that a GPU backend can fuse
//! each into one or two kernels, an observer can see every linear input by layer name,
//! and a tracer can emit one ONNX node group per call. Tensors are row-major; the model
//! code never looks at values, only at shapes, so a symbolic backend works too.

use crate::error::{ModelError, Result};
use crate::plan::LinearQuant;
use crate::tensor::HostTensor;
use crate::weights::WeightTensor;

/// What a backend needs to prepare one linear layer.
#[derive(Clone, Debug)]
pub struct LinearSpec {
    /// Full parameter prefix, e.g. `transformer_blocks.0.attn.to_q`; the key of the
    /// precision plan and of calibration records.
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub quant: LinearQuant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// x * sigmoid(x)
    Silu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximated GELU (`gelu-approximate`, `gelu_new`).
    GeluTanh,
    /// x * sigmoid(1.702 x), CLIP-L's activation.
    QuickGelu,
    /// max(x, 0)
    Relu,
}

#[derive(Clone, Copy, Debug)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
}

/// A multi-head attention over packed heads: q `[B, Sq, H*D]`, k and v `[B, Sk, H*D]`.
#[derive(Debug)]
pub struct AttentionParams<'a, T> {
    pub heads: usize,
    /// Multiplier of q·k (1/sqrt(D) usually; T5 uses 1).
    pub scale: f32,
    /// Mask out keys after the query position (CLIP's text encoder).
    pub causal: bool,
    /// Added to the scores before softmax, `[H, Sq, Sk]`, shared by the batch (T5).
    pub bias: Option<&'a T>,
}

// Manual impls: a derive would demand `T: Copy`, but only a reference to T is held.
impl<T> Clone for AttentionParams<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for AttentionParams<'_, T> {}

/// Which token of a text encoder's output is pooled, as a rule over its ids (so that a
/// graph-building backend can express it with the ids as a graph input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenPick {
    /// The first position whose id equals this one (position 0 when there is none).
    FirstEqual(i64),
    /// The first position holding the largest id.
    ArgMax,
}

impl TokenPick {
    /// The picked position in one row of ids.
    pub fn index(self, row: &[u32]) -> usize {
        match self {
            Self::ArgMax => {
                let mut best = 0;
                for (i, &id) in row.iter().enumerate() {
                    if id > row[best] {
                        best = i;
                    }
                }
                best
            }
            Self::FirstEqual(eos) => row.iter().position(|&id| i64::from(id) == eos).unwrap_or(0),
        }
    }
}

/// Token ids held in a backend tensor `[B, S]` (f32 in meaning, exact below 2^24), back
/// on the host as (ids row after row, batch, seq).
fn host_ids<B: Backend + ?Sized>(b: &B, ids: &B::Tensor) -> Result<(Vec<u32>, usize, usize)> {
    let h = b.download(ids)?;
    if h.shape.len() != 2 {
        return Err(ModelError::input(format!(
            "token ids must be [batch, seq], got {:?}",
            h.shape
        )));
    }
    let ids = h
        .data
        .iter()
        .map(|&v| {
            if v.fract() == 0.0 && (0.0..16_777_216.0).contains(&v) {
                Ok(v as u32)
            } else {
                Err(ModelError::input(format!("{v} is not a token id")))
            }
        })
        .collect::<Result<Vec<u32>>>()?;
    Ok((ids, h.shape[0], h.shape[1]))
}

/// A forward `Backend::replayable` may record: input tensors in, one tensor out.
pub type ReplayableForward<'a, T> = dyn Fn(&[&T]) -> Result<T> + 'a;

/// A backend executes the model's operations on its own tensors.
///
/// Shapes are given as `[dims]` in the docs of each method; all tensors are f32 in
/// meaning (a backend may store BF16 or FP8 underneath).
pub trait Backend: Send + Sync {
    type Tensor: Clone + Send + Sync;
    /// A linear layer prepared for this backend (e.g. FP8 weights pre-transposed).
    type Linear: Send + Sync;

    /// Short human-readable description ("cpu fp32", "cuda:0 H100 fp8").
    fn describe(&self) -> String;

    fn upload(&self, t: &HostTensor) -> Result<Self::Tensor>;
    fn download(&self, t: &Self::Tensor) -> Result<HostTensor>;
    fn dims(&self, t: &Self::Tensor) -> Vec<usize>;

    /// A non-linear parameter (norm weight, conv kernel, embedding table, ...).
    fn load_param(&self, w: &WeightTensor<'_>) -> Result<Self::Tensor>;
    /// A linear layer: `weight` is `[out, in]`, `bias` `[out]`.
    fn load_linear(
        &self,
        spec: &LinearSpec,
        weight: &WeightTensor<'_>,
        bias: Option<&WeightTensor<'_>>,
    ) -> Result<Self::Linear>;

    /// `x [.., in] -> [.., out]`: x·Wᵀ + b, quantized as the layer's spec says.
    fn linear(&self, x: &Self::Tensor, layer: &Self::Linear) -> Result<Self::Tensor>;

    /// `activation(linear(x), GeluTanh)`: the MLP's first layer. The default runs the
    /// two operations; a GPU backend may apply GELU in the GEMM's epilogue (the
    /// product is then rounded once, after GELU, instead of before and after).
    fn linear_gelu(&self, x: &Self::Tensor, layer: &Self::Linear) -> Result<Self::Tensor> {
        let h = self.linear(x, layer)?;
        self.activation(&h, Activation::GeluTanh)
    }

    /// Layer norm over the last dimension, optional affine parameters.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        gamma: Option<&Self::Tensor>,
        beta: Option<&Self::Tensor>,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// adaLN: `x [B, S, C]`, `shift`/`scale` `[B, C]`: `x * (1 + scale) + shift`.
    fn modulate(
        &self,
        x: &Self::Tensor,
        shift: &Self::Tensor,
        scale: &Self::Tensor,
    ) -> Result<Self::Tensor>;

    /// Layer norm without affine parameters, then adaLN modulation:
    /// `modulate(layer_norm(x, eps), shift, scale)`, each step rounded as the two
    /// operations round it. The default runs the two operations; a GPU backend does it
    /// in one pass over `x` (the norm's output never goes to memory).
    fn layer_norm_modulate(
        &self,
        x: &Self::Tensor,
        shift: &Self::Tensor,
        scale: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        let n = self.layer_norm(x, None, None, eps)?;
        self.modulate(&n, shift, scale)
    }

    /// The gated residual and the next norm in one: `r = gated_add(x, gate, y)`, then
    /// `layer_norm_modulate(r, shift, scale, eps)`; returns `(r, normalized)`. The
    /// default runs the two operations; a GPU backend reads `r` once instead of writing
    /// it and reading it back.
    #[allow(clippy::too_many_arguments)]
    fn gated_add_layer_norm_modulate(
        &self,
        x: &Self::Tensor,
        gate: &Self::Tensor,
        y: &Self::Tensor,
        shift: &Self::Tensor,
        scale: &Self::Tensor,
        eps: f32,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let r = self.gated_add(x, gate, y)?;
        let n = self.layer_norm_modulate(&r, shift, scale, eps)?;
        Ok((r, n))
    }

    /// [`Backend::layer_norm_modulate`] whose output is the input of the linear layer
    /// `next` (and of others quantizing their input the same way, as Q/K/V do): a
    /// backend may write `next`'s input quantization (its FP8 codes) in the same pass.
    /// The values are those of `layer_norm_modulate`; by default it is that call.
    fn layer_norm_modulate_for(
        &self,
        x: &Self::Tensor,
        shift: &Self::Tensor,
        scale: &Self::Tensor,
        eps: f32,
        next: &Self::Linear,
    ) -> Result<Self::Tensor> {
        let _ = next;
        self.layer_norm_modulate(x, shift, scale, eps)
    }

    /// [`Backend::gated_add_layer_norm_modulate`] whose normalized output is the input of
    /// `next` (see [`Backend::layer_norm_modulate_for`]).
    #[allow(clippy::too_many_arguments)]
    fn gated_add_layer_norm_modulate_for(
        &self,
        x: &Self::Tensor,
        gate: &Self::Tensor,
        y: &Self::Tensor,
        shift: &Self::Tensor,
        scale: &Self::Tensor,
        eps: f32,
        next: &Self::Linear,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        let _ = next;
        self.gated_add_layer_norm_modulate(x, gate, y, shift, scale, eps)
    }

    /// RMS norm over the last dimension: `x / sqrt(mean(x²) + eps) * gamma`.
    fn rms_norm(
        &self,
        x: &Self::Tensor,
        gamma: Option<&Self::Tensor>,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// Group norm of `x [B, C, H, W]` with per-channel affine parameters.
    fn group_norm(
        &self,
        x: &Self::Tensor,
        groups: usize,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;

    /// `silu(group_norm(x))` (the VAE's resnet and output norms): two operations by
    /// default; a backend may fuse them, applying SiLU to the norm's output as that
    /// operation would have stored it, so the values are the same.
    fn group_norm_silu(
        &self,
        x: &Self::Tensor,
        groups: usize,
        gamma: &Self::Tensor,
        beta: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        let n = self.group_norm(x, groups, gamma, beta, eps)?;
        self.activation(&n, Activation::Silu)
    }

    /// 2-D convolution, `x [B, Cin, H, W]`, `w [Cout, Cin, kh, kw]`, `b [Cout]`.
    fn conv2d(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        p: Conv2dParams,
    ) -> Result<Self::Tensor>;

    /// `residual + conv2d(x, w, b)` (the VAE resnets' skip connection): two operations by
    /// default. A backend may add the residual inside the convolution; its rounding
    /// order may then differ (by a rounding step of its storage type).
    fn conv2d_add(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        b: Option<&Self::Tensor>,
        p: Conv2dParams,
        residual: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let y = self.conv2d(x, w, b, p)?;
        self.add(residual, &y)
    }

    /// Nearest-neighbour 2x upsampling of `[B, C, H, W]`.
    fn upsample_nearest2x(&self, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// Multi-head attention, see [`AttentionParams`]; returns `[B, Sq, H*D]`.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        p: AttentionParams<'_, Self::Tensor>,
    ) -> Result<Self::Tensor>;

    /// MMDiT's joint attention: `image` and `context` are each stream's `[q, k, v]`
    /// (`[B, S_img, H*D]` and `[B, S_ctx, H*D]`), attended as one sequence, image tokens
    /// first; returns each stream's output rows (`[B, S_img, H*D]`, `[B, S_ctx, H*D]`).
    /// The default concatenates, runs [`Backend::attention`] and splits
    /// ([`joint_attention_by_concat`]); a GPU backend reads and writes the streams where
    /// they are.
    fn joint_attention(
        &self,
        image: [&Self::Tensor; 3],
        context: [&Self::Tensor; 3],
        p: AttentionParams<'_, Self::Tensor>,
    ) -> Result<(Self::Tensor, Self::Tensor)> {
        joint_attention_by_concat(self, image, context, p)
    }

    fn activation(&self, x: &Self::Tensor, act: Activation) -> Result<Self::Tensor>;

    /// Elementwise `a + b`; `b` may also be `[C]` (broadcast over the last dim of `a`)
    /// or have a leading dimension of 1 (broadcast over the batch).
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// Elementwise product of equal shapes.
    fn mul(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;
    /// `a * x + b` elementwise with scalars.
    fn scale_shift(&self, x: &Self::Tensor, a: f32, b: f32) -> Result<Self::Tensor>;

    /// Gated residual: `x [B, S, C] + gate [B, C] * y [B, S, C]`.
    fn gated_add(
        &self,
        x: &Self::Tensor,
        gate: &Self::Tensor,
        y: &Self::Tensor,
    ) -> Result<Self::Tensor>;

    /// Concatenation along `dim`.
    fn concat(&self, parts: &[&Self::Tensor], dim: usize) -> Result<Self::Tensor>;
    /// `len` entries of dimension `dim` starting at `start`.
    fn narrow(
        &self,
        x: &Self::Tensor,
        dim: usize,
        start: usize,
        len: usize,
    ) -> Result<Self::Tensor>;
    /// The last dimension cut into `n` equal parts, in order (adaLN's modulation
    /// vectors). Default: one `narrow` per part; a backend may cut all in one pass.
    fn chunks(&self, x: &Self::Tensor, n: usize) -> Result<Vec<Self::Tensor>> {
        let dims = self.dims(x);
        let (last, c) = match dims.split_last() {
            Some((&c, _)) if n > 0 && c.is_multiple_of(n) => (dims.len() - 1, c),
            _ => {
                return Err(ModelError::backend(format!(
                    "chunks: cannot cut the last dimension of {dims:?} into {n} equal parts"
                )));
            }
        };
        (0..n)
            .map(|i| self.narrow(x, last, i * c / n, c / n))
            .collect()
    }
    /// Same data, new shape.
    fn reshape(&self, x: &Self::Tensor, shape: &[usize]) -> Result<Self::Tensor>;
    /// Axis permutation (materialised).
    fn permute(&self, x: &Self::Tensor, perm: &[usize]) -> Result<Self::Tensor>;
    /// Zero-pads the last dimension to `size`.
    fn pad_last(&self, x: &Self::Tensor, size: usize) -> Result<Self::Tensor>;

    /// Rows of `table [V, C]` picked by `ids` (`[B*S]`), shaped `[B, S, C]`.
    fn embedding(
        &self,
        table: &Self::Tensor,
        ids: &[u32],
        batch: usize,
        seq: usize,
    ) -> Result<Self::Tensor>;
    /// `x [B, S, C]` -> `[B, C]` taking token `index[b]` of each batch entry.
    fn select_tokens(&self, x: &Self::Tensor, index: &[usize]) -> Result<Self::Tensor>;

    /// Rows of `table [V, C]` picked by the ids in a backend tensor `ids [B, S]`, shaped
    /// `[B, S, C]`. The default reads the ids back and calls [`Backend::embedding`]; a
    /// graph-building backend emits a gather with the ids as a graph input.
    fn embedding_ids(&self, table: &Self::Tensor, ids: &Self::Tensor) -> Result<Self::Tensor> {
        let (ids, batch, seq) = host_ids(self, ids)?;
        self.embedding(table, &ids, batch, seq)
    }

    /// `x [B, S, C]` -> `[B, C]` taking, in each row, the token that `pick` chooses from
    /// that row of `ids [B, S]`. The default reads the ids back and calls
    /// [`Backend::select_tokens`].
    fn select_tokens_by_ids(
        &self,
        x: &Self::Tensor,
        ids: &Self::Tensor,
        pick: TokenPick,
    ) -> Result<Self::Tensor> {
        let (ids, batch, seq) = host_ids(self, ids)?;
        let index: Vec<usize> = if seq == 0 {
            vec![0; batch]
        } else {
            ids.chunks(seq).map(|row| pick.index(row)).collect()
        };
        self.select_tokens(x, &index)
    }

    /// The sinusoidal timestep embedding `[B, dim]` of `t [B]`
    /// ([`crate::mmdit::timestep_embedding`]). The default computes it on the host; a
    /// graph-building backend emits it as operations on a timestep input.
    fn timestep_embedding(&self, t: &Self::Tensor, dim: usize) -> Result<Self::Tensor> {
        let h = self.download(t)?;
        if h.shape.len() != 1 {
            return Err(ModelError::input(format!(
                "timesteps must be [batch], got {:?}",
                h.shape
            )));
        }
        self.upload(&crate::mmdit::timestep_embedding(&h.data, dim))
    }

    /// Patches of `x [B, C, H, W]` as tokens: `[B, (H/p)*(W/p), C*p*p]`, patches row after
    /// row, each flattened channel-major (the weight layout of a stride-`p` convolution);
    /// with `patch` 1, the pixels as `[B, H*W, C]`. The default reshapes and permutes
    /// with the traced sizes; a graph-building backend computes the shapes in the graph so
    /// that H and W can be dynamic.
    fn patchify(&self, x: &Self::Tensor, patch: usize) -> Result<Self::Tensor> {
        patchify_by_permute(self, x, patch)
    }

    /// The inverse layout for an output: `x [B, (H/p)*(W/p), p*p*C]`, each patch row-major
    /// over its pixels with the channels last, -> `[B, C, H, W]`, where H and W are the
    /// spatial size of `like [B, _, H, W]` (the input the patches were cut from).
    fn unpatchify(
        &self,
        x: &Self::Tensor,
        patch: usize,
        like: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        unpatchify_by_permute(self, x, patch, like)
    }

    /// diffusers' `PatchEmbed.cropped_pos_embed`: the centre `(H/p) x (W/p)` window of the
    /// positional table `table [M, M, D]` for `like [B, C, H, W]`, as `[1, (H/p)*(W/p), D]`
    /// (the window starts at `(M - H/p) / 2`, `(M - W/p) / 2`, rounded down).
    fn cropped_pos_embed(
        &self,
        table: &Self::Tensor,
        like: &Self::Tensor,
        patch: usize,
    ) -> Result<Self::Tensor> {
        let (t, l) = (self.dims(table), self.dims(like));
        if t.len() != 3 || t[0] != t[1] || l.len() != 4 || patch == 0 {
            return Err(ModelError::input(format!(
                "cannot crop the positional table {t:?} for {l:?} in patches of {patch}"
            )));
        }
        let (m, gh, gw) = (t[0], l[2] / patch, l[3] / patch);
        if gh > m || gw > m {
            return Err(ModelError::input(format!(
                "{gh}x{gw} patches exceed the positional table of {m}x{m}"
            )));
        }
        let pe = self.narrow(table, 0, (m - gh) / 2, gh)?;
        let pe = self.narrow(&pe, 1, (m - gw) / 2, gw)?;
        self.reshape(&pe, &[1, gh * gw, t[2]])
    }

    /// The first S rows of a positional table `table [P, C]` as `[1, S, C]`, where S is
    /// dimension 1 of `like [B, S, ..]`.
    fn position_embedding(
        &self,
        table: &Self::Tensor,
        like: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let (t, l) = (self.dims(table), self.dims(like));
        if t.len() != 2 || l.len() < 2 || l[1] > t[0] {
            return Err(ModelError::input(format!(
                "positions of {l:?} from a table {t:?}"
            )));
        }
        self.reshape(&self.narrow(table, 0, 0, l[1])?, &[1, l[1], t[1]])
    }

    /// T5's bucketed relative-position attention bias `[H, S, S]` for `like [B, S, ..]`,
    /// from the learned `table [num_buckets, H]` ([`crate::t5::position_bias`]). The
    /// default builds it on the host and uploads it; a graph-building backend computes the
    /// relative positions from S in the graph and gathers from the table.
    fn relative_position_bias(
        &self,
        table: &HostTensor,
        max_distance: usize,
        like: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        let l = self.dims(like);
        if l.len() < 2 || table.shape.len() != 2 {
            return Err(ModelError::input(format!(
                "relative-position bias for {l:?} from a table {:?}",
                table.shape
            )));
        }
        self.upload(&crate::t5::position_bias(table, max_distance, l[1]))
    }

    /// `forward(inputs)`, possibly replayed from a recording. A backend that can record a
    /// sequence of device operations and replay it with new input values (sd-cuda: a
    /// CUDA graph per `name` and input shapes) may do so here, so `forward` must depend
    /// on nothing but the values of `inputs` and the model's parameters: no host data
    /// that changes between calls, no reading results back to the host. Backends that
    /// must see every operation (the calibration observer, the ONNX tracer) keep this
    /// default, which runs `forward`. `name` must identify the model (its parameters)
    /// as well as the computation; `forward` must not call the backend from threads of
    /// its own.
    fn replayable(
        &self,
        name: &str,
        inputs: &[&Self::Tensor],
        forward: &ReplayableForward<'_, Self::Tensor>,
    ) -> Result<Self::Tensor> {
        let _ = name;
        forward(inputs)
    }

    /// Classifier-free guidance: `uncond + g * (cond - uncond)`.
    fn guidance(&self, uncond: &Self::Tensor, cond: &Self::Tensor, g: f32) -> Result<Self::Tensor>;
    /// One Euler step of the flow-matching ODE in f32: `x + dt * v`.
    fn euler_step(&self, x: &Self::Tensor, v: &Self::Tensor, dt: f32) -> Result<Self::Tensor>;
}

/// [`Backend::patchify`] through `reshape` and `permute` (the default; a backend that
/// overrides it for a layout of its own calls this for the rest).
pub fn patchify_by_permute<B: Backend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    patch: usize,
) -> Result<B::Tensor> {
    let d = be.dims(x);
    if d.len() != 4 || patch == 0 || !d[2].is_multiple_of(patch) || !d[3].is_multiple_of(patch) {
        return Err(ModelError::input(format!(
            "cannot cut {d:?} into patches of {patch}"
        )));
    }
    let (b, c, h, w) = (d[0], d[1], d[2], d[3]);
    if patch == 1 {
        return be.permute(&be.reshape(x, &[b, c, h * w])?, &[0, 2, 1]);
    }
    let (gh, gw) = (h / patch, w / patch);
    let x = be.reshape(x, &[b, c, gh, patch, gw, patch])?;
    let x = be.permute(&x, &[0, 2, 4, 1, 3, 5])?;
    be.reshape(&x, &[b, gh * gw, c * patch * patch])
}

/// [`Backend::unpatchify`] through `reshape` and `permute` (the default).
pub fn unpatchify_by_permute<B: Backend + ?Sized>(
    be: &B,
    x: &B::Tensor,
    patch: usize,
    like: &B::Tensor,
) -> Result<B::Tensor> {
    let (d, l) = (be.dims(x), be.dims(like));
    if d.len() != 3
        || l.len() != 4
        || patch == 0
        || !l[2].is_multiple_of(patch)
        || !l[3].is_multiple_of(patch)
    {
        return Err(ModelError::input(format!(
            "cannot lay {d:?} out in patches of {patch} over {l:?}"
        )));
    }
    let (b, h, w) = (d[0], l[2], l[3]);
    let (gh, gw) = (h / patch, w / patch);
    let c = d[2] / (patch * patch);
    if d[1] != gh * gw || c * patch * patch != d[2] {
        return Err(ModelError::input(format!(
            "{d:?} is not {gh}x{gw} patches of {patch}x{patch} pixels"
        )));
    }
    if patch == 1 {
        return be.reshape(&be.permute(x, &[0, 2, 1])?, &[b, c, h, w]);
    }
    let x = be.reshape(x, &[b, gh, gw, patch, patch, c])?;
    let x = be.permute(&x, &[0, 5, 1, 3, 2, 4])?;
    be.reshape(&x, &[b, c, h, w])
}

/// Helper used by model code: a linear layer's spec.
/// [`Backend::joint_attention`] as concat, attention over the joint sequence, narrow.
pub fn joint_attention_by_concat<B: Backend + ?Sized>(
    b: &B,
    image: [&B::Tensor; 3],
    context: [&B::Tensor; 3],
    p: AttentionParams<'_, B::Tensor>,
) -> Result<(B::Tensor, B::Tensor)> {
    let [qi, ki, vi] = image;
    let [qc, kc, vc] = context;
    let (s_img, s_ctx) = (b.dims(qi)[1], b.dims(qc)[1]);
    let q = b.concat(&[qi, qc], 1)?;
    let k = b.concat(&[ki, kc], 1)?;
    let v = b.concat(&[vi, vc], 1)?;
    let o = b.attention(&q, &k, &v, p)?;
    Ok((b.narrow(&o, 1, 0, s_img)?, b.narrow(&o, 1, s_img, s_ctx)?))
}

pub fn linear_spec(name: &str, in_features: usize, out_features: usize) -> LinearSpec {
    LinearSpec {
        name: name.to_string(),
        in_features,
        out_features,
        quant: LinearQuant::None,
    }
}
