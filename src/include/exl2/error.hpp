// Errors thrown by the exl2 C++ API.
//
// Every failure is an exl2::Error (derived from std::runtime_error). The subclass
// says what went wrong so that bindings can map it to the right exception type:
//   InvalidArgument -> a value/shape/range problem of a named argument (Python ValueError)
//   TypeMismatch    -> wrong dtype or kind of object for a named argument (Python TypeError)
//   Unsupported     -> the request is valid but this build/device cannot serve it
//   CudaError       -> a CUDA runtime call failed; the message names the call and
//                      cudaGetErrorString of the status
#pragma once

#include <stdexcept>
#include <string>

namespace exl2 {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class InvalidArgument : public Error {
 public:
  using Error::Error;
};

class TypeMismatch : public Error {
 public:
  using Error::Error;
};

class Unsupported : public Error {
 public:
  using Error::Error;
};

class CudaError : public Error {
 public:
  using Error::Error;
};

}  // namespace exl2
