// Fused causal attention for CPU training in bf16 (forward and backward), AVX512-BF16.
//
// One head at a time, everything for that head in L1/L2: query rows in blocks of BQ; per block the
// scores S = Q K^T over the keys it can see (causal), softmax, O = P V. Backward recomputes P from
// the saved log-sum-exp (flash-attention style) and accumulates dK and dV over the blocks in fp32.
//
// Every product is one micro-GEMM, C[m][n] (+)= sum_p A(m, p) . B(p, n), on bf16 *pairs*: the
// AVX512-BF16 dot product vdpbf16ps multiplies two bf16 pairs and adds both products into an fp32
// lane. A(m, p) is the pair (A[m][2p], A[m][2p+1]) at A + m*sam + p*sap; B is "pair-packed",
// B(p, n..n+15) = 32 bf16 at B + p*sbp + 2n. Operands whose reduction index runs down their rows
// (K for S, V for O, ...) are packed once per head by interleaving two rows; P and dS are written by
// the softmax straight into the layouts their GEMMs read. Products of bf16 are exact in fp32, so S and
// dP carry fp32 accuracy; P and dS are rounded to bf16 for the next products, as torch's flash kernel
// does.
//
// Shapes: q [b, h, sq, d], k and v [b, h, sk, d] bf16 (any strides with a unit last stride), d % 16 == 0.
// Without q_pos, sq == sk and query i sees keys 0..i. With q_pos (int64 [b, sq]) query i of batch row
// bi sees keys 0..q_pos[bi][i]: the queries of chosen positions only (a last layer whose other rows
// nobody reads). Outputs are laid out [b, s, h, d] in memory (the model's
// out.transpose(1, 2).reshape is a view).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

using bf16 = uint16_t;
constexpr int BQ = 64;  // query rows per block

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
}

// ---- micro-GEMM ----------------------------------------------------------------------------------

template <int MR, int NV>
inline void gemm_tile(int64_t k2, const bf16* a, int64_t sam, int64_t sap, const bf16* b, int64_t sbp,
                      float* c, int64_t ldc, bool accumulate) {
  __m512 acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v)
      acc[m][v] = accumulate ? _mm512_loadu_ps(c + m * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t p = 0; p < k2; ++p) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + p * sbp + 32 * v);
    for (int m = 0; m < MR; ++m) {
      int32_t pair;
      std::memcpy(&pair, a + m * sam + p * sap, 4);
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], av, bv[v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c + m * ldc + 16 * v, acc[m][v]);
}

template <int MR>
inline void gemm_rows(int64_t n, int64_t k2, const bf16* a, int64_t sam, int64_t sap, const bf16* b,
                      int64_t sbp, float* c, int64_t ldc, bool accumulate) {
  int64_t n0 = 0;
  for (; n0 + 64 <= n; n0 += 64) gemm_tile<MR, 4>(k2, a, sam, sap, b + 2 * n0, sbp, c + n0, ldc, accumulate);
  switch ((n - n0) / 16) {
    case 3: gemm_tile<MR, 3>(k2, a, sam, sap, b + 2 * n0, sbp, c + n0, ldc, accumulate); break;
    case 2: gemm_tile<MR, 2>(k2, a, sam, sap, b + 2 * n0, sbp, c + n0, ldc, accumulate); break;
    case 1: gemm_tile<MR, 1>(k2, a, sam, sap, b + 2 * n0, sbp, c + n0, ldc, accumulate); break;
    default: break;
  }
}

// C[m][0:n] (+)= sum_{p < k2} A(m, p) . B(p, 0:n) for m < rows; n a multiple of 16.
// need (optional, per row): only the first need[m] columns of row m matter (limit_k = false: C's
// columns from there on, rounded up to 16, are left unwritten) or A(m, p) is zero from column need[m]
// on (limit_k = true: the sum stops there). Each tile of rows stops at its longest row: the causal
// triangle is skipped down to tiles of 6 x 16.
void gemm(int64_t rows, int64_t n, int64_t k2, const bf16* a, int64_t sam, int64_t sap, const bf16* b,
          int64_t sbp, float* c, int64_t ldc, bool accumulate, const int64_t* need = nullptr,
          bool limit_k = false) {
  constexpr int MR = 6;
  for (int64_t m0 = 0; m0 < rows; m0 += MR) {
    const int64_t mr = std::min<int64_t>(MR, rows - m0);
    int64_t nt = n, kt = k2;
    if (need) {
      const int64_t longest = *std::max_element(need + m0, need + m0 + mr);
      if (limit_k) kt = std::min(k2, (longest + 1) / 2);
      else nt = std::min(n, round_up(longest, 16));
    }
    const bf16* at = a + m0 * sam;
    float* ct = c + m0 * ldc;
    switch (mr) {
      case 6: gemm_rows<6>(nt, kt, at, sam, sap, b, sbp, ct, ldc, accumulate); break;
      case 5: gemm_rows<5>(nt, kt, at, sam, sap, b, sbp, ct, ldc, accumulate); break;
      case 4: gemm_rows<4>(nt, kt, at, sam, sap, b, sbp, ct, ldc, accumulate); break;
      case 3: gemm_rows<3>(nt, kt, at, sam, sap, b, sbp, ct, ldc, accumulate); break;
      case 2: gemm_rows<2>(nt, kt, at, sam, sap, b, sbp, ct, ldc, accumulate); break;
      default: gemm_rows<1>(nt, kt, at, sam, sap, b, sbp, ct, ldc, accumulate); break;
    }
  }
}

// ---- packing ---------------------------------------------------------------------------------------

// Interleave 16 bf16 of row x with 16 of row y: (x0, y0, x1, y1, ...), one pair per fp32 lane.
inline __m512i interleave(__m256i x, __m256i y) {
  static const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                              39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  return _mm512_permutex2var_epi16(_mm512_castsi256_si512(x), idx, _mm512_castsi256_si512(y));
}

// dst(p, 0:ncols) = rows 2p and 2p+1 of src interleaved, for p < ceil(rows / 2); a missing odd row is
// zero. ncols is a multiple of 16.
void pack_row_pairs(const bf16* src, int64_t ld, int64_t rows, int64_t ncols, bf16* dst, int64_t sbp) {
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t r = 0; r < rows; r += 2) {
    const bf16* x = src + r * ld;
    const bf16* y = r + 1 < rows ? x + ld : nullptr;
    bf16* out = dst + (r / 2) * sbp;
    for (int64_t c = 0; c < ncols; c += 16) {
      const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + c));
      const __m256i yv = y ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y + c)) : zero;
      _mm512_storeu_si512(out + 2 * c, interleave(xv, yv));
    }
  }
}

// r[t] = column t of the 16 x 16 matrix of 32-bit words whose row i is r[i].
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // within 128-bit lanes: word pairs of row pairs
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // lane L of u[4g + e]: word 4L + e of rows 4g .. 4g + 3
    u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  for (int e = 0; e < 4; ++e) {  // 4 x 4 transpose of 128-bit lanes across u[e], u[4 + e], u[8 + e], u[12 + e]
    const __m512i p0 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x44), p1 = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xEE);
    const __m512i p2 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x44), p3 = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xEE);
    r[e] = _mm512_shuffle_i32x4(p0, p2, 0x88);
    r[4 + e] = _mm512_shuffle_i32x4(p0, p2, 0xDD);
    r[8 + e] = _mm512_shuffle_i32x4(p1, p3, 0x88);
    r[12 + e] = _mm512_shuffle_i32x4(p1, p3, 0xDD);
  }
}

// dst(p, j) = (src[j][2p], src[j][2p+1]) for j < rows (the pair-packed transpose), zero for
// rows <= j < ncap; d % 16 == 0. 16 x 16 blocks of 32-bit words transposed in registers.
void pack_transposed(const bf16* src, int64_t ld, int64_t rows, int64_t d, bf16* dst, int64_t ncap) {
  const int64_t sbp = 2 * ncap, words = d / 2;
  for (int64_t j0 = 0; j0 < ncap; j0 += 16)
    for (int64_t p0 = 0; p0 < words; p0 += 16) {
      const int64_t w = std::min<int64_t>(16, words - p0);
      __m512i r[16];
      for (int64_t i = 0; i < 16; ++i)
        r[i] = j0 + i < rows ? _mm512_maskz_loadu_epi32(tail_mask(w), src + (j0 + i) * ld + 2 * p0)
                             : _mm512_setzero_si512();
      transpose16(r);
      for (int64_t t = 0; t < w; ++t) _mm512_storeu_si512(dst + (p0 + t) * sbp + 2 * j0, r[t]);
    }
}

// ---- elementwise -------------------------------------------------------------------------------------

// e^x for x <= 0 (softmax arguments), ~1e-7 relative: 2^n * e^(f ln 2) with |f| <= 1/2, degree-7 Taylor.
inline __m512 exp_ps(__m512 x) {
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 y = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);  // p * 2^n, 0 for n below the denormal range
}

inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

// P[j] = exp(scale * S[j] - lse) for j < n in place; returns nothing. Columns n.. are zeroed up to ncap.
inline void probs_in_place(float* s, int64_t n, int64_t ncap, float scale, float lse) {
  const __m512 sc = _mm512_set1_ps(scale), off = _mm512_set1_ps(-lse);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 x = _mm512_maskz_loadu_ps(k, s + j);
    _mm512_mask_storeu_ps(s + j, k, exp_ps(_mm512_fmadd_ps(x, sc, off)));
  }
  std::fill(s + n, s + ncap, 0.f);
}

// Row softmax of scale * S[0:n] into bf16 dst[0:ncap] (zero from n on; S is overwritten with the
// unnormalised exponentials); returns the log-sum-exp.
inline float softmax_to_bf16(float* s, int64_t n, int64_t ncap, float scale, bf16* dst) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t j = 0; j < n; j += 16)
    mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tail_mask(n - j), s + j));
  const float m = _mm512_reduce_max_ps(mx) * scale;
  const __m512 sc = _mm512_set1_ps(scale), off = _mm512_set1_ps(-m);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 k = tail_mask(n - j);
    const __m512 e = _mm512_maskz_mov_ps(k, exp_ps(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, s + j), sc, off)));
    sum = _mm512_add_ps(sum, e);
    _mm512_storeu_ps(s + j, e);  // s has ncap >= round_up(n, 16) columns
  }
  const float total = _mm512_reduce_add_ps(sum);
  const __m512 inv = _mm512_set1_ps(1.f / total);
  for (int64_t j = 0; j < ncap; j += 16) {
    const __mmask16 k = j < n ? tail_mask(n - j) : __mmask16(0);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), to_bf16(_mm512_maskz_mul_ps(k, _mm512_loadu_ps(s + j), inv)));
  }
  return m + std::log(total);
}

// bf16 rows of an fp32 [rows][ncols] buffer (ncols % 16 == 0) into dst (row stride ldd).
void rows_to_bf16(const float* src, int64_t ld, int64_t rows, int64_t ncols, bf16* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < ncols; c += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + r * ldd + c), to_bf16(_mm512_loadu_ps(src + r * ld + c)));
}

// Pair-packed bf16 of an fp32 [rows][ncols] buffer: dst(p, j) = (src[2p][j], src[2p+1][j]).
void pack_rows_to_bf16(const float* src, int64_t ld, int64_t rows, int64_t ncols, bf16* dst, int64_t sbp) {
  for (int64_t r = 0; r < rows; r += 2)
    for (int64_t c = 0; c < ncols; c += 16) {
      const __m256i x = to_bf16(_mm512_loadu_ps(src + r * ld + c));
      const __m256i y = r + 1 < rows ? to_bf16(_mm512_loadu_ps(src + (r + 1) * ld + c)) : _mm256_setzero_si256();
      _mm512_storeu_si512(dst + (r / 2) * sbp + 2 * c, interleave(x, y));
    }
}

// ---- per-head kernels ----------------------------------------------------------------------------------

// One head: sq query rows at key positions pos[i] (query i sees keys 0..pos[i]; pos == nullptr means
// pos[i] = i, plain causal self-attention), sk keys.
struct Head {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  int64_t ldq, ldk, ldv;  // row strides (elements)
  int64_t sq, sk, d;
  const int64_t* pos;
  int64_t last(int64_t i) const { return pos ? pos[i] : i; }  // the last key query i sees
  int64_t keys(int64_t r0, int64_t r1) const {  // keys seen by any of the query rows [r0, r1)
    if (!pos) return r1;
    int64_t m = 0;
    for (int64_t i = r0; i < r1; ++i) m = std::max(m, pos[i] + 1);
    return m;
  }
};

struct Scratch {
  std::vector<float> s, dp, acc_k, acc_v, tmp;
  std::vector<bf16> kt, vt, kp, vp, a, apk, bpk;
  std::vector<int64_t> need;  // keys each query row of the block sees

  const int64_t* needs(const Head& hd, int64_t r0, int64_t rows) {
    need.resize(rows);
    for (int64_t i = 0; i < rows; ++i) need[i] = hd.last(r0 + i) + 1;
    return need.data();
  }
};

void head_forward(const Head& hd, float scale, bf16* out, int64_t ldo, float* lse, Scratch& w) {
  const int64_t d = hd.d, sk = hd.keys(0, hd.sq), np = round_up(sk, 16);
  w.kt.resize(d * np);
  w.vp.resize(round_up(sk, 2) * d);
  w.s.resize(BQ * np);
  w.a.resize(BQ * np);
  w.tmp.resize(BQ * d);
  pack_transposed(hd.k, hd.ldk, sk, d, w.kt.data(), np);   // B for S = Q K^T
  pack_row_pairs(hd.v, hd.ldv, sk, d, w.vp.data(), 2 * d);  // B for O = P V
  for (int64_t r0 = 0; r0 < hd.sq; r0 += BQ) {
    const int64_t rows = std::min<int64_t>(BQ, hd.sq - r0), keys = hd.keys(r0, r0 + rows);
    const int64_t ncols = round_up(keys, 16), kpairs = (keys + 1) / 2;
    const int64_t* need = w.needs(hd, r0, rows);
    gemm(rows, ncols, d / 2, hd.q + r0 * hd.ldq, hd.ldq, 2, w.kt.data(), 2 * np, w.s.data(), np, false, need);
    for (int64_t i = 0; i < rows; ++i)
      lse[r0 + i] = softmax_to_bf16(w.s.data() + i * np, need[i], ncols, scale, w.a.data() + i * np);
    gemm(rows, d, kpairs, w.a.data(), np, 2, w.vp.data(), 2 * d, w.tmp.data(), d, false, need, true);
    rows_to_bf16(w.tmp.data(), d, rows, d, out + r0 * ldo, ldo);
  }
}

void head_backward(const Head& hd, const bf16* g, int64_t ldg, const float* lse, float scale, bf16* dq,
                   int64_t ldq, bf16* dk, bf16* dv, int64_t ldkv, Scratch& w) {
  const int64_t d = hd.d, sk = hd.keys(0, hd.sq), np = round_up(sk, 16);
  w.kt.resize(d * np);
  w.vt.resize(d * np);
  w.kp.resize(round_up(sk, 2) * d);
  w.s.resize(BQ * np);
  w.dp.resize(BQ * np);
  w.a.resize(BQ * np);
  w.apk.resize(BQ * np);
  w.bpk.resize(BQ * d);
  w.tmp.resize(BQ * d);
  w.acc_k.assign(np * d, 0.f);
  w.acc_v.assign(np * d, 0.f);
  pack_transposed(hd.k, hd.ldk, sk, d, w.kt.data(), np);   // B for S = Q K^T
  pack_transposed(hd.v, hd.ldv, sk, d, w.vt.data(), np);   // B for dP = dO V^T
  pack_row_pairs(hd.k, hd.ldk, sk, d, w.kp.data(), 2 * d);  // B for dQ = dS K
  for (int64_t r0 = 0; r0 < hd.sq; r0 += BQ) {
    const int64_t rows = std::min<int64_t>(BQ, hd.sq - r0), keys = hd.keys(r0, r0 + rows);
    const int64_t ncols = round_up(keys, 16), kpairs = (keys + 1) / 2, rpairs = (rows + 1) / 2;
    const bf16* qb = hd.q + r0 * hd.ldq;
    const bf16* gb = g + r0 * ldg;
    const int64_t* need = w.needs(hd, r0, rows);
    gemm(rows, ncols, d / 2, qb, hd.ldq, 2, w.kt.data(), 2 * np, w.s.data(), np, false, need);
    gemm(rows, ncols, d / 2, gb, ldg, 2, w.vt.data(), 2 * np, w.dp.data(), np, false, need);
    for (int64_t i = 0; i < rows; ++i) {
      float* p = w.s.data() + i * np;
      float* dp = w.dp.data() + i * np;
      const int64_t n = need[i];
      probs_in_place(p, n, ncols, scale, lse[r0 + i]);
      // delta_i = sum_j P_ij dP_ij (= dO_i . O_i, but from the fp32 P and dP rather than the bf16 O, so
      // the rows of dS sum to zero as softmax's Jacobian says); dS = P (dP - delta) scale, zero from n
      __m512 acc = _mm512_setzero_ps();
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 k = tail_mask(n - j);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, p + j), _mm512_maskz_loadu_ps(k, dp + j), acc);
      }
      const __m512 delta = _mm512_set1_ps(_mm512_reduce_add_ps(acc)), sc = _mm512_set1_ps(scale);
      for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 k = tail_mask(n - j);
        const __m512 ds = _mm512_mul_ps(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + j),
                                                      _mm512_sub_ps(_mm512_maskz_loadu_ps(k, dp + j), delta)), sc);
        _mm512_mask_storeu_ps(dp + j, k, ds);
      }
      std::fill(dp + n, dp + ncols, 0.f);
    }
    // dQ = dS K
    rows_to_bf16(w.dp.data(), np, rows, ncols, w.a.data(), np);
    gemm(rows, d, kpairs, w.a.data(), np, 2, w.kp.data(), 2 * d, w.tmp.data(), d, false, need, true);
    rows_to_bf16(w.tmp.data(), d, rows, d, dq + r0 * ldq, ldq);
    // dV[0:keys] += P^T dO, dK[0:keys] += dS^T Q (A = P, dS pair-packed over rows; B = dO, Q rows)
    pack_rows_to_bf16(w.s.data(), np, rows, ncols, w.apk.data(), 2 * np);
    pack_row_pairs(gb, ldg, rows, d, w.bpk.data(), 2 * d);
    gemm(keys, d, rpairs, w.apk.data(), 2, 2 * np, w.bpk.data(), 2 * d, w.acc_v.data(), d, true);
    pack_rows_to_bf16(w.dp.data(), np, rows, ncols, w.apk.data(), 2 * np);
    pack_row_pairs(qb, hd.ldq, rows, d, w.bpk.data(), 2 * d);
    gemm(keys, d, rpairs, w.apk.data(), 2, 2 * np, w.bpk.data(), 2 * d, w.acc_k.data(), d, true);
  }
  rows_to_bf16(w.acc_k.data(), d, sk, d, dk, ldkv);
  rows_to_bf16(w.acc_v.data(), d, sk, d, dv, ldkv);
  const __m256i zero = _mm256_setzero_si256();  // keys no query sees get no gradient
  for (int64_t j = sk; j < hd.sk; ++j)
    for (int64_t c = 0; c < d; c += 16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dk + j * ldkv + c), zero);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dv + j * ldkv + c), zero);
    }
}

// ---- ops -------------------------------------------------------------------------------------------------

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16 && t.dim() == 4 && t.stride(3) == 1,
              name, ": expected a CPU bf16 [b, h, s, d] tensor with unit last stride");
}

const bf16* ptr(const at::Tensor& t) { return reinterpret_cast<const bf16*>(t.data_ptr<at::BFloat16>()); }

at::Tensor empty_bshd(const at::Tensor& like) {
  // [b, s, h, d] memory seen as [b, h, s, d]
  return at::empty({like.size(0), like.size(2), like.size(1), like.size(3)}, like.options()).transpose(1, 2);
}

// Checks shapes and returns the query positions ([b, sq] int64, contiguous) or an undefined tensor.
at::Tensor check_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const std::optional<at::Tensor>& q_pos, double scale) {
  check(q, "q"), check(k, "k"), check(v, "v");
  TORCH_CHECK(scale > 0, "scale must be positive (the softmax takes its row maximum before scaling)");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3)
                  && q.size(3) % 16 == 0, "q [b, h, sq, d], k and v [b, h, sk, d], d % 16 == 0");
  if (!q_pos) {
    TORCH_CHECK(q.size(2) == k.size(2), "without q_pos, q and k need equal lengths (causal self-attention)");
    return at::Tensor();
  }
  const at::Tensor pos = q_pos->contiguous();
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.dim() == 2 && pos.size(0) == q.size(0) && pos.size(1) == q.size(2),
              "q_pos: int64 [b, sq]");
  TORCH_CHECK(pos.numel() == 0 || (pos.min().item<int64_t>() >= 0 && pos.max().item<int64_t>() < k.size(2)),
              "q_pos outside the keys");
  return pos;
}

Head head_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos, int64_t bi,
             int64_t hi) {
  return Head{ptr(q) + bi * q.stride(0) + hi * q.stride(1), ptr(k) + bi * k.stride(0) + hi * k.stride(1),
              ptr(v) + bi * v.stride(0) + hi * v.stride(1), q.stride(2), k.stride(2), v.stride(2),
              q.size(2), k.size(2), q.size(3), pos.defined() ? pos.data_ptr<int64_t>() + bi * q.size(2) : nullptr};
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           double scale, const std::optional<at::Tensor>& q_pos) {
  const at::Tensor pos = check_all(q, k, v, q_pos, scale);
  const int64_t h = q.size(1), sq = q.size(2);
  at::Tensor out = empty_bshd(q);
  at::Tensor lse = at::empty({q.size(0), h, sq}, q.options().dtype(at::kFloat));
  bf16* o = reinterpret_cast<bf16*>(out.data_ptr<at::BFloat16>());
  float* l = lse.data_ptr<float>();
  at::parallel_for(0, q.size(0) * h, 1, [&](int64_t begin, int64_t end) {
    Scratch w;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / h, hi = bh % h;
      head_forward(head_of(q, k, v, pos, bi, hi), static_cast<float>(scale),
                   o + bi * out.stride(0) + hi * out.stride(1), out.stride(2), l + bh * sq, w);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& g_in, const at::Tensor& q,
                                                        const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& lse_in, double scale,
                                                        const std::optional<at::Tensor>& q_pos) {
  const at::Tensor pos = check_all(q, k, v, q_pos, scale);
  const at::Tensor g = g_in.stride(3) == 1 ? g_in : g_in.contiguous();
  check(g, "grad");
  const at::Tensor lse = lse_in.contiguous();
  const int64_t h = q.size(1), sq = q.size(2);
  at::Tensor dq = empty_bshd(q), dk = empty_bshd(k), dv = empty_bshd(k);
  auto mut = [](at::Tensor& t, int64_t bi, int64_t hi) {
    return reinterpret_cast<bf16*>(t.data_ptr<at::BFloat16>()) + bi * t.stride(0) + hi * t.stride(1);
  };
  at::parallel_for(0, q.size(0) * h, 1, [&](int64_t begin, int64_t end) {
    Scratch w;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / h, hi = bh % h;
      head_backward(head_of(q, k, v, pos, bi, hi), ptr(g) + bi * g.stride(0) + hi * g.stride(1), g.stride(2),
                    lse.data_ptr<float>() + bh * sq, static_cast<float>(scale), mut(dq, bi, hi), dq.stride(2),
                    mut(dk, bi, hi), mut(dv, bi, hi), dk.stride(2), w);
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(trident_cpu, m) {
  m.def("causal_attention_forward(Tensor q, Tensor k, Tensor v, float scale, Tensor? q_pos=None) -> (Tensor, Tensor)");
  m.def("causal_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor lse, float scale, "
        "Tensor? q_pos=None) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(trident_cpu, CPU, m) {
  m.impl("causal_attention_forward", &forward);
  m.impl("causal_attention_backward", &backward);
}
