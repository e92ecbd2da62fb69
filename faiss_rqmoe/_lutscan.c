/* The CPU lookup-table scan of 8-bit codes, read in place from faiss's inverted lists
 * (docs/design.md, "The lookup-table formula"; faiss_rqmoe/lutscan.py loads it with ctypes).
 *
 * For one query and each probed list l, every stored vector j scores
 *     L2: (coarse + term_j) - 2 * sum_m lut[m][code_jm]     (smaller is better)
 *     IP:  coarse + sum_m lut[m][code_jm]                    (larger is better)
 * summed step by step in float32, the same operations in the same order as the torch scan, so both give
 * the same distances. A bounded max-heap keeps the k best; they come out sorted, best first.
 *
 * No OpenMP: the caller runs query chunks on its own threads (ctypes releases the GIL), which keeps this
 * library free of a third OpenMP runtime beside faiss's and torch's.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* a kept candidate; the heap keeps the largest key (the worst kept) at its root */
typedef struct {
    float key;
    int64_t list, row;
} Entry;

static void sift_down(Entry *heap, int64_t n, int64_t i) {
    Entry moved = heap[i];
    for (;;) {
        int64_t c = 2 * i + 1;
        if (c >= n) break;
        if (c + 1 < n && heap[c + 1].key > heap[c].key) c++;
        if (heap[c].key <= moved.key) break;
        heap[i] = heap[c];
        i = c;
    }
    heap[i] = moved;
}

static void sift_up(Entry *heap, int64_t i) {
    Entry moved = heap[i];
    while (i > 0) {
        int64_t p = (i - 1) / 2;
        if (heap[p].key >= moved.key) break;
        heap[i] = heap[p];
        i = p;
    }
    heap[i] = moved;
}

static inline float table_sum(const float *lut, const uint8_t *code, int64_t M) {
    float s = lut[code[0]];
    for (int64_t m = 1; m < M; m++) s += lut[m * 256 + code[m]];
    return s;
}

/* The body of the scan over one list, specialised on M by the compiler where M is a constant. */
#define SCAN_LIST(MM)                                                                    \
    for (int64_t j = 0; j < size; j++) {                                                 \
        if (mask && !mask[j]) continue;                                                  \
        float s = table_sum(lut, codes + j * stride, (MM));                              \
        float key = ip ? -(c + s) : (c + terms[j]) - 2.0f * s;                           \
        if (n < k) {                                                                     \
            heap[n] = (Entry){key, l, j};                                                \
            sift_up(heap, n++);                                                          \
        } else if (key < heap[0].key) {                                                  \
            heap[0] = (Entry){key, l, j};                                                \
            sift_down(heap, n, 0);                                                       \
        }                                                                                \
    }

/* Returns 0, or -1 when the heap could not be allocated.
 *
 * nq queries, P probes each, M sub-codes of 8 bits (K = 256), k kept;
 * luts (nq, M, 256) float32; probes (nq, P) int64, -1 for none; coarse (nq, P) float32;
 * per list (nlist entries, addresses as int64, 0 for none): codes (size rows of `stride` bytes, the first
 * M the sub-codes), ids (size,) int64, terms (size,) float32 (L2 only), mask (size,) uint8 or 0;
 * sizes (nlist,) int64.
 * Out: dist (nq, k) float32 (+inf L2 / -inf IP where empty), ids (nq, k) int64 (-1), lists (nq, k) int64
 * (0), codes (nq, k, M) uint8 (0).
 */
int rqmoe_lutscan(int64_t nq, int64_t P, int64_t M, int64_t k, int32_t ip, const float *luts,
                  const int64_t *probes, const float *coarse, const int64_t *codes_at, const int64_t *ids_at,
                  const int64_t *terms_at, const int64_t *mask_at, const int64_t *sizes, int64_t stride,
                  float *out_dist, int64_t *out_ids, int64_t *out_lists, uint8_t *out_codes) {
    Entry *heap = malloc(sizeof(Entry) * (k > 0 ? k : 1));
    if (!heap) return -1;
    for (int64_t q = 0; q < nq; q++) {
        const float *lut = luts + q * M * 256;
        int64_t n = 0;
        for (int64_t p = 0; p < P; p++) {
            int64_t l = probes[q * P + p];
            if (l < 0) continue;
            int64_t size = sizes[l];
            if (size == 0) continue;
            const uint8_t *codes = (const uint8_t *)(intptr_t)codes_at[l];
            const float *terms = ip ? NULL : (const float *)(intptr_t)terms_at[l];
            const uint8_t *mask = (const uint8_t *)(intptr_t)mask_at[l];
            float c = coarse[q * P + p];
            switch (M) {
                case 4: SCAN_LIST(4) break;
                case 8: SCAN_LIST(8) break;
                case 16: SCAN_LIST(16) break;
                default: SCAN_LIST(M) break;
            }
        }
        /* heap sort in place: the worst goes last, so the array ends best first */
        for (int64_t end = n - 1; end > 0; end--) {
            Entry worst = heap[0];
            heap[0] = heap[end];
            heap[end] = worst;
            sift_down(heap, end, 0);
        }
        float *od = out_dist + q * k;
        int64_t *oi = out_ids + q * k, *ol = out_lists + q * k;
        uint8_t *oc = out_codes + q * k * M;
        for (int64_t i = 0; i < n; i++) {
            int64_t l = heap[i].list, j = heap[i].row;
            od[i] = ip ? -heap[i].key : heap[i].key;
            oi[i] = ((const int64_t *)(intptr_t)ids_at[l])[j];
            ol[i] = l;
            memcpy(oc + i * M, (const uint8_t *)(intptr_t)codes_at[l] + j * stride, (size_t)M);
        }
        for (int64_t i = n; i < k; i++) {
            od[i] = ip ? -INFINITY : INFINITY;
            oi[i] = -1;
            ol[i] = 0;
            memset(oc + i * M, 0, (size_t)M);
        }
    }
    free(heap);
    return 0;
}
