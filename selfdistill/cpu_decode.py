"""A CPU kernel for decoding's few-row float32 products, compiled on first use with the system's C compiler.

A decoding step multiplies one row per sequence (8 rows for 8 rollouts) by every weight matrix of the model: 540 MB
of float32 weights for SmolLM2-135M, read once per generated token. For so few rows MKL's product reaches about
11 GB/s of weights on the 2-core Intel machine of docs/benchmarks.md, half of what a plain sum over the same bytes
reads (24 GB/s); ``weight @ x^T`` (the skinny path) is slower still there. :func:`rows_times_weight` computes
``x @ weight^T`` for at most :data:`MAX_ROWS` rows by streaming each weight row once, every row of ``x`` at a time,
with the next rows prefetched, split over torch's intra-op threads: 17.7–19.2 GB/s on that machine
(``python benchmarks/cpu_probes.py kernel``).

The kernel is C with GCC vector extensions (16 floats), built with ``-O3 -march=native -fopenmp`` into
``$XDG_CACHE_HOME/selfdistill`` (or ``~/.cache/selfdistill``, else a temporary folder) under a name hashed from the
source, the compiler and the CPU's flags, so a process builds it at most once per machine. It is used only where
it was measured to pay: CPUs whose torch build dispatches AVX-512. Elsewhere, or when no C compiler with OpenMP is
found, or the build fails, :func:`kernel` returns None once (logged) and decoding keeps torch's products.

Same products, another summation order: the logits agree with ``F.linear`` to float rounding (~1e-7 relative, as
torch's own product does with float64).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

#: Row counts up to this take the kernel (fewer rows are zero-padded to it: the weights' bytes, not the
#: multiply-adds, set the time).
MAX_ROWS = 8
#: The kernel reads 16 floats at a time: the input width must be a multiple of it.
WIDTH = 16

SOURCE = r"""
#include <math.h>
#include <string.h>
typedef float vf __attribute__((vector_size(64)));
static inline vf ld(const float* p) { vf r; memcpy(&r, p, 64); return r; }
static inline float hsum(vf v) { float s = 0.f; for (int i = 0; i < 16; i++) s += v[i]; return s; }
#define ROWS 8      /* rows of x, zero-padded by the caller */
#define AHEAD 1024  /* floats prefetched ahead in each weight row (4 KB) */

/* y[m*ldy + n] = (or +=, with add) sum_k x[m*k_in + k] * w[n*k_in + k] for weight rows n0 <= n < n1 */
static void span(const float* x, int k_in, const float* w, int n0, int n1, float* y, int rows, int ldy, int add) {
    int n = n0;
    for (; n + 2 <= n1; n += 2) {            /* two weight rows at a time: 16 accumulators */
        vf a[ROWS], b[ROWS];
        memset(a, 0, sizeof a); memset(b, 0, sizeof b);
        const float* w0 = w + (long)n * k_in;
        const float* w1 = w0 + k_in;
        for (int k = 0; k < k_in; k += 16) {
            vf p = ld(w0 + k), q = ld(w1 + k);
            __builtin_prefetch(w0 + k + AHEAD, 0, 3);
            __builtin_prefetch(w1 + k + AHEAD, 0, 3);
            #pragma GCC unroll 8
            for (int m = 0; m < ROWS; m++) { vf xm = ld(x + m * k_in + k); a[m] += p * xm; b[m] += q * xm; }
        }
        for (int m = 0; m < rows; m++) {
            float* o = y + (long)m * ldy + n;
            if (add) { o[0] += hsum(a[m]); o[1] += hsum(b[m]); } else { o[0] = hsum(a[m]); o[1] = hsum(b[m]); }
        }
    }
    for (; n < n1; n++) {                    /* an odd last row */
        vf a[ROWS];
        memset(a, 0, sizeof a);
        const float* w0 = w + (long)n * k_in;
        for (int k = 0; k < k_in; k += 16) {
            vf p = ld(w0 + k);
            for (int m = 0; m < ROWS; m++) a[m] += p * ld(x + m * k_in + k);
        }
        for (int m = 0; m < rows; m++) {
            float* o = y + (long)m * ldy + n;
            if (add) *o += hsum(a[m]); else *o = hsum(a[m]);
        }
    }
}

/* Several weights that read the same x, their rows taken as one list and split evenly over the threads. */
typedef struct { const float* w; int n; float* y; int add; } seg;

static void split(const float* x, int k_in, const seg* s, int ns, int rows, int t, int all) {
    int total = 0;
    for (int i = 0; i < ns; i++) total += s[i].n;
    int per = ((total + all - 1) / all + 1) & ~1;   /* an even share: the two-row blocks stay whole */
    int a = t * per, b = a + per, off = 0;
    if (b > total) b = total;
    for (int i = 0; i < ns; i++) {
        int lo = a > off ? a : off, hi = b < off + s[i].n ? b : off + s[i].n;
        if (lo < hi) span(x, k_in, s[i].w, lo - off, hi - off, s[i].y, rows, s[i].n, s[i].add);
        off += s[i].n;
    }
}

extern int omp_get_thread_num(void);
extern int omp_get_num_threads(void);

void rows_times_weight(const float* x, int rows, int k_in, const float* w, int n_out, float* y, int threads) {
    #pragma omp parallel num_threads(threads)
    {
        seg s = {w, n_out, y, 0};
        split(x, k_in, &s, 1, rows, omp_get_thread_num(), omp_get_num_threads());
    }
}

/* RMSNorm as transformers' Llama computes it: w * (x * 1/sqrt(mean(x^2) + eps)) */
static void rms_norm(const float* x, const float* w, float eps, int width, float* out) {
    float ss = 0.f;
    for (int i = 0; i < width; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / width + eps);
    for (int i = 0; i < width; i++) out[i] = w[i] * (x[i] * r);
}

/* Rotary embedding of one head: v * cos + rotate_half(v) * sin, rotate_half(v) = (-v[d/2:], v[:d/2]) */
static void rotate(const float* v, const float* c, const float* s, int d, float* out) {
    int h = d / 2;
    for (int i = 0; i < h; i++) out[i] = v[i] * c[i] + (-v[i + h]) * s[i];
    for (int i = h; i < d; i++) out[i] = v[i] * c[i] + v[i - h] * s[i];
}

/* sum_i a[i] * b[i], in 16-float vectors when n allows it */
static inline float dot(const float* a, const float* b, int n) {
    if (n % 16) { float d = 0.f; for (int i = 0; i < n; i++) d += a[i] * b[i]; return d; }
    vf acc = ld(a) * ld(b);
    for (int i = 16; i < n; i += 16) acc += ld(a + i) * ld(b + i);
    return hsum(acc);
}

/* Shapes of one Llama decoder layer and the buffers a decoding step uses (see selfdistill.decode_loop). */
typedef struct {
    int rows, hidden, heads, kv_heads, head_dim, inter, cap, pos, threads;
    float eps, scale;
    const float *ln1, *ln2, *wq, *wk, *wv, *wo, *wg, *wu, *wd;
    float *k_cache, *v_cache;          /* [rows][kv_heads][cap][head_dim] */
    const unsigned char* valid;        /* [rows][cap]: 1 where a row attends to a cached position */
    const float *cos, *sin;            /* [rows][head_dim] of each row's new position */
    float *x;                          /* [ROWS][hidden]: the residual stream, updated in place */
    float *h, *q, *k, *v, *att, *g, *u, *scores;   /* scratch; scores: [threads][cap] */
} layer_args;

/* One decoding step of one layer for every row: x += attention(norm(x)); x += mlp(norm(x)), in one parallel region. */
void decode_layer(const layer_args* L) {
    int rows = L->rows, H = L->hidden, hd = L->head_dim, nkv = L->kv_heads, group = L->heads / L->kv_heads;
    int qw = L->heads * hd, kw = nkv * hd;
    #pragma omp parallel num_threads(L->threads)
    {
        int t = omp_get_thread_num(), all = omp_get_num_threads();
        #pragma omp for
        for (int m = 0; m < rows; m++) rms_norm(L->x + (long)m * H, L->ln1, L->eps, H, L->h + (long)m * H);
        seg qkv[3] = {{L->wq, qw, L->q, 0}, {L->wk, kw, L->k, 0}, {L->wv, kw, L->v, 0}};
        split(L->h, H, qkv, 3, rows, t, all);
        #pragma omp barrier
        float* sc = L->scores + (long)t * L->cap;
        #pragma omp for
        for (int task = 0; task < rows * nkv; task++) {
            int m = task / nkv, j = task % nkv;
            const float *c = L->cos + (long)m * hd, *s = L->sin + (long)m * hd;
            long base = ((long)m * nkv + j) * L->cap;
            rotate(L->k + (long)m * kw + j * hd, c, s, hd, L->k_cache + (base + L->pos) * hd);
            memcpy(L->v_cache + (base + L->pos) * hd, L->v + (long)m * kw + j * hd, hd * sizeof(float));
            const unsigned char* ok = L->valid + (long)m * L->cap;
            for (int r = 0; r < group; r++) {
                int head = j * group + r;
                float qr[hd];
                rotate(L->q + (long)m * qw + head * hd, c, s, hd, qr);
                float top = -INFINITY;
                for (int p = 0; p <= L->pos; p++) {
                    if (!ok[p]) continue;
                    const float* kp = L->k_cache + (base + p) * hd;
                    sc[p] = dot(qr, kp, hd) * L->scale;
                    if (sc[p] > top) top = sc[p];
                }
                float total = 0.f;
                float* out = L->att + (long)m * qw + head * hd;
                for (int i = 0; i < hd; i++) out[i] = 0.f;
                for (int p = 0; p <= L->pos; p++) {
                    if (!ok[p]) continue;
                    float e = expf(sc[p] - top);
                    total += e;
                    const float* vp = L->v_cache + (base + p) * hd;
                    for (int i = 0; i < hd; i++) out[i] += e * vp[i];
                }
                for (int i = 0; i < hd; i++) out[i] /= total;
            }
        }
        seg o = {L->wo, H, L->x, 1};
        split(L->att, qw, &o, 1, rows, t, all);
        #pragma omp barrier
        #pragma omp for
        for (int m = 0; m < rows; m++) rms_norm(L->x + (long)m * H, L->ln2, L->eps, H, L->h + (long)m * H);
        seg gu[2] = {{L->wg, L->inter, L->g, 0}, {L->wu, L->inter, L->u, 0}};
        split(L->h, H, gu, 2, rows, t, all);
        #pragma omp barrier
        #pragma omp for
        for (int i = 0; i < rows * L->inter; i++) {
            float a = L->g[i];
            L->g[i] = a / (1.f + expf(-a)) * L->u[i];
        }
        seg d = {L->wd, H, L->x, 1};
        split(L->g, L->inter, &d, 1, rows, t, all);
    }
}
"""

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = Path(base) / "selfdistill"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if os.access(folder, os.W_OK):
            return folder
    except OSError:
        pass
    folder = Path(tempfile.gettempdir()) / "selfdistill"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _build() -> ctypes.CDLL | None:
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        logger.info("decode kernel: not used (the CPU's torch build does not dispatch AVX-512)")
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("decode kernel: no C compiler found (cc/gcc, or $CC); decoding uses torch's products")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    key = hashlib.sha256("\0".join([SOURCE, compiler, version, _cpu_flags()]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"decode_kernel_{key}.so"
    if not target.exists():
        with tempfile.TemporaryDirectory(dir=folder) as work:  # built aside, then renamed: ranks may race
            source = Path(work) / "decode_kernel.c"
            source.write_text(SOURCE)
            built = Path(work) / "decode_kernel.so"
            cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(source), "-o", str(built)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as err:
                logger.info("decode kernel: could not run %s (%s); decoding uses torch's products", compiler, err)
                return None
            if done.returncode != 0:
                logger.info("decode kernel: build failed (%s); decoding uses torch's products",
                            done.stderr.strip().splitlines()[-1:] or done.returncode)
                return None
            os.replace(built, target)
    lib = ctypes.CDLL(str(target))
    fn = lib.rows_times_weight
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                   ctypes.c_int]
    fn.restype = None
    lib.decode_layer.argtypes = [ctypes.c_void_p]
    lib.decode_layer.restype = None
    logger.info("decode kernel: %s", target)
    return lib


def kernel() -> ctypes.CDLL | None:
    """The built kernel library, or None where it is not used (see the module's docstring); built once."""
    with _lock:
        if "lib" not in _state:
            try:
                _state["lib"] = _build()
            except OSError as err:  # an unwritable cache, a library that does not load
                logger.info("decode kernel: not used (%s)", err)
                _state["lib"] = None
        return _state["lib"]  # type: ignore[return-value]


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``x @ weight^T`` (x already 2-D) is one the kernel computes: float32 on the CPU, outside autocast (whose
    product runs in bf16) and autograd, at most :data:`MAX_ROWS` rows, a width that is a multiple of :data:`WIDTH`."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and weight.device.type == "cpu" and weight.dim() == 2 and weight.is_contiguous()
            and 0 < x.shape[0] <= MAX_ROWS and x.shape[1] == weight.shape[1] and x.shape[1] % WIDTH == 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.is_autocast_enabled("cpu"))  # autocast computes the product in its lower precision


def rows_times_weight(x: torch.Tensor, weight: torch.Tensor, lib: ctypes.CDLL) -> torch.Tensor:
    """``x @ weight.T`` for a 2-D float32 ``x`` of at most :data:`MAX_ROWS` rows (see :func:`applies`)."""
    rows, k_in = x.shape
    if rows == MAX_ROWS:
        padded = x.contiguous()
    else:
        padded = x.new_zeros(MAX_ROWS, k_in)
        padded[:rows] = x
    out = torch.empty(rows, weight.shape[0], dtype=x.dtype)
    lib.rows_times_weight(padded.data_ptr(), rows, k_in, weight.data_ptr(), weight.shape[0], out.data_ptr(),
                          torch.get_num_threads())
    return out
