// Plane loops compiled with AVX-512 F/VL/DQ/BW + AVX2/FMA, preferring 256-bit vectors
// (CMakeLists.txt sets the flags on this file only): the same code as fused_cnn_avx2.cc, EVEX
// encoded, so the hand-vectorized rows (simd_avx2.h) get 32 vector registers instead of 16 (no
// spills of the polynomial constants; measured ~8% on the ReLU row, Zen 4). 512-bit vectors do
// not pay here: plane rows are ~33 entries. fused_cnn.cc calls it only when the CPU reports
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
