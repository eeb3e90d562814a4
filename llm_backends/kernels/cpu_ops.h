// What kernels/decode_step.cpp uses of kernels/cpu_ops.cpp.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <functional>
#include <vector>

// One session's keys and values for a decode step's attention: [heads][length][D] floats, rows contiguous in D.
struct KeyValues {
  const float* keys;
  const float* values;
  int64_t heads, key_stride, value_stride, length;
};

torch::Tensor linear(torch::Tensor x, torch::Tensor packed, torch::Tensor scale, c10::optional<torch::Tensor> bias,
                     int64_t in_features);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor gain, double eps);
void attend(const float* query, const std::vector<KeyValues>& rows, int64_t Hq, int64_t D, double scale, float* out);
// Calls f(begin, end) over chunks of [0, items) of at least `grain` items on the kernels' own threads (not OpenMP's).
void parallel_for(int64_t items, int64_t grain, const std::function<void(int64_t, int64_t)>& f);
void register_decode_step(pybind11::module& m);
