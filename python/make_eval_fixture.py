#!/usr/bin/env python3
"""Generate the evaluation-measure fixture for ``knn_trainer::eval::metrics``.

Usage::

    python python/make_eval_fixture.py --out DIR

Writes ``DIR/measures.json``: fixed random inputs (numpy, seeded, float64) and what numpy and
scipy compute from them:

- ``frechet``: the Fréchet distance as pytorch-fid computes it
  (``numpy.cov(rowvar=False)``, ``scipy.linalg.sqrtm(cov1 @ cov2)``, real part), for a
  well-conditioned case (n > d) and a singular one (n < d);
- ``precision_recall``: improved precision and recall (Kynkäänniemi et al. 2019), k = 3,
  by brute force over all pairwise Euclidean distances;
- ``r_precision``: R-precision at R = 1 of images against given candidate caption lists.
"""

import argparse
import json
import os

import numpy as np
import scipy
from scipy import linalg


def frechet(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1.dot(s2))
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def dists(x, y):
    return np.sqrt(((x[:, None, :] - y[None, :, :]) ** 2).sum(-1))


def manifold_share(points, members, k):
    radii = np.sort(dists(members, members), axis=1)[:, k]
    return float((dists(points, members) <= radii[None, :]).any(1).mean())


def r_precision(images, texts, candidates):
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit(images) @ unit(texts).T
    hits = [all(sims[i, j] < sims[i, c[0]] for j in c[1:]) for i, c in enumerate(candidates)]
    return float(np.mean(hits))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = ap.parse_args().out
    rng = np.random.default_rng(2023)
    cases = {}

    fr = []
    for name, n, m, d in [("well_conditioned", 300, 250, 8), ("singular", 10, 12, 16)]:
        a = rng.normal(size=(n, d))
        mix = rng.normal(size=(d, d)) * 0.5 + np.eye(d)
        b = rng.normal(size=(m, d)) @ mix + 0.3
        fr.append({"name": name, "a": a.tolist(), "b": b.tolist(), "fd": frechet(a, b)})
    cases["frechet"] = fr

    real = rng.normal(size=(120, 5))
    fake = rng.normal(size=(90, 5)) * 1.3 + 0.4
    cases["precision_recall"] = {
        "k": 3,
        "real": real.tolist(),
        "fake": fake.tolist(),
        "precision": manifold_share(fake, real, 3),
        "recall": manifold_share(real, fake, 3),
    }

    n_img, n_txt, d = 40, 60, 8
    texts = rng.normal(size=(n_txt, d))
    truth = rng.integers(0, n_txt, size=n_img)
    images = texts[truth] + rng.normal(size=(n_img, d)) * 1.2
    candidates = []
    for t in truth:
        others = [j for j in range(n_txt) if j != t]
        candidates.append([int(t)] + [int(j) for j in rng.choice(others, size=9, replace=False)])
    cases["r_precision"] = {
        "images": images.tolist(),
        "texts": texts.tolist(),
        "candidates": candidates,
        "r_precision": r_precision(images, texts, candidates),
    }
    cases["versions"] = {"numpy": np.__version__, "scipy": scipy.__version__}

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "measures.json"), "w") as f:
        json.dump(cases, f)


if __name__ == "__main__":
    main()
