//! T5 encoder (`T5EncoderModel`): RMS layer norms without mean subtraction, unscaled
//! attention with a bucketed relative-position bias computed once (layer 0's table) and
//! shared by every layer, gated-GELU feed-forward.

use crate::backend::{AttentionParams, Backend};
use crate::config::T5Config;
use crate::error::{ModelError, Result};
use crate::load::Loader;
use crate::plan::PrecisionPlan;
use crate::tensor::HostTensor;
use crate::weights::WeightSource;

struct T5Layer<B: Backend> {
    attn_norm: B::Tensor,
    q: B::Linear,
    k: B::Linear,
    v: B::Linear,
    o: B::Linear,
    ff_norm: B::Tensor,
    /// `wi` (ungated) or `wi_0` (gated, activated branch).
    wi_0: B::Linear,
    /// `wi_1`, the linear branch of a gated feed-forward.
    wi_1: Option<B::Linear>,
    wo: B::Linear,
}

pub struct T5Encoder<B: Backend> {
    pub config: T5Config,
    embed: B::Tensor,
    /// `[num_buckets, heads]`, kept on the host: the bias is built per sequence length.
    relative_bias: HostTensor,
    layers: Vec<T5Layer<B>>,
    final_norm: B::Tensor,
}

impl<B: Backend> T5Encoder<B> {
    /// Names of every linear layer in execution order (the keys a precision plan uses
    /// when T5 runs in FP8).
    pub fn linear_layer_names(cfg: &T5Config) -> Vec<String> {
        let gated = cfg.feed_forward().map(|(g, _)| g).unwrap_or(true);
        let mut v = Vec::new();
        for i in 0..cfg.num_layers {
            let p = format!("encoder.block.{i}.layer");
            for n in ["q", "k", "v", "o"] {
                v.push(format!("{p}.0.SelfAttention.{n}"));
            }
            if gated {
                v.push(format!("{p}.1.DenseReluDense.wi_0"));
                v.push(format!("{p}.1.DenseReluDense.wi_1"));
            } else {
                v.push(format!("{p}.1.DenseReluDense.wi"));
            }
            v.push(format!("{p}.1.DenseReluDense.wo"));
        }
        v
    }

    pub fn load(
        backend: &B,
        config: T5Config,
        src: &dyn WeightSource,
        plan: &PrecisionPlan,
    ) -> Result<Self> {
        let l = Loader { backend, src, plan };
        let (gated, _) = config.feed_forward()?;
        let d = config.d_model;
        let inner = config.num_heads * config.d_kv;
        let embed_name = if src.contains("encoder.embed_tokens.weight") {
            "encoder.embed_tokens.weight"
        } else {
            // Tied with `shared.weight`; safetensors keeps one copy.
            "shared.weight"
        };
        let layers = (0..config.num_layers)
            .map(|i| {
                let p = format!("encoder.block.{i}.layer");
                let sa = format!("{p}.0.SelfAttention");
                let ff = format!("{p}.1.DenseReluDense");
                let (wi_0, wi_1) = if gated {
                    (
                        l.linear(&format!("{ff}.wi_0"), d, config.d_ff, false)?,
                        Some(l.linear(&format!("{ff}.wi_1"), d, config.d_ff, false)?),
                    )
                } else {
                    (l.linear(&format!("{ff}.wi"), d, config.d_ff, false)?, None)
                };
                Ok(T5Layer {
                    attn_norm: l.param(&format!("{p}.0.layer_norm.weight"), &[d])?,
                    q: l.linear(&format!("{sa}.q"), d, inner, false)?,
                    k: l.linear(&format!("{sa}.k"), d, inner, false)?,
                    v: l.linear(&format!("{sa}.v"), d, inner, false)?,
                    o: l.linear(&format!("{sa}.o"), inner, d, false)?,
                    ff_norm: l.param(&format!("{p}.1.layer_norm.weight"), &[d])?,
                    wi_0,
                    wi_1,
                    wo: l.linear(&format!("{ff}.wo"), config.d_ff, d, false)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let rb = src.get_shaped(
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            &[config.relative_attention_num_buckets, config.num_heads],
        )?;
        Ok(Self {
            embed: l.param(embed_name, &[config.vocab_size, d])?,
            relative_bias: rb.to_host(),
            layers,
            final_norm: l.param("encoder.final_layer_norm.weight", &[d])?,
            config,
        })
    }

    /// The `[H, S, S]` additive attention bias for a sequence of `seq` tokens.
    pub fn position_bias(&self, seq: usize) -> HostTensor {
        position_bias(
            &self.relative_bias,
            self.config.relative_attention_max_distance,
            seq,
        )
    }

    /// Last hidden state `[B, S, d_model]` for `batch` sequences of equal length.
    pub fn forward(&self, b: &B, ids: &[u32], batch: usize) -> Result<B::Tensor> {
        let cfg = &self.config;
        if batch == 0 || !ids.len().is_multiple_of(batch) {
            return Err(ModelError::input(
                "T5 input ids do not split into the batch",
            ));
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(ModelError::input(format!(
                "token id {bad} is outside the T5 vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let seq = ids.len() / batch;
        let x = b.embedding(&self.embed, ids, batch, seq)?;
        self.encode(b, x)
    }

    /// [`T5Encoder::forward`] with the ids as a backend tensor `[B, S]` (the ONNX tracer's
    /// `input_ids` graph input). The relative-position bias is
    /// [`Backend::relative_position_bias`]: built on the host by default, computed from S
    /// in the graph by the ONNX tracer, so the text length of an exported T5 is dynamic.
    pub fn forward_ids(&self, b: &B, ids: &B::Tensor) -> Result<B::Tensor> {
        let d = b.dims(ids);
        if d.len() != 2 {
            return Err(ModelError::input(format!(
                "T5 input ids must be [batch, seq], got {d:?}"
            )));
        }
        let x = b.embedding_ids(&self.embed, ids)?;
        self.encode(b, x)
    }

    /// The encoder over token embeddings `x [B, S, d_model]`.
    fn encode(&self, b: &B, mut x: B::Tensor) -> Result<B::Tensor> {
        let cfg = &self.config;
        let eps = cfg.layer_norm_epsilon as f32;
        let (_, act) = cfg.feed_forward()?;
        let bias =
            b.relative_position_bias(&self.relative_bias, cfg.relative_attention_max_distance, &x)?;
        let params = AttentionParams {
            heads: cfg.num_heads,
            scale: 1.0,
            causal: false,
            bias: Some(&bias),
        };
        for layer in &self.layers {
            let y = b.rms_norm(&x, Some(&layer.attn_norm), eps)?;
            let (q, k, v) = (
                b.linear(&y, &layer.q)?,
                b.linear(&y, &layer.k)?,
                b.linear(&y, &layer.v)?,
            );
            x = b.add(&x, &b.linear(&b.attention(&q, &k, &v, params)?, &layer.o)?)?;
            let y = b.rms_norm(&x, Some(&layer.ff_norm), eps)?;
            let g = b.activation(&b.linear(&y, &layer.wi_0)?, act)?;
            let g = match &layer.wi_1 {
                Some(wi_1) => b.mul(&g, &b.linear(&y, wi_1)?)?,
                None => g,
            };
            x = b.add(&x, &b.linear(&g, &layer.wo)?)?;
        }
        b.rms_norm(&x, Some(&self.final_norm), eps)
    }
}

/// The `[H, S, S]` additive attention bias for `seq` tokens from the learned table
/// `[num_buckets, H]`: entry `(h, q, k)` is the table's row for the bucket of `k - q`.
pub fn position_bias(table: &HostTensor, max_distance: usize, seq: usize) -> HostTensor {
    let (buckets, h) = (table.shape[0], table.shape[1]);
    let mut data = vec![0.0f32; h * seq * seq];
    for q in 0..seq {
        for k in 0..seq {
            let bucket = relative_position_bucket(k as i64 - q as i64, buckets, max_distance);
            for head in 0..h {
                data[(head * seq + q) * seq + k] = table.data[bucket * h + head];
            }
        }
    }
    HostTensor {
        shape: vec![h, seq, seq],
        data,
    }
}

/// transformers' bidirectional `_relative_position_bucket`, with its f32 logarithm.
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let n = relative.abs();
    let max_exact = half / 2;
    if n < max_exact {
        bucket += n;
    } else {
        let ratio = (n as f32 / max_exact as f32).ln()
            / (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + (ratio * (half - max_exact) as f32) as i64;
        bucket += large.min(half - 1);
    }
    bucket as usize
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    #[test]
    fn buckets_match_transformers_for_default_sizes() {
        // Values printed by transformers' T5Attention._relative_position_bucket(…, True, 32, 128).
        let cases = [
            (0, 0),
            (1, 17),
            (-1, 1),
            (7, 23),
            (8, 24),
            (-8, 8),
            (12, 25),
            (20, 26),
            (-60, 13),
            (127, 31),
            (1000, 31),
            (-1000, 15),
        ];
        for (rel, want) in cases {
            assert_eq!(
                relative_position_bucket(rel, 32, 128),
                want,
                "relative {rel}"
            );
        }
    }
}
