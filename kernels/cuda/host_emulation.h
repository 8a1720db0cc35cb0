// ntfast — host emulation of the CUDA subset used by fused_cnn.cuh (tests only; never in the
// GPU module). A launch runs its blocks one after another; a block runs blockDim.x std::threads
// that share the block's "shared memory" and synchronize on a std::barrier at every
// NTF_SYNC(), so races a missing __syncthreads() would cause on a GPU can show here too, and the
// kernels' indexing, tiling, pooling, reductions and host orchestration run exactly as written.
// Not emulated: warps, memory coalescing, launch limits (checked on the GPU only).
#pragma once

#include <barrier>
#include <cstddef>
#include <cstring>
#include <thread>
#include <vector>

struct ntf_emu_dim3 {
  unsigned x = 1, y = 1, z = 1;
};

// The CUDA built-ins, per emulated thread (threadIdx, blockIdx) or per launch (blockDim, gridDim).
inline thread_local ntf_emu_dim3 threadIdx;
inline thread_local ntf_emu_dim3 blockIdx;
inline thread_local ntf_emu_dim3 blockDim;
inline thread_local ntf_emu_dim3 gridDim;

namespace ntf::emu {

inline thread_local std::barrier<>* tl_barrier = nullptr;
inline thread_local unsigned char* tl_smem = nullptr;

// Limits the orchestration sees (tests lower them to force the global-memory workspace path).
inline size_t smem_default = 48 * 1024;
inline size_t smem_optin = 100 * 1024;
inline int sm_count = 2;
// Counters a test may read: launches, and whether the global workspace path ran.
inline long launches = 0;
inline long global_workspace_launches = 0;

template <class Kernel, class... Args>
void launch(Kernel kernel, unsigned grid, unsigned block, size_t smem, const Args&... args) {
  ++launches;
  std::vector<unsigned char> shared(smem + 64);
  for (unsigned b = 0; b < grid; ++b) {
    std::barrier<> bar(block);
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t, b] {
        threadIdx.x = t;
        blockIdx.x = b;
        blockDim.x = block;
        gridDim.x = grid;
        tl_barrier = &bar;
        tl_smem = shared.data();
        kernel(args...);
      });
    }
    for (auto& th : threads) th.join();
  }
}

}  // namespace ntf::emu

#define NTF_GLOBAL
#define NTF_DEVICE
#define NTF_GRID_CONSTANT
#define NTF_DYNAMIC_SMEM(name) unsigned char* name = ::ntf::emu::tl_smem
#define NTF_SYNC() ::ntf::emu::tl_barrier->arrive_and_wait()
#define NTF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::ntf::emu::launch((kernel), (grid), (block), (smem), __VA_ARGS__)

namespace ntf::rt {

using Stream = void*;

inline const char* memset_async(void* ptr, size_t bytes, Stream) {
  if (bytes) std::memset(ptr, 0, bytes);
  return nullptr;
}

inline const char* last_error() { return nullptr; }

struct DeviceLimits {
  size_t smem_default;
  size_t smem_optin;
  int sm_count;
};

inline const char* device_limits(DeviceLimits* out) {
  out->smem_default = ::ntf::emu::smem_default;
  out->smem_optin = ::ntf::emu::smem_optin;
  out->sm_count = ::ntf::emu::sm_count;
  return nullptr;
}

template <class Kernel>
inline const char* allow_smem(Kernel, size_t) {
  return nullptr;
}

}  // namespace ntf::rt
