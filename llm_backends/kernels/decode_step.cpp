// A whole decode step of a Gemma 3 or Qwen 3 text decoder with int8 weights, in one call that holds no Python
// lock: the layers, the final norm and the output head, for the new tokens of each of M sessions (one each while
// they decode; a short piece of a prompt for a session that is reading one, so arriving prompts share the step).
//
// It runs the operations of decode_step.DecodeStep (fused attention) in the same order on the same values, with
// the same kernels (linear, rms_norm, attend) and the same ATen calls for the activations; the rotary products,
// the MLP's product and the residual sums are written out, one rounding each as in ATen (built with
// -ffp-contract=off). So its logits are bitwise those of the Python step (a test holds it to that).
//
// Why: run from Python, a step of Gemma 3 270M makes ~1,000 calls, each letting go of the interpreter lock and
// taking it back. With a server's other threads (HTTP, streams) wanting that lock, every call could wait for
// one of them, and an 8-session step took twice as long in the server as alone.
//
// Each session's cache layer is a buffer [1, Hk, capacity, D] with room for the new tokens (kv_layers.py makes
// it): the step writes the keys and values of a row's n tokens at write..write+n-1, and token t attends over
// positions start..write+t (on a sliding layer, the last `window` of them). A token's attention is computed
// alone over keys in order, so a piece of a prompt read here gets bitwise the values of its tokens decoded one
// at a time.
#include "cpu_ops.h"

#include <ATen/Parallel.h>

namespace {

struct Linear8 {
  torch::Tensor packed, scale;
  c10::optional<torch::Tensor> bias;
  int64_t in_features = 0;
  torch::Tensor operator()(const torch::Tensor& x) const { return linear(x, packed, scale, bias, in_features); }
};

struct Norm {
  torch::Tensor gain;
  double eps = 0;
  torch::Tensor operator()(const torch::Tensor& x) const { return rms_norm(x, gain, eps); }
};

struct Layer {
  Norm input, q_norm, k_norm, post_attention, pre_feedforward, post_feedforward;  // the last two: Gemma's only
  Linear8 q, k, v, o, gate, up, down;
  int64_t heads = 0, kv_heads = 0, head_dim = 0, rotation = 0, window = 0;  // window 0: full attention
  double scaling = 1;
};

constexpr int64_t NORMS = 6, LINEARS = 7;
constexpr int64_t ACTIVATION = 4096;  // values per activation call (see mlp)  // per layer: gains, then (packed, scale, bias) for each linear

Linear8 linear_at(const std::vector<torch::Tensor>& tensors, int64_t index, double in_features) {
  const auto& bias = tensors[NORMS + 3 * index + 2];
  return {tensors[NORMS + 3 * index], tensors[NORMS + 3 * index + 1],
          bias.numel() ? c10::optional<torch::Tensor>(bias) : c10::nullopt, (int64_t)in_features};
}

// x * cos + rotate_half(x) * sin for n vectors of D values, each product and the sum rounded once.
void rotate(const float* x, const float* cos, const float* sin, int64_t D, float* out) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float a = x[d] * cos[d], b = -x[d + half] * sin[d];
    out[d] = a + b;
  }
  for (int64_t d = half; d < D; ++d) {
    const float a = x[d] * cos[d], b = x[d - half] * sin[d];
    out[d] = a + b;
  }
}

}  // namespace

class NativeDecodeStep {
 public:
  // tensors[l]: 6 norm gains (input, q, k, post-attention, pre- and post-feedforward; the last two empty without
  // them), then packed, scale and bias (empty: none) of q, k, v, o, gate, up, down. numbers[l]: the 6 norms'
  // eps, the 7 linears' in_features, heads, kv_heads, head_dim, rotation (index into the cos/sin lists), scaling,
  // sliding window (0: none).
  NativeDecodeStep(std::vector<std::vector<torch::Tensor>> tensors, std::vector<std::vector<double>> numbers,
                   torch::Tensor final_gain, double final_eps, std::vector<torch::Tensor> head, int64_t head_in,
                   bool sandwich, std::string activation)
      : final_norm_{final_gain, final_eps}, sandwich_(sandwich), gelu_(activation == "gelu_tanh") {
    TORCH_CHECK(activation == "gelu_tanh" || activation == "silu", "unknown activation ", activation);
    TORCH_CHECK(tensors.size() == numbers.size() && !tensors.empty(), "one entry of tensors and numbers per layer");
    TORCH_CHECK(head.size() == 3, "the head is packed, scale, bias");
    head_ = {head[0], head[1], head[2].numel() ? c10::optional<torch::Tensor>(head[2]) : c10::nullopt, head_in};
    for (size_t l = 0; l < tensors.size(); ++l) {
      const auto& t = tensors[l];
      const auto& n = numbers[l];
      TORCH_CHECK((int64_t)t.size() == NORMS + 3 * LINEARS && n.size() == NORMS + LINEARS + 6, "layer ", l,
                  ": wrong number of tensors or numbers");
      Layer layer;
      Norm* norms[NORMS] = {&layer.input,          &layer.q_norm,          &layer.k_norm,
                            &layer.post_attention, &layer.pre_feedforward, &layer.post_feedforward};
      for (int64_t i = 0; i < NORMS; ++i) *norms[i] = {t[i], n[i]};
      Linear8* linears[LINEARS] = {&layer.q, &layer.k, &layer.v, &layer.o, &layer.gate, &layer.up, &layer.down};
      for (int64_t i = 0; i < LINEARS; ++i) *linears[i] = linear_at(t, i, n[NORMS + i]);
      const double* rest = n.data() + NORMS + LINEARS;
      layer.heads = (int64_t)rest[0];
      layer.kv_heads = (int64_t)rest[1];
      layer.head_dim = (int64_t)rest[2];
      layer.rotation = (int64_t)rest[3];
      layer.scaling = rest[4];
      layer.window = (int64_t)rest[5];
      TORCH_CHECK(layer.head_dim % 2 == 0 && layer.heads % layer.kv_heads == 0, "layer ", l, ": bad head shapes");
      TORCH_CHECK(!sandwich || (layer.pre_feedforward.gain.numel() && layer.post_feedforward.gain.numel()),
                  "layer ", l, ": sandwich norms missing");
      layers_.push_back(std::move(layer));
    }
  }

  // hidden: [T, H] embeddings of all rows' tokens, row after row; cos[r], sin[r]: [T, D] for rotation r; keys,
  // values: the layers' buffers, layer by layer, M each (index l * M + i); places: [L * M, 2] int64 (start,
  // write); counts: tokens per row (M of them, summing to T); wanted: the rows whose last token's logits are
  // returned, in that order. Returns logits [wanted, V].
  torch::Tensor operator()(torch::Tensor hidden, std::vector<torch::Tensor> cos, std::vector<torch::Tensor> sin,
                           std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values, torch::Tensor places,
                           std::vector<int64_t> counts, std::vector<int64_t> wanted) {
    const int64_t L = (int64_t)layers_.size(), M = (int64_t)counts.size();
    TORCH_CHECK(hidden.dim() == 2 && hidden.scalar_type() == torch::kFloat32 && hidden.device().is_cpu(),
                "hidden must be [T, H] float32 on the CPU");
    const int64_t T = hidden.size(0);
    std::vector<int64_t> first(M + 1, 0);  // row i's tokens are first[i]..first[i+1]-1
    for (int64_t i = 0; i < M; ++i) {
      TORCH_CHECK(counts[i] > 0, "row ", i, " has no tokens");
      first[i + 1] = first[i] + counts[i];
    }
    TORCH_CHECK(first[M] == T, "counts sum to ", first[M], ", hidden has ", T, " tokens");
    TORCH_CHECK((int64_t)keys.size() == L * M && (int64_t)values.size() == L * M, "a key and value buffer per layer "
                "and row");
    TORCH_CHECK(places.scalar_type() == torch::kLong && places.is_contiguous() && places.numel() == 2 * L * M,
                "places must be [L * M, 2] int64");
    TORCH_CHECK(cos.size() == sin.size(), "as many cos as sin tensors");
    for (size_t r = 0; r < cos.size(); ++r) {
      TORCH_CHECK(cos[r].device().is_cpu() && sin[r].device().is_cpu() && cos[r].scalar_type() == torch::kFloat32 &&
                      sin[r].scalar_type() == torch::kFloat32 &&
                      cos[r].is_contiguous() && sin[r].is_contiguous() && cos[r].numel() == sin[r].numel(),
                  "cos and sin must be contiguous float32");
    }
    std::vector<int64_t> last;
    for (int64_t i : wanted) {
      TORCH_CHECK(0 <= i && i < M, "wanted row ", i, " is not a row");
      last.push_back(first[i + 1] - 1);
    }
    const int64_t* place = places.data_ptr<int64_t>();
    auto h = hidden.contiguous();
    for (int64_t l = 0; l < L; ++l) {
      const Layer& layer = layers_[l];
      const int64_t Hq = layer.heads, Hk = layer.kv_heads, D = layer.head_dim;
      TORCH_CHECK(layer.rotation < (int64_t)cos.size() && cos[layer.rotation].numel() == T * D, "layer ", l,
                  ": no rotation for it");
      const float* c = cos[layer.rotation].data_ptr<float>();
      const float* s = sin[layer.rotation].data_ptr<float>();

      auto x = layer.input(h);
      auto q = layer.q_norm(layer.q(x).view({T * Hq, D}));
      auto k = layer.k_norm(layer.k(x).view({T * Hk, D}));
      auto v = layer.v(x).contiguous();
      TORCH_CHECK(q.numel() == T * Hq * D && k.numel() == T * Hk * D && v.numel() == T * Hk * D, "layer ", l,
                  ": projections do not match the head shapes");
      const float* qp = q.data_ptr<float>();
      const float* kp = k.data_ptr<float>();
      const float* vp = v.data_ptr<float>();

      auto rotated = torch::empty({T, Hq, D}, h.options());
      float* rp = rotated.data_ptr<float>();
      std::vector<KeyValues> rows;  // one per token: the keys and values it attends to
      rows.reserve(T);
      for (int64_t i = 0; i < M; ++i) {
        const auto& kb = keys[l * M + i];
        const auto& vb = values[l * M + i];
        const int64_t start = place[2 * (l * M + i)], write = place[2 * (l * M + i) + 1];
        TORCH_CHECK(kb.device().is_cpu() && vb.device().is_cpu() && kb.scalar_type() == torch::kFloat32 &&
                        vb.scalar_type() == torch::kFloat32 && kb.is_contiguous() &&
                        vb.is_contiguous() && kb.dim() == 4 && kb.size(0) == 1 && kb.size(1) == Hk &&
                        kb.size(3) == D && vb.sizes() == kb.sizes(),
                    "layer ", l, " row ", i, ": the cache buffers must be contiguous [1, ", Hk, ", capacity, ", D,
                    "] float32");
        TORCH_CHECK(0 <= start && start <= write && write + counts[i] <= kb.size(2), "layer ", l, " row ", i,
                    ": no room for ", counts[i], " at ", write);
        const int64_t capacity = kb.size(2);
        float* key_out = kb.data_ptr<float>();
        float* value_out = vb.data_ptr<float>();
        for (int64_t t = 0; t < counts[i]; ++t) {
          const int64_t g = first[i] + t, at = write + t;
          for (int64_t j = 0; j < Hq; ++j) rotate(qp + (g * Hq + j) * D, c + g * D, s + g * D, D, rp + (g * Hq + j) * D);
          for (int64_t j = 0; j < Hk; ++j) {
            rotate(kp + (g * Hk + j) * D, c + g * D, s + g * D, D, key_out + (j * capacity + at) * D);
            std::memcpy(value_out + (j * capacity + at) * D, vp + (g * Hk + j) * D, D * sizeof(float));
          }
          const int64_t from = layer.window ? std::max(start, at - (layer.window - 1)) : start;
          rows.push_back({key_out + from * D, value_out + from * D, Hk, capacity * D, capacity * D, at - from + 1});
        }
      }
      auto attended = torch::empty({T, Hq * D}, h.options());
      attend(rp, rows, Hq, D, layer.scaling, attended.data_ptr<float>());
      auto out = layer.o(attended);

      if (sandwich_) {
        h = add(h, layer.post_attention(out));
        h = add(h, layer.post_feedforward(mlp(layer, layer.pre_feedforward(h))));
      } else {
        h = add(h, out);
        h = add(h, mlp(layer, layer.post_attention(h)));
      }
    }
    if (last.empty()) return torch::empty({0, head_.scale.size(0)}, h.options());
    bool every = (int64_t)last.size() == T;  // each token's logits, in order: no selection needed
    for (int64_t j = 0; every && j < T; ++j) every = last[j] == j;
    if (!every) h = h.index_select(0, torch::tensor(last, torch::kLong));
    return head_(final_norm_(h));
  }

 private:
  torch::Tensor mlp(const Layer& layer, const torch::Tensor& x) const {
    auto gate = layer.gate(x);
    auto up = layer.up(x);
    // The activation a few rows at a time: ATen splits a larger call between threads, and where a split falls
    // inside a vector its last values take the scalar formula, whose last bit may differ. Calls of at most
    // ACTIVATION values (one thread) keep every row's values the same in any batch and any piece. The product
    // with `up` is ATen's elementwise one, written out (one rounding): an ATen call over a long piece of a
    // prompt would start OpenMP's threads, which then spin on the cores this step's own threads use.
    const int64_t width = gate.size(-1), rows = gate.numel() / width;
    const int64_t step = width % 16 ? 1 : std::max<int64_t>(1, ACTIVATION / width);
    auto active = torch::empty_like(gate);
    const bool inference = c10::InferenceMode::is_enabled();  // a thread-local mode, which ATen's calls check
    parallel_for((rows + step - 1) / step, 1, [&](int64_t begin, int64_t end) {
      c10::InferenceMode mode(inference);
      for (int64_t r = begin * step; r < std::min(rows, end * step); r += step) {
        const int64_t n = std::min(step, rows - r);
        auto out = active.narrow(0, r, n);
        if (gelu_) {
          at::gelu_out(out, gate.narrow(0, r, n), "tanh");
        } else {
          at::silu_out(out, gate.narrow(0, r, n));
        }
        float* a = out.data_ptr<float>();
        const float* u = up.data_ptr<float>() + r * width;
        for (int64_t j = 0; j < n * width; ++j) a[j] = a[j] * u[j];
      }
    });
    return layer.down(active);
  }

  // a + b elementwise (ATen's sum, one rounding each), on the kernels' threads (see mlp).
  static torch::Tensor add(const torch::Tensor& a, const torch::Tensor& b) {
    TORCH_CHECK(a.sizes() == b.sizes() && a.is_contiguous() && b.is_contiguous(), "add: shapes differ");
    auto sum = torch::empty_like(a);
    const float* ap = a.data_ptr<float>();
    const float* bp = b.data_ptr<float>();
    float* sp = sum.data_ptr<float>();
    parallel_for(a.numel(), 4096, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) sp[j] = ap[j] + bp[j];
    });
    return sum;
  }

  std::vector<Layer> layers_;
  Norm final_norm_;
  Linear8 head_;
  bool sandwich_, gelu_;
};

void register_decode_step(pybind11::module& m) {
  // module_local: the AVX2 build a test loads next to the native one registers the same class.
  pybind11::class_<NativeDecodeStep>(m, "NativeDecodeStep", pybind11::module_local())
      .def(pybind11::init<std::vector<std::vector<torch::Tensor>>, std::vector<std::vector<double>>, torch::Tensor,
                          double, std::vector<torch::Tensor>, int64_t, bool, std::string>())
      .def("__call__", &NativeDecodeStep::operator(), "one step for M sessions' new tokens: logits [wanted, V]",
           pybind11::call_guard<pybind11::gil_scoped_release>());
}
