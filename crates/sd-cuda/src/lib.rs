//! The CUDA execution backend.
//!
//! * cudarc with `dynamic-loading`: this crate builds anywhere; libcuda, libnvrtc and
//!   libcublasLt are opened when [`CudaBackend::new`] runs, with a clear error naming the
//!   library that is missing.
//! * Linear layers run on cuBLASLt: BF16 x BF16 -> f32 (BF16 precision), FP8 E4M3
//!   weights x FP8 E4M3/E5M2 activations -> f32 (FP8 layers, "TN" layout, the activation
//!   scale as a device pointer in its own allocation), f32 x f32 (F32 precision). The
//!   bias, per-tensor FP8 weight scales and the BF16 output go through cuBLASLt's
//!   epilogue where it takes them; per-channel FP8 weight scales (refused by cuBLASLt's
//!   FP8 path on sm_90) through an epilogue kernel.
//! * Everything else runs on the project's kernels (`kernels/*.cu`), compiled by NVRTC.
//! * Tensors are device buffers of BF16 (BF16 and FP8 precision: every operation's output
//!   is rounded to bfloat16 with f32 accumulation, exactly the CPU backend's BF16 mode, so
//!   storing BF16 loses nothing and halves memory traffic) or f32 (F32 precision).
//!   Linear-layer inputs go to the tensor cores as BF16 / FP8.
//! * One owner thread per GPU holds the context (bound once), the stream, the cuBLASLt
//!   handle and its workspace; the `Backend` methods send it jobs and wait for them.

pub mod bundle;
mod channels_last;
mod conv;
mod error;
mod graphs;
pub mod kernels;
mod tuning;

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, mpsc};

use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
use sd_fp8::Fp8Format;
use sd_model::backend::{Activation, AttentionParams, Backend, Conv2dParams, LinearSpec};
use sd_model::plan::LinearQuant;
use sd_model::{HostTensor, ModelError, WeightTensor};

use channels_last::Layout;
pub use conv::{ConvPath, ConvStats};
pub use error::{CudaError, Result};
pub use graphs::GraphStats;
use graphs::graphs_from_env;
pub use kernels::{
    CompiledKernels, KERNEL_SOURCES, compile_kernels, compile_kernels_with, find_cuda_include,
    kernel_build_id, nvrtc_version,
};
pub use tuning::GemmAlgorithms;

/// What the non-FP8 work computes in, and whether FP8 layers are allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CudaPrecision {
    /// f32 everywhere (f32 GEMMs, no rounding): a GPU twin of the CPU FP32 mode. FP8
    /// plan entries run in FP8 (compute capability 8.9+), the rest in f32.
    F32,
    /// BF16 GEMMs, BF16-rounded outputs, f32 accumulation; FP8 plan entries refused.
    Bf16,
    /// As BF16, plus FP8 linear layers where the plan says (needs compute capability 8.9).
    Fp8,
}

/// Tensor storage: BF16 bits in BF16/FP8 precision (every value is BF16-rounded there,
/// so nothing is lost), f32 in F32 precision. Kernels get `r` = 1 for BF16 storage.
enum Storage {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// A device buffer that may be dropped on any thread: the context is made current on
/// the dropping thread first (the free is stream-ordered on the owner's stream). While
/// its stream records a CUDA graph, a drop on a thread that is not part of the recording
/// is deferred until the recording ends, so that its free does not land in the graph.
struct DeviceBuf(std::mem::ManuallyDrop<Storage>);

impl DeviceBuf {
    fn new(storage: Storage) -> Self {
        Self(std::mem::ManuallyDrop::new(storage))
    }
}

impl std::ops::Deref for DeviceBuf {
    type Target = Storage;
    fn deref(&self) -> &Storage {
        &self.0
    }
}

impl Storage {
    fn bind_context(&self) {
        let _ = match self {
            Storage::F32(s) => s.context().bind_to_thread(),
            Storage::Bf16(s) => s.context().bind_to_thread(),
        };
    }

    /// The stream the buffer was allocated on (its free is ordered there).
    fn stream_handle(&self) -> usize {
        match self {
            Storage::F32(s) => s.stream().cu_stream() as usize,
            Storage::Bf16(s) => s.stream().cu_stream() as usize,
        }
    }
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        // SAFETY: the storage is taken exactly once, here, and never touched again.
        let storage = unsafe { std::mem::ManuallyDrop::take(&mut self.0) };
        graphs::free_or_defer(storage);
    }
}

/// A device tensor: values in the backend's storage type (see [`CudaPrecision`]) and a
/// shape.
#[derive(Clone)]
pub struct CudaTensor {
    /// The logical shape (what the model sees: NCHW for images, whatever the layout).
    shape: Vec<usize>,
    buf: Arc<DeviceBuf>,
    /// How `buf` holds the values of `shape` (see `channels_last.rs`).
    layout: Layout,
}

impl CudaTensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether the tensor is a 4-D `[N, C, H, W]` held channels-last (NHWC) on the GPU.
    pub fn is_channels_last(&self) -> bool {
        self.layout == Layout::ChannelsLast
    }
}

enum LinearKind {
    F32 {
        w: CudaSlice<f32>,
    },
    /// BF16 bits, `[out, in]` row-major = cuBLASLt's column-major `[in, out]`, used
    /// transposed ("T" of TN).
    Bf16 {
        w: CudaSlice<u16>,
    },
    /// FP8 codes `[out, in]`, per-output-channel scales applied after the GEMM.
    Fp8 {
        w: CudaSlice<u8>,
        wscale: CudaSlice<f32>,
        act: Fp8Format,
        act_scale: f32,
        /// The activation scale, alone in its own allocation (cuBLASLt's B scale).
        act_scale_dev: CudaSlice<f32>,
        /// cuBLASLt's fast accumulation ([`Fp8Gemm::NativeFastAccum`]).
        fast_accum: bool,
    },
    /// Exact FP8 numerics on BF16 tensor cores: FP8 codes widened to BF16 (exact), full
    /// f32 accumulation, `alpha` = activation scale, per-channel scales after the GEMM.
    Fp8ViaBf16 {
        w: CudaSlice<u16>,
        wscale: CudaSlice<f32>,
        act: Fp8Format,
        act_scale: f32,
    },
    /// Weight-only FP8 (W8A16): E4M3 codes `[out, in]` with per-channel scales, the
    /// input unquantized; run by the `linear_w8a16` GEMV (few input rows: adaLN), or for
    /// many rows dequantized to a BF16 temporary for a BF16 GEMM.
    Fp8WeightOnly {
        w: CudaSlice<u8>,
        wscale: CudaSlice<f32>,
    },
    /// FP8 numerics on an f32 GEMM (dequantized weights, fake-quantized inputs), for
    /// shapes cuBLASLt's FP8 path does not take (in or out features not multiples of 16).
    Fp8Emulated {
        w: CudaSlice<f32>,
        act: Fp8Format,
        act_scale: f32,
    },
}

/// A prepared linear layer.
pub struct CudaLinear {
    pub spec: LinearSpec,
    kind: LinearKind,
    bias: Option<CudaSlice<f32>>,
    /// The bias as BF16 (exact: it holds BF16 values), made on first use by cuBLASLt's
    /// bias epilogue, whose bias type follows the BF16 output.
    bias16: std::sync::OnceLock<CudaSlice<u16>>,
    /// FP8 layers whose per-channel weight scales are all equal: that scale alone in its
    /// own allocation (a cuBLASLt scalar A scale); None otherwise. Made on first use.
    wscale_uniform: std::sync::OnceLock<Option<CudaSlice<f32>>>,
}

impl Drop for CudaLinear {
    fn drop(&mut self) {
        // Runs before the fields' own drops: their frees need a current context.
        if let Some(b) = &self.bias {
            let _ = b.context().bind_to_thread();
        }
        let ctx = match &self.kind {
            LinearKind::F32 { w } | LinearKind::Fp8Emulated { w, .. } => w.context(),
            LinearKind::Bf16 { w } | LinearKind::Fp8ViaBf16 { w, .. } => w.context(),
            LinearKind::Fp8 { w, .. } | LinearKind::Fp8WeightOnly { w, .. } => w.context(),
        };
        let _ = ctx.bind_to_thread();
    }
}

impl CudaLinear {
    /// "f32", "bf16", "fp8 e4m3xe4m3", "fp8 e4m3xe5m2", "fp8-emulated ..."
    pub fn kind_name(&self) -> String {
        match &self.kind {
            LinearKind::F32 { .. } => "f32".into(),
            LinearKind::Bf16 { .. } => "bf16".into(),
            LinearKind::Fp8 { act, act_scale, .. } => {
                format!("fp8 e4m3x{} (activation scale {act_scale})", act.name())
            }
            LinearKind::Fp8Emulated { act, .. } => format!("fp8-emulated e4m3x{}", act.name()),
            LinearKind::Fp8ViaBf16 { act, .. } => format!("fp8-via-bf16 e4m3x{}", act.name()),
            LinearKind::Fp8WeightOnly { .. } => "fp8 weight-only e4m3 (w8a16)".into(),
        }
    }
}

struct Blas {
    handle: ltsys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
}

// SAFETY: the handle is only used under the backend's mutex, with the context bound.
unsafe impl Send for Blas {}

impl Drop for Blas {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: created by create_handle, destroyed once.
            let _ = unsafe { lt::destroy_handle(self.handle) };
        }
    }
}

const WORKSPACE_BYTES: usize = 32 << 20;
const THREADS: u32 = 256;

/// Every kernel the backend launches, by module.
/// Widest rows `layer_norm_modulate_warp_bf16x8` takes (32 lanes x LN_CPL = 10 chunks
/// of 8 values, kernels/norm.cu): SD3.5-medium's 1536 and -large's 2432 channels.
const LN_WARP_MAX_CHANNELS: usize = 32 * 10 * 8;

/// `unary_*` kernels' op code of GELU with the tanh approximation (kernels/elementwise.cu).
const UNARY_GELU_TANH: i32 = 3;

/// Input rows up to which a weight-only FP8 layer runs as the `linear_w8a16` GEMV (it
/// reads the weights once per 4 rows; past this a BF16 GEMM on dequantized weights wins).
const W8A16_MAX_ROWS: usize = 16;

/// The kernels [`CudaBackend::new`] looks up in the compiled modules (CI checks that
/// each is an entry of the PTX).
pub fn kernel_names() -> &'static [&'static str] {
    KERNEL_NAMES
}

const KERNEL_NAMES: &[&str] = &[
    "unary_f32",
    "binary_f32",
    "modulate_f32",
    "gated_add_f32",
    "linear_epilogue_f32",
    "channel_bias_f32",
    "channel_fill",
    "f32_to_bf16",
    "layer_norm_f32",
    "layer_norm_modulate_f32",
    "rms_norm_f32",
    "group_norm_f32",
    "attention_pl1",
    "attention_pl2",
    "attention_pl4",
    "attention_pl8",
    "attention_pl16",
    "attention_pl32",
    "flash_attn_d64",
    "flash_attn_d64_w8m2",
    "flash_attn_d64_w4m2",
    "flash_wg2_n128",
    "flash_wg3_n128",
    "flash_wg2_n64",
    "flash_wg2_n128_ov",
    "flash_wg3_n128_ov",
    "flash_tma2_n128",
    "flash_tma3_n128",
    "flash_tma2_n128_pp",
    "flash_tma3_n128_pp",
    "linear_w8a16",
    "quantize_fp8_dev_x8",
    "rms_norm_row64_bf16",
    "gated_add_bf16x8",
    "layer_norm_modulate_bf16x8",
    "layer_norm_modulate_warp_bf16x8",
    "gated_add_layer_norm_modulate_warp_bf16x8",
    "fp8_rows_to_bf16",
    "rms_norm_warp_f32",
    "group_norm_sum",
    "group_norm_var",
    "group_norm_apply",
    "im2col_bf16",
    "softmax_rows_bf16",
    "quantize_fp8",
    "quantize_fp8_dev",
    "dequantize_fp8",
    "fp8_to_bf16",
    "copy2d_f32",
    "split_last_f32",
    "permute_f32",
    "upsample2x_f32",
    "upsample2x_nhwc_bf16x8",
    "group_norm_nhwc_stats",
    "group_norm_nhwc_finalize",
    "group_norm_nhwc_apply",
    "gather_rows_f32",
    "im2col_f32",
];

/// What a cuDNN convolution's output holds before the convolution is added into it.
#[derive(Clone, Copy)]
enum ConvFill<'a> {
    /// Nothing (beta = 0).
    Nothing,
    /// The bias, broadcast over the pixels.
    Bias(&'a CudaTensor),
    /// A residual of the output's shape and layout, plus the bias if any.
    Residual {
        residual: &'a CudaTensor,
        bias: Option<&'a CudaTensor>,
    },
}

/// A kernel argument.
#[derive(Clone, Copy)]
enum Arg {
    P(u64),
    I(i32),
    U(u64),
    L(i64),
    F(f32),
    /// A TMA tensor map, passed by value (`const __grid_constant__ SdTmaDesc`).
    Tma(TmaDesc),
    /// Up to 16 device pointers, passed by value (`const __grid_constant__ SdPtrs16`).
    Ptrs(PtrArray),
}

/// The most outputs one `split_last_f32` launch writes.
const SPLIT_MAX_PARTS: usize = 16;

/// Device pointers by value (the kernels' `SdPtrs16`), unused entries zero.
#[derive(Clone, Copy)]
#[repr(C)]
struct PtrArray([u64; SPLIT_MAX_PARTS]);

// SAFETY: plain integers, the layout of the kernels' `SdPtrs16`.
unsafe impl cudarc::driver::DeviceRepr for PtrArray {}

/// A tensor-memory-accelerator descriptor (`CUtensorMap`: 128 opaque bytes, 64-byte
/// aligned), as the flash_tma kernels take it by value.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct TmaDesc([u64; 16]);

// SAFETY: plain bytes, the layout of the kernels' `SdTmaDesc` (and of CUtensorMap).
unsafe impl cudarc::driver::DeviceRepr for TmaDesc {}

/// GEMM in cuBLASLt's column-major terms: `D[m, n] = op(A)[m, k] op(B)[k, n]`.
#[derive(Clone, Copy)]
struct Gemm {
    transa: bool,
    transb: bool,
    m: u64,
    n: u64,
    k: u64,
    a: u64,
    a_type: ltsys::cudaDataType,
    lda: i64,
    b: u64,
    b_type: ltsys::cudaDataType,
    ldb: i64,
    d: u64,
    ldd: i64,
    /// 0 = none
    b_scale: u64,
    alpha: f32,
    /// Work cuBLASLt does in its epilogue instead of a separate kernel.
    epi: GemmEpilogue,
    /// Several GEMMs of one shape in one launch (attention heads).
    batch: GemmBatch,
    /// FP8 only: `CUBLASLT_MATMUL_DESC_FAST_ACCUM` = 1 (see [`Fp8Gemm::NativeFastAccum`]).
    fast_accum: bool,
}

/// A strided batch: `count` GEMMs, the i-th reading A, B and writing D at `i * stride_*`
/// elements from the given pointers (cuBLASLt's `STRIDED_BATCH_OFFSET`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GemmBatch {
    count: i32,
    stride_a: i64,
    stride_b: i64,
    stride_d: i64,
}

impl GemmBatch {
    const ONE: Self = Self {
        count: 1,
        stride_a: 0,
        stride_b: 0,
        stride_d: 0,
    };
}

/// The largest power of two (up to cuBLASLt's default assumption of 256) that divides
/// every byte address one operand of a strided batch takes: base + i * stride.
fn batch_alignment(ptr: u64, stride_elems: i64, elem_bytes: u64) -> u32 {
    let stride = stride_elems.unsigned_abs() * elem_bytes;
    let combined = ptr | stride | 256;
    1 << combined.trailing_zeros().min(8)
}

fn dtype_bytes(t: ltsys::cudaDataType) -> u64 {
    match t {
        ltsys::cudaDataType::CUDA_R_32F => 4,
        ltsys::cudaDataType::CUDA_R_16BF | ltsys::cudaDataType::CUDA_R_16F => 2,
        _ => 1,
    }
}

/// A fused GEMM epilogue: `D = round(alpha * a_scale[m] * b_scale * (A B) + bias[m])`
/// written as `d_type` (BF16 in BF16/FP8 precision: the tensor itself, no f32
/// intermediate and no epilogue kernel).
#[derive(Clone, Copy)]
struct GemmEpilogue {
    /// `CUDA_R_32F` = a plain f32 D and nothing fused (the other fields unused).
    d_type: ltsys::cudaDataType,
    /// Per-row (output channel) f32 scales of A (`OUTER_VEC_32F`), 0 = none. cuBLASLt
    /// takes outer-vector scaling only with both operands in that mode, so it goes
    /// with `b_scale_vec`.
    a_scale_vec: u64,
    /// Per-column (token row) f32 scales of B (`OUTER_VEC_32F`): the per-tensor
    /// activation scale repeated, 0 = none.
    b_scale_vec: u64,
    /// Per-row f32 alpha (`ALPHA_DEVICE_VECTOR_BETA_ZERO`), 0 = none.
    alpha_vec: u64,
    /// A scalar f32 A scale (device pointer, its own allocation), 0 = none.
    a_scale: u64,
    /// Bias per row of D (output channel) in D's type, 0 = none.
    bias: u64,
    /// GELU (tanh approximation, cuBLASLt's) after the bias.
    gelu: bool,
}

impl Default for GemmEpilogue {
    fn default() -> Self {
        Self {
            d_type: ltsys::cudaDataType::CUDA_R_32F,
            a_scale_vec: 0,
            b_scale_vec: 0,
            alpha_vec: 0,
            a_scale: 0,
            bias: 0,
            gelu: false,
        }
    }
}

impl GemmEpilogue {
    fn is_fused(&self) -> bool {
        self.d_type != ltsys::cudaDataType::CUDA_R_32F
            || self.a_scale_vec != 0
            || self.alpha_vec != 0
            || self.a_scale != 0
            || self.bias != 0
            || self.gelu
    }
}

/// How FP8 linear layers run on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Fp8Gemm {
    /// cuBLASLt FP8 tensor-core GEMMs with cuBLASLt's default accumulation
    /// (`FAST_ACCUM` = 0): on Hopper the FP8 tensor cores accumulate with less than f32
    /// precision inside a K block, and the partial sums are promoted to f32 between blocks.
    #[default]
    Native,
    /// The same GEMMs with `FAST_ACCUM` = 1: the tensor cores' own accumulator over the
    /// whole K (no promotion passes), as TensorRT and inference FP8 GEMMs run. Faster;
    /// the sums carry the accumulator's reduced precision over the whole K.
    NativeFastAccum,
    /// The same FP8 codes widened to BF16 (exact) on BF16 tensor cores with f32
    /// accumulation: the CPU simulation's numerics, at BF16 speed. For validation.
    ExactViaBf16,
}

impl Fp8Gemm {
    pub const ALL: [Fp8Gemm; 3] = [Self::Native, Self::NativeFastAccum, Self::ExactViaBf16];

    /// The mode named by `SD_CUDA_FP8_GEMM` (`native`, `fast-accum` or `exact-via-bf16`),
    /// else [`Fp8Gemm::Native`]: the starting mode of every new backend.
    pub fn from_env() -> Result<Self> {
        match std::env::var("SD_CUDA_FP8_GEMM") {
            Err(_) => Ok(Self::default()),
            Ok(v) => Self::parse(&v),
        }
    }

    /// Parses a mode's name (as [`Fp8Gemm::name`] writes it).
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|m| m.name()).collect();
                bad(format!(
                    "FP8 GEMM mode {name:?}: expected one of {}",
                    names.join(", ")
                ))
            })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::NativeFastAccum => "fast-accum",
            Self::ExactViaBf16 => "exact-via-bf16",
        }
    }
}

/// The GPU state, owned by the backend's worker thread.
struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    blas: Mutex<Blas>,
    precision: CudaPrecision,
    gpu: String,
    cc: (i32, i32),
    /// The kernels were built for sm_90a on a 9.0 GPU: the wgmma flash kernels run.
    hopper: bool,
    build_id: String,
    fp8_gemm: std::cell::Cell<Fp8Gemm>,
    /// Flash attention for head dim 64 without mask or bias, batched-GEMM attention
    /// with a bias (BF16/FP8 precision); `SD_CUDA_ATTENTION=exact` keeps the exact
    /// kernel for both.
    flash: std::cell::Cell<bool>,
    /// Per-operation timing (`CudaBackend::set_profiling`).
    profile: std::cell::RefCell<Option<Profile>>,
    /// A finer profile key set by the running operation (linear layers: kind + shape).
    op_key: std::cell::Cell<Option<String>>,
    /// The last FP8-quantized linear input: q, k and v projections of one tensor with
    /// the same activation scale share one quantization. Holding the source buffer
    /// keeps its address from being reused while the entry lives.
    quant_cache: std::cell::RefCell<Option<QuantCache>>,
    /// Linear layers through cuBLASLt's fused epilogue, per way (see `linear_impl`):
    /// None = not tried yet, Some(true) = works, Some(false) = refused (the reason is
    /// kept). `SD_CUDA_FUSED_EPILOGUE=0` starts them all at Some(false).
    /// Per epilogue way (see `linear_impl`; ways 4..8 are ways 0..4 with GELU fused).
    fused_epilogue: std::cell::Cell<[Option<bool>; 8]>,
    fused_epilogue_error: std::cell::RefCell<[Option<String>; 8]>,
    /// cuBLASLt algorithms chosen per GEMM problem (by the heuristic, by timing when
    /// `tune_gemms` is on, or given by an engine bundle; see `tuning.rs`).
    algo_cache: std::cell::RefCell<HashMap<String, ltsys::cublasLtMatmulAlgo_t>>,
    tune_gemms: std::cell::Cell<bool>,
    /// Outer-vector B scales (an activation scale repeated per token row), by (scale
    /// bits, rows); see `act_scale_vec`.
    act_scale_vecs: std::cell::RefCell<HashMap<(u32, usize), CudaSlice<f32>>>,
    /// The device's default stream-ordered memory pool (every allocation comes from it).
    pool: cudarc::driver::sys::CUmemoryPool,
    /// Bytes of parameters uploaded (linear weights, their scales and biases, other
    /// parameters).
    param_bytes: std::cell::Cell<u64>,
    /// cuDNN for the BF16 convolutions (opened at the first one; see `conv.rs`).
    cudnn: std::cell::RefCell<conv::CudnnState>,
    /// Where BF16 convolutions run, and so whether 4-D parameters (convolution filters)
    /// are uploaded channels-last (`SD_CUDA_CONV`, `CudaBackend::set_conv_path`).
    conv_path: std::cell::Cell<ConvPath>,
    /// Replayable forwards run as CUDA graphs (`SD_CUDA_GRAPHS`,
    /// `CudaBackend::set_cuda_graphs`; see `graphs.rs`).
    graphs_on: std::cell::Cell<bool>,
    graphs: std::cell::RefCell<graphs::Graphs>,
    /// (graph launches, captures) so far.
    graph_counts: std::cell::Cell<(u64, u64)>,
    /// A stream capture is recording: first-use allocations and host copies refuse.
    capturing: std::cell::Cell<bool>,
}

/// Sets one cuBLASLt matmul-descriptor attribute to `value`, passing the value's own
/// size (every attribute is a plain C scalar or pointer of the type given).
///
/// # Safety
/// `desc` must be a live descriptor and `T` the attribute's C type.
unsafe fn set_desc<T>(
    desc: ltsys::cublasLtMatmulDesc_t,
    attr: ltsys::cublasLtMatmulDescAttributes_t,
    value: &T,
) -> Result<()> {
    // SAFETY: per the caller's contract; the pointer and size describe `value`.
    unsafe {
        lt::set_matmul_desc_attribute(
            desc,
            attr,
            value as *const T as *const c_void,
            std::mem::size_of::<T>(),
        )?;
    }
    Ok(())
}

fn default_pool(ctx: &CudaContext) -> Result<cudarc::driver::sys::CUmemoryPool> {
    let mut pool = std::ptr::null_mut();
    // SAFETY: out-pointer to a pool handle of this context's device.
    unsafe { cudarc::driver::sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()? };
    Ok(pool)
}

/// Tilings of the head-dim-64 flash-attention kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashVariant {
    /// 8 warps x 16 query rows (128 per block).
    W8M1 = 0,
    /// 8 warps x 32 query rows (256 per block): each K/V fragment feeds two MMAs.
    W8M2 = 1,
    /// 4 warps x 32 query rows (128 per block).
    W4M2 = 2,
    /// Hopper warpgroup MMA (sm_90a): 2 warpgroups x 64 query rows, 128-key tiles.
    Wg2N128 = 3,
    /// Hopper warpgroup MMA: 3 warpgroups x 64 query rows, 128-key tiles.
    Wg3N128 = 4,
    /// Hopper warpgroup MMA: 2 warpgroups x 64 query rows, 64-key tiles.
    Wg2N64 = 5,
    /// As `Wg2N128`, with each warpgroup's softmax overlapping its own P V MMAs
    /// (software-pipelined over three K/V stages).
    Wg2N128Overlap = 6,
    /// As `Wg3N128`, softmax overlapping the MMAs.
    Wg3N128Overlap = 7,
    /// Warp-specialized (FlashAttention-3's layout): a producer warpgroup loads K/V
    /// tiles with the tensor memory accelerator into 3 stages handed over through
    /// mbarriers; 2 consumer warpgroups x 64 query rows that never wait for each other.
    Tma2N128 = 8,
    /// As `Tma2N128` with 3 consumer warpgroups (192 query rows per block).
    Tma3N128 = 9,
    /// As `Tma2N128`, the consumers taking turns on the tensor cores (FlashAttention-3's
    /// ping-pong schedule: one's softmax runs while the other's MMAs do).
    Tma2N128Pingpong = 10,
    /// As `Tma3N128`, taking turns in a cycle of three.
    Tma3N128Pingpong = 11,
}

/// Keys per K/V tile of the flash_tma kernels (the box of their tensor maps).
const FLASH_TMA_KEYS: u32 = 128;

/// A flash kernel's launch shape.
#[derive(Clone, Copy, Debug)]
struct FlashKernel {
    name: &'static str,
    /// Query rows per block.
    rows: usize,
    threads: u32,
    /// Dynamic shared memory (the wgmma kernels' double-buffered, 1024-byte aligned
    /// K/V tiles); the mma.sync kernels use static shared memory.
    shared_bytes: u32,
    /// Takes the two-segment (joint) argument list and needs sm_90a.
    wgmma: bool,
    /// Reads K/V through TMA tensor maps (the flash_tma kernels' argument list).
    tma: bool,
}

impl FlashVariant {
    pub const ALL: [FlashVariant; 12] = [
        Self::W8M1,
        Self::W8M2,
        Self::W4M2,
        Self::Wg2N128,
        Self::Wg3N128,
        Self::Wg2N64,
        Self::Wg2N128Overlap,
        Self::Wg3N128Overlap,
        Self::Tma2N128,
        Self::Tma3N128,
        Self::Tma2N128Pingpong,
        Self::Tma3N128Pingpong,
    ];
    fn kernel(self) -> FlashKernel {
        let mma_sync = |name, rows, threads| FlashKernel {
            name,
            rows,
            threads,
            shared_bytes: 0,
            wgmma: false,
            tma: false,
        };
        // K and V tiles of `keys` rows of 128 bytes, `stages` of each, plus the slack
        // that lets the kernel align them to 1024 bytes.
        let wgmma = |name, warpgroups: usize, keys: u32, stages: u32| FlashKernel {
            name,
            rows: 64 * warpgroups,
            threads: 128 * warpgroups as u32,
            shared_bytes: 2 * stages * keys * 128 + 1024,
            wgmma: true,
            tma: false,
        };
        // `stages` K/V tile pairs of 128 keys, one 64-row Q tile per consumer warpgroup,
        // three mbarriers per stage, and the alignment slack; a producer warpgroup more.
        let tma = |name, consumers: usize, stages: u32| FlashKernel {
            name,
            rows: 64 * consumers,
            threads: 128 * (consumers as u32 + 1),
            shared_bytes: 2 * stages * FLASH_TMA_KEYS * 128
                + consumers as u32 * 64 * 128
                + 3 * stages * 8
                + 1024,
            wgmma: true,
            tma: true,
        };
        match self {
            Self::W8M1 => mma_sync("flash_attn_d64", 128, 256),
            Self::W8M2 => mma_sync("flash_attn_d64_w8m2", 256, 256),
            Self::W4M2 => mma_sync("flash_attn_d64_w4m2", 128, 128),
            Self::Wg2N128 => wgmma("flash_wg2_n128", 2, 128, 2),
            Self::Wg3N128 => wgmma("flash_wg3_n128", 3, 128, 2),
            Self::Wg2N64 => wgmma("flash_wg2_n64", 2, 64, 2),
            Self::Wg2N128Overlap => wgmma("flash_wg2_n128_ov", 2, 128, 3),
            Self::Wg3N128Overlap => wgmma("flash_wg3_n128_ov", 3, 128, 3),
            Self::Tma2N128 => tma("flash_tma2_n128", 2, 3),
            Self::Tma3N128 => tma("flash_tma3_n128", 3, 3),
            Self::Tma2N128Pingpong => tma("flash_tma2_n128_pp", 2, 3),
            Self::Tma3N128Pingpong => tma("flash_tma3_n128_pp", 3, 3),
        }
    }
    pub fn name(self) -> &'static str {
        self.kernel().name
    }
    /// Whether the variant runs only on Hopper (sm_90a kernels).
    pub fn needs_hopper(self) -> bool {
        self.kernel().wgmma
    }
}

/// 255 = not chosen yet (then `SD_CUDA_FLASH_VARIANT` = 0..11, else the default: on a
/// GPU with sm_90a kernels [`DEFAULT_HOPPER_FLASH`], elsewhere W8M2, the fastest
/// mma.sync tiling).
static FLASH_VARIANT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(255);

/// The flash tiling a Hopper GPU uses unless told otherwise: the fastest on the H100 at
/// SD3.5-medium's joint attention (the TMA producer with three consumer warpgroups:
/// 0.564-0.583 ms, 413-427 TFLOP/s, against 0.571-0.617 for its ping-pong twin,
/// 0.672-0.852 with two consumers and 0.797-0.802 for `Wg3N128`, the default before;
/// benchmarks/README.md).
const DEFAULT_HOPPER_FLASH: FlashVariant = FlashVariant::Tma3N128;

/// Chooses the flash-attention tiling for every backend of this process (a Hopper-only
/// tiling falls back to W8M2 on other GPUs).
pub fn set_flash_variant(v: FlashVariant) {
    FLASH_VARIANT.store(v as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The flash-attention tiling chosen for this process, if any (`set_flash_variant` or
/// `SD_CUDA_FLASH_VARIANT`).
fn chosen_flash_variant() -> Option<FlashVariant> {
    let v = match FLASH_VARIANT.load(std::sync::atomic::Ordering::Relaxed) {
        255 => std::env::var("SD_CUDA_FLASH_VARIANT")
            .ok()
            .and_then(|s| s.parse::<u8>().ok())?,
        v => v,
    };
    FlashVariant::ALL.get(v as usize).copied()
}

/// The flash-attention tiling in use on a GPU with (`hopper` = true) or without sm_90a
/// kernels.
pub fn flash_variant_for(hopper: bool) -> FlashVariant {
    match chosen_flash_variant() {
        Some(v) if hopper || !v.needs_hopper() => v,
        Some(_) => FlashVariant::W8M2,
        None if hopper => DEFAULT_HOPPER_FLASH,
        None => FlashVariant::W8M2,
    }
}

/// The flash-attention tiling in use on a Hopper GPU.
pub fn flash_variant() -> FlashVariant {
    flash_variant_for(true)
}

/// The tensor map of a BF16 `[batch, seq, heads * 64]` key or value tensor at `ptr`, as
/// the flash_tma kernels read it: boxes of one head (64 values, 128 bytes) by
/// [`FLASH_TMA_KEYS`] rows of one batch entry, in the 128-byte swizzle their wgmma
/// descriptors name, rows past `seq` zero-filled.
fn tma_kv_map(ptr: u64, seq: usize, heads: usize, batch: usize) -> Result<TmaDesc> {
    use cudarc::driver::sys as ds;
    let row_bytes = (heads * 64 * 2) as u64;
    let dims: [u64; 3] = [(heads * 64) as u64, seq as u64, batch as u64];
    // Byte strides of dimensions 1 and 2 (dimension 0 is contiguous).
    let strides: [u64; 2] = [row_bytes, row_bytes * seq as u64];
    let boxes: [u32; 3] = [64, FLASH_TMA_KEYS, 1];
    let steps: [u32; 3] = [1, 1, 1];
    let mut map = std::mem::MaybeUninit::<ds::CUtensorMap>::zeroed();
    // SAFETY: every array has the rank's length (strides rank - 1); `ptr` is a live
    // device allocation of batch * seq rows of `row_bytes`; the map is plain bytes.
    unsafe {
        ds::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            ds::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            steps.as_ptr(),
            ds::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            ds::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            ds::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            ds::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .map_err(|e| {
            CudaError::Driver(format!(
                "flash attention: tensor map of [{batch}, {seq}, {heads}x64] at {ptr:#x}: {e:?}"
            ))
        })?;
        Ok(TmaDesc(map.assume_init().opaque))
    }
}

/// GPU memory figures (bytes).
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryStats {
    /// The pool's high-water mark of memory in use since the last reset.
    pub peak_used: u64,
    /// Memory in use from the pool now.
    pub used: u64,
    /// The pool's reserved high-water mark (what the driver handed it).
    pub peak_reserved: u64,
    /// Device-wide free and total memory (`cuMemGetInfo`).
    pub device_free: u64,
    pub device_total: u64,
    /// Parameter bytes uploaded by `load_linear` / `load_param`.
    pub param_bytes: u64,
    /// CUDA graphs' own allocations (the activations of a replayed step, which do not
    /// come from the pool): the high-water mark since the last reset, and what the
    /// driver holds for them now.
    pub graph_peak_used: u64,
    pub graph_reserved: u64,
}

struct QuantCache {
    src: Arc<DeviceBuf>,
    n: usize,
    scale_bits: u32,
    format: i32,
    codes: Arc<CudaSlice<u8>>,
}

/// FP8 input codes a norm kernel writes along with its output (the next linear layer's
/// input quantization in the same pass), then handed to the linear layer through the
/// quantization cache.
struct FusedCodes<'a> {
    codes: Arc<CudaSlice<u8>>,
    n: usize,
    scale: f32,
    scale_dev: &'a CudaSlice<f32>,
    format: Fp8Format,
}

impl FusedCodes<'_> {
    /// The kernel's `q, qscale, qfmt` arguments.
    fn args(&self, inner: &Inner) -> [Arg; 3] {
        [
            Arg::P(inner.ptr(&*self.codes)),
            Arg::P(inner.ptr(self.scale_dev)),
            Arg::I(fmt_code(self.format)),
        ]
    }

    /// Makes the codes the quantization of `output` for every FP8 linear layer with this
    /// scale and format (the same entry `linear_impl` would have made quantizing it).
    fn remember_for(self, inner: &Inner, output: &CudaTensor) {
        *inner.quant_cache.borrow_mut() = Some(QuantCache {
            src: output.buf.clone(),
            n: self.n,
            scale_bits: self.scale.to_bits(),
            format: fmt_code(self.format),
            codes: self.codes,
        });
    }
}

/// `<sd_cuda::CudaBackend as ..::Backend>::layer_norm::{{closure}}` -> `layer_norm`.
fn op_name(closure: &str) -> String {
    let s = closure.trim_end_matches("::{{closure}}");
    s.rsplit("::").next().unwrap_or(s).to_string()
}

/// GPU time per operation kind (timing events around each operation), summed.
#[derive(Default)]
struct Profile {
    ops: HashMap<String, (u64, f64)>,
    /// Events around operations not yet read back: (operation, start, end).
    pending: Vec<(String, cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>,
}

impl Profile {
    /// Adds the GPU time of every pending operation (synchronises on the last event).
    fn settle(&mut self) {
        for (key, start, end) in self.pending.drain(..) {
            let ms = end
                .synchronize()
                .and_then(|_| start.elapsed_ms(&end))
                .map_or(0.0, f64::from);
            let e = self.ops.entry(key).or_insert((0, 0.0));
            e.0 += 1;
            e.1 += ms;
        }
    }
}

fn fmt_code(f: Fp8Format) -> i32 {
    match f {
        Fp8Format::E4M3 => 0,
        Fp8Format::E5M2 => 1,
    }
}

fn fp8_type(f: Fp8Format) -> ltsys::cudaDataType {
    match f {
        Fp8Format::E4M3 => ltsys::cudaDataType::CUDA_R_8F_E4M3,
        Fp8Format::E5M2 => ltsys::cudaDataType::CUDA_R_8F_E5M2,
    }
}

fn bad(msg: impl Into<String>) -> CudaError {
    CudaError::Invalid(msg.into())
}

fn round_host(v: &mut [f32]) {
    for x in v {
        *x = sd_model::tensor::round_bf16(*x);
    }
}

/// An FP8 weight as the GPU takes it: E4M3 codes `[out, in]` row-major, which is the
/// transposed "A" of cuBLASLt's TN layout (`Y^T = W X^T` in column-major terms, so no
/// transpose is needed), and one scale per output channel (a per-tensor scale repeated).
#[derive(Clone, Debug, PartialEq)]
pub struct PackedFp8Weight {
    pub codes: Vec<u8>,
    pub scales: Vec<f32>,
}

/// Quantizes a `[out, in]` weight (already BF16-rounded where the backend computes in
/// BF16) exactly as the CPU simulation does (`sd_fp8::quantize_slice`, per row). Engine
/// bundles store these bytes; [`Backend::load_linear`] produces the same ones.
pub fn pack_fp8_weight(
    weight: &[f32],
    out: usize,
    inp: usize,
    q: &sd_model::WeightQuant,
) -> PackedFp8Weight {
    let scales: Vec<f32> = if q.scales.len() == 1 {
        vec![q.scales[0]; out]
    } else {
        q.scales.clone()
    };
    let mut codes = vec![0u8; out * inp];
    let pack = |first: usize, w: &[f32], c: &mut [u8]| {
        for (o, (row, dst)) in w.chunks(inp).zip(c.chunks_mut(inp)).enumerate() {
            sd_fp8::quantize_slice(q.format, row, scales[first + o], dst);
        }
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(16);
    if out * inp < (1 << 20) || threads < 2 || inp == 0 {
        pack(0, weight, &mut codes);
    } else {
        // Rows are independent: split them over threads (same bytes as serial).
        let rows_per = out.div_ceil(threads);
        std::thread::scope(|sc| {
            for (i, (w, c)) in weight
                .chunks(rows_per * inp)
                .zip(codes.chunks_mut(rows_per * inp))
                .enumerate()
            {
                let pack = &pack;
                sc.spawn(move || pack(i * rows_per, w, c));
            }
        });
    }
    PackedFp8Weight { codes, scales }
}

/// Refuses pre-packed codes that do not fit the layer the model is loading (a bundle
/// whose payload and plan disagree); per-tensor scales are widened per channel.
fn check_packed(
    spec: &LinearSpec,
    mut p: PackedFp8Weight,
    q: &sd_model::WeightQuant,
) -> Result<PackedFp8Weight> {
    let (out, inp) = (spec.out_features, spec.in_features);
    if p.codes.len() != out * inp {
        return Err(bad(format!(
            "layer {}: the engine's FP8 weight has {} codes, the layer needs {out} x {inp}",
            spec.name,
            p.codes.len()
        )));
    }
    let planned: Vec<f32> = if q.scales.len() == 1 {
        vec![q.scales[0]; out]
    } else {
        q.scales.clone()
    };
    if p.scales.len() == 1 {
        p.scales = vec![p.scales[0]; out];
    }
    if p.scales != planned {
        return Err(bad(format!(
            "layer {}: the engine's FP8 weight scales differ from its precision plan",
            spec.name
        )));
    }
    Ok(p)
}

/// Checks that libcuda, libnvrtc and libcublasLt can be opened.
pub fn check_libraries() -> Result<()> {
    // SAFETY: these only try to dlopen the libraries.
    unsafe {
        if !cudarc::driver::sys::is_culib_present() {
            return Err(CudaError::missing_library("cuda"));
        }
        if !cudarc::nvrtc::sys::is_culib_present() {
            return Err(CudaError::missing_library("nvrtc"));
        }
        if !ltsys::is_culib_present() {
            return Err(CudaError::missing_library("cublasLt"));
        }
    }
    Ok(())
}

/// The NVRTC architecture for a compute capability (`sm_89`, `sm_90a`). Hopper (9.0)
/// gets its architecture-specific target: the warpgroup MMA (`wgmma`) of the flash
/// attention exists only there.
pub fn arch_for(cc: (i32, i32)) -> String {
    let suffix = if cc == (9, 0) { "a" } else { "" };
    format!("sm_{}{}{suffix}", cc.0, cc.1)
}

impl Inner {
    /// Runs on the worker thread: the context is created and bound there.
    fn open(
        ordinal: usize,
        precision: CudaPrecision,
        kernels: Option<CompiledKernels>,
    ) -> Result<Self> {
        check_libraries()?;
        let ctx = CudaContext::new(ordinal)?;
        ctx.bind_to_thread()?;
        let cc = ctx.compute_capability()?;
        let gpu = ctx.name()?;
        if precision == CudaPrecision::Fp8 && cc < (8, 9) {
            return Err(CudaError::NoFp8 {
                gpu,
                major: cc.0,
                minor: cc.1,
            });
        }
        let kernels = match kernels {
            Some(k) => k,
            None => compile_kernels(&arch_for(cc))?,
        };
        // One stream: no cross-stream events needed.
        // SAFETY: every buffer is used on `stream` only.
        unsafe { ctx.disable_event_tracking() };
        // A stream of our own, not the legacy default stream, which cannot be captured
        // into a CUDA graph.
        let stream = ctx.new_stream()?;
        let mut modules = Vec::new();
        for (name, ptx) in &kernels.modules {
            let m = ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx.clone()))
                .map_err(|e| {
                    CudaError::Driver(format!(
                        "loading kernel module {name} (built for {}; this GPU is sm_{}{}): {e:?}",
                        kernels.arch, cc.0, cc.1
                    ))
                })?;
            modules.push(m);
        }
        let mut funcs = HashMap::new();
        for &k in KERNEL_NAMES {
            let f = modules
                .iter()
                .find_map(|m| m.load_function(k).ok())
                .ok_or_else(|| CudaError::Driver(format!("kernel {k} not found in the PTX")))?;
            funcs.insert(k, f);
        }
        let hopper = cc == (9, 0) && kernels.arch == "sm_90a";
        if hopper {
            for v in FlashVariant::ALL {
                let k = v.kernel();
                if k.wgmma && k.shared_bytes > 48 * 1024 {
                    funcs[k.name]
                        .set_attribute(
                            cudarc::driver::sys::CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            k.shared_bytes as i32,
                        )
                        .map_err(|e| CudaError::Driver(format!("{}: shared memory limit: {e:?}", k.name)))?;
                }
            }
        }
        let pool = default_pool(&ctx)?;
        // A caching allocator: the stream-ordered pool keeps freed memory for reuse
        // instead of handing it back to the driver at every synchronisation.
        let mut keep = u64::MAX;
        // SAFETY: the pool belongs to this context's device; the value is a u64.
        unsafe {
            cudarc::driver::sys::cuMemPoolSetAttribute(
                pool,
                cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut keep as *mut u64 as *mut c_void,
            )
            .result()?;
        }
        let handle = lt::create_handle()?;
        // SAFETY: u8 workspace, never read by the host.
        let workspace = unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }?;
        Ok(Self {
            ctx,
            stream,
            funcs,
            blas: Mutex::new(Blas { handle, workspace }),
            precision,
            gpu,
            cc,
            hopper,
            build_id: kernels.build_id.clone(),
            fp8_gemm: std::cell::Cell::new(Fp8Gemm::from_env()?),
            flash: std::cell::Cell::new(
                std::env::var("SD_CUDA_ATTENTION").map_or(true, |v| v != "exact"),
            ),
            profile: std::cell::RefCell::new(None),
            op_key: std::cell::Cell::new(None),
            quant_cache: std::cell::RefCell::new(None),
            fused_epilogue: std::cell::Cell::new(
                [(std::env::var("SD_CUDA_FUSED_EPILOGUE").as_deref() == Ok("0")).then_some(false);
                    8],
            ),
            fused_epilogue_error: std::cell::RefCell::new(Default::default()),
            algo_cache: std::cell::RefCell::new(HashMap::new()),
            tune_gemms: std::cell::Cell::new(false),
            act_scale_vecs: std::cell::RefCell::new(HashMap::new()),
            pool,
            param_bytes: std::cell::Cell::new(0),
            cudnn: std::cell::RefCell::new(conv::CudnnState::Unopened),
            conv_path: std::cell::Cell::new(ConvPath::from_env()?),
            graphs_on: std::cell::Cell::new(graphs_from_env()?),
            graphs: std::cell::RefCell::new(graphs::Graphs::default()),
            graph_counts: std::cell::Cell::new((0, 0)),
            capturing: std::cell::Cell::new(false),
        })
    }

    fn r(&self) -> i32 {
        (self.precision != CudaPrecision::F32) as i32
    }

    fn ptr<T>(&self, s: &CudaSlice<T>) -> u64 {
        let (p, _sync) = s.device_ptr(&self.stream);
        p
    }

    fn tp(&self, t: &CudaTensor) -> u64 {
        self.sptr(&t.buf)
    }

    fn sptr(&self, s: &Storage) -> u64 {
        match s {
            Storage::F32(b) => self.ptr(b),
            Storage::Bf16(b) => self.ptr(b),
        }
    }

    /// Bytes per stored tensor element.
    fn es(&self) -> usize {
        if self.r() == 1 { 2 } else { 4 }
    }

    /// An uninitialised tensor buffer of `n` elements in the storage type.
    fn talloc(&self, n: usize) -> Result<Storage> {
        Ok(if self.r() == 1 {
            Storage::Bf16(self.alloc::<u16>(n)?)
        } else {
            Storage::F32(self.alloc::<f32>(n)?)
        })
    }

    /// A zeroed tensor buffer (zero bits are 0.0 in both types).
    fn tzeros(&self, n: usize) -> Result<Storage> {
        Ok(if self.r() == 1 {
            Storage::Bf16(self.zeros::<u16>(n)?)
        } else {
            Storage::F32(self.zeros::<f32>(n)?)
        })
    }

    fn alloc<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every caller's kernel writes all n elements before anything reads them.
        Ok(unsafe { self.stream.alloc::<T>(n.max(1)) }?)
    }

    fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros::<T>(n.max(1))?)
    }

    fn wrap(&self, shape: Vec<usize>, buf: Storage) -> CudaTensor {
        CudaTensor {
            shape,
            buf: Arc::new(DeviceBuf::new(buf)),
            layout: Layout::RowMajor,
        }
    }

    fn launch(&self, name: &str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = self
            .funcs
            .get(name)
            .ok_or_else(|| CudaError::Driver(format!("no kernel {name}")))?;
        self.ctx.bind_to_thread()?;
        let mut b = self.stream.launch_builder(f);
        for a in args {
            match a {
                Arg::P(v) | Arg::U(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::L(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
                Arg::Tma(v) => b.arg(v),
                Arg::Ptrs(v) => b.arg(v),
            };
        }
        // SAFETY: argument lists match the kernels' signatures in kernels/*.cu, and
        // every pointer is a live allocation of the size the kernel indexes.
        unsafe { b.launch(cfg) }.map_err(|e| CudaError::Driver(format!("{name}: {e:?}")))?;
        Ok(())
    }

    fn grid(n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(THREADS as usize).clamp(1, 1 << 20) as u32;
        LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn rows_cfg(rows: usize, threads: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows.max(1) as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn gemm(&self, g: Gemm) -> Result<()> {
        let blas = self
            .blas
            .lock()
            .map_err(|_| CudaError::Blas("handle mutex poisoned".into()))?;
        self.ctx.bind_to_thread()?;
        let f32t = ltsys::cudaDataType::CUDA_R_32F;
        let (ar, ac) = if g.transa { (g.k, g.m) } else { (g.m, g.k) };
        let (br, bc) = if g.transb { (g.n, g.k) } else { (g.k, g.n) };
        let a_l = lt::create_matrix_layout(g.a_type, ar, ac, g.lda)?;
        let b_l = lt::create_matrix_layout(g.b_type, br, bc, g.ldb)?;
        let d_l = lt::create_matrix_layout(g.epi.d_type, g.m, g.n, g.ldd)?;
        let desc = lt::create_matmul_desc(ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F, f32t)?;
        let pref = lt::create_matmul_pref()?;
        // Each batch entry's operand addresses, not only the first's, must meet the
        // alignment the chosen kernel assumes (256 bytes unless told otherwise). Only
        // batched GEMMs (attention) need it; every linear layer passes here too.
        let batch_align = (g.batch.count > 1).then(|| {
            [
                batch_alignment(g.a, g.batch.stride_a, dtype_bytes(g.a_type)),
                batch_alignment(g.b, g.batch.stride_b, dtype_bytes(g.b_type)),
                batch_alignment(g.d, g.batch.stride_d, dtype_bytes(g.epi.d_type)),
            ]
        });
        let ws_ptr = self.ptr(&blas.workspace);
        let result = (|| -> Result<()> {
            use ltsys::cublasLtMatmulDescAttributes_t as A;
            let (ta, tb) = (g.transa as i32, g.transb as i32);
            // SAFETY: attribute values are passed with their exact sizes; the handles
            // are live until the cleanup below.
            unsafe {
                if let Some(align) = batch_align {
                    use ltsys::cublasLtMatmulPreferenceAttributes_t as P;
                    use ltsys::cublasLtMatrixLayoutAttribute_t as L;
                    for (layout, stride) in [
                        (a_l, g.batch.stride_a),
                        (b_l, g.batch.stride_b),
                        (d_l, g.batch.stride_d),
                    ] {
                        lt::set_matrix_layout_attribute(
                            layout,
                            L::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                            &g.batch.count as *const i32 as *const c_void,
                            std::mem::size_of::<i32>(),
                        )?;
                        lt::set_matrix_layout_attribute(
                            layout,
                            L::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                            &stride as *const i64 as *const c_void,
                            std::mem::size_of::<i64>(),
                        )?;
                    }
                    for (attr, bytes) in [
                        (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align[0]),
                        (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align[1]),
                        (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align[2]),
                        (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align[2]),
                    ] {
                        lt::set_matmul_pref_attribute(
                            pref,
                            attr,
                            &bytes as *const u32 as *const c_void,
                            std::mem::size_of::<u32>(),
                        )?;
                    }
                }
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSA, &ta)?;
                set_desc(desc, A::CUBLASLT_MATMUL_DESC_TRANSB, &tb)?;
                let fast_accum = g.fast_accum as i8;
                if g.a_type == ltsys::cudaDataType::CUDA_R_8F_E4M3 {
                    set_desc(desc, A::CUBLASLT_MATMUL_DESC_FAST_ACCUM, &fast_accum)?;
                }
                if g.b_scale != 0 {
                    set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &g.b_scale)?;
                }
                if g.epi.a_scale_vec != 0 {
                    // cublasLtMatmulMatrixScale_t OUTER_VEC_32F: one f32 per row of op(A).
                    let mode = 3i32;
                    set_desc(desc, A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &mode)?;
                    set_desc(
                        desc,
                        A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                        &g.epi.a_scale_vec,
                    )?;
                }
                if g.epi.b_scale_vec != 0 {
                    // The same mode for B (cuBLASLt requires both): one f32 per column
                    // of op(B), replacing the scalar B scale set above.
                    let mode = 3i32;
                    set_desc(desc, A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &mode)?;
                    set_desc(
                        desc,
                        A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                        &g.epi.b_scale_vec,
                    )?;
                }
                if g.epi.alpha_vec != 0 {
                    // cublasLtPointerMode_t ALPHA_DEVICE_VECTOR_BETA_ZERO.
                    let mode = 3i32;
                    set_desc(desc, A::CUBLASLT_MATMUL_DESC_POINTER_MODE, &mode)?;
                }
                if g.epi.a_scale != 0 {
                    set_desc(
                        desc,
                        A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                        &g.epi.a_scale,
                    )?;
                }
                let epilogue = match (g.epi.bias != 0, g.epi.gelu) {
                    (true, false) => Some(ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS),
                    (true, true) => Some(ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS),
                    (false, true) => Some(ltsys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU),
                    (false, false) => None,
                };
                if let Some(e) = epilogue {
                    set_desc(desc, A::CUBLASLT_MATMUL_DESC_EPILOGUE, &(e as u32))?;
                }
                if g.epi.bias != 0 {
                    set_desc(desc, A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &g.epi.bias)?;
                }
                let ws = WORKSPACE_BYTES;
                lt::set_matmul_pref_attribute(
                    pref,
                    ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const usize as *const c_void,
                    std::mem::size_of::<usize>(),
                )?;
                // The heuristic's choice is cached per problem (shape, types, leading
                // dimensions, scaling): the query costs tens of microseconds per call.
                let key = format!(
                    "{} {} {} {} {} {:?} {:?} {} {} {} {}",
                    ta,
                    tb,
                    g.m,
                    g.n,
                    g.k,
                    g.a_type,
                    g.b_type,
                    g.lda,
                    g.ldb,
                    g.ldd,
                    g.b_scale != 0
                ) + &if g.epi.is_fused() {
                    format!(
                        " fused {:?} {} {} {} {} {}",
                        g.epi.d_type,
                        g.epi.a_scale_vec != 0,
                        g.epi.b_scale_vec != 0,
                        g.epi.alpha_vec != 0,
                        g.epi.a_scale != 0,
                        g.epi.bias != 0
                    ) + if g.epi.gelu { " gelu" } else { "" }
                } else {
                    String::new()
                } + if g.fast_accum { " fastacc" } else { "" }
                    + &batch_align.map_or(String::new(), |align| {
                        format!(
                            " batch {} {} {} {} align {align:?}",
                            g.batch.count, g.batch.stride_a, g.batch.stride_b, g.batch.stride_d
                        )
                    });
                let (alpha, beta) = (g.alpha, 0.0f32);
                // With an alpha vector, alpha is its device pointer (beta is zero and
                // not read).
                let alpha_ptr = if g.epi.alpha_vec != 0 {
                    g.epi.alpha_vec as *const c_void
                } else {
                    &alpha as *const f32 as *const c_void
                };
                let launch = |algo: &ltsys::cublasLtMatmulAlgo_t| -> Result<()> {
                    lt::matmul(
                        blas.handle,
                        desc,
                        alpha_ptr,
                        &beta as *const f32 as *const c_void,
                        g.a as *const c_void,
                        a_l,
                        g.b as *const c_void,
                        b_l,
                        g.d as *const c_void,
                        d_l,
                        g.d as *mut c_void,
                        d_l,
                        algo,
                        ws_ptr as *mut c_void,
                        WORKSPACE_BYTES,
                        self.stream.cu_stream() as *mut _,
                    )?;
                    Ok(())
                };
                let cached = self.algo_cache.borrow().get(&key).copied();
                let algo = match cached {
                    Some(a) => a,
                    None => {
                        let a = self
                            .choose_algo(blas.handle, desc, a_l, b_l, d_l, pref, &launch)
                            .map_err(|e| {
                                CudaError::Blas(format!(
                                    "m={} n={} k={} A {:?} B {:?}: {e}",
                                    g.m, g.n, g.k, g.a_type, g.b_type
                                ))
                            })?;
                        self.algo_cache.borrow_mut().insert(key, a);
                        a
                    }
                };
                launch(&algo)?;
            }
            Ok(())
        })();
        // SAFETY: created above, destroyed once.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
            let _ = lt::destroy_matmul_desc(desc);
            let _ = lt::destroy_matrix_layout(a_l);
            let _ = lt::destroy_matrix_layout(b_l);
            let _ = lt::destroy_matrix_layout(d_l);
        }
        result
    }

    // ---- elementwise helpers ------------------------------------------------------

    fn unary(&self, x: &CudaTensor, op: i32, a: f32, b: f32) -> Result<CudaTensor> {
        let n = x.numel();
        let out = self.talloc(n)?;
        self.launch(
            "unary_f32",
            Self::grid(n),
            &[
                Arg::P(self.tp(x)),
                Arg::P(self.sptr(&out)),
                Arg::U(n as u64),
                Arg::I(op),
                Arg::F(a),
                Arg::F(b),
                Arg::I(self.r()),
            ],
        )?;
        Ok(self.wrap(x.shape.clone(), out))
    }

    fn binary(
        &self,
        a: &CudaTensor,
        b: &CudaTensor,
        period: usize,
        op: i32,
        s: f32,
    ) -> Result<CudaTensor> {
        let n = a.numel();
        let out = self.talloc(n)?;
        self.launch(
            "binary_f32",
            Self::grid(n),
            &[
                Arg::P(self.tp(a)),
                Arg::P(self.tp(b)),
                Arg::P(self.sptr(&out)),
                Arg::U(n as u64),
                Arg::U(period.max(1) as u64),
                Arg::I(op),
                Arg::F(s),
                Arg::I(self.r()),
            ],
        )?;
        Ok(self.wrap(a.shape.clone(), out))
    }

    fn same(a: &[usize], b: &[usize], op: &str) -> Result<()> {
        if a != b {
            return Err(bad(format!("{op}: shapes {a:?} and {b:?} differ")));
        }
        Ok(())
    }

    fn batch_channels(x: &[usize], v: &[usize], op: &str) -> Result<(usize, usize)> {
        if x.len() < 2 || v.len() != 2 || v[0] != x[0] || v[1] != x[x.len() - 1] {
            return Err(bad(format!(
                "{op}: per-entry vector {v:?} does not fit {x:?}"
            )));
        }
        Ok((v[0], v[1]))
    }

    fn copy2d(
        &self,
        src: u64,
        dst: u64,
        rows: usize,
        width: usize,
        src_pitch: usize,
        dst_pitch: usize,
    ) -> Result<()> {
        if rows * width == 0 {
            return Ok(());
        }
        self.launch(
            "copy2d_f32",
            Self::grid(rows * width),
            &[
                Arg::P(src),
                Arg::P(dst),
                Arg::U(rows as u64),
                Arg::U(width as u64),
                Arg::U(src_pitch as u64),
                Arg::U(dst_pitch as u64),
                Arg::I(self.r()),
            ],
        )
    }

    /// The last dimension of `x` cut into `n` equal parts, each its own tensor, in one
    /// launch (more than [`SPLIT_MAX_PARTS`] parts: one copy each).
    fn chunks(&self, x: &CudaTensor, n: usize) -> Result<Vec<CudaTensor>> {
        // A 0-dim tensor has no last dimension to cut (the trait default refuses it too).
        let Some(&c) = x.shape.last() else {
            return Err(bad(format!(
                "chunks: cannot cut the last dimension of {:?} into {n} equal parts",
                x.shape
            )));
        };
        if n == 0 || !c.is_multiple_of(n) {
            return Err(bad(format!(
                "chunks: cannot cut the last dimension of {:?} into {n} equal parts",
                x.shape
            )));
        }
        let (len, rows) = (c / n, x.numel() / c.max(1));
        let mut shape = x.shape.clone();
        if let Some(l) = shape.last_mut() {
            *l = len;
        }
        let parts = (0..n)
            .map(|_| self.talloc(rows * len))
            .collect::<Result<Vec<_>>>()?;
        if rows * len > 0 && n <= SPLIT_MAX_PARTS {
            let mut ptrs = PtrArray([0; SPLIT_MAX_PARTS]);
            for (slot, p) in ptrs.0.iter_mut().zip(&parts) {
                *slot = self.sptr(p);
            }
            self.launch(
                "split_last_f32",
                Self::grid(rows * c),
                &[
                    Arg::P(self.tp(x)),
                    Arg::Ptrs(ptrs),
                    Arg::U(rows as u64),
                    Arg::U(len as u64),
                    Arg::I(n as i32),
                    Arg::I(self.r()),
                ],
            )?;
        } else if rows * len > 0 {
            for (k, p) in parts.iter().enumerate() {
                let src = self.tp(x) + (k * len * self.es()) as u64;
                self.copy2d(src, self.sptr(p), rows, len, c, len)?;
            }
        }
        Ok(parts
            .into_iter()
            .map(|p| self.wrap(shape.clone(), p))
            .collect())
    }

    /// Quantizes `x` to FP8 codes with a host scale (for tests and the emulated path).
    pub fn quantize_fp8(&self, x: &CudaTensor, format: Fp8Format, scale: f32) -> Result<Vec<u8>> {
        self.not_capturing("a download to the host")?;
        let x = self.row_major(x)?;
        let x = x.as_ref();
        let n = x.numel();
        let q = self.alloc::<u8>(n)?;
        self.launch(
            "quantize_fp8",
            Self::grid(n),
            &[
                Arg::P(self.tp(x)),
                Arg::P(self.ptr(&q)),
                Arg::U(n as u64),
                Arg::F(scale),
                Arg::I(fmt_code(format)),
                Arg::I(self.r()),
            ],
        )?;
        let mut v = self.stream.clone_dtoh(&q)?;
        v.truncate(n);
        Ok(v)
    }

    /// FP8 quantize + dequantize of a tensor into an f32 buffer (scaled FP8 values are
    /// not BF16 values in general): the input of the emulated path's f32 GEMM.
    fn fake_quantize(
        &self,
        x: &CudaTensor,
        format: Fp8Format,
        scale: f32,
    ) -> Result<CudaSlice<f32>> {
        let n = x.numel();
        let q = self.alloc::<u8>(n)?;
        let out = self.alloc::<f32>(n)?;
        self.launch(
            "quantize_fp8",
            Self::grid(n),
            &[
                Arg::P(self.tp(x)),
                Arg::P(self.ptr(&q)),
                Arg::U(n as u64),
                Arg::F(scale),
                Arg::I(fmt_code(format)),
                Arg::I(self.r()),
            ],
        )?;
        self.launch(
            "dequantize_fp8",
            Self::grid(n),
            &[
                Arg::P(self.ptr(&q)),
                Arg::P(self.ptr(&out)),
                Arg::U(n as u64),
                Arg::F(scale),
                Arg::I(fmt_code(format)),
            ],
        )?;
        Ok(out)
    }

    fn upload_f32(&self, v: &[f32]) -> Result<CudaSlice<f32>> {
        if v.is_empty() {
            return self.zeros(1);
        }
        Ok(self.stream.clone_htod(v)?)
    }

    // ---- the operations (crate errors) ------------------------------------------

    /// `packed`: the layer's FP8 codes as an engine bundle stores them, used instead
    /// of quantizing `weight` (which then is not read).
    fn load_linear_impl(
        &self,
        spec: &LinearSpec,
        weight: &WeightTensor<'_>,
        bias: Option<&WeightTensor<'_>>,
        mut packed: Option<PackedFp8Weight>,
    ) -> Result<CudaLinear> {
        let (out, inp) = (spec.out_features, spec.in_features);
        if weight.shape != [out, inp] {
            return Err(bad(format!(
                "layer {}: weight shape {:?}, expected [{out}, {inp}]",
                spec.name, weight.shape
            )));
        }
        let needs_values = packed.is_none() || matches!(spec.quant, LinearQuant::None);
        let mut w = if needs_values {
            weight.to_f32()
        } else {
            Vec::new()
        };
        if self.precision != CudaPrecision::F32 {
            round_host(&mut w);
        }
        let bias = match bias {
            Some(b) => {
                let mut v = b.to_f32();
                if v.len() != out {
                    return Err(bad(format!("layer {}: bias of {}", spec.name, v.len())));
                }
                if self.precision != CudaPrecision::F32 {
                    round_host(&mut v);
                }
                Some(self.upload_f32(&v)?)
            }
            None => None,
        };
        // W8A16 layers keep their E4M3 codes on the GPU (FP8 precision, rows of a
        // multiple of 16 codes for the GEMV's 16-byte loads); otherwise they run as a
        // dense layer on the weights' FP8 values (code * scale, what the CPU engine
        // computes with). A bundle provides the codes it stores; a checkpoint's weights
        // are quantized here, as the CPU simulation quantizes them.
        let mut weight_only_codes = None;
        if let LinearQuant::Fp8WeightOnly { weight: wq } = &spec.quant {
            if wq.format != Fp8Format::E4M3 {
                return Err(bad(format!(
                    "layer {}: FP8 weights must be E4M3 (plan says {})",
                    spec.name,
                    wq.format.name()
                )));
            }
            wq.check(&spec.name, out).map_err(bad)?;
            if self.precision == CudaPrecision::Fp8 && inp % 16 == 0 {
                weight_only_codes = Some(match packed.take() {
                    Some(p) => check_packed(spec, p, wq)?,
                    None => pack_fp8_weight(&w, out, inp, wq),
                });
            } else {
                if w.is_empty() {
                    // Codes were provided, but this backend runs the layer dense.
                    w = weight.to_f32();
                    if self.precision != CudaPrecision::F32 {
                        round_host(&mut w);
                    }
                }
                wq.fake_quantize(&mut w, inp);
            }
        }
        let kind = match &spec.quant {
            LinearQuant::Fp8WeightOnly { .. } if weight_only_codes.is_some() => {
                let p = weight_only_codes.take().unwrap_or_else(|| unreachable!());
                LinearKind::Fp8WeightOnly {
                    w: self.stream.clone_htod(&p.codes)?,
                    wscale: self.upload_f32(&p.scales)?,
                }
            }
            LinearQuant::None | LinearQuant::Fp8WeightOnly { .. } => match self.precision {
                CudaPrecision::F32 => LinearKind::F32 {
                    w: self.upload_f32(&w)?,
                },
                _ => {
                    let bits: Vec<u16> = w
                        .iter()
                        .map(|&v| half::bf16::from_f32(v).to_bits())
                        .collect();
                    LinearKind::Bf16 {
                        w: self.stream.clone_htod(&bits)?,
                    }
                }
            },
            LinearQuant::Fp8 { weight: wq, input } => {
                if self.precision == CudaPrecision::Bf16 {
                    return Err(bad(format!(
                        "layer {} is FP8 in the plan, but the backend was opened with precision bf16",
                        spec.name
                    )));
                }
                if self.cc < (8, 9) && self.fp8_gemm.get() != Fp8Gemm::ExactViaBf16 {
                    return Err(CudaError::NoFp8 {
                        gpu: self.gpu.clone(),
                        major: self.cc.0,
                        minor: self.cc.1,
                    });
                }
                if wq.format != Fp8Format::E4M3 {
                    return Err(bad(format!(
                        "layer {}: cuBLASLt takes E4M3 weights only (plan says {})",
                        spec.name,
                        wq.format.name()
                    )));
                }
                if wq.scales.len() != out && wq.scales.len() != 1 {
                    return Err(bad(format!(
                        "layer {}: {} weight scales for {out} output channels",
                        spec.name,
                        wq.scales.len()
                    )));
                }
                if let Some(s) = wq
                    .scales
                    .iter()
                    .chain([&input.scale])
                    .find(|s| !(s.is_finite() && **s > 0.0))
                {
                    return Err(bad(format!(
                        "layer {}: scale {s} is not positive and finite",
                        spec.name
                    )));
                }
                let packed = match packed {
                    Some(p) => check_packed(spec, p, wq)?,
                    None => pack_fp8_weight(&w, out, inp, wq),
                };
                let (codes, scales) = (packed.codes, packed.scales);
                if self.fp8_gemm.get() == Fp8Gemm::ExactViaBf16 {
                    let table = sd_fp8::decode_table(wq.format);
                    let bits: Vec<u16> = codes
                        .iter()
                        .map(|&c| half::bf16::from_f32(table[c as usize]).to_bits())
                        .collect();
                    LinearKind::Fp8ViaBf16 {
                        w: self.stream.clone_htod(&bits)?,
                        wscale: self.upload_f32(&scales)?,
                        act: input.format,
                        act_scale: input.scale,
                    }
                } else if inp % 16 == 0 && out % 16 == 0 {
                    LinearKind::Fp8 {
                        w: self.stream.clone_htod(&codes)?,
                        wscale: self.upload_f32(&scales)?,
                        act: input.format,
                        act_scale: input.scale,
                        act_scale_dev: self.upload_f32(&[input.scale])?,
                        fast_accum: self.fp8_gemm.get() == Fp8Gemm::NativeFastAccum,
                    }
                } else {
                    let mut deq = vec![0f32; out * inp];
                    for (o, (src, dst)) in codes.chunks(inp).zip(deq.chunks_mut(inp)).enumerate() {
                        sd_fp8::dequantize_slice(wq.format, src, scales[o], dst);
                    }
                    LinearKind::Fp8Emulated {
                        w: self.upload_f32(&deq)?,
                        act: input.format,
                        act_scale: input.scale,
                    }
                }
            }
        };
        let wbytes = match &kind {
            LinearKind::F32 { w } | LinearKind::Fp8Emulated { w, .. } => 4 * w.len(),
            LinearKind::Bf16 { w } => 2 * w.len(),
            LinearKind::Fp8ViaBf16 { w, wscale, .. } => 2 * w.len() + 4 * wscale.len(),
            LinearKind::Fp8 { w, wscale, .. } => w.len() + 4 * wscale.len() + 4,
            LinearKind::Fp8WeightOnly { w, wscale } => w.len() + 4 * wscale.len(),
        } + bias.as_ref().map_or(0, |b| 4 * b.len());
        self.param_bytes.set(self.param_bytes.get() + wbytes as u64);
        Ok(CudaLinear {
            spec: spec.clone(),
            kind,
            bias,
            bias16: std::sync::OnceLock::new(),
            wscale_uniform: std::sync::OnceLock::new(),
        })
    }

    /// The layer's bias as BF16 (converted once, on the GPU).
    fn bias16<'a>(&self, layer: &'a CudaLinear, b: &CudaSlice<f32>) -> Result<&'a CudaSlice<u16>> {
        if let Some(h) = layer.bias16.get() {
            return Ok(h);
        }
        self.not_capturing("a BF16 copy of a bias")?;
        let n = b.len();
        let h = self.alloc::<u16>(n)?;
        self.launch(
            "f32_to_bf16",
            Self::grid(n),
            &[Arg::P(self.ptr(b)), Arg::P(self.ptr(&h)), Arg::U(n as u64)],
        )?;
        let _ = layer.bias16.set(h);
        layer
            .bias16
            .get()
            .ok_or_else(|| CudaError::Driver("bias16 not set".into()))
    }

    /// Device address of `n` copies of an activation scale (cuBLASLt's outer-vector B
    /// scale), made once per (scale, n) and kept for the backend's life: every step
    /// asks for the same few.
    fn act_scale_vec(&self, scale: f32, n: usize) -> Result<u64> {
        let key = (scale.to_bits(), n);
        if !self.act_scale_vecs.borrow().contains_key(&key) {
            self.not_capturing("an activation-scale vector")?;
            let v = self.upload_f32(&vec![scale; n.max(1)])?;
            self.act_scale_vecs.borrow_mut().insert(key, v);
        }
        let map = self.act_scale_vecs.borrow();
        let v = map
            .get(&key)
            .ok_or_else(|| CudaError::Driver("activation scale vector missing".into()))?;
        Ok(self.ptr(v))
    }

    /// The common weight scale of an FP8 layer whose channel scales are all equal (read
    /// back once per layer, on its first call).
    fn uniform_scale<'a>(&self, layer: &'a CudaLinear) -> Result<Option<&'a CudaSlice<f32>>> {
        if let Some(u) = layer.wscale_uniform.get() {
            return Ok(u.as_ref());
        }
        self.not_capturing("a layer's uniform weight scale")?;
        let u = match &layer.kind {
            LinearKind::Fp8 { wscale, .. } => {
                let v = self.stream.clone_dtoh(wscale)?;
                match v.first() {
                    Some(&s0) if v.iter().all(|&s| s.to_bits() == s0.to_bits()) => {
                        Some(self.upload_f32(&[s0])?)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        let _ = layer.wscale_uniform.set(u);
        Ok(layer.wscale_uniform.get().and_then(|u| u.as_ref()))
    }

    fn linear_impl(&self, x: &CudaTensor, layer: &CudaLinear) -> Result<CudaTensor> {
        Ok(self.linear_epilogue(x, layer, false)?.0)
    }

    /// `gelu(linear(x))` (tanh approximation): GELU in cuBLASLt's epilogue where it takes
    /// it, else the activation kernel after the layer.
    fn linear_gelu_impl(&self, x: &CudaTensor, layer: &CudaLinear) -> Result<CudaTensor> {
        match self.linear_epilogue(x, layer, true)? {
            (y, true) => Ok(y),
            (y, false) => self.unary(&y, UNARY_GELU_TANH, 0.0, 0.0),
        }
    }

    /// The layer, with GELU fused into cuBLASLt's epilogue when `gelu` asks for it and
    /// cuBLASLt takes it; returns whether GELU was applied.
    fn linear_epilogue(
        &self,
        x: &CudaTensor,
        layer: &CudaLinear,
        gelu: bool,
    ) -> Result<(CudaTensor, bool)> {
        let (inp, outf) = (layer.spec.in_features, layer.spec.out_features);
        if x.shape.last() != Some(&inp) {
            return Err(bad(format!(
                "layer {}: input shape {:?} does not end in {inp}",
                layer.spec.name, x.shape
            )));
        }
        let rows = x.numel() / inp.max(1);
        let f32t = ltsys::cudaDataType::CUDA_R_32F;
        // Y^T[out, rows] (column-major) = W[out, in] (given as column-major [in, out],
        // transposed) x X^T (column-major [in, rows]).
        let mut g = Gemm {
            transa: true,
            transb: false,
            m: outf as u64,
            n: rows as u64,
            k: inp as u64,
            a: 0,
            a_type: f32t,
            lda: inp as i64,
            b: 0,
            b_type: f32t,
            ldb: inp as i64,
            d: 0,
            ldd: outf as i64,
            b_scale: 0,
            alpha: 1.0,
            epi: GemmEpilogue::default(),
            batch: GemmBatch::ONE,
            fast_accum: false,
        };
        let mut colscale = 0u64;
        // The FP8 layer's activation scale (for the outer-vector B scale).
        let mut act_scale_value: Option<f32> = None;
        // Temporaries live until the end of this function (stream-ordered frees).
        let mut _tmp_bf16: Option<CudaSlice<u16>> = None;
        let mut _tmp_u8: Option<CudaSlice<u8>> = None;
        let mut _tmp_u8_shared: Option<Arc<CudaSlice<u8>>> = None;
        let mut _tmp_f32: Option<CudaSlice<f32>> = None;
        if rows > 0 {
            match &layer.kind {
                LinearKind::F32 { w } => {
                    g.a = self.ptr(w);
                    g.b = self.tp(x);
                }
                LinearKind::Bf16 { w } => {
                    // BF16 layers exist only in BF16/FP8 precision, whose tensors are
                    // stored as BF16: the input is the GEMM operand as it is.
                    g.a = self.ptr(w);
                    g.a_type = ltsys::cudaDataType::CUDA_R_16BF;
                    g.b = self.tp(x);
                    g.b_type = ltsys::cudaDataType::CUDA_R_16BF;
                }
                LinearKind::Fp8 {
                    w,
                    wscale,
                    act,
                    act_scale,
                    act_scale_dev,
                    fast_accum,
                } => {
                    let n = rows * inp;
                    let (sb, fc) = (act_scale.to_bits(), fmt_code(*act));
                    let cached = self.quant_cache.borrow().as_ref().and_then(|c| {
                        (Arc::ptr_eq(&c.src, &x.buf)
                            && c.n == n
                            && c.scale_bits == sb
                            && c.format == fc)
                            .then(|| c.codes.clone())
                    });
                    let xq = match cached {
                        Some(q) => q,
                        None => {
                            let xq = self.alloc::<u8>(n)?;
                            // Profiling: the quantize pass is timed on its own too.
                            let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
                            let profiling = self.profile.borrow().is_some();
                            let start = profiling.then(|| self.stream.record_event(flags));
                            if self.r() == 1 && n.is_multiple_of(8) {
                                self.launch(
                                    "quantize_fp8_dev_x8",
                                    Self::grid(n / 8),
                                    &[
                                        Arg::P(self.tp(x)),
                                        Arg::P(self.ptr(&xq)),
                                        Arg::U((n / 8) as u64),
                                        Arg::P(self.ptr(act_scale_dev)),
                                        Arg::I(fc),
                                    ],
                                )?;
                            } else {
                                self.launch(
                                    "quantize_fp8_dev",
                                    Self::grid(n),
                                    &[
                                        Arg::P(self.tp(x)),
                                        Arg::P(self.ptr(&xq)),
                                        Arg::U(n as u64),
                                        Arg::P(self.ptr(act_scale_dev)),
                                        Arg::I(fc),
                                        Arg::I(self.r()),
                                    ],
                                )?;
                            }
                            if let (Some(Ok(start)), Ok(end), Some(p)) = (
                                start,
                                self.stream.record_event(flags),
                                self.profile.borrow_mut().as_mut(),
                            ) {
                                p.pending.push((
                                    format!("quantize fp8 (inside linear) {rows}x{inp}"),
                                    start,
                                    end,
                                ));
                            }
                            let xq = Arc::new(xq);
                            *self.quant_cache.borrow_mut() = Some(QuantCache {
                                src: x.buf.clone(),
                                n,
                                scale_bits: sb,
                                format: fc,
                                codes: xq.clone(),
                            });
                            xq
                        }
                    };
                    g.a = self.ptr(w);
                    g.a_type = ltsys::cudaDataType::CUDA_R_8F_E4M3;
                    g.b = self.ptr(&*xq);
                    g.b_type = fp8_type(*act);
                    g.b_scale = self.ptr(act_scale_dev);
                    g.fast_accum = *fast_accum;
                    colscale = self.ptr(wscale);
                    act_scale_value = Some(*act_scale);
                    _tmp_u8_shared = Some(xq);
                }
                LinearKind::Fp8ViaBf16 {
                    w,
                    wscale,
                    act,
                    act_scale,
                } => {
                    let n = rows * inp;
                    let xq = self.alloc::<u8>(n)?;
                    let xb = self.alloc::<u16>(n)?;
                    self.launch(
                        "quantize_fp8",
                        Self::grid(n),
                        &[
                            Arg::P(self.tp(x)),
                            Arg::P(self.ptr(&xq)),
                            Arg::U(n as u64),
                            Arg::F(*act_scale),
                            Arg::I(fmt_code(*act)),
                            Arg::I(self.r()),
                        ],
                    )?;
                    self.launch(
                        "fp8_to_bf16",
                        Self::grid(n),
                        &[
                            Arg::P(self.ptr(&xq)),
                            Arg::P(self.ptr(&xb)),
                            Arg::U(n as u64),
                            Arg::I(fmt_code(*act)),
                        ],
                    )?;
                    g.a = self.ptr(w);
                    g.a_type = ltsys::cudaDataType::CUDA_R_16BF;
                    g.b = self.ptr(&xb);
                    g.b_type = ltsys::cudaDataType::CUDA_R_16BF;
                    g.alpha = *act_scale;
                    colscale = self.ptr(wscale);
                    _tmp_u8 = Some(xq);
                    _tmp_bf16 = Some(xb);
                }
                LinearKind::Fp8WeightOnly { w, wscale } if rows <= W8A16_MAX_ROWS => {
                    return Ok((self.linear_w8a16(x, layer, w, wscale, rows)?, false));
                }
                LinearKind::Fp8WeightOnly { w, wscale } => {
                    // Many rows: a GEMM pays; the weights' values go to a BF16 temporary.
                    let n = outf * inp;
                    let wb = self.alloc::<u16>(n)?;
                    self.launch(
                        "fp8_rows_to_bf16",
                        Self::grid(n),
                        &[
                            Arg::P(self.ptr(w)),
                            Arg::P(self.ptr(wscale)),
                            Arg::P(self.ptr(&wb)),
                            Arg::U(n as u64),
                            Arg::I(inp as i32),
                        ],
                    )?;
                    g.a = self.ptr(&wb);
                    g.a_type = ltsys::cudaDataType::CUDA_R_16BF;
                    g.b = self.tp(x);
                    g.b_type = ltsys::cudaDataType::CUDA_R_16BF;
                    _tmp_bf16 = Some(wb);
                }
                LinearKind::Fp8Emulated { w, act, act_scale } => {
                    let xf = self.fake_quantize(x, *act, *act_scale)?;
                    g.a = self.ptr(w);
                    g.b = self.ptr(&xf);
                    _tmp_f32 = Some(xf);
                }
            }
        }
        let n = rows * outf;
        let mut shape = x.shape.clone();
        if let Some(l) = shape.last_mut() {
            *l = outf;
        }
        // cuBLASLt's own epilogue (scales, bias, BF16 output) writes the tensor directly:
        // no f32 intermediate, no epilogue kernel. Ways tried, each until this cuBLASLt
        // refuses it once (then the next, at last the kernel below):
        //   FP8: 0 = per-channel weight scale as an outer-vector A scale; 1 = as a
        //        per-row alpha vector; 2 = layers whose channel scales are all equal:
        //        one scalar A scale. BF16: 3 = bias + BF16 output. Ways 4..8: the same
        //        with GELU after the bias (tracked apart: a refusal there leaves the
        //        plain way in use).
        let ways: &[usize] = match layer.kind {
            LinearKind::Fp8 { .. } => &[0, 1, 2],
            LinearKind::Bf16 { .. } | LinearKind::Fp8WeightOnly { .. } => &[3],
            _ => &[],
        };
        if rows > 0 {
            for &way in ways {
                let slot = way + if gelu { 4 } else { 0 };
                let mut state = self.fused_epilogue.get();
                if state[slot] == Some(false) {
                    continue;
                }
                let mut epi = GemmEpilogue {
                    d_type: if self.r() == 1 {
                        ltsys::cudaDataType::CUDA_R_16BF
                    } else {
                        f32t
                    },
                    bias: match &layer.bias {
                        None => 0,
                        Some(b) if self.r() == 1 => self.ptr(self.bias16(layer, b)?),
                        Some(b) => self.ptr(b),
                    },
                    gelu,
                    ..GemmEpilogue::default()
                };
                match way {
                    0 => {
                        let Some(s) = act_scale_value else { continue };
                        epi.a_scale_vec = colscale;
                        epi.b_scale_vec = self.act_scale_vec(s, g.n as usize)?;
                    }
                    1 => epi.alpha_vec = colscale,
                    2 => match self.uniform_scale(layer)? {
                        Some(sc) => epi.a_scale = self.ptr(sc),
                        None => continue,
                    },
                    _ => {}
                }
                let out = self.talloc(n)?;
                let mut gf = g;
                gf.d = self.sptr(&out);
                gf.epi = epi;
                match self.gemm(gf) {
                    Ok(()) => {
                        state[slot] = Some(true);
                        self.fused_epilogue.set(state);
                        return Ok((self.wrap(shape, out), gelu));
                    }
                    Err(e) => {
                        // Nothing was launched (the heuristic or the matmul refused it).
                        state[slot] = Some(false);
                        self.fused_epilogue.set(state);
                        self.fused_epilogue_error.borrow_mut()[slot] = Some(format!(
                            "layer {} ({}): {e}",
                            layer.spec.name,
                            layer.kind_name()
                        ));
                    }
                }
            }
        }
        let d = self.alloc::<f32>(n)?;
        if rows > 0 {
            g.d = self.ptr(&d);
            self.gemm(g).map_err(|e| {
                bad(format!(
                    "layer {} ({}): {e}",
                    layer.spec.name,
                    layer.kind_name()
                ))
            })?;
        }
        let out = self.talloc(n)?;
        self.launch(
            "linear_epilogue_f32",
            Self::grid(n),
            &[
                Arg::P(self.ptr(&d)),
                Arg::P(colscale),
                Arg::P(layer.bias.as_ref().map_or(0, |b| self.ptr(b))),
                Arg::P(self.sptr(&out)),
                Arg::U(n as u64),
                Arg::U(outf as u64),
                Arg::I(self.r()),
            ],
        )?;
        Ok((self.wrap(shape, out), false))
    }

    /// [`LinearKind::Fp8WeightOnly`] on few rows: the `linear_w8a16` GEMV.
    fn linear_w8a16(
        &self,
        x: &CudaTensor,
        layer: &CudaLinear,
        w: &CudaSlice<u8>,
        wscale: &CudaSlice<f32>,
        rows: usize,
    ) -> Result<CudaTensor> {
        let (inp, outf) = (layer.spec.in_features, layer.spec.out_features);
        let mut shape = x.shape.clone();
        if let Some(l) = shape.last_mut() {
            *l = outf;
        }
        let out = self.talloc(rows * outf)?;
        // One warp per output channel, 8 warps a block; input rows 4 at a time (W8_ROWS).
        let cfg = LaunchConfig {
            grid_dim: (outf.div_ceil(8) as u32, rows.div_ceil(4) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch(
            "linear_w8a16",
            cfg,
            &[
                Arg::P(self.ptr(w)),
                Arg::P(self.ptr(wscale)),
                Arg::P(layer.bias.as_ref().map_or(0, |b| self.ptr(b))),
                Arg::P(self.tp(x)),
                Arg::P(self.sptr(&out)),
                Arg::I(rows as i32),
                Arg::I(inp as i32),
                Arg::I(outf as i32),
            ],
        )?;
        Ok(self.wrap(shape, out))
    }

    /// The convolution; with `residual` (`conv2d_add`), the residual added in the same
    /// cuDNN call where the channels-last path takes it: then the second value is true,
    /// otherwise the caller still has to add it.
    fn conv2d_impl(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: Option<&CudaTensor>,
        p: Conv2dParams,
        residual: Option<&CudaTensor>,
    ) -> Result<(CudaTensor, bool)> {
        let (xs, ws) = (&x.shape, &w.shape);
        if xs.len() != 4 || ws.len() != 4 || ws[1] != xs[1] || p.stride == 0 {
            return Err(bad(format!("conv2d: input {xs:?}, kernel {ws:?}")));
        }
        let (bn, cin, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
        let (cout, kh, kw) = (ws[0], ws[2], ws[3]);
        if h + 2 * p.padding < kh || wd + 2 * p.padding < kw {
            return Err(bad("conv2d: kernel larger than padded input"));
        }
        if let Some(bias) = b
            && bias.numel() != cout
        {
            return Err(bad(format!(
                "conv2d: bias {:?} for {cout} output channels",
                bias.shape
            )));
        }
        let path = self.conv_path.get();
        let problem = conv::ConvProblem {
            batch: bn,
            in_channels: cin,
            height: h,
            width: wd,
            out_channels: cout,
            kernel_h: kh,
            kernel_w: kw,
            stride: p.stride,
            padding: p.padding,
            channels_last: path == ConvPath::CudnnNhwc,
        };
        if self.precision != CudaPrecision::F32
            && bn * cin * cout * h * wd > 0
            && path.uses_cudnn()
            && self.cudnn_ready()
        {
            // Channels-last first (when that is the path), then NCHW for a problem cuDNN
            // refuses channels-last; im2col only where it refuses both.
            let (ho, wo) = problem.output_hw();
            let layouts: &[bool] = if problem.channels_last {
                &[true, false]
            } else {
                &[false]
            };
            for &channels_last in layouts {
                let problem = conv::ConvProblem {
                    channels_last,
                    ..problem
                };
                if self.cudnn_refused(&problem) {
                    continue;
                }
                let (xv, wv) = if channels_last {
                    (self.channels_last(x)?, self.channels_last(w)?)
                } else {
                    (self.row_major(x)?, self.row_major(w)?)
                };
                let fused = residual.filter(|r| {
                    channels_last && r.is_channels_last() && r.shape == [bn, cout, ho, wo]
                });
                let fill = match fused {
                    Some(residual) => ConvFill::Residual { residual, bias: b },
                    None => b.map_or(ConvFill::Nothing, ConvFill::Bias),
                };
                if let Some(y) = self.conv2d_cudnn(&xv, &wv, fill, &problem)? {
                    return Ok((y, fused.is_some()));
                }
            }
        }
        // im2col + GEMM reads NCHW input and KCRS filters.
        let (x, w) = (self.row_major(x)?, self.row_major(w)?);
        let (x, w) = (x.as_ref(), w.as_ref());
        let (ho, wo) = problem.output_hw();
        let kk = cin * kh * kw;
        // The GEMMs write f32 (the bias is added before the one BF16 rounding).
        let out = self.alloc::<f32>(bn * cout * ho * wo)?;
        // Bands of output rows keep the im2col buffer near 256 MiB.
        let band = ((64 << 20) / (kk * wo).max(1)).clamp(1, ho);
        let out_base = self.ptr(&out);
        // BF16 / FP8 precision: inputs and kernels are stored as BF16, so the GEMM runs on
        // BF16 tensor cores (f32 accumulation) over a BF16 im2col; FP32 stays in f32.
        // The buffers live to the end of the function (stream-ordered frees).
        let (col16, col32);
        let (im2col, dtype, col_ptr, w_ptr) = if self.precision != CudaPrecision::F32 {
            col16 = self.alloc::<u16>(kk * band * wo)?;
            let bf16 = ltsys::cudaDataType::CUDA_R_16BF;
            ("im2col_bf16", bf16, self.ptr(&col16), self.tp(w))
        } else {
            col32 = self.alloc::<f32>(kk * band * wo)?;
            let f32t = ltsys::cudaDataType::CUDA_R_32F;
            ("im2col_f32", f32t, self.ptr(&col32), self.tp(w))
        };
        for bi in 0..bn {
            let x_ptr = self.tp(x) + (bi * cin * h * wd * self.es()) as u64;
            let mut r0 = 0;
            while r0 < ho {
                let rows = band.min(ho - r0);
                let cols = rows * wo;
                self.launch(
                    im2col,
                    Self::grid(kk * cols),
                    &[
                        Arg::P(x_ptr),
                        Arg::P(col_ptr),
                        Arg::I(cin as i32),
                        Arg::I(h as i32),
                        Arg::I(wd as i32),
                        Arg::I(kh as i32),
                        Arg::I(kw as i32),
                        Arg::I(p.stride as i32),
                        Arg::I(p.padding as i32),
                        Arg::I(wo as i32),
                        Arg::I(r0 as i32),
                        Arg::I(rows as i32),
                    ],
                )?;
                // out^T[cols, cout] (column-major, ld = ho*wo) = col^T[cols, kk] x W^T[kk, cout]
                self.gemm(Gemm {
                    transa: false,
                    transb: false,
                    m: cols as u64,
                    n: cout as u64,
                    k: kk as u64,
                    a: col_ptr,
                    a_type: dtype,
                    lda: cols as i64,
                    b: w_ptr,
                    b_type: dtype,
                    ldb: kk as i64,
                    d: out_base + ((bi * cout * ho * wo + r0 * wo) * 4) as u64,
                    ldd: (ho * wo) as i64,
                    b_scale: 0,
                    alpha: 1.0,
                    epi: GemmEpilogue::default(),
                    batch: GemmBatch::ONE,
                    fast_accum: false,
                })?;
                r0 += rows;
            }
        }
        let n = bn * cout * ho * wo;
        let y = self.talloc(n)?;
        self.launch(
            "channel_bias_f32",
            Self::grid(n),
            &[
                Arg::P(out_base),
                Arg::P(b.map_or(0, |b| self.tp(b))),
                Arg::P(self.sptr(&y)),
                Arg::U(n as u64),
                Arg::U((ho * wo) as u64),
                Arg::U(cout as u64),
                Arg::I(self.r()),
            ],
        )?;
        drop(out);
        Ok((self.wrap(vec![bn, cout, ho, wo], y), false))
    }

    /// The convolution on cuDNN (BF16 storage), or None when cuDNN is unavailable, turned
    /// off, or refuses this problem: the caller then runs im2col + GEMM.
    fn conv2d_cudnn(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        fill: ConvFill<'_>,
        p: &conv::ConvProblem,
    ) -> Result<Option<CudaTensor>> {
        // The caller has opened cuDNN (`cudnn_ready`) before choosing the layouts.
        self.ctx.bind_to_thread()?;
        let mut state = self.cudnn.borrow_mut();
        let conv::CudnnState::Ready(dnn) = &mut *state else {
            return Ok(None);
        };
        let descs = match conv::ConvDescriptors::new(p) {
            Ok(d) => d,
            Err(why) => {
                dnn.refuse(p, why);
                return Ok(None);
            }
        };
        let Ok(plan) = dnn.plan(p, &descs) else {
            return Ok(None);
        };
        let (ho, wo) = p.output_hw();
        let n = p.batch * p.out_channels * ho * wo;
        // What cuDNN adds the (BF16-rounded) convolution into (beta = 1), written first:
        // it saves a separate pass over the output for the bias, and for the residual.
        let y = match fill {
            ConvFill::Nothing => self.wrap(vec![n], self.talloc(n)?),
            ConvFill::Bias(bias) => {
                let y = self.talloc(n)?;
                // Channels-last: the channel is the innermost index (a plane of one value).
                let plane = if p.channels_last { 1 } else { ho * wo };
                self.launch(
                    "channel_fill",
                    Self::grid(n),
                    &[
                        Arg::P(self.tp(bias)),
                        Arg::P(self.sptr(&y)),
                        Arg::U(n as u64),
                        Arg::U(plane as u64),
                        Arg::U(p.out_channels as u64),
                        Arg::I(self.r()),
                    ],
                )?;
                self.wrap(vec![n], y)
            }
            // residual + bias (channels-last only: the bias repeats every C values), or
            // a copy of the residual.
            ConvFill::Residual { residual, bias } => {
                let r = Self::physical(residual);
                match bias {
                    Some(bias) if p.channels_last => {
                        self.binary(&r, bias, p.out_channels, 0, 0.0)?
                    }
                    // The unary kernel's copy (op 0): the stored bits as they are.
                    None => self.unary(&r, 0, 0.0, 0.0)?,
                    Some(_) => {
                        return Err(bad("conv2d: a residual with a bias needs channels-last"));
                    }
                }
            }
        };
        let workspace = self.alloc::<u8>(plan.workspace_bytes)?;
        let beta = if matches!(fill, ConvFill::Nothing) {
            0.0
        } else {
            1.0
        };
        // SAFETY: x, w and y are live BF16 buffers of the shapes `descs` describes (x and
        // w checked by the caller, y made above with the output's element count), the
        // workspace has the plan's size, and cuDNN runs on this backend's stream.
        let run = unsafe {
            dnn.forward(
                &descs,
                &plan,
                self.tp(x),
                self.tp(w),
                self.tp(&y),
                self.ptr(&workspace),
                beta,
            )
        };
        drop(workspace);
        if let Err(why) = run {
            dnn.refuse(p, why);
            return Ok(None);
        }
        if matches!(fill, ConvFill::Residual { .. }) {
            dnn.count_fused_residual();
        }
        let shape = vec![p.batch, p.out_channels, ho, wo];
        let layout = if p.channels_last {
            Layout::ChannelsLast
        } else {
            Layout::RowMajor
        };
        Ok(Some(Self::relabel(&y, shape, layout)))
    }

    /// Whether cuDNN is known to refuse `p` (it then goes to the next layout or im2col
    /// without converting its operands first).
    fn cudnn_refused(&self, p: &conv::ConvProblem) -> bool {
        match &*self.cudnn.borrow() {
            conv::CudnnState::Ready(dnn) => dnn.refused(p),
            _ => true,
        }
    }

    /// Opens cuDNN on first use; whether it is ready (the convolution path may still
    /// say im2col).
    fn cudnn_ready(&self) -> bool {
        if self.ctx.bind_to_thread().is_err() {
            return false;
        }
        let mut state = self.cudnn.borrow_mut();
        if matches!(*state, conv::CudnnState::Unopened) {
            *state = match conv::Cudnn::open(self.stream.cu_stream()) {
                Ok(c) => conv::CudnnState::Ready(Box::new(c)),
                Err(why) => conv::CudnnState::Unavailable(why),
            };
        }
        matches!(*state, conv::CudnnState::Ready(_))
    }

    fn attention_impl(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        p: AttentionParams<'_, CudaTensor>,
    ) -> Result<CudaTensor> {
        let (qs, ks, vs) = (&q.shape, &k.shape, &v.shape);
        if qs.len() != 3 || ks.len() != 3 || ks != vs || qs[0] != ks[0] || qs[2] != ks[2] {
            return Err(bad(format!("attention: q {qs:?}, k {ks:?}, v {vs:?}")));
        }
        let (b, sq, c) = (qs[0], qs[1], qs[2]);
        let sk = ks[1];
        if p.heads == 0 || c % p.heads != 0 {
            return Err(bad("attention: channels not divisible by heads"));
        }
        if let Some(bias) = p.bias
            && bias.shape != [p.heads, sq, sk]
        {
            return Err(bad(format!(
                "attention: bias {:?}, expected {:?}",
                bias.shape,
                [p.heads, sq, sk]
            )));
        }
        let d = c / p.heads;
        if self.flash.get()
            && d == 64
            && p.bias.is_none()
            && !p.causal
            && self.precision != CudaPrecision::F32
            && b * sq * sk > 0
        {
            // BF16/FP8 precision only: q, k, v and the output are stored as BF16.
            let (out, _) = self.flash_attention([q, k, v], None, p.heads, p.scale)?;
            return Ok(out);
        }
        // Large head dims (the VAE), and T5's biased attention (while fast kernels are
        // on: `SD_CUDA_ATTENTION=exact` keeps the exact kernel for biases too): GEMMs.
        if (d > 64 || (p.bias.is_some() && self.flash.get()))
            && !p.causal
            && self.precision != CudaPrecision::F32
            && p.heads * sq * sk * 6 <= (2usize << 30)
            && p.heads <= i32::MAX as usize
            && d.is_multiple_of(8)
            && sk.is_multiple_of(8)
            && b * sq * sk > 0
        {
            return self.attention_gemm(q, k, v, p.bias, b, sq, sk, p.heads, d, p.scale);
        }
        let pl = d.div_ceil(32).next_power_of_two();
        if pl > 32 {
            return Err(bad(format!("attention: head dim {d} > 1024")));
        }
        let out = self.talloc(b * sq * c)?;
        let warps = b * p.heads * sq;
        let per_block = (THREADS / 32) as usize;
        let cfg = LaunchConfig {
            grid_dim: (warps.div_ceil(per_block).max(1) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        if warps > 0 {
            self.launch(
                &format!("attention_pl{pl}"),
                cfg,
                &[
                    Arg::P(self.tp(q)),
                    Arg::P(self.tp(k)),
                    Arg::P(self.tp(v)),
                    Arg::P(p.bias.map_or(0, |t| self.tp(t))),
                    Arg::P(self.sptr(&out)),
                    Arg::I(b as i32),
                    Arg::I(sq as i32),
                    Arg::I(sk as i32),
                    Arg::I(p.heads as i32),
                    Arg::I(d as i32),
                    Arg::F(p.scale),
                    Arg::I(p.causal as i32),
                    Arg::I(self.r()),
                ],
            )?;
        }
        Ok(self.wrap(qs.clone(), out))
    }

    /// Whether [`Inner::flash_attention`] takes two segments (MMDiT's joint attention
    /// read and written in place): the wgmma kernels do, on Hopper.
    fn flash_joint(&self) -> bool {
        self.hopper && flash_variant_for(true).needs_hopper()
    }

    /// Head-dim-64 flash attention (BF16 storage) of `first` = [q, k, v], each
    /// `[B, S, H*64]`, optionally followed by a second segment of the same sequence
    /// (`[B, S2, H*64]`, its rows after the first's: joint attention without a concat;
    /// only when [`Inner::flash_joint`]). Returns the output rows of each segment.
    fn flash_attention(
        &self,
        first: [&CudaTensor; 3],
        second: Option<[&CudaTensor; 3]>,
        heads: usize,
        scale: f32,
    ) -> Result<(CudaTensor, Option<CudaTensor>)> {
        let [q, k, v] = first;
        let (b, sq1, c) = (q.shape[0], q.shape[1], q.shape[2]);
        let sk1 = k.shape[1];
        let (sq2, sk2) = second.map_or((0, 0), |[q2, k2, _]| (q2.shape[1], k2.shape[1]));
        let fk = flash_variant_for(self.hopper).kernel();
        let out1 = self.talloc(b * sq1 * c)?;
        if !fk.wgmma {
            if second.is_some() {
                return Err(bad("flash attention: two segments need the wgmma kernels"));
            }
            let cfg = LaunchConfig {
                grid_dim: (sq1.div_ceil(fk.rows) as u32, heads as u32, b as u32),
                block_dim: (fk.threads, 1, 1),
                shared_mem_bytes: 0,
            };
            self.launch(
                fk.name,
                cfg,
                &[
                    Arg::P(self.tp(q)),
                    Arg::P(self.tp(k)),
                    Arg::P(self.tp(v)),
                    Arg::P(self.sptr(&out1)),
                    Arg::I(sq1 as i32),
                    Arg::I(sk1 as i32),
                    Arg::I(heads as i32),
                    Arg::F(scale),
                ],
            )?;
            return Ok((self.wrap(q.shape.clone(), out1), None));
        }
        let out2 = match second {
            Some(_) => Some(self.talloc(b * sq2 * c)?),
            None => None,
        };
        // An absent second segment passes the first's pointers (never read: 0 rows).
        let [q2, k2, v2] = second.unwrap_or(first);
        let o2 = out2.as_ref().map_or(self.sptr(&out1), |o| self.sptr(o));
        let cfg = LaunchConfig {
            grid_dim: ((sq1 + sq2).div_ceil(fk.rows) as u32, heads as u32, b as u32),
            block_dim: (fk.threads, 1, 1),
            shared_mem_bytes: fk.shared_bytes,
        };
        // The two kernel families take K and V differently: the TMA kernels as tensor
        // maps ahead of everything else, the others as pointers next to their Q.
        let mut args = Vec::with_capacity(14);
        if fk.tma {
            // K and V of each segment through a tensor map; an absent second segment
            // repeats the first's (no tile of it is ever loaded).
            let kv_map = |t: &CudaTensor| tma_kv_map(self.tp(t), t.shape[1], heads, b);
            let (k1m, v1m) = (kv_map(k)?, kv_map(v)?);
            let (k2m, v2m) = if second.is_some() {
                (kv_map(k2)?, kv_map(v2)?)
            } else {
                (k1m, v1m)
            };
            args.extend([
                Arg::Tma(k1m),
                Arg::Tma(v1m),
                Arg::Tma(k2m),
                Arg::Tma(v2m),
                Arg::P(self.tp(q)),
                Arg::P(self.sptr(&out1)),
                Arg::I(sq1 as i32),
                Arg::I(sk1 as i32),
                Arg::P(self.tp(q2)),
                Arg::P(o2),
            ]);
        } else {
            args.extend([
                Arg::P(self.tp(q)),
                Arg::P(self.tp(k)),
                Arg::P(self.tp(v)),
                Arg::P(self.sptr(&out1)),
                Arg::I(sq1 as i32),
                Arg::I(sk1 as i32),
                Arg::P(self.tp(q2)),
                Arg::P(self.tp(k2)),
                Arg::P(self.tp(v2)),
                Arg::P(o2),
            ]);
        }
        args.extend([
            Arg::I(sq2 as i32),
            Arg::I(sk2 as i32),
            Arg::I(heads as i32),
            Arg::F(scale),
        ]);
        self.launch(fk.name, cfg, &args)?;
        let o1 = self.wrap(q.shape.clone(), out1);
        let o2 = out2.map(|o| self.wrap(q2.shape.clone(), o));
        Ok((o1, o2))
    }

    /// Attention as two BF16 GEMMs around a row softmax, every head in one strided-batch
    /// GEMM: S = scale Q K^T (+ bias) in f32, P = softmax(S) in BF16, O = P V. For large
    /// head dims (the VAE's one 512-wide head) and for an additive bias (T5's relative
    /// positions), which the flash kernels do not take.
    #[allow(clippy::too_many_arguments)]
    fn attention_gemm(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        bias: Option<&CudaTensor>,
        b: usize,
        sq: usize,
        sk: usize,
        heads: usize,
        d: usize,
        scale: f32,
    ) -> Result<CudaTensor> {
        let c = heads * d;
        let bf = ltsys::cudaDataType::CUDA_R_16BF;
        // BF16/FP8 precision only: q, k and v are stored as BF16, the GEMM operands as
        // they are.
        let (qb, kb, vb) = (self.tp(q), self.tp(k), self.tp(v));
        let scores = heads * sq * sk;
        let sbuf = self.alloc::<f32>(scores)?;
        let pbuf = self.alloc::<u16>(scores)?;
        let d_raw = self.alloc::<f32>(b * sq * c)?;
        let (s_ptr, p_ptr) = (self.ptr(&sbuf), self.ptr(&pbuf));
        for bi in 0..b {
            let q_off = (bi * sq * c * 2) as u64;
            let kv_off = (bi * sk * c * 2) as u64;
            // S_h^T (column-major [sk, sq]) = K_h Q_h^T: row-major S_h [sq, sk]; head h
            // reads q and k d columns further and writes sq * sk further.
            self.gemm(Gemm {
                transa: true,
                transb: false,
                m: sk as u64,
                n: sq as u64,
                k: d as u64,
                a: kb + kv_off,
                a_type: bf,
                lda: c as i64,
                b: qb + q_off,
                b_type: bf,
                ldb: c as i64,
                d: s_ptr,
                ldd: sk as i64,
                b_scale: 0,
                alpha: scale,
                epi: GemmEpilogue::default(),
                batch: GemmBatch {
                    count: heads as i32,
                    stride_a: d as i64,
                    stride_b: d as i64,
                    stride_d: (sq * sk) as i64,
                },
                fast_accum: false,
            })?;
            // Rows h * sq + i of S line up with the bias [H, Sq, Sk] (shared by the
            // batch entries).
            let rows = heads * sq;
            self.launch(
                "softmax_rows_bf16",
                Self::rows_cfg(rows, if sk <= 1024 { 128 } else { 512 }),
                &[
                    Arg::P(s_ptr),
                    Arg::P(bias.map_or(0, |t| self.tp(t))),
                    Arg::P(p_ptr),
                    Arg::I(sk as i32),
                    Arg::I(self.r()),
                ],
            )?;
            // O_h^T (column-major [d, sq], ld c) = V_h^T P_h^T, head h written d columns
            // further.
            self.gemm(Gemm {
                transa: false,
                transb: false,
                m: d as u64,
                n: sq as u64,
                k: sk as u64,
                a: vb + kv_off,
                a_type: bf,
                lda: c as i64,
                b: p_ptr,
                b_type: bf,
                ldb: sk as i64,
                d: self.ptr(&d_raw) + (bi * sq * c * 4) as u64,
                ldd: c as i64,
                b_scale: 0,
                alpha: 1.0,
                epi: GemmEpilogue::default(),
                batch: GemmBatch {
                    count: heads as i32,
                    stride_a: d as i64,
                    stride_b: (sq * sk) as i64,
                    stride_d: d as i64,
                },
                fast_accum: false,
            })?;
        }
        let n = b * sq * c;
        let out = self.talloc(n)?;
        self.launch(
            "linear_epilogue_f32",
            Self::grid(n),
            &[
                Arg::P(self.ptr(&d_raw)),
                Arg::P(0),
                Arg::P(0),
                Arg::P(self.sptr(&out)),
                Arg::U(n as u64),
                Arg::U(c as u64),
                Arg::I(self.r()),
            ],
        )?;
        drop((sbuf, pbuf, d_raw));
        Ok(self.wrap(vec![b, sq, c], out))
    }

    fn permute_impl(&self, x: &CudaTensor, perm: &[usize]) -> Result<CudaTensor> {
        let s = &x.shape;
        let n = s.len();
        let mut seen = vec![false; n];
        if n > 6
            || perm.len() != n
            || perm
                .iter()
                .any(|&p| p >= n || std::mem::replace(&mut seen[p], true))
        {
            return Err(bad(format!("permute: {perm:?} for {s:?}")));
        }
        let mut in_strides = vec![1usize; n];
        for i in (0..n.saturating_sub(1)).rev() {
            in_strides[i] = in_strides[i + 1] * s[i + 1];
        }
        let shape: Vec<usize> = perm.iter().map(|&p| s[p]).collect();
        let mut od = [1i64; 6];
        let mut st = [0i64; 6];
        for (i, &p) in perm.iter().enumerate() {
            od[6 - n + i] = s[p] as i64;
            st[6 - n + i] = in_strides[p] as i64;
        }
        let total = x.numel();
        let out = self.talloc(total)?;
        if total > 0 {
            let mut args = vec![
                Arg::P(self.tp(x)),
                Arg::P(self.sptr(&out)),
                Arg::U(total as u64),
            ];
            args.extend(od.iter().map(|&v| Arg::L(v)));
            args.extend(st.iter().map(|&v| Arg::L(v)));
            args.push(Arg::I(self.r()));
            self.launch("permute_f32", Self::grid(total), &args)?;
        }
        Ok(self.wrap(shape, out))
    }

    fn gather_rows(
        &self,
        src: &CudaTensor,
        idx: &[u32],
        c: usize,
        shape: Vec<usize>,
    ) -> Result<CudaTensor> {
        let rows = idx.len();
        let out = self.talloc(rows * c)?;
        if rows * c > 0 {
            self.not_capturing("a host upload of row indices")?;
            let ids = self.stream.clone_htod(idx)?;
            self.launch(
                "gather_rows_f32",
                Self::grid(rows * c),
                &[
                    Arg::P(self.tp(src)),
                    Arg::P(self.ptr(&ids)),
                    Arg::P(self.sptr(&out)),
                    Arg::U(rows as u64),
                    Arg::U(c as u64),
                    Arg::I(self.r()),
                ],
            )?;
        }
        Ok(self.wrap(shape, out))
    }
}

fn me<T>(r: Result<T>) -> sd_model::Result<T> {
    r.map_err(ModelError::from)
}

impl Inner {
    fn upload(&self, t: &HostTensor) -> sd_model::Result<CudaTensor> {
        me(self.not_capturing("a host upload"))?;
        let buf = if self.precision != CudaPrecision::F32 {
            // Round to nearest even BF16, as every operation's output is.
            let bits: Vec<u16> = t
                .data
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_bits())
                .collect();
            Storage::Bf16(if bits.is_empty() {
                me(self.zeros::<u16>(1))?
            } else {
                me(self.stream.clone_htod(&bits).map_err(CudaError::from))?
            })
        } else {
            Storage::F32(me(self.upload_f32(&t.data))?)
        };
        Ok(self.wrap(t.shape.clone(), buf))
    }

    fn download(&self, t: &CudaTensor) -> sd_model::Result<HostTensor> {
        me(self.not_capturing("a download to the host"))?;
        let t = self.rm(t)?;
        let mut data = match &**t.buf {
            Storage::F32(b) => me(self.stream.clone_dtoh(b).map_err(CudaError::from))?,
            Storage::Bf16(b) => me(self.stream.clone_dtoh(b).map_err(CudaError::from))?
                .into_iter()
                .map(|h| half::bf16::from_bits(h).to_f32())
                .collect(),
        };
        data.truncate(t.numel());
        Ok(HostTensor {
            shape: t.shape.clone(),
            data,
        })
    }

    fn load_param(&self, w: &WeightTensor<'_>) -> sd_model::Result<CudaTensor> {
        self.param_bytes
            .set(self.param_bytes.get() + (self.es() * w.numel()) as u64);
        let host = w.to_host();
        if host.shape.len() == 4 && self.conv_filters_channels_last() {
            // A convolution filter [K, C, R, S] goes up as KRSC, the layout cuDNN's
            // channels-last kernels read: transposed once here, not at every call. (The
            // models have no other 4-D parameters; any other reader gets a row-major copy.)
            let t = self.upload(&channels_last::host_krsc(&host))?;
            return Ok(Self::relabel(&t, host.shape, Layout::ChannelsLast));
        }
        self.upload(&host)
    }

    fn load_linear(
        &self,
        spec: &LinearSpec,
        weight: &WeightTensor<'_>,
        bias: Option<&WeightTensor<'_>>,
        packed: Option<PackedFp8Weight>,
    ) -> sd_model::Result<CudaLinear> {
        me(self.load_linear_impl(spec, weight, bias, packed))
    }

    fn linear(&self, x: &CudaTensor, layer: &CudaLinear) -> sd_model::Result<CudaTensor> {
        self.profile_linear_key(x, layer, "");
        me(self.linear_impl(x, layer))
    }

    fn linear_gelu(&self, x: &CudaTensor, layer: &CudaLinear) -> sd_model::Result<CudaTensor> {
        self.profile_linear_key(x, layer, " +gelu");
        me(self.linear_gelu_impl(x, layer))
    }

    /// The profile's name of a linear operation ("linear fp8 8192x1536->1536").
    fn profile_linear_key(&self, x: &CudaTensor, layer: &CudaLinear, suffix: &str) {
        if self.profile.borrow().is_some() {
            let kind = match &layer.kind {
                LinearKind::F32 { .. } => "f32",
                LinearKind::Bf16 { .. } => "bf16",
                LinearKind::Fp8 { .. } => "fp8",
                LinearKind::Fp8ViaBf16 { .. } => "fp8-via-bf16",
                LinearKind::Fp8Emulated { .. } => "fp8-emulated",
                LinearKind::Fp8WeightOnly { .. } => "w8a16",
            };
            let rows = x.numel() / layer.spec.in_features.max(1);
            self.op_key.set(Some(format!(
                "linear {kind} {}x{}->{}{suffix}",
                rows, layer.spec.in_features, layer.spec.out_features
            )));
        }
    }

    fn layer_norm(
        &self,
        x: &CudaTensor,
        gamma: Option<&CudaTensor>,
        beta: Option<&CudaTensor>,
        eps: f32,
    ) -> sd_model::Result<CudaTensor> {
        let c = *x.shape.last().unwrap_or(&1);
        let rows = x.numel() / c.max(1);
        let out = me(self.talloc(x.numel()))?;
        if rows > 0 {
            me(self.launch(
                "layer_norm_f32",
                Self::rows_cfg(rows, THREADS),
                &[
                    Arg::P(self.tp(x)),
                    Arg::P(gamma.map_or(0, |g| self.tp(g))),
                    Arg::P(beta.map_or(0, |b| self.tp(b))),
                    Arg::P(self.sptr(&out)),
                    Arg::I(c as i32),
                    Arg::F(eps),
                    Arg::I(self.r()),
                ],
            ))?;
        }
        Ok(self.wrap(x.shape.clone(), out))
    }

    /// `next`: the linear layer the output feeds; an FP8 one gets its input codes written
    /// in the same pass (see [`Inner::fused_input_codes`]).
    fn layer_norm_modulate(
        &self,
        x: &CudaTensor,
        shift: &CudaTensor,
        scale: &CudaTensor,
        eps: f32,
        next: Option<&CudaLinear>,
    ) -> sd_model::Result<CudaTensor> {
        let (b, c) = me(Self::batch_channels(
            &x.shape,
            &shift.shape,
            "layer_norm_modulate",
        ))?;
        me(Self::same(
            &shift.shape,
            &scale.shape,
            "layer_norm_modulate",
        ))?;
        let rows = x.numel() / c.max(1);
        let out = me(self.talloc(x.numel()))?;
        if rows > 0 && self.r() == 1 && c % 8 == 0 && c <= LN_WARP_MAX_CHANNELS {
            // BF16 storage, rows up to LN_CPL chunks a lane: one warp per row.
            let codes = me(self.fused_input_codes(next, rows * c))?;
            let [q, qscale, qfmt] = codes
                .as_ref()
                .map_or([Arg::P(0), Arg::P(0), Arg::I(0)], |f| f.args(self));
            me(self.launch(
                "layer_norm_modulate_warp_bf16x8",
                Self::grid(rows * 32),
                &[
                    Arg::P(self.tp(x)),
                    Arg::P(self.tp(shift)),
                    Arg::P(self.tp(scale)),
                    Arg::P(self.sptr(&out)),
                    Arg::U(rows as u64),
                    Arg::I(c as i32),
                    Arg::F(eps),
                    Arg::U((rows / b.max(1)) as u64),
                    q,
                    qscale,
                    qfmt,
                ],
            ))?;
            let y = self.wrap(x.shape.clone(), out);
            if let Some(codes) = codes {
                codes.remember_for(self, &y);
            }
            return Ok(y);
        } else if rows > 0 && self.r() == 1 && c % 8 == 0 && c <= 16 * THREADS as usize {
            // BF16 storage: 16-byte accesses, the row held in registers.
            me(self.launch(
                "layer_norm_modulate_bf16x8",
                Self::rows_cfg(rows, THREADS),
                &[
                    Arg::P(self.tp(x)),
                    Arg::P(self.tp(shift)),
                    Arg::P(self.tp(scale)),
                    Arg::P(self.sptr(&out)),
                    Arg::I(c as i32),
                    Arg::F(eps),
                    Arg::U((rows / b.max(1)) as u64),
                ],
            ))?;
        } else if rows > 0 {
            me(self.launch(
                "layer_norm_modulate_f32",
                Self::rows_cfg(rows, THREADS),
                &[
                    Arg::P(self.tp(x)),
                    Arg::P(self.tp(shift)),
                    Arg::P(self.tp(scale)),
                    Arg::P(self.sptr(&out)),
                    Arg::I(c as i32),
                    Arg::F(eps),
                    Arg::U((rows / b.max(1)) as u64),
                    Arg::I(self.r()),
                ],
            ))?;
        }
        Ok(self.wrap(x.shape.clone(), out))
    }

    /// The fused gated residual + LayerNorm + modulate (one warp per row), or None where
    /// that kernel does not apply (the caller runs the two operations).
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn gated_add_layer_norm_modulate(
        &self,
        x: &CudaTensor,
        gate: &CudaTensor,
        y: &CudaTensor,
        shift: &CudaTensor,
        scale: &CudaTensor,
        eps: f32,
        next: Option<&CudaLinear>,
    ) -> sd_model::Result<Option<(CudaTensor, CudaTensor)>> {
        let c = *x.shape.last().unwrap_or(&0);
        let applies = self.r() == 1
            && x.shape.len() == 3
            && y.shape == x.shape
            && c.is_multiple_of(8)
            && c <= LN_WARP_MAX_CHANNELS
            && [gate, shift, scale]
                .iter()
                .all(|t| t.shape == [x.shape[0], c])
            && x.numel() > 0;
        if !applies {
            return Ok(None);
        }
        let rows = x.numel() / c;
        let res = me(self.talloc(x.numel()))?;
        let out = me(self.talloc(x.numel()))?;
        let codes = me(self.fused_input_codes(next, x.numel()))?;
        let [q, qscale, qfmt] = codes
            .as_ref()
            .map_or([Arg::P(0), Arg::P(0), Arg::I(0)], |f| f.args(self));
        me(self.launch(
            "gated_add_layer_norm_modulate_warp_bf16x8",
            Self::grid(rows * 32),
            &[
                Arg::P(self.tp(x)),
                Arg::P(self.tp(gate)),
                Arg::P(self.tp(y)),
                Arg::P(self.tp(shift)),
                Arg::P(self.tp(scale)),
                Arg::P(self.sptr(&res)),
                Arg::P(self.sptr(&out)),
                Arg::U(rows as u64),
                Arg::I(c as i32),
                Arg::F(eps),
                Arg::U(x.shape[1] as u64),
                q,
                qscale,
                qfmt,
            ],
        ))?;
        let normalized = self.wrap(x.shape.clone(), out);
        if let Some(codes) = codes {
            codes.remember_for(self, &normalized);
        }
        Ok(Some((self.wrap(x.shape.clone(), res), normalized)))
    }

    /// For a norm whose output feeds `next`: when `next` is an FP8 linear layer (FP8
    /// input, not weight-only), a buffer for the `n` input codes the norm kernel writes
    /// along with its output, and the layer's activation scale and format.
    fn fused_input_codes<'a>(
        &self,
        next: Option<&'a CudaLinear>,
        n: usize,
    ) -> Result<Option<FusedCodes<'a>>> {
        let Some(LinearKind::Fp8 {
            act,
            act_scale,
            act_scale_dev,
            ..
        }) = next.map(|l| &l.kind)
        else {
            return Ok(None);
        };
        if n == 0 || self.r() != 1 {
            return Ok(None);
        }
        Ok(Some(FusedCodes {
            codes: Arc::new(self.alloc::<u8>(n)?),
            n,
            scale: *act_scale,
            scale_dev: act_scale_dev,
            format: *act,
        }))
    }

    fn modulate(
        &self,
        x: &CudaTensor,
        shift: &CudaTensor,
        scale: &CudaTensor,
    ) -> sd_model::Result<CudaTensor> {
        let (b, c) = me(Self::batch_channels(&x.shape, &shift.shape, "modulate"))?;
        me(Self::same(&shift.shape, &scale.shape, "modulate"))?;
        let n = x.numel();
        let out = me(self.talloc(n))?;
        me(self.launch(
            "modulate_f32",
            Self::grid(n),
            &[
                Arg::P(self.tp(x)),
                Arg::P(self.tp(shift)),
                Arg::P(self.tp(scale)),
                Arg::P(self.sptr(&out)),
                Arg::U(n as u64),
                Arg::U((n / b.max(1)) as u64),
                Arg::U(c as u64),
                Arg::I(self.r()),
            ],
        ))?;
        Ok(self.wrap(x.shape.clone(), out))
    }

    fn rms_norm(
        &self,
        x: &CudaTensor,
        gamma: Option<&CudaTensor>,
        eps: f32,
    ) -> sd_model::Result<CudaTensor> {
        let c = *x.shape.last().unwrap_or(&1);
        let rows = x.numel() / c.max(1);
        let out = me(self.talloc(x.numel()))?;
        // (The row-64 kernel does not loop: one thread per 8 values, within grid()'s cap.)
        if rows > 0 && c == 64 && self.r() == 1 && rows * 8 <= (THREADS as usize) << 20 {
            // Per-head qk norm in BF16 storage: 8 threads per row, 16-byte accesses.
            me(self.launch(
                "rms_norm_row64_bf16",
                Self::grid(rows * 8),
                &[
                    Arg::P(self.tp(x)),
                    Arg::P(gamma.map_or(0, |g| self.tp(g))),
                    Arg::P(self.sptr(&out)),
                    Arg::U(rows as u64),
                    Arg::F(eps),
                ],
            ))?;
        } else if rows > 0 && c <= 1024 {
            // Short rows: one warp per row.
            me(self.launch(
                "rms_norm_warp_f32",
                Self::grid(rows * 32),
                &[
                    Arg::P(self.tp(x)),
                    Arg::P(gamma.map_or(0, |g| self.tp(g))),
                    Arg::P(self.sptr(&out)),
                    Arg::U(rows as u64),
                    Arg::I(c as i32),
                    Arg::F(eps),
                    Arg::I(self.r()),
                ],
            ))?;
        } else if rows > 0 {
            me(self.launch(
                "rms_norm_f32",
                Self::rows_cfg(rows, THREADS),
                &[
                    Arg::P(self.tp(x)),
                    Arg::P(gamma.map_or(0, |g| self.tp(g))),
                    Arg::P(self.sptr(&out)),
                    Arg::I(c as i32),
                    Arg::F(eps),
                    Arg::I(self.r()),
                ],
            ))?;
        }
        Ok(self.wrap(x.shape.clone(), out))
    }

    fn group_norm(
        &self,
        x: &CudaTensor,
        groups: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> sd_model::Result<CudaTensor> {
        self.group_norm_act(x, groups, gamma, beta, eps, false)
    }

    fn group_norm_silu(
        &self,
        x: &CudaTensor,
        groups: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> sd_model::Result<CudaTensor> {
        self.group_norm_act(x, groups, gamma, beta, eps, true)
    }

    /// Group norm, with SiLU applied in the same pass when `silu`.
    fn group_norm_act(
        &self,
        x: &CudaTensor,
        groups: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
        silu: bool,
    ) -> sd_model::Result<CudaTensor> {
        let s = &x.shape;
        if s.len() != 4 || groups == 0 || !s[1].is_multiple_of(groups) {
            return Err(ModelError::backend(format!(
                "group_norm: shape {s:?} with {groups} groups"
            )));
        }
        if gamma.numel() != s[1] || beta.numel() != s[1] {
            return Err(ModelError::backend(format!(
                "group_norm: {} channels, affine parameters {:?} and {:?}",
                s[1], gamma.shape, beta.shape
            )));
        }
        // Channels-last input (the VAE): normalised in place of layout where the kernels
        // take it.
        if let Some(y) = me(self.group_norm_channels_last(x, groups, gamma, beta, eps, silu))? {
            return Ok(y);
        }
        let x = self.rm(x)?;
        let x = x.as_ref();
        let out = me(self.talloc(x.numel()))?;
        let len = (s[1] / groups) * s[2] * s[3];
        let blocks = s[0] * groups;
        let chunks = (len / 16384).clamp(1, 256);
        if chunks > 1 {
            // Large groups (the VAE at 1024x1024: 4M values each): split every group
            // over `chunks` blocks, three passes.
            let psum = me(self.alloc::<f64>(blocks * chunks))?;
            let pvar = me(self.alloc::<f64>(blocks * chunks))?;
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, chunks as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            me(self.launch(
                "group_norm_sum",
                cfg,
                &[
                    Arg::P(self.tp(x)),
                    Arg::P(self.ptr(&psum)),
                    Arg::U(len as u64),
                    Arg::I(self.r()),
                ],
            ))?;
            me(self.launch(
                "group_norm_var",
                cfg,
                &[
                    Arg::P(self.tp(x)),
                    Arg::P(self.ptr(&psum)),
                    Arg::P(self.ptr(&pvar)),
                    Arg::U(len as u64),
                    Arg::I(self.r()),
                ],
            ))?;
            me(self.launch(
                "group_norm_apply",
                cfg,
                &[
                    Arg::P(self.tp(x)),
                    Arg::P(self.ptr(&psum)),
                    Arg::P(self.ptr(&pvar)),
                    Arg::P(self.tp(gamma)),
                    Arg::P(self.tp(beta)),
                    Arg::P(self.sptr(&out)),
                    Arg::I(groups as i32),
                    Arg::I((s[1] / groups) as i32),
                    Arg::U((s[2] * s[3]) as u64),
                    Arg::F(eps),
                    Arg::I(silu as i32),
                    Arg::I(self.r()),
                ],
            ))?;
            return Ok(self.wrap(s.clone(), out));
        }
        me(self.launch(
            "group_norm_f32",
            Self::rows_cfg(s[0] * groups, 512),
            &[
                Arg::P(self.tp(x)),
                Arg::P(self.tp(gamma)),
                Arg::P(self.tp(beta)),
                Arg::P(self.sptr(&out)),
                Arg::I(groups as i32),
                Arg::I((s[1] / groups) as i32),
                Arg::U((s[2] * s[3]) as u64),
                Arg::F(eps),
                Arg::I(silu as i32),
                Arg::I(self.r()),
            ],
        ))?;
        Ok(self.wrap(s.clone(), out))
    }

    fn conv2d(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: Option<&CudaTensor>,
        p: Conv2dParams,
    ) -> sd_model::Result<CudaTensor> {
        Ok(me(self.conv2d_impl(x, w, b, p, None))?.0)
    }

    fn conv2d_add(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: Option<&CudaTensor>,
        p: Conv2dParams,
        residual: &CudaTensor,
    ) -> sd_model::Result<CudaTensor> {
        let (y, fused) = me(self.conv2d_impl(x, w, b, p, Some(residual)))?;
        if fused {
            return Ok(y);
        }
        self.add(residual, &y)
    }

    fn upsample_nearest2x(&self, x: &CudaTensor) -> sd_model::Result<CudaTensor> {
        let s = &x.shape;
        if s.len() != 4 {
            return Err(ModelError::backend("upsample: expected [B, C, H, W]"));
        }
        if let Some(y) = me(self.upsample_channels_last(x))? {
            return Ok(y);
        }
        let x = self.rm(x)?;
        let x = x.as_ref();
        let n = x.numel() * 4;
        let out = me(self.talloc(n))?;
        if n > 0 {
            me(self.launch(
                "upsample2x_f32",
                Self::grid(n),
                &[
                    Arg::P(self.tp(x)),
                    Arg::P(self.sptr(&out)),
                    Arg::U((s[0] * s[1]) as u64),
                    Arg::U(s[2] as u64),
                    Arg::U(s[3] as u64),
                    Arg::I(self.r()),
                ],
            ))?;
        }
        Ok(self.wrap(vec![s[0], s[1], 2 * s[2], 2 * s[3]], out))
    }

    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        p: AttentionParams<'_, CudaTensor>,
    ) -> sd_model::Result<CudaTensor> {
        if self.profile.borrow().is_some() && q.shape.len() == 3 && k.shape.len() == 3 {
            let d = q.shape[2] / p.heads.max(1);
            let fast = p.bias.is_none() && !p.causal && self.precision != CudaPrecision::F32;
            let path = if fast && self.flash.get() && d == 64 {
                "flash"
            } else if fast && d > 64 && d.is_multiple_of(8) && k.shape[1].is_multiple_of(8) {
                "gemm"
            } else {
                "exact"
            };
            self.op_key.set(Some(format!(
                "attention {path} {}x{} h{} d{d}",
                q.shape[1], k.shape[1], p.heads
            )));
        }
        me(self.attention_impl(q, k, v, p))
    }

    /// The joint attention in place (two-segment flash kernel), or None where that
    /// kernel does not apply (the caller concatenates instead).
    #[allow(clippy::type_complexity)]
    fn joint_attention(
        &self,
        image: [&CudaTensor; 3],
        context: [&CudaTensor; 3],
        p: AttentionParams<'_, CudaTensor>,
    ) -> sd_model::Result<Option<(CudaTensor, CudaTensor)>> {
        let [qi, ki, vi] = image;
        let [qc, kc, vc] = context;
        let shapes_ok = [qi, ki, vi, qc, kc, vc].iter().all(|t| t.shape.len() == 3)
            && ki.shape == vi.shape
            && kc.shape == vc.shape
            && [ki, qc, kc]
                .iter()
                .all(|t| t.shape[0] == qi.shape[0] && t.shape[2] == qi.shape[2])
            && p.heads > 0
            && qi.shape[2] == 64 * p.heads;
        if !(shapes_ok
            && self.flash.get()
            && self.flash_joint()
            && p.bias.is_none()
            && !p.causal
            && self.precision != CudaPrecision::F32
            && [qi, ki, qc, kc].iter().all(|t| t.numel() > 0))
        {
            // (Empty segments, e.g. no context tokens, go the general way.)
            return Ok(None);
        }
        if self.profile.borrow().is_some() {
            self.op_key.set(Some(format!(
                "attention flash joint {}+{}x{}+{} h{} d64",
                qi.shape[1], qc.shape[1], ki.shape[1], kc.shape[1], p.heads
            )));
        }
        let (o_img, o_ctx) = me(self.flash_attention(image, Some(context), p.heads, p.scale))?;
        let o_ctx =
            o_ctx.ok_or_else(|| ModelError::backend("joint attention: no context output"))?;
        Ok(Some((o_img, o_ctx)))
    }

    fn activation(&self, x: &CudaTensor, act: Activation) -> sd_model::Result<CudaTensor> {
        let op = match act {
            Activation::Silu => 1,
            Activation::Gelu => 2,
            Activation::GeluTanh => UNARY_GELU_TANH,
            Activation::QuickGelu => 4,
            Activation::Relu => 5,
        };
        self.elementwise_any_layout(x, |p| me(self.unary(p, op, 0.0, 0.0)))
    }

    /// An elementwise operation of `x` in whatever layout it has: a channels-last tensor
    /// is given to `f` as its physical `[N, H, W, C]` and the result keeps the layout.
    fn elementwise_any_layout(
        &self,
        x: &CudaTensor,
        f: impl FnOnce(&CudaTensor) -> sd_model::Result<CudaTensor>,
    ) -> sd_model::Result<CudaTensor> {
        if !x.is_channels_last() {
            return f(x);
        }
        let y = f(&Self::physical(x))?;
        Ok(Self::relabel(&y, x.shape.clone(), Layout::ChannelsLast))
    }

    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> sd_model::Result<CudaTensor> {
        if a.is_channels_last() && b.is_channels_last() && a.shape == b.shape {
            // The VAE's residual adds: both channels-last, one value per value.
            let pb = Self::physical(b);
            return self
                .elementwise_any_layout(a, |pa| me(self.binary(pa, &pb, pa.numel(), 0, 0.0)));
        }
        let (a, b) = (self.rm(a)?, self.rm(b)?);
        let (a, b) = (a.as_ref(), b.as_ref());
        let (sa, sb) = (&a.shape, &b.shape);
        let period = if sa == sb {
            a.numel()
        } else if sb.len() == 1 && sa.last() == sb.last() {
            sb[0]
        } else if sb.len() == sa.len() && sb[0] == 1 && sb[1..] == sa[1..] {
            b.numel()
        } else {
            return Err(ModelError::backend(format!(
                "add: cannot broadcast {sb:?} to {sa:?}"
            )));
        };
        me(self.binary(a, b, period, 0, 0.0))
    }

    fn mul(&self, a: &CudaTensor, b: &CudaTensor) -> sd_model::Result<CudaTensor> {
        me(Self::same(&a.shape, &b.shape, "mul"))?;
        if a.is_channels_last() && b.is_channels_last() {
            let pb = Self::physical(b);
            return self.elementwise_any_layout(a, |pa| me(self.binary(pa, &pb, 1, 1, 0.0)));
        }
        let (a, b) = (self.rm(a)?, self.rm(b)?);
        let (a, b) = (a.as_ref(), b.as_ref());
        me(self.binary(a, b, 1, 1, 0.0))
    }

    fn scale_shift(&self, x: &CudaTensor, a: f32, b: f32) -> sd_model::Result<CudaTensor> {
        self.elementwise_any_layout(x, |p| me(self.unary(p, 6, a, b)))
    }

    fn gated_add(
        &self,
        x: &CudaTensor,
        gate: &CudaTensor,
        y: &CudaTensor,
    ) -> sd_model::Result<CudaTensor> {
        me(Self::same(&x.shape, &y.shape, "gated_add"))?;
        let (b, c) = me(Self::batch_channels(&x.shape, &gate.shape, "gated_add"))?;
        let n = x.numel();
        let out = me(self.talloc(n))?;
        if self.r() == 1 && c % 8 == 0 && n > 0 {
            // BF16 storage: 8 values (one gate row segment) per thread.
            me(self.launch(
                "gated_add_bf16x8",
                Self::grid(n / 8),
                &[
                    Arg::P(self.tp(x)),
                    Arg::P(self.tp(gate)),
                    Arg::P(self.tp(y)),
                    Arg::P(self.sptr(&out)),
                    Arg::U((n / 8) as u64),
                    Arg::U((n / b.max(1)) as u64),
                    Arg::U(c as u64),
                ],
            ))?;
            return Ok(self.wrap(x.shape.clone(), out));
        }
        me(self.launch(
            "gated_add_f32",
            Self::grid(n),
            &[
                Arg::P(self.tp(x)),
                Arg::P(self.tp(gate)),
                Arg::P(self.tp(y)),
                Arg::P(self.sptr(&out)),
                Arg::U(n as u64),
                Arg::U((n / b.max(1)) as u64),
                Arg::U(c as u64),
                Arg::I(self.r()),
            ],
        ))?;
        Ok(self.wrap(x.shape.clone(), out))
    }

    fn concat(&self, parts: &[&CudaTensor], dim: usize) -> sd_model::Result<CudaTensor> {
        let first = parts
            .first()
            .ok_or_else(|| ModelError::backend("concat of nothing"))?;
        let s0 = &first.shape;
        if dim >= s0.len() {
            return Err(ModelError::backend("concat: dim out of range"));
        }
        for p in parts {
            let s = &p.shape;
            if s.len() != s0.len() || s.iter().enumerate().any(|(i, &d)| i != dim && d != s0[i]) {
                return Err(ModelError::backend(format!("concat: {s:?} vs {s0:?}")));
            }
        }
        let outer: usize = s0[..dim].iter().product();
        let inner: usize = s0[dim + 1..].iter().product();
        let total: usize = parts.iter().map(|p| p.shape[dim]).sum();
        let out = me(self.talloc(outer * total * inner))?;
        let base = self.sptr(&out);
        let mut off = 0usize;
        for p in parts {
            let width = p.shape[dim] * inner;
            me(self.copy2d(
                self.tp(p),
                base + (off * self.es()) as u64,
                outer,
                width,
                width,
                total * inner,
            ))?;
            off += width;
        }
        let mut shape = s0.clone();
        shape[dim] = total;
        Ok(self.wrap(shape, out))
    }

    fn narrow(
        &self,
        x: &CudaTensor,
        dim: usize,
        start: usize,
        len: usize,
    ) -> sd_model::Result<CudaTensor> {
        let s = &x.shape;
        if dim >= s.len() || start + len > s[dim] {
            return Err(ModelError::backend(format!(
                "narrow: {start}+{len} out of range of dim {dim} in {s:?}"
            )));
        }
        let outer: usize = s[..dim].iter().product();
        let inner: usize = s[dim + 1..].iter().product();
        let out = me(self.talloc(outer * len * inner))?;
        me(self.copy2d(
            self.tp(x) + (start * inner * self.es()) as u64,
            self.sptr(&out),
            outer,
            len * inner,
            s[dim] * inner,
            len * inner,
        ))?;
        let mut shape = s.clone();
        shape[dim] = len;
        Ok(self.wrap(shape, out))
    }

    fn permute(&self, x: &CudaTensor, perm: &[usize]) -> sd_model::Result<CudaTensor> {
        me(self.permute_impl(x, perm))
    }

    fn pad_last(&self, x: &CudaTensor, size: usize) -> sd_model::Result<CudaTensor> {
        let c = *x.shape.last().unwrap_or(&0);
        if size < c {
            return Err(ModelError::backend(format!("pad_last: {c} > {size}")));
        }
        let rows = x.numel() / c.max(1);
        let out = me(self.tzeros(rows * size))?;
        me(self.copy2d(self.tp(x), self.sptr(&out), rows, c, c, size))?;
        let mut shape = x.shape.clone();
        if let Some(l) = shape.last_mut() {
            *l = size;
        }
        Ok(self.wrap(shape, out))
    }

    fn embedding(
        &self,
        table: &CudaTensor,
        ids: &[u32],
        batch: usize,
        seq: usize,
    ) -> sd_model::Result<CudaTensor> {
        let s = &table.shape;
        if s.len() != 2 || ids.len() != batch * seq {
            return Err(ModelError::backend("embedding: bad table or id count"));
        }
        let (v, c) = (s[0], s[1]);
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= v) {
            return Err(ModelError::input(format!(
                "token id {id} outside vocabulary of {v}"
            )));
        }
        me(self.gather_rows(table, ids, c, vec![batch, seq, c]))
    }

    fn select_tokens(&self, x: &CudaTensor, index: &[usize]) -> sd_model::Result<CudaTensor> {
        let s = &x.shape;
        if s.len() != 3 || index.len() != s[0] || index.iter().any(|&i| i >= s[1]) {
            return Err(ModelError::backend("select_tokens: bad index"));
        }
        let idx: Vec<u32> = index
            .iter()
            .enumerate()
            .map(|(b, &i)| (b * s[1] + i) as u32)
            .collect();
        me(self.gather_rows(x, &idx, s[2], vec![s[0], s[2]]))
    }

    fn guidance(
        &self,
        uncond: &CudaTensor,
        cond: &CudaTensor,
        g: f32,
    ) -> sd_model::Result<CudaTensor> {
        me(Self::same(&uncond.shape, &cond.shape, "guidance"))?;
        me(self.binary(uncond, cond, 1, 2, g))
    }

    fn euler_step(&self, x: &CudaTensor, v: &CudaTensor, dt: f32) -> sd_model::Result<CudaTensor> {
        me(Self::same(&x.shape, &v.shape, "euler_step"))?;
        me(self.binary(x, v, 1, 3, dt))
    }
}

type Job = Box<dyn FnOnce(&Inner) + Send + 'static>;

/// The CUDA backend: a handle to one GPU's owner thread.
///
/// The worker thread creates the CUDA context (bound to it for its whole life), the
/// stream, the cuBLASLt handle and workspace, and runs every operation; the backend's
/// methods send it a job and wait for the answer (text-embeddings-inference style).
/// Tensors and layers are plain device buffers and may be dropped on any thread.
pub struct CudaBackend {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    /// The thread recording a CUDA graph, if any: other threads' operations wait until
    /// it is done, so that none of them lands inside the graph.
    capture_owner: Mutex<Option<std::thread::ThreadId>>,
    capture_done: std::sync::Condvar,
    /// FP8 codes handed over by an engine bundle, by layer name, taken by
    /// `load_linear` instead of quantizing the weight it is given.
    prepacked: Mutex<HashMap<String, PackedFp8Weight>>,
    worker: Option<std::thread::JoinHandle<()>>,
    ordinal: usize,
    gpu: String,
    cc: (i32, i32),
    precision: CudaPrecision,
    build_id: String,
}

impl CudaBackend {
    /// Opens GPU `ordinal` on a new owner thread, compiles the kernels for it with NVRTC
    /// and creates the cuBLASLt handle. Errors name a missing library (libcuda,
    /// libnvrtc, libcublasLt) or refuse FP8 on GPUs below compute capability 8.9.
    pub fn new(ordinal: usize, precision: CudaPrecision) -> Result<Self> {
        Self::spawn(ordinal, precision, None)
    }

    /// As [`CudaBackend::new`] with PTX compiled earlier (an engine bundle's).
    pub fn with_kernels(
        ordinal: usize,
        precision: CudaPrecision,
        kernels: &CompiledKernels,
    ) -> Result<Self> {
        Self::spawn(ordinal, precision, Some(kernels.clone()))
    }

    fn spawn(
        ordinal: usize,
        precision: CudaPrecision,
        kernels: Option<CompiledKernels>,
    ) -> Result<Self> {
        // Checked here too so the error comes before a thread is started.
        check_libraries()?;
        let (tx, rx) = mpsc::channel::<Job>();
        let (itx, irx) = mpsc::channel::<Result<(String, (i32, i32), String)>>();
        let worker = std::thread::Builder::new()
            .name(format!("sd-cuda:{ordinal}"))
            .spawn(move || {
                let inner = match Inner::open(ordinal, precision, kernels) {
                    Ok(i) => {
                        let _ = itx.send(Ok((i.gpu.clone(), i.cc, i.build_id.clone())));
                        i
                    }
                    Err(e) => {
                        let _ = itx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = rx.recv() {
                    // A panicking job must not take the GPU's owner down with it; its
                    // caller sees the dropped reply channel.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&inner)));
                }
            })
            .map_err(|e| CudaError::Driver(format!("cannot start the GPU thread: {e}")))?;
        let (gpu, cc, build_id) = irx
            .recv()
            .map_err(|_| CudaError::Driver("the GPU thread died while starting".into()))??;
        Ok(Self {
            tx: Mutex::new(Some(tx)),
            capture_owner: Mutex::new(None),
            capture_done: std::sync::Condvar::new(),
            prepacked: Mutex::new(HashMap::new()),
            worker: Some(worker),
            ordinal,
            gpu,
            cc,
            precision,
            build_id,
        })
    }

    /// Runs `f` on the owner thread and waits for it.
    fn run<R: Send, F: FnOnce(&Inner) -> R + Send>(&self, f: F) -> Result<R> {
        let (rtx, rrx) = mpsc::sync_channel::<R>(1);
        let job: Box<dyn FnOnce(&Inner) + Send + '_> = Box::new(move |inner: &Inner| {
            if inner.profile.borrow().is_none() {
                let _ = rtx.send(f(inner));
                return;
            }
            // Profiling: timing events on the stream before and after the operation's
            // kernels, read back later (nothing is synchronised in between, so the GPU
            // time of each operation is measured without launch gaps or host time).
            let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            let start = inner.stream.record_event(flags);
            let r = f(inner);
            let end = inner.stream.record_event(flags);
            let key = inner
                .op_key
                .take()
                .unwrap_or_else(|| op_name(std::any::type_name::<F>()));
            if let (Some(p), Ok(start), Ok(end)) = (inner.profile.borrow_mut().as_mut(), start, end)
            {
                p.pending.push((key, start, end));
                if p.pending.len() >= 4096 {
                    p.settle();
                }
            }
            let _ = rtx.send(r);
        });
        // SAFETY: only the lifetime is erased. This function does not return before the
        // job has run or been dropped (the reply channel disconnects only then), so
        // everything the job borrows outlives it.
        let job: Job = unsafe { std::mem::transmute(job) };
        {
            // Sent while holding the capture lock, so a capture that another thread
            // starts comes after this job in the queue.
            let _capture = self.wait_for_capture()?;
            let guard = self
                .tx
                .lock()
                .map_err(|_| CudaError::Driver("GPU thread channel poisoned".into()))?;
            let tx = guard
                .as_ref()
                .ok_or_else(|| CudaError::Driver("GPU thread stopped".into()))?;
            tx.send(job)
                .map_err(|_| CudaError::Driver("the GPU thread has exited".into()))?;
        }
        rrx.recv()
            .map_err(|_| CudaError::Driver("a GPU operation panicked".into()))
    }

    /// Waits until no other thread is recording a CUDA graph; returns the lock, held.
    fn wait_for_capture(&self) -> Result<std::sync::MutexGuard<'_, Option<std::thread::ThreadId>>> {
        let me = std::thread::current().id();
        let poisoned = |_| CudaError::Driver("GPU capture lock poisoned".into());
        let mut owner = self.capture_owner.lock().map_err(poisoned)?;
        while owner.is_some_and(|t| t != me) {
            owner = self.capture_done.wait(owner).map_err(poisoned)?;
        }
        Ok(owner)
    }

    /// Makes this thread the only one whose operations run until the guard drops.
    fn claim_capture(&self) -> Result<CaptureGuard<'_>> {
        let mut owner = self.wait_for_capture()?;
        *owner = Some(std::thread::current().id());
        Ok(CaptureGuard(self))
    }

    /// Records `forward` into a CUDA graph for `key` and replays it on `inputs`, or, if
    /// the recording fails, logs why and runs it eagerly (as every later call will).
    fn capture_and_replay(
        &self,
        key: graphs::GraphKey,
        inputs: &[&CudaTensor],
        forward: &sd_model::ReplayableForward<'_, CudaTensor>,
    ) -> sd_model::Result<CudaTensor> {
        let name = key.name().to_string();
        let caller = std::thread::current().id();
        let ended: std::result::Result<(), String> = {
            let _only_us = me(self.claim_capture())?;
            match self.call(|i| me(i.graph_begin(&key, inputs, caller))) {
                Err(e) => Err(e.to_string()),
                Ok(graphs::Begin::Decided) => Ok(()),
                Ok(graphs::Begin::Recording(statics)) => {
                    let refs: Vec<&CudaTensor> = statics.iter().collect();
                    // A panic must still end the recording, or the stream would stay in
                    // capture mode for good.
                    let out =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| forward(&refs)));
                    let out = match out {
                        Ok(out) => out,
                        Err(panic) => {
                            let failed = Err(ModelError::backend("the forward panicked"));
                            let _ = self.run(|i| i.graph_end(&key, failed));
                            std::panic::resume_unwind(panic);
                        }
                    };
                    self.run(|i| i.graph_end(&key, out))
                        .map_err(|e| e.to_string())
                        .and_then(|r| r)
                }
            }
        };
        if let Err(reason) = ended {
            tracing::warn!(forward = %name, %reason, "CUDA graph capture failed; this shape runs eagerly");
            return forward(inputs);
        }
        match self.call(|i| me(i.graph_action(&name, inputs)))? {
            graphs::GraphAction::Replayed(y) => Ok(y),
            // Switched off, dropped or failed meanwhile (another thread): run it.
            _ => forward(inputs),
        }
    }

    fn call<R: Send>(
        &self,
        f: impl FnOnce(&Inner) -> sd_model::Result<R> + Send,
    ) -> sd_model::Result<R> {
        me(self.run(f))?
    }

    /// GPU memory: the pool's peak and current use, the device's free/total, and the
    /// parameter bytes uploaded so far.
    pub fn memory_stats(&self) -> Result<MemoryStats> {
        self.run(|i| -> Result<MemoryStats> {
            use cudarc::driver::sys::CUmemPool_attribute as P;
            i.ctx.bind_to_thread()?;
            let get = |a: P| -> Result<u64> {
                let mut v = 0u64;
                // SAFETY: the attribute is a u64 of this context's pool.
                unsafe {
                    cudarc::driver::sys::cuMemPoolGetAttribute(
                        i.pool,
                        a,
                        &mut v as *mut u64 as *mut c_void,
                    )
                    .result()?
                };
                Ok(v)
            };
            let (free, total) = cudarc::driver::result::mem_get_info()?;
            let graph = |a: cudarc::driver::sys::CUgraphMem_attribute| -> Result<u64> {
                let mut v = 0u64;
                // SAFETY: the attribute is a u64 of this context's device.
                unsafe {
                    cudarc::driver::sys::cuDeviceGetGraphMemAttribute(
                        i.ctx.cu_device(),
                        a,
                        &mut v as *mut u64 as *mut c_void,
                    )
                    .result()?
                };
                Ok(v)
            };
            use cudarc::driver::sys::CUgraphMem_attribute as G;
            Ok(MemoryStats {
                // Best effort: a driver without graph memory attributes has no graph
                // memory to report, and the pool's figures must not fail with them.
                graph_peak_used: graph(G::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH).unwrap_or(0),
                graph_reserved: graph(G::CU_GRAPH_MEM_ATTR_RESERVED_MEM_CURRENT).unwrap_or(0),
                peak_used: get(P::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
                used: get(P::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
                peak_reserved: get(P::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
                device_free: free as u64,
                device_total: total as u64,
                param_bytes: i.param_bytes.get(),
            })
        })?
    }

    /// Resets the pool's high-water marks (after a synchronisation).
    pub fn reset_peak_memory(&self) -> Result<()> {
        self.run(|i| -> Result<()> {
            use cudarc::driver::sys::CUmemPool_attribute as P;
            i.not_capturing("a stream synchronisation")?;
            i.ctx.bind_to_thread()?;
            i.stream.synchronize()?;
            for a in [
                P::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                P::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH,
            ] {
                let mut zero = 0u64;
                // SAFETY: resetting a u64 high-water mark of this context's pool.
                unsafe {
                    cudarc::driver::sys::cuMemPoolSetAttribute(
                        i.pool,
                        a,
                        &mut zero as *mut u64 as *mut c_void,
                    )
                    .result()?
                };
            }
            use cudarc::driver::sys::CUgraphMem_attribute as G;
            for a in [
                G::CU_GRAPH_MEM_ATTR_USED_MEM_HIGH,
                G::CU_GRAPH_MEM_ATTR_RESERVED_MEM_HIGH,
            ] {
                let mut zero = 0u64;
                // SAFETY: resetting a u64 high-water mark of this context's device
                // (best effort, as in `memory_stats`).
                let _ = unsafe {
                    cudarc::driver::sys::cuDeviceSetGraphMemAttribute(
                        i.ctx.cu_device(),
                        a,
                        &mut zero as *mut u64 as *mut c_void,
                    )
                    .result()
                };
            }
            Ok(())
        })?
    }

    /// Runs replayable forwards (the MMDiT step) as CUDA graphs, one per input shapes:
    /// recorded on the second call of a shape, replayed from the third (see
    /// `graphs.rs`). Off drops every graph. Starts as `SD_CUDA_GRAPHS` says (off unless
    /// `1` / `on`).
    pub fn set_cuda_graphs(&self, on: bool) -> Result<()> {
        self.run(|i| -> Result<()> {
            i.graphs_on.set(on);
            if !on {
                i.clear_graphs()?;
            }
            Ok(())
        })?
    }

    /// How many graphs exist, failed, were recorded and replayed.
    pub fn graph_stats(&self) -> Result<GraphStats> {
        self.run(|i| i.graph_stats())
    }

    /// Switches the fast attention paths on or off: the flash kernels (head dim 64, no
    /// mask or bias) and the batched-GEMM attention for biases (T5). Off: the exact
    /// reference kernel everywhere but for head dims over 64 (the VAE keeps its GEMMs).
    pub fn set_flash_attention(&self, on: bool) -> Result<()> {
        self.run(|i| {
            i.flash.set(on);
            i.clear_graphs()
        })?
    }

    /// Turns per-operation timing on (the stream is synchronised around every
    /// operation, which slows a step down) or off; turning it on clears the totals.
    pub fn set_profiling(&self, on: bool) -> Result<()> {
        self.run(|i| {
            *i.profile.borrow_mut() = on.then(Profile::default);
        })
    }

    /// The per-operation totals since profiling was turned on: (operation, calls,
    /// milliseconds), longest first.
    pub fn profile(&self) -> Result<Vec<(String, u64, f64)>> {
        self.run(|i| {
            if let Some(p) = i.profile.borrow_mut().as_mut() {
                p.settle();
            }
            let mut v: Vec<(String, u64, f64)> = i
                .profile
                .borrow()
                .as_ref()
                .map(|p| {
                    p.ops
                        .iter()
                        .map(|(k, &(n, ms))| (k.clone(), n, ms))
                        .collect()
                })
                .unwrap_or_default();
            v.sort_by(|a, b| b.2.total_cmp(&a.2));
            v
        })
    }

    /// Whether linear layers run through cuBLASLt's fused epilogue (per-channel FP8
    /// weight scale, bias, BF16 output) or the separate epilogue kernel, and why not.
    pub fn fused_epilogue(&self) -> Result<String> {
        self.run(|i| {
            let st = i.fused_epilogue.get();
            let err = i.fused_epilogue_error.borrow();
            let names = [
                "FP8 outer-vector A scale",
                "FP8 alpha vector",
                "FP8 uniform scalar A scale",
                "BF16",
                "FP8 outer-vector A scale + GELU",
                "FP8 alpha vector + GELU",
                "FP8 uniform scalar A scale + GELU",
                "BF16 + GELU",
            ];
            let parts: Vec<String> = (0..names.len())
                .map(|w| {
                    let what = match (st[w], err[w].as_ref()) {
                        (Some(true), _) => "used".to_string(),
                        (Some(false), Some(e)) => format!("refused ({e})"),
                        (Some(false), None) => "off (SD_CUDA_FUSED_EPILOGUE=0)".into(),
                        (None, _) => "not tried".into(),
                    };
                    format!("{}: {what}", names[w])
                })
                .collect();
            format!("cuBLASLt epilogue ways: {}", parts.join("; "))
        })
    }

    /// Which path the convolutions took: cuDNN (version, layout, algorithm per problem)
    /// or im2col + GEMM, and why.
    pub fn conv_stats(&self) -> Result<ConvStats> {
        self.run(|i| i.cudnn.borrow().stats(i.conv_path.get()))
    }

    /// Where BF16 convolutions run from now on: cuDNN on channels-last tensors (the
    /// default, `SD_CUDA_CONV` unset), cuDNN on NCHW, or im2col + GEMM (for side-by-side
    /// measurements). A problem cuDNN refuses falls back to the next of these. Convolution filters loaded afterwards are stored in
    /// the layout the path reads; those loaded before still work on any path (converted
    /// at each call), so a fair comparison loads its model after choosing the path.
    pub fn set_conv_path(&self, path: ConvPath) -> Result<()> {
        self.run(|i| {
            i.conv_path.set(path);
            i.clear_graphs()
        })?
    }

    /// Hands over FP8 weights exactly as an engine bundle stores them (layer name ->
    /// codes `[out, in]` + scales): loading a layer of that name takes them instead of
    /// quantizing the weight values it is given.
    pub fn provide_fp8_weights(&self, weights: HashMap<String, PackedFp8Weight>) -> Result<()> {
        self.prepacked
            .lock()
            .map_err(|_| CudaError::Driver("prepacked weights mutex poisoned".into()))?
            .extend(weights);
        Ok(())
    }

    /// Layers handed over by [`CudaBackend::provide_fp8_weights`] that no load took
    /// (after a model is loaded: a bundle with weights its model does not have).
    pub fn unused_fp8_weights(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .prepacked
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Chooses how FP8 layers loaded from now on run (see [`Fp8Gemm`]).
    pub fn with_fp8_gemm(self, mode: Fp8Gemm) -> Self {
        let _ = self.run(|i| {
            i.fp8_gemm.set(mode);
            i.clear_graphs()
        });
        self
    }

    pub fn gpu_name(&self) -> &str {
        &self.gpu
    }
    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }
    pub fn precision(&self) -> CudaPrecision {
        self.precision
    }
    pub fn kernel_build_id(&self) -> &str {
        &self.build_id
    }
    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.run(|i| -> Result<()> {
            i.not_capturing("a stream synchronisation")?;
            Ok(i.stream.synchronize()?)
        })?
    }
    /// Quantizes `x` to FP8 codes with a host scale, on the GPU (for tests).
    pub fn quantize_fp8(&self, x: &CudaTensor, format: Fp8Format, scale: f32) -> Result<Vec<u8>> {
        self.run(|i| i.quantize_fp8(x, format, scale))?
    }
}

/// Holds [`CudaBackend::claim_capture`]'s claim; releases it on drop, also on panic.
struct CaptureGuard<'a>(&'a CudaBackend);

impl Drop for CaptureGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut owner) = self.0.capture_owner.lock() {
            *owner = None;
        }
        self.0.capture_done.notify_all();
    }
}

/// A point in the backend's stream, for GPU-side latency (CUDA events with timing):
/// `b.record_event()` before and after some work, then `start.elapsed_ms(&end)`.
pub struct GpuEvent(cudarc::driver::CudaEvent);

impl GpuEvent {
    /// Milliseconds of stream time between `self` and `end` (waits for `end`).
    pub fn elapsed_ms(&self, end: &GpuEvent) -> Result<f32> {
        Ok(self.0.elapsed_ms(&end.0)?)
    }
}

impl CudaBackend {
    /// Records a timing event on the backend's stream after all work queued so far.
    pub fn record_event(&self) -> Result<GpuEvent> {
        self.run(|i| -> Result<GpuEvent> {
            i.not_capturing("a timing event")?;
            let flags = cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
            Ok(GpuEvent(i.stream.record_event(Some(flags))?))
        })?
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if let Ok(mut g) = self.tx.lock() {
            g.take();
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl CudaBackend {
    /// `gated_add_layer_norm_modulate(_for)`: the fused kernel, or the two operations
    /// where it does not apply.
    #[allow(clippy::too_many_arguments)]
    fn gated_add_norm(
        &self,
        x: &CudaTensor,
        gate: &CudaTensor,
        y: &CudaTensor,
        shift: &CudaTensor,
        scale: &CudaTensor,
        eps: f32,
        next: Option<&CudaLinear>,
    ) -> sd_model::Result<(CudaTensor, CudaTensor)> {
        let fused = self.call(|i| {
            i.gated_add_layer_norm_modulate(&*i.rm(x)?, gate, &*i.rm(y)?, shift, scale, eps, next)
        })?;
        match fused {
            Some(out) => Ok(out),
            None => {
                let r = self.gated_add(x, gate, y)?;
                let n = match next {
                    Some(next) => self.layer_norm_modulate_for(&r, shift, scale, eps, next)?,
                    None => self.layer_norm_modulate(&r, shift, scale, eps)?,
                };
                Ok((r, n))
            }
        }
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Linear = CudaLinear;

    fn replayable(
        &self,
        name: &str,
        inputs: &[&CudaTensor],
        forward: &sd_model::ReplayableForward<'_, CudaTensor>,
    ) -> sd_model::Result<CudaTensor> {
        match self.call(|i| me(i.graph_action(name, inputs)))? {
            graphs::GraphAction::Replayed(y) => Ok(y),
            graphs::GraphAction::Eager(None) => forward(inputs),
            graphs::GraphAction::Eager(Some(key)) => {
                let y = forward(inputs)?;
                me(self.run(|i| i.graph_seen(key, &y)))?;
                Ok(y)
            }
            graphs::GraphAction::Capture(key) => self.capture_and_replay(key, inputs, forward),
        }
    }

    fn describe(&self) -> String {
        let p = match self.precision {
            CudaPrecision::F32 => "fp32",
            CudaPrecision::Bf16 => "bf16",
            CudaPrecision::Fp8 => "fp8",
        };
        format!("cuda:{} {} {p}", self.ordinal, self.gpu)
    }
    fn upload(&self, t: &HostTensor) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.upload(t))
    }
    fn download(&self, t: &CudaTensor) -> sd_model::Result<HostTensor> {
        self.call(|i| i.download(t))
    }
    fn dims(&self, t: &CudaTensor) -> Vec<usize> {
        t.shape.clone()
    }
    fn load_param(&self, w: &WeightTensor<'_>) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.load_param(w))
    }
    fn load_linear(
        &self,
        spec: &LinearSpec,
        weight: &WeightTensor<'_>,
        bias: Option<&WeightTensor<'_>>,
    ) -> sd_model::Result<CudaLinear> {
        let packed = match &spec.quant {
            LinearQuant::Fp8 { .. } | LinearQuant::Fp8WeightOnly { .. } => self
                .prepacked
                .lock()
                .map_err(|_| ModelError::backend("prepacked weights mutex poisoned"))?
                .remove(&spec.name),
            LinearQuant::None => None,
        };
        self.call(|i| i.load_linear(spec, weight, bias, packed))
    }
    fn linear(&self, x: &CudaTensor, layer: &CudaLinear) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.linear(&*i.rm(x)?, layer))
    }
    fn linear_gelu(&self, x: &CudaTensor, layer: &CudaLinear) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.linear_gelu(&*i.rm(x)?, layer))
    }
    fn layer_norm(
        &self,
        x: &CudaTensor,
        gamma: Option<&CudaTensor>,
        beta: Option<&CudaTensor>,
        eps: f32,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.layer_norm(&*i.rm(x)?, gamma, beta, eps))
    }
    fn modulate(
        &self,
        x: &CudaTensor,
        shift: &CudaTensor,
        scale: &CudaTensor,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.modulate(&*i.rm(x)?, shift, scale))
    }
    fn layer_norm_modulate(
        &self,
        x: &CudaTensor,
        shift: &CudaTensor,
        scale: &CudaTensor,
        eps: f32,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.layer_norm_modulate(&*i.rm(x)?, shift, scale, eps, None))
    }
    fn layer_norm_modulate_for(
        &self,
        x: &CudaTensor,
        shift: &CudaTensor,
        scale: &CudaTensor,
        eps: f32,
        next: &CudaLinear,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.layer_norm_modulate(&*i.rm(x)?, shift, scale, eps, Some(next)))
    }
    fn rms_norm(
        &self,
        x: &CudaTensor,
        gamma: Option<&CudaTensor>,
        eps: f32,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.rms_norm(&*i.rm(x)?, gamma, eps))
    }
    fn group_norm(
        &self,
        x: &CudaTensor,
        groups: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.group_norm(x, groups, gamma, beta, eps))
    }
    fn group_norm_silu(
        &self,
        x: &CudaTensor,
        groups: usize,
        gamma: &CudaTensor,
        beta: &CudaTensor,
        eps: f32,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.group_norm_silu(x, groups, gamma, beta, eps))
    }
    fn conv2d(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: Option<&CudaTensor>,
        p: Conv2dParams,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.conv2d(x, w, b, p))
    }
    fn conv2d_add(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        b: Option<&CudaTensor>,
        p: Conv2dParams,
        residual: &CudaTensor,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.conv2d_add(x, w, b, p, residual))
    }
    fn upsample_nearest2x(&self, x: &CudaTensor) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.upsample_nearest2x(x))
    }
    fn attention(
        &self,
        q: &CudaTensor,
        k: &CudaTensor,
        v: &CudaTensor,
        p: AttentionParams<'_, CudaTensor>,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| {
            let bias = p.bias.map(|t| i.rm(t)).transpose()?;
            let p = AttentionParams {
                bias: bias.as_deref(),
                ..p
            };
            i.attention(&*i.rm(q)?, &*i.rm(k)?, &*i.rm(v)?, p)
        })
    }
    fn gated_add_layer_norm_modulate(
        &self,
        x: &CudaTensor,
        gate: &CudaTensor,
        y: &CudaTensor,
        shift: &CudaTensor,
        scale: &CudaTensor,
        eps: f32,
    ) -> sd_model::Result<(CudaTensor, CudaTensor)> {
        self.gated_add_norm(x, gate, y, shift, scale, eps, None)
    }
    fn gated_add_layer_norm_modulate_for(
        &self,
        x: &CudaTensor,
        gate: &CudaTensor,
        y: &CudaTensor,
        shift: &CudaTensor,
        scale: &CudaTensor,
        eps: f32,
        next: &CudaLinear,
    ) -> sd_model::Result<(CudaTensor, CudaTensor)> {
        self.gated_add_norm(x, gate, y, shift, scale, eps, Some(next))
    }
    fn joint_attention(
        &self,
        image: [&CudaTensor; 3],
        context: [&CudaTensor; 3],
        p: AttentionParams<'_, CudaTensor>,
    ) -> sd_model::Result<(CudaTensor, CudaTensor)> {
        match self.call(|i| {
            let (iq, ik, iv) = (i.rm(image[0])?, i.rm(image[1])?, i.rm(image[2])?);
            let (cq, ck, cv) = (i.rm(context[0])?, i.rm(context[1])?, i.rm(context[2])?);
            i.joint_attention([&iq, &ik, &iv], [&cq, &ck, &cv], p)
        })? {
            Some(out) => Ok(out),
            None => sd_model::backend::joint_attention_by_concat(self, image, context, p),
        }
    }
    fn activation(&self, x: &CudaTensor, act: Activation) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.activation(x, act))
    }
    fn add(&self, a: &CudaTensor, b: &CudaTensor) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.add(a, b))
    }
    fn mul(&self, a: &CudaTensor, b: &CudaTensor) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.mul(a, b))
    }
    fn scale_shift(&self, x: &CudaTensor, a: f32, b: f32) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.scale_shift(x, a, b))
    }
    fn gated_add(
        &self,
        x: &CudaTensor,
        gate: &CudaTensor,
        y: &CudaTensor,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.gated_add(&*i.rm(x)?, gate, &*i.rm(y)?))
    }
    fn concat(&self, parts: &[&CudaTensor], dim: usize) -> sd_model::Result<CudaTensor> {
        self.call(|i| {
            let parts = parts
                .iter()
                .map(|p| i.rm(p))
                .collect::<sd_model::Result<Vec<_>>>()?;
            let parts: Vec<&CudaTensor> = parts.iter().map(|p| p.as_ref()).collect();
            i.concat(&parts, dim)
        })
    }
    fn narrow(
        &self,
        x: &CudaTensor,
        dim: usize,
        start: usize,
        len: usize,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.narrow(&*i.rm(x)?, dim, start, len))
    }
    fn chunks(&self, x: &CudaTensor, n: usize) -> sd_model::Result<Vec<CudaTensor>> {
        self.call(|i| me(i.chunks(&*i.rm(x)?, n)))
    }
    fn reshape(&self, x: &CudaTensor, shape: &[usize]) -> sd_model::Result<CudaTensor> {
        if shape.iter().product::<usize>() != x.numel() {
            return Err(ModelError::backend(format!(
                "cannot reshape {:?} to {shape:?}",
                x.shape
            )));
        }
        if x.is_channels_last() {
            // A reshape reads the values in row-major order.
            let x = self.call(|i| i.rm(x).map(|x| x.into_owned()))?;
            return Ok(Inner::relabel(&x, shape.to_vec(), Layout::RowMajor));
        }
        Ok(Inner::relabel(x, shape.to_vec(), Layout::RowMajor))
    }
    fn cropped_pos_embed(
        &self,
        table: &CudaTensor,
        like: &CudaTensor,
        patch: usize,
    ) -> sd_model::Result<CudaTensor> {
        let (t, l) = (&table.shape, &like.shape);
        if t.len() != 3 || t[0] != t[1] || l.len() != 4 || patch == 0 {
            return Err(ModelError::input(format!(
                "cannot crop the positional table {t:?} for {l:?} in patches of {patch}"
            )));
        }
        let (m, d, gh, gw) = (t[0], t[2], l[2] / patch, l[3] / patch);
        if gh > m || gw > m {
            return Err(ModelError::input(format!(
                "{gh}x{gw} patches exceed the positional table of {m}x{m}"
            )));
        }
        // The centre window in one strided copy (the default's two narrows first copy
        // every column of the window's rows: 75 MB of SD3.5's 384x384 table at 1024²).
        let (top, left) = ((m - gh) / 2, (m - gw) / 2);
        self.call(|i| {
            let table = i.rm(table)?;
            let out = me(i.talloc(gh * gw * d))?;
            me(i.copy2d(
                i.tp(&table) + ((top * m + left) * d * i.es()) as u64,
                i.sptr(&out),
                gh,
                gw * d,
                m * d,
                gw * d,
            ))?;
            Ok(i.wrap(vec![1, gh * gw, d], out))
        })
    }
    fn patchify(&self, x: &CudaTensor, patch: usize) -> sd_model::Result<CudaTensor> {
        if patch == 1 && x.is_channels_last() && x.shape.len() == 4 {
            // One-pixel patches of a channels-last image are its buffer as it is.
            let (b, c, h, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
            return Ok(Inner::relabel(x, vec![b, h * w, c], Layout::RowMajor));
        }
        sd_model::backend::patchify_by_permute(self, x, patch)
    }
    fn unpatchify(
        &self,
        x: &CudaTensor,
        patch: usize,
        like: &CudaTensor,
    ) -> sd_model::Result<CudaTensor> {
        let (d, l) = (&x.shape, &like.shape);
        if patch == 1
            && like.is_channels_last()
            && !x.is_channels_last()
            && d.len() == 3
            && l.len() == 4
            && d[0] == l[0]
            && d[1] == l[2] * l[3]
        {
            // Tokens [B, H*W, C] are the channels-last buffer of [B, C, H, W] as they are.
            return Ok(Inner::relabel(
                x,
                vec![d[0], d[2], l[2], l[3]],
                Layout::ChannelsLast,
            ));
        }
        sd_model::backend::unpatchify_by_permute(self, x, patch, like)
    }
    fn permute(&self, x: &CudaTensor, perm: &[usize]) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.permute(&*i.rm(x)?, perm))
    }
    fn pad_last(&self, x: &CudaTensor, size: usize) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.pad_last(&*i.rm(x)?, size))
    }
    fn embedding(
        &self,
        table: &CudaTensor,
        ids: &[u32],
        batch: usize,
        seq: usize,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.embedding(&*i.rm(table)?, ids, batch, seq))
    }
    fn select_tokens(&self, x: &CudaTensor, index: &[usize]) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.select_tokens(&*i.rm(x)?, index))
    }
    fn guidance(
        &self,
        uncond: &CudaTensor,
        cond: &CudaTensor,
        g: f32,
    ) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.guidance(&*i.rm(uncond)?, &*i.rm(cond)?, g))
    }
    fn euler_step(&self, x: &CudaTensor, v: &CudaTensor, dt: f32) -> sd_model::Result<CudaTensor> {
        self.call(|i| i.euler_step(&*i.rm(x)?, &*i.rm(v)?, dt))
    }
}

#[cfg(test)]
mod tests {
    use super::batch_alignment;

    #[test]
    fn batch_alignment_holds_for_every_entry_of_the_batch() {
        // T5's heads: 64 BF16 values apart (128 bytes) from a 256-aligned base.
        assert_eq!(batch_alignment(0x10_0000, 64, 2), 128);
        // A base only 16-byte aligned limits every entry.
        assert_eq!(batch_alignment(0x10_0010, 64, 2), 16);
        // Large strides and bases: capped at cuBLASLt's default of 256.
        assert_eq!(batch_alignment(0x10_0000, 256 * 256, 4), 256);
    }
}
