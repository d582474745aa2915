//! Tracing each SD3 component into an ONNX model, and writing a checkpoint's models
//! into an output directory atomically.

use std::io::Write;
use std::path::{Path, PathBuf};

use prost::Message;
use sd_checkpoint::{Checkpoint, component};
use sd_model::clip::ClipTextModel;
use sd_model::config::{ClipConfig, T5Config, TransformerConfig, VaeConfig};
use sd_model::mmdit::Mmdit;
use sd_model::t5::T5Encoder;
use sd_model::vae::VaeDecoder;
use sd_model::{PrecisionPlan, WeightSource};

use crate::graph::{Dim, ElemType};
use crate::proto::{
    DATA_LOCATION_EXTERNAL, GraphProto, ModelProto, StringStringEntryProto, TensorProto,
};
use crate::tracer::{BATCH, OnnxTracer, QuantizedLayer, Sym, TraceOptions, dim_of};
use crate::{OnnxError, Result};

/// Protobuf cannot hold a message of 2 GiB or more; models with more initializer bytes
/// than this keep their weights in a `<file>.data` side file (ONNX external data).
pub const EXTERNAL_DATA_THRESHOLD: usize = 1 << 30;

/// What to export and how.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// Element type of everything that is not FP8.
    pub compute: ElemType,
    /// TensorRT conventions (E4M3 only; see [`TraceOptions::for_tensorrt`]).
    pub for_tensorrt: bool,
    /// Latent height and width the transformer and VAE graphs are traced at (default:
    /// the transformer's `sample_size`, i.e. 128 = 1024 px for SD3); both are dynamic
    /// axes of the graphs, this size only has to be a valid one.
    pub latent_size: Option<(usize, usize)>,
    /// Context length the transformer graph is traced at (dynamic; default: CLIP's 77 +
    /// `t5_len`).
    pub text_len: Option<usize>,
    /// Token count the CLIP graphs are traced at (dynamic, up to
    /// `max_position_embeddings`; default: that, 77).
    pub clip_len: Option<usize>,
    /// Token count the T5 graph is traced at (dynamic; default 256, diffusers'
    /// `max_sequence_length`).
    pub t5_len: usize,
    /// Initializer bytes above which weights go to external data.
    pub external_data_threshold: usize,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            compute: ElemType::F32,
            for_tensorrt: false,
            latent_size: None,
            text_len: None,
            clip_len: None,
            t5_len: 256,
            external_data_threshold: EXTERNAL_DATA_THRESHOLD,
        }
    }
}

impl ExportOptions {
    fn trace(&self) -> TraceOptions {
        TraceOptions {
            compute: self.compute,
            for_tensorrt: self.for_tensorrt,
        }
    }
}

/// The batch size the graphs are traced with; the exported batch axis is dynamic.
const TRACE_BATCH: usize = 2;

/// The name of the transformer's dynamic text (context) length.
pub const TEXT_LEN: &str = "text_len";
/// The names of the dynamic latent height and width (transformer and VAE inputs).
pub const HEIGHT: &str = "height";
pub const WIDTH: &str = "width";
/// The name of the text encoders' dynamic token count.
pub const SEQ_LEN: &str = "seq_len";

/// One graph input or output, for documentation and the export manifest.
#[derive(Clone, Debug, PartialEq)]
pub struct IoSpec {
    pub name: String,
    pub elem: ElemType,
    /// Fixed sizes and named dynamic ones (`batch`, `height`, `8*width`, ...).
    pub dims: Vec<Dim>,
}

impl IoSpec {
    fn of(name: &str, v: &Sym) -> Self {
        Self {
            name: name.into(),
            elem: v.elem,
            dims: v
                .dims
                .iter()
                .zip(&v.axes)
                .map(|(&d, a)| dim_of(d, a))
                .collect(),
        }
    }

    pub fn shape_string(&self) -> String {
        let d: Vec<String> = self
            .dims
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => n.to_string(),
                Dim::Named(s) => s.clone(),
            })
            .collect();
        format!("[{}]", d.join(", "))
    }
}

/// Declares a graph input with a dynamic batch (axis 0) and the other `dynamic` axes.
fn input(
    t: &OnnxTracer,
    name: &str,
    elem: ElemType,
    dims: &[usize],
    dynamic: &[(usize, &str)],
) -> (IoSpec, Sym) {
    let mut d = vec![(0, BATCH)];
    d.extend_from_slice(dynamic);
    let v = t.input(name, elem, dims, &d);
    (IoSpec::of(name, &v), v)
}

/// A traced component.
#[derive(Debug)]
pub struct ExportedModel {
    /// File name in the output directory (`transformer.onnx`, ...).
    pub file: String,
    pub model: ModelProto,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
    pub quantized: Vec<QuantizedLayer>,
    pub initializer_bytes: usize,
    /// Tensors the model code computed on the host and uploaded (name, shape): only the
    /// positional table of checkpoints without one (a function of the config, not of
    /// the traced sizes).
    pub host_constants: Vec<(String, Vec<usize>)>,
}

fn finish(
    file: &str,
    tracer: OnnxTracer,
    inputs: Vec<IoSpec>,
    outputs: Vec<(&str, &Sym)>,
    doc: &str,
) -> ExportedModel {
    let quantized = tracer.quantized_layers();
    let initializer_bytes = tracer.initializer_bytes();
    let host_constants = tracer.host_constants();
    let specs = outputs.iter().map(|(n, v)| IoSpec::of(n, v)).collect();
    let stem = file.trim_end_matches(".onnx");
    let compute = tracer.compute();
    let mut model = tracer.finish(stem, &outputs, doc);
    let prop = |k: &str, v: String| StringStringEntryProto {
        key: Some(format!("sd_onnx.{k}")),
        value: Some(v),
    };
    model.metadata_props = vec![
        prop("component", stem.to_string()),
        prop("compute", compute.name().to_string()),
        prop("fp8_layers", quantized.len().to_string()),
    ];
    ExportedModel {
        file: file.to_string(),
        model,
        inputs,
        outputs: specs,
        quantized,
        initializer_bytes,
        host_constants,
    }
}

/// The transformer: `hidden_states [batch, C, height, width]`, `encoder_hidden_states
/// [batch, text_len, joint_attention_dim]`, `pooled_projections [batch,
/// pooled_projection_dim]` (compute type), `timestep [batch]` (float32) -> `sample
/// [batch, C, height, width]`. Height and width are dynamic (multiples of the patch size
/// up to `pos_embed_max_size` patches): patchify, the centre crop of the positional
/// table and unpatchify compute their shapes from the input's in the graph.
pub fn trace_transformer(
    cfg: &TransformerConfig,
    src: &dyn WeightSource,
    plan: &PrecisionPlan,
    opts: &ExportOptions,
) -> Result<ExportedModel> {
    let t = OnnxTracer::new(opts.trace())?;
    let model = Mmdit::load(&t, cfg.clone(), src, plan)?;
    let (h, w) = opts
        .latent_size
        .unwrap_or((cfg.sample_size, cfg.sample_size));
    let s = opts.text_len.unwrap_or(77 + opts.t5_len);
    let c = opts.compute;
    let b = TRACE_BATCH;
    let (i0, x) = input(
        &t,
        "hidden_states",
        c,
        &[b, cfg.in_channels, h, w],
        &[(2, HEIGHT), (3, WIDTH)],
    );
    let (i1, ctx) = input(
        &t,
        "encoder_hidden_states",
        c,
        &[b, s, cfg.joint_attention_dim],
        &[(1, TEXT_LEN)],
    );
    let (i2, pooled) = input(
        &t,
        "pooled_projections",
        c,
        &[b, cfg.pooled_projection_dim],
        &[],
    );
    let (i3, ts) = input(&t, "timestep", ElemType::F32, &[b], &[]);
    let out = model.forward_t(&t, &x, &ctx, &pooled, &ts)?;
    let doc = "SD3 MMDiT transformer: the velocity prediction for one denoising step \
               (diffusers SD3Transformer2DModel).";
    Ok(finish(
        "transformer.onnx",
        t,
        vec![i0, i1, i2, i3],
        vec![("sample", &out)],
        doc,
    ))
}

/// A CLIP text encoder: `input_ids [batch, seq_len]` (int64, seq_len up to
/// `max_position_embeddings`) -> `penultimate_hidden_state [batch, seq_len, hidden]`,
/// `text_embeds [batch, projection_dim]`; positions and the causal mask follow seq_len.
pub fn trace_clip(
    file: &str,
    cfg: &ClipConfig,
    src: &dyn WeightSource,
    opts: &ExportOptions,
) -> Result<ExportedModel> {
    let t = OnnxTracer::new(opts.trace())?;
    let model = ClipTextModel::load(&t, cfg.clone(), src, &PrecisionPlan::default())?;
    let l = opts.clip_len.unwrap_or(cfg.max_position_embeddings);
    let b = TRACE_BATCH;
    let (inp, ids) = input(&t, "input_ids", ElemType::I64, &[b, l], &[(1, SEQ_LEN)]);
    let out = model.forward_ids(&t, &ids)?;
    let outputs = vec![
        ("penultimate_hidden_state", &out.penultimate),
        ("text_embeds", &out.pooled),
    ];
    let doc = "CLIP text encoder with projection: the penultimate hidden state and the \
               projected end-of-text state, as SD3 uses them.";
    Ok(finish(file, t, vec![inp], outputs, doc))
}

/// The T5 encoder: `input_ids [batch, seq_len]` (int64) -> `last_hidden_state [batch,
/// seq_len, d_model]`, seq_len dynamic: the relative-position bias `[heads, seq_len,
/// seq_len]` is computed in the graph. `plan` gives T5's FP8 layers when T5 was
/// calibrated for FP8 (Q/DQ as in the transformer), otherwise it names none of them.
pub fn trace_t5(
    cfg: &T5Config,
    src: &dyn WeightSource,
    plan: &PrecisionPlan,
    opts: &ExportOptions,
) -> Result<ExportedModel> {
    let t = OnnxTracer::new(opts.trace())?;
    let model = T5Encoder::load(&t, cfg.clone(), src, plan)?;
    let b = TRACE_BATCH;
    let (inp, ids) = input(
        &t,
        "input_ids",
        ElemType::I64,
        &[b, opts.t5_len],
        &[(1, SEQ_LEN)],
    );
    let out = model.forward_ids(&t, &ids)?;
    let doc = "T5 encoder (T5EncoderModel) last hidden state; the relative-position bias \
               is computed in the graph for the input's length.";
    Ok(finish(
        "t5.onnx",
        t,
        vec![inp],
        vec![("last_hidden_state", &out)],
        doc,
    ))
}

/// The VAE decoder: `latent [batch, latent_channels, height, width]` (the denoised
/// latents as the scheduler leaves them; the graph unscales them) -> `image [batch, 3,
/// 8*height, 8*width]` in about [-1, 1]; `latent` is the traced size, height and width
/// are dynamic.
pub fn trace_vae(
    cfg: &VaeConfig,
    src: &dyn WeightSource,
    latent: (usize, usize),
    opts: &ExportOptions,
) -> Result<ExportedModel> {
    let t = OnnxTracer::new(opts.trace())?;
    let model = VaeDecoder::load(&t, cfg.clone(), src, &PrecisionPlan::default())?;
    let b = TRACE_BATCH;
    let (h, w) = latent;
    let (inp, z) = input(
        &t,
        "latent",
        opts.compute,
        &[b, cfg.latent_channels, h, w],
        &[(2, HEIGHT), (3, WIDTH)],
    );
    let z = model.unscale_latents(&t, &z)?;
    let img = model.decode(&t, &z)?;
    let doc = "SD3 VAE decoder: latents (scaled, as the transformer sees them) to RGB in [-1, 1].";
    Ok(finish(
        "vae_decoder.onnx",
        t,
        vec![inp],
        vec![("image", &img)],
        doc,
    ))
}

/// Every component of a checkpoint: transformer (with `plan`), CLIP-L, CLIP-G, T5 when
/// present, VAE decoder.
pub fn trace_checkpoint(
    ckpt: &Checkpoint,
    plan: &PrecisionPlan,
    opts: &ExportOptions,
) -> Result<Vec<ExportedModel>> {
    let tcfg = &ckpt.transformer;
    let latent = opts
        .latent_size
        .unwrap_or((tcfg.sample_size, tcfg.sample_size));
    let mut models = vec![trace_transformer(
        tcfg,
        &ckpt.weights(component::TRANSFORMER)?,
        plan,
        opts,
    )?];
    models.push(trace_clip(
        "clip_l.onnx",
        &ckpt.clip_l,
        &ckpt.weights(component::CLIP_L)?,
        opts,
    )?);
    models.push(trace_clip(
        "clip_g.onnx",
        &ckpt.clip_g,
        &ckpt.weights(component::CLIP_G)?,
        opts,
    )?);
    if let Some(t5) = &ckpt.t5 {
        models.push(trace_t5(t5, &ckpt.weights(component::T5)?, plan, opts)?);
    }
    models.push(trace_vae(
        &ckpt.vae,
        &ckpt.weights(component::VAE)?,
        latent,
        opts,
    )?);
    Ok(models)
}

fn io_err(path: &Path, source: std::io::Error) -> OnnxError {
    OnnxError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes one model into `dir` (as `model.file`); initializers go to
/// `<file>.data` when the model holds more than `threshold` bytes of them.
pub fn write_model(model: &ExportedModel, dir: &Path, threshold: usize) -> Result<()> {
    let path = dir.join(&model.file);
    let bytes = if model.initializer_bytes > threshold {
        with_external_data(model, dir)?.encode_to_vec()
    } else {
        model.model.encode_to_vec()
    };
    let mut f = std::fs::File::create(&path).map_err(|e| io_err(&path, e))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| io_err(&path, e))
}

/// Writes the initializers of 1 KiB or more to `<file>.data` and returns the model with
/// references to them (the weights are not copied in memory).
fn with_external_data(model: &ExportedModel, dir: &Path) -> Result<ModelProto> {
    let data_name = format!("{}.data", model.file);
    let data_path = dir.join(&data_name);
    let f = std::fs::File::create(&data_path).map_err(|e| io_err(&data_path, e))?;
    let mut w = std::io::BufWriter::new(f);
    let mut offset = 0usize;
    let src = &model.model;
    let mut graph = src.graph.as_ref().map(|g| GraphProto {
        node: g.node.clone(),
        name: g.name.clone(),
        initializer: vec![],
        doc_string: g.doc_string.clone(),
        input: g.input.clone(),
        output: g.output.clone(),
        value_info: g.value_info.clone(),
    });
    if let (Some(g), Some(dst)) = (src.graph.as_ref(), graph.as_mut()) {
        for t in &g.initializer {
            let raw = t.raw_data.as_deref().unwrap_or(&[]);
            if raw.len() < 1024 {
                dst.initializer.push(t.clone());
                continue;
            }
            // 4 KiB alignment lets runtimes memory-map each tensor.
            let pad = offset.next_multiple_of(4096) - offset;
            w.write_all(&vec![0u8; pad])
                .and_then(|_| w.write_all(raw))
                .map_err(|e| io_err(&data_path, e))?;
            offset += pad;
            let entry = |k: &str, v: String| StringStringEntryProto {
                key: Some(k.into()),
                value: Some(v),
            };
            dst.initializer.push(TensorProto {
                dims: t.dims.clone(),
                data_type: t.data_type,
                name: t.name.clone(),
                raw_data: None,
                doc_string: t.doc_string.clone(),
                external_data: vec![
                    entry("location", data_name.clone()),
                    entry("offset", offset.to_string()),
                    entry("length", raw.len().to_string()),
                ],
                data_location: Some(DATA_LOCATION_EXTERNAL),
            });
            offset += raw.len();
        }
    }
    w.into_inner()
        .map_err(|e| io_err(&data_path, e.into_error()))?
        .sync_all()
        .map_err(|e| io_err(&data_path, e))?;
    Ok(ModelProto {
        ir_version: src.ir_version,
        producer_name: src.producer_name.clone(),
        producer_version: src.producer_version.clone(),
        domain: src.domain.clone(),
        model_version: src.model_version,
        doc_string: src.doc_string.clone(),
        graph,
        opset_import: src.opset_import.clone(),
        metadata_props: src.metadata_props.clone(),
    })
}

/// A JSON description of the exported models: files, inputs, outputs, FP8 layers.
pub fn manifest(models: &[ExportedModel], opts: &ExportOptions) -> serde_json::Value {
    let io = |v: &[IoSpec]| -> Vec<serde_json::Value> {
        v.iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "dtype": s.elem.name(),
                    "shape": s.dims.iter().map(|d| match d {
                        Dim::Fixed(n) => serde_json::json!(n),
                        Dim::Named(n) => serde_json::json!(n),
                    }).collect::<Vec<_>>(),
                })
            })
            .collect()
    };
    serde_json::json!({
        "producer": format!("sd-onnx {}", env!("CARGO_PKG_VERSION")),
        "opset": crate::tracer::OPSET,
        "ir_version": crate::tracer::IR_VERSION,
        "compute": opts.compute.name(),
        "for_tensorrt": opts.for_tensorrt,
        "models": models.iter().map(|m| serde_json::json!({
            "file": m.file,
            "inputs": io(&m.inputs),
            "outputs": io(&m.outputs),
            "initializer_bytes": m.initializer_bytes,
            "host_constants": m.host_constants.iter().map(|(n, d)| serde_json::json!({
                "name": n,
                "shape": d,
            })).collect::<Vec<_>>(),
            "external_data": m.initializer_bytes > opts.external_data_threshold,
            "fp8_layers": m.quantized.iter().map(|q| serde_json::json!({
                "name": q.name,
                "weight": q.weight_format.to_string(),
                "weight_scales": if q.per_channel { "per-channel" } else { "per-tensor" },
                // null: a weight-only layer (its input is not quantized).
                "input": q.input_format.map(|f| f.to_string()),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Exports every component of the checkpoint at `model_dir` into `out` atomically:
/// everything is written into a temporary sibling directory that is renamed to `out`
/// only when complete; on any error nothing is left behind. An existing `out` is
/// refused unless `force`, and then replaced only after the new export is complete.
pub fn export_checkpoint(
    model_dir: &Path,
    plan: &PrecisionPlan,
    opts: &ExportOptions,
    out: &Path,
    force: bool,
) -> Result<Vec<ExportedModel>> {
    let ckpt = Checkpoint::open(model_dir)?;
    ckpt.validate()?;
    export_opened(&ckpt, plan, opts, out, force)
}

/// [`export_checkpoint`] for an opened checkpoint.
pub fn export_opened(
    ckpt: &Checkpoint,
    plan: &PrecisionPlan,
    opts: &ExportOptions,
    out: &Path,
    force: bool,
) -> Result<Vec<ExportedModel>> {
    if out.exists() && !force {
        return Err(OnnxError::Exists(out.to_path_buf()));
    }
    let staging = TempDir::beside(out)?;
    let models = trace_checkpoint(ckpt, plan, opts)?;
    for m in &models {
        write_model(m, &staging.path, opts.external_data_threshold)?;
    }
    let man = serde_json::to_string_pretty(&manifest(&models, opts))
        .map_err(|e| OnnxError::Invalid(e.to_string()))?;
    let man_path = staging.path.join("onnx_export.json");
    std::fs::write(&man_path, man).map_err(|e| io_err(&man_path, e))?;
    staging.commit(out)?;
    Ok(models)
}

/// A staging directory next to the destination, removed unless committed.
struct TempDir {
    path: PathBuf,
    committed: bool,
}

impl TempDir {
    fn beside(dest: &Path) -> Result<Self> {
        let parent = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = dest
            .file_name()
            .ok_or_else(|| {
                OnnxError::Invalid(format!("{} is not a directory name", dest.display()))
            })?
            .to_string_lossy()
            .to_string();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let path = parent.join(format!(".{name}.tmp-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| OnnxError::Unwritable {
            path: parent.clone(),
            source: e,
        })?;
        Ok(Self {
            path,
            committed: false,
        })
    }

    fn commit(mut self, dest: &Path) -> Result<()> {
        if dest.exists() {
            let old = self.path.with_extension("old");
            std::fs::rename(dest, &old).map_err(|e| io_err(dest, e))?;
            if let Err(e) = std::fs::rename(&self.path, dest) {
                // Put the previous export back rather than leave nothing.
                let _ = std::fs::rename(&old, dest);
                return Err(io_err(dest, e));
            }
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.path, dest).map_err(|e| io_err(dest, e))?;
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
