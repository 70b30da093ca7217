// Everything of a TopK SAE step after the dense encoder matmul and the top-k selection, for one
// seed, touching only the k active latents of each row. Called from fused.py (which explains why);
// the formulas are those of sparse_topk.py, whose torch version it replaces on CPU.
//
// Pass 1, parallel over rows: reconstruction error from the k active decoder rows, its gradient
// g = scale * err, and each active code's gradient <W_dec[idx], g> + l1 (zero where the code is 0).
// Pass 2, parallel over latents: every thread owns a contiguous range of latents and walks all rows
// in order, adding val * g into d_W_dec, d_val * (x - b_dec) into d_W_enc^T and d_val into d_b_enc
// for its own latents only, so there are no write conflicts and the sums are in row order whatever
// the thread count.
// Pass 3, parallel over model dimensions: d_b_dec[i] = sum_r g[r, i] - sum_j W_enc[i, j] d_b_enc[j],
// both sums in a fixed order (rows, then latents). (Left to torch, these two reductions were the one part of the step
// whose rounding depended on the thread count on an Intel CPU, presumably MKL's matrix-vector
// product splitting its sum across threads.) The loss sums are also added here, in row order.
#include <cstdint>
#ifdef _OPENMP
#include <omp.h>
#else  // built without OpenMP: one thread
static int omp_get_thread_num() { return 0; }
static int omp_get_num_threads() { return 1; }
#endif

extern "C" void sparse_tail(const float *x, const float *b_dec, const float *W_dec, const float *W_enc_t,
                            const int64_t *idx, const float *val, long rows, int d, int k, long n,
                            float err_scale, float l1_per_row, float *g, float *d_val, float *sq_err,
                            float *d_W_dec, float *d_W_enc_t, float *d_b_enc, float *d_b_dec,
                            double *sums, int threads) {
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
                d_b_enc[latent] += dv;
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
#pragma omp parallel num_threads(threads)
    {
        const int t = omp_get_thread_num(), T = omp_get_num_threads();
        const int lo = (int)((int64_t)d * t / T), hi = (int)((int64_t)d * (t + 1) / T);
        for (int i = lo; i < hi; i++) d_b_dec[i] = 0.f;
        for (long r = 0; r < rows; r++) {  // column sums of g, each in row order
            const float *gr = g + r * d;
#pragma omp simd
            for (int i = lo; i < hi; i++) d_b_dec[i] += gr[i];
        }
        for (long j = 0; j < n; j++) {  // minus W_enc d_b_enc, in latent order
            const float db = d_b_enc[j];
            if (db == 0.f) continue;
            const float *w = W_enc_t + j * d;
#pragma omp simd
            for (int i = lo; i < hi; i++) d_b_dec[i] -= w[i] * db;
        }
    }
    double sq = 0.0, l1 = 0.0, l0 = 0.0;  // logged loss sums, in row order
    for (long r = 0; r < rows; r++) {
        sq += sq_err[r];
        for (int j = 0; j < k; j++) {
            const float v = val[r * k + j];
            l1 += v;
            l0 += v > 0.f;
        }
    }
    sums[0] = sq;
    sums[1] = l1;
    sums[2] = l0;
}
