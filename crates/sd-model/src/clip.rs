//! CLIP text encoder with projection (`CLIPTextModelWithProjection`), as SD3 uses it:
//! the penultimate hidden state is the per-token context, the projected final state
//! at the end-of-text token is the pooled vector.

use crate::backend::{AttentionParams, Backend, TokenPick};
use crate::config::ClipConfig;
use crate::error::{ModelError, Result};
use crate::load::Loader;
use crate::plan::PrecisionPlan;
use crate::weights::WeightSource;

struct ClipLayer<B: Backend> {
    ln1: (B::Tensor, B::Tensor),
    q: B::Linear,
    k: B::Linear,
    v: B::Linear,
    out: B::Linear,
    ln2: (B::Tensor, B::Tensor),
    fc1: B::Linear,
    fc2: B::Linear,
}

pub struct ClipTextModel<B: Backend> {
    pub config: ClipConfig,
    token_embedding: B::Tensor,
    position_embedding: B::Tensor,
    layers: Vec<ClipLayer<B>>,
    final_ln: (B::Tensor, B::Tensor),
    projection: B::Linear,
}

/// What SD3 takes from a CLIP encoder.
pub struct ClipOutput<T> {
    /// `hidden_states[-2]`: output of the penultimate layer, `[B, S, hidden]`.
    pub penultimate: T,
    /// Projection of the final-normed state at the end-of-text token, `[B, projection_dim]`.
    pub pooled: T,
}

impl<B: Backend> ClipTextModel<B> {
    pub fn load(
        backend: &B,
        config: ClipConfig,
        src: &dyn WeightSource,
        plan: &PrecisionPlan,
    ) -> Result<Self> {
        let l = Loader { backend, src, plan };
        let h = config.hidden_size;
        let e = "text_model.embeddings";
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let p = format!("text_model.encoder.layers.{i}");
                Ok(ClipLayer {
                    ln1: l.norm(&format!("{p}.layer_norm1"), h)?,
                    q: l.linear(&format!("{p}.self_attn.q_proj"), h, h, true)?,
                    k: l.linear(&format!("{p}.self_attn.k_proj"), h, h, true)?,
                    v: l.linear(&format!("{p}.self_attn.v_proj"), h, h, true)?,
                    out: l.linear(&format!("{p}.self_attn.out_proj"), h, h, true)?,
                    ln2: l.norm(&format!("{p}.layer_norm2"), h)?,
                    fc1: l.linear(&format!("{p}.mlp.fc1"), h, config.intermediate_size, true)?,
                    fc2: l.linear(&format!("{p}.mlp.fc2"), config.intermediate_size, h, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: l.param(
                &format!("{e}.token_embedding.weight"),
                &[config.vocab_size, h],
            )?,
            position_embedding: l.param(
                &format!("{e}.position_embedding.weight"),
                &[config.max_position_embeddings, h],
            )?,
            layers,
            final_ln: l.norm("text_model.final_layer_norm", h)?,
            projection: l.linear("text_projection", h, config.projection_dim, false)?,
            config,
        })
    }

    /// The token whose final state is pooled: the first end-of-text token. Legacy configs
    /// (`eos_token_id == 2`) take the argmax id instead, which is the same token for CLIP's
    /// vocabulary, where end-of-text has the largest id.
    pub fn pooled_index(&self, ids: &[u32]) -> usize {
        self.pooled_pick().index(ids)
    }

    /// The pooling rule of [`ClipTextModel::pooled_index`].
    pub fn pooled_pick(&self) -> TokenPick {
        if self.config.eos_token_id == 2 {
            TokenPick::ArgMax
        } else {
            TokenPick::FirstEqual(self.config.eos_token_id)
        }
    }

    /// `ids` holds `batch` sequences of equal length, row after row.
    pub fn forward(&self, b: &B, ids: &[u32], batch: usize) -> Result<ClipOutput<B::Tensor>> {
        let cfg = &self.config;
        if batch == 0 || !ids.len().is_multiple_of(batch) {
            return Err(ModelError::input(
                "CLIP input ids do not split into the batch",
            ));
        }
        let seq = ids.len() / batch;
        self.check_seq(seq)?;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(ModelError::input(format!(
                "token id {bad} is outside the CLIP vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let tok = b.embedding(&self.token_embedding, ids, batch, seq)?;
        let index: Vec<usize> = ids.chunks(seq).map(|row| self.pooled_index(row)).collect();
        self.encode(b, tok, |last| b.select_tokens(last, &index))
    }

    /// [`ClipTextModel::forward`] with the ids as a backend tensor `[B, S]` (the ONNX
    /// tracer's `input_ids` graph input): the embedding lookup and the pooled-token choice
    /// are [`Backend::embedding_ids`] and [`Backend::select_tokens_by_ids`].
    pub fn forward_ids(&self, b: &B, ids: &B::Tensor) -> Result<ClipOutput<B::Tensor>> {
        let d = b.dims(ids);
        if d.len() != 2 {
            return Err(ModelError::input(format!(
                "CLIP input ids must be [batch, seq], got {d:?}"
            )));
        }
        let seq = d[1];
        self.check_seq(seq)?;
        let tok = b.embedding_ids(&self.token_embedding, ids)?;
        let pick = self.pooled_pick();
        self.encode(b, tok, |last| b.select_tokens_by_ids(last, ids, pick))
    }

    fn check_seq(&self, seq: usize) -> Result<()> {
        if seq > self.config.max_position_embeddings {
            return Err(ModelError::input(format!(
                "CLIP sequence of {seq} tokens exceeds max_position_embeddings {}",
                self.config.max_position_embeddings
            )));
        }
        Ok(())
    }

    /// The encoder over token embeddings `tok [B, S, hidden]`; `pool` picks the pooled
    /// token of the final-normed states.
    fn encode(
        &self,
        b: &B,
        tok: B::Tensor,
        pool: impl FnOnce(&B::Tensor) -> Result<B::Tensor>,
    ) -> Result<ClipOutput<B::Tensor>> {
        let cfg = &self.config;
        let h = cfg.hidden_size;
        let eps = cfg.layer_norm_eps as f32;
        let act = cfg.activation()?;
        let pos = b.position_embedding(&self.position_embedding, &tok)?;
        let mut x = b.add(&tok, &pos)?;
        let mut penultimate = None;
        let n = self.layers.len();
        let params = AttentionParams {
            heads: cfg.num_attention_heads,
            scale: 1.0 / ((h / cfg.num_attention_heads) as f32).sqrt(),
            causal: true,
            bias: None,
        };
        for (i, layer) in self.layers.iter().enumerate() {
            let y = b.layer_norm(&x, Some(&layer.ln1.0), Some(&layer.ln1.1), eps)?;
            let (q, k, v) = (
                b.linear(&y, &layer.q)?,
                b.linear(&y, &layer.k)?,
                b.linear(&y, &layer.v)?,
            );
            let a = b.linear(&b.attention(&q, &k, &v, params)?, &layer.out)?;
            x = b.add(&x, &a)?;
            let y = b.layer_norm(&x, Some(&layer.ln2.0), Some(&layer.ln2.1), eps)?;
            let y = b.activation(&b.linear(&y, &layer.fc1)?, act)?;
            x = b.add(&x, &b.linear(&y, &layer.fc2)?)?;
            if i + 2 == n {
                penultimate = Some(x.clone());
            }
        }
        let last = b.layer_norm(&x, Some(&self.final_ln.0), Some(&self.final_ln.1), eps)?;
        let pooled = b.linear(&pool(&last)?, &self.projection)?;
        Ok(ClipOutput {
            penultimate: penultimate
                .ok_or_else(|| ModelError::config("CLIP needs at least 2 layers"))?,
            pooled,
        })
    }
}
