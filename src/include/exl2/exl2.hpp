// Umbrella header of the exl2 C++ API.
#pragma once

#include "exl2/error.hpp"
#include "exl2/format.hpp"
#include "exl2/qmatrix.hpp"
#include "exl2/tensor.hpp"
