// CUDA backend: construction of the canonical device layer (build_exl2, build_gptq,
// build_canonical).
//
// Inputs may be host memory, memory of this device or of another device. Anything not
// already on this device is uploaded into a temporary device buffer with
// cudaMemcpyAsync(cudaMemcpyDefault); then the same kernels build the canonical arrays.
// Caller memory is only read and never kept; the stream is synchronised before return.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/cuda_backend.hpp"
#include "cuda/cuda_check.cuh"
#include "cuda/device_layer.cuh"
#include "cuda/gemv.cuh"
#include "cuda/tc_gemm.cuh"

namespace exl2::detail::cuda {

namespace {

constexpr int kBuildThreads = 256;

// scales[g, n] = f16( f16((code + 1)^2) * qsm[g] ),  zeros[g, n] = 2^(bits[g] - 1)
__global__ void exl2_scales_zeros_kernel(const std::uint32_t* __restrict__ q_scale,
                                         const std::uint16_t* __restrict__ qsm_bits,
                                         const std::int32_t* __restrict__ bits, std::int64_t G, std::int64_t N,
                                         __half* __restrict__ scales, std::uint8_t* __restrict__ zeros) {
  const std::int64_t total = G * N;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t N8 = N / 8;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const std::int64_t g = i / N;
    const std::int64_t n = i - g * N;
    const std::uint32_t code = (__ldg(q_scale + g * N8 + n / 8) >> (4 * (n % 8))) & 15u;
    const __half qsm = __ushort_as_half(__ldg(qsm_bits + g));
    const int c1 = static_cast<int>(code) + 1;
    scales[i] = __hmul(__float2half_rn(static_cast<float>(c1 * c1)), qsm);
    zeros[i] = static_cast<std::uint8_t>(1u << (__ldg(bits + g) - 1));
  }
}

// Canonical word (w, n) packs permuted rows 8w..8w+7 (low nibble first); permuted row r
// takes checkpoint row src = perm[r] (identity when perm == nullptr).
__global__ void gptq_repack_kernel(const std::uint32_t* __restrict__ src, const std::int32_t* __restrict__ perm,
                                   std::int64_t Q, std::int64_t N, std::uint32_t* __restrict__ dst) {
  const std::int64_t total = Q * N;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const std::int64_t w = i / N;
    const std::int64_t n = i - w * N;
    std::uint32_t word = 0;
    if (perm == nullptr) {
      word = __ldg(src + i);
    } else {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const std::int64_t s = __ldg(perm + 8 * w + j);
        const std::uint32_t code = (__ldg(src + (s >> 3) * N + n) >> (4 * (s & 7))) & 15u;
        word |= code << (4 * j);
      }
    }
    dst[i] = word;
  }
}

// zeros[g, n] = (stored nibble + zero_offset) & 15
__global__ void gptq_zeros_kernel(const std::uint32_t* __restrict__ qzeros, std::int64_t G, std::int64_t N,
                                  int zero_offset, std::uint8_t* __restrict__ zeros) {
  const std::int64_t total = G * N;
  const std::int64_t stride = static_cast<std::int64_t>(gridDim.x) * blockDim.x;
  const std::int64_t N8 = N / 8;
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
    const std::int64_t g = i / N;
    const std::int64_t n = i - g * N;
    const std::uint32_t stored = (__ldg(qzeros + g * N8 + n / 8) >> (4 * (n % 8))) & 15u;
    zeros[i] = static_cast<std::uint8_t>((static_cast<int>(stored) + zero_offset) & 15);
  }
}

/// True if `p` is memory of the current device `device` (usable by kernels directly).
bool on_device(const void* p, int device) {
  cudaPointerAttributes attr{};
  EXL2_CUDA_CHECK(cudaPointerGetAttributes(&attr, p));
  return attr.type == cudaMemoryTypeDevice && attr.device == device;
}

/// Returns a device pointer with the `count` elements of `src`: `src` itself when it is
/// already memory of `device`, else a copy uploaded into `tmp` (ordered on `stream`).
template <class T>
const T* device_view(const T* src, std::size_t count, int device, cudaStream_t stream, DeviceBuffer<T>& tmp,
                     const char* name) {
  if (count == 0) return nullptr;
  if (on_device(src, device)) return src;
  tmp.allocate(count, name);
  EXL2_CUDA_CHECK(cudaMemcpyAsync(tmp.get(), src, count * sizeof(T), cudaMemcpyDefault, stream));
  return tmp.get();
}

template <class T>
void upload(DeviceBuffer<T>& dst, const std::vector<T>& src, const char* name, cudaStream_t stream) {
  dst.allocate(src.size(), name);
  if (!src.empty())
    EXL2_CUDA_CHECK(cudaMemcpyAsync(dst.get(), src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice, stream));
}

/// Allocates and uploads what both formats share: perm, group tables, chunks, bias.
void fill_common(DeviceLayer& L, const LayerMeta& meta, int device, cudaStream_t stream,
                 std::vector<int4>& chunks_host, std::vector<std::int32_t>& perm_host) {
  L.device = device;
  L.format = meta.format;
  L.K = meta.K;
  L.N = meta.N;
  L.G = meta.G;
  L.Q = meta.Q;
  L.identity_perm = meta.identity_perm;
  L.has_bias = !meta.bias.empty();
  L.num_chunks = static_cast<int>(chunks_host.size());
  EXL2_CUDA_CHECK(cudaDeviceGetAttribute(&L.sm_count, cudaDevAttrMultiProcessorCount, device));
  EXL2_CUDA_CHECK(cudaDeviceGetAttribute(&L.cc_major, cudaDevAttrComputeCapabilityMajor, device));
  EXL2_CUDA_CHECK(cudaDeviceGetAttribute(&L.cc_minor, cudaDevAttrComputeCapabilityMinor, device));
  query_gemv_occupancy(L);
  query_mma_occupancy(L);

  if (meta.perm.empty()) {
    perm_host.resize(static_cast<std::size_t>(meta.K));
    for (std::int64_t k = 0; k < meta.K; ++k) perm_host[static_cast<std::size_t>(k)] = static_cast<std::int32_t>(k);
    upload(L.perm, perm_host, "perm", stream);
  } else {
    upload(L.perm, meta.perm, "perm", stream);
  }
  upload(L.bits, meta.bits, "bits", stream);
  upload(L.row_start, meta.row_start, "row_start", stream);
  upload(L.word_start, meta.word_start, "word_start", stream);
  upload(L.chunks, chunks_host, "chunk table", stream);
  if (L.has_bias) {
    L.bias.allocate(meta.bias.size(), "bias");
    EXL2_CUDA_CHECK(cudaMemcpyAsync(L.bias.get(), meta.bias.data(), meta.bias.size() * sizeof(std::uint16_t),
                                    cudaMemcpyHostToDevice, stream));
  }
}

}  // namespace

DeviceLayerPtr build_exl2(const LayerMeta& meta, const Exl2Raw& raw, int device, cudaStream_t stream) {
  check_device(device);
  DeviceGuard guard(device);
  std::vector<int4> chunks_host = make_chunk_table(meta);
  std::vector<std::int32_t> perm_host;
  const std::int64_t N = meta.N, G = meta.G, Q = meta.Q;

  DeviceLayerPtr layer(new DeviceLayer());
  layer->device = device;
  DeviceBuffer<std::uint32_t> tmp_scale;
  DeviceBuffer<std::uint16_t> tmp_qsm;
  StreamSyncOnExit sync_on_error(stream);  // destroyed first: syncs before buffers are freed

  fill_common(*layer, meta, device, stream, chunks_host, perm_host);

  // q_weight is stored canonically already: a plain copy from wherever it lives.
  layer->qweight.allocate(static_cast<std::size_t>(Q * N), "qweight");
  if (Q * N > 0)
    EXL2_CUDA_CHECK(cudaMemcpyAsync(layer->qweight.get(), raw.q_weight,
                                    static_cast<std::size_t>(Q * N) * sizeof(std::uint32_t), cudaMemcpyDefault,
                                    stream));

  layer->scales.allocate(static_cast<std::size_t>(G * N), "scales");
  layer->zeros.allocate(static_cast<std::size_t>(G * N), "zeros");
  if (G * N > 0) {
    const std::uint32_t* q_scale =
        device_view(reinterpret_cast<const std::uint32_t*>(raw.q_scale), static_cast<std::size_t>(G * (N / 8)),
                    device, stream, tmp_scale, "q_scale upload");
    // qsm_div256 is a host array [G]
    tmp_qsm.allocate(static_cast<std::size_t>(G), "q_scale_max upload");
    EXL2_CUDA_CHECK(cudaMemcpyAsync(tmp_qsm.get(), raw.qsm_div256, static_cast<std::size_t>(G) * sizeof(std::uint16_t),
                                    cudaMemcpyDefault, stream));
    exl2_scales_zeros_kernel<<<grid_for(G * N, kBuildThreads), kBuildThreads, 0, stream>>>(
        q_scale, tmp_qsm.get(), layer->bits.get(), G, N, layer->scales.get(), layer->zeros.get());
    EXL2_CUDA_CHECK_LAUNCH("exl2_scales_zeros_kernel");
  }

  if (tc_layout_wanted(*layer)) build_tc_layout(*layer, chunks_host, stream);
  EXL2_CUDA_CHECK(cudaStreamSynchronize(stream));
  sync_on_error.disarm();
  return layer;
}

DeviceLayerPtr build_gptq(const LayerMeta& meta, const GptqRaw& raw, int device, cudaStream_t stream) {
  check_device(device);
  DeviceGuard guard(device);
  std::vector<int4> chunks_host = make_chunk_table(meta);
  std::vector<std::int32_t> perm_host;
  const std::int64_t K = meta.K, N = meta.N, G = meta.G, Q = meta.Q;
  if (K % 8 != 0 || Q != K / 8) internal_error("GPTQ layer needs K % 8 == 0 and Q == K / 8");
  for (std::int64_t g = 0; g <= G; ++g) {
    if (g < G && meta.bits[g] != 4) internal_error("GPTQ groups must be 4-bit");
    if (meta.row_start[g] != 8 * meta.word_start[g]) internal_error("GPTQ group starts must be word_start * 8");
  }

  DeviceLayerPtr layer(new DeviceLayer());
  layer->device = device;
  DeviceBuffer<std::uint32_t> tmp_qweight;
  DeviceBuffer<std::uint32_t> tmp_qzeros;
  StreamSyncOnExit sync_on_error(stream);  // destroyed first: syncs before buffers are freed

  fill_common(*layer, meta, device, stream, chunks_host, perm_host);

  layer->qweight.allocate(static_cast<std::size_t>(Q * N), "qweight");
  if (Q * N > 0) {
    if (meta.identity_perm) {
      EXL2_CUDA_CHECK(cudaMemcpyAsync(layer->qweight.get(), raw.qweight,
                                      static_cast<std::size_t>(Q * N) * sizeof(std::uint32_t), cudaMemcpyDefault,
                                      stream));
    } else {
      const std::uint32_t* src = device_view(reinterpret_cast<const std::uint32_t*>(raw.qweight),
                                             static_cast<std::size_t>(Q * N), device, stream, tmp_qweight,
                                             "GPTQ qweight upload");
      gptq_repack_kernel<<<grid_for(Q * N, kBuildThreads), kBuildThreads, 0, stream>>>(
          src, layer->perm.get(), Q, N, layer->qweight.get());
      EXL2_CUDA_CHECK_LAUNCH("gptq_repack_kernel");
    }
  }

  layer->scales.allocate(static_cast<std::size_t>(G * N), "scales");
  layer->zeros.allocate(static_cast<std::size_t>(G * N), "zeros");
  if (G * N > 0) {
    EXL2_CUDA_CHECK(cudaMemcpyAsync(layer->scales.get(), raw.scales,
                                    static_cast<std::size_t>(G * N) * sizeof(std::uint16_t), cudaMemcpyDefault,
                                    stream));
    const std::uint32_t* qzeros =
        device_view(reinterpret_cast<const std::uint32_t*>(raw.qzeros), static_cast<std::size_t>(G * (N / 8)), device,
                    stream, tmp_qzeros, "GPTQ qzeros upload");
    gptq_zeros_kernel<<<grid_for(G * N, kBuildThreads), kBuildThreads, 0, stream>>>(qzeros, G, N, raw.zero_offset,
                                                                                     layer->zeros.get());
    EXL2_CUDA_CHECK_LAUNCH("gptq_zeros_kernel");
  }

  if (tc_layout_wanted(*layer)) build_tc_layout(*layer, chunks_host, stream);
  EXL2_CUDA_CHECK(cudaStreamSynchronize(stream));
  sync_on_error.disarm();
  return layer;
}

DeviceLayerPtr build_canonical(const LayerMeta& meta, const HostArrays& host, int device, cudaStream_t stream) {
  // GPTQ 2/3/8-bit, unaligned GPTQ groups and AWQ: the CPU builder already produced the
  // canonical arrays; upload them next to the shared tables (perm, groups, chunks, bias).
  check_device(device);
  DeviceGuard guard(device);
  std::vector<int4> chunks_host = make_chunk_table(meta);
  std::vector<std::int32_t> perm_host;
  const std::int64_t N = meta.N, G = meta.G, Q = meta.Q;
  if (static_cast<std::int64_t>(host.qweight.size()) != Q * N || static_cast<std::int64_t>(host.scales.size()) != G * N ||
      static_cast<std::int64_t>(host.zeros.size()) != G * N)
    internal_error("canonical host arrays do not match the layer shape");

  DeviceLayerPtr layer(new DeviceLayer());
  layer->device = device;
  StreamSyncOnExit sync_on_error(stream);  // destroyed first: syncs before host data goes away

  fill_common(*layer, meta, device, stream, chunks_host, perm_host);
  upload(layer->qweight, host.qweight, "qweight", stream);
  layer->scales.allocate(host.scales.size(), "scales");
  if (!host.scales.empty())
    EXL2_CUDA_CHECK(cudaMemcpyAsync(layer->scales.get(), host.scales.data(), host.scales.size() * sizeof(std::uint16_t),
                                    cudaMemcpyHostToDevice, stream));
  upload(layer->zeros, host.zeros, "zeros", stream);

  if (tc_layout_wanted(*layer)) build_tc_layout(*layer, chunks_host, stream);
  EXL2_CUDA_CHECK(cudaStreamSynchronize(stream));
  sync_on_error.disarm();
  return layer;
}

}  // namespace exl2::detail::cuda
