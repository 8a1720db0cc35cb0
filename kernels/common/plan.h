// ntfast — decoded `fused_cnn` plan for the compiled kernels (C++ CPU handler and CUDA kernel).
//
// The plan travels as two XLA FFI attributes, `plan_i` (int64 span) and `plan_f` (double span),
// produced by `ntfast/ops/fused_table.py:encode` (its docstring is the layout spec, version 1).
// This header turns them into plain structs usable on host and device (plain C++17, no STL).
//
// API (stable; the CUDA kernel builds on it):
//
//   NTF_HD                    `__host__ __device__` under nvcc, empty otherwise.
//   ntf::kMaxSegments, ntf::kMaxSteps        capacity of a Plan (decode fails beyond).
//   ntf::End / Pad / StepType / Nonlin       codes (same values as fused_table.py).
//   struct ntf::Seg           one segment: grid (lh, lw), valid sizes in/out, circular, its step
//                             range, end (END_POOL/GAP/GSP/FLATTEN) and pooling parameters,
//                             plus derived: n_nonlin, nonlin_base (index of its first nonlinearity
//                             among all of the plan's), pool_lo_h/w (pooling pads), pool_out_h/w.
//   struct ntf::Step          one step: type, valid size after it (hv, wv), conv pads
//                             (lo_h, fh, lo_w, fw), has_b, standard, nonlin code, and the floats
//                             w_var, b_var, ntk_scale, p0, p1, p2; plus derived: nonlin_index
//                             (k-th nonlinearity of its segment, -1 for affine steps).
//   struct ntf::Plan          n_segments, n_steps, n_nonlin, seg[], step[].
//   int ntf::decode_plan(const int64_t* ints, long n_ints, const double* floats, long n_floats,
//                        Plan* out)       0 on success, else a PlanError code.
//   const char* ntf::plan_error_string(int code)
//   int ntf::pool_out_size(int size, int window, int stride, int padding)
//   int ntf::pool_lo(int size, int window, int stride, int padding)   (SAME amounts; 0 for VALID)
//
// Nothing here allocates; a Plan is ~12 KB (copy it to constant memory on the GPU).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define NTF_HD __host__ __device__
#else
#define NTF_HD
#endif

namespace ntf {

constexpr int kPlanVersion = 1;
constexpr int kHeaderInts = 4;
constexpr int kSegInts = 17;
constexpr int kStepInts = 10;
constexpr int kStepFloats = 6;
constexpr int kMaxSegments = 16;
constexpr int kMaxSteps = 128;

enum End : int { END_POOL = 0, END_GAP = 1, END_GSP = 2, END_FLATTEN = 3 };
enum Pad : int { PAD_VALID = 0, PAD_SAME = 1, PAD_CIRCULAR = 2 };
enum StepType : int { STEP_CONV = 0, STEP_DENSE = 1, STEP_NONLIN = 2 };
enum Nonlin : int { NONLIN_ABRELU = 0, NONLIN_ERF = 1, NONLIN_GELU = 2 };

enum PlanError : int {
  PLAN_OK = 0,
  PLAN_TOO_SHORT = 1,
  PLAN_BAD_VERSION = 2,
  PLAN_TOO_MANY_SEGMENTS = 3,
  PLAN_TOO_MANY_STEPS = 4,
  PLAN_BAD_FLOATS = 5,
  PLAN_BAD_VALUE = 6,
};

struct Seg {
  int lh, lw;          // periodic grid of the packed offset layout
  int hv_in, wv_in;    // valid size entering the segment
  int circular;        // 1: box filters wrap on the image itself
  int first_step, n_steps;
  int end;             // End
  int pool_wh, pool_ww, pool_sh, pool_sw, pool_padding, pool_sum, normalize_edges;
  int hv_out, wv_out;  // valid size after the last step (before pooling)
  // Derived.
  int n_nonlin;        // nonlinearities in this segment
  int nonlin_base;     // index of its first nonlinearity among the plan's
  int pool_lo_h, pool_lo_w;    // pooling pads (low side; 0 unless END_POOL and not VALID)
  int pool_out_h, pool_out_w;  // valid size after the pooling (= next segment's hv_in, wv_in)
};

struct Step {
  int type;                  // StepType
  int hv, wv;                // valid size after the step
  int lo_h, fh, lo_w, fw;    // box filter: out[i] = 1/f Σ_{a<f} in[(i + a − lo) mod L]
  int has_b, standard;       // bias present; standard parameterization
  int nonlin;                // Nonlin code (STEP_NONLIN), else -1
  int nonlin_index;          // derived: k-th nonlinearity of its segment, else -1
  double w_var, b_var, ntk_scale;
  double p0, p1, p2;         // nonlinearity parameters (abrelu a, b; erf a, b, c)
};

struct Plan {
  int n_segments, n_steps, n_nonlin;
  Seg seg[kMaxSegments];
  Step step[kMaxSteps];
};

NTF_HD inline int pool_out_size(int size, int window, int stride, int padding) {
  if (padding == PAD_VALID) return (size - window) / stride + 1;
  return (size + stride - 1) / stride;
}

// Low-side SAME pad of `ntfast.ops.conv.same_pads` (also CIRCULAR's wrap amount); 0 for VALID.
NTF_HD inline int pool_lo(int size, int window, int stride, int padding) {
  if (padding == PAD_VALID) return 0;
  int out = (size + stride - 1) / stride;
  int total = (out - 1) * stride + window - size;
  if (total < 0) total = 0;
  return total / 2;
}

NTF_HD inline const char* plan_error_string(int code) {
  switch (code) {
    case PLAN_OK: return "ok";
    case PLAN_TOO_SHORT: return "plan_i is shorter than its header says";
    case PLAN_BAD_VERSION: return "plan_i has an unknown encoding version";
    case PLAN_TOO_MANY_SEGMENTS: return "plan has more segments than the kernel supports";
    case PLAN_TOO_MANY_STEPS: return "plan has more steps than the kernel supports";
    case PLAN_BAD_FLOATS: return "plan_f length does not match plan_i";
    case PLAN_BAD_VALUE: return "plan holds an invalid value (size, filter or code)";
    default: return "unknown plan error";
  }
}

NTF_HD inline int decode_plan(const int64_t* ints, long n_ints, const double* floats,
                              long n_floats, Plan* out) {
  if (n_ints < kHeaderInts) return PLAN_TOO_SHORT;
  if (ints[0] != kPlanVersion) return PLAN_BAD_VERSION;
  const long ns = ints[1], nt = ints[2];
  if (ns < 1 || ns > kMaxSegments) return PLAN_TOO_MANY_SEGMENTS;
  if (nt < 0 || nt > kMaxSteps) return PLAN_TOO_MANY_STEPS;
  if (n_ints != kHeaderInts + ns * kSegInts + nt * kStepInts) return PLAN_TOO_SHORT;
  if (n_floats != nt * kStepFloats) return PLAN_BAD_FLOATS;
  out->n_segments = (int)ns;
  out->n_steps = (int)nt;
  const int64_t* st = ints + kHeaderInts + ns * kSegInts;
  for (long k = 0; k < nt; ++k) {
    const int64_t* r = st + k * kStepInts;
    const double* f = floats + k * kStepFloats;
    Step& s = out->step[k];
    s.type = (int)r[0];
    s.hv = (int)r[1];
    s.wv = (int)r[2];
    s.lo_h = (int)r[3];
    s.fh = (int)r[4];
    s.lo_w = (int)r[5];
    s.fw = (int)r[6];
    s.has_b = (int)r[7];
    s.standard = (int)r[8];
    s.nonlin = (int)r[9];
    s.nonlin_index = -1;
    s.w_var = f[0];
    s.b_var = f[1];
    s.ntk_scale = f[2];
    s.p0 = f[3];
    s.p1 = f[4];
    s.p2 = f[5];
    if (s.type < STEP_CONV || s.type > STEP_NONLIN || s.fh < 1 || s.fw < 1 || s.lo_h < 0 ||
        s.lo_w < 0 || s.hv < 1 || s.wv < 1)
      return PLAN_BAD_VALUE;
    if (s.type == STEP_NONLIN && (s.nonlin < NONLIN_ABRELU || s.nonlin > NONLIN_GELU))
      return PLAN_BAD_VALUE;
  }
  int n_nonlin = 0;
  for (long g = 0; g < ns; ++g) {
    const int64_t* r = ints + kHeaderInts + g * kSegInts;
    Seg& s = out->seg[g];
    s.lh = (int)r[0];
    s.lw = (int)r[1];
    s.hv_in = (int)r[2];
    s.wv_in = (int)r[3];
    s.circular = (int)r[4];
    s.first_step = (int)r[5];
    s.n_steps = (int)r[6];
    s.end = (int)r[7];
    s.pool_wh = (int)r[8];
    s.pool_ww = (int)r[9];
    s.pool_sh = (int)r[10];
    s.pool_sw = (int)r[11];
    s.pool_padding = (int)r[12];
    s.pool_sum = (int)r[13];
    s.normalize_edges = (int)r[14];
    s.hv_out = (int)r[15];
    s.wv_out = (int)r[16];
    if (s.lh < 1 || s.lw < 1 || s.hv_in < 1 || s.wv_in < 1 || s.hv_in > s.lh ||
        s.wv_in > s.lw || s.first_step < 0 || s.n_steps < 0 || s.first_step + s.n_steps > nt ||
        s.end < END_POOL || s.end > END_FLATTEN || (s.end != END_POOL) != (g == ns - 1))
      return PLAN_BAD_VALUE;
    s.nonlin_base = n_nonlin;
    s.n_nonlin = 0;
    for (int k = s.first_step; k < s.first_step + s.n_steps; ++k) {
      if (out->step[k].type == STEP_NONLIN) out->step[k].nonlin_index = s.n_nonlin++;
      if (out->step[k].hv > s.lh || out->step[k].wv > s.lw) return PLAN_BAD_VALUE;
    }
    n_nonlin += s.n_nonlin;
    s.pool_lo_h = s.pool_lo_w = 0;
    s.pool_out_h = s.pool_out_w = 0;
    if (s.end == END_POOL) {
      if (s.pool_wh < 1 || s.pool_ww < 1 || s.pool_sh < 1 || s.pool_sw < 1 ||
          s.pool_padding < PAD_VALID || s.pool_padding > PAD_CIRCULAR)
        return PLAN_BAD_VALUE;
      s.pool_lo_h = pool_lo(s.hv_out, s.pool_wh, s.pool_sh, s.pool_padding);
      s.pool_lo_w = pool_lo(s.wv_out, s.pool_ww, s.pool_sw, s.pool_padding);
      s.pool_out_h = pool_out_size(s.hv_out, s.pool_wh, s.pool_sh, s.pool_padding);
      s.pool_out_w = pool_out_size(s.wv_out, s.pool_ww, s.pool_sw, s.pool_padding);
      if (s.pool_out_h < 1 || s.pool_out_w < 1) return PLAN_BAD_VALUE;
    }
  }
  for (long g = 0; g + 1 < ns; ++g) {
    const Seg& a = out->seg[g];
    const Seg& b = out->seg[g + 1];
    if (a.pool_out_h != b.hv_in || a.pool_out_w != b.wv_in) return PLAN_BAD_VALUE;
  }
  out->n_nonlin = n_nonlin;
  return PLAN_OK;
}

}  // namespace ntf
