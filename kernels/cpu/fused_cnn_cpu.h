// ntfast — CPU fused CNN kernel: the interface between the XLA FFI handler (fused_cnn.cc) and the
// plane loops, which are compiled three times from fused_cnn_impl.h (fused_cnn_avx512.cc with
// AVX-512 VL, fused_cnn_avx2.cc with -mavx2 -mfma, fused_cnn_generic.cc for the baseline ISA);
// the handler picks one at run time.
#pragma once

#include "plan.h"

namespace ntf {
namespace cpu {

// One call of the op. Images NHWC row-major; outputs row-major; all pointers of `dtype`
// (0: float32, 1: float64). With sym, x2 == x1 (n2 == n1) and only pairs a <= b are computed.
struct RunArgs {
  const Plan* plan;
  int dtype;
  const void* x1;
  const void* x2;
  long n1, n2, h, w, c;
  void* nngp;  // (n1, n2)
  void* ntk;   // (n1, n2), zeros unless compute_ntk
  void* cov1;  // (n1,), zeros unless compute_cov
  void* cov2;  // (n2,)
  int sym, compute_ntk, compute_cov;
  int threads;  // > 0
  // f32 SIMD variants: SAME 3×3 convs followed by a ReLU-family step in the two-pass form, not
  // the register path (simd_avx2.h conv3_abrelu_rows); the same bits either way.
  int conv_two_pass = 0;
};

// nullptr on success, else a static error message.
namespace generic {
const char* run(const RunArgs& args);
}
namespace avx2 {
const char* run(const RunArgs& args);
}
namespace avx512 {
const char* run(const RunArgs& args);
}

}  // namespace cpu
}  // namespace ntf
