// Plane loops compiled with AVX-512 F/VL/DQ/BW + AVX2/FMA (CMakeLists.txt sets the flags on this
// file only): the same code as fused_cnn_avx2.cc, EVEX encoded (32 vector registers instead of
// 16), the auto-vectorized loops preferring 256-bit vectors (plane rows are ~33 entries), the
// hand-vectorized ReLU-family rows (simd_avx2.h) 16 lanes at a time where a row has whole blocks
// of 16 (on Zen 4 a 512-bit operation is one µop on the 256-bit pipes: the expectation's rows
// 1.7× faster, the whole kernel 1.25–1.35×). fused_cnn.cc calls it only when the CPU reports
// AVX-512 F and VL (and AVX2, FMA); elsewhere this file builds a stub that is never called.
#if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX2__) && defined(__FMA__)
#define NTF_SIMD_NS avx512
#include "fused_cnn_impl.h"
#else
#include "fused_cnn_cpu.h"
namespace ntf {
namespace cpu {
namespace avx512 {
const char* run(const RunArgs&) { return "this build has no AVX-512 kernels"; }
}  // namespace avx512
}  // namespace cpu
}  // namespace ntf
#endif
