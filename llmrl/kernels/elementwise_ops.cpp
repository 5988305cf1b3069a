// decode_ops.cpp, sampling.cpp and mkl_packed_gemm.cpp compiled as one unit (see LIBRARIES in __init__.py).
#include "decode_ops.cpp"
#include "mkl_packed_gemm.cpp"
#include "sampling.cpp"
