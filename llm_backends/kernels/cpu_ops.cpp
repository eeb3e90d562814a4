// CPU kernels whose results for one row never depend on the other rows in the call (see cpu_kernels.py).
//
// linear: y = x @ W^T + bias, with W stored as int8 with one fp32 scale per output channel, and x quantized to
// int8 on the fly in blocks of 32 features with one fp32 scale per block (as llama.cpp's Q8_0 activations).
//
// Each y[m][n] is scale[n] times the sum over blocks b, in increasing b, of xscale[m][b] times the exact integer
// dot product of the block's int8 activations and int8 weights (plus bias[n]). Integer sums are exact, and the
// float sum runs in a fixed order that does not depend on how many rows x has, which rows share a call or the
// thread count, so a prompt read in one pass, a token decoded alone and the same token decoded in a batch with
// other sessions get bitwise the same values. Products of 4 bytes at a time (AVX-512 VNNI's vpdpbusd where the
// CPU has it: 64 multiply-adds per instruction, 4x fp32 FMA) make a batch of rows cost far less than one FMA
// per weight and row. vpdpbusd multiplies unsigned by signed bytes, so weights are stored as w + 128 (uint8)
// and 128 times the block's activation sum is taken off. Weights are packed in panels of PANEL output
// channels, laid out [panel][k / 4][PANEL][4]: one 64-byte load brings 4 features of 16 channels, and each
// weight byte is read once per call.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "cpu_ops.h"

namespace {

// The kernels' loops run on threads of their own, not OpenMP's. Each thread, the caller included, claims the next
// chunk of a loop from a shared counter, and the caller waits only for chunks already claimed. In a server whose
// other threads (HTTP, event streams, clients) share the cores, a thread the OS has set aside then holds up at most
// the one chunk it took; an OpenMP loop waits at its barrier for that thread's whole share, in each of a decode
// step's ~130 loops. Eight sessions over HTTP on 2 cores: a step took 27-29 ms with OpenMP's loops, 20-24 ms with
// these (19-22 ms alone either way). Which thread computes a chunk changes none of its values.
class Pool {
 public:
  using Body = void (*)(const void* context, int64_t begin, int64_t end);

  // Runs body(context, begin, end) over [0, items) in chunks of at least `grain` items; returns when all have run.
  // A caller that finds the pool busy (another model's thread) runs the loop itself.
  void run(int64_t items, int64_t grain, Body body, const void* context) {
    if (items <= 0) return;
    const int64_t threads = at::get_num_threads();
    int64_t chunk = std::max<int64_t>(grain, 1);
    // about 16 chunks per thread: small enough that a delayed thread holds up little, few enough to claim cheaply
    chunk = std::max(chunk, (items + 16 * threads - 1) / (16 * threads));
    chunk = std::max(chunk, (items + MAX_CHUNKS - 1) / MAX_CHUNKS);
    const int64_t chunks = (items + chunk - 1) / chunk;
    std::unique_lock<std::mutex> turn(submit_, std::try_to_lock);
    if (chunks == 1 || threads <= 1 || !turn.owns_lock()) {
      body(context, 0, items);
      return;
    }
    start_workers(threads - 1);
    // After torch.set_num_threads lowered the count, the workers beyond it sit this loop out.
    active_.store(threads - 1, std::memory_order_relaxed);
    body_ = body;
    context_ = context;
    items_ = items;
    chunk_ = chunk;
    error_ = nullptr;
    finished_.store(0, std::memory_order_relaxed);
    const uint64_t generation = ((state_.load(std::memory_order_relaxed) >> 32) + 1) & 0xffffffff;
    state_.store((generation << 32) | ((uint64_t)chunks << 16), std::memory_order_seq_cst);
    if (sleeping_.load(std::memory_order_seq_cst) > 0) {
      std::lock_guard<std::mutex> lock(sleep_);
      wake_.notify_all();
    }
    work(generation);
    for (int64_t spins = 0; finished_.load(std::memory_order_acquire) < chunks; ++spins) {
      if (spins > 64) std::this_thread::yield();  // a worker holding a chunk may need this core
    }
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static constexpr int64_t MAX_CHUNKS = 0xffff;  // the chunk count and the next chunk share state_ (16 bits each)
  // Pauses a worker spins for before it sleeps (a few hundred microseconds here): a step's loops follow each other
  // within microseconds, while between steps a worker sleeps instead of taking a core from the server's threads.
  static constexpr int64_t SPIN = 20000;

  // Claims and runs chunks of the loop of `generation` until none is left (or another loop began).
  void work(uint64_t generation) {
    uint64_t state = state_.load(std::memory_order_acquire);
    for (;;) {
      const uint64_t next = state & 0xffff, chunks = (state >> 16) & 0xffff;
      if ((state >> 32) != generation || next >= chunks) return;
      if (!state_.compare_exchange_weak(state, state + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
        continue;
      }
      // Claimed: this loop cannot end, nor its fields change, before the chunk is counted as finished.
      const int64_t begin = (int64_t)next * chunk_, end = std::min(items_, begin + chunk_);
      try {
        body_(context_, begin, end);
      } catch (...) {
        std::lock_guard<std::mutex> lock(sleep_);
        if (!error_) error_ = std::current_exception();
      }
      finished_.fetch_add(1, std::memory_order_release);
      state = state_.load(std::memory_order_acquire);
    }
  }

  void start_workers(int64_t count) {
    while (started_ < count) {
      // Never joined: a worker waits for work or sleeps, and ends with the process.
      std::thread([this, index = started_] { serve(index); }).detach();
      ++started_;  // only once it exists (a thread that could not be made throws, and is asked for again)
    }
  }

  void serve(int64_t index) {
    uint64_t seen = state_.load(std::memory_order_acquire) >> 32;
    for (;;) {
      uint64_t generation = seen;
      for (int64_t spins = 0; spins < SPIN && (generation = state_.load(std::memory_order_acquire) >> 32) == seen;
           ++spins) {
#if defined(__x86_64__)
        __builtin_ia32_pause();
#endif
      }
      if (generation == seen) {
        sleeping_.fetch_add(1, std::memory_order_seq_cst);
        std::unique_lock<std::mutex> lock(sleep_);
        while ((generation = state_.load(std::memory_order_seq_cst) >> 32) == seen) wake_.wait(lock);
        sleeping_.fetch_sub(1, std::memory_order_seq_cst);
      }
      seen = generation;
      if (index < active_.load(std::memory_order_relaxed)) work(generation);
    }
  }

  std::mutex submit_, sleep_;
  std::condition_variable wake_;
  std::atomic<uint64_t> state_{0};  // generation (32 bits) | chunks (16) | next chunk (16)
  std::atomic<int64_t> finished_{0}, sleeping_{0};
  int64_t started_ = 0;  // workers made
  std::atomic<int64_t> active_{0};  // how many of them the current loop may use (a stale value only idles one)
  Body body_ = nullptr;
  const void* context_ = nullptr;
  int64_t items_ = 0, chunk_ = 1;
  std::exception_ptr error_;
};

// The one pool (never destroyed: its workers outlive any static destructor).
Pool& pool() {
  static Pool* instance = new Pool();
  return *instance;
}

// parallel(items, grain, f) calls f(begin, end) over chunks of [0, items) on the pool.
template <typename F>
void parallel(int64_t items, int64_t grain, const F& f) {
  pool().run(items, grain, [](const void* context, int64_t begin, int64_t end) {
    (*static_cast<const F*>(context))(begin, end);
  }, &f);
}

constexpr int64_t PANEL = 32;
constexpr int64_t BLOCK = 32;  // features per activation scale
#if defined(__AVX512F__)
constexpr int64_t ROWS = 6;  // rows of x per block: 12 integer and 12 float accumulators stay in the 32 registers
#else
constexpr int64_t ROWS = 1;  // 16 registers of half the width: more rows spill (8 rows, head: 53 ms at 1, 73 at 2)
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x64 __attribute__((vector_size(64)));

inline f32x16 broadcast(float v) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_set1_ps(v);
#else
  return f32x16{} + v;
#endif
}

inline f32x16 multiply_add(f32x16 a, f32x16 b, f32x16 c) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#else
  return a * b + c;  // built with -ffp-contract=off: the same two roundings for every row
#endif
}

#if defined(__AVX512VNNI__) || !defined(__AVX2__)
constexpr int32_t WEIGHT_OFFSET = 128;  // the products below read the stored q + 128 as it is
#else
constexpr int32_t WEIGHT_OFFSET = 0;  // the AVX2 products take the 128 off each weight byte themselves
#endif

// acc[j] += sum over t < 4 of w[4j + t] * x[t], w being the stored bytes less WEIGHT_OFFSET: one vpdpbusd with
// VNNI. Without it, AVX2 does what llama.cpp does for Q8_0: |x| times w with x's sign, in pairs that cannot
// overflow 16 bits (2 x 127 x 127), then in fours. Both are exact integer sums, so every path gives the same
// integers.
inline i32x16 dot4(i32x16 acc, const uint8_t* w, int32_t x4) {
#if defined(__AVX512VNNI__)
  return (i32x16)_mm512_dpbusd_epi32((__m512i)acc, _mm512_loadu_si512(w), _mm512_set1_epi32(x4));
#elif defined(__AVX2__)
  const __m256i x = _mm256_set1_epi32(x4);
  const __m256i size = _mm256_sign_epi8(x, x);
  const __m256i flip = _mm256_set1_epi8((char)0x80);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i half[2];
  std::memcpy(half, &acc, sizeof(acc));
  for (int h = 0; h < 2; ++h) {
    const __m256i signed_w = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + 32 * h)), flip);
    const __m256i pairs = _mm256_maddubs_epi16(size, _mm256_sign_epi8(signed_w, x));
    half[h] = _mm256_add_epi32(half[h], _mm256_madd_epi16(pairs, ones));
  }
  std::memcpy(&acc, half, sizeof(acc));
  return acc;
#else
  int8_t x[4];
  std::memcpy(x, &x4, 4);
  for (int j = 0; j < 16; ++j) {
    acc[j] += (int32_t)w[4 * j] * x[0] + (int32_t)w[4 * j + 1] * x[1] + (int32_t)w[4 * j + 2] * x[2] +
              (int32_t)w[4 * j + 3] * x[3];
  }
  return acc;
#endif
}

inline f32x16 to_float(i32x16 v) {
#if defined(__AVX512F__)
  return (f32x16)_mm512_cvtepi32_ps((__m512i)v);
#else
  f32x16 out;
  for (int j = 0; j < 16; ++j) out[j] = (float)v[j];
  return out;
#endif
}

// Quantized rows of x: int8 features (padded with zeros to the packing's Kp), and per block of 32 features
// its scale and WEIGHT_OFFSET times the sum of its int8 values (what the stored weights' offset adds).
struct Quantized {
  std::vector<int8_t> values;
  std::vector<float> scales;
  std::vector<int32_t> offsets;
};

// One block of n <= BLOCK features: its int8 values (x * 127 / largest |x|, rounded to nearest with ties to even
// as nearbyint does, within +-127), and the block's largest magnitude and value sum. The vector paths compute
// the same products and roundings as the scalar loop (a NaN is passed over by the largest magnitude in both),
// so every path gives the same bytes; the scalar loop took ~1.5 us per row of 640 features, which at 8 rows
// was ~2 ms of a decode step.
inline void quantize_block(const float* x, int64_t n, int8_t* out, float& largest, int32_t& sum) {
#if defined(__AVX512F__)
  if (n == BLOCK) {
    const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    // max_ps(p, q) is q when p is NaN: each |x| goes first, so a NaN never becomes the largest
    const __m512 most = _mm512_max_ps(_mm512_abs_ps(b), _mm512_max_ps(_mm512_abs_ps(a), _mm512_setzero_ps()));
    largest = _mm512_reduce_max_ps(most);
    const __m512 inverse = _mm512_set1_ps(largest > 0 ? 127.0f / largest : 0.0f);
    const __m512i low = _mm512_set1_epi32(-127), high = _mm512_set1_epi32(127);
    const __m512i va = _mm512_min_epi32(high, _mm512_max_epi32(low, _mm512_cvtps_epi32(_mm512_mul_ps(a, inverse))));
    const __m512i vb = _mm512_min_epi32(high, _mm512_max_epi32(low, _mm512_cvtps_epi32(_mm512_mul_ps(b, inverse))));
    sum = _mm512_reduce_add_epi32(_mm512_add_epi32(va, vb));
    _mm_storeu_si128((__m128i*)out, _mm512_cvtepi32_epi8(va));
    _mm_storeu_si128((__m128i*)(out + 16), _mm512_cvtepi32_epi8(vb));
    return;
  }
#elif defined(__AVX2__)
  if (n == BLOCK) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v[4], most = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_loadu_ps(x + 8 * i);
      most = _mm256_max_ps(_mm256_and_ps(v[i], magnitude), most);  // a NaN never becomes the largest
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, most);
    largest = 0;
    for (float lane : lanes) largest = std::max(largest, lane);
    const __m256 inverse = _mm256_set1_ps(largest > 0 ? 127.0f / largest : 0.0f);
    const __m256i low = _mm256_set1_epi32(-127), high = _mm256_set1_epi32(127);
    int32_t values[BLOCK];
    for (int i = 0; i < 4; ++i) {
      const __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));
      _mm256_storeu_si256((__m256i*)(values + 8 * i), _mm256_min_epi32(high, _mm256_max_epi32(low, r)));
    }
    sum = 0;
    for (int k = 0; k < BLOCK; ++k) {
      out[k] = (int8_t)values[k];
      sum += values[k];
    }
    return;
  }
#endif
  largest = 0;
  for (int64_t k = 0; k < n; ++k) largest = std::max(largest, std::fabs(x[k]));
  const float inverse = largest > 0 ? 127.0f / largest : 0.0f;
  sum = 0;
  for (int64_t k = 0; k < n; ++k) {
    const int32_t v = (int32_t)std::nearbyint(x[k] * inverse);
    out[k] = (int8_t)std::max(-127, std::min(127, v));
    sum += out[k];
  }
}

Quantized quantize(const float* x, int64_t M, int64_t K, int64_t Kp) {
  const int64_t blocks = Kp / BLOCK;
  Quantized q{std::vector<int8_t>(M * Kp, 0), std::vector<float>(M * blocks), std::vector<int32_t>(M * blocks)};
  parallel(M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t k0 = b * BLOCK, k1 = std::min(K, k0 + BLOCK);
        float largest;
        int32_t sum;
        quantize_block(x + m * K + k0, k1 - k0, q.values.data() + m * Kp + k0, largest, sum);
        q.scales[m * blocks + b] = largest / 127.0f;
        q.offsets[m * blocks + b] = WEIGHT_OFFSET * sum;
      }
    }
  });
  return q;
}

template <int R>
void block(const Quantized& q, int64_t m0, int64_t Kp, const uint8_t* panel, const float* scale, const float* bias,
           float* y, int64_t ldy, int64_t width) {
  const int64_t blocks = Kp / BLOCK;
  f32x16 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = f32x16{};
  for (int64_t b = 0; b < blocks; ++b) {
    i32x16 sums[R][2];
    for (int r = 0; r < R; ++r) sums[r][0] = sums[r][1] = i32x16{};
    const uint8_t* w = panel + b * BLOCK * PANEL;
    for (int64_t g = 0; g < BLOCK / 4; ++g) {
      for (int r = 0; r < R; ++r) {
        int32_t x4;
        std::memcpy(&x4, q.values.data() + (m0 + r) * Kp + b * BLOCK + 4 * g, 4);
        sums[r][0] = dot4(sums[r][0], w + g * 4 * PANEL, x4);
        sums[r][1] = dot4(sums[r][1], w + g * 4 * PANEL + 64, x4);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t at = (m0 + r) * blocks + b;
      const i32x16 offset = i32x16{} + q.offsets[at];
      const f32x16 s = broadcast(q.scales[at]);
      acc[r][0] = multiply_add(to_float(sums[r][0] - offset), s, acc[r][0]);
      acc[r][1] = multiply_add(to_float(sums[r][1] - offset), s, acc[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float out[PANEL];
    std::memcpy(out, &acc[r][0], sizeof(f32x16));
    std::memcpy(out + 16, &acc[r][1], sizeof(f32x16));
    float* row = y + r * ldy;
    for (int64_t j = 0; j < width; ++j) row[j] = out[j] * scale[j] + (bias ? bias[j] : 0.0f);
  }
}

// sum of a[i] * b[i] in a fixed order: 16 running lanes over the vector, then the lanes in order.
inline float ordered_dot(const float* a, const float* b, int64_t n) {
  float lanes[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int t = 0; t < 16; ++t) lanes[t] += a[i + t] * b[i + t];
  }
  for (int t = 0; i < n; ++t, ++i) lanes[t] += a[i] * b[i];
  float sum = 0;
  for (int t = 0; t < 16; ++t) sum += lanes[t];
  return sum;
}

using Block = void (*)(const Quantized&, int64_t, int64_t, const uint8_t*, const float*, const float*, float*, int64_t,
                       int64_t);
constexpr Block BLOCKS[7] = {nullptr, block<1>, block<2>, block<3>, block<4>, block<5>, block<6>};

}  // namespace

// weight: [N, K] float; returns (packed [ceil(N/PANEL), Kp/4, PANEL, 4] uint8 holding q + 128, scale [N] float),
// Kp being K rounded up to a whole block (the padding and a last panel's missing channels hold q = 0). Works
// through the rows a slice at a time, so packing a large output head needs little memory beyond the result.
std::vector<torch::Tensor> pack(torch::Tensor weight) {
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D");
  const int64_t N = weight.size(0), K = weight.size(1), panels = (N + PANEL - 1) / PANEL;
  const int64_t Kp = (K + BLOCK - 1) / BLOCK * BLOCK;
  auto packed = torch::full({panels, Kp / 4, PANEL, 4}, 128, torch::kUInt8);
  auto scale = torch::empty({N}, torch::kFloat32);
  constexpr int64_t SLICE = 128 * PANEL;
  for (int64_t n0 = 0; n0 < N; n0 += SLICE) {
    const int64_t rows = std::min(SLICE, N - n0);
    auto w = weight.narrow(0, n0, rows).to(torch::kFloat32).contiguous();
    auto s = (w.abs().amax(1) / 127.0f).clamp_min(1e-30f);
    auto q = (torch::round(w / s.unsqueeze(1)).clamp(-127, 127) + 128).to(torch::kUInt8);
    scale.narrow(0, n0, rows).copy_(s);
    auto padded = torch::full({(rows + PANEL - 1) / PANEL * PANEL, Kp}, 128, torch::kUInt8);
    padded.narrow(0, 0, rows).narrow(1, 0, K).copy_(q);
    // [panels, PANEL, Kp/4, 4] -> [panels, Kp/4, PANEL, 4]
    auto laid = padded.view({-1, PANEL, Kp / 4, 4}).permute({0, 2, 1, 3});
    packed.narrow(0, n0 / PANEL, laid.size(0)).copy_(laid);
  }
  return {packed, scale};
}

void parallel_for(int64_t items, int64_t grain, const std::function<void(int64_t, int64_t)>& f) {
  parallel(items, grain, f);
}

// x: [M, K] float32 as linear reads it: [M, Kp] int8 values and [M, Kp / 32] fp32 scales (one per block of 32).
std::vector<torch::Tensor> quantize_rows(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.device().is_cpu(), "x must be [M, K] float32");
  auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), Kp = (K + BLOCK - 1) / BLOCK * BLOCK;
  const Quantized q = quantize(xc.data_ptr<float>(), M, K, Kp);
  auto values = torch::empty({M, Kp}, torch::kInt8), scales = torch::empty({M, Kp / BLOCK}, torch::kFloat32);
  std::memcpy(values.data_ptr<int8_t>(), q.values.data(), q.values.size());
  std::memcpy(scales.data_ptr<float>(), q.scales.data(), q.scales.size() * sizeof(float));
  return {values, scales};
}

// The int8 rows of W for the given channels, as [len(ids), K] int8 (an embedding lookup on a tied table). A plain
// loop over the K bytes of each row: ATen's index_select here started an OpenMP team in every decode step, whose
// thread then spun on a core that the step's own threads wanted.
torch::Tensor rows(torch::Tensor packed, torch::Tensor ids, int64_t K) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 4 && packed.size(2) == PANEL &&
                  packed.size(3) == 4 && packed.is_contiguous() && packed.device().is_cpu(),
              "bad packing");
  const int64_t groups = packed.size(1), channels = packed.size(0) * PANEL;
  TORCH_CHECK(0 < K && K <= groups * 4, "the packing holds ", groups * 4, " features, not ", K);
  auto flat = ids.reshape({-1}).to(torch::kLong).contiguous();
  const int64_t n = flat.size(0);
  const int64_t* id = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) TORCH_CHECK(0 <= id[i] && id[i] < channels, "id ", id[i], " is out of range");
  auto out = torch::empty({n, K}, torch::kInt8);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  int8_t* op = out.data_ptr<int8_t>();
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t* column = wp + (id[i] / PANEL) * groups * PANEL * 4 + (id[i] % PANEL) * 4;
    for (int64_t k = 0; k < K; ++k) op[i * K + k] = (int8_t)((int32_t)column[(k / 4) * PANEL * 4 + k % 4] - 128);
  }
  return out;
}

// x: [..., K] float32 with K the weight's own feature count (the packing holds it padded to a whole block).
torch::Tensor linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                     int64_t in_features) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "x must be float32");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 4 && packed.size(2) == PANEL &&
                  packed.size(3) == 4 && (packed.size(1) * 4) % BLOCK == 0,
              "bad packing");
  TORCH_CHECK(packed.is_contiguous() && scale.is_contiguous() && scale.scalar_type() == torch::kFloat32 &&
                  packed.device().is_cpu() && x.device().is_cpu(),
              "packed weights and scales must be contiguous CPU tensors");
  const int64_t Kp = packed.size(1) * 4, N = scale.size(0), panels = packed.size(0), K = in_features;
  TORCH_CHECK(panels == (N + PANEL - 1) / PANEL, "the packing holds ", panels, " panels for ", N, " channels");
  TORCH_CHECK(!bias.has_value() || (bias->numel() == N && bias->is_contiguous() &&
                                    bias->scalar_type() == torch::kFloat32),
              "bias must be ", N, " contiguous float32 values");
  TORCH_CHECK(K <= Kp && K > Kp - BLOCK, "the packing holds ", Kp, " features, not ", K);
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " features, the weight ", K);
  auto shape = x.sizes().vec();
  auto x2 = x.reshape({-1, K}).contiguous();
  const int64_t M = x2.size(0);
  shape.back() = N;
  auto y = torch::empty({M, N}, x2.options());
  const Quantized q = quantize(x2.data_ptr<float>(), M, K, Kp);
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* sp = scale.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  parallel(panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * PANEL, width = std::min(PANEL, N - n0);
      const uint8_t* panel = wp + p * Kp * PANEL;
      // Rows in as few blocks as ROWS allows, of even sizes (8 rows: 4 + 4, not 6 + 2, whose second block
      // would load each weight for two rows only). A row's result does not depend on its block.
      const int64_t blocks = (M + ROWS - 1) / ROWS;
      for (int64_t b = 0, m = 0; b < blocks; ++b) {
        const int64_t r = M / blocks + (b < M % blocks ? 1 : 0);
        BLOCKS[r](q, m, Kp, panel, sp + n0, bp ? bp + n0 : nullptr, yp + m * N + n0, N, width);
        m += r;
      }
    }
  });
  return y.view(shape);
}

// RMS norm over the last dimension: y = x / sqrt(mean(x^2) + eps) * gain, each row summed in a fixed order
// (ordered_dot), so a row's result is the same in any call. ``gain`` is the model's weight, or 1 + weight for
// Gemma's norms, computed once by the caller.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor gain, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && gain.scalar_type() == torch::kFloat32, "float32 only");
  const int64_t D = x.size(-1);
  TORCH_CHECK(gain.numel() == D && gain.is_contiguous(), "gain must be ", D, " contiguous values");
  auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  const int64_t rows = D ? xc.numel() / D : 0;
  const float* xp = xc.data_ptr<float>();
  const float* gp = gain.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  parallel(rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* row = xp + r * D;
      const float sum = ordered_dot(row, row, D);
      const float inverse = 1.0f / std::sqrt(sum / (float)D + (float)eps);
      float* out = yp + r * D;
      for (int64_t j = 0; j < D; ++j) out[j] = (row[j] * inverse) * gp[j];
    }
  });
  return y;
}

// Attention of one new token per session over that session's own keys and values (a decode step), all
// sessions in one call: rows[i] says where session i's keys and values are. Each (session, head) pair is
// computed alone, in a fixed order: scores by ordered_dot, the softmax sum over keys in order, the output summed
// over keys in order. query: M * Hq * D floats; out: the same.
void attend(const float* query, const std::vector<KeyValues>& rows, int64_t Hq, int64_t D, double scale, float* out) {
  const int64_t M = (int64_t)rows.size();
  if (M == 0) return;
  // Work items: (token, key head) with the query heads that share that key head, so each key and value row is
  // read once for all of them (Gemma 3 270M: 4 query heads per key head); or (token, query head) where there
  // are too few of the former to keep the threads busy. The arithmetic of each head is the same either way.
  const int64_t Hk = rows[0].heads;
  for (const auto& row : rows) TORCH_CHECK(row.heads == Hk, "every row has the same key heads");
  const int64_t per_item = M * Hk >= at::get_num_threads() ? Hq / Hk : 1;
  const int64_t items = M * Hq / per_item;
  parallel(items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item * per_item / Hq, h0 = item * per_item % Hq;  // the item's token and first head
      const KeyValues& row = rows[i];
      const int64_t L = row.length, group = Hq / Hk;
      const float* kp = row.keys + (h0 / group) * row.key_stride;
      const float* vp = row.values + (h0 / group) * row.value_stride;
      scores.resize(per_item * L);
      for (int64_t j = 0; j < L; ++j) {
        for (int64_t g = 0; g < per_item; ++g) {
          scores[g * L + j] = ordered_dot(query + (i * Hq + h0 + g) * D, kp + j * D, D) * (float)scale;
        }
      }
      std::vector<float> totals(per_item, 0.0f);
      for (int64_t g = 0; g < per_item; ++g) {
        float* score = scores.data() + g * L;
        float best = -INFINITY;
        for (int64_t j = 0; j < L; ++j) best = std::max(best, score[j]);
        for (int64_t j = 0; j < L; ++j) {
          score[j] = std::exp(score[j] - best);
          totals[g] += score[j];
        }
        float* orow = out + (i * Hq + h0 + g) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] = 0;
      }
      for (int64_t j = 0; j < L; ++j) {
        const float* vrow = vp + j * D;
        for (int64_t g = 0; g < per_item; ++g) {
          const float p = scores[g * L + j];
          float* orow = out + (i * Hq + h0 + g) * D;
          for (int64_t d = 0; d < D; ++d) orow[d] += p * vrow[d];
        }
      }
      for (int64_t g = 0; g < per_item; ++g) {
        const float inverse = 1.0f / totals[g];
        float* orow = out + (i * Hq + h0 + g) * D;
        for (int64_t d = 0; d < D; ++d) orow[d] *= inverse;
      }
    }
  });
}

// decode_attention for tensors. query: [M, Hq, D]; keys[i], values[i]: [1, Hk, L_i, D] (rows contiguous in D).
torch::Tensor decode_attention(torch::Tensor query, std::vector<torch::Tensor> keys, std::vector<torch::Tensor> values,
                               double scale) {
  TORCH_CHECK(query.scalar_type() == torch::kFloat32 && query.dim() == 3, "query must be [M, Hq, D] float32");
  auto q = query.contiguous();
  const int64_t M = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK((int64_t)keys.size() == M && (int64_t)values.size() == M, "one key and value tensor per row");
  std::vector<KeyValues> rows;
  for (int64_t i = 0; i < M; ++i) {
    TORCH_CHECK(keys[i].scalar_type() == torch::kFloat32 && values[i].scalar_type() == torch::kFloat32, "float32");
    TORCH_CHECK(keys[i].dim() == 4 && keys[i].size(0) == 1 && keys[i].size(3) == D && keys[i].stride(3) == 1 &&
                    keys[i].stride(2) == D,
                "keys must be [1, Hk, L, D] with contiguous rows");
    TORCH_CHECK(values[i].sizes() == keys[i].sizes() && values[i].stride(3) == 1 && values[i].stride(2) == D,
                "values must match keys");
    TORCH_CHECK(Hq % keys[i].size(1) == 0, "query heads must be a multiple of key heads");
    TORCH_CHECK(keys[i].size(2) > 0, "each row needs at least one key");
    rows.push_back({keys[i].data_ptr<float>(), values[i].data_ptr<float>(), keys[i].size(1), keys[i].stride(1),
                    values[i].stride(1), keys[i].size(2)});
  }
  auto out = torch::empty({M, Hq, D}, q.options());
  attend(q.data_ptr<float>(), rows, Hq, D, scale, out.data_ptr<float>());
  return out;
}

// The index of the largest of n floats, the first one where several are equal, a NaN counting as the largest
// (torch.argmax's answer), in two vector passes: the largest value (and whether any is NaN), then where it first
// is. `largest` gets that value (NaN if there is one).
int64_t first_largest(const float* v, int64_t n, float& largest) {
  f32x16 lanes = broadcast(-INFINITY);
  i32x16 nans = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    f32x16 x;
    std::memcpy(&x, v + i, sizeof(x));
    lanes = x > lanes ? x : lanes;
    nans |= x != x;
  }
  largest = -INFINITY;
  bool nan = false;
  for (int t = 0; t < 16; ++t) {
    largest = std::max(largest, lanes[t]);
    nan |= nans[t] != 0;
  }
  for (; i < n; ++i) {
    largest = std::max(largest, v[i]);
    nan |= std::isnan(v[i]);
  }
  if (nan) largest = NAN;
  for (int64_t j = 0; j < n; ++j) {
    if (nan ? std::isnan(v[j]) : v[j] == largest) return j;
  }
  return 0;  // n == 0
}

// argmax of a 1-D tensor without threads: a sampler's greedy pick (262k values: 90 us against 220 us for torch's
// reduction, which also starts a team of threads in every session's own thread).
int64_t argmax(torch::Tensor values) {
  TORCH_CHECK(values.scalar_type() == torch::kFloat32 && values.dim() == 1 && values.is_contiguous() &&
                  values.numel() > 0 && values.device().is_cpu(),
              "argmax takes a non-empty contiguous 1-D float32 CPU tensor");
  float largest;
  return first_largest(values.data_ptr<float>(), values.numel(), largest);
}

// argmax of each row of a [R, N] tensor, in one call on the kernels' threads: a shared decode step's greedy picks
// for all its sessions at once, so no session thread lets go of the interpreter lock to pick its own (each such
// let-go waited for the lock again behind the other sessions' threads: ~1 ms a token with 8 sessions).
torch::Tensor argmax_rows(torch::Tensor values) {
  TORCH_CHECK(values.scalar_type() == torch::kFloat32 && values.dim() == 2 && values.size(1) > 0 &&
                  values.device().is_cpu(),
              "argmax_rows takes a [R, N] float32 CPU tensor with N > 0");
  auto v = values.contiguous();
  const int64_t R = v.size(0), N = v.size(1);
  constexpr int64_t SEGMENT = 16384;  // values per work item (64 KB)
  const int64_t segments = (N + SEGMENT - 1) / SEGMENT;
  std::vector<int64_t> where(R * segments);
  std::vector<float> best(R * segments);
  const float* vp = v.data_ptr<float>();
  parallel(R * segments, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / segments, s = item % segments, from = s * SEGMENT;
      where[item] = from + first_largest(vp + r * N + from, std::min(SEGMENT, N - from), best[item]);
    }
  });
  auto out = torch::empty({R}, torch::kLong);
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    int64_t pick = r * segments;  // segments in order: the first NaN, else the first of the largest
    for (int64_t s = r * segments + 1; s < (r + 1) * segments && !std::isnan(best[pick]); ++s) {
      if (std::isnan(best[s]) || best[s] > best[pick]) pick = s;
    }
    op[r] = where[pick];
  }
  return out;
}

// The k largest values of a 1-D tensor and where they are, largest first, equal values in index order: a sampler's
// top-k in one vector pass that keeps only what beats the k-th largest kept so far (262k values, k = 64: ~0.1 ms
// against ~0.5 ms for torch.topk, which also starts a team of threads). Empty tensors where a value is NaN: the
// caller asks torch, whose order puts NaN first.
std::vector<torch::Tensor> topk(torch::Tensor values, int64_t k) {
  TORCH_CHECK(values.scalar_type() == torch::kFloat32 && values.dim() == 1 && values.is_contiguous() &&
                  values.device().is_cpu() && 0 < k && k <= values.numel(),
              "topk takes a contiguous 1-D float32 CPU tensor and 0 < k <= its size");
  using Kept = std::pair<float, int64_t>;
  const auto before = [](const Kept& a, const Kept& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  const float* v = values.data_ptr<float>();
  const int64_t n = values.numel();
  const size_t room = static_cast<size_t>(std::max<int64_t>(4 * k, 256));
  std::vector<Kept> kept;
  kept.reserve(static_cast<size_t>(std::min<int64_t>(room, n)) + 16);
  bool nan = false;
  // The k best so far, and the k-th's value: a later value must beat it (an equal one comes after it).
  const auto prune = [&]() {
    std::nth_element(kept.begin(), kept.begin() + (k - 1), kept.end(), before);
    kept.resize(k);
    return kept[k - 1].first;
  };
  const auto none = [] { return std::vector<torch::Tensor>{torch::empty({0}), torch::empty({0}, torch::kLong)}; };
  for (int64_t i = 0; i < k; ++i) {
    kept.emplace_back(v[i], i);
    nan |= std::isnan(v[i]);
  }
  if (nan) return none();  // (a NaN would also leave the comparison without an order)
  float floor = prune();
  int64_t i = k;
  for (; i + 16 <= n; i += 16) {
    f32x16 x;
    std::memcpy(&x, v + i, sizeof(x));
    const i32x16 above = x > broadcast(floor), odd = x != x;
    int32_t any = 0, odds = 0;
    for (int t = 0; t < 16; ++t) {
      any |= above[t];
      odds |= odd[t];
    }
    if (odds) return none();
    if (!any) continue;
    for (int t = 0; t < 16; ++t) {
      if (x[t] > floor) kept.emplace_back(x[t], i + t);
    }
    if (kept.size() >= room) floor = prune();
  }
  for (; i < n; ++i) {
    if (std::isnan(v[i])) return none();
    if (v[i] > floor) kept.emplace_back(v[i], i);
  }
  prune();
  std::sort(kept.begin(), kept.end(), before);
  auto found = torch::empty({k});
  auto where = torch::empty({k}, torch::kLong);
  float* fp = found.data_ptr<float>();
  int64_t* wp = where.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) {
    fp[j] = kept[j].first;
    wp[j] = kept[j].second;
  }
  return {found, where};
}

// Positions [starts[i], starts[i] + lengths[i]) along dim 2 of each [1, H, T, D] source whose last two dims are
// dense, copied to the front of a new [1, H, rooms[i], D] tensor of its type: a session's whole cache (a copy for
// another session, a restore point's windows) in one call. In Python each layer took two ops, each of which let go
// of the interpreter lock and, with other threads busy, waited up to a switch interval (5 ms) to get it back:
// a 0.4 ms copy took 3-8 ms among eight arriving requests. A plain copy per head, no threads.
std::vector<torch::Tensor> copy_spans(const std::vector<torch::Tensor>& sources, const std::vector<int64_t>& starts,
                                      const std::vector<int64_t>& lengths, const std::vector<int64_t>& rooms) {
  const size_t n = sources.size();
  TORCH_CHECK(starts.size() == n && lengths.size() == n && rooms.size() == n, "one start, length and room each");
  for (size_t i = 0; i < n; ++i) {
    const auto& s = sources[i];
    TORCH_CHECK(s.dim() == 4 && s.size(0) == 1 && s.device().is_cpu() && s.stride(3) == 1 &&
                    s.stride(2) == s.size(3),
                "a source must be a CPU [1, H, T, D] tensor with dense [T, D] rows");
    TORCH_CHECK(0 <= starts[i] && starts[i] <= s.size(2) && 0 <= lengths[i] && lengths[i] <= s.size(2) - starts[i] &&
                    lengths[i] <= rooms[i],
                "span ", starts[i], "+", lengths[i], " of ", s.size(2), " positions into room for ", rooms[i]);
  }
  std::vector<torch::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const auto& s = sources[i];
    const int64_t H = s.size(1), D = s.size(3), size = s.element_size();
    auto copy = torch::empty({1, H, rooms[i], D}, s.options());
    const char* from = static_cast<const char*>(s.data_ptr());
    char* to = static_cast<char*>(copy.data_ptr());
    for (int64_t h = 0; h < H && lengths[i] > 0; ++h) {
      std::memcpy(to + h * rooms[i] * D * size, from + (h * s.stride(1) + starts[i] * D) * size,
                  lengths[i] * D * size);
    }
    out.push_back(copy);
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels touch no Python object: other Python threads (the HTTP door, streams) run meanwhile.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("pack", &pack, "int8 weights with per-channel scales, packed in panels", release());
  m.def("quantize", &quantize_rows, "x's int8 values and per-block scales, as linear reads it", release());
  m.def("rows", &rows, "int8 rows of a packed weight", release());
  m.def("linear", &linear, "x @ W^T + bias with packed int8 W and int8 activations per block of 32", release());
  m.def("decode_attention", &decode_attention, "one query token per row over its own keys and values", release());
  m.def("rms_norm", &rms_norm, "RMS norm over the last dimension with a fixed summation order", release());
  m.def("argmax", &argmax, "index of the largest value (the first; NaN counts as largest)", release());
  m.def("argmax_rows", &argmax_rows, "argmax of each row of a 2-D tensor, on the kernels' threads", release());
  m.def("topk", &topk, "the k largest values and their indices, largest first, ties in index order", release());
  m.def("copy_spans", &copy_spans, "spans of positions of [1, H, T, D] tensors, each into new room", release());
  register_decode_step(m);
}
