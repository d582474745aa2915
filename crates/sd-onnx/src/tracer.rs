//! The tracing backend: a [`Backend`] whose tensors are symbolic (a value name, a shape
//! and an element type) and whose operations append ONNX nodes. Running the model code
//! of `sd-model` on it builds the ONNX graph of exactly that code.
//!
//! Dynamic axes: graph inputs may declare axes dynamic (the batch, the transformer's
//! text length); every value records which of its axes are dynamic ([`Axis`]), reshapes
//! keep them with ONNX's `0` (copy) dimension, a slice of a dynamic axis runs to its end,
//! and an operation that would need arithmetic on a dynamic size is refused rather than
//! traced with the traced size baked in.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use sd_fp8::Fp8Format;
use sd_model::backend::{
    Activation, AttentionParams, Backend, Conv2dParams, LinearSpec, TokenPick,
};
use sd_model::plan::LinearQuant;
use sd_model::{HostTensor, ModelError, Result, WeightTensor};

use crate::graph::{Attr, Dim, ElemType, Graph, value_info};
use crate::proto::{self, ModelProto, NodeProto};

/// ONNX operator-set version of the default domain (FP8 Q/DQ with per-axis scales).
pub const OPSET: i64 = 21;
/// ONNX IR version written (10: the IR of opset 21).
pub const IR_VERSION: i64 = 10;

/// The name of the dynamic batch dimension in exported graphs.
pub const BATCH: &str = "batch";

/// What is known about one axis of a traced value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Axis {
    /// The traced size, for every input.
    Fixed,
    /// A dynamic size named in the graph's inputs.
    Dyn(String),
    /// `prefix` fixed entries followed by a dynamic part (a concatenation).
    Joined { prefix: usize, name: String },
}

impl Axis {
    pub fn is_dyn(&self) -> bool {
        !matches!(self, Self::Fixed)
    }
}

/// A symbolic tensor: a graph value.
#[derive(Clone, Debug)]
pub struct Sym {
    pub name: String,
    /// Traced dimensions.
    pub dims: Vec<usize>,
    pub elem: ElemType,
    /// One entry per dimension.
    pub axes: Vec<Axis>,
}

impl Sym {
    fn fixed(name: String, dims: Vec<usize>, elem: ElemType) -> Self {
        let axes = vec![Axis::Fixed; dims.len()];
        Self {
            name,
            dims,
            elem,
            axes,
        }
    }

    pub fn is_dynamic(&self) -> bool {
        self.axes.iter().any(Axis::is_dyn)
    }
}

fn dim_of(d: usize, a: &Axis) -> Dim {
    match a {
        Axis::Fixed => Dim::Fixed(d),
        Axis::Dyn(n) => Dim::Named(n.clone()),
        Axis::Joined { prefix, name } => Dim::Named(format!("{prefix}+{name}")),
    }
}

/// A traced linear layer: the weight value (`[in, out]`, compute type; the output of a
/// DequantizeLinear for FP8 layers), the bias, the input quantization.
pub struct SymLinear {
    spec: LinearSpec,
    weight: String,
    bias: Option<String>,
    input_q: Option<InputQ>,
}

struct InputQ {
    format: Fp8Format,
    scale_bits: u32,
    scale: String,
    zero: String,
}

/// A FP8 layer in an exported graph, for reports.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedLayer {
    pub name: String,
    pub weight_format: Fp8Format,
    pub per_channel: bool,
    pub input_format: Fp8Format,
}

/// Options of a trace.
#[derive(Clone, Copy, Debug)]
pub struct TraceOptions {
    /// Element type of everything that is not FP8 (F32, F16 or Bf16).
    pub compute: ElemType,
    /// TensorRT's conventions: E4M3 only; one QuantizeLinear per quantized tensor and
    /// scale (shared by the GEMMs that read it), each consumer behind its own
    /// DequantizeLinear, so the strongly-typed builder fuses Q/DQ into FP8 GEMMs.
    pub for_tensorrt: bool,
}

impl Default for TraceOptions {
    fn default() -> Self {
        Self {
            compute: ElemType::F32,
            for_tensorrt: false,
        }
    }
}

struct State {
    g: Graph,
    quantized: Vec<QuantizedLayer>,
    /// Shared activation quantizers (TensorRT mode): (value, format, scale bits) -> Q output.
    shared_q: HashMap<(String, bool, u32), String>,
    /// Host tensors uploaded during the trace: constants of the graph.
    host_constants: Vec<(String, Vec<usize>)>,
}

pub struct OnnxTracer {
    state: Mutex<State>,
    opts: TraceOptions,
}

fn err(msg: impl Into<String>) -> ModelError {
    ModelError::backend(msg.into())
}

fn fp8_elem(f: Fp8Format) -> ElemType {
    match f {
        Fp8Format::E4M3 => ElemType::F8E4M3,
        Fp8Format::E5M2 => ElemType::F8E5M2,
    }
}

fn ints(v: &[usize]) -> Vec<i64> {
    v.iter().map(|&x| x as i64).collect()
}

/// ONNX Runtime's `-inf` handling in Softmax is exact; the causal mask is additive.
fn causal_mask(sq: usize, sk: usize) -> Vec<f32> {
    let mut m = vec![0.0f32; sq * sk];
    for i in 0..sq {
        for j in i + 1..sk {
            m[i * sk + j] = f32::NEG_INFINITY;
        }
    }
    m
}

impl OnnxTracer {
    pub fn new(opts: TraceOptions) -> Result<Self> {
        if !matches!(opts.compute, ElemType::F32 | ElemType::F16 | ElemType::Bf16) {
            return Err(err(format!(
                "compute type must be float32, float16 or bfloat16, not {}",
                opts.compute.name()
            )));
        }
        Ok(Self {
            state: Mutex::new(State {
                g: Graph::default(),
                quantized: vec![],
                shared_q: HashMap::new(),
                host_constants: vec![],
            }),
            opts,
        })
    }

    pub fn compute(&self) -> ElemType {
        self.opts.compute
    }

    fn st(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves a half-built graph; nothing reads it then.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Declares a graph input of the traced shape `dims`; `dynamic` names its dynamic
    /// axes (e.g. `[(0, "batch")]`).
    pub fn input(
        &self,
        name: &str,
        elem: ElemType,
        dims: &[usize],
        dynamic: &[(usize, &str)],
    ) -> Sym {
        let axes: Vec<Axis> = (0..dims.len())
            .map(|i| match dynamic.iter().find(|(a, _)| *a == i) {
                Some((_, n)) => Axis::Dyn(n.to_string()),
                None => Axis::Fixed,
            })
            .collect();
        let shape: Vec<Dim> = dims.iter().zip(&axes).map(|(&d, a)| dim_of(d, a)).collect();
        self.st().g.add_input(name, elem, &shape);
        Sym {
            name: name.to_string(),
            dims: dims.to_vec(),
            elem,
            axes,
        }
    }

    /// Bytes of initializer data so far.
    pub fn initializer_bytes(&self) -> usize {
        self.st().g.initializer_bytes
    }

    /// Host tensors that model code uploaded during the trace (graph constants computed
    /// on the host for the traced shapes), by initializer name and shape.
    pub fn host_constants(&self) -> Vec<(String, Vec<usize>)> {
        self.st().host_constants.clone()
    }

    /// The FP8 layers traced so far.
    pub fn quantized_layers(&self) -> Vec<QuantizedLayer> {
        self.st().quantized.clone()
    }

    /// Finishes the model: each `(name, value)` becomes a graph output named `name`.
    pub fn finish(self, graph_name: &str, outputs: &[(&str, &Sym)], doc: &str) -> ModelProto {
        let mut st = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        let mut infos = Vec::new();
        for (name, v) in outputs {
            st.g.nodes.push(NodeProto {
                input: vec![v.name.clone()],
                output: vec![name.to_string()],
                name: Some(format!("{name}/Identity")),
                op_type: Some("Identity".into()),
                ..Default::default()
            });
            let dims: Vec<Dim> = v
                .dims
                .iter()
                .zip(&v.axes)
                .map(|(&d, a)| dim_of(d, a))
                .collect();
            infos.push(value_info(name, v.elem, &dims));
        }
        ModelProto {
            ir_version: Some(IR_VERSION),
            producer_name: Some("sd-onnx".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            domain: None,
            model_version: Some(1),
            doc_string: Some(doc.to_string()),
            graph: Some(st.g.into_graph(graph_name, infos)),
            opset_import: vec![proto::OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(OPSET),
            }],
            metadata_props: vec![],
        }
    }

    /// Emits a cast of a value to `elem` (no node when it already has that type).
    pub fn cast(&self, x: &Sym, elem: ElemType) -> Sym {
        if x.elem == elem {
            return x.clone();
        }
        let name = self.st().g.op(
            "Cast",
            "cast",
            &[&x.name],
            &[("to", Attr::Int(elem.onnx() as i64))],
        );
        Sym {
            name,
            elem,
            ..x.clone()
        }
    }

    /// A value of x's type and dynamic axes (same rank).
    fn like(&self, x: &Sym, name: String, dims: Vec<usize>) -> Sym {
        debug_assert_eq!(dims.len(), x.axes.len());
        Sym {
            name,
            dims,
            elem: x.elem,
            axes: x.axes.clone(),
        }
    }

    fn unary(&self, op: &str, x: &Sym) -> Sym {
        let n = self.st().g.op(op, op, &[&x.name], &[]);
        self.like(x, n, x.dims.clone())
    }

    fn binary(&self, op: &str, a: &Sym, b: &Sym) -> Sym {
        let n = self.st().g.op(op, op, &[&a.name, &b.name], &[]);
        // Numpy broadcasting: axes aligned from the right; a dynamic axis of either wins.
        let r = a.dims.len().max(b.dims.len());
        let pick = |t: &Sym, i: usize| -> Option<(usize, Axis)> {
            let off = r - t.dims.len();
            (i >= off).then(|| (t.dims[i - off], t.axes[i - off].clone()))
        };
        let mut dims = Vec::with_capacity(r);
        let mut axes = Vec::with_capacity(r);
        for i in 0..r {
            let (da, aa) = pick(a, i).unwrap_or((1, Axis::Fixed));
            let (db, ab) = pick(b, i).unwrap_or((1, Axis::Fixed));
            dims.push(if da == 1 { db } else { da });
            axes.push(if aa.is_dyn() { aa } else { ab });
        }
        Sym {
            name: n,
            dims,
            elem: a.elem,
            axes,
        }
    }

    /// `x op c` with a scalar constant of x's type.
    fn with_scalar(&self, op: &str, x: &Sym, c: f32) -> Sym {
        let n = {
            let mut st = self.st();
            let s = st.g.scalar(x.elem, c);
            st.g.op(op, op, &[&x.name, &s], &[])
        };
        self.like(x, n, x.dims.clone())
    }

    fn unsqueeze(&self, x: &Sym, axes: &[i64]) -> Sym {
        let mut dims = x.dims.clone();
        let mut labels = x.axes.clone();
        for &a in axes {
            dims.insert(a as usize, 1);
            labels.insert(a as usize, Axis::Fixed);
        }
        let n = {
            let mut st = self.st();
            let ax = st.g.ints("axes", axes);
            st.g.op("Unsqueeze", "unsqueeze", &[&x.name, &ax], &[])
        };
        Sym {
            name: n,
            dims,
            elem: x.elem,
            axes: labels,
        }
    }

    fn reshape_sym(&self, x: &Sym, shape: &[usize]) -> Result<Sym> {
        let numel: usize = x.dims.iter().product();
        if shape.iter().product::<usize>() != numel {
            return Err(err(format!("reshape {:?} -> {shape:?}", x.dims)));
        }
        // A dynamic axis survives a reshape only in place (ONNX's 0 = copy that dim).
        let mut target = ints(shape);
        let mut axes = vec![Axis::Fixed; shape.len()];
        for (i, a) in x.axes.iter().enumerate() {
            if !a.is_dyn() {
                continue;
            }
            if shape.get(i) != Some(&x.dims[i]) {
                return Err(err(format!(
                    "reshape {:?} -> {shape:?} would merge or move the dynamic axis {i}",
                    x.dims
                )));
            }
            target[i] = 0;
            axes[i] = a.clone();
        }
        let n = {
            let mut st = self.st();
            let s = st.g.ints("shape", &target);
            st.g.op("Reshape", "reshape", &[&x.name, &s], &[])
        };
        Ok(Sym {
            name: n,
            dims: shape.to_vec(),
            elem: x.elem,
            axes,
        })
    }

    fn transpose(&self, x: &Sym, perm: &[usize]) -> Result<Sym> {
        let r = x.dims.len();
        let mut seen = vec![false; r];
        if perm.len() != r
            || perm
                .iter()
                .any(|&p| p >= r || std::mem::replace(&mut seen[p], true))
        {
            return Err(err(format!("permute {perm:?} of {:?}", x.dims)));
        }
        let n = self.st().g.op(
            "Transpose",
            "transpose",
            &[&x.name],
            &[("perm", Attr::Ints(ints(perm)))],
        );
        Ok(Sym {
            name: n,
            dims: perm.iter().map(|&p| x.dims[p]).collect(),
            elem: x.elem,
            axes: perm.iter().map(|&p| x.axes[p].clone()).collect(),
        })
    }

    fn reduce_mean_last(&self, x: &Sym, axis: i64) -> Sym {
        let mut dims = x.dims.clone();
        let a = if axis < 0 {
            (dims.len() as i64 + axis) as usize
        } else {
            axis as usize
        };
        dims[a] = 1;
        let n = {
            let mut st = self.st();
            let ax = st.g.ints("axes", &[axis]);
            st.g.op(
                "ReduceMean",
                "reduce_mean",
                &[&x.name, &ax],
                &[("keepdims", Attr::Int(1))],
            )
        };
        self.like(x, n, dims)
    }

    /// `x [B, S, C]`, `idx [B]` int64 -> `[B, C]`: row `idx[b]` of each entry.
    fn gather_rows(&self, x: &Sym, idx: &str) -> Result<Sym> {
        if x.dims.len() != 3 {
            return Err(err(format!("token selection from {:?}", x.dims)));
        }
        let c = x.dims[2];
        let n = {
            let mut st = self.st();
            let ax = st.g.ints("axes", &[1, 2]);
            let i3 = st.g.op("Unsqueeze", "pool", &[idx, &ax], &[]);
            let shape = st.g.ints("shape", &[1, 1, c as i64]);
            let ie = st.g.op("Expand", "pool", &[&i3, &shape], &[]);
            let g = st.g.op(
                "GatherElements",
                "pool",
                &[&x.name, &ie],
                &[("axis", Attr::Int(1))],
            );
            let ax1 = st.g.ints("axes", &[1]);
            st.g.op("Squeeze", "pool", &[&g, &ax1], &[])
        };
        Ok(Sym {
            name: n,
            dims: vec![x.dims[0], c],
            elem: x.elem,
            axes: vec![x.axes[0].clone(), Axis::Fixed],
        })
    }

    fn check_scale(layer: &str, what: &str, s: f32) -> Result<()> {
        if !(s.is_finite() && s > 0.0) {
            return Err(err(format!(
                "layer {layer}: {what} scale {s} is not positive and finite"
            )));
        }
        Ok(())
    }

    fn check_format(&self, layer: &str, what: &str, f: Fp8Format) -> Result<()> {
        if self.opts.for_tensorrt && f == Fp8Format::E5M2 {
            return Err(err(format!(
                "layer {layer}: {what} are E5M2, which TensorRT cannot run (it maps only \
                 FLOAT8E4M3FN to FP8); calibrate for the tensorrt target or export without \
                 --for-tensorrt"
            )));
        }
        Ok(())
    }
}

impl Backend for OnnxTracer {
    type Tensor = Sym;
    type Linear = SymLinear;

    fn describe(&self) -> String {
        format!("onnx tracer ({})", self.opts.compute.name())
    }

    /// A host tensor becomes a graph constant; every one is recorded
    /// ([`OnnxTracer::host_constants`]) so that none is baked in unnoticed.
    fn upload(&self, t: &HostTensor) -> Result<Sym> {
        let name = {
            let mut st = self.st();
            let n =
                st.g.const_f("host_constant", self.opts.compute, &t.data, &t.shape);
            st.host_constants.push((n.clone(), t.shape.clone()));
            n
        };
        Ok(Sym::fixed(name, t.shape.clone(), self.opts.compute))
    }

    fn download(&self, t: &Sym) -> Result<HostTensor> {
        Err(err(format!(
            "the ONNX tracer has no values: `{}` is symbolic (a host-side computation on a \
             traced tensor needs a graph-building Backend method)",
            t.name
        )))
    }

    fn dims(&self, t: &Sym) -> Vec<usize> {
        t.dims.clone()
    }

    fn load_param(&self, w: &WeightTensor<'_>) -> Result<Sym> {
        let c = self.opts.compute;
        let name = self.st().g.const_f(&w.name, c, &w.to_f32(), &w.shape);
        Ok(Sym::fixed(name, w.shape.clone(), c))
    }

    fn load_linear(
        &self,
        spec: &LinearSpec,
        weight: &WeightTensor<'_>,
        bias: Option<&WeightTensor<'_>>,
    ) -> Result<SymLinear> {
        let (out, inp) = (spec.out_features, spec.in_features);
        if weight.shape != [out, inp] {
            return Err(ModelError::ShapeMismatch {
                name: format!("{}.weight", spec.name),
                file: weight.origin.clone(),
                expected: vec![out, inp],
                found: weight.shape.clone(),
            });
        }
        let c = self.opts.compute;
        let w = weight.to_f32();
        let (weight_value, input_q) = match &spec.quant {
            LinearQuant::None => {
                let mut t = vec![0.0f32; w.len()];
                for o in 0..out {
                    for i in 0..inp {
                        t[i * out + o] = w[o * inp + i];
                    }
                }
                let name =
                    self.st()
                        .g
                        .const_f(&format!("{}.weight", spec.name), c, &t, &[inp, out]);
                (name, None)
            }
            LinearQuant::Fp8 { weight: wq, input } => {
                self.check_format(&spec.name, "weights", wq.format)?;
                self.check_format(&spec.name, "input activations", input.format)?;
                if wq.scales.len() != out && wq.scales.len() != 1 {
                    return Err(err(format!(
                        "layer {}: {} weight scales for {out} output channels",
                        spec.name,
                        wq.scales.len()
                    )));
                }
                for &s in &wq.scales {
                    Self::check_scale(&spec.name, "weight", s)?;
                }
                Self::check_scale(&spec.name, "activation", input.scale)?;
                let per_channel = wq.scales.len() == out && out > 1;
                // Codes [out, in] quantized per row, then laid out [in, out] for MatMul.
                let mut codes = vec![0u8; w.len()];
                for (o, (row, dst)) in w.chunks(inp).zip(codes.chunks_mut(inp)).enumerate() {
                    let s = if wq.scales.len() == 1 {
                        wq.scales[0]
                    } else {
                        wq.scales[o]
                    };
                    sd_fp8::quantize_slice(wq.format, row, s, dst);
                }
                let mut t = vec![0u8; codes.len()];
                for o in 0..out {
                    for i in 0..inp {
                        t[i * out + o] = codes[o * inp + i];
                    }
                }
                let we = fp8_elem(wq.format);
                let ae = fp8_elem(input.format);
                let mut st = self.st();
                let wname =
                    st.g.initializer(&format!("{}.weight", spec.name), we, &[inp, out], t);
                let (scale_dims, zero_n): (&[usize], usize) =
                    if per_channel { (&[out], out) } else { (&[], 0) };
                let scales: Vec<f32> = if per_channel {
                    wq.scales.clone()
                } else {
                    vec![wq.scales[0]]
                };
                let ws = st.g.const_f(
                    &format!("{}.weight_scale", spec.name),
                    c,
                    &scales,
                    scale_dims,
                );
                let wz = st.g.fp8_zero(we, zero_n);
                let attrs: Vec<(&str, Attr)> = if per_channel {
                    vec![("axis", Attr::Int(1))]
                } else {
                    vec![]
                };
                let dq =
                    st.g.op("DequantizeLinear", &spec.name, &[&wname, &ws, &wz], &attrs);
                let is = st.g.const_f(
                    &format!("{}.input_scale", spec.name),
                    c,
                    &[input.scale],
                    &[],
                );
                let iz = st.g.fp8_zero(ae, 0);
                st.quantized.push(QuantizedLayer {
                    name: spec.name.clone(),
                    weight_format: wq.format,
                    per_channel,
                    input_format: input.format,
                });
                (
                    dq,
                    Some(InputQ {
                        format: input.format,
                        scale_bits: input.scale.to_bits(),
                        scale: is,
                        zero: iz,
                    }),
                )
            }
        };
        let bias = match bias {
            Some(b) => {
                if b.shape != [out] {
                    return Err(ModelError::ShapeMismatch {
                        name: format!("{}.bias", spec.name),
                        file: b.origin.clone(),
                        expected: vec![out],
                        found: b.shape.clone(),
                    });
                }
                Some(
                    self.st()
                        .g
                        .const_f(&format!("{}.bias", spec.name), c, &b.to_f32(), &[out]),
                )
            }
            None => None,
        };
        Ok(SymLinear {
            spec: spec.clone(),
            weight: weight_value,
            bias,
            input_q,
        })
    }

    fn linear(&self, x: &Sym, layer: &SymLinear) -> Result<Sym> {
        let inp = layer.spec.in_features;
        if x.dims.last() != Some(&inp) {
            return Err(err(format!(
                "layer {}: input shape {:?} does not end in {inp}",
                layer.spec.name, x.dims
            )));
        }
        let name = &layer.spec.name;
        let mut st = self.st();
        let input = match &layer.input_q {
            None => x.name.clone(),
            Some(q) => {
                let key = (x.name.clone(), q.format == Fp8Format::E4M3, q.scale_bits);
                let quantized = match st.shared_q.get(&key) {
                    Some(qn) if self.opts.for_tensorrt => qn.clone(),
                    _ => {
                        let qn = st.g.op(
                            "QuantizeLinear",
                            name,
                            &[&x.name, &q.scale, &q.zero],
                            &[("saturate", Attr::Int(1))],
                        );
                        st.shared_q.insert(key, qn.clone());
                        qn
                    }
                };
                st.g.op(
                    "DequantizeLinear",
                    name,
                    &[&quantized, &q.scale, &q.zero],
                    &[],
                )
            }
        };
        let mut y = st.g.op("MatMul", name, &[&input, &layer.weight], &[]);
        if let Some(b) = &layer.bias {
            y = st.g.op("Add", name, &[&y, b], &[]);
        }
        drop(st);
        let mut dims = x.dims.clone();
        *dims.last_mut().unwrap_or(&mut 0) = layer.spec.out_features;
        Ok(self.like(x, y, dims))
    }

    fn layer_norm(
        &self,
        x: &Sym,
        gamma: Option<&Sym>,
        beta: Option<&Sym>,
        eps: f32,
    ) -> Result<Sym> {
        let c = *x.dims.last().unwrap_or(&1);
        let n = {
            let mut st = self.st();
            let g = match gamma {
                Some(g) => g.name.clone(),
                None => st.g.const_f("ones", x.elem, &vec![1.0; c], &[c]),
            };
            let mut inputs = vec![x.name.as_str(), g.as_str()];
            if let Some(b) = beta {
                inputs.push(&b.name);
            }
            st.g.op(
                "LayerNormalization",
                "layer_norm",
                &inputs,
                &[("axis", Attr::Int(-1)), ("epsilon", Attr::Float(eps))],
            )
        };
        Ok(self.like(x, n, x.dims.clone()))
    }

    fn modulate(&self, x: &Sym, shift: &Sym, scale: &Sym) -> Result<Sym> {
        if x.dims.len() != 3 || shift.dims.len() != 2 {
            return Err(err(format!("modulate {:?} by {:?}", x.dims, shift.dims)));
        }
        let sc = self.unsqueeze(scale, &[1]);
        let sh = self.unsqueeze(shift, &[1]);
        let one_plus = self.with_scalar("Add", &sc, 1.0);
        let y = self.binary("Mul", x, &one_plus);
        Ok(self.binary("Add", &y, &sh))
    }

    fn rms_norm(&self, x: &Sym, gamma: Option<&Sym>, eps: f32) -> Result<Sym> {
        let sq = self.binary("Mul", x, x);
        let ms = self.reduce_mean_last(&sq, -1);
        let ms = self.with_scalar("Add", &ms, eps);
        let inv = self.unary("Reciprocal", &self.unary("Sqrt", &ms));
        let y = self.binary("Mul", x, &inv);
        Ok(match gamma {
            Some(g) => self.binary("Mul", &y, g),
            None => y,
        })
    }

    fn group_norm(&self, x: &Sym, groups: usize, gamma: &Sym, beta: &Sym, eps: f32) -> Result<Sym> {
        let d = &x.dims;
        if d.len() != 4 || groups == 0 || !d[1].is_multiple_of(groups) {
            return Err(err(format!("group_norm: shape {d:?} with {groups} groups")));
        }
        let (b, c, h, w) = (d[0], d[1], d[2], d[3]);
        let r = self.reshape_sym(x, &[b, groups, c / groups * h * w])?;
        let mean = self.reduce_mean_last(&r, 2);
        let dlt = self.binary("Sub", &r, &mean);
        let var = self.reduce_mean_last(&self.binary("Mul", &dlt, &dlt), 2);
        let std = self.unary("Sqrt", &self.with_scalar("Add", &var, eps));
        let n = self.binary("Div", &dlt, &std);
        let n = self.reshape_sym(&n, &[b, c, h, w])?;
        let g3 = self.reshape_sym(gamma, &[c, 1, 1])?;
        let b3 = self.reshape_sym(beta, &[c, 1, 1])?;
        Ok(self.binary("Add", &self.binary("Mul", &n, &g3), &b3))
    }

    fn conv2d(&self, x: &Sym, w: &Sym, b: Option<&Sym>, p: Conv2dParams) -> Result<Sym> {
        let (xd, wd) = (&x.dims, &w.dims);
        if xd.len() != 4 || wd.len() != 4 || xd[1] != wd[1] || p.stride == 0 {
            return Err(err(format!("conv2d: x {xd:?}, w {wd:?}")));
        }
        let (kh, kw) = (wd[2], wd[3]);
        if xd[2] + 2 * p.padding < kh || xd[3] + 2 * p.padding < kw {
            return Err(err(format!(
                "conv2d: kernel {kh}x{kw} larger than input {xd:?}"
            )));
        }
        let oh = (xd[2] + 2 * p.padding - kh) / p.stride + 1;
        let ow = (xd[3] + 2 * p.padding - kw) / p.stride + 1;
        let pad = p.padding as i64;
        // ONNX's Conv has no bfloat16 kernel type: a bfloat16 graph convolves in float32
        // (the weights are bfloat16 values, so only the accumulation is wider).
        let wide = x.elem == ElemType::Bf16;
        let up = |t: &Sym| {
            if wide {
                self.cast(t, ElemType::F32)
            } else {
                t.clone()
            }
        };
        let (xc, wc, bc) = (up(x), up(w), b.map(up));
        let mut inputs = vec![xc.name.as_str(), wc.name.as_str()];
        if let Some(b) = &bc {
            inputs.push(&b.name);
        }
        let n = self.st().g.op(
            "Conv",
            "conv",
            &inputs,
            &[
                ("kernel_shape", Attr::Ints(vec![kh as i64, kw as i64])),
                ("pads", Attr::Ints(vec![pad; 4])),
                ("strides", Attr::Ints(vec![p.stride as i64; 2])),
            ],
        );
        let y = self.like(&xc, n, vec![xd[0], wd[0], oh, ow]);
        Ok(self.cast(&y, x.elem))
    }

    fn upsample_nearest2x(&self, x: &Sym) -> Result<Sym> {
        let d = &x.dims;
        if d.len() != 4 {
            return Err(err(format!("upsample of {d:?}")));
        }
        let n = {
            let mut st = self.st();
            let scales =
                st.g.const_f("scales", ElemType::F32, &[1.0, 1.0, 2.0, 2.0], &[4]);
            st.g.op(
                "Resize",
                "upsample",
                &[&x.name, "", &scales],
                &[
                    ("mode", Attr::Str("nearest".into())),
                    (
                        "coordinate_transformation_mode",
                        Attr::Str("asymmetric".into()),
                    ),
                    ("nearest_mode", Attr::Str("floor".into())),
                ],
            )
        };
        Ok(self.like(x, n, vec![d[0], d[1], 2 * d[2], 2 * d[3]]))
    }

    fn attention(&self, q: &Sym, k: &Sym, v: &Sym, p: AttentionParams<'_, Sym>) -> Result<Sym> {
        let (qd, kd) = (&q.dims, &k.dims);
        if qd.len() != 3 || kd.len() != 3 || kd != &v.dims || qd[2] != kd[2] {
            return Err(err(format!(
                "attention: q {qd:?}, k {kd:?}, v {:?}",
                v.dims
            )));
        }
        let (b, sq, c) = (qd[0], qd[1], qd[2]);
        let sk = kd[1];
        let h = p.heads;
        if h == 0 || !c.is_multiple_of(h) {
            return Err(err("attention: channels not divisible by heads"));
        }
        let d = c / h;
        let qh = self.transpose(&self.reshape_sym(q, &[b, sq, h, d])?, &[0, 2, 1, 3])?;
        let kh = self.transpose(&self.reshape_sym(k, &[b, sk, h, d])?, &[0, 2, 3, 1])?;
        let vh = self.transpose(&self.reshape_sym(v, &[b, sk, h, d])?, &[0, 2, 1, 3])?;
        let mut s = self.binary("MatMul", &qh, &kh);
        s.dims = vec![b, h, sq, sk];
        s.axes = vec![
            qh.axes[0].clone(),
            Axis::Fixed,
            qh.axes[2].clone(),
            kh.axes[3].clone(),
        ];
        if (p.bias.is_some() || p.causal) && (s.axes[2].is_dyn() || s.axes[3].is_dyn()) {
            return Err(err(
                "attention with a bias or a causal mask over a dynamic sequence length",
            ));
        }
        let mut s = self.with_scalar("Mul", &s, p.scale);
        if let Some(bias) = p.bias {
            if bias.dims != [h, sq, sk] {
                return Err(err(format!(
                    "attention: bias {:?}, expected {:?}",
                    bias.dims,
                    [h, sq, sk]
                )));
            }
            s = self.binary("Add", &s, bias);
        }
        if p.causal {
            let m = {
                let mut st = self.st();
                st.g.const_f("causal_mask", s.elem, &causal_mask(sq, sk), &[sq, sk])
            };
            let mask = Sym::fixed(m, vec![sq, sk], s.elem);
            s = self.binary("Add", &s, &mask);
        }
        let pr = {
            let n = self
                .st()
                .g
                .op("Softmax", "softmax", &[&s.name], &[("axis", Attr::Int(-1))]);
            self.like(&s, n, s.dims.clone())
        };
        let mut o = self.binary("MatMul", &pr, &vh);
        o.dims = vec![b, h, sq, d];
        o.axes = vec![
            pr.axes[0].clone(),
            Axis::Fixed,
            pr.axes[2].clone(),
            Axis::Fixed,
        ];
        let o = self.transpose(&o, &[0, 2, 1, 3])?;
        self.reshape_sym(&o, &[b, sq, c])
    }

    fn activation(&self, x: &Sym, act: Activation) -> Result<Sym> {
        Ok(match act {
            Activation::Silu => self.binary("Mul", x, &self.unary("Sigmoid", x)),
            Activation::Relu => self.unary("Relu", x),
            Activation::QuickGelu => {
                let s = self.unary("Sigmoid", &self.with_scalar("Mul", x, 1.702));
                self.binary("Mul", x, &s)
            }
            Activation::Gelu => {
                let e = self.unary(
                    "Erf",
                    &self.with_scalar("Mul", x, std::f32::consts::FRAC_1_SQRT_2),
                );
                let half = self.with_scalar("Mul", x, 0.5);
                self.binary("Mul", &half, &self.with_scalar("Add", &e, 1.0))
            }
            Activation::GeluTanh => {
                let x3 = self.binary("Mul", &self.binary("Mul", x, x), x);
                let inner = self.binary("Add", x, &self.with_scalar("Mul", &x3, 0.044715));
                let t = self.unary("Tanh", &self.with_scalar("Mul", &inner, 0.797_884_6));
                let half = self.with_scalar("Mul", x, 0.5);
                self.binary("Mul", &half, &self.with_scalar("Add", &t, 1.0))
            }
        })
    }

    fn add(&self, a: &Sym, b: &Sym) -> Result<Sym> {
        Ok(self.binary("Add", a, b))
    }

    fn mul(&self, a: &Sym, b: &Sym) -> Result<Sym> {
        if a.dims != b.dims {
            return Err(err(format!(
                "mul: shapes {:?} and {:?} differ",
                a.dims, b.dims
            )));
        }
        Ok(self.binary("Mul", a, b))
    }

    fn scale_shift(&self, x: &Sym, a: f32, b: f32) -> Result<Sym> {
        Ok(self.with_scalar("Add", &self.with_scalar("Mul", x, a), b))
    }

    fn gated_add(&self, x: &Sym, gate: &Sym, y: &Sym) -> Result<Sym> {
        if x.dims.len() != 3 || gate.dims.len() != 2 {
            return Err(err(format!("gated_add {:?} by {:?}", x.dims, gate.dims)));
        }
        let g = self.unsqueeze(gate, &[1]);
        Ok(self.binary("Add", x, &self.binary("Mul", &g, y)))
    }

    fn concat(&self, parts: &[&Sym], dim: usize) -> Result<Sym> {
        let first = parts.first().ok_or_else(|| err("concat of nothing"))?;
        let r = first.dims.len();
        if dim >= r || parts.iter().any(|p| p.dims.len() != r) {
            return Err(err(format!("concat along {dim} of {:?}", first.dims)));
        }
        // Along `dim`: fixed parts, optionally followed by one dynamic part.
        let along: Vec<&Axis> = parts.iter().map(|p| &p.axes[dim]).collect();
        let (last, init) = along.split_last().ok_or_else(|| err("concat of nothing"))?;
        let axis = match (last, init.iter().all(|a| !a.is_dyn())) {
            (Axis::Fixed, true) => Axis::Fixed,
            (Axis::Dyn(name), true) => Axis::Joined {
                prefix: parts[..parts.len() - 1].iter().map(|p| p.dims[dim]).sum(),
                name: name.clone(),
            },
            _ => {
                return Err(err(format!(
                    "concat along {dim}: only fixed parts followed by one dynamic part are \
                     supported, got {along:?}"
                )));
            }
        };
        let mut axes: Vec<Axis> = (0..r)
            .map(|i| {
                parts
                    .iter()
                    .map(|p| p.axes[i].clone())
                    .find(Axis::is_dyn)
                    .unwrap_or(Axis::Fixed)
            })
            .collect();
        axes[dim] = axis;
        let mut dims = first.dims.clone();
        dims[dim] = parts.iter().map(|p| p.dims[dim]).sum();
        let names: Vec<&str> = parts.iter().map(|p| p.name.as_str()).collect();
        let n = self.st().g.op(
            "Concat",
            "concat",
            &names,
            &[("axis", Attr::Int(dim as i64))],
        );
        Ok(Sym {
            name: n,
            dims,
            elem: first.elem,
            axes,
        })
    }

    fn narrow(&self, x: &Sym, dim: usize, start: usize, len: usize) -> Result<Sym> {
        if dim >= x.dims.len() || start + len > x.dims[dim] {
            return Err(err(format!(
                "narrow {start}+{len} of dim {dim} in {:?}",
                x.dims
            )));
        }
        let full = x.dims[dim];
        // On a dynamic axis only a fixed prefix, or the dynamic rest to the end, is a
        // slice that does not depend on the traced size.
        let (end, axis) = match &x.axes[dim] {
            Axis::Fixed => ((start + len) as i64, Axis::Fixed),
            Axis::Dyn(_) if start == 0 && len == full => return Ok(x.clone()),
            Axis::Joined { prefix, .. } if start + len <= *prefix => {
                ((start + len) as i64, Axis::Fixed)
            }
            Axis::Joined { prefix, name } if start == *prefix && start + len == full => {
                (i64::MAX, Axis::Dyn(name.clone()))
            }
            a => {
                return Err(err(format!(
                    "narrow {start}+{len} of the dynamic axis {dim} ({a:?}) of {:?}",
                    x.dims
                )));
            }
        };
        let n = {
            let mut st = self.st();
            let s = st.g.ints("starts", &[start as i64]);
            let e = st.g.ints("ends", &[end]);
            let a = st.g.ints("axes", &[dim as i64]);
            st.g.op("Slice", "narrow", &[&x.name, &s, &e, &a], &[])
        };
        let mut dims = x.dims.clone();
        dims[dim] = len;
        let mut out = self.like(x, n, dims);
        out.axes[dim] = axis;
        Ok(out)
    }

    fn reshape(&self, x: &Sym, shape: &[usize]) -> Result<Sym> {
        self.reshape_sym(x, shape)
    }

    fn permute(&self, x: &Sym, perm: &[usize]) -> Result<Sym> {
        self.transpose(x, perm)
    }

    fn pad_last(&self, x: &Sym, size: usize) -> Result<Sym> {
        let r = x.dims.len();
        let c = *x.dims.last().unwrap_or(&0);
        if size < c || r == 0 {
            return Err(err(format!("pad_last: {c} > {size}")));
        }
        let mut pads = vec![0i64; 2 * r];
        pads[2 * r - 1] = (size - c) as i64;
        let n = {
            let mut st = self.st();
            let p = st.g.ints("pads", &pads);
            st.g.op("Pad", "pad", &[&x.name, &p], &[])
        };
        let mut dims = x.dims.clone();
        dims[r - 1] = size;
        Ok(self.like(x, n, dims))
    }

    fn embedding(&self, table: &Sym, ids: &[u32], batch: usize, seq: usize) -> Result<Sym> {
        if ids.len() != batch * seq {
            return Err(err("embedding: bad id count"));
        }
        let v: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
        let idn = self.st().g.const_i64("ids", &v, &[batch, seq]);
        let ids = Sym::fixed(idn, vec![batch, seq], ElemType::I64);
        self.embedding_ids(table, &ids)
    }

    fn select_tokens(&self, x: &Sym, index: &[usize]) -> Result<Sym> {
        if x.axes.first().is_some_and(Axis::is_dyn) {
            return Err(err(
                "select_tokens with host indices on a dynamic batch; use select_tokens_by_ids",
            ));
        }
        let v: Vec<i64> = index.iter().map(|&i| i as i64).collect();
        let idx = self.st().g.ints("index", &v);
        self.gather_rows(x, &idx)
    }

    fn embedding_ids(&self, table: &Sym, ids: &Sym) -> Result<Sym> {
        if table.dims.len() != 2 || ids.dims.len() != 2 {
            return Err(err(format!(
                "embedding: table {:?}, ids {:?}",
                table.dims, ids.dims
            )));
        }
        let ids = self.cast(ids, ElemType::I64);
        let n = self.st().g.op(
            "Gather",
            "embedding",
            &[&table.name, &ids.name],
            &[("axis", Attr::Int(0))],
        );
        Ok(Sym {
            name: n,
            dims: vec![ids.dims[0], ids.dims[1], table.dims[1]],
            elem: table.elem,
            axes: vec![ids.axes[0].clone(), ids.axes[1].clone(), Axis::Fixed],
        })
    }

    fn select_tokens_by_ids(&self, x: &Sym, ids: &Sym, pick: TokenPick) -> Result<Sym> {
        let ids = self.cast(ids, ElemType::I64);
        let idx = {
            let mut st = self.st();
            // ArgMax over int32 (ONNX Runtime's CPU ArgMax has no int64 kernel); the
            // first maximum is taken (select_last_index = 0), as the host rule does.
            let keyed = match pick {
                TokenPick::ArgMax => st.g.op(
                    "Cast",
                    "pool",
                    &[&ids.name],
                    &[("to", Attr::Int(ElemType::I32.onnx() as i64))],
                ),
                TokenPick::FirstEqual(eos) => {
                    let e = st.g.const_i64("eos_token_id", &[eos], &[]);
                    let eq = st.g.op("Equal", "pool", &[&ids.name, &e], &[]);
                    st.g.op(
                        "Cast",
                        "pool",
                        &[&eq],
                        &[("to", Attr::Int(ElemType::I32.onnx() as i64))],
                    )
                }
            };
            st.g.op(
                "ArgMax",
                "pool",
                &[&keyed],
                &[
                    ("axis", Attr::Int(1)),
                    ("keepdims", Attr::Int(0)),
                    ("select_last_index", Attr::Int(0)),
                ],
            )
        };
        let mut out = self.gather_rows(x, &idx)?;
        if !out.axes[0].is_dyn() {
            out.axes[0] = ids.axes[0].clone();
        }
        Ok(out)
    }

    fn timestep_embedding(&self, t: &Sym, dim: usize) -> Result<Sym> {
        if t.dims.len() != 1 {
            return Err(err(format!("timesteps must be [batch], got {:?}", t.dims)));
        }
        // Frequencies exactly as the host function computes them (f32).
        let half = dim / 2;
        let ln = -(10000f64.ln()) as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| ((ln * i as f32) / half as f32).exp())
            .collect();
        let t32 = self.cast(t, ElemType::F32);
        let t2 = self.unsqueeze(&t32, &[1]);
        let n = {
            let mut st = self.st();
            let f =
                st.g.const_f("timestep_freqs", ElemType::F32, &freqs, &[half]);
            let args = st.g.op("Mul", "timestep_embedding", &[&t2.name, &f], &[]);
            let cos = st.g.op("Cos", "timestep_embedding", &[&args], &[]);
            let sin = st.g.op("Sin", "timestep_embedding", &[&args], &[]);
            st.g.op(
                "Concat",
                "timestep_embedding",
                &[&cos, &sin],
                &[("axis", Attr::Int(1))],
            )
        };
        let e = Sym {
            name: n,
            dims: vec![t.dims[0], 2 * half],
            elem: ElemType::F32,
            axes: vec![t.axes[0].clone(), Axis::Fixed],
        };
        Ok(self.cast(&e, self.opts.compute))
    }

    fn guidance(&self, uncond: &Sym, cond: &Sym, g: f32) -> Result<Sym> {
        let d = self.binary("Sub", cond, uncond);
        Ok(self.binary("Add", uncond, &self.with_scalar("Mul", &d, g)))
    }

    fn euler_step(&self, x: &Sym, v: &Sym, dt: f32) -> Result<Sym> {
        Ok(self.binary("Add", x, &self.with_scalar("Mul", v, dt)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracer() -> OnnxTracer {
        OnnxTracer::new(TraceOptions::default()).unwrap()
    }

    #[test]
    fn dynamic_axes_follow_reshapes_and_slices() {
        let t = tracer();
        let x = t.input("x", ElemType::F32, &[2, 5, 8], &[(0, "batch"), (1, "len")]);
        let y = t.reshape(&x, &[2, 5, 2, 4]).unwrap();
        assert_eq!(y.axes[..2], x.axes[..2]);
        // Merging a dynamic axis would bake its traced size in: refused.
        assert!(t.reshape(&x, &[2, 40]).is_err());
        let f = t.input("f", ElemType::F32, &[2, 3, 8], &[(0, "batch")]);
        let j = t.concat(&[&f, &x], 1).unwrap();
        assert_eq!(
            j.axes[1],
            Axis::Joined {
                prefix: 3,
                name: "len".into()
            }
        );
        assert_eq!(t.narrow(&j, 1, 0, 3).unwrap().axes[1], Axis::Fixed);
        assert_eq!(
            t.narrow(&j, 1, 3, 5).unwrap().axes[1],
            Axis::Dyn("len".into())
        );
        assert!(t.narrow(&j, 1, 1, 3).is_err());
        assert!(t.narrow(&x, 1, 0, 2).is_err());
        // A dynamic-first concatenation is not expressible with fixed slices later.
        assert!(t.concat(&[&x, &f], 1).is_err());
    }

    #[test]
    fn host_values_are_unavailable_and_uploads_recorded() {
        let t = tracer();
        let c = t.upload(&HostTensor::zeros(vec![2, 3])).unwrap();
        assert!(t.download(&c).is_err());
        assert_eq!(t.host_constants().len(), 1);
    }
}
