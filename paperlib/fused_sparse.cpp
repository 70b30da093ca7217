// Everything of a TopK SAE step after the dense encoder matmul and the top-k selection, for one
// seed, touching only the k active latents of each row. Called from fused.py (which explains why);
// the formulas are those of sparse_topk.py, whose torch version it replaces on CPU.
//
// Pass 1, parallel over rows: reconstruction error from the k active decoder rows, its gradient
// g = scale * err, and each active code's gradient <W_dec[idx], g> + l1 (zero where the code is 0).
// Pass 2, parallel over latents: every thread owns a contiguous range of latents and walks all rows
// in order, adding val * g into d_W_dec and d_val * (x - b_dec) into d_W_enc^T for its own latents
// only, so there are no write conflicts and the sums are in row order whatever the thread count.
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#else  // built without OpenMP: one thread
static int omp_get_thread_num() { return 0; }
static int omp_get_num_threads() { return 1; }
#endif

extern "C" void sparse_tail(const float *x, const float *b_dec, const float *W_dec, const int64_t *idx,
                            const float *val, long rows, int d, int k, long n, float err_scale,
                            float l1_per_row, float *g, float *d_val, float *sq_err, float *d_W_dec,
                            float *d_W_enc_t, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        const int64_t *ir = idx + r * k;
        const float *vr = val + r * k;
        float *gr = g + r * d;
        for (int i = 0; i < d; i++) gr[i] = b_dec[i] - xr[i];
        for (int j = 0; j < k; j++) {
            const float v = vr[j];
            const float *w = W_dec + ir[j] * d;
            if (v != 0.f)
#pragma omp simd
                for (int i = 0; i < d; i++) gr[i] += v * w[i];
        }
        float sq = 0.f;
#pragma omp simd reduction(+ : sq)
        for (int i = 0; i < d; i++) {
            sq += gr[i] * gr[i];
            gr[i] *= err_scale;
        }
        sq_err[r] = sq;
        for (int j = 0; j < k; j++) {
            const float *w = W_dec + ir[j] * d;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int i = 0; i < d; i++) dot += w[i] * gr[i];
            d_val[r * k + j] = vr[j] > 0.f ? dot + l1_per_row : 0.f;
        }
    }
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int64_t lo = n * t / T, hi = n * (t + 1) / T;
        for (long r = 0; r < rows; r++) {
            const float *xr = x + r * d;
            const float *gr = g + r * d;
            for (int j = 0; j < k; j++) {
                const int64_t latent = idx[r * k + j];
                const float v = val[r * k + j], dv = d_val[r * k + j];
                if (latent < lo || latent >= hi || v == 0.f) continue;
                float *dd = d_W_dec + latent * d;
                float *de = d_W_enc_t + latent * d;
#pragma omp simd
                for (int i = 0; i < d; i++) {
                    dd[i] += v * gr[i];
                    de[i] += dv * (xr[i] - b_dec[i]);
                }
            }
        }
    }
}
