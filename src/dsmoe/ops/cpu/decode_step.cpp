// The whole decode step of an MLA model in one OpenMP parallel region: dsmoe_cpu.mla_decode_step (issue 16).
//
// Composed from the operators (mla_project, mla_decode, linear, moe_block), a step of the benchmark's 4-layer
// model ran ~40 parallel regions and ~150 ATen allocations and views; at batch 1 the attention's small matrices
// (q and KV projections, W_UK / W_UV) streamed at half the bandwidth the large ones reach, the threads starting
// and stopping around a few hundred KiB each time. Here the
// threads enter one region for the whole step and meet at a barrier between dependent stages (9 per MoE layer);
// small per-row work (norms, rope, the expert choice) is done by every thread for itself instead of handed over.
// Every number comes from the same arithmetic (kernel_math.h) in the same order as the operators' composition,
// rounded to bf16 at the same points when the model is bf16: the step equals its slow twin,
// dsmoe.kernel_step.decode_layers, bit for bit (tests/test_kernel_step.py).
//
// Arguments (dsmoe.kernel_step.MLAStepPlan flattens a model's layers once and keeps them in an MLAStep, below):
//   weights: per layer kSlots tensors: attn_norm, wq_a, q_norm, wq (wq_b with q-LoRA), wkv_a, kv_norm, wkv_b, wo,
//            ffn_norm, gate, gate_bias, w1, w2, w3, shared_w1, shared_w3, shared_w2 (absent ones: empty tensors);
//            a dense layer's MLP is w1, w2, w3;
//   ints:    per layer kInts: has_q_lora, is_moe, has_shared, sigmoid, top_k, n_group, topk_group, group_mode,
//            normalise, scale;
//   floats:  per layer kFloats: attn_eps, q_eps, kv_eps, ffn_eps, softmax scale, routed scaling;
//   dims:    nope_dim, rope_dim, v_dim, interleaved.
// caches: per layer either the contiguous latent cache (B, L, C + R) (tables absent: row `position` is written,
// rows 0..position read) or the paged pool (NB, P, C + R) (tables (B, K) given: each row written at slots[b],
// keys read in place through the block table, the first `keys` of them). visible (B, S) or none: the keys each
// row may see. ids (B,), positions (B,) rope positions -> final-normed hidden states (B, D). The caches are written
// in place (the schema does not say so: this operator is for eager calls, never traced). The norm weights and
// caches share the embedding's dtype (fp32 or bf16); matrices are fp32 or bf16.

#include <omp.h>

#include "kernel_math.h"

namespace {

using namespace dsmoe_cpu;

constexpr int64_t kSlots = 17, kInts = 10, kFloats = 6;

// A row-major matrix of fp32 or bf16 elements, K wide (a weight, or one expert's slice of the stacked weights).
struct Matrix {
  const char* data = nullptr;
  int64_t itemsize = 4, K = 0;
  Matrix() = default;
  explicit Matrix(const at::Tensor& t)
      : data(t.numel() ? static_cast<const char*>(t.data_ptr()) : nullptr), itemsize(t.element_size()),
        K(t.dim() ? t.size(-1) : 0) {}
  Matrix shifted(int64_t elements) const {
    Matrix m = *this;
    m.data += elements * itemsize;
    return m;
  }
  template <typename Fn>
  void typed(Fn fn) const {
    if (itemsize == 4) fn(reinterpret_cast<const float*>(data));
    else fn(reinterpret_cast<const uint16_t*>(data));
  }
  // rows [n0, n1) against M tokens x (M, K) -> out[m * stride + n]
  void dot(int64_t M, const float* x, int64_t n0, int64_t n1, float* out, int64_t stride) const {
    typed([&](auto* w) { dot_rows(M, w, x, K, n0, n1, out, stride); });
  }
  // RMSNorm with this (D,) weight of a row r (D,) -> y (rms_row)
  void rms(const float* r, int64_t D, double eps, bool x_half, float* y) const {
    typed([&](auto* w) { rms_row(r, w, D, eps, x_half, y); });
  }
};

// A weight the step reads: contiguous fp32 or bf16 of these sizes (a size of -1: any), else an error naming it.
void check_weight(const char* op, int64_t layer, const char* name, const at::Tensor& t, at::IntArrayRef sizes) {
  bool fits = t.dim() == static_cast<int64_t>(sizes.size());
  for (size_t i = 0; fits && i < sizes.size(); ++i) fits = sizes[i] < 0 || t.size(i) == sizes[i];
  TORCH_CHECK(fits && t.is_contiguous() && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16), op,
              ": layer ", layer, "'s ", name, " is ", t.sizes(), " ", t.scalar_type(),
              (t.is_contiguous() ? "" : " (not contiguous)"), "; expected a contiguous fp32/bf16 ", sizes);
}

// One layer's operands, read out of the flat lists once per call.
struct Layer {
  Matrix attn_norm, wq_a, q_norm, wq, wkv_a, kv_norm, wkv_b, wo, ffn_norm, gate, w1, w2, w3, sw1, sw3, sw2;
  const float* gate_bias = nullptr;
  bool lora, moe, shared;
  RouteRule rule;
  double attn_eps, q_eps, kv_eps, ffn_eps;
  float scale;
  int64_t Rq, Qw, H, E, I, Is, F;  // q rank, query width, heads, experts, expert / shared / dense widths
  const char* cache;               // the layer's latent cache or pool
};

// [begin, end) of n items for thread t of T: contiguous shares whose sizes differ by at most one.
inline std::pair<int64_t, int64_t> share(int64_t n, int64_t t, int64_t T) { return {n * t / T, n * (t + 1) / T}; }

at::Tensor mla_decode_step(const at::Tensor& ids_in, const at::Tensor& positions, const at::Tensor& embed,
                           const at::Tensor& inv_freq, double amplitude, at::TensorList weights, at::IntArrayRef ints,
                           at::ArrayRef<double> floats, at::IntArrayRef dims, at::TensorList caches, int64_t position,
                           const c10::optional<at::Tensor>& slots_in, const c10::optional<at::Tensor>& tables_in,
                           int64_t keys, const c10::optional<at::Tensor>& visible_in, const at::Tensor& norm,
                           double norm_eps) {
  const char* op = "dsmoe_cpu.mla_decode_step";
  const int64_t nl = static_cast<int64_t>(caches.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == nl * kSlots && static_cast<int64_t>(ints.size()) == nl * kInts &&
                  static_cast<int64_t>(floats.size()) == nl * kFloats && dims.size() == 4,
              op, ": ", nl, " layers need ", nl * kSlots, " weights, ", nl * kInts, " ints and ", nl * kFloats, " floats");
  const int64_t N = dims[0], R = dims[1], V = dims[2], half_r = R / 2;
  const bool interleaved = dims[3] != 0;
  const int64_t B = ids_in.size(0), D = embed.size(1);
  TORCH_CHECK(B >= 1 && B <= kMaxTokens, op, ": at most ", kMaxTokens, " rows, got ", B);
  TORCH_CHECK(positions.numel() == B, op, ": ", positions.numel(), " rope positions for ", B, " rows");
  TORCH_CHECK(embed.dim() == 2 && embed.is_contiguous() && norm.dim() == 1 && norm.size(0) == D && norm.is_contiguous(),
              op, ": embedding ", embed.sizes(), " and final norm ", norm.sizes(), " must be contiguous (V, D) and (D,)");
  TORCH_CHECK(embed.scalar_type() == at::kFloat || embed.scalar_type() == at::kBFloat16, op,
              ": the embedding must be float32 or bfloat16, got ", embed.scalar_type());
  const auto act_type = embed.scalar_type();
  const bool half = act_type == at::kBFloat16;  // activations are bf16: round where the eager step holds bf16
  at::Tensor ids = ids_in.to(at::kLong).contiguous();
  const int64_t* idp = ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(idp[b] >= 0 && idp[b] < embed.size(0), op, ": row ", b, " has token id ", idp[b], ", vocabulary ",
                embed.size(0));
  TORCH_CHECK(norm.scalar_type() == act_type, op, ": the final norm's dtype ", norm.scalar_type(),
              " differs from the embedding's ", act_type);

  // Rope's cos / sin per row as RotaryEmbedding computes them (in the activations' dtype).
  at::Tensor freqs = positions.to(at::kFloat).unsqueeze(1) * inv_freq.unsqueeze(0);  // (B, R/2)
  at::Tensor cos = (freqs.cos() * amplitude).to(act_type).to(at::kFloat).contiguous();
  at::Tensor sin = (freqs.sin() * amplitude).to(act_type).to(at::kFloat).contiguous();
  TORCH_CHECK(cos.size(1) == half_r, op, ": inv_freq has ", cos.size(1), " entries for rope_dim ", R);

  // Paged caches: slots and block tables as int64.
  const bool paged = tables_in.has_value();
  at::Tensor slots, tables;
  if (paged) {
    TORCH_CHECK(slots_in.has_value(), op, ": a paged step needs slots with its tables");
    slots = slots_in->to(at::kLong).contiguous();
    tables = tables_in->to(at::kLong).contiguous();
    TORCH_CHECK(slots.numel() == B && tables.dim() == 2 && tables.size(0) == B, op, ": slots ", slots.sizes(),
                " and tables ", tables.sizes(), " must be (B=", B, ",) and (B, K)");
    TORCH_CHECK(!caches.empty() && caches[0].dim() == 3, op, ": a paged step needs (NB, P, W) pools");
    const int64_t blocks = caches[0].size(0), page = caches[0].size(1);
    TORCH_CHECK(keys <= tables.size(1) * page, op, ": ", keys, " keys but the block tables cover ",
                tables.size(1) * page);
    const int64_t* sp = slots.data_ptr<int64_t>();
    const int64_t* tp = tables.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(sp[b] >= 0 && sp[b] < blocks * page, op, ": row ", b, "'s slot ", sp[b], " is outside the pool of ",
                  blocks * page);
      for (int64_t j = 0; j < (keys + page - 1) / page; ++j)
        TORCH_CHECK(tp[b * tables.size(1) + j] >= 0 && tp[b * tables.size(1) + j] < blocks, op, ": row ", b,
                    "'s block table names block ", tp[b * tables.size(1) + j], " of ", blocks);
    }
  }
  const int64_t S = paged ? keys : position + 1;
  TORCH_CHECK(S >= 1, op, ": no keys to attend to (position ", position, ", keys ", keys, ")");
  at::Tensor visible = visible_keys(op, visible_in, B, S);

  // The layers' operands, checked before any thread starts (nothing may throw inside the parallel region).
  std::vector<Layer> layers(nl);
  std::vector<at::Tensor> biases;  // the routers' biases as fp32 (kept alive for the pointers in layers)
  biases.reserve(nl);
  int64_t Wd = 0, C = 0, max_q = 0, max_rq = 0, max_e = 0, max_picks_i = 0, max_is = 0, max_f = 0, max_h = 0;
  for (int64_t l = 0; l < nl; ++l) {
    const at::Tensor* w = &weights[l * kSlots];
    const int64_t* in = &ints[l * kInts];
    const double* fl = &floats[l * kFloats];
    Layer& y = layers[l];
    y.lora = in[0] != 0;
    y.moe = in[1] != 0;
    y.shared = y.moe && in[2] != 0;
    for (int s : {0, 5, 8}) TORCH_CHECK(w[s].scalar_type() == act_type, op, ": layer ", l, "'s norm weights must be ", act_type);
    if (y.lora) TORCH_CHECK(w[2].scalar_type() == act_type, op, ": layer ", l, "'s q_norm must be ", act_type);
    check_weight(op, l, "attn_norm", w[0], {D});
    check_weight(op, l, "ffn_norm", w[8], {D});
    if (y.lora) {
      check_weight(op, l, "wq_a", w[1], {-1, D});
      check_weight(op, l, "q_norm", w[2], {w[1].size(0)});
    }
    check_weight(op, l, y.lora ? "wq_b" : "wq", w[3], {-1, y.lora ? w[1].size(0) : D});
    check_weight(op, l, "wkv_a", w[4], {-1, D});
    check_weight(op, l, "wkv_b", w[6], {-1, -1});
    check_weight(op, l, "wo", w[7], {D, -1});
    TORCH_CHECK(w[4].size(0) > R, op, ": layer ", l, "'s wkv_a has ", w[4].size(0), " rows for rope_dim ", R);
    check_weight(op, l, "kv_norm", w[5], {w[4].size(0) - R});
    y.attn_norm = Matrix(w[0]);
    y.wq_a = y.lora ? Matrix(w[1]) : Matrix();
    y.q_norm = y.lora ? Matrix(w[2]) : Matrix();
    y.wq = Matrix(w[3]);
    y.wkv_a = Matrix(w[4]);
    y.kv_norm = Matrix(w[5]);
    y.wkv_b = Matrix(w[6]);
    y.wo = Matrix(w[7]);
    y.ffn_norm = Matrix(w[8]);
    y.attn_eps = fl[0], y.q_eps = fl[1], y.kv_eps = fl[2], y.ffn_eps = fl[3];
    y.scale = static_cast<float>(fl[4]);
    y.Rq = y.lora ? w[1].size(0) : 0;
    y.Qw = w[3].size(0);
    TORCH_CHECK(y.Qw % (N + R) == 0, op, ": layer ", l, "'s query width ", y.Qw, " is not heads x ", N + R);
    y.H = y.Qw / (N + R);
    const int64_t Wl = w[4].size(0);
    TORCH_CHECK(l == 0 || Wl == Wd, op, ": layer ", l, " has a latent of ", Wl, " values, layer 0 of ", Wd);
    Wd = Wl, C = Wl - R;
    TORCH_CHECK(w[6].dim() == 2 && w[6].size(0) == y.H * (N + V) && w[6].size(1) == C && w[7].size(1) == y.H * V &&
                    w[7].size(0) == D && w[4].size(1) == D && (!y.lora || w[3].size(1) == y.Rq),
                op, ": layer ", l, "'s attention weights do not fit (wkv_b ", w[6].sizes(), ", wo ", w[7].sizes(), ")");
    const at::Tensor& cache = caches[l];
    TORCH_CHECK(cache.sizes() == caches[0].sizes(), op, ": layer ", l, "'s cache ", cache.sizes(), " differs from layer 0's ",
                caches[0].sizes());
    TORCH_CHECK(cache.dim() == 3 && cache.size(2) == Wd && cache.is_contiguous() && cache.scalar_type() == act_type,
                op, ": layer ", l, "'s cache ", cache.sizes(), " must be a contiguous ", act_type, " (", paged ? "NB, P" : "B, L",
                ", ", Wd, ")");
    if (!paged)
      TORCH_CHECK(cache.size(0) == B && position >= 0 && position < cache.size(1), op, ": position ", position,
                  " is outside layer ", l, "'s cache ", cache.sizes());
    y.cache = static_cast<const char*>(cache.data_ptr());
    if (y.moe) {
      check_weight(op, l, "gate", w[9], {-1, D});
      y.gate = Matrix(w[9]);
      if (w[10].numel()) {
        TORCH_CHECK(w[10].numel() == w[9].size(0), op, ": layer ", l, "'s gate bias has ", w[10].numel(),
                    " entries for ", w[9].size(0), " experts");
        biases.push_back(w[10].to(at::kFloat).contiguous());
        y.gate_bias = biases.back().data_ptr<float>();
      }
      y.rule = RouteRule{in[3] != 0, in[4], in[5], in[6], in[7], in[8] != 0, in[9] != 0, fl[5]};
      y.E = w[9].size(0), y.I = w[11].size(1);
      TORCH_CHECK(y.rule.top_k >= 1 && y.rule.top_k <= y.E && y.rule.n_group >= 1 && y.E % y.rule.n_group == 0 &&
                      y.rule.topk_group >= 1 && y.rule.topk_group <= y.rule.n_group,
                  op, ": layer ", l, "'s router settings do not fit ", y.E, " experts");
      TORCH_CHECK(w[11].dim() == 3 && w[11].sizes() == w[13].sizes() && w[11].size(0) == y.E && w[11].size(2) == D &&
                      w[12].dim() == 3 && w[12].size(0) == y.E && w[12].size(1) == D && w[12].size(2) == y.I,
                  op, ": layer ", l, "'s expert weights w1 ", w[11].sizes(), ", w2 ", w[12].sizes(), " do not fit");
      for (int s : {11, 12, 13}) check_weight(op, l, "expert weights", w[s], {y.E, -1, -1});
      y.w1 = Matrix(w[11]), y.w2 = Matrix(w[12]), y.w3 = Matrix(w[13]);
      y.Is = y.shared ? w[14].size(0) : 0;
      if (y.shared) {
        check_weight(op, l, "shared w1", w[14], {y.Is, D});
        check_weight(op, l, "shared w3", w[15], {y.Is, D});
        check_weight(op, l, "shared w2", w[16], {D, y.Is});
      }
      if (y.shared) y.sw1 = Matrix(w[14]), y.sw3 = Matrix(w[15]), y.sw2 = Matrix(w[16]);
      max_e = std::max(max_e, y.E);
      max_picks_i = std::max(max_picks_i, B * y.rule.top_k * y.I);
      max_is = std::max(max_is, y.Is);
    } else {
      check_weight(op, l, "w1", w[11], {-1, D});
      check_weight(op, l, "w3", w[13], w[11].sizes());
      check_weight(op, l, "w2", w[12], {D, w[11].size(0)});
      y.w1 = Matrix(w[11]), y.w2 = Matrix(w[12]), y.w3 = Matrix(w[13]);
      y.F = w[11].size(0);
      TORCH_CHECK(w[11].size(1) == D && w[12].size(0) == D && w[12].size(1) == y.F, op, ": layer ", l,
                  "'s MLP weights do not fit");
      max_f = std::max(max_f, y.F);
    }
    for (int s = 0; s < kSlots; ++s)
      TORCH_CHECK(!w[s].numel() || w[s].is_contiguous(), op, ": layer ", l, "'s weight ", s, " is not contiguous");
    max_q = std::max(max_q, y.Qw), max_rq = std::max(max_rq, y.Rq), max_h = std::max(max_h, y.H);
  }

  const int64_t T = at::get_num_threads();
  const int64_t chunks = latent_chunks(S, T), stride = chunk_state_stride(max_h, C);
  // Shared buffers (fp32; values representable in the activations' dtype where the eager step rounds).
  std::vector<float> x(B * D), y(B * D), z(B * D), qa(B * max_rq), kv(B * Wd), q(B * max_q), qfull(B * max_h * Wd),
      state(B * chunks * stride), ao(B * max_h * V), logits(B * max_e), hs(std::max<int64_t>(max_picks_i * kMaxTokens, 1)),
      sh(B * std::max(max_is, max_f));
  with_weight(embed, [&](auto* e) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t d = 0; d < D; ++d) x[b * D + d] = load1(e + idp[b] * D + d);
  });
  const float* cosp = cos.data_ptr<float>();
  const float* sinp = sin.data_ptr<float>();
  const bool* vis = visible.defined() ? visible.data_ptr<bool>() : nullptr;
  const int64_t vis_stride = visible.defined() ? visible.size(1) : 0;
  const int64_t* slotp = paged ? slots.data_ptr<int64_t>() : nullptr;
  const int64_t* tablep = paged ? tables.data_ptr<int64_t>() : nullptr;
  const int64_t page = paged ? caches[0].size(1) : 0, table_width = paged ? tables.size(1) : 0;
  const int64_t cache_len = paged ? 0 : caches[0].size(1);

  auto act = [half](float v) { return half ? round_bf16(v) : v; };

#pragma omp parallel num_threads(T)
  {
    const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
    std::vector<float> h(B * D), qn(B * std::max<int64_t>(max_rq, 1)), row(Wd), head(R), o(C),
        scores(max_h * ((S + chunks - 1) / chunks));
    // each picked expert's tokens, gathered (U, kMaxTokens, D); only the rows in use are written and read
    std::unique_ptr<float[]> xs_buf;
    int64_t xs_cap = 0;
    std::vector<float> wt;
    std::vector<int64_t> ix;
    // out[b] = act(RMSNorm(in[b]) with weight w) for every row b (each thread for itself: no barrier)
    auto norm_rows = [&](const Matrix& w, const float* in, int64_t width, double eps, float* out) {
      for (int64_t b = 0; b < B; ++b) {
        w.rms(in + b * width, width, eps, half, out + b * width);
        for (int64_t i = 0; i < width; ++i) out[b * width + i] = act(out[b * width + i]);
      }
    };
    // out[b, n] = act(w[n] . in[b]) for rows [n0, n1) of w, out rows `stride` wide
    auto project = [&](const Matrix& w, const float* in, int64_t n0, int64_t n1, float* out, int64_t stride) {
      w.dot(B, in, n0, n1, out, stride);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t n = n0; n < n1; ++n) out[b * stride + n] = act(out[b * stride + n]);
    };
    // out[b, n] = act(silu(w1[n] . h[b]) * (w3[n] . h[b])) for row n of a SwiGLU MLP `width` wide
    auto swiglu_row = [&](const Matrix& w1, const Matrix& w3, int64_t n, float* out, int64_t width) {
      float up[kMaxTokens];
      w1.dot(B, h.data(), n, n + 1, out, width);
      w3.dot(B, h.data(), n, n + 1, up - n, 1);
      for (int64_t b = 0; b < B; ++b) out[b * width + n] = act(silu(out[b * width + n]) * up[b]);
    };
    // x += w(in): this thread's share of x's D columns, rounded as the eager step's residual add
    auto add_projection = [&](const Matrix& w, const float* in) {
      auto [d0, d1] = share(D, t, nt);
      w.dot(B, in, d0, d1, y.data(), D);
      for (int64_t b = 0; b < B; ++b)
        for (int64_t d = d0; d < d1; ++d) x[b * D + d] = act(x[b * D + d] + act(y[b * D + d]));
    };
    for (int64_t l = 0; l < nl; ++l) {
      const Layer& L = layers[l];
      const int64_t H = L.H;
      // ---- attention input: h = attn_norm(x); [wq_a | wkv_a] (or [wq | wkv_a]) rows shared out ----
      norm_rows(L.attn_norm, x.data(), D, L.attn_eps, h.data());
      const Matrix& first = L.lora ? L.wq_a : L.wq;
      float* first_out = L.lora ? qa.data() : q.data();
      const int64_t n1 = L.lora ? L.Rq : L.Qw;
      auto [a0, a1] = share(n1 + Wd, t, nt);
      if (a0 < n1) project(first, h.data(), a0, std::min(a1, n1), first_out, n1);
      if (a1 > n1) project(L.wkv_a, h.data(), std::max(a0, n1) - n1, a1 - n1, kv.data(), Wd);
#pragma omp barrier
      if (L.lora) {  // q = wq_b(q_norm(wq_a h))
        norm_rows(L.q_norm, qa.data(), L.Rq, L.q_eps, qn.data());
        auto [q0, q1] = share(L.Qw, t, nt);
        project(L.wq, qn.data(), q0, q1, q.data(), L.Qw);
      }
      // ---- the new latent row [kv_norm(c_kv) | rope(k_pe)], written by thread 0 ----
      if (t == 0) {
        for (int64_t b = 0; b < B; ++b) {
          L.kv_norm.rms(&kv[b * Wd], C, L.kv_eps, half, row.data());
          rope_head(&kv[b * Wd + C], cosp + b * half_r, sinp + b * half_r, half_r, interleaved, row.data() + C);
          const int64_t dst = paged ? slotp[b] * Wd : (b * cache_len + position) * Wd;
          if (half) {
            auto* c = reinterpret_cast<c10::BFloat16*>(const_cast<char*>(L.cache)) + dst;
            for (int64_t i = 0; i < Wd; ++i) c[i] = c10::BFloat16(row[i]);
          } else {
            float* c = reinterpret_cast<float*>(const_cast<char*>(L.cache)) + dst;
            for (int64_t i = 0; i < Wd; ++i) c[i] = row[i];
          }
        }
      }
      if (L.lora) {
#pragma omp barrier
      }
      // ---- absorbed query per head: [q_nope W_UK | rope(q_pe)] ----
      {
        auto [h0, h1] = share(H, t, nt);
        for (int64_t hh = h0; hh < h1; ++hh)
          for (int64_t b = 0; b < B; ++b) {
            float* qh = &qfull[(b * H + hh) * Wd];
            const float* qb = &q[b * L.Qw + hh * (N + R)];
            std::fill(qh, qh + C, 0.0f);
            L.wkv_b.typed([&](auto* wp) { weighted_rows_sum(qb, N, wp + hh * (N + V) * C, C, C, qh); });
            rope_head(qb + N, cosp + b * half_r, sinp + b * half_r, half_r, interleaved, head.data());
            for (int64_t r = 0; r < R; ++r) qh[C + r] = act(head[r]);
          }
      }
#pragma omp barrier
      // ---- attention: (row, key chunk) items across threads, then each head's chunks merged and W_UV applied ----
      for (int64_t item = t; item < B * chunks; item += nt) {
        const int64_t b = item / chunks, c = item % chunks;
        auto run = [&](auto* base) {
          using Lt = std::remove_const_t<std::remove_pointer_t<decltype(base)>>;
          LatentRows<Lt> rows{base + (paged ? 0 : b * cache_len * Wd), Wd};
          if (paged) rows.table = tablep + b * table_width, rows.page = page;
          attend_chunk(&qfull[b * H * Wd], H, rows, S, C, L.scale, vis ? vis + b * vis_stride : nullptr, c, chunks,
                       scores.data(), &state[(b * chunks + c) * stride]);
        };
        if (half) run(reinterpret_cast<const uint16_t*>(L.cache));
        else run(reinterpret_cast<const float*>(L.cache));
      }
#pragma omp barrier
      {
        auto [i0, i1] = share(B * H, t, nt);
        for (int64_t item = i0; item < i1; ++item) {
          const int64_t b = item / H, hh = item % H;
          merge_chunks(&state[b * chunks * stride], stride, chunks, H, C, hh, o.data());
          float* out = &ao[(b * H + hh) * V];
          L.wkv_b.typed([&](auto* wp) { dot_rows(1, wp + (hh * (N + V) + N) * C, o.data(), C, 0, V, out, 1); });
          for (int64_t v = 0; v < V; ++v) out[v] = act(out[v]);
        }
      }
#pragma omp barrier
      add_projection(L.wo, ao.data());  // x += wo(attention)
#pragma omp barrier
      // ---- the FFN: h = ffn_norm(x) ----
      norm_rows(L.ffn_norm, x.data(), D, L.ffn_eps, h.data());
      if (!L.moe) {  // x += w2(silu(w1 h) * w3 h)
        auto [f0, f1] = share(L.F, t, nt);
        for (int64_t f = f0; f < f1; ++f) swiglu_row(L.w1, L.w3, f, sh.data(), L.F);
#pragma omp barrier
        add_projection(L.w2, sh.data());
#pragma omp barrier
        continue;
      }
      // ---- MoE (DeepSeekMoE section 3): router logits shared out, the choice made by every thread ----
      {
        auto [e0, e1] = share(L.E, t, nt);
        L.gate.dot(B, h.data(), e0, e1, logits.data(), L.E);
      }
#pragma omp barrier
      const int64_t k = L.rule.top_k;
      wt.resize(B * k);
      ix.resize(B * k);
      for (int64_t b = 0; b < B; ++b) select_experts(&logits[b * L.E], L.E, L.gate_bias, L.rule, &wt[b * k], &ix[b * k]);
      const ExpertGroups groups(ix.data(), B * k);
      const int64_t U = static_cast<int64_t>(groups.experts.size()), I = L.I;
      if (xs_cap < U * kMaxTokens * D) xs_buf.reset(new float[xs_cap = U * kMaxTokens * D]);
      float* xs = xs_buf.get();
      for (int64_t u = 0; u < U; ++u)
        for (size_t j = 0; j < groups.picks[u].size(); ++j)
          std::memcpy(&xs[(u * kMaxTokens + j) * D], &h[(groups.picks[u][j] / k) * D], D * sizeof(float));
      // up projections: the picked experts' rows, then the shared experts' rows, shared out
      {
        auto [r0, r1] = share(U * I + L.Is, t, nt);
        float up[kMaxTokens];
        for (int64_t r = r0; r < r1; ++r) {
          if (r < U * I) {  // hs = gate * silu(w1 x) * (w3 x), the gate folded in (w2 is linear)
            const int64_t u = r / I, i = r % I, n = static_cast<int64_t>(groups.picks[u].size());
            const int64_t e = groups.experts[u];
            float* hu = &hs[u * kMaxTokens * I];
            if (r + kAhead < std::min(r1, U * I)) {  // see prefetch_once
              const int64_t r2 = r + kAhead, row2 = (groups.experts[r2 / I] * I + r2 % I) * D;
              prefetch_once(L.w1.shifted(row2).data, D * L.w1.itemsize);
              prefetch_once(L.w3.shifted(row2).data, D * L.w3.itemsize);
            }
            L.w1.shifted(e * I * D).dot(n, &xs[u * kMaxTokens * D], i, i + 1, hu, I);
            L.w3.shifted(e * I * D).dot(n, &xs[u * kMaxTokens * D], i, i + 1, up - i, 1);
            for (int64_t j = 0; j < n; ++j) hu[j * I + i] = wt[groups.picks[u][j]] * silu(hu[j * I + i]) * up[j];
          } else {
            swiglu_row(L.sw1, L.sw3, r - U * I, sh.data(), L.Is);
          }
        }
      }
#pragma omp barrier
      // down projections, rows of x shared out: x += moe + shared
      {
        auto [d0, d1] = share(D, t, nt);
        for (int64_t b = 0; b < B; ++b) std::fill(&y[b * D + d0], &y[b * D + d1], 0.0f);
        float part[kMaxTokens];
        for (int64_t u = 0; u < U; ++u) {
          const int64_t n = static_cast<int64_t>(groups.picks[u].size());
          const Matrix down = L.w2.shifted(groups.experts[u] * D * I);
          for (int64_t d = d0; d < d1; ++d) {
            if (d + kAhead < d1) prefetch_once(down.shifted((d + kAhead) * I).data, I * down.itemsize);
            down.dot(n, &hs[u * kMaxTokens * I], d, d + 1, part - d, 1);
            for (int64_t j = 0; j < n; ++j) y[(groups.picks[u][j] / k) * D + d] += part[j];
          }
        }
        if (L.shared) L.sw2.dot(B, sh.data(), d0, d1, z.data(), D);
        for (int64_t b = 0; b < B; ++b)
          for (int64_t d = d0; d < d1; ++d) {
            float ffn = act(y[b * D + d]);
            if (L.shared) ffn = act(ffn + act(z[b * D + d]));
            x[b * D + d] = act(x[b * D + d] + ffn);
          }
      }
#pragma omp barrier
    }
  }

  // final norm: bf16 out when the activations and the weight are
  at::Tensor out = at::empty({B, D}, at::dtype(act_type));
  std::vector<float> normed(D);
  const Matrix final_norm(norm);
  for (int64_t b = 0; b < B; ++b) {
    final_norm.rms(&x[b * D], D, norm_eps, half, normed.data());
    if (half) {
      auto* o = out.data_ptr<at::BFloat16>() + b * D;
      for (int64_t d = 0; d < D; ++d) o[d] = at::BFloat16(normed[d]);
    } else {
      std::memcpy(out.data_ptr<float>() + b * D, normed.data(), D * sizeof(float));
    }
  }
  return out;
}

// The operands of mla_decode_step for one model, held on the C++ side (torch.classes.dsmoe_cpu.MLAStep): a decode
// step then passes only its own inputs. Converting the ~70 weights, ints and floats of the operator's arguments
// from Python lists took ~45 us of every call. head (V, D) given: `step` returns the logits (B, V) fp32 (rounded
// to the activations' dtype first, as the eager head's output is), else the final-normed hidden states.
struct MLAStep : torch::CustomClassHolder {
  std::vector<at::Tensor> weights;
  std::vector<int64_t> ints, dims;
  std::vector<double> floats;
  at::Tensor embed, inv_freq, norm;
  c10::optional<at::Tensor> head;
  double amplitude, norm_eps;

  MLAStep(std::vector<at::Tensor> weights, std::vector<int64_t> ints, std::vector<double> floats,
          std::vector<int64_t> dims, at::Tensor embed, at::Tensor inv_freq, double amplitude, at::Tensor norm,
          double norm_eps, c10::optional<at::Tensor> head)
      : weights(std::move(weights)), ints(std::move(ints)), dims(std::move(dims)), floats(std::move(floats)),
        embed(std::move(embed)), inv_freq(std::move(inv_freq)), norm(std::move(norm)), head(std::move(head)),
        amplitude(amplitude), norm_eps(norm_eps) {
    if (this->head.has_value())
      TORCH_CHECK(this->head->dim() == 2 && this->head->size(1) == this->embed.size(1) && this->head->is_contiguous() &&
                      (this->head->scalar_type() == at::kFloat || this->head->scalar_type() == at::kBFloat16),
                  "dsmoe_cpu.MLAStep: head ", this->head->sizes(), " must be a contiguous fp32/bf16 (V, D=",
                  this->embed.size(1), ")");
  }

  at::Tensor step(const at::Tensor& ids, const at::Tensor& positions, std::vector<at::Tensor> caches, int64_t position,
                  const c10::optional<at::Tensor>& slots, const c10::optional<at::Tensor>& tables, int64_t keys,
                  const c10::optional<at::Tensor>& visible) {
    at::Tensor h = mla_decode_step(ids, positions, embed, inv_freq, amplitude, weights, ints, floats, dims, caches,
                                   position, slots, tables, keys, visible, norm, norm_eps);
    if (!head.has_value()) return h;
    // the head as the eager step computes it: dsmoe_cpu.linear (its output in h's dtype), then widened
    static const auto linear = c10::Dispatcher::singleton()
                                   .findSchemaOrThrow("dsmoe_cpu::linear", "")
                                   .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
    return linear.call(h, *head).to(at::kFloat);
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(dsmoe_cpu, m) {
  m.class_<MLAStep>("MLAStep")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>, std::vector<int64_t>,
                       at::Tensor, at::Tensor, double, at::Tensor, double, c10::optional<at::Tensor>>())
      .def("step", &MLAStep::step);
}

TORCH_LIBRARY_IMPL(dsmoe_cpu, CPU, m) { m.impl("mla_decode_step", &mla_decode_step); }
