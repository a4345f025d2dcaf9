"""xpnet's native code: the C kernels and the CPU thread pool (fused.c, fused_typed.h, pool.c,
pool.h), built into the optional extension ``fused`` when xpnet is installed, and the header of
the kernels' arithmetic that the CUDA kernels share (xpnet_kernels.h, read by ``_fast_cupy``).
The extension is a plain shared library, loaded with ctypes by ``_fast_numpy``, never imported."""
