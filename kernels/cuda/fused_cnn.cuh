// ntfast — fused per-offset CNN kernel (NNGP + NTK) for CUDA: kernels and host orchestration.
//
// Definition: ntfast/ops/fused_cnn.py (the XLA reference); plan encoding: ntfast/ops/fused_table.py
// decoded by kernels/common/plan.h; per-entry math (affine steps, nonlinearity expectations,
// masks, pooling divisors): kernels/common/fused_math.h, shared with the CPU handler whose
// numerics tests therefore also prove this file's per-entry math. This header holds what is
// CUDA-specific: which thread computes which entry, shared-memory staging, pooling between
// segments in the packed layout, deterministic reductions, and the launch sequence. It compiles
// with nvcc (fused_cnn.cu, the XLA FFI handler) and, with NTF_CUDA_EMULATION, as host C++
// (tests/native/test_cuda_emulation.py runs the same code on the CPU against the reference).
//
// Work decomposition. A pair's packed covariance of a segment on the grid (Lh, Lw) is
// D[δh, δw, i, j] = K[i, (i+δh) mod Lh, j, (j+δw) mod Lw]: Lh·Lw independent "planes" (one per
// offset) of Lh·Lw entries. One work item = (pair, tile of `planes_per_tile` consecutive
// planes); a block takes items grid-stride and keeps the tile's NNGP and NTK planes in shared
// memory (global workspace when a plane is too large) through every step of the segment:
//   conv    separable circular box sums (rows into a scratch plane, then columns), shared-memory
//           shifted reads, then the affine map (two __syncthreads per conv);
//   dense / nonlinearity   pointwise, on entries the thread owns (no synchronization);
// and ends with the readout (a per-item partial sum, reduced later in a fixed order: results do
// not depend on scheduling, no float atomics) or with the tile written to the segment's packed
// output, which a pooling kernel turns into the next segment's packed input.
//
// Launch sequence of one FFI call (one stream, all asynchronous):
//   outputs zeroed;
//   self pairs, in chunks of images: per segment, the variance-map kernel (each image's δ = 0
//     plane through the segment, recording the values entering each nonlinearity: the maps
//     ntfast's `_variance_chain` computes), the plane kernel for the self pairs, the pooling
//     kernel; then the readout sums → diagonal / cov1 / cov2;
//     (only the segment-0 maps when nothing else needs self pairs: one segment, sym = 0,
//     compute_cov = 0);
//   cross pairs (sym: a < b only, both triangles written), in chunks sized to a scratch budget:
//     per segment the plane kernel and the pooling kernel; then the readout sums.
//
// Performance expectations (not yet measured: no GPU has been lent). DESIGN.md's roofline is
// ≈ 5 µs per pair for Myrtle-10 at 32×32 on an H100 (≈ 0.6 GFLOP per pair, compute-bound; the
// arc-cosine expectation is most of it). This correct-first version spends extra on integer
// divisions/modulos per entry and step, two shared-memory round trips per conv, and scalar f32
// math; expect several times the roofline until tuned (precomputed index tables, register
// tiling of the box filter with running sums, fast-math atan2 in f32).
#pragma once

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "cuda_compat.h"
#include "fused_math.h"
#include "plan.h"

namespace ntf::cuda {

// Threads per block of the plane kernel on the GPU (8 warps: enough to hide shared-memory
// latency with two blocks per SM at ~40 KB of shared memory each).
constexpr int kThreads = 256;
// Target entries of one tile (planes_per_tile × plane): ~8 entries per thread.
constexpr int kTileEntries = 2048;
// Scratch for chunked pairs (segment outputs and pooled inputs) when NTFAST_CUDA_SCRATCH_MB is
// not set.
constexpr size_t kDefaultScratchBytes = size_t(512) << 20;

enum PairKind : int { PAIRS_SELF = 0, PAIRS_TRIANGLE = 1, PAIRS_RECT = 2 };
enum Mode : int { MODE_PAIRS = 0, MODE_MAPS = 1 };

// Pairs of one launch: `count` consecutive pair indices from `first` of a pair set.
//   PAIRS_SELF:     p -> (p, p)                 image indices (x1 then x2 images)
//   PAIRS_TRIANGLE: p -> (a, b), a < b < n1     row-major upper triangle
//   PAIRS_RECT:     p -> (p / n2, n1 + p % n2)
struct PairRange {
  int kind;
  long long first;
  int count;
};

NTF_HD inline long long tri_offset(long long n, long long a) { return a * n - a * (a + 1) / 2; }

NTF_HD inline void pair_images(const PairRange& r, int n1, int n2, int p, int* ia, int* ib) {
  const long long g = r.first + p;
  if (r.kind == PAIRS_SELF) {
    *ia = *ib = static_cast<int>(g);
  } else if (r.kind == PAIRS_RECT) {
    *ia = static_cast<int>(g / n2);
    *ib = n1 + static_cast<int>(g % n2);
  } else {
    // Row a holds pairs tri_offset(a) .. tri_offset(a + 1) - 1: invert the quadratic, then fix
    // the floating-point guess exactly.
    const double n = n1;
    const double disc = (2 * n - 1) * (2 * n - 1) - 8.0 * static_cast<double>(g);
    long long a = static_cast<long long>(((2 * n - 1) - sqrt(disc > 0 ? disc : 0.0)) / 2);
    if (a < 0) a = 0;
    while (a > 0 && tri_offset(n1, a) > g) --a;
    while (tri_offset(n1, a + 1) <= g) ++a;
    *ia = static_cast<int>(a);
    *ib = static_cast<int>(g - tri_offset(n1, a) + a + 1);
  }
}

NTF_HD inline int wrap(int x, int n) {
  int r = x % n;
  return r < 0 ? r + n : r;
}

template <class T>
struct PlaneArgs {
  const T* x1;  // (n1, h, w, c) NHWC
  const T* x2;  // (n2, h, w, c)
  int n1, n2, h, w, c;
  PairRange pairs;
  // Packed segment input per pair (segments after a pooling; nullptr for segment 0: images).
  const T* src;
  const T* src_t;
  long long src_stride;
  // Packed segment output per pair (segments ending in a pooling).
  T* dst;
  T* dst_t;
  long long dst_stride;
  // Readout partial sums (count, n_tiles, 2): NNGP, NTK.
  T* part;
  // Variance maps: image n's maps of this segment at maps + n * map_stride + map_off, one
  // (lh, lw) plane per nonlinearity (1 outside the valid region). Written in MODE_MAPS.
  T* maps;
  long long map_stride, map_off;
  int n_planes;         // planes of the segment this launch computes (Lh·Lw, or 1: δ = 0 only)
  int planes_per_tile;  // planes per work item
  int n_tiles;          // ceil(n_planes / planes_per_tile)
  int ntk;              // propagate the NTK plane
  int mode;             // MODE_PAIRS | MODE_MAPS
  T* work;              // global workspace per block (nullptr: the tile lives in shared memory)
  long long work_stride;
};

// Buffers of one tile: NNGP, its box scratch, NTK, its box scratch.
NTF_HD inline int tile_buffers(int ntk) { return ntk ? 4 : 2; }

template <class T>
NTF_DEVICE inline const T* image_ptr(const PlaneArgs<T>& a, int n) {
  const long long size = static_cast<long long>(a.h) * a.w * a.c;
  return n < a.n1 ? a.x1 + n * size : a.x2 + (n - a.n1) * size;
}

// One segment of the plan on (pair, tile) work items: load, steps, end (see the file comment).
template <class T>
NTF_GLOBAL void plane_kernel(const NTF_GRID_CONSTANT Plan plan, const int seg_index,
                             const PlaneArgs<T> a) {
  NTF_DYNAMIC_SMEM(smem);
  const Seg& seg = plan.seg[seg_index];
  const int lh = seg.lh, lw = seg.lw, plane = lh * lw;
  const int tile_entries = a.planes_per_tile * plane;
  const int nbuf = tile_buffers(a.ntk);
  T* base = a.work ? a.work + blockIdx.x * a.work_stride : reinterpret_cast<T*>(smem);
  T* d = base;
  T* d_box = d + tile_entries;
  T* t = a.ntk ? d_box + tile_entries : d;
  T* t_box = a.ntk ? t + tile_entries : d_box;
  // 2·blockDim entries for the block reduction, after the tile when it lives in shared memory.
  T* red = reinterpret_cast<T*>(smem) + (a.work ? 0 : nbuf * tile_entries);
  const int tid = threadIdx.x, nthreads = blockDim.x;
  const long long items = static_cast<long long>(a.pairs.count) * a.n_tiles;

  for (long long item = blockIdx.x; item < items; item += gridDim.x) {
    const int p = static_cast<int>(item / a.n_tiles);
    const int tile = static_cast<int>(item - static_cast<long long>(p) * a.n_tiles);
    int ia, ib;
    pair_images(a.pairs, a.n1, a.n2, p, &ia, &ib);
    const int q0 = tile * a.planes_per_tile;
    const int nq = a.n_planes - q0 < a.planes_per_tile ? a.n_planes - q0 : a.planes_per_tile;
    const int n_e = nq * plane;
    T* map1 = a.maps + ia * a.map_stride + a.map_off;
    const T* map2 = a.maps + ib * a.map_stride + a.map_off;
    NTF_SYNC();  // the previous item's readers of this block's buffers are done

    // Segment input: x1·x2ᵀ/C per offset from the images, or the pooled packed input.
    if (a.src == nullptr) {
      const T* img1 = image_ptr(a, ia);
      const T* img2 = image_ptr(a, ib);
      for (int e = tid; e < n_e; e += nthreads) {
        const int q = e / plane, r = e - q * plane, i = r / lw, j = r - (r / lw) * lw;
        const int g = q0 + q, dh = g / lw, dw = g - (g / lw) * lw;
        const int pi = wrap(i + dh, lh), pj = wrap(j + dw, lw);
        T v = T(0);
        if (i < a.h && pi < a.h && j < a.w && pj < a.w) {
          const T* u = img1 + (static_cast<long long>(i) * a.w + j) * a.c;
          const T* x = img2 + (static_cast<long long>(pi) * a.w + pj) * a.c;
          for (int ch = 0; ch < a.c; ++ch) v += u[ch] * x[ch];
          v = v / T(a.c);
        }
        d[e] = v;
        if (a.ntk) t[e] = T(0);
      }
    } else {
      const T* s = a.src + p * a.src_stride + static_cast<long long>(q0) * plane;
      const T* st = a.ntk ? a.src_t + p * a.src_stride + static_cast<long long>(q0) * plane : s;
      for (int e = tid; e < n_e; e += nthreads) {
        d[e] = s[e];
        if (a.ntk) t[e] = st[e];
      }
    }

    for (int k = seg.first_step; k < seg.first_step + seg.n_steps; ++k) {
      const Step& s = plan.step[k];
      if (s.type == STEP_CONV) {
        const AffineCoef<T> cf = affine_coef<T>(s, 1.0 / (double(s.fh) * double(s.fw)));
        NTF_SYNC();  // every entry of the input planes is written
        for (int e = tid; e < n_e; e += nthreads) {
          const int q = e / plane, r = e - q * plane, i = r / lw, j = r - (r / lw) * lw;
          const int qo = q * plane;
          T sd = T(0), stt = T(0);
          for (int f = 0; f < s.fh; ++f) {
            const int src = qo + wrap(i + f - s.lo_h, lh) * lw + j;
            sd += d[src];
            if (a.ntk) stt += t[src];
          }
          d_box[e] = sd;
          if (a.ntk) t_box[e] = stt;
        }
        NTF_SYNC();  // row sums complete
        for (int e = tid; e < n_e; e += nthreads) {
          const int q = e / plane, r = e - q * plane, i = r / lw, j = r - (r / lw) * lw;
          const int g = q0 + q, dh = g / lw, dw = g - (g / lw) * lw;
          const int ro = q * plane + i * lw;
          T sd = T(0), stt = T(0);
          for (int f = 0; f < s.fw; ++f) {
            const int src = ro + wrap(j + f - s.lo_w, lw);
            sd += d_box[src];
            if (a.ntk) stt += t_box[src];
          }
          const T m = T(packed_valid(i, dh, lh, s.hv) & packed_valid(j, dw, lw, s.wv));
          T nd, nt;
          affine_apply(cf, sd, stt, m, &nd, &nt);
          d[e] = nd;
          if (a.ntk) t[e] = nt;
        }
      } else if (s.type == STEP_DENSE) {
        const AffineCoef<T> cf = affine_coef<T>(s, 1.0);
        for (int e = tid; e < n_e; e += nthreads) {
          const int q = e / plane, r = e - q * plane, i = r / lw, j = r - (r / lw) * lw;
          const int g = q0 + q, dh = g / lw, dw = g - (g / lw) * lw;
          const T m = T(packed_valid(i, dh, lh, s.hv) & packed_valid(j, dw, lw, s.wv));
          T nd, nt;
          affine_apply(cf, d[e], a.ntk ? t[e] : T(0), m, &nd, &nt);
          d[e] = nd;
          if (a.ntk) t[e] = nt;
        }
      } else {
        const T p0 = T(s.p0), p1 = T(s.p1), p2 = T(s.p2);
        const long long mo = static_cast<long long>(s.nonlin_index) * plane;
        for (int e = tid; e < n_e; e += nthreads) {
          const int q = e / plane, r = e - q * plane, i = r / lw, j = r - (r / lw) * lw;
          const int g = q0 + q, dh = g / lw, dw = g - (g / lw) * lw;
          const int pi = wrap(i + dh, lh), pj = wrap(j + dw, lw);
          const T m = T(packed_valid(i, dh, lh, s.hv) & packed_valid(j, dw, lw, s.wv));
          T q11, q22;
          if (a.mode == MODE_MAPS) {
            // δ = 0: the plane is the image's variance; 1 outside the valid region (NaN-safe,
            // masked below), as `_variance_chain`.
            q11 = q22 = (i < s.hv && j < s.wv) ? d[e] : T(1);
            map1[mo + r] = q11;
          } else {
            q11 = map1[mo + r];
            q22 = map2[mo + pi * lw + pj];
          }
          T dot = T(0);
          const T nd = nonlin_expectation<T>(s.nonlin, p0, p1, p2, d[e], q11, q22, &dot);
          d[e] = nd * m;
          if (a.ntk) t[e] = t[e] * dot * m;
        }
      }
    }

    if (a.mode == MODE_MAPS) continue;
    if (seg.end == END_POOL) {
      T* o = a.dst + p * a.dst_stride + static_cast<long long>(q0) * plane;
      T* ot = a.ntk ? a.dst_t + p * a.dst_stride + static_cast<long long>(q0) * plane : o;
      for (int e = tid; e < n_e; e += nthreads) {
        o[e] = d[e];
        if (a.ntk) ot[e] = t[e];
      }
    } else {
      // Readout: every entry is already masked; partial sums of this item in a fixed order.
      T sd = T(0), stt = T(0);
      for (int e = tid; e < n_e; e += nthreads) {
        sd += d[e];
        if (a.ntk) stt += t[e];
      }
      NTF_SYNC();  // `red` may overlap the tile only in the workspace layout: keep it simple
      red[tid] = sd;
      red[nthreads + tid] = stt;
      NTF_SYNC();
      if (tid == 0) {
        T u = T(0), v = T(0);
        for (int k = 0; k < nthreads; ++k) {
          u += red[k];
          v += red[nthreads + k];
        }
        a.part[item * 2] = u;
        a.part[item * 2 + 1] = v;
      }
    }
  }
}

template <class T>
struct PoolArgs {
  const T* src;  // (count, Lh·Lw, Lh·Lw) packed output of segment seg_index
  const T* src_t;
  long long src_stride;
  T* dst;  // (count, L'h·L'w, L'h·L'w) packed input of segment seg_index + 1
  T* dst_t;
  long long dst_stride;
  int count;
  int ntk;
};

// AvgPool / SumPool of a segment's packed output into the next segment's packed input
// (ntfast/ops/pool.py semantics, per axis pair (i, i'): Σ_{a, a' < p} Kpad[s·i + a, s·i' + a'],
// zeros outside for SAME/VALID, wrap for CIRCULAR, AVG divides by d(i)·d(i')), read straight
// from the packed layout: K[u, u', w, w'] = D[(u' − u) mod Lh, (w' − w) mod Lw, u, w].
// One thread per output entry; p⁴ reads each (correct first: a separable two-pass version
// would read 2p² per entry).
template <class T>
NTF_GLOBAL void pool_kernel(const NTF_GRID_CONSTANT Plan plan, const int seg_index,
                            const PoolArgs<T> a) {
  const Seg& s = plan.seg[seg_index];
  const Seg& n = plan.seg[seg_index + 1];
  const int lh = s.lh, lw = s.lw, hv = s.hv_out, wv = s.wv_out;
  const int mh = n.lh, mw = n.lw, oh = n.hv_in, ow = n.wv_in;
  const long long plane_in = static_cast<long long>(lh) * lw;
  const long long plane_out = static_cast<long long>(mh) * mw;
  const long long per_pair = plane_out * plane_out;
  const long long total = per_pair * a.count;
  const bool circ = s.pool_padding == PAD_CIRCULAR;
  for (long long idx = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int p = static_cast<int>(idx / per_pair);
    const long long r0 = idx - p * per_pair;
    const int g = static_cast<int>(r0 / plane_out), r = static_cast<int>(r0 - g * plane_out);
    const int dh = g / mw, dw = g - (g / mw) * mw, i = r / mw, j = r - (r / mw) * mw;
    T vd = T(0), vt = T(0);
    if (packed_valid(i, dh, mh, oh) & packed_valid(j, dw, mw, ow)) {
      const int i2 = wrap(i + dh, mh), j2 = wrap(j + dw, mw);
      const T* sd = a.src + p * a.src_stride;
      const T* st = a.ntk ? a.src_t + p * a.src_stride : sd;
      for (int a1 = 0; a1 < s.pool_wh; ++a1) {
        int u = s.pool_sh * i + a1 - s.pool_lo_h;
        if (circ) u = wrap(u, hv);
        else if (u < 0 || u >= hv) continue;
        for (int a2 = 0; a2 < s.pool_wh; ++a2) {
          int u2 = s.pool_sh * i2 + a2 - s.pool_lo_h;
          if (circ) u2 = wrap(u2, hv);
          else if (u2 < 0 || u2 >= hv) continue;
          const long long row = static_cast<long long>(wrap(u2 - u, lh)) * lw;
          for (int b1 = 0; b1 < s.pool_ww; ++b1) {
            int w = s.pool_sw * j + b1 - s.pool_lo_w;
            if (circ) w = wrap(w, wv);
            else if (w < 0 || w >= wv) continue;
            for (int b2 = 0; b2 < s.pool_ww; ++b2) {
              int w2 = s.pool_sw * j2 + b2 - s.pool_lo_w;
              if (circ) w2 = wrap(w2, wv);
              else if (w2 < 0 || w2 >= wv) continue;
              const long long at = (row + wrap(w2 - w, lw)) * plane_in + u * lw + w;
              vd += sd[at];
              if (a.ntk) vt += st[at];
            }
          }
        }
      }
      if (!s.pool_sum) {
        const T div =
            pool_divisor<T>(hv, s.pool_wh, s.pool_sh, s.pool_padding, s.normalize_edges, i) *
            pool_divisor<T>(hv, s.pool_wh, s.pool_sh, s.pool_padding, s.normalize_edges, i2) *
            pool_divisor<T>(wv, s.pool_ww, s.pool_sw, s.pool_padding, s.normalize_edges, j) *
            pool_divisor<T>(wv, s.pool_ww, s.pool_sw, s.pool_padding, s.normalize_edges, j2);
        vd = vd / div;
        vt = vt / div;
      }
    }
    a.dst[p * a.dst_stride + r0] = vd;
    if (a.ntk) a.dst_t[p * a.dst_stride + r0] = vt;
  }
}

template <class T>
struct FinalizeArgs {
  const T* part;  // (count, n_tiles, 2)
  int n_tiles;
  PairRange pairs;
  int n1, n2;
  T scale;  // readout normalization (GAP 1/(hv·wv)², GSP 1, FLATTEN 1/(hv·wv))
  int sym, ntk, cov;
  T* nngp;  // (n1, n2)
  T* ntk_out;
  T* cov1;  // (n1,)
  T* cov2;  // (n2,)
};

// Readout values of a chunk of pairs: the items' partial sums added in tile order (the same
// order whatever the launch geometry), scaled, and written where the pair belongs.
template <class T>
NTF_GLOBAL void finalize_kernel(const FinalizeArgs<T> a) {
  for (int p = blockIdx.x * blockDim.x + threadIdx.x; p < a.pairs.count;
       p += gridDim.x * blockDim.x) {
    T u = T(0), v = T(0);
    const T* s = a.part + static_cast<long long>(p) * a.n_tiles * 2;
    for (int k = 0; k < a.n_tiles; ++k) {
      u += s[2 * k];
      v += s[2 * k + 1];
    }
    u = u * a.scale;
    v = v * a.scale;
    int ia, ib;
    pair_images(a.pairs, a.n1, a.n2, p, &ia, &ib);
    if (a.pairs.kind == PAIRS_SELF) {
      if (a.sym) {
        a.nngp[static_cast<long long>(ia) * a.n2 + ia] = u;
        if (a.ntk) a.ntk_out[static_cast<long long>(ia) * a.n2 + ia] = v;
      }
      if (a.cov) {
        if (ia < a.n1) a.cov1[ia] = u;
        if (a.sym) a.cov2[ia] = u;
        else if (ia >= a.n1) a.cov2[ia - a.n1] = u;
      }
    } else if (a.pairs.kind == PAIRS_TRIANGLE) {
      a.nngp[static_cast<long long>(ia) * a.n2 + ib] = u;
      a.nngp[static_cast<long long>(ib) * a.n2 + ia] = u;
      if (a.ntk) {
        a.ntk_out[static_cast<long long>(ia) * a.n2 + ib] = v;
        a.ntk_out[static_cast<long long>(ib) * a.n2 + ia] = v;
      }
    } else {
      const long long at = static_cast<long long>(ia) * a.n2 + (ib - a.n1);
      a.nngp[at] = u;
      if (a.ntk) a.ntk_out[at] = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host orchestration.

// Scratch memory provider: allocate(bytes) -> pointer or nullptr (the XLA FFI scratch allocator
// on the GPU; malloc in the emulation tests).
template <class T>
struct Problem {
  const T* x1;
  const T* x2;
  int n1, n2, h, w, c;
  int sym, ntk, cov;
  T* nngp;
  T* ntk_out;
  T* cov1;
  T* cov2;
};

// How the plane kernel tiles one segment.
struct Tiling {
  int n_planes, planes_per_tile, n_tiles;
  size_t smem;        // dynamic shared memory per block
  bool global_work;   // tile in the global workspace (plane too large for shared memory)
  long long work_entries;  // workspace entries per block (global_work only)
};

inline Tiling make_tiling(const Seg& seg, int n_planes, int ntk, size_t elem, int threads,
                          const rt::DeviceLimits& lim) {
  Tiling t{};
  const long long plane = static_cast<long long>(seg.lh) * seg.lw;
  const int nbuf = tile_buffers(ntk);
  const size_t red = 2 * static_cast<size_t>(threads) * elem;
  int np = static_cast<int>(kTileEntries / plane);
  if (np < 1) np = 1;
  if (np > n_planes) np = n_planes;
  while (np > 1 && nbuf * np * plane * elem + red > lim.smem_default) --np;
  t.n_planes = n_planes;
  t.planes_per_tile = np;
  t.n_tiles = (n_planes + np - 1) / np;
  const size_t need = nbuf * np * plane * elem + red;
  if (need <= lim.smem_optin) {
    t.smem = need;
    t.global_work = false;
    t.work_entries = 0;
  } else {
    t.smem = red;
    t.global_work = true;
    t.work_entries = nbuf * np * plane;
  }
  return t;
}

inline size_t scratch_budget() {
  const char* env = getenv("NTFAST_CUDA_SCRATCH_MB");
  if (env != nullptr) {
    const long long mb = atoll(env);
    if (mb > 0) return static_cast<size_t>(mb) << 20;
  }
  return kDefaultScratchBytes;
}

inline size_t align_up(size_t n) { return (n + 255) & ~size_t(255); }

// Enqueues the whole computation. Returns nullptr or an error message. `allocate(bytes)` gives
// device scratch that stays valid until the enqueued work has run (XLA's scratch allocator).
template <class T, class Allocate>
const char* run_fused_cnn(const Plan& plan, const Problem<T>& pb, rt::Stream stream,
                          Allocate allocate, int threads = kThreads,
                          size_t budget = scratch_budget()) {
  const char* err = nullptr;
  const size_t es = sizeof(T);
  if ((err = rt::memset_async(pb.nngp, es * pb.n1 * pb.n2, stream))) return err;
  if ((err = rt::memset_async(pb.ntk_out, es * pb.n1 * pb.n2, stream))) return err;
  if ((err = rt::memset_async(pb.cov1, es * pb.n1, stream))) return err;
  if ((err = rt::memset_async(pb.cov2, es * pb.n2, stream))) return err;
  if (pb.n1 == 0 || pb.n2 == 0) return nullptr;

  rt::DeviceLimits lim{};
  if ((err = rt::device_limits(&lim))) return err;
  const int ns = plan.n_segments;
  const Seg& last = plan.seg[ns - 1];
  const int n_img = pb.sym ? pb.n1 : pb.n1 + pb.n2;

  // Per segment: tilings (pairs, maps), map offsets, packed sizes.
  Tiling tp[kMaxSegments], tm[kMaxSegments];
  long long map_off[kMaxSegments];
  long long map_stride = 0, out_entries = 0, in_entries = 0, work_entries = 0;
  size_t smem_max = 0;
  for (int s = 0; s < ns; ++s) {
    const Seg& g = plan.seg[s];
    const long long plane = static_cast<long long>(g.lh) * g.lw;
    const int n_planes = g.end == END_FLATTEN ? 1 : static_cast<int>(plane);
    tp[s] = make_tiling(g, n_planes, pb.ntk, es, threads, lim);
    tm[s] = make_tiling(g, 1, 0, es, threads, lim);
    map_off[s] = map_stride;
    map_stride += g.n_nonlin * plane;
    if (g.end == END_POOL && plane * plane > out_entries) out_entries = plane * plane;
    if (s > 0 && plane * plane > in_entries) in_entries = plane * plane;
    for (const Tiling* t : {&tp[s], &tm[s]}) {
      if (t->smem > smem_max) smem_max = t->smem;
      if (t->global_work && t->work_entries > work_entries) work_entries = t->work_entries;
    }
  }
  if (map_stride == 0) map_stride = 1;  // keep pointers distinct and valid
  const long long n1 = pb.n1;
  const long long n_cross = pb.sym ? n1 * (n1 - 1) / 2 : n1 * pb.n2;
  const long long most = n_cross > n_img ? n_cross : n_img;
  const int slots = lim.sm_count > 0 ? 2 * lim.sm_count : 64;
  const int streams = pb.ntk ? 2 : 1;
  const size_t part_entries = 2 * static_cast<size_t>(tp[ns - 1].n_tiles);
  // Scratch layout (each buffer 256-byte aligned): maps | segment outputs (NNGP, NTK) | pooled
  // inputs (NNGP, NTK) | readout partials | workspace. `bytes(chunk)` is its exact size.
  const size_t maps_bytes = align_up(es * map_stride * n_img);
  const size_t work_bytes = align_up(es * work_entries * slots);
  auto bytes = [&](long long c) {
    return maps_bytes + streams * align_up(es * out_entries * c) +
           streams * align_up(es * in_entries * c) + align_up(es * part_entries * c) + work_bytes;
  };
  const size_t per_pair = es * ((out_entries + in_entries) * streams + part_entries);
  long long chunk = static_cast<long long>(budget / (per_pair ? per_pair : 1));
  if (chunk < 1) chunk = 1;
  if (chunk > most) chunk = most;
  if (chunk > (1 << 20)) chunk = 1 << 20;

  unsigned char* mem = nullptr;
  for (;;) {
    mem = static_cast<unsigned char*>(allocate(bytes(chunk)));
    if (mem != nullptr || chunk == 1) break;
    chunk = (chunk + 1) / 2;
  }
  if (mem == nullptr) return "fused_cnn: cannot allocate device scratch memory";
  T* maps = reinterpret_cast<T*>(mem);
  unsigned char* cur = mem + maps_bytes;
  auto take = [&cur](size_t n) {
    T* p = reinterpret_cast<T*>(cur);
    cur += align_up(n);
    return p;
  };
  T* out_buf = take(es * out_entries * chunk);
  T* out_buf_t = pb.ntk ? take(es * out_entries * chunk) : nullptr;
  T* in_buf = take(es * in_entries * chunk);
  T* in_buf_t = pb.ntk ? take(es * in_entries * chunk) : nullptr;
  T* part = take(es * part_entries * chunk);
  T* work = work_entries ? take(es * work_entries * slots) : nullptr;
  if (static_cast<size_t>(cur - mem) != bytes(chunk)) return "fused_cnn: scratch layout mismatch";

  if (smem_max > lim.smem_default) {
    if ((err = rt::allow_smem(plane_kernel<T>, smem_max))) return err;
  }

  PlaneArgs<T> base{};
  base.x1 = pb.x1;
  base.x2 = pb.x2;
  base.n1 = pb.n1;
  base.n2 = pb.n2;
  base.h = pb.h;
  base.w = pb.w;
  base.c = pb.c;
  base.maps = maps;
  base.map_stride = map_stride;
  base.part = part;

  auto plane_launch = [&](int s, const PairRange& r, int mode, int ntk) -> const char* {
    const Seg& g = plan.seg[s];
    const Tiling& t = mode == MODE_MAPS ? tm[s] : tp[s];
    const long long plane = static_cast<long long>(g.lh) * g.lw;
    PlaneArgs<T> a = base;
    a.pairs = r;
    a.src = s == 0 ? nullptr : in_buf;
    a.src_t = s == 0 ? nullptr : in_buf_t;
    a.src_stride = plane * plane;
    a.dst = out_buf;
    a.dst_t = out_buf_t;
    a.dst_stride = plane * plane;
    a.map_off = map_off[s];
    a.n_planes = t.n_planes;
    a.planes_per_tile = t.planes_per_tile;
    a.n_tiles = t.n_tiles;
    a.ntk = ntk;
    a.mode = mode;
    a.work = t.global_work ? work : nullptr;
    a.work_stride = t.work_entries;
    long long grid = static_cast<long long>(r.count) * t.n_tiles;
    if (t.global_work && grid > slots) grid = slots;
    if (grid > (1 << 30)) grid = 1 << 30;
    if (grid < 1) return nullptr;
#if defined(NTF_CUDA_EMULATION)
    if (t.global_work) ++::ntf::emu::global_workspace_launches;
#endif
    NTF_LAUNCH(plane_kernel<T>, static_cast<unsigned>(grid), threads, t.smem, stream, plan, s, a);
    return rt::last_error();
  };
  auto pool_launch = [&](int s, int count) -> const char* {
    const long long po = static_cast<long long>(plan.seg[s].lh) * plan.seg[s].lw;
    const long long pi = static_cast<long long>(plan.seg[s + 1].lh) * plan.seg[s + 1].lw;
    PoolArgs<T> a{out_buf, out_buf_t, po * po, in_buf, in_buf_t, pi * pi, count, pb.ntk};
    long long grid = (pi * pi * count + threads - 1) / threads;
    if (grid > (1 << 30)) grid = 1 << 30;
    NTF_LAUNCH(pool_kernel<T>, static_cast<unsigned>(grid), threads, 0, stream, plan, s, a);
    return rt::last_error();
  };
  auto finalize_launch = [&](const PairRange& r) -> const char* {
    const double hw = double(last.hv_out) * double(last.wv_out);
    const double scale =
        last.end == END_GAP ? 1.0 / (hw * hw) : last.end == END_GSP ? 1.0 : 1.0 / hw;
    FinalizeArgs<T> a{part, tp[ns - 1].n_tiles, r, pb.n1, pb.n2, T(scale), pb.sym, pb.ntk, pb.cov,
                      pb.nngp, pb.ntk_out, pb.cov1, pb.cov2};
    const unsigned grid = static_cast<unsigned>((r.count + threads - 1) / threads);
    NTF_LAUNCH(finalize_kernel<T>, grid, threads, 0, stream, a);
    return rt::last_error();
  };
  // One chunk of pairs through every segment, then its readout.
  auto run_chunk = [&](const PairRange& r, bool self) -> const char* {
    const char* e = nullptr;
    for (int s = 0; s < ns; ++s) {
      if (self && (e = plane_launch(s, r, MODE_MAPS, 0))) return e;
      if ((e = plane_launch(s, r, MODE_PAIRS, pb.ntk))) return e;
      if (plan.seg[s].end == END_POOL && (e = pool_launch(s, r.count))) return e;
    }
    return finalize_launch(r);
  };

  const bool need_self = pb.sym || pb.cov || ns > 1;
  if (need_self) {
    for (long long f = 0; f < n_img; f += chunk) {
      const int count = static_cast<int>(n_img - f < chunk ? n_img - f : chunk);
      if ((err = run_chunk(PairRange{PAIRS_SELF, f, count}, true))) return err;
    }
  } else {
    // Only the segment-0 maps (from the images) are needed: every image at once.
    for (long long f = 0; f < n_img; f += chunk) {
      const int count = static_cast<int>(n_img - f < chunk ? n_img - f : chunk);
      if ((err = plane_launch(0, PairRange{PAIRS_SELF, f, count}, MODE_MAPS, 0))) return err;
    }
  }
  const int kind = pb.sym ? PAIRS_TRIANGLE : PAIRS_RECT;
  for (long long f = 0; f < n_cross; f += chunk) {
    const int count = static_cast<int>(n_cross - f < chunk ? n_cross - f : chunk);
    if ((err = run_chunk(PairRange{kind, f, count}, false))) return err;
  }
  return nullptr;
}

}  // namespace ntf::cuda
