// ntfast — XLA FFI CPU handler of the target `ntfast_fused_cnn` (contract: /work/notes/NATIVE.md,
// definition: ntfast/ops/fused_cnn.py). Decodes the plan attributes (kernels/common/plan.h),
// checks shapes, picks the thread count and the ISA variant, and runs fused_cnn_impl.h.
//
// Operands x1 (N1, H, W, C), x2 (N2, H, W, C), both F32 or both F64. Results nngp (N1, N2),
// ntk (N1, N2), cov1 (N1,), cov2 (N2,). Attributes plan_i (int64[]), plan_f (f64[]), sym,
// compute_ntk, compute_cov, threads (int64; threads 0 = NTFAST_NUM_THREADS or the CPUs this
// process may run on). NTFAST_SIMD=avx2|generic caps the ISA variant; NTFAST_CONV=two-pass turns
// the register path of SAME 3×3 convs off (tests use both: the register path must give the bits
// of the two-pass form).
#include <sched.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "fused_cnn_cpu.h"
#include "plan.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace ntf {
namespace cpu {

int auto_threads() {
  if (const char* env = std::getenv("NTFAST_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  return 1;
}

bool have_avx2() {
#if defined(NTF_HAVE_AVX2_TU) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

bool have_avx512() {
#if defined(NTF_HAVE_AVX512_TU) && (defined(__x86_64__) || defined(__i386__))
  static const bool ok = have_avx2() && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
  return ok;
#else
  return false;
#endif
}

// "avx512", "avx2" or "generic": the loops a call runs now, the best this CPU and build have,
// or fewer with NTFAST_SIMD=avx2|generic (tests run every variant the machine can).
const char* selected_simd() {
  const char* env = std::getenv("NTFAST_SIMD");
  if (env && std::strcmp(env, "generic") == 0) return "generic";
  if (env && std::strcmp(env, "avx2") == 0) return have_avx2() ? "avx2" : "generic";
  if (have_avx512()) return "avx512";
  return have_avx2() ? "avx2" : "generic";
}

}  // namespace cpu
}  // namespace ntf

static ffi::Error FusedCnnCpu(ffi::AnyBuffer x1, ffi::AnyBuffer x2, ffi::Span<const int64_t> plan_i,
                              ffi::Span<const double> plan_f, int64_t sym, int64_t compute_ntk,
                              int64_t compute_cov, int64_t threads,
                              ffi::Result<ffi::AnyBuffer> nngp, ffi::Result<ffi::AnyBuffer> ntk,
                              ffi::Result<ffi::AnyBuffer> cov1, ffi::Result<ffi::AnyBuffer> cov2) {
  using ntf::cpu::RunArgs;
  static thread_local ntf::Plan plan;
  const int rc = ntf::decode_plan(plan_i.begin(), (long)plan_i.size(), plan_f.begin(),
                                  (long)plan_f.size(), &plan);
  if (rc != ntf::PLAN_OK)
    return ffi::Error::InvalidArgument(std::string("ntfast_fused_cnn: ") +
                                       ntf::plan_error_string(rc));
  const auto dt = x1.element_type();
  if (dt != ffi::DataType::F32 && dt != ffi::DataType::F64)
    return ffi::Error::InvalidArgument("ntfast_fused_cnn: x1 must be float32 or float64");
  if (x2.element_type() != dt || nngp->element_type() != dt || ntk->element_type() != dt ||
      cov1->element_type() != dt || cov2->element_type() != dt)
    return ffi::Error::InvalidArgument("ntfast_fused_cnn: all operands/results need one dtype");
  const auto d1 = x1.dimensions();
  const auto d2 = x2.dimensions();
  if (d1.size() != 4 || d2.size() != 4 || d1[1] != d2[1] || d1[2] != d2[2] || d1[3] != d2[3])
    return ffi::Error::InvalidArgument("ntfast_fused_cnn: x1, x2 must be (N, H, W, C) alike");
  const int64_t n1 = d1[0], n2 = d2[0];
  if (sym && n1 != n2)
    return ffi::Error::InvalidArgument("ntfast_fused_cnn: sym=1 needs x2 = x1");
  const auto dn = nngp->dimensions();
  const auto dk = ntk->dimensions();
  if (dn.size() != 2 || dn[0] != n1 || dn[1] != n2 || dk.size() != 2 || dk[0] != n1 ||
      dk[1] != n2 || cov1->element_count() != (size_t)n1 || cov2->element_count() != (size_t)n2)
    return ffi::Error::InvalidArgument("ntfast_fused_cnn: result shapes do not match x1, x2");
  if (d1[3] < 1) return ffi::Error::InvalidArgument("ntfast_fused_cnn: C must be >= 1");

  RunArgs args;
  args.plan = &plan;
  args.dtype = dt == ffi::DataType::F32 ? 0 : 1;
  args.x1 = x1.untyped_data();
  args.x2 = x2.untyped_data();
  args.n1 = n1;
  args.n2 = n2;
  args.h = d1[1];
  args.w = d1[2];
  args.c = d1[3];
  args.nngp = nngp->untyped_data();
  args.ntk = ntk->untyped_data();
  args.cov1 = cov1->untyped_data();
  args.cov2 = cov2->untyped_data();
  args.sym = sym != 0;
  args.compute_ntk = compute_ntk != 0;
  args.compute_cov = compute_cov != 0;
  args.threads = threads > 0 ? (int)threads : ntf::cpu::auto_threads();
  const char* conv_env = std::getenv("NTFAST_CONV");
  args.conv_two_pass = conv_env && std::strcmp(conv_env, "two-pass") == 0;
  if (n1 == 0 || n2 == 0) return ffi::Error::Success();
  const char* simd = ntf::cpu::selected_simd();
  const char* err = std::strcmp(simd, "avx512") == 0 ? ntf::cpu::avx512::run(args)
                    : std::strcmp(simd, "avx2") == 0 ? ntf::cpu::avx2::run(args)
                                                     : ntf::cpu::generic::run(args);
  if (err) return ffi::Error::InvalidArgument(std::string("ntfast_fused_cnn: ") + err);
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(ntfast_fused_cnn_cpu, FusedCnnCpu,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x1
                                  .Arg<ffi::AnyBuffer>()  // x2
                                  .Attr<ffi::Span<const int64_t>>("plan_i")
                                  .Attr<ffi::Span<const double>>("plan_f")
                                  .Attr<int64_t>("sym")
                                  .Attr<int64_t>("compute_ntk")
                                  .Attr<int64_t>("compute_cov")
                                  .Attr<int64_t>("threads")
                                  .Ret<ffi::AnyBuffer>()   // nngp
                                  .Ret<ffi::AnyBuffer>()   // ntk
                                  .Ret<ffi::AnyBuffer>()   // cov1
                                  .Ret<ffi::AnyBuffer>());  // cov2
