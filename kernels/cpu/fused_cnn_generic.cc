// Plane loops for the baseline ISA of the build (x86-64: SSE2), the portable fallback.
#define NTF_SIMD_NS generic
#include "fused_cnn_impl.h"
