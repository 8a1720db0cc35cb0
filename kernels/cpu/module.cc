// ntfast._native._cpu: the nanobind module that exposes the CPU XLA FFI handlers.
//   handlers()   -> {"ntfast_fused_cnn": PyCapsule(XLA_FFI_Handler*)}
//   build_info() -> {"compiler", "flags", "simd" (compiled variants), "simd_selected"
//                    (what a call runs now), "threads" (automatic thread count), "plan_version"}
#include <nanobind/nanobind.h>

#include "plan.h"
#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

extern "C" XLA_FFI_Error* ntfast_fused_cnn_cpu(XLA_FFI_CallFrame* call_frame);

namespace ntf {
namespace cpu {
int auto_threads();
const char* selected_simd();
}  // namespace cpu
}  // namespace ntf

#ifndef NTF_BUILD_COMPILER
#define NTF_BUILD_COMPILER "unknown"
#endif
#ifndef NTF_BUILD_FLAGS
#define NTF_BUILD_FLAGS ""
#endif
#ifndef NTF_BUILD_SIMD
#define NTF_BUILD_SIMD "generic"
#endif

NB_MODULE(_cpu, m) {
  m.doc() = "ntfast C++ CPU XLA FFI handlers (target ntfast_fused_cnn).";
  m.def("handlers", []() {
    nb::dict d;
    d["ntfast_fused_cnn"] = nb::capsule(reinterpret_cast<void*>(&ntfast_fused_cnn_cpu));
    return d;
  });
  m.def("build_info", []() {
    nb::dict d;
    d["compiler"] = NTF_BUILD_COMPILER;
    d["flags"] = NTF_BUILD_FLAGS;
    d["simd"] = NTF_BUILD_SIMD;
    d["simd_selected"] = ntf::cpu::selected_simd();
    d["threads"] = ntf::cpu::auto_threads();
    d["plan_version"] = ntf::kPlanVersion;
    d["cuda_archs"] = nb::none();
    return d;
  });
}
