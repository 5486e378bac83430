"""Sharded calibration, QwT, evaluation and error reports under ``torch.distributed`` equal one
process bit for bit (issue 15): 2 gloo processes started by ``torchrun`` against a plain process,
and the ordered fold's arithmetic on its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from fxquant.core import distributed

WORKER = Path(__file__).with_name("distributed_worker.py")
RECIPES = ["w8a8", "repq-w4a4", "repq-qwt-w4a4", "bitlog2-w4a4"]


def _run(cmd: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd + [str(out), *RECIPES], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_two_gloo_processes_equal_one_process_bit_for_bit(tmp_path):
    one = _run([sys.executable, str(WORKER)], tmp_path / "one.json")
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(WORKER)], tmp_path / "two.json")
    assert one.pop("world_size") == 1 and two.pop("world_size") == 2
    assert one.pop("ordered_sum") == two.pop("ordered_sum") == 4.0  # batch order, not rank order (3.0)
    for recipe in RECIPES:
        a, b = one[recipe], two[recipe]
        assert a["state_digest"] == b["state_digest"], f"{recipe}: quantizer parameters differ"
        assert a["logits_digest"] == b["logits_digest"], recipe
        assert a["top1"] == b["top1"], recipe
        assert a["report"] == b["report"], f"{recipe}: error report differs"
        assert a["report"]["images"] == 24


def test_ordered_fold_without_a_group_is_the_plain_loop():
    values = [torch.tensor(v, dtype=torch.float64) for v in (0.1, 1e16, -1e16, 0.3, 7.0)]
    acc = torch.zeros((), dtype=torch.float64)
    n = distributed.ordered_fold(values, lambda v: v * 3, acc.add_)
    expect = torch.zeros((), dtype=torch.float64)
    for v in values:
        expect += v * 3
    assert n == 5 and torch.equal(acc, expect)
    assert distributed.all_gather_objects({"a": 1}) == [{"a": 1}]
