/* Softmax cross-entropy on the GPU, one thread per row: delta's rows and each row's loss (averaged
   on the device by the caller). _fast_cupy.py compiles it as a CuPy RawKernel after defining T,
   SQRT, EXP and LOG and after xpnet_kernels.h, whose row body the CPU kernel runs too. */
__device__ double xent_row(const T *__restrict__ row, long long label, T *__restrict__ out, long long C, T inv_b)
    XPNET_SOFTMAX_XENT_ROW_BODY

extern "C" __global__ void xpnet_softmax_xent(const T *__restrict__ z, const long long *__restrict__ y,
                                              T *__restrict__ delta, double *__restrict__ losses, long long B,
                                              long long C) {
    const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b < B) losses[b] = xent_row(z + b * C, y[b], delta + b * C, C, (T)1 / (T)B);
}
