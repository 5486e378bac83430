"""How a calibration or evaluation batch becomes model arguments: the one convention.

A batch is one of

* a tensor: the model's single input;
* a tuple or list whose first item is a tensor: ``(inputs, labels, ...)``, only the first is used;
* a dict: keyword arguments by name (Hugging Face style: ``{"input_ids": ..., "attention_mask": ...}``).

``call_model`` calls any module with a batch. A captured graph's placeholders are positional, so
``graph_inputs`` maps a batch onto them: a dict *by placeholder name* (never by dict order), which
is what the fx ``Interpreter``, extracted subgraphs and the NaN locator need. Calibration, QwT,
evaluation and the NaN locator all go through these functions.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import fx, nn

from .errors import CalibrationError

BATCH_FORMS = "a tensor, an (inputs, labels) tuple or a dict of model keyword arguments"


def batch_args(batch: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of one batch (see module docstring)."""
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, dict):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, dict)):
        return batch_args(batch[0])
    raise CalibrationError(f"a calibration/eval batch must be {BATCH_FORMS}; got {type(batch).__name__}")


def call_model(model: nn.Module, batch: Any) -> Any:
    """``model(*args, **kwargs)`` of one batch."""
    args, kwargs = batch_args(batch)
    return model(*args, **kwargs)


def placeholder_names(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]


def graph_inputs(gm: fx.GraphModule, batch: Any) -> list[Any]:
    """The values of ``gm``'s placeholders, in graph order, for one batch. Dict batches bind by
    placeholder name; a placeholder the dict lacks, or a key no placeholder takes, is an error."""
    names = placeholder_names(gm)
    args, kwargs = batch_args(batch)
    if not kwargs:
        if len(args) > len(names):
            raise CalibrationError(f"the batch has {len(args)} inputs but the graph takes {len(names)}: {names}")
        return list(args)
    missing = [n for n in names if n not in kwargs]
    extra = sorted(set(kwargs) - set(names))
    if missing or extra:
        raise CalibrationError(
            f"a dict batch binds by name to the captured graph's inputs {names}: "
            + (f"missing {missing}" if missing else "") + ("; " if missing and extra else "")
            + (f"no input named {extra}" if extra else "")
            + ". Capture with example inputs for every key the batches carry, or drop the extra keys."
        )
    return [kwargs[n] for n in names]


def batch_size(batch: Any) -> int | None:
    """Number of samples in a batch (None when it cannot be told)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, dict)):
        return batch_size(batch[0])
    if isinstance(batch, dict):
        for v in batch.values():
            if isinstance(v, torch.Tensor) and v.dim():
                return v.shape[0]
    return None


def slice_batch(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (every tensor with the batch's leading size is cut)."""
    size = batch_size(batch)
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(b, n) if isinstance(b, dict)
                           else b[:n] if isinstance(b, torch.Tensor) and b.dim() and b.shape[0] == size else b
                           for b in batch)
    if isinstance(batch, dict):
        return {k: v[:n] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == size else v for k, v in batch.items()}
    return batch


def limit_images(batches: Iterable, max_images: int | None) -> Iterator:
    """``batches`` cut so that at most ``max_images`` samples are yielded (None: all); the batch
    that crosses the limit is sliced (``slice_batch``), batches of unknown size count as one."""
    if max_images is None:
        yield from batches
        return
    left = max_images
    for batch in batches:
        if left <= 0:
            return
        n = batch_size(batch)
        if n is not None and n > left:
            batch = slice_batch(batch, left)
            n = left
        yield batch
        left -= n if n is not None else 1
