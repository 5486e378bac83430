"""What the scripts in ``tools/`` share: device choice, timers, machine facts, interleaved rounds,
recipe arguments, tables and ``--json`` files. Not a package: the scripts run as ``python tools/X.py``,
so this folder is on ``sys.path`` and they ``import _bench``.

* device: ``cuda_or_interpreter`` (choose before Triton compiles anything), ``fast_autotune``;
* timers: ``call_ms`` (one call), ``median_ms`` (warm-up, then the median of ``reps`` calls under
  ``torch.inference_mode``), ``kernel_ms`` (``triton.testing.do_bench`` on CUDA), ``cuda_sync``;
* machine: ``cpu_facts`` / ``cpu_flags`` / ``cpu_line`` / ``machine`` (``lscpu`` model name, the
  flags that matter, threads, load average);
* ``interleaved_rounds``: every variant once per round, round after round, the best round kept;
* ``parse_overrides`` (``--set key=value``), ``parse_recipe_arg`` / ``recipe_from_arg``
  (``name:key=value;key=value``): the CLI's own parser (``fxquant.cli.parse_overrides``);
* ``fmt``, ``Table``, ``text_table``; ``write_json`` (adds the ``machine`` facts to a dict).

torch and fxquant are imported inside the functions that need them, so that ``--help`` stays quick
and ``cuda_or_interpreter`` can set ``TRITON_INTERPRET`` before anything imports the kernels.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------ device


def cuda_or_interpreter(device: str, tool: str, smoke: str = "`--device cpu`") -> bool:
    """For ``--device cpu``, run Triton kernels in its interpreter (this must happen before the first
    ``triton.jit`` runs, i.e. before the kernels are imported); for ``--device cuda`` without a GPU,
    say so (``smoke``: the arguments that smoke-test the tool on the CPU). Returns whether the tool
    should go on."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
        return True
    import torch

    if not torch.cuda.is_available():
        print(f"{tool}: no CUDA GPU found; nothing to time (kernel correctness is tested on CPU with TRITON_INTERPRET=1; "
              f"{smoke} smoke-tests this script).")
        return False
    return True


def fast_autotune(tuned, rep_ms: float) -> None:
    """Shorten a ``triton.autotune`` kernel's per-config benchmark (it runs once per shape key).
    Triton keeps it as a ``_do_bench`` hook behind a ``do_bench`` property (3.4+), a cached_property,
    or (3.0-3.2) a plain ``do_bench`` attribute; each is set here. ``rep_ms <= 0``: left alone."""
    if rep_ms <= 0 or tuned is None:
        return
    import triton.testing

    def bench(kernel_call, quantiles=None, **_):
        return triton.testing.do_bench(kernel_call, warmup=max(1.0, rep_ms / 4), rep=rep_ms, quantiles=quantiles)

    try:
        if "_do_bench" in vars(tuned):  # Triton >= 3.3: read by the do_bench (cached_)property
            tuned._do_bench = bench
        if not isinstance(getattr(type(tuned), "do_bench", None), property):  # an attribute, or a cached_property
            tuned.do_bench = bench
    except Exception as e:  # keep Triton's own benchmark
        print(f"(autotuner benchmark left at Triton's default: {type(e).__name__}: {e})")


# ------------------------------------------------------------------------------------ timers


def cuda_sync(device: str) -> None:
    """Wait for the GPU (``device == "cuda"``); nothing on the CPU."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def call_ms(fn: Callable, *args, device: str = "cpu") -> float:
    """One call ``fn(*args)``, ms: CUDA events around it on ``"cuda"`` (waits for its end), wall clock
    otherwise. No grad mode of its own (the caller's applies)."""
    if device == "cuda":
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], Any], *, warmup: int = 3, reps: int = 10, device: str = "cpu",
              inference: bool = True) -> float:
    """``warmup`` untimed calls of ``fn()``, then the median of ``reps`` timed ones (``call_ms``: CUDA
    events and a sync on ``"cuda"``), ms; all under ``torch.inference_mode`` unless ``inference=False``."""
    ctx = contextlib.nullcontext()
    if inference:
        import torch

        ctx = torch.inference_mode()
    with ctx:
        for _ in range(warmup):
            fn()
        cuda_sync(device)
        return statistics.median(call_ms(fn, device=device) for _ in range(max(1, reps)))


def kernel_ms(fn: Callable[[], Any], device: str, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """A kernel's time, ms: on ``"cuda"`` ``triton.testing.do_bench`` (CUDA events, L2 flushed between
    calls, median over ``rep_ms`` after ``warmup_ms``); elsewhere (Triton interpreter smoke tests)
    ``median_ms`` of 3 calls after one."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return median_ms(fn, warmup=1, reps=3)


# ------------------------------------------------------------------------------------ machine

# the CPU flags that move CPU inference speed: AVX2 / AVX-512, VNNI (int8 dot products), BF16, AMX
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


@functools.lru_cache(maxsize=None)
def _field(text: str, key: str) -> str:
    """The value of the first ``key: value`` line of ``text`` ("" if none)."""
    return next((v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines()) if k.strip() == key), "")


def _cpu_static() -> tuple[str, tuple[str, ...]]:
    """``(model name, all flags)``: the model from ``lscpu``, else ``/proc/cpuinfo``, else ``platform``;
    the flags from the library's own reader (``fxquant.export.cpu.cpu_flags``, which also decides
    whether int8 GEMMs are exact here)."""
    from fxquant.export.cpu import cpu_flags as library_cpu_flags

    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10, env={**os.environ, "LC_ALL": "C"}).stdout
        model = _field(out, "Model name")
    except (OSError, subprocess.SubprocessError):
        pass
    if not model:
        try:
            model = _field(Path("/proc/cpuinfo").read_text(), "model name")
        except OSError:
            pass
    return model or platform.processor() or "unknown", tuple(sorted(library_cpu_flags()))


def cpu_flags() -> str:
    """The ``CPU_FLAGS`` this CPU has, space-separated (``"no AVX2"`` if none)."""
    _, flags = _cpu_static()
    if not flags:
        return "unknown"
    return " ".join(f for f in CPU_FLAGS if f in flags) or "no AVX2"


def cpu_facts() -> dict:
    """The CPU as JSON: model name, the flags of ``CPU_FLAGS`` it has, logical CPUs (all, and usable by
    this process), torch's intra-op threads (if torch is loaded) and the 1/5/15-minute load averages."""
    model, all_flags = _cpu_static()
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    torch = sys.modules.get("torch")
    return {"model": model, "flags": [f for f in CPU_FLAGS if f in all_flags], "cpus": os.cpu_count(), "cpus_usable": usable,
            "torch_threads": torch.get_num_threads() if torch is not None else None,
            "load_avg": [round(v, 2) for v in os.getloadavg()]}


def cpu_line(facts: dict | None = None) -> str:
    """``cpu_facts`` in one printable line."""
    f = facts or cpu_facts()
    threads = "" if f["torch_threads"] is None else f", {f['torch_threads']} torch threads"
    return (f"CPU: {f['model']} ({' '.join(f['flags']) or 'no AVX2'}); {f['cpus_usable']} of {f['cpus']} CPUs{threads}; "
            f"load {f['load_avg'][0]:.2f}")


def machine() -> dict:
    """Where a result was measured: ``cpu_facts``, OS, Python, and (if already imported) torch's version
    and the CUDA GPU; for a ``--json`` file's ``machine`` entry."""
    out = {"cpu": cpu_facts(), "platform": platform.platform(), "python": platform.python_version()}
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = torch.__version__
        try:
            out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        except Exception as e:
            out["gpu"] = f"{type(e).__name__}: {e}"
    return out


# ------------------------------------------------------------------------------------ rounds


@dataclass
class Rounds:
    """What ``interleaved_rounds`` measured: ``results[key]`` one value per round it ran in (in order),
    ``loads`` the 1-minute load average after each round, ``failed[key]`` the error that dropped it."""

    results: dict = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)
    failed: dict = field(default_factory=dict)

    def best(self, better: Callable[[Iterable[float]], float] = min) -> dict:
        """Each variant's best round (``min``: the lowest time; ``max`` for a throughput)."""
        return {k: better(v) for k, v in self.results.items() if v}


def interleaved_rounds(measures: Mapping[Hashable, Callable[[], Any]], rounds: int,
                       on_error: Callable[[Hashable, Exception], None] | None = None) -> Rounds:
    """Run every ``measures`` entry once per round, in the mapping's order, for ``rounds`` rounds (so
    that load from elsewhere on the machine hits every variant alike), and record each call's result
    (e.g. a median in ms; ``Rounds.best()`` keeps the best round per variant). Without ``on_error`` an
    exception propagates; with it, ``on_error(key, exc)`` runs (inside the ``except``: a traceback is
    at hand) and that variant sits out the later rounds."""
    out = Rounds(results={k: [] for k in measures})
    for _ in range(rounds):
        for key, measure in measures.items():
            if key in out.failed:
                continue
            try:
                out.results[key].append(measure())
            except Exception as e:
                if on_error is None:
                    raise
                out.failed[key] = f"{type(e).__name__}: {e}"
                on_error(key, e)
        out.loads.append(os.getloadavg()[0])
    return out


# ------------------------------------------------------------------------------------ recipes


def parse_overrides(pairs: Iterable[str] | None) -> dict:
    """``key=value`` strings (``--set`` options) -> ``{key: value}``, by the CLI's own parser
    (``fxquant.cli.parse_overrides``: stripped strings; ``FxQuantError`` for a pair without ``=``)."""
    from fxquant.cli import parse_overrides as cli_parse_overrides

    return cli_parse_overrides(list(pairs or []))


def parse_recipe_arg(arg: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value[;key=value]`` -> ``(name, {key: value})`` (``parse_overrides``, so
    the overrides mean what the CLI's ``--set`` means)."""
    name, _, rest = arg.partition(":")
    return name, parse_overrides([kv for kv in rest.split(";") if kv.strip()])


def recipe_from_arg(arg: str):
    """``parse_recipe_arg`` -> the recipe object (``fxquant.get_recipe(name, **overrides)``)."""
    from fxquant.recipes import get_recipe

    name, overrides = parse_recipe_arg(arg)
    return get_recipe(name, **overrides)


# ------------------------------------------------------------------------------------ tables


_NUMERIC_TYPES = set("bcdeEfFgGnoxX%")


def fmt(value, spec: str = "") -> str:
    """``format(value, spec)``; a missing number (``None``, NaN, inf, or a non-number for a numeric
    ``spec``) prints as ``-`` right-aligned at the spec's width."""
    numeric = bool(spec) and spec[-1] in _NUMERIC_TYPES
    if value is None or (numeric and not (isinstance(value, (int, float)) and math.isfinite(value))):
        return f"{'-':>{_width(spec)}}"
    return format(value, spec)


def _width(spec: str) -> int:
    digits = "".join(c if c.isdigit() else " " for c in spec.split(".")[0].lstrip("<>^=+- 0"))
    return int(digits.split()[0]) if digits.split() else 0


def _right_aligned(spec: str) -> bool:
    """Whether a column of this spec is right-aligned (numbers, or an explicit ``>``)."""
    return ">" in spec or (bool(spec) and spec[-1] in _NUMERIC_TYPES)


class Table:
    """A fixed-width text table: ``columns`` are ``(header, format spec)`` or ``(header, spec, suffix)``
    (e.g. ``("img/s", "8.1f")``, ``("recipe", "16s")``, ``("same pred", "8.2f", "%")``), cells are
    joined by ``sep`` after ``indent``. Headers align as their column (right for numbers and ``>``)."""

    def __init__(self, columns: Sequence[tuple], sep: str = " ", indent: str = ""):
        self.columns = [(c[0], c[1], c[2] if len(c) > 2 else "") for c in columns]
        self.sep, self.indent = sep, indent

    def header(self) -> str:
        cells = []
        for name, spec, suffix in self.columns:
            w = _width(spec) + len(suffix)
            cells.append(f"{name:>{w}}" if _right_aligned(spec) else f"{name:<{w}}")
        return self.indent + self.sep.join(cells)

    def row(self, *values) -> str:
        """One line; fewer values than columns fill the first columns only."""
        return self.indent + self.sep.join(fmt(v, spec) + suffix for v, (_, spec, suffix) in zip(values, self.columns))


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns as wide as their longest cell, two spaces apart, a dashed line under the header."""
    body = [tuple(map(str, r)) for r in rows]
    head = tuple(map(str, header))
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ JSON


def write_json(path: str | Path | None, payload, *, indent: int = 2, newline: bool = False, default=None,
               with_machine: bool = True) -> None:
    """``--json PATH``: write ``payload``; a dict gains a ``machine`` entry (``machine()``) unless it has
    one (a list of rows is written as it is). ``newline``: end the file with one. No path: nothing."""
    if not path:
        return
    if with_machine and isinstance(payload, dict) and "machine" not in payload:
        payload = {**payload, "machine": machine()}
    Path(path).write_text(json.dumps(payload, indent=indent, default=default) + ("\n" if newline else ""))
