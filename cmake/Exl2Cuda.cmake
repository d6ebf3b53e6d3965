# Decide whether the CUDA backend is built and for which architectures.
#
# EXL2_CUDA=AUTO enables CUDA only when a CUDA compiler is found, so `pip install .`
# keeps working on machines without nvcc (the extension then reports "built without
# CUDA"). EXL2_CUDA=ON makes a missing compiler an error.
include(CheckLanguage)

set(EXL2_WITH_CUDA OFF)
if(EXL2_CUDA STREQUAL "OFF")
  message(STATUS "exl2: CUDA backend disabled (EXL2_CUDA=OFF)")
else()
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(EXL2_WITH_CUDA ON)
  elseif(EXL2_CUDA STREQUAL "ON")
    message(FATAL_ERROR "exl2: EXL2_CUDA=ON but no CUDA compiler was found (set CMAKE_CUDA_COMPILER or put nvcc on PATH)")
  else()
    message(STATUS "exl2: no CUDA compiler found; building the CPU backend only")
  endif()
endif()

if(EXL2_WITH_CUDA)
  # Resolve the architecture list before enable_language so CMake does not probe the GPU.
  # 90a (not 90): the Hopper cubin is built for the arch-specific target so that it holds the
  # wgmma kernel (tc_wgmma.cu); it runs on every compute capability 9.0 GPU (H100, H200, GH200).
  set(_exl2_release "75-real;80-real;86-real;89-real;90a-real;100-real;120-real;120-virtual")
  set(_exl2_request "${EXL2_CUDA_ARCHITECTURES}")
  set(_exl2_host_caps "")
  if(_exl2_request STREQUAL "auto" OR _exl2_request STREQUAL "host")
    find_program(_exl2_nvidia_smi nvidia-smi)
    if(_exl2_nvidia_smi)
      execute_process(COMMAND ${_exl2_nvidia_smi} --query-gpu=compute_cap --format=csv,noheader
                      OUTPUT_VARIABLE _exl2_caps RESULT_VARIABLE _exl2_rc ERROR_QUIET
                      OUTPUT_STRIP_TRAILING_WHITESPACE)
      if(_exl2_rc EQUAL 0 AND _exl2_caps)
        string(REPLACE "." "" _exl2_caps "${_exl2_caps}")
        string(REPLACE "\n" ";" _exl2_caps "${_exl2_caps}")
        foreach(_cap IN LISTS _exl2_caps)
          string(STRIP "${_cap}" _cap)
          if(_cap STREQUAL "90")
            set(_cap "90a")  # Hopper: the arch-specific target, which has wgmma (tc_wgmma.cu)
          endif()
          list(APPEND _exl2_host_caps "${_cap}-real")
        endforeach()
        list(REMOVE_DUPLICATES _exl2_host_caps)
      endif()
    endif()
  endif()
  if(_exl2_request STREQUAL "release")
    # cubins for every supported generation (Turing .. Blackwell) plus PTX for the newest,
    # so no driver-side JIT is needed on any of them and future GPUs still run.
    set(_exl2_archs "${_exl2_release}")
  elseif(_exl2_request STREQUAL "auto")
    if(_exl2_host_caps)
      set(_exl2_archs "${_exl2_release}")
    else()
      set(_exl2_archs "90a-real")  # no GPU here: compile-check one architecture
    endif()
  elseif(_exl2_request STREQUAL "host")
    set(_exl2_archs "${_exl2_host_caps}")
    if(NOT _exl2_archs)
      set(_exl2_archs "90a-real")
    endif()
  else()
    set(_exl2_archs "${_exl2_request}")
  endif()
  set(CMAKE_CUDA_ARCHITECTURES "${_exl2_archs}")
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)
  set(EXL2_CUDA_ARCHS_USED "${_exl2_archs}")
  message(STATUS "exl2: CUDA backend ON, architectures: ${_exl2_archs}")
endif()
