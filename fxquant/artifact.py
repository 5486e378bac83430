"""Saving and loading quantized models: ``model.safetensors`` + ``fxquant.json``, never pickle.

A GraphModule's code cannot be stored without pickle, so an artifact stores *how to rebuild it*:
the model spec (or the caller supplies the float model), the pass list with each pass's config,
and each pass's data-dependent decisions (``PassResult.record``). ``load`` re-captures the float
model, replays the passes without data (``PassContext.replay``), then fills every tensor (weights
changed by reparameterization, quantizer scales, compensation weights...) from the safetensors
file, checking names and shapes.

Artifacts cannot lie:

* **Atomic saves.** ``save`` writes both files into a temporary folder beside the target
  (``.DIR.tmp-<pid>``), fsyncs them, then swaps it into place (the old folder is renamed aside,
  the new one renamed in, the old one deleted; on failure the old one is renamed back). An
  interrupted save leaves the old artifact or the new one, never a mix; killed between the two
  renames, it leaves the old one as ``.DIR.old-<pid>``, and ``load`` says so. A folder that holds
  anything but an artifact is not replaced without ``force=True``.
* **Verified loads.** ``fxquant.json`` records SHA-256 digests of the sections that define the
  model (``DIGESTED``), of each of their entries, of every tensor, and one artifact digest over
  all of them, also written into the safetensors header. ``load`` recomputes them and refuses a
  changed artifact, naming the tensor or the section entry that differs (``verify=False`` loads
  an artifact edited on purpose). The other keys (``report``, ``versions``, ``eval``, ...) are
  information and are not verified.
* **Versions.** ``format_version`` 2 records the digests; version-1 artifacts (before digests) load
  with a warning that they cannot be verified; other versions are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

import safetensors
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import fx, nn

from .core.digest import tensors_digest
from .core.errors import ArtifactError, ArtifactWarning
from .core.graph import trace
from .core.meta import ARTIFACT, CAPTURE, EXAMPLE_INPUTS, PIPELINE, RECIPE, REPORT
from .core.models import load_model
from .core.pipeline import PassContext, PassManager, pass_from_config
from .core.quant import FakeQuantize

FORMAT = "fxquant-artifact"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)  # 1: before digests (loads unverified, with a warning)
WEIGHTS = "model.safetensors"
META = "fxquant.json"
ARTIFACT_FILES = (META, WEIGHTS)
# the sections of fxquant.json that define the model (digested); the other keys are information
DIGESTED = ("format_version", "model", "recipe", "pipeline", "records", "quantizers", "example_inputs", "capture")
DIGESTS = "digests"
_RESERVED = ("format",) + DIGESTED + (DIGESTS,)
_SafetensorError = getattr(safetensors, "SafetensorError", OSError)
_UNVERIFIED = "load it unverified with fxquant.artifact.load(path, verify=False) (fxquant eval --no-verify)"


def _json_safe(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        if isinstance(v, dict):
            return {str(k): _json_safe(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [_json_safe(x) for x in v]
        return repr(v)


# ------------------------------------------------------------------------------------------
# Digests
# ------------------------------------------------------------------------------------------


def _sha256(value: Any) -> str:
    """SHA-256 of the canonical JSON of ``value`` (sorted keys, no whitespace)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _entries(value: Any) -> dict[str, Any]:
    """The entries of a section, by key (dicts) or index (lists); none for a scalar."""
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    return {}


def _tensor_digest(t: torch.Tensor) -> str:
    """SHA-256 of one tensor's dtype, shape and bytes (a header edit that reinterprets the bytes counts)."""
    h = hashlib.sha256(f"{t.dtype} {list(t.shape)} ".encode())
    h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def _artifact_digest(sections: dict[str, str], state: str, tensors: dict[str, str]) -> str:
    return _sha256({"sections": sections, "state": state, "tensors": tensors})


def _digests(meta: dict, state: dict[str, torch.Tensor]) -> dict:
    """Every digest ``load`` checks: per section of ``DIGESTED``, per entry of each section (to
    name what changed), per tensor, ``state`` (``core.digest.tensors_digest``: the state digest
    of the model), and ``artifact``: one digest over the sections', the state's and the tensors'."""
    sections = {k: _sha256(meta.get(k)) for k in DIGESTED}
    tensors = {k: _tensor_digest(t) for k, t in sorted(state.items())}
    state_d = tensors_digest(state)
    return {
        "algorithm": "sha256",
        "artifact": _artifact_digest(sections, state_d, tensors),
        "state": state_d,
        "sections": sections,
        "entries": {k: {i: _sha256(v) for i, v in _entries(meta.get(k)).items()} for k in DIGESTED},
        "tensors": tensors,
    }


def _entry_label(section: str, key: str, meta: dict) -> str:
    """``pipeline[0] (annotate_uniform)``, ``recipe.a_bits``, ``quantizers['blocks_0_fc1_in0']``."""
    value = meta.get(section)
    if isinstance(value, list):
        named = meta.get("pipeline") if section == "records" else value  # records[i] belongs to pipeline[i]
        item = named[int(key)] if isinstance(named, list) and key.isdigit() and int(key) < len(named) else None
        name = item.get("pass") if isinstance(item, dict) else None
        return f"{section}[{key}]" + (f" ({name})" if name else "")
    return f"{section}.{key}" if key.isidentifier() else f"{section}[{key!r}]"


def _short(names: list[str], n: int = 5, quote: bool = True) -> str:
    return ", ".join(f"'{x}'" if quote else x for x in names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _verify(path: Path, meta: dict, state: dict[str, torch.Tensor], weights_digest: str | None) -> None:
    """Check ``meta`` and ``state`` (read from the artifact at ``path``) against the digests
    recorded at save time; ``weights_digest``: the artifact digest in the safetensors header.

    Raises:
        ArtifactError: naming every changed tensor and section entry.
    """
    rec = meta.get(DIGESTS)
    if rec is None:
        if meta.get("format_version") == 1:
            warnings.warn(f"'{path}' is a format-version-1 artifact: it records no digests, so it cannot be verified; "
                          f"save it again (fxquant.artifact.save) to record them", ArtifactWarning, stacklevel=3)
            return
        raise ArtifactError(f"'{path}/{META}' records no digests ('{DIGESTS}' is missing), so the artifact cannot be "
                            f"verified; save it again, or {_UNVERIFIED}")
    try:
        sections, entries, tensors = dict(rec["sections"]), dict(rec["entries"]), dict(rec["tensors"])
        recorded_artifact, recorded_state = str(rec["artifact"]), str(rec["state"])
    except (KeyError, TypeError, ValueError):
        raise ArtifactError(f"'{path}/{META}': its '{DIGESTS}' record is incomplete (it needs artifact, state, "
                            f"sections, entries, tensors); save the artifact again, or {_UNVERIFIED}") from None
    problems = []
    for sec in DIGESTED:
        if _sha256(meta.get(sec)) == sections.get(sec):
            continue
        now = {i: _sha256(v) for i, v in _entries(meta.get(sec)).items()}
        was = entries.get(sec) or {}
        changed = [_entry_label(sec, i, meta) for i in now if i in was and now[i] != was[i]]
        added = [_entry_label(sec, i, meta) for i in now if i not in was]
        removed = [f"{sec}[{i}]" if i.isdigit() else f"{sec}.{i}" for i in was if i not in now]
        detail = "; ".join(part for part in (
            f"changed {_short(changed, quote=False)}" if changed else "", f"added {_short(added, quote=False)}" if added else "",
            f"removed {_short(removed, quote=False)}" if removed else "") if part)
        shown = json.dumps(meta.get(sec)) if not _entries(meta.get(sec)) else ""
        problems.append(f"{META}: section '{sec}' differs from the saved one"
                        + (f" ({detail})" if detail else f" (now {shown[:80]})" if shown else ""))
    changed = sorted(k for k in state if k in tensors and _tensor_digest(state[k]) != tensors[k])
    missing = sorted(set(tensors) - set(state))
    extra = sorted(set(state) - set(tensors))
    if changed:
        problems.append(f"{WEIGHTS}: tensor{'s' if len(changed) > 1 else ''} {_short(changed)} differ"
                        f"{'' if len(changed) > 1 else 's'} from the saved one{'s' if len(changed) > 1 else ''}")
    if missing:
        problems.append(f"{WEIGHTS}: tensor{'s' if len(missing) > 1 else ''} {_short(missing)} missing")
    if extra:
        problems.append(f"{WEIGHTS}: tensor{'s' if len(extra) > 1 else ''} {_short(extra)} not in the saved artifact")
    if not problems:
        # every part matches its own digest: the digest table itself, or the pairing of the files, was changed
        if _artifact_digest(sections, recorded_state, tensors) != recorded_artifact:
            problems.append(f"{META}: the '{DIGESTS}' record was edited (its artifact digest does not cover its parts)")
        elif tensors_digest(state) != recorded_state:
            problems.append(f"{WEIGHTS}: the tensors' digest differs from the saved one")
        elif weights_digest != recorded_artifact:
            problems.append(f"{WEIGHTS} and {META} come from different saves (artifact digest "
                            f"{(weights_digest or 'none')[:12]}... vs {recorded_artifact[:12]}...)")
    if problems:
        raise ArtifactError("\n".join([f"artifact '{path}' was changed after it was saved:"]
                                      + [f"  {p}" for p in problems]
                                      + [f"Save it again from the model, or, if the edit is deliberate, {_UNVERIFIED}."]))


# ------------------------------------------------------------------------------------------
# Atomic save
# ------------------------------------------------------------------------------------------


def check_target(out_dir: str | Path, *, force: bool = False) -> Path:
    """Check that ``save`` may write ``out_dir`` (the CLI calls this before calibrating): it is new,
    an empty folder, or an fxquant artifact (it holds only ``fxquant.json`` and
    ``model.safetensors``); any other folder only with ``force=True``, since saving replaces the
    whole folder. Returns the folder to write (a symlink resolved).

    Raises:
        ArtifactError: ``out_dir`` is a file, a folder holding other things, or in a folder that
            cannot be written.
    """
    out = Path(os.path.abspath(out_dir))
    if out.is_symlink():
        out = out.resolve()
    cwd = Path.cwd().resolve()
    if out.exists() and out.resolve() in (cwd, *cwd.parents):
        raise ArtifactError(f"'{out_dir}' is the working folder or one above it; saving replaces the whole folder, "
                            f"so save the artifact into a subfolder (e.g. {Path(out_dir) / 'artifact'})")
    if out.exists() and not out.is_dir():
        raise ArtifactError(f"'{out_dir}' is a file; an artifact is a folder ({META} + {WEIGHTS}): "
                            f"choose a folder path for the output")
    if out.is_dir() and not force:
        names = sorted(p.name for p in out.iterdir())
        other = [n for n in names if n not in ARTIFACT_FILES]
        if names and (other or META not in names):
            raise ArtifactError(f"'{out_dir}' is not empty and is not an fxquant artifact (it holds {_short(other or names)}); "
                                f"saving replaces the whole folder, so choose a new or empty folder, or pass "
                                f"force=True (--force) to replace it and everything in it")
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ArtifactError(f"cannot write '{out_dir}': '{probe}' is not a writable folder; choose another output path")
    return out


def _write_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    save_file(state, str(path), metadata=metadata)
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)


def _swap_into_place(new: Path, out: Path) -> None:
    """Move the complete folder ``new`` to ``out``: rename the old ``out`` aside, rename ``new``
    in, delete the old one; if the second rename fails, the old one is renamed back."""
    if not out.exists():
        _rename(new, out)
    else:
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if old.exists():
            shutil.rmtree(old)
        _rename(out, old)
        try:
            _rename(new, out)
        except BaseException:
            _rename(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


def save(gm: fx.GraphModule, out_dir: str | Path, *, model_spec: str | None = None,
         example_inputs: tuple | None = None, extra: dict | None = None, force: bool = False) -> Path:
    """Write ``gm`` (produced by ``fxquant.compile``) to the folder ``out_dir``, atomically (module
    docstring): a reader sees the old artifact or the new one, never a mix.

    Args:
        model_spec: how to rebuild the float model (``cifar-vit``, ``timm:deit_small_patch16_224``,
            a folder); without it, ``load`` needs the float model passed in.
        example_inputs: recorded by shape, for capturing models that need them (Hugging Face).
        extra: more JSON metadata (e.g. evaluation results); not verified by ``load``.
        force: replace ``out_dir`` even if it holds files that are not an artifact (they are deleted).

    Raises:
        ArtifactError: ``gm`` was not made by ``fxquant.compile``, or ``out_dir`` may not be
            written (``check_target``).
    """
    if PIPELINE not in gm.meta:
        raise ArtifactError("only models returned by fxquant.compile can be saved (no pipeline recorded)")
    clash = sorted(set(extra or ()) & set(_RESERVED))
    if clash:
        raise ArtifactError(f"extra= may not set {clash}: those keys define the artifact; put the data under other keys")
    out = check_target(out_dir, force=force)
    state = {k: v.detach().clone().contiguous() for k, v in gm.state_dict().items()}
    report = gm.meta.get(REPORT)
    quantizers = {n: {"spec": m.spec.to_dict(), "weight": m.weight} for n, m in gm.named_modules() if isinstance(m, FakeQuantize)}
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model_spec,
        "example_inputs": ([(list(t.shape), str(t.dtype).replace("torch.", "")) for t in example_inputs]
                           if example_inputs else gm.meta.get(EXAMPLE_INPUTS, [])),
        "recipe": gm.meta.get(RECIPE),
        "pipeline": gm.meta[PIPELINE],
        "records": [r.record for r in report.passes] if report else [],
        "report": report.to_dict() if report else [],
        "capture": _json_safe(gm.meta.get(CAPTURE, {})),
        "quantizers": quantizers,
        "versions": {"fxquant": version("fxquant"), "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
        **(extra or {}),
    }
    meta = json.loads(json.dumps(_json_safe(meta)))  # digest exactly what load will read back
    meta[DIGESTS] = _digests(meta, state)
    text = json.dumps(meta, indent=2)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_weights(tmp / WEIGHTS, state, {"format": FORMAT, "artifact_digest": meta[DIGESTS]["artifact"]})
        _write_text(tmp / META, text)
        _fsync_dir(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Path(out_dir)


# ------------------------------------------------------------------------------------------
# Load
# ------------------------------------------------------------------------------------------


def read_meta(path: str | Path) -> dict:
    """The parsed ``fxquant.json`` of the artifact folder ``path``, its format and version checked
    (not its digests: ``load`` verifies those).

    Raises:
        ArtifactError: no such artifact, invalid JSON, another format or an unsupported version.
    """
    path = Path(path)
    p = path / META
    if not path.exists():
        aside = sorted(path.parent.glob(f".{path.name}.old-*")) if path.name else []
        if aside:
            raise ArtifactError(f"'{path}' does not exist, but '{aside[0]}' beside it holds the artifact that an "
                                f"interrupted save moved aside: rename it back to '{path}'")
        raise ArtifactError(f"'{path}' does not exist; create an artifact with `fxquant quantize ... --out DIR` "
                            f"or fxquant.artifact.save")
    if not p.exists():
        raise ArtifactError(f"'{path}' is not an fxquant artifact (no {META}); create one with `fxquant quantize ... --out DIR`")
    try:
        meta = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"'{p}' is not valid JSON ({e}): the file is truncated or damaged; save the artifact "
                            f"again (fxquant quantize ... --out DIR)") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        what = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ArtifactError(f"'{p}' is not an fxquant artifact description (format {what!r}, expected {FORMAT!r})")
    v = meta.get("format_version")
    lo, hi = SUPPORTED_VERSIONS[0], SUPPORTED_VERSIONS[-1]
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ArtifactError(f"'{p}': format_version {v!r} is not a valid artifact version (this fxquant reads "
                            f"versions {lo}..{hi}); save the artifact again")
    if v > hi:
        versions = meta.get("versions") if isinstance(meta.get("versions"), dict) else {}
        raise ArtifactError(f"'{p}': format_version {v} is newer than this fxquant reads ({lo}..{hi}); upgrade fxquant "
                            f"(it was written by fxquant {versions.get('fxquant', '?')})")
    return meta


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of ``path/model.safetensors`` and the artifact digest in its header."""
    p = path / WEIGHTS
    if not p.exists():
        raise ArtifactError(f"'{p}' is missing: the artifact is incomplete; save it again (fxquant quantize ... --out DIR)")
    try:
        with safe_open(str(p), framework="pt") as f:
            header = f.metadata() or {}
        state = load_file(str(p))
    except (_SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"'{p}' cannot be read ({type(e).__name__}: {e}): the file is truncated or damaged; "
                            f"save the artifact again (fxquant quantize ... --out DIR)") from None
    return state, header.get("artifact_digest")


def load(path: str | Path, model: nn.Module | None = None, *, example_inputs: tuple | None = None,
         verify: bool = True) -> fx.GraphModule:
    """Rebuild the quantized GraphModule saved in ``path``.

    Args:
        model: the float model the artifact was made from; by default rebuilt from the saved spec.
        verify: check the recorded digests (module docstring) before anything is rebuilt; False
            loads an artifact edited on purpose (names and shapes are still checked).

    Raises:
        ArtifactError: a missing, truncated or changed file (naming the tensor or section), an
            unsupported version, or saved tensors that do not match the rebuilt graph (names or shapes).
    """
    path = Path(path)
    meta = read_meta(path)
    state, weights_digest = _read_weights(path)
    if verify:
        _verify(path, meta, state, weights_digest)
    if model is None:
        if not meta.get("model"):
            raise ArtifactError(f"'{path}' does not record its float model; pass it: fxquant.artifact.load(path, model=...)")
        model = load_model(meta["model"]).model
    if example_inputs is None and meta.get("example_inputs"):
        # values do not matter (shape propagation only); ones keep masks and token ids valid
        example_inputs = tuple(torch.ones(shape, dtype=getattr(torch, dtype)) for shape, dtype in meta["example_inputs"])
    passes = [pass_from_config(p["pass"], p["config"]) for p in meta["pipeline"]]
    gm = trace(model, example_inputs, check=False)
    ctx = PassContext(example_inputs=tuple(example_inputs or ()), replay=True, records=meta.get("records", []), progress=False)
    gm, report = PassManager(passes).run(gm, ctx)
    expected = gm.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shape_bad = [k for k in sorted(set(expected) & set(state))
                 if not isinstance(gm.get_submodule(k.rpartition(".")[0]) if "." in k else gm, FakeQuantize)
                 and tuple(expected[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape_bad:
        made_for = meta.get("model") or "another model"
        lines = [f"artifact '{path}' does not match the model it is loaded into (it was made for {made_for}):"]
        if missing:
            lines.append(f"  missing in artifact: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            lines.append(f"  not in model: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        for k in shape_bad[:5]:
            lines.append(f"  '{k}': artifact {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}")
        lines.append("Load it with the float model it was made from (fxquant.artifact.load(path, model=...)).")
        raise ArtifactError("\n".join(lines))
    gm.load_state_dict(state, strict=True)
    gm.meta[PIPELINE] = meta["pipeline"]
    gm.meta[RECIPE] = meta.get("recipe")
    gm.meta[REPORT] = report
    gm.meta[ARTIFACT] = {k: meta.get(k) for k in ("model", "recipe", "eval", "calib_images", "calib_seconds", "seed")}
    gm.eval()
    return gm
