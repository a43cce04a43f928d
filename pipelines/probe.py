"""The demo's linear probe: can the region features tell an image's colour and shape?

A multinomial logistic regression (L2, full-batch L-BFGS) on the mean-pooled region features of the train
images, each dimension standardised with the train statistics, scored on the test images, against chance. It
reads the answer from the features alone: the demo's check wants LXMERT's colour and shape accuracy close to it
(:func:`pipelines.report.check`). Run as ``python -m pipelines.report probe --store S --data D --out probe.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from extract.store import FeatureStore

__all__ = ["run_probe"]


def _image_labels(items: list[dict]) -> dict[str, dict[str, str]]:
    """img_id -> {"color": answer, "shape": answer} from the colour / shape questions of the items."""
    out: dict[str, dict[str, str]] = {}
    for it in items:
        qtype = it.get("question_type")
        if qtype in ("color", "shape") and it.get("label"):
            answer = max(it["label"].items(), key=lambda kv: kv[1])[0]
            out.setdefault(it["img_id"], {})[qtype] = answer
    return out


def _pooled(store: FeatureStore, ids: list[str]) -> np.ndarray:
    return np.stack([store[i]["features"].astype(np.float32).mean(axis=0) for i in ids])


def _fit_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, n: int
) -> float:
    """Test accuracy (percent) of a multinomial logistic regression (L2, full-batch L-BFGS)."""
    torch.manual_seed(0)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    layer = torch.nn.Linear(xt.shape[1], n)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(layer(xt), yt) + 1e-3 * layer.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = layer(torch.from_numpy(x_test)).argmax(1).numpy()
    return float((pred == y_test).mean() * 100)


def run_probe(store_path: Path, data: Path) -> dict[str, Any]:
    train = _image_labels(json.loads((data / "train.json").read_text()))
    test = _image_labels(json.loads((data / "test.json").read_text()))
    store = FeatureStore(store_path)
    result: dict[str, Any] = {}
    for kind in ("color", "shape"):
        tr = sorted(i for i, lab in train.items() if kind in lab and i in store)
        te = sorted(i for i, lab in test.items() if kind in lab and i in store)
        classes = sorted({train[i][kind] for i in tr} | {test[i][kind] for i in te})
        index = {c: k for k, c in enumerate(classes)}
        x_tr, x_te = _pooled(store, tr), _pooled(store, te)
        mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
        acc = _fit_probe(
            (x_tr - mean) / std,
            np.array([index[train[i][kind]] for i in tr]),
            (x_te - mean) / std,
            np.array([index[test[i][kind]] for i in te]),
            len(classes),
        )
        result[kind] = {
            "accuracy": round(acc, 2),
            "chance": round(100.0 / len(classes), 2),
            "classes": len(classes),
            "train_images": len(tr),
            "test_images": len(te),
        }
    store.close()
    return result
