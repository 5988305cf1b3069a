// decode_ops.cpp and sampling.cpp compiled as one unit (see LIBRARIES in __init__.py).
#include "decode_ops.cpp"
#include "sampling.cpp"
