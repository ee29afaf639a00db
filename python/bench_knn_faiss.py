#!/usr/bin/env python3
"""faiss-cpu peer of the Rust batch k-NN benchmark (`knn-diffusion bench knn`).

What it is
    The reference ("peer") measurement that the Rust command
    `knn-diffusion bench knn` runs as a subprocess and whose JSON it reads.
    It solves the same problem as the Rust side: a batch k-nearest-neighbour
    self-join over L2-normalised float32 vectors (cosine = inner product),
    where every database row is also a query and its own row is excluded.

What it measures
    1. build: faiss.IndexIVFFlat (IndexFlatIP quantizer, METRIC_INNER_PRODUCT),
       trained on faiss' own subsample of the rows (fixed seed)  -> train_s;
       all N rows added                                          -> add_s.
    2. tuning: nprobe is raised along 1,2,3,4,6,8,12,16,24,32,48,64,96,128,...
       (up to nlist) until recall@k on the ground-truth sample reaches
       --target-recall; the table is reported, its time is tune_s and it is
       NOT part of the search timing.
    3. timed search: all N rows are searched as queries (k+1 neighbours, in
       batches of --batch-size rows) at the chosen nprobe -> search_s; then
       recall@k of the sample rows is recomputed from that full output
       (recall_full).
    Self-removal rule (tuning and full search alike): from each k+1 result row
    the query's own row index is dropped if present, otherwise the last entry
    is dropped; the first k entries remain.  recall@k = mean over sample
    queries of |result ∩ gt| / k.

Output
    One JSON object on stdout (progress and notes go to stderr), also written
    to --json PATH when given.  Keys: n, d, k, nlist, nprobe, threads,
    train_s, add_s, tune_s, search_s, total_s (train+add+search), qps_search
    (N/search_s), qps_total (N/total_s), recall_sample, recall_full, tuning
    ([[nprobe, recall], ...]), faiss_version, plus batch_size, target_recall,
    target_reached, m (sample size), seed, spherical, load_s, numpy_version.

Example
    python python/bench_knn_faiss.py --vectors vecs.npy \
        --gt-queries gt_q.npy --gt gt.npy --k 10 --target-recall 0.99 \
        --threads 2 --json faiss.json
"""

import argparse
import json
import math
import sys
import time

import numpy as np

try:
    import faiss
except ImportError as exc:  # pragma: no cover - environment problem
    sys.exit(
        "bench_knn_faiss: cannot import faiss (%s); install it with "
        "`pip install -r python/requirements.txt`" % exc
    )


def note(msg):
    print("bench_knn_faiss: " + msg, file=sys.stderr, flush=True)


def fail(msg):
    sys.exit("bench_knn_faiss: error: " + msg)


def nprobe_schedule(nlist):
    """1,2,3,4,6,8,12,16,24,32,48,64,96,128,192,256,... capped at nlist (nlist included)."""
    out = [1, 2, 3]
    p = 4
    while p < nlist:
        out.append(p)
        out.append(p * 3 // 2)
        p *= 2
    out = sorted(set(x for x in out if x < nlist))
    out.append(nlist)
    return out


def drop_self(labels, qids, k):
    """labels [q, k+1] -> [q, k]: drop each row's own index if present, else the last column."""
    q, kk = labels.shape
    if kk != k + 1:
        raise ValueError("expected k+1 columns")
    is_self = labels == qids[:, None]
    has_self = is_self.any(axis=1)
    pos = np.where(has_self, is_self.argmax(axis=1), k)
    keep = np.ones_like(labels, dtype=bool)
    keep[np.arange(q), pos] = False
    return labels[keep].reshape(q, k)


def recall_at_k(res, gt, k):
    """mean over rows of |res_row ∩ gt_row| / k (res, gt: [m, k]; -1 never matches)."""
    hits = (res[:, :, None] == gt[:, None, :]).any(axis=2)
    hits &= res >= 0
    return float(hits.sum(axis=1).mean() / k)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description=(
            "faiss-cpu IVFFlat peer for the Rust `knn-diffusion bench knn`: "
            "batch k-NN self-join (every row is a query, self excluded) over "
            "L2-normalised float32 vectors with inner-product similarity. "
            "Tunes nprobe on a ground-truth sample to reach --target-recall, "
            "then times the search of all N rows and prints a JSON object."
        )
    )
    ap.add_argument("--vectors", required=True, metavar="PATH",
                    help=".npy float32 [N, d], rows L2-normalised (cosine = inner product)")
    ap.add_argument("--gt-queries", required=True, metavar="PATH",
                    help=".npy int64 [m]: row indices of the sample query rows")
    ap.add_argument("--gt", required=True, metavar="PATH",
                    help=".npy int64 [m, k]: exact top-k neighbour row indices of each "
                         "sample query, self excluded")
    ap.add_argument("--k", type=int, default=10, help="neighbours per row (default 10)")
    ap.add_argument("--target-recall", type=float, default=0.99,
                    help="recall@k on the sample that tuning must reach (default 0.99)")
    ap.add_argument("--nlist", type=int, default=0,
                    help="IVF lists; 0 (default) = round(4*sqrt(N)); always clamped to "
                         "[1, N//39] so training has >= 39 points per list")
    ap.add_argument("--threads", type=int, default=2,
                    help="OpenMP threads for faiss (faiss.omp_set_num_threads, default 2)")
    ap.add_argument("--batch-size", type=int, default=65536,
                    help="query rows per search call in the timed full search (default 65536)")
    ap.add_argument("--seed", type=int, default=1234,
                    help="k-means seed (index.cp.seed, default 1234)")
    ap.add_argument("--spherical", action="store_true",
                    help="spherical k-means (normalise centroids); off by default = faiss default")
    ap.add_argument("--json", metavar="PATH", default=None,
                    help="write the result object here (it is printed to stdout too)")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    k = args.k
    if k < 1:
        fail("--k must be >= 1 (got %d)" % k)
    if not (0.0 < args.target_recall <= 1.0):
        fail("--target-recall must be in (0, 1] (got %g)" % args.target_recall)
    if args.threads < 1:
        fail("--threads must be >= 1 (got %d)" % args.threads)
    if args.batch_size < 1:
        fail("--batch-size must be >= 1 (got %d)" % args.batch_size)

    # ---- load -------------------------------------------------------------
    t0 = time.perf_counter()
    try:
        xb = np.load(args.vectors, mmap_mode="r")
    except Exception as exc:
        fail("cannot load --vectors %s: %s" % (args.vectors, exc))
    if xb.ndim != 2:
        fail("--vectors must be 2-D [N, d], got shape %s" % (xb.shape,))
    if xb.dtype != np.float32:
        note("--vectors dtype is %s, converting to float32" % xb.dtype)
    # Fully in RAM and C-contiguous, so no page faults land in the timings.
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    load_s = time.perf_counter() - t0
    n, d = xb.shape
    if n < 2 or d < 1:
        fail("--vectors needs N >= 2 and d >= 1, got shape %s" % (xb.shape,))
    if k + 1 > n:
        fail("--k %d needs at least k+1 = %d rows, --vectors has %d" % (k, k + 1, n))
    if not np.isfinite(xb[: min(n, 4096)]).all():
        fail("--vectors contains non-finite values")
    norms = np.linalg.norm(xb[: min(n, 4096)], axis=1)
    if np.abs(norms - 1.0).max() > 1e-3:
        note("warning: rows are not L2-normalised (norm range %.4f..%.4f); "
             "inner product != cosine" % (norms.min(), norms.max()))

    try:
        gq = np.load(args.gt_queries)
        gt = np.load(args.gt)
    except Exception as exc:
        fail("cannot load ground truth: %s" % exc)
    if gq.ndim != 1:
        fail("--gt-queries must be 1-D [m], got shape %s" % (gq.shape,))
    if gt.ndim != 2:
        fail("--gt must be 2-D [m, k], got shape %s" % (gt.shape,))
    if not np.issubdtype(gq.dtype, np.integer) or not np.issubdtype(gt.dtype, np.integer):
        fail("--gt-queries / --gt must be integer arrays (got %s / %s)" % (gq.dtype, gt.dtype))
    m = gq.shape[0]
    if m == 0:
        fail("--gt-queries is empty")
    if gt.shape[0] != m:
        fail("--gt has %d rows but --gt-queries has %d entries" % (gt.shape[0], m))
    if gt.shape[1] != k:
        fail("--gt has %d columns but --k is %d" % (gt.shape[1], k))
    gq = gq.astype(np.int64)
    gt = gt.astype(np.int64)
    if gq.min() < 0 or gq.max() >= n:
        fail("--gt-queries has indices outside [0, %d)" % n)
    if gt.min() < 0 or gt.max() >= n:
        fail("--gt has indices outside [0, %d)" % n)
    if (gt == gq[:, None]).any():
        note("warning: --gt contains the query's own row for %d queries "
             "(ground truth should exclude self)" % int((gt == gq[:, None]).any(axis=1).sum()))

    # ---- index ------------------------------------------------------------
    nlist_req = args.nlist if args.nlist > 0 else int(round(4.0 * math.sqrt(n)))
    nlist = max(1, min(nlist_req, n // 39))
    if nlist != nlist_req:
        note("nlist %d clamped to %d (N=%d, >= 39 training points per list)" % (nlist_req, nlist, n))
    faiss.omp_set_num_threads(args.threads)

    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = args.seed
    index.cp.spherical = bool(args.spherical)
    # Train on all rows: faiss subsamples to cp.max_points_per_centroid * nlist itself.
    note("training IVFFlat nlist=%d on N=%d d=%d (faiss subsamples to <= %d points), threads=%d"
         % (nlist, n, d, index.cp.max_points_per_centroid * nlist, args.threads))
    t0 = time.perf_counter()
    index.train(xb)
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index.add(xb)
    add_s = time.perf_counter() - t0
    note("train %.3fs, add %.3fs" % (train_s, add_s))

    # ---- tune nprobe ------------------------------------------------------
    xq = np.ascontiguousarray(xb[gq])
    tuning = []
    chosen = None
    recall_sample = None
    t0 = time.perf_counter()
    for p in nprobe_schedule(nlist):
        index.nprobe = p
        _, lab = index.search(xq, k + 1)
        r = recall_at_k(drop_self(lab, gq, k), gt, k)
        tuning.append([p, r])
        note("tune nprobe=%d recall@%d=%.4f" % (p, k, r))
        chosen, recall_sample = p, r
        if r >= args.target_recall:
            break
    tune_s = time.perf_counter() - t0
    target_reached = recall_sample >= args.target_recall
    if not target_reached:
        note("warning: target recall %.4f not reached even at nprobe=nlist=%d (recall %.4f)"
             % (args.target_recall, nlist, recall_sample))

    # ---- timed full self-join search ---------------------------------------
    index.nprobe = chosen
    bs = args.batch_size
    labels = np.empty((n, k + 1), dtype=np.int64)
    note("searching all %d rows, nprobe=%d, batch %d" % (n, chosen, bs))
    t0 = time.perf_counter()
    for s in range(0, n, bs):
        e = min(n, s + bs)
        _, labels[s:e] = index.search(xb[s:e], k + 1)
    search_s = time.perf_counter() - t0
    recall_full = recall_at_k(drop_self(labels[gq], gq, k), gt, k)
    note("search %.3fs, recall_full %.4f" % (search_s, recall_full))

    total_s = train_s + add_s + search_s
    result = {
        "n": int(n),
        "d": int(d),
        "k": int(k),
        "nlist": int(nlist),
        "nprobe": int(chosen),
        "threads": int(args.threads),
        "train_s": train_s,
        "add_s": add_s,
        "tune_s": tune_s,
        "search_s": search_s,
        "total_s": total_s,
        "qps_search": n / search_s if search_s > 0 else None,
        "qps_total": n / total_s if total_s > 0 else None,
        "recall_sample": recall_sample,
        "recall_full": recall_full,
        "tuning": tuning,
        "faiss_version": faiss.__version__,
        "batch_size": int(bs),
        "target_recall": args.target_recall,
        "target_reached": bool(target_reached),
        "m": int(m),
        "seed": int(args.seed),
        "spherical": bool(args.spherical),
        "load_s": load_s,
        "numpy_version": np.__version__,
    }
    text = json.dumps(result, indent=2)
    if args.json:
        try:
            with open(args.json, "w") as f:
                f.write(text + "\n")
        except OSError as exc:
            fail("cannot write --json %s: %s" % (args.json, exc))
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
