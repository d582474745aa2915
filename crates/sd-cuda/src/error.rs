//! Errors of the CUDA backend, with what to do about them.

use sd_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("cannot load the CUDA library {lib} ({file}): {hint}")]
    MissingLibrary {
        lib: &'static str,
        file: &'static str,
        hint: &'static str,
    },
    #[error(
        "{gpu} (compute capability {major}.{minor}) has no FP8 tensor cores (FP8 needs 8.9 or newer: Ada, Hopper, Blackwell); use --precision bf16"
    )]
    NoFp8 { gpu: String, major: i32, minor: i32 },
    #[error(
        "CUDA headers (cuda_fp8.h, cuda_bf16.h) not found; set CUDA_HOME (or SD_CUDA_INCLUDE to the include directory), or `pip install nvidia-cuda-runtime`. Tried: {0}"
    )]
    HeadersNotFound(String),
    #[error("NVRTC: {0}")]
    Nvrtc(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("cuBLASLt: {0}")]
    Blas(String),
    #[error("{0}")]
    Invalid(String),
}

impl CudaError {
    pub fn missing_library(lib: &'static str) -> Self {
        let (file, hint) = match lib {
            "cuda" => (
                "libcuda.so.1",
                "the NVIDIA driver is not installed or not on the loader path; install the driver or add the directory holding libcuda.so.1 to LD_LIBRARY_PATH",
            ),
            "nvrtc" => (
                "libnvrtc.so.13",
                "install the CUDA toolkit or `pip install nvidia-cuda-nvrtc` and add its lib directory (e.g. .../site-packages/nvidia/cu13/lib or /usr/local/cuda/lib64) to LD_LIBRARY_PATH",
            ),
            _ => (
                "libcublasLt.so.13",
                "install the CUDA toolkit or `pip install nvidia-cublas` and add its lib directory (e.g. .../site-packages/nvidia/cu13/lib or /usr/local/cuda/lib64) to LD_LIBRARY_PATH",
            ),
        };
        Self::MissingLibrary { lib, file, hint }
    }
}

impl From<cudarc::driver::DriverError> for CudaError {
    fn from(e: cudarc::driver::DriverError) -> Self {
        Self::Driver(format!("{e:?}"))
    }
}

impl From<cudarc::cublaslt::result::CublasError> for CudaError {
    fn from(e: cudarc::cublaslt::result::CublasError) -> Self {
        Self::Blas(format!("{e:?}"))
    }
}

impl From<CudaError> for ModelError {
    fn from(e: CudaError) -> Self {
        ModelError::backend(e.to_string())
    }
}

pub type Result<T, E = CudaError> = std::result::Result<T, E>;
