//! A small ONNX graph builder: nodes in topological order, initializers, unique names,
//! shared scalar constants.

use std::collections::{HashMap, HashSet};

use crate::proto::{
    self, AttributeProto, DimValue, Dimension, NodeProto, TensorProto, TensorShapeProto, TypeProto,
    TypeProtoTensor, ValueInfoProto, attribute_type, data_type,
};

/// Element types of graph values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    F16,
    Bf16,
    I64,
    I32,
    Bool,
    F8E4M3,
    F8E5M2,
}

impl ElemType {
    pub fn onnx(self) -> i32 {
        match self {
            Self::F32 => data_type::FLOAT,
            Self::F16 => data_type::FLOAT16,
            Self::Bf16 => data_type::BFLOAT16,
            Self::I64 => data_type::INT64,
            Self::I32 => data_type::INT32,
            Self::Bool => data_type::BOOL,
            Self::F8E4M3 => data_type::FLOAT8E4M3FN,
            Self::F8E5M2 => data_type::FLOAT8E5M2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "float32",
            Self::F16 => "float16",
            Self::Bf16 => "bfloat16",
            Self::I64 => "int64",
            Self::I32 => "int32",
            Self::Bool => "bool",
            Self::F8E4M3 => "float8e4m3fn",
            Self::F8E5M2 => "float8e5m2",
        }
    }

    /// Little-endian bytes of f32 values converted to this (floating-point) type.
    pub fn encode_f32(self, v: &[f32]) -> Vec<u8> {
        match self {
            Self::F16 => v
                .iter()
                .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                .collect(),
            Self::Bf16 => v
                .iter()
                .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
                .collect(),
            _ => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// One dimension of a graph input or output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dim {
    Fixed(usize),
    Named(String),
}

pub fn value_info(name: &str, elem: ElemType, dims: &[Dim]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            tensor_type: Some(TypeProtoTensor {
                elem_type: Some(elem.onnx()),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| Dimension {
                            value: Some(match d {
                                Dim::Fixed(n) => DimValue::DimValue(*n as i64),
                                Dim::Named(s) => DimValue::DimParam(s.clone()),
                            }),
                        })
                        .collect(),
                }),
            }),
        }),
        doc_string: None,
    }
}

/// A node attribute.
#[derive(Clone, Debug)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Str(String),
}

fn attribute(name: &str, a: &Attr) -> AttributeProto {
    let mut p = AttributeProto {
        name: Some(name.to_string()),
        ..Default::default()
    };
    match a {
        Attr::Int(i) => {
            p.i = Some(*i);
            p.r#type = Some(attribute_type::INT);
        }
        Attr::Ints(v) => {
            p.ints = v.clone();
            p.r#type = Some(attribute_type::INTS);
        }
        Attr::Float(f) => {
            p.f = Some(*f);
            p.r#type = Some(attribute_type::FLOAT);
        }
        Attr::Str(s) => {
            p.s = Some(s.as_bytes().to_vec());
            p.r#type = Some(attribute_type::STRING);
        }
    }
    p
}

#[derive(Default)]
pub struct Graph {
    pub nodes: Vec<NodeProto>,
    pub initializers: Vec<TensorProto>,
    pub inputs: Vec<ValueInfoProto>,
    names: HashSet<String>,
    counter: usize,
    scalars: HashMap<(ElemType, u64), String>,
    /// Total bytes of initializer data.
    pub initializer_bytes: usize,
}

impl Graph {
    /// A fresh value name derived from `hint`.
    pub fn fresh(&mut self, hint: &str) -> String {
        if self.names.insert(hint.to_string()) {
            return hint.to_string();
        }
        loop {
            self.counter += 1;
            let n = format!("{hint}_{}", self.counter);
            if self.names.insert(n.clone()) {
                return n;
            }
        }
    }

    /// Appends a node; returns its output names (fresh, derived from `hint`).
    pub fn node(
        &mut self,
        op: &str,
        hint: &str,
        inputs: &[&str],
        n_outputs: usize,
        attrs: &[(&str, Attr)],
    ) -> Vec<String> {
        let name = self.fresh(&format!("{hint}/{op}"));
        let outputs: Vec<String> = (0..n_outputs)
            .map(|i| {
                if n_outputs == 1 {
                    self.fresh(&format!("{hint}/{op}_out"))
                } else {
                    self.fresh(&format!("{hint}/{op}_out{i}"))
                }
            })
            .collect();
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: outputs.clone(),
            name: Some(name),
            op_type: Some(op.to_string()),
            attribute: attrs.iter().map(|(n, a)| attribute(n, a)).collect(),
            doc_string: None,
            domain: None,
        });
        outputs
    }

    /// A node with one output.
    pub fn op(&mut self, op: &str, hint: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        self.node(op, hint, inputs, 1, attrs).remove(0)
    }

    /// An initializer from raw little-endian bytes; returns its (fresh) name.
    pub fn initializer(
        &mut self,
        hint: &str,
        elem: ElemType,
        dims: &[usize],
        raw: Vec<u8>,
    ) -> String {
        let name = self.fresh(hint);
        self.initializer_bytes += raw.len();
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(elem.onnx()),
            name: Some(name.clone()),
            raw_data: Some(raw),
            ..Default::default()
        });
        name
    }

    pub fn const_i64(&mut self, hint: &str, v: &[i64], dims: &[usize]) -> String {
        let raw = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.initializer(hint, ElemType::I64, dims, raw)
    }

    /// A 1-D int64 constant.
    pub fn ints(&mut self, hint: &str, v: &[i64]) -> String {
        self.const_i64(hint, v, &[v.len()])
    }

    /// A floating-point constant of `elem` type.
    pub fn const_f(&mut self, hint: &str, elem: ElemType, v: &[f32], dims: &[usize]) -> String {
        let raw = elem.encode_f32(v);
        self.initializer(hint, elem, dims, raw)
    }

    /// A shared rank-0 constant.
    pub fn scalar(&mut self, elem: ElemType, v: f32) -> String {
        let key = (elem, u64::from(v.to_bits()));
        if let Some(n) = self.scalars.get(&key) {
            return n.clone();
        }
        let n = self.const_f(&format!("const_{}", elem.name()), elem, &[v], &[]);
        self.scalars.insert(key, n.clone());
        n
    }

    /// A shared rank-0 FP8 zero (the zero point of every FP8 Q/DQ).
    pub fn fp8_zero(&mut self, elem: ElemType, n: usize) -> String {
        let key = (elem, 1u64 << 40 | n as u64);
        if let Some(name) = self.scalars.get(&key) {
            return name.clone();
        }
        let dims: &[usize] = if n == 0 { &[] } else { &[n] };
        let name = self.initializer(
            &format!("zero_point_{}", elem.name()),
            elem,
            dims,
            vec![0u8; n.max(1)],
        );
        self.scalars.insert(key, name.clone());
        name
    }

    pub fn add_input(&mut self, name: &str, elem: ElemType, dims: &[Dim]) {
        self.names.insert(name.to_string());
        self.inputs.push(value_info(name, elem, dims));
    }

    pub fn into_graph(self, name: &str, outputs: Vec<ValueInfoProto>) -> proto::GraphProto {
        proto::GraphProto {
            node: self.nodes,
            name: Some(name.to_string()),
            initializer: self.initializers,
            doc_string: None,
            input: self.inputs,
            output: outputs,
            value_info: vec![],
        }
    }
}
