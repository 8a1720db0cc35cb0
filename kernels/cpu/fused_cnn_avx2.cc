// Plane loops compiled with -mavx2 -mfma (CMakeLists.txt sets the flags on this file only);
// fused_cnn.cc calls them only when the CPU reports AVX2 and FMA. Elsewhere this file builds a
// stub that is never called.
#if defined(__AVX2__) && defined(__FMA__)
#define NTF_SIMD_NS avx2
#include "fused_cnn_impl.h"
#else
#include "fused_cnn_cpu.h"
namespace ntf {
namespace cpu {
namespace avx2 {
const char* run(const RunArgs&) { return "this build has no AVX2 kernels"; }
}  // namespace avx2
}  // namespace cpu
}  // namespace ntf
#endif
