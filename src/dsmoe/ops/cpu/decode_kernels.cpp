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
//   mla_decode_step: a whole MLA-model decode step in one parallel region (decode_step.cpp)
// x and the output share a dtype (fp32 or bf16); weights are fp32 or bf16; all contiguous. The arithmetic they
// share with decode_step.cpp (dot products, norms, rope, the expert choice, attention chunks) is kernel_math.h.


#include "kernel_math.h"

namespace {

using namespace dsmoe_cpu;


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

  for (int64_t p = 0; p < M * k; ++p)
    TORCH_CHECK(ip[p] >= 0 && ip[p] < E, "dsmoe_cpu.moe_experts: token ", p / k, " picks expert ", ip[p], " of ", E);
  const ExpertGroups groups(ip, M * k);
  const std::vector<int64_t>& experts = groups.experts;
  const std::vector<std::vector<int64_t>>& pairs = groups.picks;
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
        if (r + kAhead < r1) {  // see prefetch_once
          const int64_t r2 = r + kAhead, row2 = (experts[r2 / I] * I + r2 % I) * D;
          prefetch_once(w1p + row2, D * sizeof(W));
          prefetch_once(w3p + row2, D * sizeof(W));
        }
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
          if (d + kAhead < d1) prefetch_once(c + (d + kAhead) * I, I * sizeof(W));
          dot_rows(n, c, &hs[u * kMaxTokens * I], I, d, d + 1, part - d, 1);
          for (int64_t j = 0; j < n; ++j) op[(pairs[u][j] / k) * D + d] += part[j];
        }
      }
    });
  });
  return out.finish();
}


// Attention of Q fp32 query rows (Q, W) of one sequence over its latent rows: the softmax-weighted sum of the
// rows' first C values -> y (Q, C), the keys split into chunks across threads (attend_chunk, merge_chunks).
template <typename L>
void attend_latent(const float* q, int64_t Q, const LatentRows<L>& rows, int64_t S, int64_t C, float scale,
                   const bool* visible, float* y) {
  const int64_t chunks = latent_chunks(S, at::get_num_threads()), stride = chunk_state_stride(Q, C);
  std::vector<float> state(chunks * stride);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> scores(Q * ((S + chunks - 1) / chunks));
    for (int64_t c = c0; c < c1; ++c)
      attend_chunk(q, Q, rows, S, C, scale, visible, c, chunks, scores.data(), &state[c * stride]);
  });
  for (int64_t m = 0; m < Q; ++m) merge_chunks(state.data(), stride, chunks, Q, C, m, y + m * C);
}

void check_latent(const char* op, const at::Tensor& latent, int64_t B, int64_t Wd) {
  TORCH_CHECK(latent.device().is_cpu() && latent.dim() == 3 && latent.size(0) == B && latent.size(2) == Wd &&
                  latent.size(1) > 0, op, ": latent ", latent.sizes(), " must be (B=", B, ", S>0, W=", Wd, ")");
  TORCH_CHECK(latent.stride(2) == 1 && latent.stride(1) == Wd, op, ": latent rows must be contiguous, strides ",
              latent.strides());
  TORCH_CHECK(latent.scalar_type() == at::kFloat || latent.scalar_type() == at::kBFloat16, op,
              ": latent must be float32 or bfloat16, got ", latent.scalar_type());
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
        attend_latent(&q[b * H * Wd], H, LatentRows<std::remove_const_t<std::remove_pointer_t<decltype(lp)>>>{
                          lp + b * latent.stride(0), Wd}, S, C, static_cast<float>(scale),
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
    for (int64_t m = 0; m < M; ++m) rms_row(xp + m * D, wp, D, eps, x_half, out.data + m * D);
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
  std::vector<float> head(R);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const float* c = cp + ((per_batch ? b * T : 0) + t) * half;
      const float* sv = sp + ((per_batch ? b * T : 0) + t) * half;
      for (int64_t h = 0; h < H; ++h) {
        const int64_t off = b * s0 + t * s1 + h * s2;
        for (int64_t r = 0; r < R; ++r) head[r] = fp32 ? xf[off + r * s3] : bf16_to_float(xh[off + r * s3]);
        rope_head(head.data(), c, sv, half, interleaved, out.data + ((b * T + t) * H + h) * R);
      }
    }
  return out.finish();
}

// The MoE router of dsmoe.model.moe.Router for a few tokens, in fp32: logits = x W^T, then each token's choice
// (select_experts: scoring, group limiting, top-k, normalised and scaled as the Router says).
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
  const RouteRule rule{sigmoid, top_k, n_group, topk_group, group_mode, normalise, scale, scaling};
  for (int64_t m = 0; m < M; ++m)
    select_experts(&logits[m * E], E, bias_p, rule, weights.data_ptr<float>() + m * top_k,
                   indices.data_ptr<int64_t>() + m * top_k);
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
}
