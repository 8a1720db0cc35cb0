// ntfast — CPU fused CNN kernel, the work itself (included once per ISA: NTF_SIMD_NS names the
// namespace, the including .cc file sets the target flags). Definition of every number:
// ntfast/ops/fused_cnn.py; per-entry math: kernels/common/fused_math.h.
//
// Work decomposition (DESIGN §2). For one pair of images (a, b) and one segment, every offset
// plane P[i, j] = K[i, (i + δh) mod Lh, j, (j + δw) mod Lw] (Lh × Lw, 4.6 KB f32 at 34 × 34) runs
// through the whole step stack in L1-resident buffers (nngp, ntk, ping-pong copies): conv = one
// pass per row (vertical sum of fh rows into a wrapped row, fw-tap horizontal sum, affine, mask);
// dense = affine in place; nonlinearity = per-entry expectation with q11 = V_a[i, j] and
// q22 = V_b[(i + δh) mod Lh, (j + δw) mod Lw] read straight from a row-periodic variance map
// (no per-plane gather). Readouts reduce each plane as it finishes (double accumulators); a
// pooling segment stores its planes (packed layout) and pools them directly into the next
// segment's packed layout (no unpacking), separably: an h pass over contiguous rows, then a w
// pass through per-axis tap tables (pool_rows).
//
// Threads: pairs are independent (one pair workspace per thread) when there are enough of them;
// otherwise each pair's segment is split over its δh rows and its pooling over output rows.
// Per-image work first: channel-planar zero-padded images, and the variance maps of every
// nonlinearity (self pairs: the maps of segment s + 1 come from the δ = 0 plane of the pooled
// self covariance; when no one reads the self pair's kernel value, it runs only the offsets those
// maps depend on). Nothing is allocated per plane: scratch is allocated once per call, and the
// large pair workspaces are reused across calls (WsCache).
//
// Vectorization. Plane rows have a padded stride `ls` (a multiple of kVec = 4 entries) and every
// row loop runs over all `ls` columns (padding columns are masked to 0), with `#pragma GCC ivdep`
// (no runtime alias checks): GCC 12 then reports the image product, both box passes, the affine
// maps and every nonlinearity row (abrelu/erf/gelu incl. the branch-free atan2, as blends)
// "loop vectorized using 32 byte vectors" (-fopt-info-vec-optimized; cmake
// -DNTFAST_VEC_REPORT=ON), and `perf annotate` shows the packed ymm code (vfmadd...ps, vdivps,
// vsqrtps, vblendvps) executing. Measured pitfalls: without padding and ivdep, the alias-
// versioned vector loops of 34-entry rows ran their scalar versions (1.3x slower); a `&&` in
// the ReLU angle select left a branch that kept that loop scalar (2.6x slower; fused_math.h).
#pragma once

#include <sched.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "fused_cnn_cpu.h"
#include "fused_math.h"
#if defined(__AVX2__) && defined(__FMA__)
#include "simd_avx2.h"
#define NTF_HAND_SIMD 1
#else
#define NTF_HAND_SIMD 0
#endif

namespace ntf {
namespace cpu {
namespace NTF_SIMD_NS {

#define NTF_R __restrict__
#if defined(__GNUC__) && !defined(__clang__)
#define NTF_IVDEP _Pragma("GCC ivdep")
#else
#define NTF_IVDEP
#endif

// Row stride of planes: a multiple of 4 entries (one AVX2 f64 vector; f32 rows run 8-wide with
// one 4-wide SSE tail, measured faster than padding 34 -> 40).
constexpr int kVec = 4;
inline int row_stride(int lw) { return (lw + kVec - 1) / kVec * kVec; }
constexpr int kOneRow = 1;  // a row mask "valid"
// Row stride of the periodic (row-doubled) images and variance maps: a partner read at column
// δw + j, j < ls, stays inside the row.
inline int periodic_stride(int lw) { return lw + row_stride(lw); }

template <class F>
void parallel_for(int nthreads, long n, F&& f) {
  if (nthreads <= 1 || n <= 1) {
    for (long i = 0; i < n; ++i) f(i, 0);
    return;
  }
  const int nt = (int)(n < nthreads ? n : nthreads);
  std::atomic<long> next{0};
  auto worker = [&](int tid) {
    for (;;) {
      const long i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) break;
      f(i, tid);
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int tid = 1; tid < nt; ++tid) pool.emplace_back(worker, tid);
  worker(0);
  for (auto& th : pool) th.join();
}

// x mod n in [0, n). The kernel's indices are almost always within one period of the range:
// those take no integer division (an idiv per margin entry and row index cost ~10% of a conv).
inline int pmod(int x, int n) {
  if (x >= 0) {
    if (x < n) return x;
    if (x < 2 * n) return x - n;
  } else if (x >= -n) {
    return x + n;
  }
  const int r = x % n;
  return r < 0 ? r + n : r;
}

// Scratch of one thread: planes of the largest grid and a wrapped row.
template <class T>
struct Scratch {
  std::vector<T> d, t, sd, st, row, ext, mw, v;
  std::vector<T> vd, vt;  // vertical conv sums of a plane, rows of stride Ctx::ext_stride
  std::vector<T> g_d, g_t;  // h-pooled rows of one output row δh' (pool_rows)
  std::vector<int> mh;
  std::vector<int> mwi;  // mw as an AND mask (0 / −1) for the hand-vectorized f32 rows
  std::vector<long> taps;  // (δh, x) tap offsets of the rows of one output row δh'
  std::vector<int> n_taps;
  void init(long plane, int ls_max, int f_max, long g_size, int ntk, long n_taps_max,
            int rows_max, long vplane) {
    g_d.assign(g_size, T(0));
    if (ntk) g_t.assign(g_size, T(0));
    taps.assign(n_taps_max, 0);
    n_taps.assign(rows_max, 0);
    vd.assign(vplane, T(0));
    vt.assign(vplane, T(0));
    d.assign(plane, T(0));
    t.assign(plane, T(0));
    sd.assign(plane, T(0));
    st.assign(plane, T(0));
    v.assign(plane, T(0));
    row.assign(ls_max, T(0));
    ext.assign(ls_max + 2 * f_max, T(0));
    mw.assign(ls_max, T(0));
    mwi.assign(ls_max, 0);
    mh.assign(plane, 0);
  }
};

// Every plane of one pair's pooling segment (packed [δh][δw][i][j]) and the pooled next input.
template <class T>
struct PairWs {
  std::vector<T> full_d, full_t, pin_d, pin_t;
  // Fused pooling (pair mode, cross pairs): the h-pooled rows G[δh'][δw][i'][xw] of every output
  // row, accumulated as the planes finish (segment_rows), instead of storing full_d / full_t.
  std::vector<T> g_d, g_t;
};

// The pair workspaces (full_d/full_t: (lh·lw)² entries, several MB) outlive a call: a call
// takes a set from a process-wide free list (mutex: XLA may run the handler on several threads
// at once; each call owns its set while it runs) and gives it back at the end, so later calls
// skip the allocation, the zero fill and the page faults of the first touch. Buffers only grow
// (new entries zero). Every entry a call reads was written earlier in the same pair (planes
// stored before they are pooled, pooled offsets before the next segment runs them), so stale
// values from earlier calls are never read. At most kKeptSets sets of at most kKeptBytes each
// stay cached between calls.
template <class T>
class WsCache {
 public:
  using Set = std::vector<PairWs<T>>;
  static constexpr size_t kKeptSets = 2;
  static constexpr size_t kKeptBytes = size_t(256) << 20;  // 32² images: ~19 MB (f32, 2 threads)

  static std::unique_ptr<Set> take() {
    WsCache& c = instance();
    std::lock_guard<std::mutex> lock(c.mu_);
    if (c.free_.empty()) return std::unique_ptr<Set>(new Set());
    std::unique_ptr<Set> s = std::move(c.free_.back());
    c.free_.pop_back();
    return s;
  }

  static void give(std::unique_ptr<Set> s) {
    size_t bytes = 0;
    for (const PairWs<T>& w : *s)
      bytes += sizeof(T) * (w.full_d.size() + w.full_t.size() + w.pin_d.size() + w.pin_t.size() +
                            w.g_d.size() + w.g_t.size());
    if (bytes > kKeptBytes) return;
    WsCache& c = instance();
    std::lock_guard<std::mutex> lock(c.mu_);
    if (c.free_.size() < kKeptSets) c.free_.push_back(std::move(s));
  }

  // Holds a set for the lifetime of one call.
  struct Lease {
    std::unique_ptr<Set> set = take();
    ~Lease() { give(std::move(set)); }
  };

 private:
  static WsCache& instance() {
    static WsCache c;
    return c;
  }
  std::mutex mu_;
  std::vector<std::unique_ptr<Set>> free_;
};

template <class T>
inline void grow_zero(std::vector<T>& v, long n) {
  if ((long)v.size() >= n) return;
  std::vector<T>().swap(v);  // no copy of the old contents
  v.assign(n, T(0));
}

// Per pooling segment: for each axis, window taps of every output index (-1: zero padding) and
// the AvgPool reciprocal divisors. For the w pass of pool_rows, per output offset δw' and
// position j' of the next grid (lw2): col_cnt[δw'·lw2 + j'] taps at offsets
// col_off[(δw'·lw2 + j')·pw² + t] = δw·lh2·lw + xw into the h-pooled rows G[δw][i'][xw]
// (δw = (yw − xw) mod lw; xw, yw the taps of j', l' = (j' + δw') mod lw2), and
// col_scale = inv_w[j']·inv_w[l']; no taps and scale 0 where j' is not a valid position.
struct PoolTables {
  int ph = 0, pw = 0;
  std::vector<int> taps_h, taps_w;
  std::vector<double> inv_h, inv_w;
  std::vector<int> col_cnt, col_off;
  std::vector<double> col_scale;
  // Fused pass 1: per input offset row δh, the (δh', i', x) triples with a tap pair (x, y) of
  // output row i' and partner k' = (i' + δh') mod lh2 with (y − x) mod lh = δh (valid i' only):
  // plane row x of offset (δh, δw) adds into G[δh'][δw][i'].
  std::vector<std::vector<int>> scatter;
};

template <class T>
struct Ctx {
  const Plan* plan;
  const RunArgs* args;
  int n_img, C, lh0, lw0;
  int compute_ntk;
  // n_img × C × lh0 × periodic_stride(lw0): row j holds x[j mod lw0] (partner reads at δw + j
  // need no modulo).
  std::vector<T> img;
  std::vector<long> map_off;  // per plan nonlinearity: offset in an image's map block
  long map_stride = 0;
  std::vector<T> maps;  // n_img × map_stride; lh × periodic_stride(lw) per map, like the images
  // n_img × n_maps: the map's nonzero entries are all within 2^±30 (NaN/inf: not safe), so the
  // f32 ReLU rows may skip their normalization for pairs of such images (simd_avx2.h).
  std::vector<unsigned char> map_safe;
  long n_maps = 1;
  std::vector<PoolTables> pools;
  long max_plane = 0, max_full = 0, max_pin = 0;  // max_plane: lh·ls; full/pin: (lh·lw)²
  long max_g = 0, max_taps = 1;  // pool_rows scratch: lw·lh2·lw, lh2·ph²
  long max_gall = 0;             // fused pooling: lh2·lw·lh2·lw (PairWs::g_d / g_t)
  int max_lh2 = 1;
  // Offsets each segment runs: `full` (every plane; FLATTEN: δ = 0 only) and, for self pairs
  // whose kernel values nobody reads, `cone`: only the offsets the later segments' variance
  // maps depend on (fused_cnn.py `_variance_radii`); such self pairs stop at segment last_nl.
  struct Lists {
    std::vector<int> rows, cols, pool_rows, pool_cols;
  };
  std::vector<Lists> full, cone;
  int last_nl = 0;
  bool self_values = true;
  int ls_max = 0, f_max = 1;
  int lh_max = 1, ext_stride = 0;  // ext_stride: ls_max + f_max − 1 (conv vertical sums)
};

// ------------------------------------------------------------------------------------------
// Plane steps.

// Unnormalized circular box sums of rows listed in mh: dst[i, j] = Σ_{a<fh, b<fw}
// src[(i + a − lo_h) mod lh, (j + b − lo_w) mod lw] for j < ls (columns j >= lw: finite values
// the caller masks). Rows with mh[i] == 0 are not written. Row stride ls.
template <class T>
void box2d(const T* NTF_R src, T* NTF_R dst, T* NTF_R row, T* NTF_R ext, const int* mh, int lh,
           int lw, int ls, int lo_h, int fh, int lo_w, int fw) {
  const int n_ext = ls + fw - 1;
  for (int i = 0; i < lh; ++i) {
    if (!mh[i]) continue;
    const T* NTF_R r0 = src + (long)pmod(i - lo_h, lh) * ls;
    NTF_IVDEP for (int j = 0; j < ls; ++j) row[j] = r0[j];
    for (int a = 1; a < fh; ++a) {
      const T* NTF_R ra = src + (long)pmod(i + a - lo_h, lh) * ls;
      NTF_IVDEP for (int j = 0; j < ls; ++j) row[j] += ra[j];
    }
    T* NTF_R out = dst + (long)i * ls;
    if (fw == 1) {
      NTF_IVDEP for (int j = 0; j < ls; ++j) out[j] = row[j];
      continue;
    }
    // ext[k] = row[(k − lo_w) mod lw]: the centre is a copy, the margins wrap.
    for (int k = 0; k < n_ext; ++k) {
      const int s = k - lo_w;
      if (s >= 0 && s < lw) {
        const int len = (lw - s) < (n_ext - k) ? (lw - s) : (n_ext - k);
        std::memcpy(ext + k, row + s, sizeof(T) * len);
        k += len - 1;
      } else {
        ext[k] = row[pmod(s, lw)];
      }
    }
    NTF_IVDEP for (int j = 0; j < ls; ++j) out[j] = ext[j];
    for (int b = 1; b < fw; ++b) {
      const T* NTF_R e = ext + b;
      NTF_IVDEP for (int j = 0; j < ls; ++j) out[j] += e[j];
    }
  }
}

// dst[0..n) = src[0..n) for short rows (~33 entries): 32-byte chunks of constant size (inlined
// vector moves), then the rest. A libc memcpy call per row cost 9% of Myrtle-10.
template <class T>
inline void copy_row(T* NTF_R dst, const T* NTF_R src, int n) {
  constexpr int kChunk = 32 / sizeof(T);
  int j = 0;
  for (; j + kChunk <= n; j += kChunk) std::memcpy(dst + j, src + j, 32);
  for (; j < n; ++j) dst[j] = src[j];
}

// Columns [from, to) of a plane row of the NNGP array and, with `ntk`, of the NTK array, set
// to 0: masked rows, and the masked columns past a step's valid width.
template <class T>
inline void zero_cols(T* NTF_R dr, T* NTF_R tr, int from, int to, bool ntk) {
  for (int j = from; j < to; ++j) dr[j] = T(0);
  if (ntk)
    for (int j = from; j < to; ++j) tr[j] = T(0);
}

// Row masks of a packed plane (δh, δw) for the valid size (hv, wv); padding columns are 0.
template <class T>
void plane_masks(Scratch<T>& sc, int lh, int lw, int ls, int dh, int dw, int hv, int wv) {
  for (int i = 0; i < lh; ++i) sc.mh[i] = packed_valid(i, dh, lh, hv);
  for (int j = 0; j < ls; ++j) {
    const int m = j < lw ? packed_valid(j, dw, lw, wv) : 0;
    sc.mw[j] = T(m);
    sc.mwi[j] = -m;
  }
}

// nngp' = (wd·sd + b)·m, ntk' = (td·sd + tt·st + tc)·m over the masked rows; zero rows else.
template <class T, bool NTK, bool TLIVE>
void affine_rows(const AffineCoef<T> c, const T* sd, const T* st, T* d, T* t, const int* mh,
                 const T* NTF_R mw, int lh, int ls) {
  // sd/st may alias d/t (dense steps work in place): no restrict, the loop reads entry j before
  // writing it (so ivdep holds).
  for (int i = 0; i < lh; ++i) {
    const long o = (long)i * ls;
    if (!mh[i]) {
      zero_cols(d + o, t + o, 0, ls, NTK);
      continue;
    }
    NTF_IVDEP for (int j = 0; j < ls; ++j) {
      const T s = sd[o + j];
      d[o + j] = (c.wd * s + c.b) * mw[j];
      if (NTK) t[o + j] = (c.td * s + (TLIVE ? c.tt * st[o + j] : T(0)) + c.tc) * mw[j];
    }
  }
}

template <class T>
void affine(const AffineCoef<T>& c, const T* sd, const T* st, T* d, T* t, const int* mh,
            const T* mw, int lh, int ls, bool ntk, bool tlive) {
  if (!ntk)
    affine_rows<T, false, false>(c, sd, st, d, t, mh, mw, lh, ls);
  else if (tlive)
    affine_rows<T, true, true>(c, sd, st, d, t, mh, mw, lh, ls);
  else
    affine_rows<T, true, false>(c, sd, st, d, t, mh, mw, lh, ls);
}

// Vertical circular box sum of plane row i into e[lo_w + j] (j < ls), then the wrapped margins
// e[k] = centre[(k − lo_w) mod lw] for k < lo_w and lo_w + lw <= k < ls + fw − 1.
template <class T>
__attribute__((always_inline)) inline void vertical_row(const T* NTF_R src, T* NTF_R e, int i,
                                                        int lh, int lw, int ls, int lo_h, int fh,
                                                        int lo_w, int fw) {
  T* NTF_R c0 = e + lo_w;
  const T* NTF_R r0 = src + (long)pmod(i - lo_h, lh) * ls;
  if (fh == 3) {
    const T* NTF_R r1 = src + (long)pmod(i + 1 - lo_h, lh) * ls;
    const T* NTF_R r2 = src + (long)pmod(i + 2 - lo_h, lh) * ls;
    NTF_IVDEP for (int j = 0; j < ls; ++j) c0[j] = (r0[j] + r1[j]) + r2[j];
  } else if (fh == 2) {
    const T* NTF_R r1 = src + (long)pmod(i + 1 - lo_h, lh) * ls;
    NTF_IVDEP for (int j = 0; j < ls; ++j) c0[j] = r0[j] + r1[j];
  } else {
    NTF_IVDEP for (int j = 0; j < ls; ++j) c0[j] = r0[j];
    for (int a = 1; a < fh; ++a) {
      const T* NTF_R ra = src + (long)pmod(i + a - lo_h, lh) * ls;
      NTF_IVDEP for (int j = 0; j < ls; ++j) c0[j] += ra[j];
    }
  }
  const int tail = ls + fw - 1 - (lo_w + lw);
  if (lo_w <= lw && tail <= lw) {
    // Contiguous pieces of the centre (no modulo per entry).
    for (int k = 0; k < lo_w; ++k) e[k] = c0[lw - lo_w + k];
    for (int m = 0; m < tail; ++m) c0[lw + m] = c0[m];
  } else {  // filters wider than the grid (CIRCULAR): wraps more than once
    for (int k = 0; k < lo_w; ++k) e[k] = c0[pmod(k - lo_w, lw)];
    for (int k = lo_w + lw; k < ls + fw - 1; ++k) e[k] = c0[pmod(k - lo_w, lw)];
  }
}

// The vertical pass of a conv step over the rows of mh: NNGP into ed, the NTK (tlive) into et.
template <class T>
void conv_vertical(bool tlive, const T* NTF_R d, const T* NTF_R t, T* NTF_R ed, T* NTF_R et,
                   int es, const int* mh, int lh, int lw, int ls, int lo_h, int fh, int lo_w,
                   int fw) {
  for (int i = 0; i < lh; ++i) {
    if (!mh[i]) continue;
    vertical_row(d, ed + (long)i * es, i, lh, lw, ls, lo_h, fh, lo_w, fw);
    if (tlive) vertical_row(t, et + (long)i * es, i, lh, lw, ls, lo_h, fh, lo_w, fw);
  }
}

template <class T, int FW>
inline T hsum(const T* e, int j, int fw) {
  if (FW == 3) return (e[j] + e[j + 1]) + e[j + 2];
  if (FW == 2) return e[j] + e[j + 1];
  if (FW == 1) return e[j];
  T acc = e[j];
  for (int b = 1; b < fw; ++b) acc += e[j + b];
  return acc;
}

// A conv step on a plane in two passes: the vertical sums of every row into wrapped rows of the
// plane-sized buffers ed / et (row stride es ≥ ls + fw − 1), then per row the horizontal sums,
// affine and mask, written to dout / tout (not in place: later rows still read the input). Two
// passes, not one per row: the horizontal taps are unaligned reloads of the vertical sums just
// stored, and reloading a row still in the store buffer fails store-to-load forwarding (measured
// 1.46 → 1.04 cycles per entry, NNGP + NTK, f32). FW: 1, 2, 3 specialized, 0 any width.
template <class T, int FW, bool NTK, bool TLIVE>
void conv_rows(const T* NTF_R d, const T* NTF_R t, T* NTF_R dout, T* NTF_R tout, T* NTF_R ed,
               T* NTF_R et, int es, const int* mh, const T* NTF_R mw, const AffineCoef<T> c,
               int lh, int lw, int ls, int nw, int lo_h, int fh, int lo_w, int fw) {
  conv_vertical(TLIVE, d, t, ed, et, es, mh, lh, lw, ls, lo_h, fh, lo_w, fw);
  for (int i = 0; i < lh; ++i) {
    T* NTF_R dr = dout + (long)i * ls;
    T* NTF_R tr = tout + (long)i * ls;
    if (!mh[i]) {
      zero_cols(dr, tr, 0, ls, NTK);
      continue;
    }
    const T* NTF_R edr = ed + (long)i * es;
    const T* NTF_R etr = et + (long)i * es;
    NTF_IVDEP for (int j = 0; j < nw; ++j) {
      const T sdv = hsum<T, FW>(edr, j, fw);
      dr[j] = (c.wd * sdv + c.b) * mw[j];
      if (NTK) {
        const T stv = TLIVE ? hsum<T, FW>(etr, j, fw) : T(0);
        tr[j] = (c.td * sdv + c.tt * stv + c.tc) * mw[j];
      }
    }
    zero_cols(dr, tr, nw, ls, NTK);
  }
}

template <class T, int FW>
void conv_plane_fw(bool ntk, bool tlive, const T* d, const T* t, T* dout, T* tout, T* ed, T* et,
                   int es, const int* mh, const T* mw, const AffineCoef<T>& c, int lh, int lw,
                   int ls, int nw, int lo_h, int fh, int lo_w, int fw) {
  if (!ntk)
    conv_rows<T, FW, false, false>(d, t, dout, tout, ed, et, es, mh, mw, c, lh, lw, ls, nw, lo_h,
                                   fh, lo_w, fw);
  else if (tlive)
    conv_rows<T, FW, true, true>(d, t, dout, tout, ed, et, es, mh, mw, c, lh, lw, ls, nw, lo_h,
                                 fh, lo_w, fw);
  else
    conv_rows<T, FW, true, false>(d, t, dout, tout, ed, et, es, mh, mw, c, lh, lw, ls, nw, lo_h,
                                  fh, lo_w, fw);
}

// ed, et: plane-sized buffers of lh rows of stride es ≥ ls + fw − 1 (Scratch::vd / vt). Output
// columns [nw, ls) are masked for this step: zero, not computed.
template <class T>
void conv_plane(bool ntk, bool tlive, const T* d, const T* t, T* dout, T* tout, T* ed, T* et,
                int es, const int* mh, const T* mw, const AffineCoef<T>& c, int lh, int lw,
                int ls, int nw, int lo_h, int fh, int lo_w, int fw) {
#define NTF_CONV(FW)                                                                       \
  conv_plane_fw<T, FW>(ntk, tlive, d, t, dout, tout, ed, et, es, mh, mw, c, lh, lw, ls, nw, lo_h, \
                       fh, lo_w, fw)
  switch (fw) {
    case 1: NTF_CONV(1); break;
    case 2: NTF_CONV(2); break;
    case 3: NTF_CONV(3); break;
    default: NTF_CONV(0); break;
  }
#undef NTF_CONV
}

template <class T, int CODE>
inline T expect(T q12, T q11, T q22, T p0, T p1, T p2, T* dot) {
  T out;
  if (CODE == NONLIN_ABRELU)
    abrelu_expectation(q12, q11, q22, p0, p1, &out, dot);
  else if (CODE == NONLIN_ERF)
    erf_expectation(q12, q11, q22, p0, p1, p2, &out, dot);
  else
    gelu_expectation(q12, q11, q22, &out, dot);
  return out;
}

// norm: false when both variance maps are in the range where the f32 row may skip its exact
// power-of-two normalization (Ctx::map_safe; same results, simd_avx2.h).
template <class T, int CODE, bool TLIVE>
inline void nonlin_row(T* NTF_R dr, T* NTF_R tr, const T* NTF_R q11, const T* NTF_R q22,
                       const T* NTF_R mw, int ls, T p0, T p1, T p2, bool norm) {
#if NTF_HAND_SIMD
  // f32 ReLU family: the hand-vectorized row (simd_avx2.h, 2.x faster than the loop below).
  if constexpr (std::is_same<T, float>::value && CODE == NONLIN_ABRELU) {
    simd::abrelu_row<TLIVE>(dr, tr, q11, q22, mw, ls, p0, p1, norm);
    return;
  }
#endif
  (void)norm;
  NTF_IVDEP for (int j = 0; j < ls; ++j) {
    T dot;
    const T nn = expect<T, CODE>(dr[j], q11[j], q22[j], p0, p1, p2, &dot);
    dr[j] = nn * mw[j];
    if (TLIVE) tr[j] = tr[j] * dot * mw[j];
  }
}

// One nonlinearity over a plane: q11 rows from va, q22 rows from vb at ((i + δh) mod lh, δw + j)
// (map row stride ms).
template <class T, int CODE, bool TLIVE>
void nonlin_rows(T* NTF_R d, T* NTF_R t, const T* NTF_R va, const T* NTF_R vb, const int* mh,
                 const T* NTF_R mw, int lh, int ls, int nw, int ms, int dh, int dw, T p0, T p1,
                 T p2, bool norm) {
  for (int i = 0; i < lh; ++i) {
    T* NTF_R dr = d + (long)i * ls;
    T* NTF_R tr = t + (long)i * ls;
    if (!mh[i]) {
      zero_cols(dr, tr, 0, ls, TLIVE);
      continue;
    }
    int ii = i + dh;
    ii = ii >= lh ? ii - lh : ii;
    nonlin_row<T, CODE, TLIVE>(dr, tr, va + (long)i * ms, vb + (long)ii * ms + dw, mw, nw, p0, p1,
                               p2, norm);
    zero_cols(dr, tr, nw, ls, TLIVE);
  }
}

// nw ≤ ls (a multiple of 4): the columns computed; [nw, ls) are masked for this step (j ≥ the
// valid width) and set to 0 without evaluating the expectation (1/8 of the work at 32×32).
template <class T>
void nonlin_plane(int code, bool tlive, T* d, T* t, const T* va, const T* vb, const int* mh,
                  const T* mw, int lh, int ls, int nw, int ms, int dh, int dw, T p0, T p1, T p2,
                  bool norm = true) {
#define NTF_NL(C)                                                                                  \
  (tlive ? nonlin_rows<T, C, true>(d, t, va, vb, mh, mw, lh, ls, nw, ms, dh, dw, p0, p1, p2, norm) \
         : nonlin_rows<T, C, false>(d, t, va, vb, mh, mw, lh, ls, nw, ms, dh, dw, p0, p1, p2, norm))
  switch (code) {
    case NONLIN_ABRELU: NTF_NL(NONLIN_ABRELU); break;
    case NONLIN_ERF: NTF_NL(NONLIN_ERF); break;
    default: NTF_NL(NONLIN_GELU); break;
  }
#undef NTF_NL
}

// The input plane of segment 0: D0[i, j] = Σ_c x_a[i, j, c]·x_b[(i+δh) mod L, (j+δw) mod L, c] / C.
// Row stride ls; padding columns j >= lw are 0.
template <class T>
void image_plane(const Ctx<T>& cx, int a, int b, int dh, int dw, T* NTF_R d) {
  const int lh = cx.lh0, lw = cx.lw0, C = cx.C, ls = row_stride(lw), xs = periodic_stride(lw);
  const long img_size = (long)C * lh * xs;
  const T* xa = cx.img.data() + a * img_size;
  const T* xb = cx.img.data() + b * img_size;
  const T inv_c = T(1) / T(C);
  for (int i = 0; i < lh; ++i) {
    T* NTF_R dr = d + (long)i * ls;
    for (int j = 0; j < ls; ++j) dr[j] = T(0);
    if (i >= cx.args->h) continue;
    int ii = i + dh;
    ii = ii >= lh ? ii - lh : ii;
    if (ii >= cx.args->h) continue;
    const T* NTF_R ra = xa + (long)i * xs;
    const T* NTF_R rb = xb + (long)ii * xs + dw;
    const long cs = (long)lh * xs;  // channel stride
    if (C <= 4) {
      // One pass, the channel sum in registers (a pass per channel re-loads and re-stores the
      // row C times: 8% of Myrtle-10). Same order of operations as the loop below.
      NTF_IVDEP for (int j = 0; j < ls; ++j) {
        T acc = ra[j] * rb[j];
        if (C > 1) acc += ra[cs + j] * rb[cs + j];
        if (C > 2) acc += ra[2 * cs + j] * rb[2 * cs + j];
        if (C > 3) acc += ra[3 * cs + j] * rb[3 * cs + j];
        dr[j] = acc * inv_c;
      }
    } else {
      for (int c = 0; c < C; ++c) {
        const T* NTF_R rac = ra + c * cs;
        const T* NTF_R rbc = rb + c * cs;
        NTF_IVDEP for (int j = 0; j < ls; ++j) dr[j] += rac[j] * rbc[j];
      }
      NTF_IVDEP for (int j = 0; j < ls; ++j) dr[j] *= inv_c;
    }
    for (int j = lw; j < ls; ++j) dr[j] = T(0);
  }
}

// Image n's variance map of plan nonlinearity g, and whether the f32 ReLU rows may skip their
// normalization for the pair (a, b) (both maps map_safe).
template <class T>
inline const T* map_of(const Ctx<T>& cx, int n, long g) {
  return cx.maps.data() + n * cx.map_stride + cx.map_off[g];
}
template <class T>
inline bool maps_safe(const Ctx<T>& cx, int a, int b, long g) {
  return cx.map_safe[(long)a * cx.n_maps + g] && cx.map_safe[(long)b * cx.n_maps + g];
}

// One offset plane (δh, δw) of pair (a, b) through segment s; returns the (nngp, ntk) planes
// (sc.d/sc.t or sc.sd/sc.st: convs ping-pong between them), row stride ls.
template <class T>
std::pair<T*, T*> run_plane(const Ctx<T>& cx, int s, int a, int b, const PairWs<T>& pw, int dh,
                            int dw, Scratch<T>& sc) {
  const Plan& plan = *cx.plan;
  const Seg& sg = plan.seg[s];
  const int lh = sg.lh, lw = sg.lw, ls = row_stride(lw), ms = periodic_stride(lw);
  const long plane = (long)lh * lw;
  const bool ntk = cx.compute_ntk;
  T* d = sc.d.data();
  T* t = sc.t.data();
  bool tlive;
  if (s == 0) {
    image_plane(cx, a, b, dh, dw, d);
    tlive = false;
  } else {
    // Packed rows (stride lw) to plane rows (stride ls, zero padding).
    const long off = ((long)dh * lw + dw) * plane;
    for (int i = 0; i < lh; ++i) {
      copy_row(d + (long)i * ls, pw.pin_d.data() + off + (long)i * lw, lw);
      for (int j = lw; j < ls; ++j) d[(long)i * ls + j] = T(0);
      if (ntk) {
        copy_row(t + (long)i * ls, pw.pin_t.data() + off + (long)i * lw, lw);
        for (int j = lw; j < ls; ++j) t[(long)i * ls + j] = T(0);
      }
    }
    tlive = ntk;
  }
  int mask_hv = -1, mask_wv = -1;  // the valid size the masks in sc hold
  for (int k = sg.first_step; k < sg.first_step + sg.n_steps; ++k) {
    const Step& st = plan.step[k];
    if (st.hv != mask_hv || st.wv != mask_wv) {  // SAME stacks: once per plane
      plane_masks(sc, lh, lw, ls, dh, dw, st.hv, st.wv);
      mask_hv = st.hv;
      mask_wv = st.wv;
    }
    const int* mh = sc.mh.data();
    const T* mw = sc.mw.data();
    // Columns j ≥ st.wv are masked (packed_valid): compute [0, nw) only.
    const int nw = (st.wv + kVec - 1) / kVec * kVec < ls ? (st.wv + kVec - 1) / kVec * kVec : ls;
    if (st.type == STEP_NONLIN) {
      const long g = sg.nonlin_base + st.nonlin_index;
      const T* va = map_of(cx, a, g);
      const T* vb = map_of(cx, b, g);
      const bool norm = !maps_safe(cx, a, b, g);
      nonlin_plane<T>(st.nonlin, tlive, d, t, va, vb, mh, mw, lh, ls, nw, ms, dh, dw, T(st.p0),
                      T(st.p1), T(st.p2), norm);
      continue;
    }
    const bool conv = st.type == STEP_CONV && (st.fh > 1 || st.fw > 1 || st.lo_h || st.lo_w);
    const double scale = st.type == STEP_CONV ? 1.0 / (double(st.fh) * st.fw) : 1.0;
    const AffineCoef<T> c = affine_coef<T>(st, scale);
    if (conv) {
      T* d2 = d == sc.d.data() ? sc.sd.data() : sc.d.data();
      T* t2 = t == sc.t.data() ? sc.st.data() : sc.t.data();
#if NTF_HAND_SIMD
      // f32 conv followed by a ReLU-family step: one fused pass (simd_avx2.h conv_abrelu_plane).
      if constexpr (std::is_same<T, float>::value) {
        const Step* nx = k + 1 < sg.first_step + sg.n_steps ? &plan.step[k + 1] : nullptr;
        if (nx && nx->type == STEP_NONLIN && nx->nonlin == NONLIN_ABRELU && nx->hv == st.hv &&
            nx->wv == st.wv) {
          const long g = sg.nonlin_base + nx->nonlin_index;
          simd::ConvAbrelu A;
          // SAME 3×3 over whole 8- or 16-lane blocks: the vertical sums stay in registers
          // (output to d2 / t2; simd_avx2.h conv3_abrelu_rows); else the two-pass form, in place.
          const bool same3 = st.fh == 3 && st.fw == 3 && st.lo_h == 1 && st.lo_w == 1;
          A.vec = same3 && !cx.args->conv_two_pass ? simd::conv3_vec(nw, lw) : 0;
          const bool reg = A.vec > 0;
          if (reg) {
            A.d = d2;
            A.t = t2;
            A.xd = d;
            A.xt = t;
            A.rd = A.rt = nullptr;
            A.es = 0;
          } else {
            conv_vertical(tlive, d, t, sc.vd.data(), sc.vt.data(), cx.ext_stride, mh, lh, lw,
                          ls, st.lo_h, st.fh, st.lo_w, st.fw);
            A.d = d;  // in place
            A.t = t;
            A.xd = A.xt = nullptr;
            A.rd = sc.vd.data();
            A.rt = sc.vt.data();
            A.es = cx.ext_stride;
          }
          A.va = map_of(cx, a, g);
          A.vb = map_of(cx, b, g);
          A.ms = ms;
          A.dh = dh;
          A.dw = dw;
          A.mh = mh;
          A.mwi = sc.mwi.data();
          A.lh = lh;
          A.lw = lw;
          A.ls = ls;
          A.nw = nw;
          A.fw = st.fw;
          A.wd = c.wd;
          A.b = c.b;
          A.td = c.td;
          A.tt = c.tt;
          A.tc = c.tc;
          A.pa = float(nx->p0);
          A.pb = float(nx->p1);
          simd::conv_abrelu_plane(A, ntk, tlive, !maps_safe(cx, a, b, g));
          if (reg) {
            d = d2;
            t = t2;
          }
          tlive = ntk;
          ++k;  // the nonlinearity is done
          continue;
        }
      }
#endif
      conv_plane(ntk, tlive, d, t, d2, t2, sc.vd.data(), sc.vt.data(), cx.ext_stride, mh, mw, c,
                 lh, lw, ls, nw, st.lo_h, st.fh, st.lo_w, st.fw);
      d = d2;
      t = t2;
    } else {
      affine(c, d, t, d, t, mh, mw, lh, ls, ntk, tlive);
    }
    tlive = ntk;
  }
  if (ntk && !tlive) std::memset(t, 0, sizeof(T) * lh * ls);
  return {d, t};
}

// The expectation of a nonlinearity on the diagonal (q12 = q11 = q22 = v[j], j < ls) in place,
// by the very code the planes run (so a self pair's δ = 0 entries, and pairs of images that
// differ by a power-of-two factor, reproduce their variance maps bit for bit: θ = 0 exactly).
// q, ones: scratch rows of ls entries.
template <class T>
void diag_row(const Step& st, T* v, T* q, T* ones, int ls) {
  for (int j = 0; j < ls; ++j) {
    q[j] = v[j];
    ones[j] = T(1);
  }
  nonlin_plane<T>(st.nonlin, false, v, nullptr, q, q, &kOneRow, ones, 1, ls, ls, ls, 0, 0,
                  T(st.p0),
                  T(st.p1), T(st.p2));
}

// ------------------------------------------------------------------------------------------
// Per-image variance maps of segment s (fused_cnn.py `_variance_chain`), from v0 (lh × lw,
// zero outside the valid input; row stride v0_stride). Written periodically per row (stride
// periodic_stride(lw)) into image n's map block. Works in row stride ls.
template <class T>
void compute_maps(Ctx<T>& cx, int s, int n, const T* v0, int v0_stride, Scratch<T>& sc) {
  const Plan& plan = *cx.plan;
  const Seg& sg = plan.seg[s];
  const int lh = sg.lh, lw = sg.lw, ls = row_stride(lw), ms = periodic_stride(lw);
  T* v = sc.v.data();
  for (int i = 0; i < lh; ++i)
    for (int j = 0; j < ls; ++j) v[(long)i * ls + j] = j < lw ? v0[(long)i * v0_stride + j] : T(0);
  int hv = sg.hv_in, wv = sg.wv_in;
  for (int k = sg.first_step; k < sg.first_step + sg.n_steps; ++k) {
    const Step& st = plan.step[k];
    if (st.type == STEP_NONLIN) {
      const long g = sg.nonlin_base + st.nonlin_index;
      T* map = cx.maps.data() + n * cx.map_stride + cx.map_off[g];
      bool safe = true;  // every nonzero |entry| in [2^-30, 2^30] (Ctx::map_safe)
      for (int i = 0; i < lh; ++i) {
        T* row = v + (long)i * ls;
        for (int j = 0; j < ls; ++j) {
          const T vf = (i < hv && j < wv) ? row[j] : T(1);
          if (j < lw)
            for (int jj = j; jj < ms; jj += lw) map[(long)i * ms + jj] = vf;
          row[j] = vf;
          const T av = vf < T(0) ? -vf : vf;
          safe = safe && (av == T(0) || (av >= T(0x1p-30) && av <= T(0x1p30)));
        }
        diag_row(st, row, sc.row.data(), sc.ext.data(), ls);
        for (int j = 0; j < ls; ++j) row[j] = (i < st.hv && j < st.wv) ? row[j] : T(0);
      }
      cx.map_safe[(long)n * cx.n_maps + g] = safe;
    } else {
      const bool conv = st.type == STEP_CONV;
      const double scale = conv ? 1.0 / (double(st.fh) * st.fw) : 1.0;
      const T w = T(st.w_var * scale), bias = T(st.has_b ? st.b_var : 0.0);
      const T* src = v;
      if (conv) {
        for (int i = 0; i < lh; ++i) sc.mh[i] = 1;
        box2d(v, sc.sd.data(), sc.row.data(), sc.ext.data(), sc.mh.data(), lh, lw, ls, st.lo_h,
              st.fh, st.lo_w, st.fw);
        src = sc.sd.data();
      }
      for (int i = 0; i < lh; ++i)
        for (int j = 0; j < ls; ++j) {
          const long o = (long)i * ls + j;
          v[o] = (i < st.hv && j < st.wv) ? w * src[o] + bias : T(0);
        }
    }
    hv = st.hv;
    wv = st.wv;
  }
}

// ------------------------------------------------------------------------------------------
// The h-axis tap pairs of pooled row i' at output offset row δh' (pool_rows pass 1 and its fused
// form, PoolTables::scatter): f(x, δh) for each window tap x of i' and y of
// k' = (i' + δh') mod lh2, δh = (y − x) mod lh (taps lie in [0, lh): one conditional add).
template <class F>
inline void for_each_h_tap(const PoolTables& pt, int lh, int lh2, int dh2, int i, F&& f) {
  const int ph = pt.ph, k = (i + dh2) % lh2;
  for (int a = 0; a < ph; ++a) {
    const int x = pt.taps_h[(long)i * ph + a];
    if (x < 0) continue;
    for (int a2 = 0; a2 < ph; ++a2) {
      const int y = pt.taps_h[(long)k * ph + a2];
      if (y < 0) continue;
      const int dy = y - x;
      f(x, dy < 0 ? dy + lh : dy);
    }
  }
}

// g[xw] = Σ_{t<n} f[base[t] + xw] for xw < lw (pass 1 of pool_rows), two taps per sweep.
template <class T>
inline void pool_h_row(T* NTF_R g, const T* NTF_R f, const long* base, int n, int lw) {
  if (n == 0) {
    for (int j = 0; j < lw; ++j) g[j] = T(0);
    return;
  }
  int t = 0;
  if (n & 1) {
    const T* NTF_R f0 = f + base[0];
    NTF_IVDEP for (int j = 0; j < lw; ++j) g[j] = f0[j];
    t = 1;
  } else {
    const T* NTF_R f0 = f + base[0];
    const T* NTF_R f1 = f + base[1];
    NTF_IVDEP for (int j = 0; j < lw; ++j) g[j] = f0[j] + f1[j];
    t = 2;
  }
  for (; t < n; t += 2) {
    const T* NTF_R f0 = f + base[t];
    const T* NTF_R f1 = f + base[t + 1];
    NTF_IVDEP for (int j = 0; j < lw; ++j) g[j] += f0[j] + f1[j];
  }
}

// Pooling of a pair's stored segment output (packed F[δh][δw][x][xw], grid (lh, lw) of segment
// s) into the packed input of segment s + 1 (P[δh'][δw'][i'][j'], grid (lh2, lw2)), output rows
// δh' in [r0, r1). The pooled entry (i', j') of offset (δh', δw') pairs the windows of i', j'
// with those of k' = (i' + δh') mod lh2, l' = (j' + δw') mod lw2:
//   P = s_h(i') s_h(k') s_w(j') s_w(l') Σ_{x ∈ win(i'), y ∈ win(k'), xw ∈ win(j'), yw ∈ win(l')}
//       F[(y − x) mod lh][(yw − xw) mod lw][x][xw],
// separable into an h pass and a w pass, both per output row δh' (threads stay independent):
//   1. G[δw][i'][xw] = Σ_{x, y} F[(y − x) mod lh][δw][x][xw] for every stored δw and valid i':
//      (y − x, x) tap pairs, each adding a contiguous row of lw entries (vectorized);
//   2. P[δh'][δw'][i'][j'] = s_h s_h s_w s_w Σ_{xw, yw} G[(yw − xw) mod lw][i'][xw] through the
//      per-(δw', j') tap offsets of PoolTables (zero taps where j' is not valid).
// Reads only the stored planes: the h taps of valid rows reach the stored δh (the self pair's
// cone lists are closed under this, fused_cnn.py `_variance_radii`), pass 2 the stored δw.
// Cost per output row: ph² row adds over lw·lh2·lw entries + pw² taps per output entry, instead
// of ph²·pw² scalar taps per output entry.
template <class T>
void pool_rows(const Ctx<T>& cx, int s, PairWs<T>& pw, const typename Ctx<T>::Lists& li, int r0,
               int r1, Scratch<T>& sc, bool fused) {
  const Plan& plan = *cx.plan;
  const Seg& sg = plan.seg[s];
  const Seg& nx = plan.seg[s + 1];
  const PoolTables& pt = cx.pools[s];
  const int lh = sg.lh, lw = sg.lw, lh2 = nx.lh, lw2 = nx.lw;
  const int ho = nx.hv_in, ph = pt.ph, np_w = pt.pw * pt.pw;
  const long plane = (long)lh * lw, plane2 = (long)lh2 * lw2, gdw = (long)lh2 * lw;
  const bool ntk = cx.compute_ntk;
  const T* fd = pw.full_d.data();
  const T* ft = ntk ? pw.full_t.data() : nullptr;
  T* NTF_R gd = sc.g_d.data();
  T* NTF_R gt = ntk ? sc.g_t.data() : nullptr;
  long* base = sc.taps.data();
  int* n_h = sc.n_taps.data();
  for (int ri = r0; ri < r1; ++ri) {
    const int dh = li.pool_rows[ri];
    if (fused) {  // pass 1 ran as the planes finished (segment_rows)
      gd = pw.g_d.data() + (long)dh * lw * gdw;
      gt = ntk ? pw.g_t.data() + (long)dh * lw * gdw : nullptr;
    } else {
      // Pass 1 (h axes): the (δh, x) tap lists of every valid row i', then per stored δw all rows
      // (consecutive i' read consecutive rows x of the same few planes: prefetch-friendly).
      for (int i = 0; i < lh2; ++i) {
        n_h[i] = -1;  // row not valid: never pooled (zero in pass 2)
        if (packed_valid(i, dh, lh2, ho)) {
          int n = 0;
          long* bi = base + (long)i * ph * ph;
          for_each_h_tap(pt, lh, lh2, dh, i, [&](int x, int d) {
            bi[n++] = (long)d * lw * plane + (long)x * lw;
          });
          n_h[i] = n;
        }
      }
      for (const int dw : li.cols) {
        const T* fdw = fd + (long)dw * plane;
        const T* ftw = ntk ? ft + (long)dw * plane : nullptr;
        for (int i = 0; i < lh2; ++i) {
          if (n_h[i] < 0) continue;
          const long go = (long)dw * gdw + (long)i * lw;
          const long* bi = base + (long)i * ph * ph;
          pool_h_row(gd + go, fdw, bi, n_h[i], lw);
          if (ntk) pool_h_row(gt + go, ftw, bi, n_h[i], lw);
        }
      }
    }
    // Pass 2 (w axes).
    for (const int dw : li.pool_cols) {
      T* NTF_R od = pw.pin_d.data() + ((long)dh * lw2 + dw) * plane2;
      T* NTF_R ot = ntk ? pw.pin_t.data() + ((long)dh * lw2 + dw) * plane2 : nullptr;
      const int* cnt = &pt.col_cnt[(long)dw * lw2];
      const int* off = &pt.col_off[(long)dw * lw2 * np_w];
      const double* cs = &pt.col_scale[(long)dw * lw2];
      for (int i = 0; i < lh2; ++i) {
        T* NTF_R orow_d = od + (long)i * lw2;
        T* NTF_R orow_t = ntk ? ot + (long)i * lw2 : nullptr;
        if (!packed_valid(i, dh, lh2, ho)) {
          for (int j = 0; j < lw2; ++j) orow_d[j] = T(0);
          if (ntk)
            for (int j = 0; j < lw2; ++j) orow_t[j] = T(0);
          continue;
        }
        const double hs = pt.inv_h[i] * pt.inv_h[(i + dh) % lh2];
        const T* NTF_R grow_d = gd + (long)i * lw;
        if (ntk) {
          const T* NTF_R grow_t = gt + (long)i * lw;
          for (int j = 0; j < lw2; ++j) {
            const int* o = off + (long)j * np_w;
            T sd = T(0), st = T(0);
            for (int t = 0; t < cnt[j]; ++t) {
              sd += grow_d[o[t]];
              st += grow_t[o[t]];
            }
            const T scale = T(hs * cs[j]);
            orow_d[j] = sd * scale;
            orow_t[j] = st * scale;
          }
        } else {
          for (int j = 0; j < lw2; ++j) {
            const int* o = off + (long)j * np_w;
            T sd = T(0);
            for (int t = 0; t < cnt[j]; ++t) sd += grow_d[o[t]];
            orow_d[j] = sd * T(hs * cs[j]);
          }
        }
      }
    }
  }
}

// Per-axis tap tables of pooling segment sg (grid lw) into segment nx (see PoolTables).
inline void make_pool_tables(const Seg& sg, const Seg& nx, PoolTables* pt) {
  const int hv = sg.hv_out, wv = sg.wv_out;
  auto axis = [&](int size, int p, int s, int lo, int n_out, std::vector<int>* taps,
                  std::vector<double>* inv) {
    taps->assign((long)n_out * p, -1);
    inv->assign(n_out, 1.0);
    for (int o = 0; o < n_out; ++o) {
      for (int a = 0; a < p; ++a) {
        int x = o * s + a - lo;
        if (sg.pool_padding == PAD_CIRCULAR)
          x = pmod(x, size);
        else if (x < 0 || x >= size)
          x = -1;
        (*taps)[(long)o * p + a] = x;
      }
      if (!sg.pool_sum)
        (*inv)[o] = 1.0 / pool_divisor<double>(size, p, s, sg.pool_padding, sg.normalize_edges, o);
    }
  };
  pt->ph = sg.pool_wh;
  pt->pw = sg.pool_ww;
  axis(hv, sg.pool_wh, sg.pool_sh, sg.pool_lo_h, sg.pool_out_h, &pt->taps_h, &pt->inv_h);
  axis(wv, sg.pool_ww, sg.pool_sw, sg.pool_lo_w, sg.pool_out_w, &pt->taps_w, &pt->inv_w);
  {
    const int lh = sg.lh, lh2 = nx.lh, ho = nx.hv_in;
    pt->scatter.assign(lh, {});
    for (int dh2 = 0; dh2 < lh2; ++dh2)
      for (int i = 0; i < lh2; ++i) {
        if (!packed_valid(i, dh2, lh2, ho)) continue;
        for_each_h_tap(*pt, lh, lh2, dh2, i, [&](int x, int d) {
          std::vector<int>& l = pt->scatter[d];
          l.push_back(dh2);
          l.push_back(i);
          l.push_back(x);
        });
      }
  }
  // The pooling writes every packed position of the next grid (lh2, lw2); taps of positions
  // beyond the valid output size are never used (those entries are zero).
  const int lw = sg.lw, lh2 = nx.lh, lw2 = nx.lw, wo = nx.wv_in, pw = pt->pw, np = pw * pw;
  pt->col_cnt.assign((long)lw2 * lw2, 0);
  pt->col_off.assign((long)lw2 * lw2 * np, 0);
  pt->col_scale.assign((long)lw2 * lw2, 0.0);
  for (int dw = 0; dw < lw2; ++dw)
    for (int j = 0; j < lw2; ++j) {
      if (!packed_valid(j, dw, lw2, wo)) continue;
      const int l = (j + dw) % lw2;
      const long e = (long)dw * lw2 + j;
      int n = 0;
      for (int b = 0; b < pw; ++b) {
        const int xw = pt->taps_w[(long)j * pw + b];
        if (xw < 0) continue;
        for (int b2 = 0; b2 < pw; ++b2) {
          const int yw = pt->taps_w[(long)l * pw + b2];
          if (yw < 0) continue;
          const int dx = pmod(yw - xw, lw);
          pt->col_off[e * np + n++] = (int)((long)dx * lh2 * lw + xw);
        }
      }
      pt->col_cnt[e] = n;
      pt->col_scale[e] = pt->inv_w[j] * pt->inv_w[l];
    }
}

// ------------------------------------------------------------------------------------------
// One pair through every segment.

struct PairOut {
  double nngp = 0, ntk = 0;
};

// Σ x[e] in double, n a multiple of 4 (rows of stride ls). The AVX2 float version keeps 8
// partial sums (an ordered double sum does not vectorize: one add per 4-cycle latency).
template <class T>
double plane_sum(const T* x, long n) {
#if NTF_HAND_SIMD
  if constexpr (std::is_same<T, float>::value) return simd::sum_f32(x, n);
#endif
  double s = 0;
  for (long e = 0; e < n; ++e) s += x[e];
  return s;
}

// Rows [r0, r1) of segment s for pair (a, b): stores planes (pooling segment) or adds the
// readout sums of each row into row_d/row_t (indexed by δh).
template <class T>
inline void add_row(T* NTF_R dst, const T* NTF_R src, int n) {
  NTF_IVDEP for (int j = 0; j < n; ++j) dst[j] += src[j];
}

// A plane (rows of stride ls) into packed storage at offset `off` (rows of stride lw).
template <class T>
inline void store_plane(T* NTF_R dst, const T* NTF_R src, int lh, int lw, int ls) {
  for (int i = 0; i < lh; ++i) copy_row(dst + (long)i * lw, src + (long)i * ls, lw);
}

// The plane of offset −δ of a self pair from its plane δ (rows of stride ls) into packed storage:
// K is symmetric for a == b (K[x, y, u, v] = K[y, x, v, u]), so
// P_{−δ}[i, j] = K[i, i − δh, j, j − δw] = P_δ[(i − δh) mod lh, (j − δw) mod lw].
template <class T>
inline void store_mirror(T* NTF_R dst, const T* NTF_R src, int lh, int lw, int ls, int dh,
                         int dw) {
  for (int i = 0; i < lh; ++i) {
    const T* NTF_R row = src + (long)pmod(i - dh, lh) * ls;
    T* NTF_R out = dst + (long)i * lw;
    // out[j] = row[(j − δw) mod lw]: two contiguous pieces.
    copy_row(out + dw, row, lw - dw);
    copy_row(out, row + (lw - dw), dw);
  }
}

// Rows [r0, r1) of segment s for pair (a, b): stores planes (pooling segment) or adds the
// readout sums of each row into row_d/row_t (indexed by δh). `self` (a == b): the offsets δ and
// −δ hold mirrored planes (store_mirror), so only one of each pair runs — the lexicographically
// smaller of (δh, δw) and ((−δh) mod lh, (−δw) mod lw) — and a readout counts it twice, a
// pooling segment stores both. The offset lists are closed under −δ (full ranges; the cone
// lists {0..r} ∪ {n−r..n−1}), so every stored mirror is one the pooling reads.
template <class T>
void segment_rows(const Ctx<T>& cx, int s, int a, int b, bool self, bool fused, PairWs<T>& pw,
                  const typename Ctx<T>::Lists& li, int r0, int r1, Scratch<T>& sc, double* row_d,
                  double* row_t) {
  const Seg& sg = cx.plan->seg[s];
  const int lh = sg.lh, lw = sg.lw, ls = row_stride(lw);
  const long plane = (long)lh * lw;
  for (int ri = r0; ri < r1; ++ri) {
    const int dh = li.rows[ri];
    const int mdh = dh == 0 ? 0 : lh - dh;
    double rd = 0, rt = 0;
    for (const int dw : li.cols) {
      const int mdw = dw == 0 ? 0 : lw - dw;
      double weight = 1.0;
      bool mirror = false;
      if (self) {
        if (dh > mdh || (dh == mdh && dw > mdw)) continue;  // the mirror runs instead
        mirror = dh != mdh || dw != mdw;
        weight = mirror ? 2.0 : 1.0;
      }
      const std::pair<T*, T*> res = run_plane(cx, s, a, b, pw, dh, dw, sc);
      const T* d = res.first;
      const T* t = res.second;
      if (sg.end == END_POOL && fused) {
        // Pass 1 of pool_rows on the fly: G[δh'][δw][i'][:] += plane row x (see
        // PoolTables::scatter); rows of the plane are read while they are in L1.
        const std::vector<int>& sl = cx.pools[s].scatter[dh];
        const int lh2 = cx.plan->seg[s + 1].lh;
        const long gdw = (long)lh2 * lw, gsz = (long)lw * gdw;
        for (size_t e = 0; e < sl.size(); e += 3) {
          const long go = sl[e] * gsz + dw * gdw + (long)sl[e + 1] * lw;
          const long xo = (long)sl[e + 2] * ls;
          add_row(pw.g_d.data() + go, d + xo, lw);
          if (cx.compute_ntk) add_row(pw.g_t.data() + go, t + xo, lw);
        }
      } else if (sg.end == END_POOL) {
        const long off = ((long)dh * lw + dw) * plane;
        store_plane(pw.full_d.data() + off, d, lh, lw, ls);
        if (cx.compute_ntk) store_plane(pw.full_t.data() + off, t, lh, lw, ls);
        if (mirror) {
          const long moff = ((long)mdh * lw + mdw) * plane;
          store_mirror(pw.full_d.data() + moff, d, lh, lw, ls, dh, dw);
          if (cx.compute_ntk) store_mirror(pw.full_t.data() + moff, t, lh, lw, ls, dh, dw);
        }
      } else {
        // Padding columns are 0; double accumulators.
        const long n = (long)lh * ls;
        rd += weight * plane_sum(d, n);
        if (cx.compute_ntk) rt += weight * plane_sum(t, n);
      }
    }
    if (sg.end != END_POOL) {
      row_d[ri] = rd;
      row_t[ri] = rt;
    }
  }
}

template <class T>
double readout_scale(const Seg& sg) {
  const double hw = double(sg.hv_out) * sg.wv_out;
  if (sg.end == END_GAP) return 1.0 / (hw * hw);
  if (sg.end == END_FLATTEN) return 1.0 / hw;
  return 1.0;
}

// Pair (a, b) through every segment. `self`: a == b, computes image a's variance maps segment by
// segment. `nthreads` > 1: rows of each segment (and pooling) are split over threads, with
// scratch[tid]; else everything runs on scratch[0].
template <class T>
PairOut run_pair(Ctx<T>& cx, int a, int b, bool self, PairWs<T>& pw,
                 std::vector<Scratch<T>>& scratch, int scratch0, int nthreads,
                 std::vector<double>& rows) {
  const Plan& plan = *cx.plan;
  PairOut out;
  const bool lean = self && !cx.self_values;
  for (int s = 0; s < plan.n_segments; ++s) {
    const Seg& sg = plan.seg[s];
    if (self && s > 0 && sg.n_nonlin > 0)
      compute_maps(cx, s, a, pw.pin_d.data(), sg.lw, scratch[scratch0]);
    if (lean && s >= cx.last_nl) break;
    const typename Ctx<T>::Lists& li = lean ? cx.cone[s] : cx.full[s];
    const int n_rows = (int)li.rows.size();
    // Pooling pass 1 fused into the plane loop when one thread runs the whole pair (its G rows
    // are shared by all δh); self pairs keep the stored planes (their mirrored offsets).
    const bool fused = sg.end == END_POOL && !self && (nthreads <= 1 || n_rows <= 1);
    if (fused) {
      const Seg& nx = plan.seg[s + 1];
      const long n = (long)nx.lh * sg.lw * nx.lh * sg.lw;
      std::memset(pw.g_d.data(), 0, sizeof(T) * n);
      if (cx.compute_ntk) std::memset(pw.g_t.data(), 0, sizeof(T) * n);
    }
    double* row_d = rows.data();
    double* row_t = rows.data() + n_rows;
    if (nthreads > 1 && n_rows > 1) {
      parallel_for(nthreads, n_rows, [&](long r, int tid) {
        segment_rows(cx, s, a, b, self, fused, pw, li, (int)r, (int)r + 1, scratch[tid], row_d,
                     row_t);
      });
    } else {
      segment_rows(cx, s, a, b, self, fused, pw, li, 0, n_rows, scratch[scratch0], row_d,
                   row_t);
    }
    if (sg.end == END_POOL) {
      const int n_out = (int)li.pool_rows.size();
      if (nthreads > 1 && n_out > 1)
        parallel_for(nthreads, n_out, [&](long r, int tid) {
          pool_rows(cx, s, pw, li, (int)r, (int)r + 1, scratch[tid], fused);
        });
      else
        pool_rows(cx, s, pw, li, 0, n_out, scratch[scratch0], fused);
    } else {
      double sd = 0, st = 0;
      for (int r = 0; r < n_rows; ++r) {
        sd += row_d[r];
        st += row_t[r];
      }
      const double scale = readout_scale<T>(sg);
      out.nngp = sd * scale;
      out.ntk = st * scale;
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------

template <class T>
const char* run_typed(const RunArgs& args) {
  const Plan& plan = *args.plan;
  Ctx<T> cx;
  cx.plan = &plan;
  cx.args = &args;
  cx.compute_ntk = args.compute_ntk;
  const bool sym = args.sym;
  const long n1 = args.n1, n2 = args.n2;
  cx.n_img = (int)(sym ? n1 : n1 + n2);
  cx.C = (int)args.c;
  const Seg& s0 = plan.seg[0];
  cx.lh0 = s0.lh;
  cx.lw0 = s0.lw;
  if (s0.hv_in != args.h || s0.wv_in != args.w) return "plan was encoded for another image size";

  // Sizes and per-nonlinearity map offsets.
  cx.map_off.assign(plan.n_nonlin > 0 ? plan.n_nonlin : 1, 0);
  cx.pools.resize(plan.n_segments);
  for (int s = 0; s < plan.n_segments; ++s) {
    const Seg& sg = plan.seg[s];
    const long plane = (long)sg.lh * sg.lw;
    const long padded = (long)sg.lh * row_stride(sg.lw);
    if (padded > cx.max_plane) cx.max_plane = padded;
    if (sg.lh > cx.lh_max) cx.lh_max = sg.lh;
    if (row_stride(sg.lw) > cx.ls_max) cx.ls_max = row_stride(sg.lw);
    for (int k = sg.first_step; k < sg.first_step + sg.n_steps; ++k) {
      if (plan.step[k].fw > cx.f_max) cx.f_max = plan.step[k].fw;
      if (plan.step[k].type == STEP_NONLIN) {
        cx.map_off[sg.nonlin_base + plan.step[k].nonlin_index] = cx.map_stride;
        cx.map_stride += (long)sg.lh * periodic_stride(sg.lw);
      }
    }
    if (sg.end == END_POOL) {
      if (plane * plane > cx.max_full) cx.max_full = plane * plane;
      const Seg& nx = plan.seg[s + 1];
      const long p2 = (long)nx.lh * nx.lw;
      if (p2 * p2 > cx.max_pin) cx.max_pin = p2 * p2;
      const long g = (long)sg.lw * nx.lh * sg.lw, nt = (long)nx.lh * sg.pool_wh * sg.pool_wh;
      if (g > cx.max_g) cx.max_g = g;
      if (g * nx.lh > cx.max_gall) cx.max_gall = g * nx.lh;
      if (nt > cx.max_taps) cx.max_taps = nt;
      if (nx.lh > cx.max_lh2) cx.max_lh2 = nx.lh;
      make_pool_tables(sg, nx, &cx.pools[s]);
    }
  }

  // vertical_row writes ls + fw − 1 entries per row.
  cx.ext_stride = cx.ls_max + cx.f_max - 1;

  // Offset lists (see Ctx::full / Ctx::cone).
  {
    const int ns = plan.n_segments;
    auto range = [](int n) {
      std::vector<int> v(n);
      for (int k = 0; k < n; ++k) v[k] = k;
      return v;
    };
    auto cone = [&](int n, int r) {
      if (2 * r + 1 >= n) return range(n);
      std::vector<int> v;
      for (int k = 0; k <= r; ++k) v.push_back(k);
      for (int k = n - r; k < n; ++k) v.push_back(k);
      return v;
    };
    cx.full.resize(ns);
    cx.cone.resize(ns);
    cx.last_nl = 0;
    for (int s = 0; s < ns; ++s)
      if (plan.seg[s].n_nonlin > 0) cx.last_nl = s;
    std::vector<int> rh(ns + 1, 0), rw(ns + 1, 0);  // radius of the planes of segment s
    for (int s = cx.last_nl - 1; s >= 0; --s) {
      const Seg& sg = plan.seg[s];
      rh[s] = sg.pool_sh * rh[s + 1] + sg.pool_wh - 1;
      rw[s] = sg.pool_sw * rw[s + 1] + sg.pool_ww - 1;
    }
    for (int s = 0; s < ns; ++s) {
      const Seg& sg = plan.seg[s];
      const bool flatten = sg.end == END_FLATTEN;
      cx.full[s].rows = flatten ? std::vector<int>{0} : range(sg.lh);
      cx.full[s].cols = flatten ? std::vector<int>{0} : range(sg.lw);
      if (sg.end == END_POOL) {
        const Seg& nx = plan.seg[s + 1];
        cx.full[s].pool_rows = range(nx.lh);
        cx.full[s].pool_cols = range(nx.lw);
        if (s < cx.last_nl) {
          cx.cone[s].rows = cone(sg.lh, rh[s]);
          cx.cone[s].cols = cone(sg.lw, rw[s]);
          cx.cone[s].pool_rows = cone(nx.lh, rh[s + 1]);
          cx.cone[s].pool_cols = cone(nx.lw, rw[s + 1]);
        }
      }
    }
    cx.self_values = args.sym || args.compute_cov;
  }

  // Channel-planar, zero-padded, row-doubled images.
  const int H = (int)args.h, W = (int)args.w, C = cx.C, lh = cx.lh0, lw = cx.lw0;
  const int xs = periodic_stride(lw), ls0 = row_stride(lw);
  const long img_size = (long)C * lh * xs;
  cx.img.assign(cx.n_img * img_size, T(0));
  const T* x1 = static_cast<const T*>(args.x1);
  const T* x2 = static_cast<const T*>(args.x2);
  const int nthreads = args.threads;
  parallel_for(nthreads, cx.n_img, [&](long n, int) {
    const T* x = n < n1 ? x1 + n * (long)H * W * C : x2 + (n - n1) * (long)H * W * C;
    T* dst = cx.img.data() + n * img_size;
    for (int i = 0; i < H; ++i)
      for (int j = 0; j < W; ++j)
        for (int c = 0; c < C; ++c) {
          const T v = x[((long)i * W + j) * C + c];
          for (int jj = j; jj < xs; jj += lw) dst[((long)c * lh + i) * xs + jj] = v;
        }
  });
  cx.maps.assign(cx.n_img * cx.map_stride, T(0));
  cx.n_maps = plan.n_nonlin > 0 ? plan.n_nonlin : 1;
  cx.map_safe.assign(cx.n_img * cx.n_maps, 0);

  // Outputs start at zero (XLA does not clear them).
  T* nngp = static_cast<T*>(args.nngp);
  T* ntk = static_cast<T*>(args.ntk);
  T* cov1 = static_cast<T*>(args.cov1);
  T* cov2 = static_cast<T*>(args.cov2);
  std::memset(nngp, 0, sizeof(T) * n1 * n2);
  std::memset(ntk, 0, sizeof(T) * n1 * n2);
  std::memset(cov1, 0, sizeof(T) * n1);
  std::memset(cov2, 0, sizeof(T) * n2);

  const bool has_pool = plan.n_segments > 1;
  typename WsCache<T>::Lease lease;
  std::vector<PairWs<T>>& ws_set = *lease.set;
  if ((int)ws_set.size() < nthreads) ws_set.resize(nthreads);
  auto make_ws = [&](PairWs<T>& pw) {
    if (!has_pool) return;
    grow_zero(pw.full_d, cx.max_full);
    grow_zero(pw.pin_d, cx.max_pin);
    grow_zero(pw.g_d, cx.max_gall);
    if (cx.compute_ntk) grow_zero(pw.g_t, cx.max_gall);
    if (cx.compute_ntk) {
      grow_zero(pw.full_t, cx.max_full);
      grow_zero(pw.pin_t, cx.max_pin);
    }
  };
  std::vector<Scratch<T>> scratch(nthreads);
  for (auto& sc : scratch)
    sc.init(cx.max_plane, cx.ls_max, cx.f_max, cx.max_g, cx.compute_ntk, cx.max_taps,
            cx.max_lh2, (long)cx.lh_max * cx.ext_stride);

  // Pair mode (one pair per thread) when there are enough pairs, else rows of one pair.
  auto run_all = [&](long n_items, auto&& pair_of, auto&& store) {
    if (n_items == 0) return;
    const bool pair_mode = nthreads == 1 || n_items >= 2L * nthreads;
    if (pair_mode) {
      const int nt = (int)(n_items < nthreads ? n_items : nthreads);
      std::vector<PairWs<T>>& ws = ws_set;
      std::vector<std::vector<double>> rows(nt, std::vector<double>(2 * (cx.max_plane + 1)));
      for (int k = 0; k < nt; ++k) make_ws(ws[k]);
      parallel_for(nt, n_items, [&](long it, int tid) {
        int a, b;
        bool self;
        pair_of(it, &a, &b, &self);
        const PairOut o = run_pair(cx, a, b, self, ws[tid], scratch, tid, 1, rows[tid]);
        store(it, o);
      });
    } else {
      PairWs<T>& w = ws_set[0];
      make_ws(w);
      std::vector<double> rows(2 * (cx.max_plane + 1));
      for (long it = 0; it < n_items; ++it) {
        int a, b;
        bool self;
        pair_of(it, &a, &b, &self);
        store(it, run_pair(cx, a, b, self, w, scratch, 0, nthreads, rows));
      }
    }
  };

  // Self pairs: variance maps of every segment, diagonal / cov values.
  const bool need_self = sym || args.compute_cov || plan.n_segments > 1;
  std::vector<PairOut> self_out(cx.n_img);
  {
    // Segment-0 maps come straight from the images: V0 = Σ_c x² / C, the δ = 0 plane of the
    // self pair computed by the same code (bit-identical to the planes' q12 on the diagonal, so
    // the self pair's angle there is exactly 0).
    parallel_for(nthreads, cx.n_img, [&](long n, int tid) {
      Scratch<T>& sc = scratch[tid];
      T* v0 = sc.t.data();
      image_plane(cx, (int)n, (int)n, 0, 0, v0);
      if (s0.n_nonlin > 0) compute_maps(cx, 0, (int)n, v0, ls0, sc);
    });
  }
  if (need_self) {
    run_all(
        cx.n_img,
        [&](long it, int* a, int* b, bool* self) {
          *a = *b = (int)it;
          *self = true;
        },
        [&](long it, const PairOut& o) { self_out[it] = o; });
  }

  // Cross pairs.
  const long n_cross = sym ? n1 * (n1 - 1) / 2 : n1 * n2;
  std::vector<int> ia(n_cross), ib(n_cross);
  {
    long p = 0;
    if (sym) {
      for (int a = 0; a < n1; ++a)
        for (int b = a + 1; b < n1; ++b) ia[p] = a, ib[p++] = b;
    } else {
      for (int a = 0; a < n1; ++a)
        for (int b = 0; b < n2; ++b) ia[p] = a, ib[p++] = (int)(n1 + b);
    }
  }
  const bool want_ntk = args.compute_ntk;
  run_all(
      n_cross,
      [&](long it, int* a, int* b, bool* self) {
        *a = ia[it];
        *b = ib[it];
        *self = false;
      },
      [&](long it, const PairOut& o) {
        const long a = ia[it], b = sym ? ib[it] : ib[it] - n1;
        nngp[a * n2 + b] = T(o.nngp);
        if (want_ntk) ntk[a * n2 + b] = T(o.ntk);
        if (sym) {
          nngp[b * n2 + a] = T(o.nngp);
          if (want_ntk) ntk[b * n2 + a] = T(o.ntk);
        }
      });
  if (sym) {
    for (long a = 0; a < n1; ++a) {
      nngp[a * n2 + a] = T(self_out[a].nngp);
      if (want_ntk) ntk[a * n2 + a] = T(self_out[a].ntk);
    }
  }
  if (args.compute_cov) {
    for (long a = 0; a < n1; ++a) cov1[a] = T(self_out[a].nngp);
    for (long b = 0; b < n2; ++b) cov2[b] = T(self_out[sym ? b : n1 + b].nngp);
  }
  return nullptr;
}

const char* run(const RunArgs& args) {
  if (args.dtype == 0) return run_typed<float>(args);
  return run_typed<double>(args);
}

#undef NTF_R

}  // namespace NTF_SIMD_NS
}  // namespace cpu
}  // namespace ntf
