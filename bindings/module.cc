// jax_flash._C: hands the XLA FFI handlers to Python and says how this build was made.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#if JAX_FLASH_WITH_CUDA
#include "ffi_handlers.h"
#include "flash_api.h"
#endif

namespace nb = nanobind;

namespace {

#if JAX_FLASH_WITH_CUDA
constexpr bool kWithCuda = true;
constexpr const char* kNoCudaReason = "";
constexpr const char* kCudaArchs = JAX_FLASH_CUDA_ARCHS;  // "80,90a", set by CMake
#else
constexpr bool kWithCuda = false;
constexpr const char* kNoCudaReason = JAX_FLASH_NO_CUDA_REASON;  // set by CMake
constexpr const char* kCudaArchs = "";
#endif

std::vector<std::string> CudaArchs() {
  std::vector<std::string> archs;
  std::istringstream csv(kCudaArchs);
  for (std::string arch; std::getline(csv, arch, ',');) archs.push_back(arch);
  return archs;
}

std::vector<int> HeadDims() {
  std::vector<int> dims;
#if JAX_FLASH_WITH_CUDA
  dims.resize(32);
  dims.resize(jax_flash::supported_head_dims(dims.data(), static_cast<int>(dims.size())));
  std::sort(dims.begin(), dims.end());
#endif
  return dims;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "Native part of jax_flash: XLA FFI handlers of the CUDA kernels.";

  m.def(
      "registrations",
      [] {
        nb::dict targets;
#if JAX_FLASH_WITH_CUDA
        targets["jax_flash_fwd"] = nb::capsule(reinterpret_cast<void*>(FlashFwd));
        targets["jax_flash_bwd"] = nb::capsule(reinterpret_cast<void*>(FlashBwd));
        targets["jax_flash_segment_ranges"] = nb::capsule(reinterpret_cast<void*>(SegmentRanges));
#endif
        return targets;
      },
      "Custom call target name -> FFI handler capsule, for jax.ffi.register_ffi_target(..., "
      "platform='CUDA'). Empty when built without CUDA.");

  m.def(
      "build_info",
      [] {
        nb::dict info;
        info["cuda"] = kWithCuda;
        info["reason"] = std::string(kNoCudaReason);
        info["cuda_archs"] = CudaArchs();
        info["head_dims"] = HeadDims();
        return info;
      },
      "How _C was built: {'cuda': bool, 'reason': why not CUDA ('' when cuda), "
      "'cuda_archs': list[str], 'head_dims': sorted list[int] with a kernel}.");
}
