/* Fused float32 kernels of a Llama-family model on a CPU (see native.py).
 *
 * A decode step multiplies a few rows (one new token per sequence) by every weight; PyTorch's
 * RMSNorm, in-place rotary and scaled_dot_product_attention then cost 40-500 us each on tensors
 * of a few KB, mostly per-call set-up. These loops do the same arithmetic in one pass each.
 * The gated MLP activation (act(gate) * up, forward and backward) serves decoding and training:
 * one pass over memory instead of three (forward) and five (backward) PyTorch ops.
 * They are compiled on the user's machine with -O3 -march=native -fopenmp and called through
 * ctypes with raw pointers: every tensor is float32, row-major, with the row strides passed in
 * floats. OpenMP resolves to the libgomp PyTorch has already loaded (same soname), so the
 * threads are PyTorch's own. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * w, for `rows` rows of `n` floats
   (Llama's RMSNorm in float32). */
void dapo_rms_norm(const float *x, int64_t x_stride, const float *w, float *out, int64_t out_stride,
                   int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + r * out_stride;
        float squares = 0.f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < n; i++) squares += xr[i] * xr[i];
        const float inv = 1.f / sqrtf(squares / (float)n + eps);
        for (int64_t i = 0; i < n; i++) o[i] = (xr[i] * inv) * w[i];
    }
}

/* In place: x[i] = x[i] / sqrt(mean(x^2) + eps) * w[i] over one head of d floats. */
static void head_norm(float *x, const float *w, int64_t d, float eps) {
    float squares = 0.f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < d; i++) squares += x[i] * x[i];
    const float inv = 1.f / sqrtf(squares / (float)d + eps);
    for (int64_t i = 0; i < d; i++) x[i] = (x[i] * inv) * w[i];
}

/* qkv: [rows, heads + 2*kv_heads, d] queries, keys, values of this step (row stride qkv_stride),
   each head's first 2*rot_half dims stored as adjacent (re, im) pairs, the rest not rotated.
   rot: [rows, rot_half] complex rotations e^{i theta} as (re, im) pairs. Per query head
   (and key head): RMSNorm over its d dims with weights q_norm (k_norm) when not NULL (Qwen3,
   Gemma3), then each pair multiplied by its rotation, in place; then the keys and values are
   copied to position `pos` of kv: [rows, 2*kv_heads, cap, d] (keys then values, row stride
   kv_stride). */
void dapo_rotary_append(float *qkv, int64_t qkv_stride, const float *rot, int64_t rot_half, int64_t rows,
                        int64_t heads, int64_t kv_heads, int64_t d, const float *q_norm, const float *k_norm,
                        float norm_eps, float *kv, int64_t kv_stride, int64_t cap, int64_t pos) {
    for (int64_t r = 0; r < rows; r++) {
        float *row = qkv + r * qkv_stride;
        const float *c = rot + r * 2 * rot_half;
        for (int64_t h = 0; h < heads + kv_heads; h++) {
            float *v = row + h * d;
            const float *w = h < heads ? q_norm : k_norm;
            if (w) head_norm(v, w, d, norm_eps);
            for (int64_t i = 0; i < rot_half; i++) {
                const float re = v[2 * i], im = v[2 * i + 1], cr = c[2 * i], ci = c[2 * i + 1];
                v[2 * i] = re * cr - im * ci;
                v[2 * i + 1] = re * ci + im * cr;
            }
        }
        float *dst = kv + r * kv_stride + pos * d;
        for (int64_t h = 0; h < 2 * kv_heads; h++)
            memcpy(dst + h * cap * d, row + (heads + h) * d, (size_t)d * sizeof(float));
    }
}

/* One query per (row, head) against cached positions first .. length-1 (first > 0: a sliding window):
   out[r, h, :] = softmax_j(cap(scale * q[r, h] . k[r, g, j]) + mask[r, j]) v[r, g, j], g = h / (heads / kv_heads),
   cap(s) = softcap * tanh(s / softcap) when softcap > 0 (Gemma2), else s.
   q: [rows, heads, d] (row stride q_stride); kv as in dapo_rotary_append; mask: [rows, >= length]
   additive (0 or -inf, row stride mask_stride) or NULL; out: [rows, heads, d] contiguous.
   Returns 0, or -1 if scratch memory could not be allocated. */
int dapo_decode_attention(const float *q, int64_t q_stride, const float *kv, int64_t kv_stride,
                          const float *mask, int64_t mask_stride, float *out, int64_t rows, int64_t heads,
                          int64_t kv_heads, int64_t d, int64_t cap, int64_t first, int64_t length, float scale,
                          float softcap, int threads) {
    const int64_t group = heads / kv_heads;
    const int64_t tasks = rows * heads;
    const int64_t span = length - first;
    /* Below ~64K multiply-adds waking a second thread costs more than it saves. */
    const int parallel = threads > 1 && tasks * span * d >= (1 << 16);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (parallel) reduction(| : failed)
    {
        float *p = (float *)malloc(sizeof(float) * (size_t)span);
        if (!p) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            if (!p) continue;
            const int64_t r = t / heads, h = t % heads, g = h / group;
            const float *qv = q + r * q_stride + h * d;
            const float *k = kv + r * kv_stride + (g * cap + first) * d;
            const float *v = kv + r * kv_stride + ((kv_heads + g) * cap + first) * d;
            const float *m = mask ? mask + r * mask_stride + first : NULL;
            float top = -INFINITY;
            for (int64_t j = 0; j < span; j++) {
                const float *kj = k + j * d;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t i = 0; i < d; i++) s += qv[i] * kj[i];
                s *= scale;
                if (softcap > 0.f) s = tanhf(s / softcap) * softcap;
                if (m) s += m[j];
                p[j] = s;
                if (s > top) top = s;
            }
            float total = 0.f;
            for (int64_t j = 0; j < span; j++) {
                const float e = expf(p[j] - top); /* masked: exp(-inf) = 0 */
                p[j] = e;
                total += e;
            }
            const float inv = 1.f / total;
            float *o = out + (r * heads + h) * d;
            for (int64_t i = 0; i < d; i++) o[i] = 0.f;
            for (int64_t j = 0; j < span; j++) {
                const float *vj = v + j * d;
                const float w = p[j] * inv;
                for (int64_t i = 0; i < d; i++) o[i] += w * vj[i];
            }
        }
        free(p);
    }
    return failed ? -1 : 0;
}

/* exp(x) in float32 without a libm call, so that loops over it vectorize: 2^n * p(r) with
   x = n ln2 + r, |r| <= ln2 / 2 (Cephes' polynomial, ~1 ulp); x clamped to [-87.3, 88] (no
   overflow to inf: 1 / (1 + exp(88)) is 0 to float32 precision); NaN passes through. */
static inline float exp_approx(float x) {
    x = x < -87.3f ? -87.3f : (x > 88.f ? 88.f : x);
    const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f; /* round to nearest */
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

#define GELU_K 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_C 0.044715f

/* act(g) and act'(g): kind 0 = SiLU (g * sigmoid(g)), 1 = GeLU, tanh form (Gemma's gelu_pytorch_tanh). */
static inline float act_value(float g, int kind) {
    if (kind == 0) return g / (1.f + exp_approx(-g));
    const float t = 1.f - 2.f / (exp_approx(2.f * GELU_K * (g + GELU_C * g * g * g)) + 1.f); /* tanh */
    return 0.5f * g * (1.f + t);
}

static inline float act_slope(float g, int kind) {
    if (kind == 0) {
        const float s = 1.f / (1.f + exp_approx(-g));
        return s * (1.f + g * (1.f - s));
    }
    const float t = 1.f - 2.f / (exp_approx(2.f * GELU_K * (g + GELU_C * g * g * g)) + 1.f);
    return 0.5f * (1.f + t) + 0.5f * g * (1.f - t * t) * GELU_K * (1.f + 3.f * GELU_C * g * g);
}

static void gated_row(const float *restrict g, const float *restrict u, float *restrict out, int64_t n, int kind) {
    for (int64_t i = 0; i < n; i++) out[i] = act_value(g[i], kind) * u[i];
}

static void gated_backward_row(const float *restrict d, const float *restrict g, const float *restrict u,
                               float *restrict dg, float *restrict du, int64_t n, int kind) {
    for (int64_t i = 0; i < n; i++) {
        du[i] = d[i] * act_value(g[i], kind);
        dg[i] = d[i] * u[i] * act_slope(g[i], kind);
    }
}

/* gate, up: [rows, n] each (row strides g_stride, u_stride: views of one [rows, 2n] product work);
   out: [rows, n] contiguous, out = act(gate) * up. */
void dapo_gated(const float *gate, int64_t g_stride, const float *up, int64_t u_stride, float *out, int64_t rows,
                int64_t n, int kind, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && rows * n >= (1 << 15))
    for (int64_t r = 0; r < rows; r++) gated_row(gate + r * g_stride, up + r * u_stride, out + r * n, n, kind);
}

/* The gradient of dapo_gated: dout [rows, n] contiguous → d_gate = dout * up * act'(gate) and
   d_up = dout * act(gate), [rows, n] contiguous each. */
void dapo_gated_backward(const float *dout, const float *gate, int64_t g_stride, const float *up, int64_t u_stride,
                         float *d_gate, float *d_up, int64_t rows, int64_t n, int kind, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && rows * n >= (1 << 15))
    for (int64_t r = 0; r < rows; r++)
        gated_backward_row(dout + r * n, gate + r * g_stride, up + r * u_stride, d_gate + r * n, d_up + r * n, n, kind);
}
