// One closed-form training step (gradients and loss sums) of a bank of small ReLU or TopK SAEs,
// fused into a single pass over the rows. Called from fused.py, which explains when and why.
//
// Compiled once per shape: D (d_model), N (latents) and K (TopK's k; 0 = ReLU) are macros, so
// every loop has a constant trip count. Rows are processed 16 at a time with one row per SIMD
// lane ("lane layout": a vector holds one feature of 16 rows), which makes the three per-row
// products (encoder, decoder, code gradient) plain vector FMAs with broadcast weights and lets
// TopK's selection run as a sorting network across lanes. The two weight gradients are sums of
// outer products over rows; they accumulate per lane in a per-thread buffer and are reduced
// across lanes once per chunk.
//
// Rows are split into chunks of CHUNK rows fixed in advance, each handled by one thread, and the
// chunks' partial sums are added in chunk order: results do not depend on the thread count.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifndef D
#error "compile with -DD=<d_model> -DN=<latents> -DK=<k, 0 for ReLU>"
#endif

constexpr int LANES = 16;            // rows per vector
constexpr int BLOCKS = 8;            // blocks of LANES rows between outer-product updates
constexpr long CHUNK = 2048;         // rows per work item
constexpr int DP = (D + 3) / 4 * 4;  // dims and latents padded to the 4 x 4 outer-product tiles
constexpr int NP = (N + 3) / 4 * 4;

typedef float lanes __attribute__((vector_size(4 * LANES)));

static inline float lane_sum(lanes v) {
    float s = 0;
    for (int r = 0; r < LANES; r++) s += v[r];
    return s;
}

// What one chunk contributes, laid out as fused.py reads it.
struct Partial {
    float d_W_dec[N][D];
    float d_W_enc[D][N];
    float d_b_enc[N];
    float d_b_dec[D];  // through the decoder only; fused.py adds the encoder's part
    float sums[3];     // squared error, L1, L0
    float fired[N];    // how many rows each latent fired on
};

// Per-thread scratch: lane-wise weight-gradient accumulators and one group of blocks.
struct Scratch {
    lanes d_W_dec[NP][DP];
    lanes d_W_enc_t[NP][DP];
    lanes centred[BLOCKS][DP];
    lanes grad_err[BLOCKS][DP];
    lanes codes[BLOCKS][NP];
    lanes grad_codes[BLOCKS][NP];
};

// One seed's padded weights: encoder transposed to [NP][DP], decoder [NP][DP], biases.
struct Weights {
    float W_enc_t[NP * DP], W_dec[NP * DP], b_enc[NP], b_dec[DP];
};

static void one_block(const float *x, long first, int valid_rows, const Weights &w, float err_scale,
                      float l1_per_row, Scratch &s, int b, lanes *acc_b_enc, lanes *acc_fired,
                      lanes *acc_b_dec, lanes &sq_err, lanes &l1_sum, lanes &l0_sum) {
    lanes *c = s.centred[b];
    for (int i = 0; i < DP; i++) c[i] = lanes{};
    for (int r = 0; r < valid_rows; r++)
        for (int i = 0; i < D; i++) c[i][r] = x[(first + r) * D + i] - w.b_dec[i];
    lanes valid;
    for (int r = 0; r < LANES; r++) valid[r] = r < valid_rows ? 1.f : 0.f;

    lanes pre[NP];
    for (int j = 0; j < NP; j++) {
        lanes a = lanes{} + w.b_enc[j];
        for (int i = 0; i < DP; i++) a += c[i] * w.W_enc_t[j * DP + i];
        pre[j] = a;
    }
    lanes fire[NP];  // 1 where latent j fires on the lane's row, else 0 (padded rows never fire)
#if K == 0
    for (int j = 0; j < NP; j++) fire[j] = pre[j] > 0 ? valid : lanes{};
#else
    lanes top[K];  // per lane, the K largest pre-activations so far, in decreasing order
    for (int q = 0; q < K; q++) top[q] = lanes{} - INFINITY;
    for (int j = 0; j < N; j++) {
        lanes v = pre[j];
        for (int q = 0; q < K; q++) {
            lanes hi = top[q] > v ? top[q] : v;
            v = top[q] > v ? v : top[q];
            top[q] = hi;
        }
    }
    for (int j = 0; j < NP; j++) fire[j] = (pre[j] >= top[K - 1]) & (pre[j] > 0) ? valid : lanes{};
#endif
    lanes *f = s.codes[b];
    for (int j = 0; j < NP; j++) {
        f[j] = pre[j] * fire[j];
        l1_sum += f[j];
        l0_sum += fire[j];
        acc_fired[j] += fire[j];
    }
    lanes err[DP];  // reconstruction - x
    for (int i = 0; i < DP; i++) err[i] = -c[i];
    for (int j = 0; j < NP; j++)
        for (int i = 0; i < DP; i++) err[i] += f[j] * w.W_dec[j * DP + i];
    lanes *g = s.grad_err[b];
    for (int i = 0; i < DP; i++) {
        sq_err += err[i] * err[i];
        g[i] = err[i] * err_scale;
        acc_b_dec[i] += g[i];
    }
    lanes *dc = s.grad_codes[b];
    for (int j = 0; j < NP; j++) {
        lanes a = lanes{} + l1_per_row;
        for (int i = 0; i < DP; i++) a += g[i] * w.W_dec[j * DP + i];
        dc[j] = a * fire[j];
        acc_b_enc[j] += dc[j];
    }
}

// acc[j][i] += sum over the group's rows of left[j] * right[i], for the 4 x 4 tile at (j0, i0).
static inline void tile_update(lanes (*acc)[DP], const lanes (*left)[NP], const lanes (*right)[DP], int blocks,
                               int j0, int i0) {
    lanes a[4][4];
    for (int jj = 0; jj < 4; jj++)
        for (int ii = 0; ii < 4; ii++) a[jj][ii] = acc[j0 + jj][i0 + ii];
    for (int b = 0; b < blocks; b++)
        for (int jj = 0; jj < 4; jj++)
            for (int ii = 0; ii < 4; ii++) a[jj][ii] += left[b][j0 + jj] * right[b][i0 + ii];
    for (int jj = 0; jj < 4; jj++)
        for (int ii = 0; ii < 4; ii++) acc[j0 + jj][i0 + ii] = a[jj][ii];
}

// The weight gradients: d_W_dec[j][i] += codes[j] * grad_err[i], d_W_enc^T[j][i] += grad_codes[j] * centred[i].
static void outer_products(Scratch &s, int blocks) {
    for (int j0 = 0; j0 < NP; j0 += 4)
        for (int i0 = 0; i0 < DP; i0 += 4) {
            tile_update(s.d_W_dec, s.codes, s.grad_err, blocks, j0, i0);
            tile_update(s.d_W_enc_t, s.grad_codes, s.centred, blocks, j0, i0);
        }
}

static void one_chunk(const float *x, long begin, long end, const Weights &w, float err_scale,
                      float l1_per_row, Scratch &s, Partial &out) {
    lanes acc_b_enc[NP], acc_fired[NP], acc_b_dec[DP];
    lanes sq_err{}, l1_sum{}, l0_sum{};
    for (int j = 0; j < NP; j++) acc_b_enc[j] = acc_fired[j] = lanes{};
    for (int i = 0; i < DP; i++) acc_b_dec[i] = lanes{};
    std::memset(s.d_W_dec, 0, sizeof s.d_W_dec);
    std::memset(s.d_W_enc_t, 0, sizeof s.d_W_enc_t);
    for (long group = begin; group < end; group += BLOCKS * LANES) {
        int blocks = 0;
        for (long first = group; first < end && blocks < BLOCKS; first += LANES, blocks++) {
            int valid_rows = end - first < LANES ? (int)(end - first) : LANES;
            one_block(x, first, valid_rows, w, err_scale, l1_per_row, s, blocks, acc_b_enc, acc_fired,
                      acc_b_dec, sq_err, l1_sum, l0_sum);
        }
        outer_products(s, blocks);
    }
    for (int j = 0; j < N; j++) {
        for (int i = 0; i < D; i++) {
            out.d_W_dec[j][i] = lane_sum(s.d_W_dec[j][i]);
            out.d_W_enc[i][j] = lane_sum(s.d_W_enc_t[j][i]);
        }
        out.d_b_enc[j] = lane_sum(acc_b_enc[j]);
        out.fired[j] = lane_sum(acc_fired[j]);
    }
    for (int i = 0; i < D; i++) out.d_b_dec[i] = lane_sum(acc_b_dec[i]);
    out.sums[0] = lane_sum(sq_err);
    out.sums[1] = lane_sum(l1_sum);
    out.sums[2] = lane_sum(l0_sum);
}

extern "C" int partial_floats() { return sizeof(Partial) / sizeof(float); }

// x [rows, D]; W_enc [S, D, N]; b_enc [S, N]; W_dec [S, N, D]; b_dec [S, D] (all contiguous fp32);
// out [S, partial_floats()].
extern "C" void fused_step(const float *x, long rows, int seeds, const float *W_enc, const float *b_enc,
                           const float *W_dec, const float *b_dec, float err_scale, float l1_per_row,
                           float *out, int threads) {
    std::vector<Weights> w(seeds);
    for (int s = 0; s < seeds; s++) {
        Weights &ws = w[s];
        std::memset(&ws, 0, sizeof ws);
        for (int i = 0; i < D; i++)
            for (int j = 0; j < N; j++) {
                ws.W_enc_t[j * DP + i] = W_enc[((long)s * D + i) * N + j];
                ws.W_dec[j * DP + i] = W_dec[((long)s * N + j) * D + i];
            }
        for (int j = 0; j < N; j++) ws.b_enc[j] = b_enc[(long)s * N + j];
        for (int i = 0; i < D; i++) ws.b_dec[i] = b_dec[(long)s * D + i];
    }
    const long chunks = (rows + CHUNK - 1) / CHUNK;
    std::vector<Partial> partial(seeds * chunks);
#pragma omp parallel num_threads(threads)
    {
        Scratch *s = static_cast<Scratch *>(std::aligned_alloc(64, (sizeof(Scratch) + 63) / 64 * 64));
#pragma omp for schedule(static)
        for (long item = 0; item < seeds * chunks; item++) {
            const long seed = item / chunks, begin = (item % chunks) * CHUNK;
            const long end = begin + CHUNK < rows ? begin + CHUNK : rows;
            one_chunk(x, begin, end, w[seed], err_scale, l1_per_row, *s, partial[item]);
        }
        std::free(s);
    }
    const int floats = partial_floats();
    for (int s = 0; s < seeds; s++) {
        float *o = out + (long)s * floats;
        std::memcpy(o, &partial[s * chunks], sizeof(Partial));
        for (long c = 1; c < chunks; c++) {
            const float *p = reinterpret_cast<const float *>(&partial[s * chunks + c]);
            for (int q = 0; q < floats; q++) o[q] += p[q];
        }
    }
}
