// ntfast — the few CUDA constructs the fused kernels use, behind macros, so that
// fused_cnn.cuh compiles either with nvcc (the real GPU module) or as plain C++ with
// host_emulation.h (tests on machines without a GPU run the very same kernel bodies and host
// orchestration on the CPU, one std::thread per emulated CUDA thread).
#pragma once

#if defined(__CUDACC__)

#include <cuda_runtime.h>

#define NTF_GLOBAL __global__
#define NTF_DEVICE __device__
#define NTF_GRID_CONSTANT __grid_constant__
// Dynamic shared memory of the block (size given at launch).
#define NTF_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define NTF_SYNC() __syncthreads()
#define NTF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)

namespace ntf::rt {

using Stream = cudaStream_t;

inline const char* memset_async(void* ptr, size_t bytes, Stream stream) {
  if (bytes == 0) return nullptr;
  cudaError_t e = cudaMemsetAsync(ptr, 0, bytes, stream);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

// Error of the last launch (nullptr if none).
inline const char* last_error() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

struct DeviceLimits {
  size_t smem_default;  // dynamic shared memory a block may use without opting in
  size_t smem_optin;    // ... after cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
  int sm_count;
};

inline const char* device_limits(DeviceLimits* out) {
  int dev = 0, optin = 0, sms = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e == cudaSuccess)
    e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return cudaGetErrorString(e);
  out->smem_default = 48 * 1024;
  out->smem_optin = static_cast<size_t>(optin);
  out->sm_count = sms;
  return nullptr;
}

template <class Kernel>
inline const char* allow_smem(Kernel kernel, size_t bytes) {
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(bytes));
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace ntf::rt

#elif defined(NTF_CUDA_EMULATION)

#include "host_emulation.h"

#else
#error "fused_cnn.cuh needs nvcc, or NTF_CUDA_EMULATION with host_emulation.h (tests)"
#endif
