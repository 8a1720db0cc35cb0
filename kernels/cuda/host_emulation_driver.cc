// ntfast — test-only shared library: the CUDA fused CNN path (fused_cnn.cuh: kernels and host
// orchestration) run on the CPU through host_emulation.h. Built by
// tests/native/test_cuda_emulation.py with the host C++ compiler (never part of the package):
//   g++ -std=c++20 -O1 -pthread -shared -fPIC -DNTF_CUDA_EMULATION -Ikernels/common ...
// C entry points (ctypes): the FFI handler's operands/results/attributes as raw pointers.
#include <stdint.h>
#include <stdlib.h>

#include "fused_cnn.cuh"

namespace {

template <class T>
int Run(const T* x1, const T* x2, int64_t n1, int64_t n2, int64_t h, int64_t w, int64_t c,
        const int64_t* plan_i, int64_t n_plan_i, const double* plan_f, int64_t n_plan_f,
        int64_t sym, int64_t compute_ntk, int64_t compute_cov, T* nngp, T* ntk, T* cov1, T* cov2,
        int64_t threads, int64_t budget_bytes) {
  ntf::Plan plan;
  const int code = ntf::decode_plan(plan_i, static_cast<long>(n_plan_i), plan_f,
                                    static_cast<long>(n_plan_f), &plan);
  if (code != ntf::PLAN_OK) return 100 + code;
  if (h != plan.seg[0].hv_in || w != plan.seg[0].wv_in) return 200;
  ntf::cuda::Problem<T> pb{};
  pb.x1 = x1;
  pb.x2 = sym ? x1 : x2;
  pb.n1 = static_cast<int>(n1);
  pb.n2 = static_cast<int>(sym ? n1 : n2);
  pb.h = static_cast<int>(h);
  pb.w = static_cast<int>(w);
  pb.c = static_cast<int>(c);
  pb.sym = sym != 0;
  pb.ntk = compute_ntk != 0;
  pb.cov = compute_cov != 0;
  pb.nngp = nngp;
  pb.ntk_out = ntk;
  pb.cov1 = cov1;
  pb.cov2 = cov2;
  // Scratch is NaN-filled (0xFF bytes) so that an entry read before it is written shows up, and
  // followed by a guard zone checked afterwards (writes past the computed size fail the run).
  constexpr size_t kGuard = 4096;
  unsigned char* block = nullptr;
  size_t size = 0;
  auto allocate = [&](size_t bytes) -> void* {
    free(block);
    block = static_cast<unsigned char*>(malloc(bytes + kGuard));
    size = bytes;
    if (block) {
      for (size_t k = 0; k < bytes; ++k) block[k] = 0xFF;
      for (size_t k = 0; k < kGuard; ++k) block[bytes + k] = static_cast<unsigned char>(k * 7 + 1);
    }
    return block;
  };
  const char* err = ntf::cuda::run_fused_cnn<T>(plan, pb, nullptr, allocate,
                                                static_cast<int>(threads),
                                                static_cast<size_t>(budget_bytes));
  int guard_ok = 1;
  if (block)
    for (size_t k = 0; k < kGuard; ++k)
      guard_ok &= block[size + k] == static_cast<unsigned char>(k * 7 + 1);
  free(block);
  if (!guard_ok) return 400;
  return err ? 300 : 0;
}

}  // namespace

extern "C" {

int ntf_emu_fused_cnn_f32(const float* x1, const float* x2, int64_t n1, int64_t n2, int64_t h,
                          int64_t w, int64_t c, const int64_t* plan_i, int64_t n_plan_i,
                          const double* plan_f, int64_t n_plan_f, int64_t sym,
                          int64_t compute_ntk, int64_t compute_cov, float* nngp, float* ntk,
                          float* cov1, float* cov2, int64_t threads, int64_t budget_bytes) {
  return Run<float>(x1, x2, n1, n2, h, w, c, plan_i, n_plan_i, plan_f, n_plan_f, sym,
                    compute_ntk, compute_cov, nngp, ntk, cov1, cov2, threads, budget_bytes);
}

int ntf_emu_fused_cnn_f64(const double* x1, const double* x2, int64_t n1, int64_t n2, int64_t h,
                          int64_t w, int64_t c, const int64_t* plan_i, int64_t n_plan_i,
                          const double* plan_f, int64_t n_plan_f, int64_t sym,
                          int64_t compute_ntk, int64_t compute_cov, double* nngp, double* ntk,
                          double* cov1, double* cov2, int64_t threads, int64_t budget_bytes) {
  return Run<double>(x1, x2, n1, n2, h, w, c, plan_i, n_plan_i, plan_f, n_plan_f, sym,
                     compute_ntk, compute_cov, nngp, ntk, cov1, cov2, threads, budget_bytes);
}

// Limits the orchestration sees: shared memory default/opt-in bytes (lower them to force the
// global-workspace tiles) and the SM count (workspace slots).
void ntf_emu_set_limits(int64_t smem_default, int64_t smem_optin, int64_t sm_count) {
  ntf::emu::smem_default = static_cast<size_t>(smem_default);
  ntf::emu::smem_optin = static_cast<size_t>(smem_optin);
  ntf::emu::sm_count = static_cast<int>(sm_count);
}

// Launch counters since the last reset: total, and plane launches with a global workspace.
void ntf_emu_counters(int64_t* launches, int64_t* global_workspace) {
  *launches = ntf::emu::launches;
  *global_workspace = ntf::emu::global_workspace_launches;
  ntf::emu::launches = 0;
  ntf::emu::global_workspace_launches = 0;
}

}  // extern "C"
