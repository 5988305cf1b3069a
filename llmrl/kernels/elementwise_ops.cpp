// decode_ops.cpp, training_ops.cpp (which uses its helpers), sampling.cpp, mkl_packed_gemm.cpp, panel_gemm.cpp, panel_gemm_bf16.cpp, softmax_products.cpp and head_ops.cpp compiled as one unit (see LIBRARIES in __init__.py).
#include "decode_ops.cpp"
#include "mkl_packed_gemm.cpp"
#include "panel_gemm.cpp"
#include "panel_gemm_bf16.cpp"
#include "training_ops.cpp"
#include "sampling.cpp"
#include "softmax_products.cpp"
#include "head_ops.cpp"
