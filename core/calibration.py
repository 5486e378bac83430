"""Calibration data and the loop that streams it through a model.

``calib=`` accepts an iterable of batches (a ``DataLoader``, a list of tensors, a tensor of
images that is split into batches) or a callable ``forward_loop(model)`` that runs the model
itself (torch.ao convention). Batches are tensors, ``(inputs, labels)`` tuples or dicts of model
keyword arguments (``fxquant.core.batches``). Nothing is stored: each batch flows through the observers and is dropped.

The first tensor batch is compared with the captured graph's example input (``check_first_batch``:
sizes after the batch dimension, dtype, device), so that a wrong batch fails with its mismatch named
instead of deep inside a pass; one batch is checked, never more.

Under ``torch.distributed`` (``torchrun``), ``fold_batches`` shards the batches across ranks
(batch ``i`` on rank ``i % W``) and folds every batch's result on every rank in batch order
(``distributed.ordered_fold``), so the statistics equal the single-process ones bit for bit. The
unit of sharding is the batch, not the image: a batch's floating-point results depend on its
composition, so the batches stay as the user made them.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from . import distributed
from .batches import call_model, graph_inputs, limit_images
from .errors import CalibrationError


def check_batch(batch: Any, example: torch.Tensor, *, index: int = 0) -> None:
    """Raise ``CalibrationError`` when the tensor input of ``batch`` (a tensor or an ``(inputs,
    labels)`` tuple) cannot be the input ``example`` stands for: another number of dimensions,
    other sizes after the batch dimension (the channel count named for images), another dtype or
    device. Other batch forms (dicts, loops) are not checked."""
    x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if not isinstance(x, torch.Tensor) or not isinstance(example, torch.Tensor):
        return
    problems = []
    if x.dim() != example.dim():
        problems.append(f"{x.dim()} dimensions {list(x.shape)} vs {example.dim()} {list(example.shape)}")
    elif x.shape[1:] != example.shape[1:]:
        what = (f"channels {x.shape[1]} vs {example.shape[1]}" if x.dim() == 4 and x.shape[1] != example.shape[1]
                else f"sizes after the batch dimension {list(x.shape[1:])} vs {list(example.shape[1:])}")
        problems.append(f"shape {list(x.shape)} vs {list(example.shape)} ({what})")
    if x.dtype != example.dtype:
        problems.append(f"dtype {str(x.dtype).replace('torch.', '')} vs {str(example.dtype).replace('torch.', '')}")
    if x.device != example.device:
        problems.append(f"device {x.device} vs {example.device}")
    if problems:
        raise CalibrationError(
            f"calibration batch {index} does not match the example input the model was captured with: "
            + "; ".join(problems) + ". Make the calibration batches like the example input (sizes after the batch "
            "dimension, dtype, device), or pass example_inputs= like them."
        )


class Calibration:
    """Calibration data in one of the accepted forms (see module docstring)."""

    def __init__(self, data: Iterable | Callable[[nn.Module], Any] | torch.Tensor, *, batch_size: int = 32,
                 progress: bool = True, desc: str = "calibrate"):
        if isinstance(data, Calibration):
            data = data.data
        if data is None:
            raise CalibrationError("calibration data is None; pass calib=<DataLoader | list of batches | forward_loop(model)>")
        self.data = data
        self.batch_size = batch_size
        self.progress = progress
        self.desc = desc
        self._expect: torch.Tensor | None = None  # the example input the first streamed batch is checked against

    @property
    def is_loop(self) -> bool:
        return callable(self.data) and not isinstance(self.data, (torch.Tensor, nn.Module)) and not hasattr(self.data, "__iter__")

    def batches(self) -> Iterable:
        if isinstance(self.data, torch.Tensor):
            if self.data.dim() == 0 or self.data.shape[0] == 0:
                raise CalibrationError("the calibration tensor is empty; pass at least one image")
            return list(torch.split(self.data, self.batch_size))
        if not hasattr(self.data, "__iter__"):
            raise CalibrationError(
                f"calib must be an iterable of batches or a callable forward_loop(model); got {type(self.data).__name__}"
            )
        return self.data

    def first_batch(self) -> Any | None:
        """The first batch without consuming a one-shot iterator (None for loops and generators)."""
        if self.is_loop:
            return None
        b = self.batches()
        if iter(b) is b:  # a generator: peeking would consume it
            return None
        for batch in b:
            return batch
        return None

    def check_first_batch(self, example: torch.Tensor) -> None:
        """Check the first batch against ``example`` (``check_batch``): now when the data is in
        memory (a tensor, a list or tuple of batches), otherwise when it first streams through
        ``limited`` (a DataLoader is not iterated an extra time, a generator not consumed)."""
        if self.is_loop:
            return
        if isinstance(self.data, (torch.Tensor, list, tuple)):
            first = self.first_batch()
            if first is not None:
                check_batch(first, example)
        else:
            self._expect = example

    def limited(self, max_images: int | None) -> Iterable:
        """The batches, cut so that at most ``max_images`` images are yielded (None: all)."""
        batches = limit_images(self.batches(), max_images)
        return batches if self._expect is None else self._checked(batches)

    def _checked(self, batches: Iterable) -> Iterable:
        for batch in batches:
            if self._expect is not None:
                check_batch(batch, self._expect)
                self._expect = None
            yield batch

    def fold_batches(self, compute: Callable[[Any], Any], fold: Callable[[Any], None], *,
                     max_images: int | None = None) -> int:
        """``fold(compute(batch))`` for every batch in order (at most ``max_images`` images), under
        ``torch.no_grad``; with a process group each rank computes its share and every rank folds
        all results in batch order (module docstring). Returns the number of batches."""
        if self.is_loop:
            raise CalibrationError("this step needs calib as an iterable of batches (it runs each batch itself), "
                                   "not a forward_loop callable")
        batches = self.batches()
        total = len(batches) if hasattr(batches, "__len__") and max_images is None else None
        with torch.no_grad(), tqdm(total=total, desc=self.desc, leave=False,
                                   disable=not self.progress or not distributed.is_main()) as bar:
            def step(batch):
                out = compute(batch)
                bar.update(distributed.world_size())
                return out

            n = distributed.ordered_fold(self.limited(max_images), step, fold)
        if n == 0:
            raise CalibrationError("the calibration data is empty (no batches); pass at least one batch of images")
        return n

    def run(self, model: nn.Module, *, max_images: int | None = None) -> int:
        """Stream the batches (at most ``max_images`` images) through ``model`` (sharded under
        ``torch.distributed``, as ``fold_batches``); returns the number of batches (loops: model
        calls seen; a loop runs whole on every rank, ``max_images`` cannot cut it)."""
        if not self.is_loop:
            return self.fold_batches(lambda batch: call_model(model, batch), lambda _: None, max_images=max_images)
        calls = [0]

        def count(_m, _i, _o):
            calls[0] += 1

        handle = model.register_forward_hook(count)
        try:
            with torch.no_grad():
                self.data(model)
        finally:
            handle.remove()
        if calls[0] == 0:
            raise CalibrationError("the calibration forward_loop(model) never called the model; "
                                   "it must run calibration batches through it")
        return calls[0]


def locate_nonfinite(gm: fx.GraphModule, batch: Any) -> tuple[str, str] | None:
    """Run ``batch`` node by node and return ``(node name, description)`` of the first node whose
    output holds NaN or Inf, or None. Quantizers are left as they are."""

    class _Finder(fx.Interpreter):
        found: tuple[str, str] | None = None

        def run_node(self, n):
            out = super().run_node(n)
            if self.found is None:
                outs = out if isinstance(out, (tuple, list)) else [out]
                ts = [t for t in outs if isinstance(t, torch.Tensor)]
                for t in ts:
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        what = f"{n.op} {n.target if n.op != 'call_function' else getattr(n.target, '__name__', n.target)}"
                        self.found = (n.name, what)
                        raise _Stop
            return out

    class _Stop(Exception):
        pass

    finder = _Finder(gm)
    with torch.no_grad():
        try:
            finder.run(*graph_inputs(gm, batch))
        except _Stop:
            pass
    return finder.found


def stratified_indices(labels: torch.Tensor, n: int, seed: int = 0) -> list[int]:
    """``n`` indices drawn class by class (OQFV's "distribution" sampling): in class order, each
    class gives ``remaining // classes_left`` random members (all it has, if fewer), and any
    shortfall is drawn at random from the items not yet taken. Sorted; same seed, same indices."""
    labels = torch.as_tensor(labels).flatten()
    if n > labels.numel():
        raise CalibrationError(f"a class-stratified sample of {n} needs at least {n} labelled images; got {labels.numel()}")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels).tolist()
    chosen: list[int] = []
    remaining, left = n, len(classes)
    for c in classes:
        members = (labels == c).nonzero().flatten()
        take = min(remaining // left, members.numel())
        chosen += members[torch.randperm(members.numel(), generator=g)[:take]].tolist()
        remaining -= take
        left -= 1
    if remaining > 0:
        rest = torch.tensor(sorted(set(range(labels.numel())) - set(chosen)), dtype=torch.long)
        chosen += rest[torch.randperm(rest.numel(), generator=g)[:remaining]].tolist()
    return sorted(chosen)
