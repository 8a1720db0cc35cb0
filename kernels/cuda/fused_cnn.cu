// ntfast — XLA FFI handler of target `ntfast_fused_cnn` on CUDA (the contract: /work/notes or
// ntfast/_native; same operands, results and attributes as the CPU handler):
//
//   operands  x1 (N1, H, W, C), x2 (N2, H, W, C): NHWC, both F32 or both F64 (sym = 1: x2 is x1)
//   results   nngp (N1, N2), ntk (N1, N2), cov1 (N1,), cov2 (N2,) in the input dtype; ntk is left
//             zero when compute_ntk = 0, cov1/cov2 when compute_cov = 0; sym = 1 writes both
//             triangles and cov2 = cov1
//   attrs     plan_i (int64[]), plan_f (double[]) (ntfast/ops/fused_table.py), sym,
//             compute_ntk, compute_cov (int64 0/1), threads (CPU only; ignored here)
//
// Everything is enqueued on the XLA stream; scratch memory comes from XLA's scratch allocator,
// whose buffers are released when the handler returns: XLA's GPU allocator orders reuse on the
// compute stream, so kernels enqueued here may still use them (jaxlib's own FFI solvers rely on
// the same). Kernels and launch sequence:
// fused_cnn.cuh.
#include <stdint.h>

#include <string>

#include "fused_cnn.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

ffi::Error Invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("ntfast_fused_cnn (CUDA): " + what);
}

std::string Dims(ffi::AnyBuffer::Dimensions d) {
  std::string s = "(";
  for (size_t k = 0; k < d.size(); ++k) s += (k ? ", " : "") + std::to_string(d[k]);
  return s + (d.size() == 1 ? ",)" : ")");
}

bool HasDims(ffi::AnyBuffer::Dimensions d, std::initializer_list<int64_t> want) {
  if (d.size() != want.size()) return false;
  size_t k = 0;
  for (int64_t v : want)
    if (d[k++] != v) return false;
  return true;
}

template <class T>
ffi::Error Run(cudaStream_t stream, ffi::ScratchAllocator& scratch, const ntf::Plan& plan,
               ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::Result<ffi::AnyBuffer>& nngp,
               ffi::Result<ffi::AnyBuffer>& ntk, ffi::Result<ffi::AnyBuffer>& cov1,
               ffi::Result<ffi::AnyBuffer>& cov2, int sym, int compute_ntk, int compute_cov) {
  const auto d1 = x1.dimensions(), d2 = x2.dimensions();
  ntf::cuda::Problem<T> pb{};
  pb.x1 = static_cast<const T*>(x1.untyped_data());
  pb.x2 = static_cast<const T*>(x2.untyped_data());
  pb.n1 = static_cast<int>(d1[0]);
  pb.n2 = static_cast<int>(d2[0]);
  pb.h = static_cast<int>(d1[1]);
  pb.w = static_cast<int>(d1[2]);
  pb.c = static_cast<int>(d1[3]);
  pb.sym = sym;
  pb.ntk = compute_ntk;
  pb.cov = compute_cov;
  pb.nngp = static_cast<T*>(nngp->untyped_data());
  pb.ntk_out = static_cast<T*>(ntk->untyped_data());
  pb.cov1 = static_cast<T*>(cov1->untyped_data());
  pb.cov2 = static_cast<T*>(cov2->untyped_data());
  auto allocate = [&scratch](size_t bytes) -> void* {
    std::optional<void*> p = scratch.Allocate(bytes, 256);
    return p.has_value() ? *p : nullptr;
  };
  if (const char* err = ntf::cuda::run_fused_cnn<T>(plan, pb, stream, allocate)) {
    return ffi::Error::Internal(std::string("ntfast_fused_cnn (CUDA): ") + err);
  }
  return ffi::Error::Success();
}

ffi::Error FusedCnnImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x1,
                        ffi::AnyBuffer x2, ffi::Result<ffi::AnyBuffer> nngp,
                        ffi::Result<ffi::AnyBuffer> ntk, ffi::Result<ffi::AnyBuffer> cov1,
                        ffi::Result<ffi::AnyBuffer> cov2, ffi::Span<const int64_t> plan_i,
                        ffi::Span<const double> plan_f, int64_t sym, int64_t compute_ntk,
                        int64_t compute_cov, int64_t /*threads: CPU only*/) {
  const ffi::DataType dt = x1.element_type();
  if (dt != ffi::DataType::F32 && dt != ffi::DataType::F64)
    return Invalid("x1 must be float32 or float64");
  if (x2.element_type() != dt) return Invalid("x1 and x2 must have the same dtype");
  for (auto* r : {&nngp, &ntk, &cov1, &cov2})
    if ((*r)->element_type() != dt) return Invalid("results must have the dtype of x1");
  const auto d1 = x1.dimensions(), d2 = x2.dimensions();
  if (d1.size() != 4 || d2.size() != 4)
    return Invalid("x1, x2 must be (N, H, W, C), got " + Dims(d1) + " and " + Dims(d2));
  if (d1[1] != d2[1] || d1[2] != d2[2] || d1[3] != d2[3] || d1[3] < 1)
    return Invalid("x1 and x2 must have the same (H, W, C >= 1), got " + Dims(d1) + " and " +
                   Dims(d2));
  if (sym && d2[0] != d1[0]) return Invalid("sym = 1 needs x2 = x1");
  if (!HasDims(nngp->dimensions(), {d1[0], d2[0]}) || !HasDims(ntk->dimensions(), {d1[0], d2[0]}) ||
      !HasDims(cov1->dimensions(), {d1[0]}) || !HasDims(cov2->dimensions(), {d2[0]}))
    return Invalid("results must be nngp, ntk (N1, N2), cov1 (N1,), cov2 (N2,)");
  if (d1[0] > (int64_t(1) << 30) || d2[0] > (int64_t(1) << 30))
    return Invalid("too many images for one call");

  // ~14 KB: decoded once per call on the host, passed to every kernel by value (kernel
  // parameters up to 32 KB: sm_70+ with CUDA >= 12.1).
  ntf::Plan plan;
  const int code = ntf::decode_plan(plan_i.begin(), static_cast<long>(plan_i.size()),
                                    plan_f.begin(), static_cast<long>(plan_f.size()), &plan);
  if (code != ntf::PLAN_OK)
    return Invalid(std::string("bad plan: ") + ntf::plan_error_string(code));
  if (d1[1] != plan.seg[0].hv_in || d1[2] != plan.seg[0].wv_in)
    return Invalid("image size " + Dims(d1) + " does not match the plan's (" +
                   std::to_string(plan.seg[0].hv_in) + ", " + std::to_string(plan.seg[0].wv_in) +
                   ")");

  const int s = sym != 0, n = compute_ntk != 0, c = compute_cov != 0;
  if (dt == ffi::DataType::F32)
    return Run<float>(stream, scratch, plan, x1, x2, nngp, ntk, cov1, cov2, s, n, c);
  return Run<double>(stream, scratch, plan, x1, x2, nngp, ntk, cov1, cov2, s, n, c);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(NtfFusedCnnCuda, FusedCnnImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()   // x1
                                  .Arg<ffi::AnyBuffer>()   // x2
                                  .Ret<ffi::AnyBuffer>()   // nngp
                                  .Ret<ffi::AnyBuffer>()   // ntk
                                  .Ret<ffi::AnyBuffer>()   // cov1
                                  .Ret<ffi::AnyBuffer>()   // cov2
                                  .Attr<ffi::Span<const int64_t>>("plan_i")
                                  .Attr<ffi::Span<const double>>("plan_f")
                                  .Attr<int64_t>("sym")
                                  .Attr<int64_t>("compute_ntk")
                                  .Attr<int64_t>("compute_cov")
                                  .Attr<int64_t>("threads"));
