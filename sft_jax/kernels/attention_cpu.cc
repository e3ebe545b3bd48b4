// Native CPU kernel for sft_jax's training attention (forward and backward), an XLA FFI custom call.
//
// Same function as sft_jax.models.attention (causal, segment-block-diagonal, optional sliding window,
// grouped-query): q [B, T, H, d], k/v [B, T, KV, d] (float32 or bfloat16), segment_ids / positions
// [B, T] int32 -> out [B, T, H, d] (input dtype) and the per-query log-sum-exp [B, H, T] (float32).
// Math in float32 (scores, softmax, accumulation), FlashAttention-2 style: 64 x 64 blocks, online
// softmax forward; the backward recomputes each block's probabilities from the log-sum-exp.
//
// Why: on CPU, XLA composes the block loop from many small ops (dots, exp, masks, transposing copies)
// and ran it at ~50 GFLOP/s; here one task per (batch row, KV head) keeps its K / V / Q rows in
// contiguous float32 scratch and runs register-blocked products (GCC vector extensions: AVX-512 where
// -march=native has it, narrower vectors otherwise), on a few std::threads.
//
// Masking: query i sees key j iff seg[i] != 0, seg[j] == seg[i], j <= i and (window == 0 or
// pos[i] - pos[j] < window). A row whose nonzero segment ids form contiguous runs, each id once (what
// packing produces), without a window, is handled by index ranges ([run start, i] per query); any
// other row by the element-wise test. Queries with no visible key get output 0, lse 0, zero gradients.
//
// Built at first use by sft_jax/models/native_attention.py (g++ -O3 -march=native); see there.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstdint>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
#define SFT_HAVE_MXCSR 1
#endif

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int vi16 __attribute__((vector_size(64)));

constexpr int BQ = 64;  // query rows per block
constexpr int BK = 64;  // keys per block
constexpr float NEG = -1e30f;
#ifndef SFT_MR
#define SFT_MR 6  // rows per register block of the products (6 x 4 vectors: 24 accumulators)
#endif

inline v16 ld(const float* p) { return *(const v16u*)p; }
inline void st(float* p, v16 x) { *(v16u*)p = x; }
inline v16 splat(float x) { return v16{} + x; }

inline float bf2f(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f2bf(float f) {  // round to nearest even, as XLA's convert
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline v16 vmax(v16 a, v16 b) { return a > b ? a : b; }

// horizontal max / sum of 16 lanes: a shuffle tree (a lane-by-lane loop compiles to scalar extracts)
inline float hmax(v16 x) {
  x = vmax(x, __builtin_shuffle(x, vi16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  x = vmax(x, __builtin_shuffle(x, vi16{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
  x = vmax(x, __builtin_shuffle(x, vi16{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
  x = vmax(x, __builtin_shuffle(x, vi16{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
  return x[0];
}

inline float hsum(v16 x) {
  x += __builtin_shuffle(x, vi16{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  x += __builtin_shuffle(x, vi16{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  x += __builtin_shuffle(x, vi16{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  x += __builtin_shuffle(x, vi16{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return x[0];
}

// exp for 16 floats (Cephes-style: 2^n * p(r), |rel err| ~ 2e-7); inputs below -80 give exp(-80).
inline v16 vexp(v16 x) {
  x = x < splat(-80.f) ? splat(-80.f) : x;  // exp(-80) ~ 2e-35: stays a normal float
  x = x > splat(88.3f) ? splat(88.3f) : x;
  v16 fx = x * splat(1.44269504088896341f);
  // round to nearest
  v16 n = __builtin_convertvector(__builtin_convertvector(fx + (fx < 0 ? splat(-0.5f) : splat(0.5f)), vi16), v16);
  v16 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  v16 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  vi16 e = (__builtin_convertvector(n, vi16) + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &e, 64);
  return p * scale;
}

// C[m*ldc + n] (+)= sum_k A[m*sam + k*sak] * B[k*ldb + n] for m < M, n < 16*NV, k < K.
template <int NV, int MR>
inline void gemm_rows(int m0, int K, const float* A, long sam, long sak, const float* B, long ldb, float* C,
                      long ldc, bool acc) {
  v16 c[MR][NV];
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < NV; v++) c[r][v] = acc ? ld(C + (m0 + r) * ldc + 16 * v) : v16{};
  const float* a = A + m0 * sam;
  for (int k = 0; k < K; k++) {
    v16 b[NV];
    for (int v = 0; v < NV; v++) b[v] = ld(B + k * ldb + 16 * v);
    for (int r = 0; r < MR; r++) {
      const float s = a[r * sam + k * sak];
      for (int v = 0; v < NV; v++) c[r][v] += s * b[v];
    }
  }
  for (int r = 0; r < MR; r++)
    for (int v = 0; v < NV; v++) st(C + (m0 + r) * ldc + 16 * v, c[r][v]);
}

template <int NV>
inline void gemm_nv(int M, int K, const float* A, long sam, long sak, const float* B, long ldb, float* C, long ldc,
                    bool acc) {
  int m = 0;
#if SFT_MR > 4
  for (; m + SFT_MR <= M; m += SFT_MR) gemm_rows<NV, SFT_MR>(m, K, A, sam, sak, B, ldb, C, ldc, acc);
#endif
  for (; m + 4 <= M; m += 4) gemm_rows<NV, 4>(m, K, A, sam, sak, B, ldb, C, ldc, acc);
  for (; m < M; m++) gemm_rows<NV, 1>(m, K, A, sam, sak, B, ldb, C, ldc, acc);
}

// C[M x N] (+)= A(M x K, strided) * B[K x N] (row-major, ldb); N % 16 == 0.
void gemm(int M, int N, int K, const float* A, long sam, long sak, const float* B, long ldb, float* C, long ldc,
          bool acc) {
  for (int n = 0; n < N; n += 64) {
    int nv = std::min(4, (N - n) / 16);
    switch (nv) {
      case 4: gemm_nv<4>(M, K, A, sam, sak, B + n, ldb, C + n, ldc, acc); break;
      case 3: gemm_nv<3>(M, K, A, sam, sak, B + n, ldb, C + n, ldc, acc); break;
      case 2: gemm_nv<2>(M, K, A, sam, sak, B + n, ldb, C + n, ldc, acc); break;
      default: gemm_nv<1>(M, K, A, sam, sak, B + n, ldb, C + n, ldc, acc); break;
    }
  }
}

struct Dims {
  int B, T, H, KV, D, Tp;
  bool bf16;
};

// rows [T, D] of head `head` of batch row `b` of x [B, T, NH, D] -> dst [Tp, D] f32 (tail zeroed)
void load_rows(const void* x, bool bf16, const Dims& d, int nh, int b, int head, float* dst) {
  for (int t = 0; t < d.T; t++) {
    long off = ((long(b) * d.T + t) * nh + head) * d.D;
    if (bf16) {
      const uint16_t* s = (const uint16_t*)x + off;
      for (int e = 0; e < d.D; e++) dst[t * d.D + e] = bf2f(s[e]);
    } else {
      std::memcpy(dst + t * d.D, (const float*)x + off, sizeof(float) * d.D);
    }
  }
  std::memset(dst + long(d.T) * d.D, 0, sizeof(float) * (d.Tp - d.T) * d.D);
}

void store_rows(void* x, bool bf16, const Dims& d, int nh, int b, int head, const float* src) {
  for (int t = 0; t < d.T; t++) {
    long off = ((long(b) * d.T + t) * nh + head) * d.D;
    if (bf16) {
      uint16_t* o = (uint16_t*)x + off;
      for (int e = 0; e < d.D; e++) o[e] = f2bf(src[t * d.D + e]);
    } else {
      std::memcpy((float*)x + off, src + t * d.D, sizeof(float) * d.D);
    }
  }
}

// Row stride of the transposed [D, Tp] arrays: Tp + 16 floats, so that the 64 rows of a key block
// do not all map to the same few L1 sets (a power-of-two stride halved the speed of the products).
inline long tstride(const Dims& d) { return d.Tp + 16; }

void transpose_rows(const float* rows, const Dims& d, float* dst) {  // [Tp, D] -> [D, tstride]
  const long ld = tstride(d);
  for (int t0 = 0; t0 < d.Tp; t0 += 16)
    for (int e = 0; e < d.D; e++)
      for (int t = t0; t < t0 + 16; t++) dst[e * ld + t] = rows[long(t) * d.D + e];
}

// Per batch row: the visible key range [lo[i], hi[i]) of every query (hi = lo: none), and whether
// the ranges are exact (contiguous runs, no window) or a superset needing the element-wise test.
struct RowMask {
  const int32_t* seg;
  const int32_t* pos;
  int64_t window;
  bool exact;
  std::vector<int> lo, hi;

  RowMask(const int32_t* seg_, const int32_t* pos_, int T, int64_t window_)
      : seg(seg_), pos(pos_), window(window_), lo(T), hi(T) {
    std::vector<int32_t> ids;
    int start = 0;
    for (int t = 0; t < T; t++) {
      if (t == 0 || seg[t] != seg[t - 1]) {
        start = t;
        if (seg[t] != 0) ids.push_back(seg[t]);
      }
      lo[t] = start;
      hi[t] = seg[t] != 0 ? t + 1 : start;
    }
    std::sort(ids.begin(), ids.end());
    bool contiguous = std::adjacent_find(ids.begin(), ids.end()) == ids.end();
    exact = contiguous && window == 0;
    if (!contiguous)  // an id in several runs: any earlier key may match
      for (int t = 0; t < T; t++) lo[t] = 0;
  }

  inline bool visible(int i, int j) const {
    return j >= lo[i] && j < hi[i] && seg[j] == seg[i] && (window == 0 || pos[i] - pos[j] < window);
  }
};

// scores row s[0..BK) of query i against keys kb..kb+BK: scale, mask; returns the row max (NEG if none)
inline float mask_row(float* s, float scale, const RowMask& rm, int i, int kb) {
  const int a = std::max(rm.lo[i] - kb, 0), b = std::min(rm.hi[i] - kb, BK);
  const vi16 iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  v16 mx = splat(NEG);
  for (int v = 0; v < BK / 16; v++) {
    v16 x = ld(s + 16 * v) * scale;
    const vi16 j = iota + 16 * v;
    x = (j >= a) & (j < b) ? x : splat(NEG);
    if (!rm.exact)
      for (int e = 0; e < 16; e++)
        if (x[e] != NEG && !rm.visible(i, kb + 16 * v + e)) x[e] = NEG;
    st(s + 16 * v, x);
    mx = vmax(x, mx);
  }
  return hmax(mx);
}

struct Scratch {  // one per thread, sized by the caller; take() hands out 64-byte-rounded pieces in order
  std::vector<float> buf;
  size_t used = 0;
  float* take(size_t n) {
    size_t off = used;
    used += (n + 15) & ~size_t(15);
    if (used > buf.size()) std::abort();  // a sizing bug: never write past the buffer
    return buf.data() + off;
  }
};

template <class F>
void parallel_tasks(int n, int threads, F f) {
  threads = std::max(1, std::min(threads, n));
  std::atomic<int> next{0};
  auto worker = [&](int tid) {
#ifdef SFT_HAVE_MXCSR
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  // flush denormals to zero (FTZ | DAZ) while this kernel runs
#endif
    for (int i = next++; i < n; i = next++) f(tid, i);
#ifdef SFT_HAVE_MXCSR
    _mm_setcsr(csr);
#endif
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; t++) pool.emplace_back(worker, t);
  worker(0);
  for (auto& th : pool) th.join();
}

void forward_task(const Dims& d, int b, int kh, const void* q, const void* k, const void* v, const RowMask& rm,
                  float scale, void* out, float* lse, Scratch& sc) {
  const int D = d.D, Tp = d.Tp, G = d.H / d.KV;
  sc.used = 0;
  float* kt = sc.take(size_t(D) * tstride(d));
  float* vr = sc.take(size_t(Tp) * D);
  float* qr = sc.take(size_t(Tp) * D);
  float* orow = sc.take(size_t(Tp) * D);
  float* s = sc.take(size_t(BQ) * BK);
  float* acc = sc.take(size_t(BQ) * D);
  load_rows(k, d.bf16, d, d.KV, b, kh, qr);  // k rows, then transposed
  transpose_rows(qr, d, kt);
  load_rows(v, d.bf16, d, d.KV, b, kh, vr);
  float m[BQ], l[BQ];
  for (int gi = 0; gi < G; gi++) {
    const int h = kh * G + gi;
    load_rows(q, d.bf16, d, d.H, b, h, qr);
    float* lse_h = lse + (long(b) * d.H + h) * d.T;
    for (int qb = 0; qb < d.T; qb += BQ) {
      const int M = std::min(BQ, d.T - qb);
      int jlo = d.T, jhi = 0;
      for (int r = 0; r < M; r++)
        if (rm.hi[qb + r] > rm.lo[qb + r]) {
          jlo = std::min(jlo, rm.lo[qb + r]);
          jhi = std::max(jhi, rm.hi[qb + r]);
        }
      std::fill(m, m + M, NEG);
      std::fill(l, l + M, 0.f);
      std::memset(acc, 0, sizeof(float) * M * D);
      for (int kb = jlo / BK * BK; kb < jhi; kb += BK) {
        gemm(M, BK, D, qr + long(qb) * D, D, 1, kt + kb, tstride(d), s, BK, false);
        for (int r = 0; r < M; r++) {
          float* sr = s + r * BK;
          const float mx = std::max(m[r], mask_row(sr, scale, rm, qb + r, kb));
          const float alpha = m[r] == NEG ? 0.f : std::exp(m[r] - mx);
          v16 sum = v16{};
          for (int e = 0; e < BK / 16; e++) {
            v16 x = ld(sr + 16 * e);
            v16 p = vexp(x - mx);
            p = x > splat(NEG * 0.5f) ? p : v16{};
            st(sr + 16 * e, p);
            sum += p;
          }
          l[r] = l[r] * alpha + hsum(sum);
          m[r] = mx;
          if (alpha != 1.f)
            for (int e = 0; e < D; e += 16) st(acc + r * D + e, ld(acc + r * D + e) * alpha);
        }
        gemm(M, D, BK, s, BK, 1, vr + long(kb) * D, D, acc, D, true);
      }
      for (int r = 0; r < M; r++) {
        const bool ok = l[r] > 0.f;
        const float inv = ok ? 1.f / l[r] : 0.f;
        for (int e = 0; e < D; e += 16) st(orow + long(qb + r) * D + e, ld(acc + r * D + e) * inv);
        lse_h[qb + r] = ok ? m[r] + std::log(l[r]) : 0.f;
      }
    }
    store_rows(out, d.bf16, d, d.H, b, h, orow);
  }
}

void backward_task(const Dims& d, int b, int kh, const void* q, const void* k, const void* v, const void* o,
                   const float* lse, const void* dout, const RowMask& rm, float scale, void* dq, void* dk, void* dv,
                   Scratch& sc) {
  const int D = d.D, Tp = d.Tp, G = d.H / d.KV;
  sc.used = 0;
  float* kr = sc.take(size_t(Tp) * D);
  float* kt = sc.take(size_t(D) * tstride(d));
  float* vt = sc.take(size_t(D) * tstride(d));
  float* qr = sc.take(size_t(Tp) * D);
  float* dor = sc.take(size_t(Tp) * D);
  float* dqr = sc.take(size_t(Tp) * D);
  float* dkr = sc.take(size_t(Tp) * D);
  float* dvr = sc.take(size_t(Tp) * D);
  float* p = sc.take(size_t(BQ) * BK);
  float* ds = sc.take(size_t(BQ) * BK);
  float* dsum = sc.take(size_t(Tp));
  load_rows(v, d.bf16, d, d.KV, b, kh, qr);
  transpose_rows(qr, d, vt);
  load_rows(k, d.bf16, d, d.KV, b, kh, kr);
  transpose_rows(kr, d, kt);
  std::memset(dkr, 0, sizeof(float) * Tp * D);
  std::memset(dvr, 0, sizeof(float) * Tp * D);
  for (int gi = 0; gi < G; gi++) {
    const int h = kh * G + gi;
    const float* lse_h = lse + (long(b) * d.H + h) * d.T;
    load_rows(o, d.bf16, d, d.H, b, h, qr);  // o rows: only for D_i = rowsum(dO * O)
    load_rows(dout, d.bf16, d, d.H, b, h, dor);
    for (int t = 0; t < d.T; t++) {
      v16 acc = v16{};
      for (int e = 0; e < D; e += 16) acc += ld(qr + long(t) * D + e) * ld(dor + long(t) * D + e);
      dsum[t] = hsum(acc);
    }
    load_rows(q, d.bf16, d, d.H, b, h, qr);
    std::memset(dqr, 0, sizeof(float) * Tp * D);
    for (int qb = 0; qb < d.T; qb += BQ) {
      const int M = std::min(BQ, d.T - qb);
      int jlo = d.T, jhi = 0;
      for (int r = 0; r < M; r++)
        if (rm.hi[qb + r] > rm.lo[qb + r]) {
          jlo = std::min(jlo, rm.lo[qb + r]);
          jhi = std::max(jhi, rm.hi[qb + r]);
        }
      for (int kb = jlo / BK * BK; kb < jhi; kb += BK) {
        gemm(M, BK, D, qr + long(qb) * D, D, 1, kt + kb, tstride(d), p, BK, false);
        gemm(M, BK, D, dor + long(qb) * D, D, 1, vt + kb, tstride(d), ds, BK, false);
        for (int r = 0; r < M; r++) {
          float* pr = p + r * BK;
          float* dr = ds + r * BK;
          mask_row(pr, scale, rm, qb + r, kb);
          const float li = lse_h[qb + r], di = dsum[qb + r];
          for (int e = 0; e < BK; e += 16) {
            v16 x = ld(pr + e);
            v16 pe = vexp(x - li);
            pe = x > splat(NEG * 0.5f) ? pe : v16{};
            st(pr + e, pe);
            st(dr + e, pe * (ld(dr + e) - di) * scale);
          }
        }
        // dV[kb..] += P^T dO, dK[kb..] += dS^T Q, dQ[qb..] += dS K
        gemm(BK, D, M, p, 1, BK, dor + long(qb) * D, D, dvr + long(kb) * D, D, true);
        gemm(BK, D, M, ds, 1, BK, qr + long(qb) * D, D, dkr + long(kb) * D, D, true);
        gemm(M, D, BK, ds, BK, 1, kr + long(kb) * D, D, dqr + long(qb) * D, D, true);
      }
    }
    store_rows(dq, d.bf16, d, d.H, b, h, dqr);
  }
  store_rows(dk, d.bf16, d, d.KV, b, kh, dkr);
  store_rows(dv, d.bf16, d, d.KV, b, kh, dvr);
}

ffi::Error check(const ffi::AnyBuffer& q, const ffi::AnyBuffer& k, const ffi::AnyBuffer& v, Dims* d) {
  auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4) return ffi::Error::InvalidArgument("sft_attention: q/k/v must be 4-D");
  if (q.element_type() != k.element_type() || q.element_type() != v.element_type())
    return ffi::Error::InvalidArgument("sft_attention: q, k, v dtypes differ");
  if (q.element_type() != ffi::DataType::F32 && q.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("sft_attention: dtype must be float32 or bfloat16");
  d->B = int(qd[0]);
  d->T = int(qd[1]);
  d->H = int(qd[2]);
  d->D = int(qd[3]);
  d->KV = int(kd[2]);
  if (d->D % 16 != 0 || d->H % d->KV != 0 || kd[0] != qd[0] || kd[1] != qd[1] || kd[3] != qd[3])
    return ffi::Error::InvalidArgument("sft_attention: unsupported shapes");
  d->Tp = (d->T + BK - 1) / BK * BK;
  d->bf16 = q.element_type() == ffi::DataType::BF16;
  return ffi::Error::Success();
}

// Builds the per-row masks and per-thread scratch (`floats` each), then runs f(b, kh, mask, scratch) for every
// (batch row, KV head) on up to `threads` threads.
template <class F>
ffi::Error run_tasks(const Dims& d, const ffi::Buffer<ffi::S32>& seg, const ffi::Buffer<ffi::S32>& pos,
                     int64_t window, int64_t threads, size_t floats, F f) {
  for (const auto* x : {&seg, &pos}) {
    auto dims = x->dimensions();
    if (dims.size() != 2 || dims[0] != d.B || dims[1] != d.T)
      return ffi::Error::InvalidArgument("sft_attention: segment_ids / positions must be [B, T]");
  }
  std::vector<RowMask> rows;
  rows.reserve(d.B);
  for (int b = 0; b < d.B; b++)
    rows.emplace_back(seg.typed_data() + long(b) * d.T, pos.typed_data() + long(b) * d.T, d.T, window);
  const int nthreads = std::max(1, std::min<int>(int(threads), d.B * d.KV));
  std::vector<Scratch> sc(nthreads);
  for (auto& s : sc) s.buf.resize(floats);
  parallel_tasks(d.B * d.KV, nthreads, [&](int tid, int i) { f(i / d.KV, i % d.KV, rows[i / d.KV], sc[tid]); });
  return ffi::Error::Success();
}

ffi::Error FwdImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> seg,
                   ffi::Buffer<ffi::S32> pos, ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::Buffer<ffi::F32>> lse,
                   float scale, int64_t window, int64_t threads) {
  Dims d;
  if (auto e = check(q, k, v, &d); e.failure()) return e;
  const size_t floats = size_t(4) * (d.Tp + 16) * d.D + 2 * BQ * std::max(BK, d.D) + 64 * 6;
  return run_tasks(d, seg, pos, window, threads, floats, [&](int b, int kh, const RowMask& rm, Scratch& sc) {
    forward_task(d, b, kh, q.untyped_data(), k.untyped_data(), v.untyped_data(), rm, scale, out->untyped_data(),
                 lse->typed_data(), sc);
  });
}

ffi::Error BwdImpl(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::Buffer<ffi::S32> seg,
                   ffi::Buffer<ffi::S32> pos, ffi::AnyBuffer o, ffi::Buffer<ffi::F32> lse, ffi::AnyBuffer dout,
                   ffi::Result<ffi::AnyBuffer> dq, ffi::Result<ffi::AnyBuffer> dk, ffi::Result<ffi::AnyBuffer> dv,
                   float scale, int64_t window, int64_t threads) {
  Dims d;
  if (auto e = check(q, k, v, &d); e.failure()) return e;
  if (o.element_type() != q.element_type() || dout.element_type() != q.element_type())
    return ffi::Error::InvalidArgument("sft_attention_bwd: out / dout dtype differs from q");
  const size_t floats = size_t(8) * (d.Tp + 16) * d.D + 2 * BQ * BK + d.Tp + 64 * 12;
  return run_tasks(d, seg, pos, window, threads, floats, [&](int b, int kh, const RowMask& rm, Scratch& sc) {
    backward_task(d, b, kh, q.untyped_data(), k.untyped_data(), v.untyped_data(), o.untyped_data(), lse.typed_data(),
                  dout.untyped_data(), rm, scale, dq->untyped_data(), dk->untyped_data(), dv->untyped_data(), sc);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SftAttentionFwd, FwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SftAttentionBwd, BwdImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("threads"));
