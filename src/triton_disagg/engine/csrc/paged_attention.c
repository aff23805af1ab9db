/*
 * Decode attention that reads K/V where they lie in the paged KV pool (CPU, float32).
 *
 * One query token per sequence attends to its first seq_lens[b] tokens, found
 * block by block through its block table, with an online softmax: no gathered
 * copy of the context is ever made. The pool is the engine's block-major tensor
 * (num_blocks, layers, 2, block_size, kv_heads, head_dim); the caller passes the
 * addresses of one layer's K and V of block 0 and the strides (in floats)
 * between blocks and between tokens, so any layer of the pool can be read.
 *
 * Work is split over threads by context tokens, each thread owning whole
 * sequences; the next block's bytes are prefetched while the current one is
 * computed, because a block of one layer is a few KiB isolated from the next.
 *
 * Built at first use by triton_disagg.engine.cpu_kernel with the host
 * compiler (-O3 -march=native); AVX2+FMA when the CPU has them, plain C otherwise.
 * With OpenMP (-fopenmp) the threads are the caller's OpenMP team: in a process
 * that imported torch, torch's own (one libgomp.so.1 per process), whose threads
 * are awake from the model's other operations. Threads of our own would compete
 * for the cores with those, which spin for a while after each operation; that
 * made the kernel about 1.6x slower inside a model step than alone. Without
 * OpenMP it starts POSIX threads.
 */
#include <math.h>
#include <pthread.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
#else
#define HAVE_AVX2 0
#endif

#define MAX_THREADS 64
#define MAX_BLOCK_SIZE 256
/* Below this many (context token x query head) pairs one thread is faster than starting more. */
#define MIN_WORK_PER_THREAD 32768

typedef struct {
  const float *q;        /* (B, H, D) contiguous */
  const float *k;        /* this layer's K of block 0 */
  const float *v;        /* this layer's V of block 0 */
  int64_t block_stride;  /* floats between blocks */
  int64_t token_stride;  /* floats between tokens of a block (kv_heads * head_dim) */
  const int64_t *tables; /* (B, table_stride) block ids */
  int64_t table_stride;
  const int64_t *seq_lens; /* (B,) tokens each query attends to */
  int num_heads, num_kv_heads, head_dim, block_size;
  float scale;
  float *out;            /* (B, H, D) contiguous */
  int seq_start, seq_end;
  int status;
} job_t;

/* Prefetch part `part` of `num_parts` of a block's K and V. Spread over the heads of the block
 * before, so the loads in flight never fill the core's miss buffers at once. */
/* Inlined by force: as a function of its own, its calls would be dropped as side-effect free. */
static inline __attribute__((always_inline)) void prefetch_block_part(const job_t *job, int64_t block_id, int part, int num_parts) {
  const char *k = (const char *)(job->k + block_id * job->block_stride);
  const char *v = (const char *)(job->v + block_id * job->block_stride);
  const int64_t num_lines = ((int64_t)job->block_size * job->token_stride * (int64_t)sizeof(float) + 63) / 64;
  for (int64_t line = num_lines * part / num_parts; line < num_lines * (part + 1) / num_parts; line++) {
    __builtin_prefetch(k + line * 64, 0, 3);
    __builtin_prefetch(v + line * 64, 0, 3);
  }
}

#if HAVE_AVX2
/* e^x for 8 floats (Cephes expf: Cody-Waite reduction, degree-6 polynomial; ~1 ulp). */
static inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

/* The 8 dot products q . k[t] for t in 0..7 (k rows `stride` floats apart). */
static inline __m256 dot8(const float *q, const float *k, int64_t stride, int head_dim) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int d = 0; d < head_dim; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 0 * stride + d), a0);
    a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 1 * stride + d), a1);
    a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 2 * stride + d), a2);
    a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 3 * stride + d), a3);
    a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 4 * stride + d), a4);
    a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 5 * stride + d), a5);
    a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 6 * stride + d), a6);
    a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + 7 * stride + d), a7);
  }
  const __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31));
}
#endif

/* Scores of one head against one block: s[t] = q . k[t] (scaled q), t < block_size. */
static void block_scores(const job_t *job, const float *q, const float *k, float *s) {
#if HAVE_AVX2
  if (job->head_dim % 8 == 0 && job->block_size % 8 == 0) {
    for (int t = 0; t < job->block_size; t += 8)
      _mm256_storeu_ps(s + t, dot8(q, k + t * job->token_stride, job->token_stride, job->head_dim));
    return;
  }
#endif
  for (int t = 0; t < job->block_size; t++) {
    const float *kt = k + t * job->token_stride;
    float dot = 0.f;
    for (int d = 0; d < job->head_dim; d++) dot += q[d] * kt[d];
    s[t] = dot;
  }
}

/* p[t] = exp(s[t] - max) for t < num_tokens, 0 after; returns the sum. */
static float block_probs(float *s, float max, int num_tokens) {
  int t = 0;
#if HAVE_AVX2
  const __m256 m = _mm256_set1_ps(max);
  for (; t + 8 <= num_tokens; t += 8) _mm256_storeu_ps(s + t, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), m)));
#endif
  for (; t < num_tokens; t++) s[t] = expf(s[t] - max);
  float sum = 0.f;
  for (t = 0; t < num_tokens; t++) sum += s[t];
  return sum;
}

/* acc = acc * corr + sum_t p[t] * v[t] over the block's first num_tokens tokens. */
static void block_accumulate(const job_t *job, float *acc, float corr, const float *p, const float *v, int num_tokens) {
  const int64_t stride = job->token_stride;
  int d = 0;
#if HAVE_AVX2
  for (; d + 8 <= job->head_dim; d += 8) {
    __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc + d), _mm256_set1_ps(corr)), a1 = _mm256_setzero_ps();
    int t = 0;
    for (; t + 2 <= num_tokens; t += 2) {
      a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(v + t * stride + d), a0);
      a1 = _mm256_fmadd_ps(_mm256_set1_ps(p[t + 1]), _mm256_loadu_ps(v + (t + 1) * stride + d), a1);
    }
    if (t < num_tokens) a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(v + t * stride + d), a0);
    _mm256_storeu_ps(acc + d, _mm256_add_ps(a0, a1));
  }
#endif
  for (; d < job->head_dim; d++) {
    float a = acc[d] * corr;
    for (int t = 0; t < num_tokens; t++) a += p[t] * v[t * stride + d];
    acc[d] = a;
  }
}

static void run_job(job_t *job) {
  const int H = job->num_heads, D = job->head_dim, BS = job->block_size;
  const int group = H / job->num_kv_heads;
  float *state = malloc(sizeof(float) * ((size_t)2 * H * D + 2 * H));
  if (!state) { job->status = -2; return; }
  float *acc = state, *q = state + (size_t)H * D, *m = q + (size_t)H * D, *l = m + H;
  float s[MAX_BLOCK_SIZE];
  for (int b = job->seq_start; b < job->seq_end; b++) {
    const int64_t len = job->seq_lens[b];
    const int64_t *table = job->tables + b * job->table_stride;
    const float *qb = job->q + (int64_t)b * H * D;
    for (int i = 0; i < H * D; i++) { q[i] = qb[i] * job->scale; acc[i] = 0.f; }
    for (int h = 0; h < H; h++) { m[h] = -INFINITY; l[h] = 0.f; }
    const int64_t num_blocks = (len + BS - 1) / BS;
    if (num_blocks > 0) prefetch_block_part(job, table[0], 0, 1);
    for (int64_t j = 0; j < num_blocks; j++) {
      const int64_t block = table[j];
      const int num_tokens = (int)(len - j * BS < BS ? len - j * BS : BS);
      for (int h = 0; h < H; h++) {
        if (j + 1 < num_blocks) prefetch_block_part(job, table[j + 1], h, H);
        const int64_t head_offset = block * job->block_stride + (int64_t)(h / group) * D;
        block_scores(job, q + h * D, job->k + head_offset, s);
        float max = m[h];
        for (int t = 0; t < num_tokens; t++) max = s[t] > max ? s[t] : max;
        const float corr = expf(m[h] - max); /* 0 for the first block: m is -inf */
        l[h] = l[h] * corr + block_probs(s, max, num_tokens);
        m[h] = max;
        block_accumulate(job, acc + h * D, corr, s, job->v + head_offset, num_tokens);
      }
    }
    float *ob = job->out + (int64_t)b * H * D;
    for (int h = 0; h < H; h++) {
      const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
      for (int d = 0; d < D; d++) ob[h * D + d] = acc[h * D + d] * inv;
    }
  }
  free(state);
}

static void *thread_main(void *arg) {
  run_job((job_t *)arg);
  return NULL;
}

/* Which SIMD path this build took: 1 for AVX2+FMA, 0 for plain C. */
int paged_attention_simd(void) { return HAVE_AVX2; }

/* Whether this build runs on the caller's OpenMP team (1) or threads of its own (0). */
int paged_attention_openmp(void) {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

/*
 * out[b, h] = softmax(q[b, h] . K_b^T * scale) V_b over the first seq_lens[b] tokens
 * of sequence b, whose j-th block is tables[b * table_stride + j].
 * Returns 0, or -1 for an unsupported shape, -2 when out of memory.
 */
int paged_decode_f32(const float *q, const float *k, const float *v, int64_t block_stride, int64_t token_stride,
                     const int64_t *tables, int64_t table_stride, const int64_t *seq_lens, int num_seqs,
                     int num_heads, int num_kv_heads, int head_dim, int block_size, float scale, float *out,
                     int num_threads) {
  if (num_kv_heads < 1 || num_heads % num_kv_heads || block_size < 1 || block_size > MAX_BLOCK_SIZE || head_dim < 1)
    return -1;
  int64_t total = 0;
  for (int b = 0; b < num_seqs; b++) total += seq_lens[b];
  int64_t max_threads = total * num_heads / MIN_WORK_PER_THREAD;
  if (num_threads > max_threads) num_threads = (int)max_threads;
  if (num_threads > num_seqs) num_threads = num_seqs;
  if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
  if (num_threads < 1) num_threads = 1;

  job_t jobs[MAX_THREADS];
  pthread_t threads[MAX_THREADS];
  const job_t base = {q, k, v, block_stride, token_stride, tables, table_stride, seq_lens, num_heads, num_kv_heads,
                      head_dim, block_size, scale, out, 0, 0, 0};
  /* Thread i takes the sequences whose first context token falls in its share of all tokens. */
  int seq = 0;
  int64_t seen = 0;
  for (int i = 0; i < num_threads; i++) {
    jobs[i] = base;
    jobs[i].seq_start = seq;
    const int64_t share_end = total * (i + 1) / num_threads;
    while (seq < num_seqs && (i == num_threads - 1 || seen < share_end)) seen += seq_lens[seq++];
    jobs[i].seq_end = seq;
  }
  int status = 0;
#ifdef _OPENMP
  (void)threads;
  /* A team smaller than asked runs the remaining jobs on its threads in turn. */
#pragma omp parallel for num_threads(num_threads) schedule(static, 1)
  for (int i = 0; i < num_threads; i++) run_job(&jobs[i]);
  for (int i = 0; i < num_threads; i++)
    if (jobs[i].status) status = jobs[i].status;
#else
  int started = 1;
  for (int i = 1; i < num_threads; i++, started++)
    if (pthread_create(&threads[i], NULL, thread_main, &jobs[i]) != 0) break;
  for (int i = started; i < num_threads; i++) run_job(&jobs[i]); /* a thread we could not start: run here */
  run_job(&jobs[0]);
  status = jobs[0].status;
  for (int i = 1; i < started; i++) {
    pthread_join(threads[i], NULL);
    if (jobs[i].status) status = jobs[i].status;
  }
#endif
  return status;
}
