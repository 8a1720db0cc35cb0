// nanobind module `ntfast._native._cuda`: exposes the CUDA XLA FFI handlers as PyCapsules.
//
// Compiled by the host compiler (nanobind never goes through nvcc); the handlers themselves are
// defined in fused_cnn.cu. Importing this module makes no CUDA call, so it imports on a machine
// without a GPU driver; ntfast/_native registers the capsules with
// jax.ffi.register_ffi_target(name, capsule, platform="CUDA").
#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"

namespace nb = nanobind;

// fused_cnn.cu
extern "C" XLA_FFI_Error* NtfFusedCnnCuda(XLA_FFI_CallFrame* call_frame);

namespace {

nb::dict Handlers() {
  nb::dict out;
  out["ntfast_fused_cnn"] = nb::capsule(reinterpret_cast<void*>(&NtfFusedCnnCuda));
  return out;
}

nb::dict BuildInfo() {
  nb::dict out;
  out["platform"] = "CUDA";
  out["cuda_compiler"] = NTF_CUDA_COMPILER;
  out["cuda_archs"] = NTF_CUDA_ARCHS;
  out["cuda_flags"] = NTF_CUDA_FLAGS;
  out["host_compiler"] = NTF_HOST_COMPILER;
  out["cudart"] = "static";
  return out;
}

}  // namespace

NB_MODULE(_cuda, m) {
  m.doc() = "CUDA XLA FFI handlers of ntfast (target ntfast_fused_cnn).";
  m.def("handlers", &Handlers, "{target name: PyCapsule of the XLA FFI handler (platform CUDA)}");
  m.def("build_info", &BuildInfo, "How this module was built: compilers, flags, CUDA archs.");
}
