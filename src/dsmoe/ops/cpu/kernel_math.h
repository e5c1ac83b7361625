// Shared arithmetic of dsmoe's CPU decode kernels (decode_kernels.cpp: the operators; decode_step.cpp: the whole
// MLA decode step). Everything here is inline: each translation unit gets the same code, so the operators and the
// whole step round and sum in the same order (tests/test_cpu_kernels.py holds them bitwise equal).
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DSMOE_AVX2 1
#endif

namespace dsmoe_cpu {

constexpr int64_t kMaxTokens = 8;

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

#ifdef DSMOE_AVX2
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return bf16_to_float(*p); }

// out[m * out_stride] = dot(w[0:K], x[m * K : (m + 1) * K]) for m < M: one weight row against M fp32 tokens.
template <int M, typename W>
inline void dot_row(const W* w, const float* x, int64_t K, float* out, int64_t out_stride) {
  int64_t k = 0;
#ifdef DSMOE_AVX2
  if constexpr (M == 1) {  // one token: four independent chains hide the FMA latency
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + 32 <= K; k += 32) {
      a0 = _mm256_fmadd_ps(load8(w + k), load8(x + k), a0);
      a1 = _mm256_fmadd_ps(load8(w + k + 8), load8(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(load8(w + k + 16), load8(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(load8(w + k + 24), load8(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load8(w + k), load8(x + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k) s += load1(w + k) * x[k];
    out[0] = s;
    return;
  } else {
    __m256 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) {
      __m256 wv = load8(w + k);
      for (int m = 0; m < M; ++m) acc[m] = _mm256_fmadd_ps(wv, load8(x + m * K + k), acc[m]);
    }
    for (int m = 0; m < M; ++m) {
      float s = hsum(acc[m]);
      for (int64_t j = k; j < K; ++j) s += load1(w + j) * x[m * K + j];
      out[m * out_stride] = s;
    }
    return;
  }
#endif
  float acc[M] = {};
  for (; k < K; ++k) {
    float wv = load1(w + k);
    for (int m = 0; m < M; ++m) acc[m] += wv * x[m * K + k];
  }
  for (int m = 0; m < M; ++m) out[m * out_stride] = acc[m];
}

// Rows [n0, n1) of w (N, K) against M tokens x (M, K) -> out (M, out_stride), column n.
template <typename W>
void dot_rows(int64_t M, const W* w, const float* x, int64_t K, int64_t n0, int64_t n1, float* out,
              int64_t out_stride) {
  for (int64_t n = n0; n < n1; ++n) {
    const W* row = w + n * K;
    switch (M) {
      case 1: dot_row<1>(row, x, K, out + n, out_stride); break;
      case 2: dot_row<2>(row, x, K, out + n, out_stride); break;
      case 3: dot_row<3>(row, x, K, out + n, out_stride); break;
      case 4: dot_row<4>(row, x, K, out + n, out_stride); break;
      case 5: dot_row<5>(row, x, K, out + n, out_stride); break;
      case 6: dot_row<6>(row, x, K, out + n, out_stride); break;
      case 7: dot_row<7>(row, x, K, out + n, out_stride); break;
      default: dot_row<8>(row, x, K, out + n, out_stride); break;
    }
  }
}

// The same for any number of tokens M, in blocks of kMaxTokens (each block re-reads the rows, from cache).
template <typename W>
void dot_rows_blocked(int64_t M, const W* w, const float* x, int64_t K, int64_t n0, int64_t n1, float* out,
                      int64_t out_stride) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxTokens)
    dot_rows(std::min(kMaxTokens, M - m0), w, x + m0 * K, K, n0, n1, out + m0 * out_stride, out_stride);
}

// y[0:N] += a * w[0:N] (fp32 accumulator y, weights fp32 or bf16).
template <typename W>
inline void axpy(float a, const W* w, float* y, int64_t N) {
  int64_t n = 0;
#ifdef DSMOE_AVX2
  const __m256 av = _mm256_set1_ps(a);
  for (; n + 8 <= N; n += 8) _mm256_storeu_ps(y + n, _mm256_fmadd_ps(av, load8(w + n), _mm256_loadu_ps(y + n)));
#endif
  for (; n < N; ++n) y[n] += a * load1(w + n);
}

inline float silu(float v) { return v / (1.0f + std::exp(-v)); }

// Routed experts' weight rows are fetched ahead as non-temporal (prefetchnta): read once per step, they then pass
// through without evicting the weights every step reads (attention, dense and shared experts, the head) from the
// L2 and L3 caches. With bf16 weights those fit the benchmark CPU's 32 MiB L3 and decoding got ~12% faster
// (fp32: the same speed; BENCHMARKS.md). kAhead: rows ahead of the one being read.
constexpr int64_t kAhead = 2;
inline void prefetch_once(const void* p, int64_t bytes) {
#ifdef DSMOE_AVX2
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(c + o, _MM_HINT_NTA);
#else
  (void)p, (void)bytes;
#endif
}

// Rows per parallel task: enough work (>= ~32 KiB of weights) that the thread pool's hand-off is noise.
inline int64_t grain_rows(int64_t K, int64_t itemsize) { return std::max<int64_t>(1, (32768 / itemsize) / K); }


// fn(const W* w) with W the weight's element type.
template <typename Fn>
void with_weight(const at::Tensor& w, Fn fn) {
  if (w.scalar_type() == at::kFloat) {
    fn(w.data_ptr<float>());
  } else {
    fn(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()));
  }
}

// exp(v) for v <= 0 (softmax arguments after subtracting the maximum): 2^(v log2 e) split into an integer
// power of two (exponent bits) and a degree-6 polynomial on [-0.5, 0.5] (relative error ~2e-7); -inf -> 0.
#ifdef DSMOE_AVX2
inline __m256 exp_nonpositive(__m256 v) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  __m256 t = _mm256_mul_ps(_mm256_max_ps(v, lo), _mm256_set1_ps(1.44269504088896341f));
  __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, n), _mm256_set1_ps(0.693147180559945f));  // e^f, |f| <= ln2 / 2
  __m256 p = _mm256_set1_ps(1.0f / 720);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
  return _mm256_and_ps(r, _mm256_cmp_ps(v, lo, _CMP_GE_OQ));  // below -87 (and -inf): 0
}
#endif

// sc[j] = exp(sc[j] - top) for j < n; returns their sum.
inline float exp_shifted(float* sc, int64_t n, float top) {
  float total = 0.0f;
  int64_t j = 0;
#ifdef DSMOE_AVX2
  const __m256 t = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(sc + j), t));
    _mm256_storeu_ps(sc + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  total = hsum(acc);
#endif
  for (; j < n; ++j) {
    sc[j] = std::exp(sc[j] - top);
    total += sc[j];
  }
  return total;
}

// out[0:C] += sum_j p[j] * rows[j, 0:C] over n rows of stride Wd: the probability-weighted sum of values, with
// the output block held in registers across the rows (64 floats at a time, then 8, then a scalar tail).
template <typename L>
void weighted_rows_sum(const float* p, int64_t n, const L* rows, int64_t Wd, int64_t C, float* out) {
  int64_t c = 0;
#ifdef DSMOE_AVX2
  for (; c + 64 <= C; c += 64) {
    __m256 acc[8];
    for (int r = 0; r < 8; ++r) acc[r] = _mm256_loadu_ps(out + c + 8 * r);
    for (int64_t j = 0; j < n; ++j) {
      const __m256 pj = _mm256_set1_ps(p[j]);
      const L* row = rows + j * Wd + c;
      for (int r = 0; r < 8; ++r) acc[r] = _mm256_fmadd_ps(pj, load8(row + 8 * r), acc[r]);
    }
    for (int r = 0; r < 8; ++r) _mm256_storeu_ps(out + c + 8 * r, acc[r]);
  }
  for (; c + 8 <= C; c += 8) {
    __m256 acc = _mm256_loadu_ps(out + c);
    for (int64_t j = 0; j < n; ++j) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), load8(rows + j * Wd + c), acc);
    _mm256_storeu_ps(out + c, acc);
  }
#endif
  for (; c < C; ++c)
    for (int64_t j = 0; j < n; ++j) out[c] += p[j] * load1(rows + j * Wd + c);
}

// v rounded to bfloat16 (to nearest even, as PyTorch's casts do) and widened back: where the eager step holds a
// bf16 tensor, the kernels round their fp32 value the same way.
inline float round_bf16(float v) { return static_cast<float>(c10::BFloat16(v)); }

// RMSNorm of one row as dsmoe.model.layers.RMSNorm computes it: r * rsqrt(mean(r^2) + eps) (the sum in double),
// rounded to bf16 first when the input is bf16 (x_half), times the weight -> y (D,) fp32. A bf16 output (input
// and weight bf16) is rounded by the caller.
template <typename W>
inline void rms_row(const float* r, const W* w, int64_t D, double eps, bool x_half, float* y) {
  double ss = 0.0;
  for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(r[i]) * r[i];
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / D) + static_cast<float>(eps));
  if (x_half) {
    for (int64_t i = 0; i < D; ++i) y[i] = load1(w + i) * round_bf16(r[i] * inv);
  } else {
    for (int64_t i = 0; i < D; ++i) y[i] = load1(w + i) * (r[i] * inv);
  }
}

// Rotary embedding of one head's R = 2 * half values x (fp32) as dsmoe.model.layers.apply_rope: pairs (2i, 2i+1)
// when interleaved, else (i, i + half), written as [rotated firsts | rotated seconds] into y (R,).
inline void rope_head(const float* x, const float* c, const float* s, int64_t half, bool interleaved, float* y) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = interleaved ? x[2 * i] : x[i];
    const float x2 = interleaved ? x[2 * i + 1] : x[i + half];
    y[i] = x1 * c[i] - x2 * s[i];
    y[i + half] = x2 * c[i] + x1 * s[i];
  }
}

// The router's settings (dsmoe.model.moe.Router.kernel_settings): scoring, group limiting, top-k, normalisation.
struct RouteRule {
  bool sigmoid;
  int64_t top_k, n_group, topk_group, group_mode;  // group_mode 0: none, 1: V2's group max, 2: V3's top-2 sum
  bool normalise, scale;
  double scaling;
};

// One token's expert choice from its router logits (E,) in fp32 (DeepSeekMoE / V2 / V3 gates): scores = softmax or
// sigmoid, a selection score (scores + bias for noaux_tc), group limiting (mode 1: a group scored by its best
// expert, the others filled with 0 as DeepSeek-V2's gate does; 2: by the sum of its top-2, filled with -inf as
// V3's), the top_k picks (ties to the lower index) -> their unbiased scores wt (top_k,), normalised and scaled as
// the rule says, and indices ix (top_k,).
inline void select_experts(const float* lg, int64_t E, const float* bias, const RouteRule& rule, float* wt,
                           int64_t* ix) {
  const int64_t per_group = E / rule.n_group;
  std::vector<float> scores(E), choice(E), group_score(rule.n_group);
  std::vector<int64_t> order(std::max(E, rule.n_group));
  if (rule.sigmoid) {
    for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-lg[e]));
  } else {
    const float top = *std::max_element(lg, lg + E);
    float total = 0.0f;
    for (int64_t e = 0; e < E; ++e) total += (scores[e] = std::exp(lg[e] - top));
    for (int64_t e = 0; e < E; ++e) scores[e] /= total;
  }
  for (int64_t e = 0; e < E; ++e) choice[e] = scores[e] + (bias ? bias[e] : 0.0f);
  if (rule.group_mode != 0 && rule.n_group > 1) {
    for (int64_t g = 0; g < rule.n_group; ++g) {
      float* grp = &choice[g * per_group];
      if (rule.group_mode == 1) {
        group_score[g] = *std::max_element(grp, grp + per_group);
      } else {
        float a = -INFINITY, b = -INFINITY;  // the two largest
        for (int64_t i = 0; i < per_group; ++i) {
          if (grp[i] > a) { b = a; a = grp[i]; } else if (grp[i] > b) { b = grp[i]; }
        }
        group_score[g] = per_group > 1 ? a + b : a;
      }
    }
    for (int64_t g = 0; g < rule.n_group; ++g) order[g] = g;
    std::partial_sort(order.begin(), order.begin() + rule.topk_group, order.begin() + rule.n_group,
                      [&](int64_t a, int64_t b) { return group_score[a] > group_score[b] || (group_score[a] == group_score[b] && a < b); });
    std::vector<bool> kept(rule.n_group, false);
    for (int64_t i = 0; i < rule.topk_group; ++i) kept[order[i]] = true;
    const float fill = rule.group_mode == 1 ? 0.0f : -INFINITY;
    for (int64_t g = 0; g < rule.n_group; ++g)
      if (!kept[g]) std::fill(&choice[g * per_group], &choice[(g + 1) * per_group], fill);
  }
  for (int64_t e = 0; e < E; ++e) order[e] = e;
  std::partial_sort(order.begin(), order.begin() + rule.top_k, order.begin() + E,
                    [&](int64_t a, int64_t b) { return choice[a] > choice[b] || (choice[a] == choice[b] && a < b); });
  float total = 0.0f;
  for (int64_t k = 0; k < rule.top_k; ++k) {
    ix[k] = order[k];
    total += (wt[k] = scores[order[k]]);
  }
  for (int64_t k = 0; k < rule.top_k; ++k) {
    if (rule.normalise) wt[k] /= (total + 1e-20f);
    if (rule.scale) wt[k] *= static_cast<float>(rule.scaling);
  }
}

// The tokens' picked experts grouped by expert, in order of first pick: experts[u] and the (token * k + slot)
// picks it serves (an expert shared by several tokens is read once for all of them).
struct ExpertGroups {
  std::vector<int64_t> experts;
  std::vector<std::vector<int64_t>> picks;
  ExpertGroups(const int64_t* ix, int64_t n_picks) {
    for (int64_t p = 0; p < n_picks; ++p) {
      size_t u = 0;
      while (u < experts.size() && experts[u] != ix[p]) ++u;
      if (u == experts.size()) {
        experts.push_back(ix[p]);
        picks.emplace_back();
      }
      picks[u].push_back(p);
    }
  }
};

// ---- Attention over latent rows (absorbed MLA decode, DeepSeek-V2 section 2.1.3) ----

// The latent rows of one sequence, W wide: key s at base + s * W (a contiguous cache), or, paged, row s % page of
// the pool's block table[s / page].
template <typename L>
struct LatentRows {
  const L* base;
  int64_t W;
  const int64_t* table = nullptr;
  int64_t page = 0;
  const L* row(int64_t s) const { return table ? base + (table[s / page] * page + s % page) * W : base + s * W; }
  // how many rows from key s on lie next to each other in memory
  int64_t run(int64_t s) const { return table ? page - s % page : INT64_MAX; }
};

// The keys are split into this many chunks across threads (flash decoding's split softmax): ~128 keys or more each.
inline int64_t latent_chunks(int64_t S, int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>((S + 127) / 128, threads));
}

// The per-chunk state of attention for Q query rows: Q maxima, Q sums and Q x C partial outputs, each chunk's slice
// padded to its own cache lines.
inline int64_t chunk_state_stride(int64_t Q, int64_t C) { return ((Q * (C + 2) + 15) / 16) * 16; }

// Chunk `c` of `chunks` of one sequence's S keys for Q fp32 query rows q (Q, W): scores against every key of the
// chunk (each latent row read once for all query rows), their maximum, exp and sum, and the exp-weighted sum of the
// rows' first C values, into state (see chunk_state_stride). scores: scratch of Q * ceil(S / chunks) floats.
template <typename L>
void attend_chunk(const float* q, int64_t Q, const LatentRows<L>& rows, int64_t S, int64_t C, float scale,
                  const bool* visible, int64_t c, int64_t chunks, float* scores, float* state) {
  constexpr int64_t kBlock = 64;  // keys per block of the weighted sum: stays in the core's cache for all rows
  const int64_t chunk = (S + chunks - 1) / chunks;
  float* mx = state;
  float* sm = mx + Q;
  float* acc = sm + Q;
  std::fill(mx, mx + Q, -INFINITY);
  std::fill(sm, sm + Q * (C + 1), 0.0f);
  const int64_t s0 = c * chunk, n = std::min(S, s0 + chunk) - s0;
  if (n <= 0) return;
  for (int64_t j = 0; j < n;) {  // scores[m, j] for key s0 + j, a run of adjacent rows at a time
    const int64_t seg = std::min(n - j, rows.run(s0 + j));
    dot_rows_blocked(Q, rows.row(s0 + j), q, rows.W, 0, seg, scores + j, n);
    j += seg;
  }
  for (int64_t m = 0; m < Q; ++m) {
    float* sc = &scores[m * n];
    float top = -INFINITY;
    for (int64_t j = 0; j < n; ++j) {
      sc[j] = (visible && !visible[s0 + j]) ? -INFINITY : sc[j] * scale;
      top = std::max(top, sc[j]);
    }
    mx[m] = top;
    if (top != -INFINITY) sm[m] = exp_shifted(sc, n, top);
  }
  for (int64_t b0 = 0; b0 < n;) {
    const int64_t nb = std::min(std::min(kBlock, n - b0), rows.run(s0 + b0));
    for (int64_t m = 0; m < Q; ++m)
      if (mx[m] != -INFINITY) weighted_rows_sum(&scores[m * n + b0], nb, rows.row(s0 + b0), rows.W, C, acc + m * C);
    b0 += nb;
  }
}

// Query row m's attention output y (C,) from the chunks' states (attend_chunk), merged by their maxima.
inline void merge_chunks(const float* state, int64_t stride, int64_t chunks, int64_t Q, int64_t C, int64_t m,
                         float* y) {
  float top = -INFINITY, total = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) top = std::max(top, state[c * stride + m]);
  std::fill(y, y + C, 0.0f);
  if (top == -INFINITY) return;  // no visible key: zeros (callers never ask for this)
  for (int64_t c = 0; c < chunks; ++c) {
    const float* mx = &state[c * stride];
    if (mx[m] == -INFINITY) continue;
    const float w = std::exp(mx[m] - top);
    total += w * mx[Q + m];
    axpy(w, mx + 2 * Q + m * C, y, C);
  }
  for (int64_t i = 0; i < C; ++i) y[i] /= total;
}

// A visibility mask (B, >= S) as a contiguous bool tensor, or an undefined tensor for none.
inline at::Tensor visible_keys(const char* op, const c10::optional<at::Tensor>& mask, int64_t B, int64_t S) {
  if (!mask.has_value()) return at::Tensor();
  at::Tensor m = mask->to(at::kBool).contiguous();
  TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) >= S, op, ": mask ", m.sizes(), " must be (B=", B,
              ", S>=", S, ")");
  return m;
}

}  // namespace dsmoe_cpu
