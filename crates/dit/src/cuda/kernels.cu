// CUDA kernels for the DiT block (forward and backward), compiled to PTX by build.rs when the
// `cuda` feature is on and loaded by src/ops_cuda.rs.
//
// Why: candle's generic CUDA kernels index broadcast operands with 64-bit division per element
// and dimension, and the DiT block is full of broadcasts (biases, adaLN shift / scale / gate,
// the head permutations of attention). These kernels do each of those in one contiguous pass
// with 32-bit index arithmetic; statistics are accumulated in f32.
//
// Every kernel exists for f32 and bf16 (`_f32`, `_bf16` suffixes). bf16 is handled as raw
// 16-bit words (no cuda_bf16.h), converted to f32 on load and rounded to nearest even on store.
// Row-wise kernels use one warp per row, eight rows per block of 256 threads.

typedef unsigned short bf16_t;

__device__ __forceinline__ float ld(const float *p, unsigned i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16_t *p, unsigned i) {
    return __uint_as_float(((unsigned)p[i]) << 16);
}
__device__ __forceinline__ void st(float *p, unsigned i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16_t *p, unsigned i, float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) {  // NaN stays NaN
        p[i] = (bf16_t)((u >> 16) | 0x40u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16_t)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

#define ROW_SETUP                                                   \
    const unsigned lane = threadIdx.x & 31u;                        \
    const unsigned row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); \
    if (row >= rows) return;

// Mean and 1 / sqrt(variance + eps) of a row of d values (two passes: no cancellation).
template <typename T>
__device__ __forceinline__ void row_stats(const T *x, unsigned base, unsigned d, unsigned lane,
                                          float eps, float &mean, float &rstd) {
    float s = 0.f;
    for (unsigned j = lane; j < d; j += 32) s += ld(x, base + j);
    mean = warp_sum(s) / d;
    float v = 0.f;
    for (unsigned j = lane; j < d; j += 32) {
        const float c = ld(x, base + j) - mean;
        v += c * c;
    }
    rstd = rsqrtf(warp_sum(v) / d + eps);
}

// LayerNorm without affine parameters (eps), then adaLN modulation:
// out = xhat * (1 + scale[n]) + shift[n], rows of D, T rows per sample n.
template <typename T>
__device__ void modln_fwd(const T *x, const T *shift, const T *scale, T *out, unsigned rows,
                          unsigned t, unsigned d, float eps) {
    ROW_SETUP
    const unsigned base = row * d, mod = (row / t) * d;
    float mean, rstd;
    row_stats(x, base, d, lane, eps, mean, rstd);
    for (unsigned j = lane; j < d; j += 32) {
        const float xhat = (ld(x, base + j) - mean) * rstd;
        st(out, base + j, xhat * (1.f + ld(scale, mod + j)) + ld(shift, mod + j));
    }
}

// Backward of modln_fwd for one row, with gs = g (1 + scale):
// dx = (gs - mean(gs) - xhat mean(gs xhat)) * rstd into out[row], and g * xhat (summed over
// the tokens by the caller into dscale) into out[rows + row].
template <typename T>
__device__ void modln_bwd(const T *x, const T *scale, const T *g, T *out, unsigned rows,
                          unsigned t, unsigned d, float eps) {
    ROW_SETUP
    const unsigned base = row * d, mod = (row / t) * d, second = rows * d;
    float mean, rstd;
    row_stats(x, base, d, lane, eps, mean, rstd);
    float m1 = 0.f, m2 = 0.f;
    for (unsigned j = lane; j < d; j += 32) {
        const float xhat = (ld(x, base + j) - mean) * rstd;
        const float gs = ld(g, base + j) * (1.f + ld(scale, mod + j));
        m1 += gs;
        m2 += gs * xhat;
    }
    m1 = warp_sum(m1) / d;
    m2 = warp_sum(m2) / d;
    for (unsigned j = lane; j < d; j += 32) {
        const float xhat = (ld(x, base + j) - mean) * rstd;
        const float gj = ld(g, base + j);
        const float gs = gj * (1.f + ld(scale, mod + j));
        st(out, base + j, (gs - m1 - xhat * m2) * rstd);
        st(out, second + base + j, gj * xhat);
    }
}

// Softmax over rows of `cols`.
template <typename T>
__device__ void softmax_fwd(const T *x, T *out, unsigned rows, unsigned cols) {
    ROW_SETUP
    const unsigned base = row * cols;
    float m = -__int_as_float(0x7f800000);
    for (unsigned j = lane; j < cols; j += 32) m = fmaxf(m, ld(x, base + j));
    m = warp_max(m);
    float s = 0.f;
    for (unsigned j = lane; j < cols; j += 32) s += __expf(ld(x, base + j) - m);
    const float inv = 1.f / warp_sum(s);
    for (unsigned j = lane; j < cols; j += 32) st(out, base + j, __expf(ld(x, base + j) - m) * inv);
}

// Backward of softmax from its output p: dx = p (g - sum(g p)).
template <typename T>
__device__ void softmax_bwd(const T *p, const T *g, T *out, unsigned rows, unsigned cols) {
    ROW_SETUP
    const unsigned base = row * cols;
    float s = 0.f;
    for (unsigned j = lane; j < cols; j += 32) s += ld(g, base + j) * ld(p, base + j);
    s = warp_sum(s);
    for (unsigned j = lane; j < cols; j += 32) {
        const float pj = ld(p, base + j);
        st(out, base + j, pj * (ld(g, base + j) - s));
    }
}

#define ELEMENTWISE                                                 \
    const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;       \
    if (i >= total) return;

// y (M, N) + b (N).
template <typename T>
__device__ void bias_add(const T *y, const T *b, T *out, unsigned cols, unsigned total) {
    ELEMENTWISE
    st(out, i, ld(y, i) + ld(b, i % cols));
}

// h + gate[n] * y with h, y (N, T, D) and gate (N, D); td = T * D.
template <typename T>
__device__ void gated_res(const T *h, const T *gate, const T *y, T *out, unsigned td, unsigned d,
                          unsigned total) {
    ELEMENTWISE
    st(out, i, ld(h, i) + ld(gate, (i / td) * d + i % d) * ld(y, i));
}

// gate[n] * y (the gradient of gated_res with respect to y).
template <typename T>
__device__ void scale_rows(const T *y, const T *gate, T *out, unsigned td, unsigned d,
                           unsigned total) {
    ELEMENTWISE
    st(out, i, ld(gate, (i / td) * d + i % d) * ld(y, i));
}

// GELU, tanh approximation (timm's approximate="tanh"), and its derivative times g.
__device__ __forceinline__ float gelu_inner(float x) {
    return 0.7978845608028654f * (x + 0.044715f * x * x * x);
}

template <typename T>
__device__ void gelu_fwd(const T *x, T *out, unsigned total) {
    ELEMENTWISE
    const float v = ld(x, i);
    st(out, i, 0.5f * v * (1.f + tanhf(gelu_inner(v))));
}

template <typename T>
__device__ void gelu_bwd(const T *x, const T *g, T *out, unsigned total) {
    ELEMENTWISE
    const float v = ld(x, i);
    const float th = tanhf(gelu_inner(v));
    const float d = 0.5f * (1.f + th) +
                    0.5f * v * (1.f - th * th) * 0.7978845608028654f * (1.f + 3.f * 0.044715f * v * v);
    st(out, i, ld(g, i) * d);
}

// qkv (N, T, 3, H, hd) -> (3, N, H, T, hd), q multiplied by `scale`; or back (`inverse`, the
// gradient, where the q part is multiplied by `scale` too). One thread per element of qkv.
template <typename T>
__device__ void permute_qkv(const T *src, T *out, unsigned n, unsigned t, unsigned h,
                            unsigned hd, unsigned total, unsigned inverse, float scale) {
    ELEMENTWISE
    unsigned r = i;
    const unsigned c = r % hd; r /= hd;
    const unsigned head = r % h; r /= h;
    const unsigned which = r % 3; r /= 3;
    const unsigned tok = r % t;
    const unsigned sample = r / t;
    const unsigned j = (((which * n + sample) * h + head) * t + tok) * hd + c;
    const float f = which == 0 ? scale : 1.f;
    if (inverse) st(out, i, ld(src, j) * f);
    else st(out, j, ld(src, i) * f);
}

// o (N, H, T, hd) -> (N, T, H * hd); or back (`inverse`). One thread per element.
template <typename T>
__device__ void permute_heads(const T *src, T *out, unsigned t, unsigned h, unsigned hd,
                              unsigned total, unsigned inverse) {
    ELEMENTWISE
    unsigned r = i;  // index in (N, T, H, hd)
    const unsigned c = r % hd; r /= hd;
    const unsigned head = r % h; r /= h;
    const unsigned tok = r % t;
    const unsigned sample = r / t;
    const unsigned j = ((sample * h + head) * t + tok) * hd + c;
    if (inverse) st(out, j, ld(src, i));
    else st(out, i, ld(src, j));
}

#define INSTANTIATE(NAME, PARAMS, ARGS)                                              \
    extern "C" __global__ void NAME##_f32 PARAMS(float) { NAME<float> ARGS; }        \
    extern "C" __global__ void NAME##_bf16 PARAMS(bf16_t) { NAME<bf16_t> ARGS; }

#define P_MODLN(T) (const T *x, const T *shift, const T *scale, T *out, unsigned rows, unsigned t, unsigned d, float eps)
INSTANTIATE(modln_fwd, P_MODLN, (x, shift, scale, out, rows, t, d, eps))
#define P_MODLN_BWD(T) (const T *x, const T *scale, const T *g, T *out, unsigned rows, unsigned t, unsigned d, float eps)
INSTANTIATE(modln_bwd, P_MODLN_BWD, (x, scale, g, out, rows, t, d, eps))
#define P_SOFTMAX(T) (const T *x, T *out, unsigned rows, unsigned cols)
INSTANTIATE(softmax_fwd, P_SOFTMAX, (x, out, rows, cols))
#define P_SOFTMAX_BWD(T) (const T *p, const T *g, T *out, unsigned rows, unsigned cols)
INSTANTIATE(softmax_bwd, P_SOFTMAX_BWD, (p, g, out, rows, cols))
#define P_BIAS(T) (const T *y, const T *b, T *out, unsigned cols, unsigned total)
INSTANTIATE(bias_add, P_BIAS, (y, b, out, cols, total))
#define P_GATED(T) (const T *h, const T *gate, const T *y, T *out, unsigned td, unsigned d, unsigned total)
INSTANTIATE(gated_res, P_GATED, (h, gate, y, out, td, d, total))
#define P_SCALE(T) (const T *y, const T *gate, T *out, unsigned td, unsigned d, unsigned total)
INSTANTIATE(scale_rows, P_SCALE, (y, gate, out, td, d, total))
#define P_GELU(T) (const T *x, T *out, unsigned total)
INSTANTIATE(gelu_fwd, P_GELU, (x, out, total))
#define P_GELU_BWD(T) (const T *x, const T *g, T *out, unsigned total)
INSTANTIATE(gelu_bwd, P_GELU_BWD, (x, g, out, total))
#define P_QKV(T) (const T *src, T *out, unsigned n, unsigned t, unsigned h, unsigned hd, unsigned total, unsigned inverse, float scale)
INSTANTIATE(permute_qkv, P_QKV, (src, out, n, t, h, hd, total, inverse, scale))
#define P_HEADS(T) (const T *src, T *out, unsigned t, unsigned h, unsigned hd, unsigned total, unsigned inverse)
INSTANTIATE(permute_heads, P_HEADS, (src, out, t, h, hd, total, inverse))

// One AdamW step (torch.optim.AdamW) of an f32 parameter in two passes: the moments
// mv (2, n) = [b1 m + (1 - b1) g, b2 v + (1 - b2) g^2], then the parameter from them, with
// c1, c2 the bias corrections 1 - b1^t, 1 - b2^t.
extern "C" __global__ void adamw_moments_f32(const float *g, const float *m, const float *v,
                                             float *out, unsigned total, float b1, float b2) {
    ELEMENTWISE
    const float gi = g[i];
    out[i] = b1 * m[i] + (1.f - b1) * gi;
    out[total + i] = b2 * v[i] + (1.f - b2) * gi * gi;
}

extern "C" __global__ void adamw_theta_f32(const float *theta, const float *mv, float *out,
                                           unsigned total, float lr, float c1, float c2,
                                           float eps, float wd) {
    ELEMENTWISE
    const float step = (mv[i] / c1) / (sqrtf(mv[total + i] / c2) + eps);
    out[i] = theta[i] * (1.f - lr * wd) - lr * step;
}

// The EMA of the weights: decay * ema + rest * theta, rest = 1 - decay computed in f64 by the
// caller (in f32, 1 - 0.9999f is off by 2e-4 relative).
extern "C" __global__ void ema_f32(const float *ema, const float *theta, float *out,
                                   unsigned total, float decay, float rest) {
    ELEMENTWISE
    out[i] = decay * ema[i] + rest * theta[i];
}
