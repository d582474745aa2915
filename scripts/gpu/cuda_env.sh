# Sourced by the GPU scripts on the accelerator: the CUDA 13 libraries (cuBLASLt, NVRTC)
# from the pip wheels next to PyTorch, and the headers NVRTC needs (cuda_fp8.h,
# cuda_bf16.h); libcuda comes from the driver.
SP=$(python3 -c 'import site;print(site.getsitepackages()[0])')
export LD_LIBRARY_PATH=$(find "$SP/nvidia" -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}
if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda-13.0/include ]]; then
    export CUDA_HOME=/usr/local/cuda-13.0
fi
