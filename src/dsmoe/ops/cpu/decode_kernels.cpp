// Small-batch CPU kernels for the decode step (dsmoe.ops.cpu_kernels loads this file; issue 16).
//
// A decode step multiplies 1..8 token vectors by every weight matrix it touches: matrix-vector products
// whose cost is reading the weights once from memory. PyTorch runs them as general GEMMs (MKL sgemm in
// fp32, oneDNN in bf16) with a fixed per-call cost and, in bf16, well below the memory bandwidth. These
// kernels read each weight row once, dot it with every token of the batch in fp32 registers (AVX2 + FMA
// where the compiler targets them), and accept fp32 or bf16 weights (weight-only bf16: bf16 storage, fp32
// arithmetic). The MoE kernel runs a token's K routed experts without sorting or scattering: the picked
// experts' weight slices are read in place, each once per step however many tokens share it.
//
// Ops (registered as torch.ops.dsmoe_cpu.*; shapes, M = tokens, at most kMaxTokens per call):
//   linear(x (M, K), w (N, K)) -> (M, N)                         x @ w.T
//   swiglu(x (M, K), w1 (N, K), w3 (N, K)) -> (M, N)             silu(x @ w1.T) * (x @ w3.T)
//   moe_experts(x (M, D), idx (M, k) long, gate (M, k) fp32,
//               w1 (E, I, D), w2 (E, D, I), w3 (E, I, D)) -> (M, D)   sum_j gate[m,j] * expert_idx[m,j](x[m])
//   rms_norm(x (M, D), w (D,), eps) -> (M, D)                    RMSNorm as dsmoe's (fp32 inside)
//   rope(x (B, T, H, R), cos, sin (T or B x T, R/2), interleaved) -> (B, T, H, R)
//   route(x (M, D), w (E, D), bias?, ...) -> (gate weights (M, k), indices (M, k))   the MoE router
//   mla_project, mlp_block, moe_block: the pieces of a layer, several of the above in one call (see there)
//   mla_decode(q_nope (B, H, N), q_pe (B, H, R), latent (B, S, C + R), wkv_b (H * (N + V), C), V, scale,
//              mask (B, S)?) -> (B, H * V)                  absorbed MLA decode attention, W_UK / W_UV included
// x and the output share a dtype (fp32 or bf16); weights are fp32 or bf16; all contiguous.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DSMOE_AVX2 1
#endif

namespace {

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

// Rows per parallel task: enough work (>= ~32 KiB of weights) that the thread pool's hand-off is noise.
inline int64_t grain_rows(int64_t K, int64_t itemsize) { return std::max<int64_t>(1, (32768 / itemsize) / K); }

void check_operands(const char* op, const at::Tensor& x, const at::Tensor& w, int64_t w_dims) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2, op, ": x must be (tokens, features), got ", x.sizes());
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxTokens, op, ": at most ", kMaxTokens, " tokens, got ", x.size(0));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16, op,
              ": weights must be float32 or bfloat16, got ", w.scalar_type());
  TORCH_CHECK(w.dim() == w_dims && w.is_contiguous(), op, ": weight must be a contiguous ", w_dims,
              "-d tensor, got ", w.sizes());
}

// fn(const W* w) with W the weight's element type.
template <typename Fn>
void with_weight(const at::Tensor& w, Fn fn) {
  if (w.scalar_type() == at::kFloat) {
    fn(w.data_ptr<float>());
  } else {
    fn(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()));
  }
}

// A 2-d (rows, width) operand as fp32 rows: x's own memory when it is fp32 with contiguous rows, else a converted
// copy in buf (any row stride; bf16 widened exactly). Saves an ATen conversion and allocation per call.
const float* rows_fp32(const at::Tensor& x, std::vector<float>& buf) {
  const int64_t R = x.size(0), W = x.size(1);
  if (x.scalar_type() == at::kFloat && x.stride(1) == 1 && (x.stride(0) == W || R == 1)) return x.data_ptr<float>();
  buf.resize(R * W);
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  if (x.scalar_type() == at::kFloat) {
    const float* p = x.data_ptr<float>();
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < W; ++c) buf[r * W + c] = p[r * s0 + c * s1];
  } else {  // bf16: widened exactly (the 16 bits above 16 zero bits)
    const uint16_t* p = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < W; ++c) buf[r * W + c] = bf16_to_float(p[r * s0 + c * s1]);
  }
  return buf.data();
}

// An output of `dtype` and `sizes` whose values are computed in fp32: into the tensor itself when it is fp32,
// else into a scratch buffer that finish() rounds into it (to nearest even, as PyTorch's casts do).
struct Fp32Output {
  at::Tensor tensor;
  std::vector<float> scratch;
  float* data;
  Fp32Output(at::IntArrayRef sizes, at::ScalarType dtype, bool zeroed) {
    tensor = zeroed && dtype == at::kFloat ? at::zeros(sizes, at::dtype(dtype)) : at::empty(sizes, at::dtype(dtype));
    if (dtype == at::kFloat) {
      data = tensor.data_ptr<float>();
    } else {
      scratch.assign(tensor.numel(), 0.0f);
      data = scratch.data();
    }
  }
  at::Tensor finish() {
    if (tensor.scalar_type() != at::kFloat) {
      at::BFloat16* o = tensor.data_ptr<at::BFloat16>();
      for (size_t i = 0; i < scratch.size(); ++i) o[i] = at::BFloat16(scratch[i]);
    }
    return tensor;
  }
};

at::Tensor linear(const at::Tensor& x, const at::Tensor& w) {
  check_operands("dsmoe_cpu.linear", x, w, 2);
  TORCH_CHECK(w.size(1) == x.size(1), "dsmoe_cpu.linear: x has ", x.size(1), " features, weight ", w.sizes());
  const int64_t M = x.size(0), K = w.size(1), N = w.size(0);
  std::vector<float> buf;
  const float* xp = rows_fp32(x, buf);
  Fp32Output out({M, N}, x.scalar_type(), false);
  float* op = out.data;
  with_weight(w, [&](auto* wp) {
    at::parallel_for(0, N, grain_rows(K, w.element_size()),
                     [&](int64_t n0, int64_t n1) { dot_rows(M, wp, xp, K, n0, n1, op, N); });
  });
  return out.finish();
}

at::Tensor swiglu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3) {
  check_operands("dsmoe_cpu.swiglu", x, w1, 2);
  check_operands("dsmoe_cpu.swiglu", x, w3, 2);
  TORCH_CHECK(w1.sizes() == w3.sizes() && w1.scalar_type() == w3.scalar_type() && w1.size(1) == x.size(1),
              "dsmoe_cpu.swiglu: w1 ", w1.sizes(), " and w3 ", w3.sizes(), " must match each other and x ",
              x.sizes());
  const int64_t M = x.size(0), K = w1.size(1), N = w1.size(0);
  std::vector<float> buf;
  const float* xp = rows_fp32(x, buf);
  Fp32Output out({M, N}, x.scalar_type(), false);
  float* op = out.data;
  with_weight(w1, [&](auto* w1p) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(w1p)>>;
    const W* w3p = reinterpret_cast<const W*>(w3.data_ptr());
    at::parallel_for(0, N, grain_rows(2 * K, w1.element_size()), [&](int64_t n0, int64_t n1) {
      float up[kMaxTokens];
      for (int64_t n = n0; n < n1; ++n) {
        dot_rows(M, w1p, xp, K, n, n + 1, op, N);
        dot_rows(M, w3p, xp, K, n, n + 1, up - n, 1);
        for (int64_t m = 0; m < M; ++m) op[m * N + n] = silu(op[m * N + n]) * up[m];
      }
    });
  });
  return out.finish();
}

at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& idx_in, const at::Tensor& gate_in,
                       const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3) {
  check_operands("dsmoe_cpu.moe_experts", x, w1, 3);
  check_operands("dsmoe_cpu.moe_experts", x, w2, 3);
  check_operands("dsmoe_cpu.moe_experts", x, w3, 3);
  const int64_t M = x.size(0), D = x.size(1), E = w1.size(0), I = w1.size(1);
  TORCH_CHECK(w1.sizes() == w3.sizes() && w1.size(2) == D && w2.size(0) == E && w2.size(1) == D &&
                  w2.size(2) == I && w1.scalar_type() == w2.scalar_type() && w1.scalar_type() == w3.scalar_type(),
              "dsmoe_cpu.moe_experts: expert weights w1 ", w1.sizes(), ", w2 ", w2.sizes(), ", w3 ", w3.sizes(),
              " do not fit tokens of width ", D);
  TORCH_CHECK(idx_in.dim() == 2 && idx_in.size(0) == M && gate_in.sizes() == idx_in.sizes(),
              "dsmoe_cpu.moe_experts: indices ", idx_in.sizes(), " and gate weights ", gate_in.sizes(),
              " must both be (tokens=", M, ", k)");
  const int64_t k = idx_in.size(1);
  at::Tensor idx = idx_in.to(at::kLong).contiguous(), gate = gate_in.to(at::kFloat).contiguous();
  const int64_t* ip = idx.data_ptr<int64_t>();
  const float* gp = gate.data_ptr<float>();

  // The picked experts, each with the tokens routed to it (an expert shared by tokens is read once).
  std::vector<int64_t> experts;
  std::vector<std::vector<int64_t>> pairs;  // per picked expert: the (token * k + slot) pairs it serves
  for (int64_t p = 0; p < M * k; ++p) {
    const int64_t e = ip[p];
    TORCH_CHECK(e >= 0 && e < E, "dsmoe_cpu.moe_experts: token ", p / k, " picks expert ", e, " of ", E);
    size_t u = 0;
    while (u < experts.size() && experts[u] != e) ++u;
    if (u == experts.size()) {
      experts.push_back(e);
      pairs.emplace_back();
    }
    pairs[u].push_back(p);
  }
  const int64_t U = static_cast<int64_t>(experts.size());

  std::vector<float> buf;
  const float* xp = rows_fp32(x, buf);
  // Each picked expert's tokens, gathered (U, M, D), and their gated SwiGLU activations (U, M, I).
  std::vector<float> xs(U * kMaxTokens * D), hs(U * kMaxTokens * I);
  for (int64_t u = 0; u < U; ++u)
    for (size_t j = 0; j < pairs[u].size(); ++j)
      std::memcpy(&xs[(u * kMaxTokens + j) * D], xp + (pairs[u][j] / k) * D, D * sizeof(float));

  Fp32Output out({M, D}, x.scalar_type(), true);
  float* op = out.data;
  with_weight(w1, [&](auto* w1p) {
    using W = std::remove_const_t<std::remove_pointer_t<decltype(w1p)>>;
    const W* w3p = reinterpret_cast<const W*>(w3.data_ptr());
    const W* w2p = reinterpret_cast<const W*>(w2.data_ptr());
    // h = gate * silu(w1 x) * (w3 x), the gate folded into the I-wide activation (w2 is linear).
    at::parallel_for(0, U * I, grain_rows(2 * D, w1.element_size()), [&](int64_t r0, int64_t r1) {
      float up[kMaxTokens];
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t u = r / I, i = r % I, n = static_cast<int64_t>(pairs[u].size());
        const W* a = w1p + (experts[u] * I) * D;
        const W* b = w3p + (experts[u] * I) * D;
        float* h = &hs[u * kMaxTokens * I];
        dot_rows(n, a, &xs[u * kMaxTokens * D], D, i, i + 1, h, I);
        dot_rows(n, b, &xs[u * kMaxTokens * D], D, i, i + 1, up - i, 1);
        for (int64_t j = 0; j < n; ++j) h[j * I + i] = gp[pairs[u][j]] * silu(h[j * I + i]) * up[j];
      }
    });
    // y[t, d] = sum over the token's experts of w2[e, d] . h: rows d split across threads, no races.
    at::parallel_for(0, D, grain_rows(U * I, w2.element_size()), [&](int64_t d0, int64_t d1) {
      float part[kMaxTokens];
      for (int64_t u = 0; u < U; ++u) {
        const int64_t n = static_cast<int64_t>(pairs[u].size());
        const W* c = w2p + (experts[u] * D) * I;
        for (int64_t d = d0; d < d1; ++d) {
          dot_rows(n, c, &hs[u * kMaxTokens * I], I, d, d + 1, part - d, 1);
          for (int64_t j = 0; j < n; ++j) op[(pairs[u][j] / k) * D + d] += part[j];
        }
      }
    });
  });
  return out.finish();
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

// Attention of Q fp32 query rows (Q, W) of one sequence over its latent rows (S, W): the softmax-weighted sum of
// the rows' first C values -> y (Q, C). Keys split into `chunks` pieces across threads, each with its own max,
// sum and output, merged at the end (flash decoding's split softmax). Within a piece, keys go in blocks small
// enough to stay in the core's cache while every query row reads them.
template <typename L>
void attend_latent(const float* q, int64_t Q, const L* rows, int64_t S, int64_t Wd, int64_t C, float scale,
                   const bool* visible, float* y) {
  constexpr int64_t kBlock = 64;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>((S + 127) / 128, at::get_num_threads()));
  const int64_t chunk = (S + chunks - 1) / chunks;
  // per chunk: Q maxima, Q sums, Q x C partial outputs; each chunk's slice padded to its own cache lines
  const int64_t stride = ((Q * (C + 2) + 15) / 16) * 16;
  std::vector<float> state(chunks * stride, 0.0f);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> scores(Q * chunk);
    for (int64_t c = c0; c < c1; ++c) {
      float* mx = &state[c * stride];
      float* sm = mx + Q;
      float* acc = sm + Q;
      std::fill(mx, mx + Q, -INFINITY);
      const int64_t s0 = c * chunk, n = std::min(S, s0 + chunk) - s0;
      if (n <= 0) continue;
      // scores[m, j] for key s0 + j: each latent row read once for all Q query rows
      dot_rows_blocked(Q, rows + s0 * Wd, q, Wd, 0, n, scores.data(), n);
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
      for (int64_t b0 = 0; b0 < n; b0 += kBlock) {
        const int64_t nb = std::min(kBlock, n - b0);
        for (int64_t m = 0; m < Q; ++m)
          if (mx[m] != -INFINITY) weighted_rows_sum(&scores[m * n + b0], nb, rows + (s0 + b0) * Wd, Wd, C, acc + m * C);
      }
    }
  });
  for (int64_t m = 0; m < Q; ++m) {
    float top = -INFINITY, total = 0.0f;
    for (int64_t c = 0; c < chunks; ++c) top = std::max(top, state[c * stride + m]);
    float* ym = y + m * C;
    std::fill(ym, ym + C, 0.0f);
    if (top == -INFINITY) continue;  // no visible key: zeros (callers never ask for this)
    for (int64_t c = 0; c < chunks; ++c) {
      const float* mx = &state[c * stride];
      if (mx[m] == -INFINITY) continue;
      const float w = std::exp(mx[m] - top);
      total += w * mx[Q + m];
      axpy(w, mx + 2 * Q + m * C, ym, C);
    }
    for (int64_t i = 0; i < C; ++i) ym[i] /= total;
  }
}

void check_latent(const char* op, const at::Tensor& latent, int64_t B, int64_t Wd) {
  TORCH_CHECK(latent.device().is_cpu() && latent.dim() == 3 && latent.size(0) == B && latent.size(2) == Wd &&
                  latent.size(1) > 0, op, ": latent ", latent.sizes(), " must be (B=", B, ", S>0, W=", Wd, ")");
  TORCH_CHECK(latent.stride(2) == 1 && latent.stride(1) == Wd, op, ": latent rows must be contiguous, strides ",
              latent.strides());
  TORCH_CHECK(latent.scalar_type() == at::kFloat || latent.scalar_type() == at::kBFloat16, op,
              ": latent must be float32 or bfloat16, got ", latent.scalar_type());
}

at::Tensor visible_keys(const char* op, const c10::optional<at::Tensor>& mask, int64_t B, int64_t S) {
  if (!mask.has_value()) return at::Tensor();
  at::Tensor m = mask->to(at::kBool).contiguous();
  TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) >= S, op, ": mask ", m.sizes(), " must be (B=", B,
              ", S>=", S, ")");
  return m;
}

// One decode step of absorbed MLA from the per-head query to the per-head output, in one call:
// q_nope (B, H, N) and q_pe (B, H, R) (any strides), latent (B, S, C + R), wkv_b (H * (N + V), C) = per head
// [W_UK (N, C); W_UV (V, C)], mask (B, S)? ->
//   q_lat = q_nope W_UK, o = softmax(scale [q_lat | q_pe] latent^T) latent[:, :C], y = o W_UV^T  -> (B, H * V)
at::Tensor mla_decode(const at::Tensor& q_nope, const at::Tensor& q_pe, const at::Tensor& latent,
                      const at::Tensor& wkv_b, int64_t v_dim, double scale, const c10::optional<at::Tensor>& mask_in) {
  const char* op = "dsmoe_cpu.mla_decode";
  TORCH_CHECK(q_nope.device().is_cpu() && q_nope.dim() == 3 && q_pe.dim() == 3 &&
                  q_pe.size(0) == q_nope.size(0) && q_pe.size(1) == q_nope.size(1),
              op, ": q_nope ", q_nope.sizes(), " and q_pe ", q_pe.sizes(), " must be (B, H, N) and (B, H, R)");
  const int64_t B = q_nope.size(0), H = q_nope.size(1), N = q_nope.size(2), R = q_pe.size(2), V = v_dim;
  TORCH_CHECK(wkv_b.dim() == 2 && wkv_b.is_contiguous() && wkv_b.size(0) == H * (N + V) &&
                  (wkv_b.scalar_type() == at::kFloat || wkv_b.scalar_type() == at::kBFloat16),
              op, ": wkv_b ", wkv_b.sizes(), " must be a contiguous fp32/bf16 (H * (N + V) = ", H * (N + V), ", C)");
  const int64_t C = wkv_b.size(1), Wd = C + R;
  check_latent(op, latent, B, Wd);
  const int64_t S = latent.size(1);
  at::Tensor mask = visible_keys(op, mask_in, B, S);
  std::vector<float> nbuf, pbuf;
  const float* qn = rows_fp32(q_nope.reshape({B * H, N}), nbuf);
  const float* qr = rows_fp32(q_pe.reshape({B * H, R}), pbuf);
  std::vector<float> q(B * H * Wd, 0.0f), o(B * H * C);
  Fp32Output out({B, H * V}, q_nope.scalar_type(), false);
  with_weight(wkv_b, [&](auto* wp) {
    // q_lat[b, h] = sum_n q_nope[b, h, n] W_UK[h, n, :]: the rows of W_UK read in place, heads in parallel
    at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t b = 0; b < B; ++b) {
          float* qh = &q[(b * H + h) * Wd];
          weighted_rows_sum(qn + (b * H + h) * N, N, wp + h * (N + V) * C, C, C, qh);
          std::memcpy(qh + C, qr + (b * H + h) * R, R * sizeof(float));
        }
    });
    with_weight(latent, [&](auto* lp) {
      for (int64_t b = 0; b < B; ++b)
        attend_latent(&q[b * H * Wd], H, lp + b * latent.stride(0), S, Wd, C, static_cast<float>(scale),
                      mask.defined() ? mask.data_ptr<bool>() + b * mask.size(1) : nullptr, &o[b * H * C]);
    });
    // y[b, h, :] = W_UV[h] o[b, h]: one dot product per W_UV row
    at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t b = 0; b < B; ++b)
          dot_rows(1, wp + (h * (N + V) + N) * C, &o[(b * H + h) * C], C, 0, V, out.data + (b * H + h) * V, 1);
    });
  });
  return out.finish();
}

// RMSNorm of a few rows as dsmoe.model.layers.RMSNorm computes it: normalised in fp32, rounded to x's dtype,
// times the weight (in x's dtype: rounded again for bf16). x (M, D) any row stride, w (D,) -> (M, D).
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  const char* op = "dsmoe_cpu.rms_norm";
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1) && w.is_contiguous(),
              op, ": x ", x.sizes(), " and weight ", w.sizes(), " must be (M, D) and (D,)");
  TORCH_CHECK((x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
                  (w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16),
              op, ": float32 or bfloat16 only, got ", x.scalar_type(), " and ", w.scalar_type());
  const int64_t M = x.size(0), D = x.size(1);
  // the weight times x.to(dtype): bf16 only when both are (PyTorch's type promotion)
  const bool half = x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16;
  const bool x_half = x.scalar_type() == at::kBFloat16;
  std::vector<float> buf;
  const float* xp = rows_fp32(x, buf);
  Fp32Output out({M, D}, half ? at::kBFloat16 : at::kFloat, false);
  with_weight(w, [&](auto* wp) {
    for (int64_t m = 0; m < M; ++m) {
      const float* r = xp + m * D;
      double ss = 0.0;
      for (int64_t i = 0; i < D; ++i) ss += static_cast<double>(r[i]) * r[i];
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / D) + static_cast<float>(eps));
      float* y = out.data + m * D;
      if (x_half) {
        for (int64_t i = 0; i < D; ++i) y[i] = load1(wp + i) * static_cast<float>(at::BFloat16(r[i] * inv));
      } else {
        for (int64_t i = 0; i < D; ++i) y[i] = load1(wp + i) * (r[i] * inv);
      }
    }
  });
  return out.finish();
}

// Rotary embedding of a few tokens as dsmoe.model.layers.apply_rope computes it: x (B, T, H, R) any strides,
// cos / sin (T, R/2) or (B, T, R/2) -> a new contiguous (B, T, H, R) in x's dtype, fp32 arithmetic.
// interleaved: pairs (2i, 2i+1), written as [rotated evens | rotated odds]; else rotate-half pairs (i, i + R/2).
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos_in, const at::Tensor& sin_in, bool interleaved) {
  const char* op = "dsmoe_cpu.rope";
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.size(3) % 2 == 0, op, ": x must be (B, T, H, R), got ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), R = x.size(3), half = R / 2;
  at::Tensor cs = cos_in.to(at::kFloat).contiguous(), sn = sin_in.to(at::kFloat).contiguous();
  TORCH_CHECK(cs.sizes() == sn.sizes() && cs.size(-1) == half && cs.size(-2) == T && (cs.dim() == 2 ||
                  (cs.dim() == 3 && cs.size(0) == B)), op, ": cos/sin ", cs.sizes(), " must be (T, R/2) or (B, T, R/2)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op, ": float32 or bfloat16 only");
  const bool per_batch = cs.dim() == 3;
  Fp32Output out({B, T, H, R}, x.scalar_type(), false);
  const float* cp = cs.data_ptr<float>();
  const float* sp = sn.data_ptr<float>();
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  const bool fp32 = x.scalar_type() == at::kFloat;
  const float* xf = fp32 ? x.data_ptr<float>() : nullptr;
  const uint16_t* xh = fp32 ? nullptr : reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto at_x = [&](int64_t b, int64_t t, int64_t h, int64_t r) {
    const int64_t off = b * s0 + t * s1 + h * s2 + r * s3;
    return fp32 ? xf[off] : bf16_to_float(xh[off]);
  };
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const float* c = cp + ((per_batch ? b * T : 0) + t) * half;
      const float* sv = sp + ((per_batch ? b * T : 0) + t) * half;
      for (int64_t h = 0; h < H; ++h) {
        float* y = out.data + ((b * T + t) * H + h) * R;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = interleaved ? at_x(b, t, h, 2 * i) : at_x(b, t, h, i);
          const float x2 = interleaved ? at_x(b, t, h, 2 * i + 1) : at_x(b, t, h, i + half);
          y[i] = x1 * c[i] - x2 * sv[i];
          y[i + half] = x2 * c[i] + x1 * sv[i];
        }
      }
    }
  return out.finish();
}

// The MoE router of dsmoe.model.moe.Router for a few tokens, in fp32: logits = x W^T, scores = softmax or
// sigmoid, a selection score (scores + bias for noaux_tc), group limiting (group_mode 1: a group scored by its
// best expert, the others filled with 0 as DeepSeek-V2's gate does; 2: by the sum of its top-2, filled with
// -inf as V3's), the top_k picks, their unbiased scores, normalised and scaled as the Router says.
// x (M, D), weight (E, D), bias (E,) fp32 or none -> (gate weights (M, top_k) fp32, indices (M, top_k) int64).
std::tuple<at::Tensor, at::Tensor> route(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias_in,
                                         bool sigmoid, int64_t top_k, int64_t n_group, int64_t topk_group,
                                         int64_t group_mode, bool normalise, bool scale, double scaling) {
  check_operands("dsmoe_cpu.route", x, w, 2);
  const int64_t M = x.size(0), D = x.size(1), E = w.size(0);
  TORCH_CHECK(w.size(1) == D && top_k >= 1 && top_k <= E && n_group >= 1 && E % n_group == 0 &&
                  topk_group >= 1 && topk_group <= n_group,
              "dsmoe_cpu.route: bad shapes or settings: x ", x.sizes(), ", weight ", w.sizes(), ", top_k ", top_k,
              ", n_group ", n_group, ", topk_group ", topk_group);
  at::Tensor bias;
  if (bias_in.has_value()) {
    bias = bias_in->to(at::kFloat).contiguous();
    TORCH_CHECK(bias.numel() == E, "dsmoe_cpu.route: bias has ", bias.numel(), " entries for ", E, " experts");
  }
  const float* bias_p = bias.defined() ? bias.data_ptr<float>() : nullptr;
  std::vector<float> buf;
  const float* xp = rows_fp32(x, buf);
  std::vector<float> logits(M * E);
  with_weight(w, [&](auto* wp) { dot_rows(M, wp, xp, D, 0, E, logits.data(), E); });
  at::Tensor weights = at::empty({M, top_k}, at::kFloat);
  at::Tensor indices = at::empty({M, top_k}, at::kLong);
  const int64_t per_group = E / n_group;
  std::vector<float> scores(E), choice(E), group_score(n_group);
  std::vector<int64_t> order(std::max(E, n_group));
  for (int64_t m = 0; m < M; ++m) {
    const float* lg = &logits[m * E];
    if (sigmoid) {
      for (int64_t e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + std::exp(-lg[e]));
    } else {
      const float top = *std::max_element(lg, lg + E);
      float total = 0.0f;
      for (int64_t e = 0; e < E; ++e) total += (scores[e] = std::exp(lg[e] - top));
      for (int64_t e = 0; e < E; ++e) scores[e] /= total;
    }
    for (int64_t e = 0; e < E; ++e) choice[e] = scores[e] + (bias_p ? bias_p[e] : 0.0f);
    if (group_mode != 0 && n_group > 1) {
      for (int64_t g = 0; g < n_group; ++g) {
        float* grp = &choice[g * per_group];
        if (group_mode == 1) {
          group_score[g] = *std::max_element(grp, grp + per_group);
        } else {
          float a = -INFINITY, b = -INFINITY;  // the two largest
          for (int64_t i = 0; i < per_group; ++i) {
            if (grp[i] > a) { b = a; a = grp[i]; } else if (grp[i] > b) { b = grp[i]; }
          }
          group_score[g] = per_group > 1 ? a + b : a;
        }
      }
      for (int64_t g = 0; g < n_group; ++g) order[g] = g;
      std::partial_sort(order.begin(), order.begin() + topk_group, order.begin() + n_group,
                        [&](int64_t a, int64_t b) { return group_score[a] > group_score[b] || (group_score[a] == group_score[b] && a < b); });
      std::vector<bool> kept(n_group, false);
      for (int64_t i = 0; i < topk_group; ++i) kept[order[i]] = true;
      const float fill = group_mode == 1 ? 0.0f : -INFINITY;
      for (int64_t g = 0; g < n_group; ++g)
        if (!kept[g]) std::fill(&choice[g * per_group], &choice[(g + 1) * per_group], fill);
    }
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + top_k, order.begin() + E,
                      [&](int64_t a, int64_t b) { return choice[a] > choice[b] || (choice[a] == choice[b] && a < b); });
    float* wt = weights.data_ptr<float>() + m * top_k;
    int64_t* ix = indices.data_ptr<int64_t>() + m * top_k;
    float total = 0.0f;
    for (int64_t k = 0; k < top_k; ++k) {
      ix[k] = order[k];
      total += (wt[k] = scores[order[k]]);
    }
    for (int64_t k = 0; k < top_k; ++k) {
      if (normalise) wt[k] /= (total + 1e-20f);
      if (scale) wt[k] *= static_cast<float>(scaling);
    }
  }
  return {weights, indices};
}

// ---- Layer pieces: several of the operators above in one call (one Python dispatch instead of ~10) ----

// The attention input side of an MLA layer for one token per row (DeepSeek-V2 section 2.1): RMSNorm, the query
// (low-rank wq_a -> q_norm -> wq_b when wq_a is given, else the plain wq), the joint KV compression wkv_a ->
// kv_norm, and rope on the query's and key's rope parts. x (B, D), cos / sin (B, 1, R/2) ->
// (q_nope (B, H, N), q_pe (B, H, R), latent row [c_kv | k_pe] (B, C + R)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mla_project(
    const at::Tensor& x, const at::Tensor& attn_norm, double attn_eps, const c10::optional<at::Tensor>& wq_a,
    const c10::optional<at::Tensor>& q_norm, double q_eps, const at::Tensor& wq, const at::Tensor& wkv_a,
    const at::Tensor& kv_norm, double kv_eps, const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
    int64_t nope_dim, int64_t rope_dim) {
  const int64_t B = x.size(0), N = nope_dim, R = rope_dim;
  at::Tensor h = ::rms_norm(x, attn_norm, attn_eps);
  at::Tensor q = wq_a.has_value() ? ::linear(::rms_norm(::linear(h, *wq_a), *q_norm, q_eps), wq) : ::linear(h, wq);
  TORCH_CHECK(q.size(1) % (N + R) == 0, "dsmoe_cpu.mla_project: query width ", q.size(1), " is not heads x ", N + R);
  const int64_t H = q.size(1) / (N + R);
  at::Tensor kv = ::linear(h, wkv_a);  // (B, C + R)
  const int64_t C = kv.size(1) - R;
  at::Tensor c_kv = ::rms_norm(kv.slice(1, 0, C), kv_norm, kv_eps);
  at::Tensor k_pe = ::rope(kv.slice(1, C).view({B, 1, 1, R}), cos, sin, interleaved).view({B, R});
  at::Tensor q4 = q.view({B, 1, H, N + R});
  at::Tensor q_pe = ::rope(q4.slice(3, N), cos, sin, interleaved).view({B, H, R});
  return {q4.select(1, 0).slice(2, 0, N), q_pe, at::cat({c_kv.to(k_pe.scalar_type()), k_pe}, 1)};
}

// x + MLP(RMSNorm(x)) for a dense layer: w2(silu(w1 h) * w3 h). x (B, D) -> (B, D).
at::Tensor mlp_block(const at::Tensor& x, const at::Tensor& norm, double eps, const at::Tensor& w1,
                     const at::Tensor& w3, const at::Tensor& w2) {
  at::Tensor h = ::rms_norm(x, norm, eps);
  return x + ::linear(::swiglu(h, w1, w3), w2);
}

// x + MoE(RMSNorm(x)) (DeepSeekMoE section 3): the router (route's settings), the picked experts, and the shared
// experts when sw1 is given. x (B, D) -> (B, D).
at::Tensor moe_block(const at::Tensor& x, const at::Tensor& norm, double eps, const at::Tensor& gate,
                     const c10::optional<at::Tensor>& bias, bool sigmoid, int64_t top_k, int64_t n_group,
                     int64_t topk_group, int64_t group_mode, bool normalise, bool scale, double scaling,
                     const at::Tensor& w1, const at::Tensor& w2, const at::Tensor& w3,
                     const c10::optional<at::Tensor>& sw1, const c10::optional<at::Tensor>& sw3,
                     const c10::optional<at::Tensor>& sw2) {
  at::Tensor h = ::rms_norm(x, norm, eps);
  auto [weights, indices] = ::route(h, gate, bias, sigmoid, top_k, n_group, topk_group, group_mode, normalise, scale,
                                  scaling);
  at::Tensor y = ::moe_experts(h, indices, weights, w1, w2, w3);
  if (sw1.has_value()) y = y + ::linear(::swiglu(h, *sw1, *sw3), *sw2);
  return x + y;
}

// A whole decode step of an MLA model (DeepSeek-V2/V3 with dense or MoE FFNs), one token per row, in one call:
// no Python between the ~10 kernels of each layer. The layers come flattened (dsmoe.kernel_step.MLAStepPlan
// builds these lists once per model):
//   weights: per layer kSlots tensors: attn_norm, wq_a, q_norm, wq (wq_b with q-LoRA), wkv_a, kv_norm, wkv_b, wo,
//            ffn_norm, gate, gate_bias, w1, w2, w3, shared_w1, shared_w3, shared_w2 (absent ones: empty tensors);
//   ints:    per layer kInts: has_q_lora, is_moe, has_shared, sigmoid, top_k, n_group, topk_group, group_mode,
//            normalise, scale;
//   floats:  per layer kFloats: attn_eps, q_eps, kv_eps, ffn_eps, softmax scale, routed scaling;
//   dims:    nope_dim, rope_dim, v_dim, interleaved.
// caches: per layer either the contiguous latent cache (B, L, C + R) (tables absent: row `position` is written,
// rows 0..position read) or the paged pool (NB, P, C + R) (tables (B, K) given: each row written at slots[b],
// keys read through the block table, the first `keys` of them). visible (B, S) or none as for mla_decode.
// ids (B,), positions (B,) rope positions -> final-normed hidden states (B, D). The caches are written in place
// (the schema does not say so: this operator is for eager calls, never traced).
constexpr int64_t kSlots = 17, kInts = 10, kFloats = 6;

at::Tensor mla_decode_step(const at::Tensor& ids, const at::Tensor& positions, const at::Tensor& embed,
                           const at::Tensor& inv_freq, double amplitude, at::TensorList weights, at::IntArrayRef ints,
                           at::ArrayRef<double> floats, at::IntArrayRef dims, at::TensorList caches, int64_t position,
                           const c10::optional<at::Tensor>& slots, const c10::optional<at::Tensor>& tables,
                           int64_t keys, const c10::optional<at::Tensor>& visible, const at::Tensor& norm,
                           double norm_eps) {
  const char* op = "dsmoe_cpu.mla_decode_step";
  const int64_t L = static_cast<int64_t>(caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L * kSlots && static_cast<int64_t>(ints.size()) == L * kInts &&
                  static_cast<int64_t>(floats.size()) == L * kFloats && dims.size() == 4,
              op, ": ", L, " layers need ", L * kSlots, " weights, ", L * kInts, " ints and ", L * kFloats, " floats");
  const int64_t N = dims[0], R = dims[1], V = dims[2];
  const bool interleaved = dims[3] != 0;
  const int64_t B = ids.size(0);
  at::Tensor x = embed.index_select(0, ids);  // (B, D)
  at::Tensor freqs = positions.to(at::kFloat).unsqueeze(1) * inv_freq.unsqueeze(0);  // (B, R/2), as RotaryEmbedding
  at::Tensor cos = (freqs.cos() * amplitude).to(x.scalar_type()).view({B, 1, -1});
  at::Tensor sin = (freqs.sin() * amplitude).to(x.scalar_type()).view({B, 1, -1});
  auto opt = [](const at::Tensor& t) { return t.numel() ? c10::optional<at::Tensor>(t) : c10::nullopt; };
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = &weights[l * kSlots];
    const int64_t* in = &ints[l * kInts];
    const double* fl = &floats[l * kFloats];
    auto [q_nope, q_pe, row] = mla_project(x, w[0], fl[0], in[0] ? opt(w[1]) : c10::nullopt,
                                           in[0] ? opt(w[2]) : c10::nullopt, fl[1], w[3], w[4], w[5], fl[2], cos, sin,
                                           interleaved, N, R);
    at::Tensor latent;
    if (tables.has_value()) {  // paged pool (NB, P, W): write each row at its slot, read through the block table
      const at::Tensor& pool = caches[l];
      pool.view({-1, pool.size(-1)}).index_copy_(0, *slots, row.to(pool.scalar_type()));
      latent = pool.index_select(0, tables->reshape(-1)).view({B, -1, pool.size(-1)}).narrow(1, 0, keys);
    } else {  // contiguous (B, L, W)
      caches[l].select(1, position).copy_(row);
      latent = caches[l].narrow(1, 0, position + 1);
    }
    at::Tensor o = mla_decode(q_nope, q_pe, latent, w[6], V, fl[4], visible);  // (B, H * V)
    x = x + ::linear(o, w[7]);
    if (in[1]) {
      x = moe_block(x, w[8], fl[3], w[9], opt(w[10]), in[3] != 0, in[4], in[5], in[6], in[7], in[8] != 0, in[9] != 0,
                    fl[5], w[11], w[12], w[13], in[2] ? opt(w[14]) : c10::nullopt, in[2] ? opt(w[15]) : c10::nullopt,
                    in[2] ? opt(w[16]) : c10::nullopt);
    } else {
      x = mlp_block(x, w[8], fl[3], w[11], w[13], w[12]);
    }
  }
  return ::rms_norm(x, norm, norm_eps);
}

}  // namespace

TORCH_LIBRARY(dsmoe_cpu, m) {
  m.def("linear(Tensor x, Tensor w) -> Tensor");
  m.def("swiglu(Tensor x, Tensor w1, Tensor w3) -> Tensor");
  m.def("moe_experts(Tensor x, Tensor indices, Tensor gate, Tensor w1, Tensor w2, Tensor w3) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin, bool interleaved) -> Tensor");
  m.def("route(Tensor x, Tensor weight, Tensor? bias, bool sigmoid, int top_k, int n_group, int topk_group, "
        "int group_mode, bool normalise, bool scale, float scaling) -> (Tensor, Tensor)");
  m.def("mla_project(Tensor x, Tensor attn_norm, float attn_eps, Tensor? wq_a, Tensor? q_norm, float q_eps, "
        "Tensor wq, Tensor wkv_a, Tensor kv_norm, float kv_eps, Tensor cos, Tensor sin, bool interleaved, "
        "int nope_dim, int rope_dim) -> (Tensor, Tensor, Tensor)");
  m.def("mlp_block(Tensor x, Tensor norm, float eps, Tensor w1, Tensor w3, Tensor w2) -> Tensor");
  m.def("moe_block(Tensor x, Tensor norm, float eps, Tensor gate, Tensor? bias, bool sigmoid, int top_k, "
        "int n_group, int topk_group, int group_mode, bool normalise, bool scale, float scaling, Tensor w1, "
        "Tensor w2, Tensor w3, Tensor? sw1, Tensor? sw3, Tensor? sw2) -> Tensor");
  m.def("mla_decode_step(Tensor ids, Tensor positions, Tensor embed, Tensor inv_freq, float amplitude, "
        "Tensor[] weights, int[] ints, float[] floats, int[] dims, Tensor[] caches, int position, Tensor? slots, "
        "Tensor? tables, int keys, Tensor? visible, Tensor norm, float norm_eps) -> Tensor");
  m.def("mla_decode(Tensor q_nope, Tensor q_pe, Tensor latent, Tensor wkv_b, int v_dim, float scale, Tensor? mask)"
        " -> Tensor");
}

TORCH_LIBRARY_IMPL(dsmoe_cpu, CPU, m) {
  m.impl("linear", &linear);
  m.impl("swiglu", &swiglu);
  m.impl("moe_experts", &moe_experts);
  m.impl("mla_decode", &mla_decode);
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("route", &route);
  m.impl("mla_project", &mla_project);
  m.impl("mlp_block", &mlp_block);
  m.impl("moe_block", &moe_block);
  m.impl("mla_decode_step", &mla_decode_step);
}
