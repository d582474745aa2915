//! The tracing backend: a [`Backend`] whose tensors are symbolic (a value name, a shape
//! and an element type) and whose operations append ONNX nodes. Running the model code
//! of `sd-model` on it builds the ONNX graph of exactly that code.
//!
//! Dynamic axes: graph inputs may declare axes dynamic (the batch, latent height and
//! width, text lengths); every value records which of its axes are dynamic ([`Axis`]),
//! reshapes keep them with ONNX's `0` (copy) dimension, a concatenation remembers where
//! each dynamic part's size can be read so that a slice back to whole parts takes its
//! bounds from `Shape` in the graph, and an operation that would need arithmetic on a
//! dynamic size is refused rather than traced with the traced size baked in. Where the
//! model needs such arithmetic (patchify / unpatchify, the positional crop, CLIP's
//! positions and causal mask, T5's relative-position bias, group norm), the tracer's
//! Backend methods compute the shapes from `Shape` / `Div` / `Concat` / `Range` in the
//! graph.

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
    /// A dynamic size; the name says how it follows from the graph's input sizes.
    Dyn(String),
    /// A concatenation of parts, at least one of them dynamic (adjacent fixed parts merged).
    Joined(Vec<Part>),
}

/// One part of a [`Axis::Joined`] axis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// The traced size.
    pub len: usize,
    /// For a dynamic part: where the graph can read its size.
    pub dynamic: Option<DynSize>,
}

/// A dynamic size and a graph value holding it: axis `axis` of value `value`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DynSize {
    pub name: String,
    pub value: String,
    pub axis: usize,
}

impl Axis {
    pub fn is_dyn(&self) -> bool {
        !matches!(self, Self::Fixed)
    }

    /// The size's name in graph inputs and outputs (`traced` for a fixed axis).
    pub fn label(&self, traced: usize) -> String {
        match self {
            Self::Fixed => traced.to_string(),
            Self::Dyn(n) => n.clone(),
            Self::Joined(parts) => {
                let names: Vec<String> = parts
                    .iter()
                    .map(|p| match &p.dynamic {
                        Some(d) => d.name.clone(),
                        None => p.len.to_string(),
                    })
                    .collect();
                names.join("+")
            }
        }
    }

    /// This axis after an operation that maps its size `n` to `op(n)`, traced `from` ->
    /// `to` (`name` says it for dynamic sizes, e.g. `2*{}`).
    fn map(&self, from: usize, to: usize, name: &str) -> Self {
        match self {
            Self::Fixed => Self::Fixed,
            _ if from == to => self.clone(),
            a => {
                let inner = a.label(from);
                let inner = if matches!(a, Self::Dyn(_)) && !inner.contains(['+', '-']) {
                    inner
                } else {
                    format!("({inner})")
                };
                Self::Dyn(name.replace("{}", &inner))
            }
        }
    }

    /// This axis with `k` times its size (traced `from`): `2*height`, then `4*height`.
    fn scaled(&self, from: usize, k: usize) -> Self {
        let factor = match self {
            Self::Dyn(n) => n
                .split_once('*')
                .and_then(|(f, rest)| Some((f.parse::<usize>().ok()?, rest))),
            _ => None,
        };
        match factor {
            Some((f, rest)) => Self::Dyn(format!("{}*{rest}", f * k)),
            None => self.map(from, from * k, &format!("{k}*{{}}")),
        }
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

/// An axis as a graph input or output dimension.
pub fn dim_of(d: usize, a: &Axis) -> Dim {
    match a {
        Axis::Fixed => Dim::Fixed(d),
        a => Dim::Named(a.label(d)),
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
    /// `None` for a weight-only layer (no input quantizer).
    pub input_format: Option<Fp8Format>,
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

    /// The additive causal mask `[Sq, Sk]` of q `[B, Sq, ..]` and k `[B, Sk, ..]`: -inf
    /// where the key comes after the query, 0 elsewhere, built in the graph from the
    /// lengths (Range, Greater, Where), so it follows dynamic lengths. ONNX Runtime's
    /// Softmax handles the -inf entries exactly.
    fn causal_mask(&self, q: &Sym, k: &Sym, elem: ElemType) -> Sym {
        let sq = self.shape_of(q, 1, 2);
        let sk = self.shape_of(k, 1, 2);
        let n = {
            let mut st = self.st();
            let zero = st.g.const_i64("zero", &[0], &[]);
            let one = st.g.const_i64("one", &[1], &[]);
            let mut positions = |len: &str, axis: i64| {
                let ax0 = st.g.ints("axes", &[0]);
                let len = st.g.op("Squeeze", "causal_mask", &[len, &ax0], &[]);
                let r = st.g.op("Range", "causal_mask", &[&zero, &len, &one], &[]);
                let ax = st.g.ints("axes", &[axis]);
                st.g.op("Unsqueeze", "causal_mask", &[&r, &ax], &[])
            };
            let rows = positions(&sq, 1);
            let cols = positions(&sk, 0);
            let later = st.g.op("Greater", "causal_mask", &[&cols, &rows], &[]);
            let ninf = st.g.scalar(ElemType::F32, f32::NEG_INFINITY);
            let zf = st.g.scalar(ElemType::F32, 0.0);
            let m = st.g.op("Where", "causal_mask", &[&later, &ninf, &zf], &[]);
            if elem == ElemType::F32 {
                m
            } else {
                st.g.op(
                    "Cast",
                    "causal_mask",
                    &[&m],
                    &[("to", Attr::Int(elem.onnx() as i64))],
                )
            }
        };
        Sym {
            name: n,
            dims: vec![q.dims[1], k.dims[1]],
            elem,
            axes: vec![q.axes[1].clone(), k.axes[1].clone()],
        }
    }

    /// Element `i` of a 1-D int64 value, as a 1-D value of one element.
    fn slice1(&self, st: &mut State, v: &str, i: i64) -> String {
        let s = st.g.ints("starts", &[i]);
        let e = st.g.ints("ends", &[i + 1]);
        st.g.op("Slice", "element", &[v, &s, &e], &[])
    }

    /// The token axis of `like [B, C, H, W]` cut into patches of `patch`.
    fn tokens_axis(&self, like: &Sym, patch: usize) -> Axis {
        let (h, w) = (&like.axes[2], &like.axes[3]);
        if !h.is_dyn() && !w.is_dyn() {
            return Axis::Fixed;
        }
        let part = |a: &Axis, n: usize| {
            let l = a.label(n);
            let l = if l.contains('+') { format!("({l})") } else { l };
            if patch == 1 {
                l
            } else {
                format!("{l}/{patch}")
            }
        };
        Axis::Dyn(format!(
            "{}*{}",
            part(h, like.dims[2]),
            part(w, like.dims[3])
        ))
    }

    /// `Shape(x)[start..end]`: a 1-D int64 value.
    fn shape_of(&self, x: &Sym, start: usize, end: usize) -> String {
        self.st().g.op(
            "Shape",
            "shape",
            &[&x.name],
            &[
                ("start", Attr::Int(start as i64)),
                ("end", Attr::Int(end as i64)),
            ],
        )
    }

    /// The total size of some parts of a joined axis: a 1-D int64 value of one element.
    fn parts_size(&self, parts: &[Part]) -> String {
        let fixed: usize = parts
            .iter()
            .filter(|p| p.dynamic.is_none())
            .map(|p| p.len)
            .sum();
        let mut st = self.st();
        let mut total = st.g.ints("size", &[fixed as i64]);
        for d in parts.iter().filter_map(|p| p.dynamic.as_ref()) {
            let size = st.g.op(
                "Shape",
                "shape",
                &[&d.value],
                &[
                    ("start", Attr::Int(d.axis as i64)),
                    ("end", Attr::Int(d.axis as i64 + 1)),
                ],
            );
            total = st.g.op("Add", "size", &[&total, &size], &[]);
        }
        total
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
            LinearQuant::Fp8 { weight: wq, .. } | LinearQuant::Fp8WeightOnly { weight: wq } => {
                // Weight-only layers get the weight's DequantizeLinear and no input
                // Q/DQ pair: the MatMul then takes the high-precision activation.
                let input = spec.quant.input_quant();
                self.check_format(&spec.name, "weights", wq.format)?;
                if let Some(input) = input {
                    self.check_format(&spec.name, "input activations", input.format)?;
                }
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
                if let Some(input) = input {
                    Self::check_scale(&spec.name, "activation", input.scale)?;
                }
                let per_channel = wq.scales.len() == out && out > 1;
                // Codes [out, in] quantized per row, then laid out [in, out] for MatMul.
                let mut codes = vec![0u8; w.len()];
                for (o, (row, dst)) in w.chunks(inp).zip(codes.chunks_mut(inp)).enumerate() {
                    sd_fp8::quantize_slice(wq.format, row, wq.scale(o), dst);
                }
                let mut t = vec![0u8; codes.len()];
                for o in 0..out {
                    for i in 0..inp {
                        t[i * out + o] = codes[o * inp + i];
                    }
                }
                let we = fp8_elem(wq.format);
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
                st.quantized.push(QuantizedLayer {
                    name: spec.name.clone(),
                    weight_format: wq.format,
                    per_channel,
                    input_format: input.map(|i| i.format),
                });
                let input_q = input.map(|input| {
                    let is = st.g.const_f(
                        &format!("{}.input_scale", spec.name),
                        c,
                        &[input.scale],
                        &[],
                    );
                    InputQ {
                        format: input.format,
                        scale_bits: input.scale.to_bits(),
                        scale: is,
                        zero: st.g.fp8_zero(fp8_elem(input.format), 0),
                    }
                });
                (dq, input_q)
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
        // [B, G, C/G*H*W] with the sizes read from the graph (-1), and back to x's shape.
        let r = {
            let mut st = self.st();
            let shape = st.g.ints("shape", &[0, groups as i64, -1]);
            st.g.op("Reshape", "group_norm", &[&x.name, &shape], &[])
        };
        let merged = x.axes[1..]
            .iter()
            .any(Axis::is_dyn)
            .then(|| Axis::Dyn(format!("{}*{}", x.axes[2].label(h), x.axes[3].label(w))));
        let r = Sym {
            name: r,
            dims: vec![b, groups, c / groups * h * w],
            elem: x.elem,
            axes: vec![
                x.axes[0].clone(),
                Axis::Fixed,
                merged.unwrap_or(Axis::Fixed),
            ],
        };
        let mean = self.reduce_mean_last(&r, 2);
        let dlt = self.binary("Sub", &r, &mean);
        let var = self.reduce_mean_last(&self.binary("Mul", &dlt, &dlt), 2);
        let std = self.unary("Sqrt", &self.with_scalar("Add", &var, eps));
        let n = self.binary("Div", &dlt, &std);
        let shape = self.shape_of(x, 0, 4);
        let n = self
            .st()
            .g
            .op("Reshape", "group_norm", &[&n.name, &shape], &[]);
        let n = self.like(x, n, d.clone());
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
        let mut y = self.like(&xc, n, vec![xd[0], wd[0], oh, ow]);
        let size = format!("({{}}+{}-{kh})/{}+1", 2 * p.padding, p.stride);
        y.axes[2] = x.axes[2].map(xd[2], oh, &size);
        let size = format!("({{}}+{}-{kw})/{}+1", 2 * p.padding, p.stride);
        y.axes[3] = x.axes[3].map(xd[3], ow, &size);
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
        let mut y = self.like(x, n, vec![d[0], d[1], 2 * d[2], 2 * d[3]]);
        y.axes[2] = x.axes[2].scaled(d[2], 2);
        y.axes[3] = x.axes[3].scaled(d[3], 2);
        Ok(y)
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
        let mut s = self.with_scalar("Mul", &s, p.scale);
        if let Some(bias) = p.bias {
            if bias.dims != [h, sq, sk] {
                return Err(err(format!(
                    "attention: bias {:?}, expected {:?}",
                    bias.dims,
                    [h, sq, sk]
                )));
            }
            // A bias of the traced size over a dynamic length would be baked in.
            if (s.axes[2].is_dyn() && !bias.axes[1].is_dyn())
                || (s.axes[3].is_dyn() && !bias.axes[2].is_dyn())
            {
                return Err(err(
                    "attention over a dynamic sequence length with a bias of fixed size",
                ));
            }
            s = self.binary("Add", &s, bias);
        }
        if p.causal {
            let mask = self.causal_mask(q, k, s.elem);
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
        // Along `dim`: the parts, each dynamic one with a value that holds its size, so
        // that a later narrow can cut them apart again.
        let mut joined: Vec<Part> = Vec::new();
        for p in parts {
            let pieces = match &p.axes[dim] {
                Axis::Fixed => vec![Part {
                    len: p.dims[dim],
                    dynamic: None,
                }],
                Axis::Dyn(name) => vec![Part {
                    len: p.dims[dim],
                    dynamic: Some(DynSize {
                        name: name.clone(),
                        value: p.name.clone(),
                        axis: dim,
                    }),
                }],
                Axis::Joined(ps) => ps.clone(),
            };
            for piece in pieces {
                match joined.last_mut() {
                    Some(last) if last.dynamic.is_none() && piece.dynamic.is_none() => {
                        last.len += piece.len;
                    }
                    _ => joined.push(piece),
                }
            }
        }
        let axis = match joined.as_slice() {
            [] => return Err(err("concat of nothing")),
            [one] => match &one.dynamic {
                None => Axis::Fixed,
                Some(d) => Axis::Dyn(d.name.clone()),
            },
            _ => Axis::Joined(joined),
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
        // On a dynamic axis only a range within a fixed prefix, or a run of whole parts of
        // a concatenation, is a slice that does not depend on the traced sizes.
        let (starts, ends, axis) = match &x.axes[dim] {
            Axis::Fixed => {
                let mut st = self.st();
                let s = st.g.ints("starts", &[start as i64]);
                let e = st.g.ints("ends", &[(start + len) as i64]);
                (s, e, Axis::Fixed)
            }
            Axis::Dyn(_) if start == 0 && len == full => return Ok(x.clone()),
            Axis::Joined(parts)
                if parts
                    .first()
                    .is_some_and(|p| p.dynamic.is_none() && start + len <= p.len) =>
            {
                let mut st = self.st();
                let s = st.g.ints("starts", &[start as i64]);
                let e = st.g.ints("ends", &[(start + len) as i64]);
                (s, e, Axis::Fixed)
            }
            Axis::Joined(parts) => {
                let offsets: Vec<usize> = std::iter::once(0)
                    .chain(parts.iter().scan(0, |o, p| {
                        *o += p.len;
                        Some(*o)
                    }))
                    .collect();
                let i0 = offsets.iter().position(|&o| o == start);
                let i1 =
                    i0.and_then(|i0| (i0 + 1..offsets.len()).find(|&i| offsets[i] == start + len));
                let (Some(i0), Some(i1)) = (i0, i1) else {
                    return Err(err(format!(
                        "narrow {start}+{len} of the joined axis {dim} ({}) of {:?} does \
                         not select whole parts",
                        x.axes[dim].label(full),
                        x.dims
                    )));
                };
                let s = self.parts_size(&parts[..i0]);
                let e = if i1 == parts.len() {
                    self.st().g.ints("ends", &[i64::MAX])
                } else {
                    self.parts_size(&parts[..i1])
                };
                let sel = &parts[i0..i1];
                let axis = match sel {
                    [one] => match &one.dynamic {
                        None => Axis::Fixed,
                        Some(d) => Axis::Dyn(d.name.clone()),
                    },
                    _ if sel.iter().all(|p| p.dynamic.is_none()) => Axis::Fixed,
                    _ => Axis::Joined(sel.to_vec()),
                };
                (s, e, axis)
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
            let a = st.g.ints("axes", &[dim as i64]);
            st.g.op("Slice", "narrow", &[&x.name, &starts, &ends, &a], &[])
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

    fn patchify(&self, x: &Sym, patch: usize) -> Result<Sym> {
        let d = &x.dims;
        if d.len() != 4 || patch == 0 || !d[2].is_multiple_of(patch) || !d[3].is_multiple_of(patch)
        {
            return Err(err(format!("cannot cut {d:?} into patches of {patch}")));
        }
        let (b, c, h, w) = (d[0], d[1], d[2], d[3]);
        let p = patch as i64;
        let x6 = if patch == 1 {
            x.name.clone()
        } else {
            // [B, C, H/p, p, W/p, p], with H/p and W/p computed from the input's shape.
            let hw = self.shape_of(x, 2, 4);
            let mut st = self.st();
            let ps = st.g.ints("patch", &[p]);
            let g = st.g.op("Div", "patchify", &[&hw, &ps], &[]);
            let gh = self.slice1(&mut st, &g, 0);
            let gw = self.slice1(&mut st, &g, 1);
            let head = st.g.ints("shape", &[0, c as i64]);
            let shape = st.g.op(
                "Concat",
                "patchify",
                &[&head, &gh, &ps, &gw, &ps],
                &[("axis", Attr::Int(0))],
            );
            let r = st.g.op("Reshape", "patchify", &[&x.name, &shape], &[]);
            st.g.op(
                "Transpose",
                "patchify",
                &[&r],
                &[("perm", Attr::Ints(vec![0, 2, 4, 1, 3, 5]))],
            )
        };
        let n = {
            let mut st = self.st();
            // [B, H/p*W/p, C*p*p], or [B, C, H*W] to be transposed when p is 1.
            let target = if patch == 1 {
                [0, c as i64, -1]
            } else {
                [0, -1, c as i64 * p * p]
            };
            let shape = st.g.ints("shape", &target);
            let r = st.g.op("Reshape", "patchify", &[&x6, &shape], &[]);
            if patch == 1 {
                st.g.op(
                    "Transpose",
                    "patchify",
                    &[&r],
                    &[("perm", Attr::Ints(vec![0, 2, 1]))],
                )
            } else {
                r
            }
        };
        Ok(Sym {
            name: n,
            dims: vec![b, (h / patch) * (w / patch), c * patch * patch],
            elem: x.elem,
            axes: vec![x.axes[0].clone(), self.tokens_axis(x, patch), Axis::Fixed],
        })
    }

    fn unpatchify(&self, x: &Sym, patch: usize, like: &Sym) -> Result<Sym> {
        let (d, l) = (&x.dims, &like.dims);
        if d.len() != 3
            || l.len() != 4
            || patch == 0
            || !l[2].is_multiple_of(patch)
            || !l[3].is_multiple_of(patch)
            || d[1] != (l[2] / patch) * (l[3] / patch)
            || !d[2].is_multiple_of(patch * patch)
        {
            return Err(err(format!(
                "cannot lay {d:?} out in patches of {patch} over {l:?}"
            )));
        }
        let c = d[2] / (patch * patch);
        let p = patch as i64;
        let hw = self.shape_of(like, 2, 4);
        let n = {
            let mut st = self.st();
            let x6 = if patch == 1 {
                st.g.op(
                    "Transpose",
                    "unpatchify",
                    &[&x.name],
                    &[("perm", Attr::Ints(vec![0, 2, 1]))],
                )
            } else {
                // [B, H/p, W/p, p, p, C] -> [B, C, H/p, p, W/p, p].
                let ps = st.g.ints("patch", &[p]);
                let g = st.g.op("Div", "unpatchify", &[&hw, &ps], &[]);
                let head = st.g.ints("shape", &[0]);
                let tail = st.g.ints("shape", &[p, p, c as i64]);
                let shape = st.g.op(
                    "Concat",
                    "unpatchify",
                    &[&head, &g, &tail],
                    &[("axis", Attr::Int(0))],
                );
                let r = st.g.op("Reshape", "unpatchify", &[&x.name, &shape], &[]);
                st.g.op(
                    "Transpose",
                    "unpatchify",
                    &[&r],
                    &[("perm", Attr::Ints(vec![0, 5, 1, 3, 2, 4]))],
                )
            };
            let head = st.g.ints("shape", &[0, c as i64]);
            let shape = st.g.op(
                "Concat",
                "unpatchify",
                &[&head, &hw],
                &[("axis", Attr::Int(0))],
            );
            st.g.op("Reshape", "unpatchify", &[&x6, &shape], &[])
        };
        Ok(Sym {
            name: n,
            dims: vec![d[0], c, l[2], l[3]],
            elem: x.elem,
            axes: vec![
                x.axes[0].clone(),
                Axis::Fixed,
                like.axes[2].clone(),
                like.axes[3].clone(),
            ],
        })
    }

    fn cropped_pos_embed(&self, table: &Sym, like: &Sym, patch: usize) -> Result<Sym> {
        let (t, l) = (&table.dims, &like.dims);
        if t.len() != 3 || t[0] != t[1] || l.len() != 4 || patch == 0 {
            return Err(err(format!(
                "cannot crop the positional table {t:?} for {l:?} in patches of {patch}"
            )));
        }
        let (m, gh, gw) = (t[0], l[2] / patch, l[3] / patch);
        if gh > m || gw > m {
            return Err(err(format!(
                "{gh}x{gw} patches exceed the positional table of {m}x{m}"
            )));
        }
        // The window [(M - gh) / 2, + gh) x [(M - gw) / 2, + gw), bounds from the shape.
        // A window larger than the table starts at 0 (not at a negative start, which
        // Slice would count from the end) and is cut short at M, so that the positions do
        // not match the tokens and the graph fails instead of broadcasting a wrong crop.
        let hw = self.shape_of(like, 2, 4);
        let n = {
            let mut st = self.st();
            let ps = st.g.ints("patch", &[patch as i64]);
            let g = st.g.op("Div", "cropped_pos_embed", &[&hw, &ps], &[]);
            let mm = st.g.ints("pos_embed_max_size", &[m as i64, m as i64]);
            let free = st.g.op("Sub", "cropped_pos_embed", &[&mm, &g], &[]);
            let zeros = st.g.ints("zeros", &[0, 0]);
            let free = st.g.op("Max", "cropped_pos_embed", &[&free, &zeros], &[]);
            let two = st.g.ints("two", &[2]);
            let starts = st.g.op("Div", "cropped_pos_embed", &[&free, &two], &[]);
            let ends = st.g.op("Add", "cropped_pos_embed", &[&starts, &g], &[]);
            let axes = st.g.ints("axes", &[0, 1]);
            let win = st.g.op(
                "Slice",
                "cropped_pos_embed",
                &[&table.name, &starts, &ends, &axes],
                &[],
            );
            let shape = st.g.ints("shape", &[1, -1, t[2] as i64]);
            st.g.op("Reshape", "cropped_pos_embed", &[&win, &shape], &[])
        };
        Ok(Sym {
            name: n,
            dims: vec![1, gh * gw, t[2]],
            elem: table.elem,
            axes: vec![Axis::Fixed, self.tokens_axis(like, patch), Axis::Fixed],
        })
    }

    fn position_embedding(&self, table: &Sym, like: &Sym) -> Result<Sym> {
        let (t, l) = (&table.dims, &like.dims);
        if t.len() != 2 || l.len() < 2 || l[1] > t[0] {
            return Err(err(format!("positions of {l:?} from a table {t:?}")));
        }
        let len = self.shape_of(like, 1, 2);
        let n = {
            let mut st = self.st();
            let zero = st.g.ints("starts", &[0]);
            let axes = st.g.ints("axes", &[0]);
            let rows = st.g.op(
                "Slice",
                "position_embedding",
                &[&table.name, &zero, &len, &axes],
                &[],
            );
            st.g.op("Unsqueeze", "position_embedding", &[&rows, &axes], &[])
        };
        Ok(Sym {
            name: n,
            dims: vec![1, l[1], t[1]],
            elem: table.elem,
            axes: vec![Axis::Fixed, like.axes[1].clone(), Axis::Fixed],
        })
    }

    fn relative_position_bias(
        &self,
        table: &HostTensor,
        max_distance: usize,
        like: &Sym,
    ) -> Result<Sym> {
        let l = &like.dims;
        if l.len() < 2 || table.shape.len() != 2 {
            return Err(err(format!(
                "relative-position bias for {l:?} from a table {:?}",
                table.shape
            )));
        }
        let (buckets, heads) = (table.shape[0], table.shape[1]);
        // The bucket of every relative position k - q in [-D, D], computed by the model's
        // own function (bit-identical buckets, no graph logarithm), where D is a distance
        // beyond which the buckets no longer change; the graph clips k - q to it.
        let reach = max_distance.max(buckets / 4);
        let bucket = |r: i64| sd_model::t5::relative_position_bucket(r, buckets, max_distance);
        let d = reach as i64;
        if (d..=4 * d + 64).any(|r| bucket(r) != bucket(d) || bucket(-r) != bucket(-d)) {
            return Err(err(format!(
                "T5 relative-position buckets ({buckets} buckets, max distance \
                 {max_distance}) do not saturate; the bias cannot be built in the graph"
            )));
        }
        let lookup: Vec<i64> = (-d..=d).map(|r| bucket(r) as i64).collect();
        let len = self.shape_of(like, 1, 2);
        let n = {
            let mut st = self.st();
            let bias_table = st.g.const_f(
                "relative_attention_bias",
                self.opts.compute,
                &table.data,
                &[buckets, heads],
            );
            let lookup = st.g.const_i64("relative_buckets", &lookup, &[lookup.len()]);
            let zero = st.g.const_i64("zero", &[0], &[]);
            let one = st.g.const_i64("one", &[1], &[]);
            let ax0 = st.g.ints("axes", &[0]);
            let len = st.g.op("Squeeze", "position_bias", &[&len, &ax0], &[]);
            let pos = st.g.op("Range", "position_bias", &[&zero, &len, &one], &[]);
            let keys = st.g.op("Unsqueeze", "position_bias", &[&pos, &ax0], &[]);
            let ax1 = st.g.ints("axes", &[1]);
            let queries = st.g.op("Unsqueeze", "position_bias", &[&pos, &ax1], &[]);
            let rel = st.g.op("Sub", "position_bias", &[&keys, &queries], &[]);
            let lo = st.g.const_i64("min_relative", &[-d], &[]);
            let hi = st.g.const_i64("max_relative", &[d], &[]);
            let rel = st.g.op("Clip", "position_bias", &[&rel, &lo, &hi], &[]);
            let idx = st.g.op("Add", "position_bias", &[&rel, &hi], &[]);
            let b = st.g.op(
                "Gather",
                "position_bias",
                &[&lookup, &idx],
                &[("axis", Attr::Int(0))],
            );
            let bias = st.g.op(
                "Gather",
                "position_bias",
                &[&bias_table, &b],
                &[("axis", Attr::Int(0))],
            );
            st.g.op(
                "Transpose",
                "position_bias",
                &[&bias],
                &[("perm", Attr::Ints(vec![2, 0, 1]))],
            )
        };
        Ok(Sym {
            name: n,
            dims: vec![heads, l[1], l[1]],
            elem: self.opts.compute,
            axes: vec![Axis::Fixed, like.axes[1].clone(), like.axes[1].clone()],
        })
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
        let len = |value: &str| Part {
            len: 5,
            dynamic: Some(DynSize {
                name: "len".into(),
                value: value.into(),
                axis: 1,
            }),
        };
        let three = Part {
            len: 3,
            dynamic: None,
        };
        assert_eq!(j.axes[1], Axis::Joined(vec![three.clone(), len("x")]));
        assert_eq!(j.axes[1].label(8), "3+len");
        assert_eq!(t.narrow(&j, 1, 0, 3).unwrap().axes[1], Axis::Fixed);
        assert_eq!(t.narrow(&j, 1, 0, 2).unwrap().axes[1], Axis::Fixed);
        assert_eq!(
            t.narrow(&j, 1, 3, 5).unwrap().axes[1],
            Axis::Dyn("len".into())
        );
        assert!(t.narrow(&j, 1, 1, 3).is_err());
        assert!(t.narrow(&x, 1, 0, 2).is_err());
        // Dynamic parts anywhere: narrowing to whole parts reads the bounds from the
        // parts' shapes.
        let k = t.concat(&[&x, &f, &x], 1).unwrap();
        assert_eq!(
            k.axes[1],
            Axis::Joined(vec![len("x"), three.clone(), len("x")])
        );
        assert_eq!(
            t.narrow(&k, 1, 0, 5).unwrap().axes[1],
            Axis::Dyn("len".into())
        );
        assert_eq!(t.narrow(&k, 1, 5, 3).unwrap().axes[1], Axis::Fixed);
        assert_eq!(
            t.narrow(&k, 1, 5, 8).unwrap().axes[1],
            Axis::Joined(vec![three, len("x")])
        );
        assert!(t.narrow(&k, 1, 6, 2).is_err());
        assert!(t.narrow(&k, 1, 0, 6).is_err());
    }

    #[test]
    fn spatial_axes_follow_patches_and_upsampling() {
        let t = tracer();
        let x = t.input(
            "x",
            ElemType::F32,
            &[2, 4, 6, 8],
            &[(0, "batch"), (2, "height"), (3, "width")],
        );
        let p = t.patchify(&x, 2).unwrap();
        assert_eq!(p.dims, [2, 12, 16]);
        assert_eq!(p.axes[1], Axis::Dyn("height/2*width/2".into()));
        let back = t.unpatchify(&p, 2, &x).unwrap();
        assert_eq!(
            (back.dims.clone(), back.axes.clone()),
            (x.dims.clone(), x.axes.clone())
        );
        let u = t
            .upsample_nearest2x(&t.upsample_nearest2x(&x).unwrap())
            .unwrap();
        assert_eq!(u.axes[2], Axis::Dyn("4*height".into()));
        // Merging dynamic axes in a reshape is still refused; patchify does it.
        assert!(t.reshape(&x, &[2, 4, 48]).is_err());
    }

    #[test]
    fn host_values_are_unavailable_and_uploads_recorded() {
        let t = tracer();
        let c = t.upload(&HostTensor::zeros(vec![2, 3])).unwrap();
        assert!(t.download(&c).is_err());
        assert_eq!(t.host_constants().len(), 1);
    }
}
