//! Convolutions through cuDNN (the VAE decoder's, in BF16 storage).
//!
//! Layout: with [`ConvPath::CudnnNhwc`] the convolutions run on channels-last
//! tensors. cuDNN's tensor-core convolution kernels are built around NHWC; for NCHW
//! tensors it adds layout conversions, and where its heuristic finds nothing better
//! within the workspace limit it runs a CUDA-core algorithm (the H100 benchmark of
//! 2026-12-07 had the 256-channel 1024x1024 convolution on `IMPLICIT_GEMM` with
//! `CUDNN_DEFAULT_MATH`, no tensor cores). The
//! backend keeps the VAE's activations channels-last from one convolution to the next
//! (`CudaTensor`'s layout; group norm, SiLU, the residual adds, the upsampling and the
//! mid-block attention read them in place) and converts at the edges.
//!
//! The im2col + GEMM path in `lib.rs` writes a `C_in * k * k`-row copy of the input for
//! every output band and an f32 intermediate: at the SD3 VAE's 1024x1024 stages that is
//! gigabytes of memory traffic per convolution (85% of a decode). cuDNN's implicit-GEMM
//! kernels read the input in place. cuDNN is optional: it is opened on the first BF16
//! convolution, and when the library is missing, or refuses a problem, that problem runs
//! on im2col as before; [`ConvStats`] says which path each took and why.
//!
//! Numerics: x, w and y are BF16 (cuDNN's "pseudo BF16" configuration: f32 accumulation
//! and f32 alpha/beta). `y` is first filled with the broadcast bias (BF16 values, exact)
//! and the convolution added with beta = 1. Measured on the H100 (cuDNN 9.14): cuDNN
//! rounds the convolution to BF16 before adding `beta * y`, so a biased convolution is
//! rounded twice where the im2col path and the CPU's BF16 mode round conv + bias once:
//! 28% of the values of a 128-channel 3x3 test convolution differ from the CPU by one
//! BF16 ulp (0.06% without a bias: accumulation order). The legacy API has no f32
//! output for BF16 inputs that would avoid it; the tiny models' BF16 images stay at
//! 43.6-46.1 dB from the CPU's (43.7-46.5 on im2col), bound 35.
//!
//! The algorithm comes from cuDNN's heuristic (`cudnnGetConvolutionForwardAlgorithm_v7`),
//! the first one it ranks that runs, is deterministic and fits the workspace limit: a
//! choice that depends only on the problem, the GPU and the cuDNN version, so the same
//! bundle gives bit-identical images on every load (timing algorithms would not).

use std::collections::HashMap;
use std::ffi::c_int;

use cudarc::cudnn::{result as dnn, sys as dsys};

/// The largest workspace a convolution may take (cuDNN's faster algorithms for the VAE's
/// 512-channel stages ask for tens of MiB; FFT variants for far more).
const MAX_WORKSPACE_BYTES: usize = 1 << 30;

/// How many ranked algorithms to ask the heuristic for (cuDNN has 8 forward algorithms).
const HEURISTIC_RESULTS: usize = 8;

/// Where BF16 / FP8-precision convolutions run (`SD_CUDA_CONV`,
/// `CudaBackend::set_conv_path`). F32 precision always runs im2col + GEMM in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConvPath {
    /// cuDNN on channels-last tensors (NHWC activations, KRSC filters): the default.
    /// On the H100 it decodes the SD3 VAE at 1024x1024 in 35.4 ms against 97.9 ms on
    /// NCHW, same process and weights (benchmarks/h100-2026-12-07-nhwc.md).
    #[default]
    CudnnNhwc,
    /// cuDNN on NCHW tensors (the path before; for side-by-side runs).
    CudnnNchw,
    /// im2col + cuBLASLt GEMM, without cuDNN.
    Im2col,
}

impl ConvPath {
    pub const ALL: [Self; 3] = [Self::CudnnNhwc, Self::CudnnNchw, Self::Im2col];

    pub fn name(self) -> &'static str {
        match self {
            Self::CudnnNhwc => "nhwc",
            Self::CudnnNchw => "nchw",
            Self::Im2col => "im2col",
        }
    }

    /// Parses a path's name (as [`ConvPath::name`] writes it).
    pub fn parse(name: &str) -> crate::Result<Self> {
        Self::ALL
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|p| p.name()).collect();
                crate::CudaError::Invalid(format!(
                    "convolution path {name:?} (SD_CUDA_CONV): expected one of {}",
                    names.join(", ")
                ))
            })
    }

    /// The path named by `SD_CUDA_CONV`, else the default ([`ConvPath::CudnnNhwc`]).
    pub fn from_env() -> crate::Result<Self> {
        match std::env::var("SD_CUDA_CONV") {
            Err(_) => Ok(Self::default()),
            Ok(v) => Self::parse(&v),
        }
    }

    pub fn uses_cudnn(self) -> bool {
        self != Self::Im2col
    }
}

/// One convolution problem: NCHW (or, `channels_last`, NHWC) input, KCRS (KRSC) filter,
/// symmetric padding and stride.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct ConvProblem {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel_h: usize,
    pub kernel_w: usize,
    pub stride: usize,
    pub padding: usize,
    pub channels_last: bool,
}

impl std::fmt::Display for ConvProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [n, c, h, w, k, r, s, stride, pad] = self.fields();
        let layout = if self.channels_last { "nhwc" } else { "nchw" };
        write!(
            f,
            "{n}x{c}x{h}x{w} -> {k} k{r}x{s} s{stride} p{pad} {layout}"
        )
    }
}

impl ConvProblem {
    /// Output height and width (the caller has checked the kernel fits).
    pub fn output_hw(&self) -> (usize, usize) {
        (
            (self.height + 2 * self.padding - self.kernel_h) / self.stride + 1,
            (self.width + 2 * self.padding - self.kernel_w) / self.stride + 1,
        )
    }

    /// N, C, H, W, K, R, S, stride, padding: cuDNN's order.
    fn fields(&self) -> [usize; 9] {
        [
            self.batch,
            self.in_channels,
            self.height,
            self.width,
            self.out_channels,
            self.kernel_h,
            self.kernel_w,
            self.stride,
            self.padding,
        ]
    }

    fn dims(&self) -> Result<[c_int; 9], String> {
        let mut out = [0; 9];
        for (o, x) in out.iter_mut().zip(self.fields()) {
            *o = c_int::try_from(x).map_err(|_| format!("dimension {x} exceeds cuDNN's int"))?;
        }
        Ok(out)
    }
}

/// cuDNN's chosen algorithm for a problem and the workspace it needs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConvPlan {
    pub algo: dsys::cudnnConvolutionFwdAlgo_t,
    /// The math type the heuristic ranked the algorithm with (set on the descriptor
    /// before running it, as the workspace size assumes it).
    pub math: dsys::cudnnMathType_t,
    pub workspace_bytes: usize,
}

/// Which path the convolutions took, for reports (`CudaBackend::conv_stats`).
#[derive(Clone, Debug, Default)]
pub struct ConvStats {
    /// The path asked for (the problems below say which ran where).
    pub path: ConvPath,
    /// cuDNN's version (`cudnnGetVersion`, e.g. 91000 for 9.10.0); None when it was
    /// not opened (no BF16 convolution yet, turned off, or unavailable).
    pub cudnn_version: Option<usize>,
    /// Why cuDNN is not used at all, when it is not.
    pub unavailable: Option<String>,
    /// Distinct problems run on cuDNN, with the algorithm chosen.
    pub cudnn_problems: Vec<String>,
    /// Distinct problems cuDNN refused, with the reason. A problem refused channels-last
    /// runs on cuDNN's NCHW path when that takes it (then listed in `cudnn_problems` as
    /// well), else on im2col.
    pub refused_problems: Vec<String>,
    /// Convolutions that added their residual inside the cuDNN call (`conv2d_add` on
    /// the channels-last path).
    pub fused_residual_calls: u64,
}

impl ConvStats {
    /// The refused problems that ran on im2col: those without a cuDNN run in the other
    /// layout.
    pub fn on_im2col(&self) -> Vec<&str> {
        self.refused_problems
            .iter()
            .map(|r| r.as_str())
            .filter(|r| {
                let problem = r
                    .split_once(" nhwc:")
                    .or_else(|| r.split_once(" nchw:"))
                    .map_or(*r, |(p, _)| p);
                !self.cudnn_problems.iter().any(|c| {
                    c.starts_with(&format!("{problem} nchw:"))
                        || c.starts_with(&format!("{problem} nhwc:"))
                })
            })
            .collect()
    }
}

impl std::fmt::Display for ConvStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.unavailable, self.cudnn_version) {
            (Some(why), _) => write!(f, "im2col + GEMM (cuDNN unavailable: {why})"),
            (None, None) => write!(f, "cuDNN not opened (no BF16 convolution yet)"),
            (None, Some(v)) => {
                write!(
                    f,
                    "cuDNN {}.{}.{} ({}): {} problem(s) on cuDNN",
                    v / 10000,
                    v / 100 % 100,
                    v % 100,
                    self.path.name(),
                    self.cudnn_problems.len()
                )?;
                if !self.refused_problems.is_empty() {
                    write!(
                        f,
                        ", {} refused, {} of them left to im2col ({})",
                        self.refused_problems.len(),
                        self.on_im2col().len(),
                        self.refused_problems.join("; ")
                    )?;
                }
                if self.fused_residual_calls > 0 {
                    write!(f, ", {} with the residual fused", self.fused_residual_calls)?;
                }
                Ok(())
            }
        }
    }
}

fn status(e: dnn::CudnnError) -> String {
    format!("{:?}", e.0)
}

/// The descriptors of one problem; destroyed on drop.
pub(crate) struct ConvDescriptors {
    pub x: dsys::cudnnTensorDescriptor_t,
    pub w: dsys::cudnnFilterDescriptor_t,
    pub conv: dsys::cudnnConvolutionDescriptor_t,
    pub y: dsys::cudnnTensorDescriptor_t,
}

impl ConvDescriptors {
    /// BF16 NCHW (NHWC) tensors, a BF16 KCRS (KRSC) filter, cross-correlation (what
    /// every framework calls convolution) with f32 compute and tensor-core math. cuDNN's
    /// 4-D descriptors always take the dimensions in N, C, H, W order; the format says
    /// how they are laid out in memory.
    pub fn new(p: &ConvProblem) -> Result<Self, String> {
        let [n, c, h, w, k, r, s, stride, pad] = p.dims()?;
        let (ho, wo) = p.output_hw();
        let (ho, wo) = (ho as c_int, wo as c_int);
        let bf16 = dsys::cudnnDataType_t::CUDNN_DATA_BFLOAT16;
        let format = if p.channels_last {
            dsys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC
        } else {
            dsys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW
        };
        let mut d = Self {
            x: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
        };
        // Each handle is stored as soon as it exists, so Drop frees what was made if a
        // later step fails.
        d.x = dnn::create_tensor_descriptor().map_err(status)?;
        d.w = dnn::create_filter_descriptor().map_err(status)?;
        d.conv = dnn::create_convolution_descriptor().map_err(status)?;
        d.y = dnn::create_tensor_descriptor().map_err(status)?;
        // SAFETY: the descriptors were created above and are live until drop.
        unsafe {
            dnn::set_tensor4d_descriptor(d.x, format, bf16, [n, c, h, w]).map_err(status)?;
            dnn::set_filter4d_descriptor(d.w, bf16, format, [k, c, r, s]).map_err(status)?;
            dnn::set_convolution2d_descriptor(
                d.conv,
                pad,
                pad,
                stride,
                stride,
                1,
                1,
                dsys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                dsys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(status)?;
            dnn::set_convolution_math_type(d.conv, dsys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)
                .map_err(status)?;
            dnn::set_tensor4d_descriptor(d.y, format, bf16, [n, k, ho, wo]).map_err(status)?;
        }
        Ok(d)
    }
}

impl Drop for ConvDescriptors {
    fn drop(&mut self) {
        // SAFETY: each non-null handle was created by this struct and is freed once.
        unsafe {
            if !self.x.is_null() {
                let _ = dnn::destroy_tensor_descriptor(self.x);
            }
            if !self.w.is_null() {
                let _ = dnn::destroy_filter_descriptor(self.w);
            }
            if !self.conv.is_null() {
                let _ = dnn::destroy_convolution_descriptor(self.conv);
            }
            if !self.y.is_null() {
                let _ = dnn::destroy_tensor_descriptor(self.y);
            }
        }
    }
}

/// cuDNN on one GPU's owner thread: the handle (bound to the backend's stream) and the
/// plan chosen per problem.
pub(crate) struct Cudnn {
    handle: dsys::cudnnHandle_t,
    version: usize,
    /// Per problem: the plan, or why cuDNN refused it (then it runs in the next layout
    /// or on im2col).
    plans: HashMap<ConvProblem, Result<ConvPlan, String>>,
    fused_residuals: u64,
}

impl Cudnn {
    /// Opens libcudnn and creates a handle on `stream`. Err says why not (the caller
    /// keeps the im2col path).
    pub fn open(stream: cudarc::driver::sys::CUstream) -> Result<Self, String> {
        // SAFETY: only tries to dlopen the library; nothing in cuDNN is called before
        // it is known to be present (cudarc panics on a missing library).
        if !unsafe { dsys::is_culib_present() } {
            return Err(
                "libcudnn.so.9 not found (install cuDNN 9, e.g. `pip install nvidia-cudnn-cu13`, and add its lib directory to LD_LIBRARY_PATH)"
                    .into(),
            );
        }
        let version = dnn::get_version();
        if version < 90000 {
            return Err(format!("cuDNN {version} is older than 9.0"));
        }
        let handle = dnn::create_handle().map_err(|e| format!("cudnnCreate: {}", status(e)))?;
        // SAFETY: the handle was just created; the stream belongs to the context bound
        // on this thread and outlives the handle (both are owned by the backend).
        if let Err(e) = unsafe { dnn::set_stream(handle, stream as dsys::cudaStream_t) } {
            // SAFETY: created above, destroyed once.
            let _ = unsafe { dnn::destroy_handle(handle) };
            return Err(format!("cudnnSetStream: {}", status(e)));
        }
        Ok(Self {
            handle,
            version,
            plans: HashMap::new(),
            fused_residuals: 0,
        })
    }

    /// The plan for `p` (chosen once, then cached), or why cuDNN does not take it.
    pub fn plan(&mut self, p: &ConvProblem, d: &ConvDescriptors) -> Result<ConvPlan, String> {
        if let Some(r) = self.plans.get(p) {
            return r.clone();
        }
        let r = self.choose(d);
        self.plans.insert(*p, r.clone());
        r
    }

    /// Whether `p` is known to be refused (no plan, or a launch failed).
    pub fn refused(&self, p: &ConvProblem) -> bool {
        matches!(self.plans.get(p), Some(Err(_)))
    }

    /// Counts a convolution that added its residual in the cuDNN call.
    pub fn count_fused_residual(&mut self) {
        self.fused_residuals += 1;
    }

    /// Marks `p` as refused (a launch failed): later calls go to the next layout, or
    /// im2col, at once.
    pub fn refuse(&mut self, p: &ConvProblem, why: String) {
        self.plans.insert(*p, Err(why));
    }

    fn choose(&self, d: &ConvDescriptors) -> Result<ConvPlan, String> {
        // SAFETY: zeroed perf records are valid (plain C data) and overwritten by cuDNN.
        let mut perf: [dsys::cudnnConvolutionFwdAlgoPerf_t; HEURISTIC_RESULTS] =
            unsafe { std::mem::zeroed() };
        let mut returned: c_int = 0;
        // SAFETY: the handle and descriptors are live; perf has room for the count given.
        unsafe {
            dnn::get_convolution_forward_algorithm(
                self.handle,
                d.x,
                d.w,
                d.conv,
                d.y,
                HEURISTIC_RESULTS as c_int,
                &mut returned,
                perf.as_mut_ptr(),
            )
        }
        .map_err(|e| format!("cudnnGetConvolutionForwardAlgorithm_v7: {}", status(e)))?;
        let ranked = &perf[..(returned.max(0) as usize).min(HEURISTIC_RESULTS)];
        ranked
            .iter()
            .find(|r| {
                r.status == dsys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                    && r.determinism == dsys::cudnnDeterminism_t::CUDNN_DETERMINISTIC
                    && r.memory <= MAX_WORKSPACE_BYTES
            })
            .map(|r| ConvPlan {
                algo: r.algo,
                math: r.mathType,
                workspace_bytes: r.memory,
            })
            .ok_or_else(|| {
                format!(
                    "no deterministic algorithm within {} MiB among {} ranked",
                    MAX_WORKSPACE_BYTES >> 20,
                    ranked.len()
                )
            })
    }

    /// `y = conv(x, w) + beta * y` on the handle's stream.
    ///
    /// # Safety
    /// `x`, `w`, `y` and `workspace` must be live device allocations of the sizes `d`
    /// and `plan` describe, used on the handle's stream.
    pub unsafe fn forward(
        &self,
        d: &ConvDescriptors,
        plan: &ConvPlan,
        x: u64,
        w: u64,
        y: u64,
        workspace: u64,
        beta: f32,
    ) -> Result<(), String> {
        let alpha = 1.0f32;
        // SAFETY: the descriptor is live (owned by `d`).
        unsafe { dnn::set_convolution_math_type(d.conv, plan.math) }
            .map_err(|e| format!("cudnnSetConvolutionMathType: {}", status(e)))?;
        // SAFETY: per the caller's contract; alpha and beta are f32 host values, as the
        // pseudo-BF16 configuration takes them.
        unsafe {
            dnn::convolution_forward(
                self.handle,
                &alpha as *const f32 as *const _,
                d.x,
                x as *const _,
                d.w,
                w as *const _,
                d.conv,
                plan.algo,
                workspace as *mut _,
                plan.workspace_bytes,
                &beta as *const f32 as *const _,
                d.y,
                y as *mut _,
            )
        }
        .map_err(|e| format!("cudnnConvolutionForward ({:?}): {}", plan.algo, status(e)))
    }

    /// Which problems run where, for [`ConvStats`].
    pub fn stats(&self) -> ConvStats {
        let mut s = ConvStats {
            cudnn_version: Some(self.version),
            fused_residual_calls: self.fused_residuals,
            ..ConvStats::default()
        };
        let mut entries: Vec<_> = self.plans.iter().collect();
        entries.sort_by_key(|(p, _)| **p);
        for (p, r) in entries {
            let what = p.to_string();
            match r {
                Ok(plan) => s
                    .cudnn_problems
                    .push(format!("{what}: {:?} ({:?})", plan.algo, plan.math)),
                Err(why) => s.refused_problems.push(format!("{what}: {why}")),
            }
        }
        s
    }
}

impl Drop for Cudnn {
    fn drop(&mut self) {
        // SAFETY: created by `open`, destroyed once.
        let _ = unsafe { dnn::destroy_handle(self.handle) };
    }
}

/// cuDNN's state on a backend: opened lazily at the first BF16 convolution (or the
/// first 4-D parameter, whose layout depends on it).
pub(crate) enum CudnnState {
    /// Not tried yet.
    Unopened,
    Ready(Box<Cudnn>),
    /// Could not be opened; the reason.
    Unavailable(String),
}

impl CudnnState {
    pub fn stats(&self, path: ConvPath) -> ConvStats {
        if path == ConvPath::Im2col {
            return ConvStats {
                unavailable: Some("turned off (SD_CUDA_CONV=im2col or set_conv_path)".into()),
                ..ConvStats::default()
            };
        }
        let mut s = match self {
            Self::Ready(c) => c.stats(),
            Self::Unavailable(why) => ConvStats {
                unavailable: Some(why.clone()),
                ..ConvStats::default()
            },
            Self::Unopened => ConvStats::default(),
        };
        s.path = path;
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_size_matches_the_convolution_arithmetic() {
        let p = ConvProblem {
            batch: 1,
            in_channels: 8,
            height: 17,
            width: 19,
            out_channels: 12,
            kernel_h: 3,
            kernel_w: 3,
            stride: 2,
            padding: 0,
            channels_last: false,
        };
        assert_eq!(p.output_hw(), (8, 9));
        assert_eq!(p.to_string(), "1x8x17x19 -> 12 k3x3 s2 p0 nchw");
        let same = ConvProblem {
            stride: 1,
            padding: 1,
            ..p
        };
        assert_eq!(same.output_hw(), (17, 19));
    }

    #[test]
    fn dimensions_beyond_int_are_refused() {
        let p = ConvProblem {
            batch: 1,
            in_channels: 1 << 40,
            height: 4,
            width: 4,
            out_channels: 1,
            kernel_h: 1,
            kernel_w: 1,
            stride: 1,
            padding: 0,
            channels_last: true,
        };
        assert!(p.dims().unwrap_err().contains("exceeds"));
    }

    #[test]
    fn conv_paths_parse_by_name_and_refuse_others() {
        for p in ConvPath::ALL {
            assert_eq!(ConvPath::parse(p.name()).unwrap(), p);
        }
        let e = ConvPath::parse("channels_last").unwrap_err().to_string();
        assert!(
            e.contains("SD_CUDA_CONV") && e.contains("nhwc, nchw, im2col"),
            "{e}"
        );
        assert_eq!(ConvPath::default(), ConvPath::CudnnNhwc);
    }

    #[test]
    fn problems_refused_channels_last_but_run_nchw_are_not_on_im2col() {
        let s = ConvStats {
            path: ConvPath::CudnnNhwc,
            cudnn_version: Some(91400),
            unavailable: None,
            cudnn_problems: vec![
                "1x128x64x64 -> 3 k3x3 s1 p1 nchw: ALGO (MATH)".into(),
                "1x128x64x64 -> 128 k3x3 s1 p1 nhwc: ALGO (MATH)".into(),
            ],
            refused_problems: vec![
                "1x128x64x64 -> 3 k3x3 s1 p1 nhwc: no deterministic algorithm".into(),
                "1x8x9x9 -> 12 k3x3 s2 p0 nhwc: refused".into(),
                "1x8x9x9 -> 12 k3x3 s2 p0 nchw: refused".into(),
            ],
            fused_residual_calls: 0,
        };
        assert_eq!(
            s.on_im2col(),
            vec![
                "1x8x9x9 -> 12 k3x3 s2 p0 nhwc: refused",
                "1x8x9x9 -> 12 k3x3 s2 p0 nchw: refused"
            ]
        );
        assert!(
            s.to_string()
                .contains("3 refused, 2 of them left to im2col"),
            "{s}"
        );
    }

    #[test]
    fn stats_say_why_cudnn_is_not_used() {
        let nhwc = ConvPath::CudnnNhwc;
        let s = CudnnState::Unavailable("libcudnn.so.9 not found".into()).stats(nhwc);
        assert!(s.to_string().contains("libcudnn.so.9 not found"), "{s}");
        let off = CudnnState::Unopened.stats(ConvPath::Im2col);
        assert!(off.to_string().contains("turned off"), "{off}");
        let unopened = CudnnState::Unopened.stats(nhwc);
        assert!(unopened.to_string().contains("not opened"), "{unopened}");
    }
}
