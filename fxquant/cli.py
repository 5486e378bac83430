"""The ``fxquant`` command line: ``recipes``, ``quantize``, ``eval``, ``export``, ``report``, ``sensitivity``, ``platform``,
``finetune``, ``demo``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import textwrap
import time
from pathlib import Path

import torch

from . import artifact
from .api import compile as fx_compile
from .api import report
from .core import distributed
from .core.data import load_data
from .core.digest import state_digest
from .core.error_report import error_report, report_table, write_report
from .core.errors import ConfigError, FxQuantError
from .core.evaluate import activation_bits, fp32_top1, top1
from .core.graph import logits_of
from .core.layer_sensitivity import layer_sensitivity, sensitivity_table
from .core.models import PLATFORM_NAMES, load_model
from .core.pipeline import PASS_REGISTRY
from .export import INT8_SATURATION_NOTE, int8_dot_exact, run_onnx, run_openvino, to_onnx, to_openvino
from .finetune import FinetuneConfig, finetune
from .recipes import get_recipe, list_recipes


def parse_overrides(pairs: list[str] | None) -> dict:
    """``--set key=value`` pairs -> ``{key: value}`` (strings, stripped; the recipe converts them).
    A key given twice is an error (the last one would silently win)."""
    out = {}
    for p in pairs or []:
        if "=" not in p:
            raise FxQuantError(f"--set expects key=value, got {p!r}")
        k, v = (x.strip() for x in p.split("=", 1))
        if not k:
            raise ConfigError(f"--set {p!r} names no option; expected key=value")
        if k in out:
            raise ConfigError(f"--set {k} is given twice ({k}={out[k]} and {k}={v}); give each option once")
        out[k] = v
    return out


# ------------------------------------------------------------------------------------------
# Argument checks, at parse time: bad values fail before any model is loaded or calibrated
# ------------------------------------------------------------------------------------------


def _int_at_least(minimum: int, what: str):
    """An argparse type: a whole number >= ``minimum`` (``what`` names the rule in the message)."""
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {n}")
        return n

    return parse


_positive_int = _int_at_least(1, "at least 1")  # --limit, --images, --batch-size, --top
_count = _int_at_least(0, "0 or more")  # --calib-images (0: no calibration images)


def _json_path(value: str) -> str:
    """``--json PATH``: a file path whose folder exists and is writable (checked before any work)."""
    p = Path(value)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"'{value}' is a folder; give a file path such as {p / 'result.json'}")
    parent = p.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"the folder '{parent}' of '{value}' does not exist; create it first "
                                         f"(mkdir -p {parent}) or write the JSON elsewhere")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise argparse.ArgumentTypeError(f"'{value}' cannot be written (the folder '{parent}' or the file is not writable); "
                                         f"choose another path")
    return value


def _table(rows: list[tuple], header: tuple) -> str:
    rows = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    w = [max(len(r[i]) for r in rows) for i in range(len(header))]
    def cell(i, c):
        numeric = c.replace(".", "", 1).replace("+", "", 1).replace("-", "", 1).isdigit()
        return c.rjust(w[i]) if numeric else c.ljust(w[i])

    lines = ["  ".join(cell(i, c) for i, c in enumerate(r)).rstrip() for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _quantize(info, recipe, data, seed: int, progress: bool, lower: bool = False):
    t0 = time.perf_counter()
    calib = list(torch.split(data.calib, 32)) if len(data.calib) else None
    qmodel = fx_compile(info.model, recipe=recipe, calib=calib, example_inputs=info.example_inputs(), seed=seed,
                        progress=progress, lower=lower)
    return qmodel, time.perf_counter() - t0


def _write_json(path: str | None, result: dict) -> None:
    """``--json PATH``: the result record, indented, and say where it went (rank 0 only)."""
    if path and distributed.is_main():
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def _recipe_label(name: str, overrides: dict) -> str:
    """``bitlog2-w4a4[scheme=half16]``: the recipe name with its --set overrides."""
    return name + (f"[{','.join(f'{k}={v}' for k, v in sorted(overrides.items()))}]" if overrides else "")


def _option_value(v) -> str:
    """A recipe option's value as ``--set`` takes it (``true``, ``none``, ``a,b``)."""
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "none"
    if isinstance(v, (tuple, list)):
        return ",".join(_option_value(x) for x in v) if v else "''"  # --set skip='' gives ()
    return str(v)


def recipe_options(name: str) -> list[str]:
    """``key=default`` of every option of recipe ``name``: its family's fields (``calib_images``
    last), then ``pass.option=value`` for every option of the passes its stages add and for the
    pass options it sets."""
    recipe = get_recipe(name)
    fields = [f.name for f in dataclasses.fields(recipe) if f.name not in ("name", "stages", "options", "calib_images")]
    out = [f"{k}={_option_value(getattr(recipe, k))}" for k in fields + ["calib_images"]]
    staged = {st.pass_.name for st in recipe.stages}
    for p in recipe.build_passes():
        for k, v in p.config().items():
            if p.name in staged or k in recipe.options.get(p.name, {}):
                out.append(f"{p.name}.{k}={json.dumps(v) if isinstance(v, dict) else _option_value(v)}")
    return out


def cmd_recipes(args) -> int:
    print(_table([(k, v) for k, v in list_recipes().items()], ("recipe", "description")))
    print()
    print("recipe options and their defaults (override with --set KEY=VALUE, or with a pass's option as OPTION or "
          "PASS.OPTION):")
    width = max(len(k) for k in list_recipes())
    for name in list_recipes():
        text = textwrap.fill(", ".join(recipe_options(name)), width=118 - width, break_long_words=False,
                             break_on_hyphens=False)
        lines = text.splitlines() or [""]
        print(f"  {name.ljust(width)}  {lines[0]}")
        for line in lines[1:]:
            print(f"  {' ' * width}  {line}")
    print()
    passes = [(k, (v.__doc__ or "").strip().splitlines()[0].replace("``", "")) for k, v in sorted(PASS_REGISTRY.items())]
    print(_table(passes, ("pass", "description")))
    return 0


def _quantize_from_args(args, *, limit: int, lower: bool = False, recipe_name: str | None = None, **data_kw):
    """Model, recipe (``recipe_name`` or ``--recipe``, with ``--set`` overrides), data and calibration
    from the CLI arguments. Returns ``(info, recipe label, calibration images, data, quantized model,
    calibration seconds)``."""
    recipe_name = recipe_name or args.recipe
    overrides = parse_overrides(args.set)  # the cheap checks first
    recipe = get_recipe(recipe_name, **overrides)
    n_cal = args.calib_images if args.calib_images is not None else recipe.calib_images
    if n_cal == 0 and recipe.calib_images > 0:
        raise ConfigError(f"--calib-images 0 gives recipe '{recipe_name}' no calibration data; it calibrates on "
                          f"{recipe.calib_images} images by default (give at least 1)")
    info = load_model(args.model, pretrained=args.pretrained)
    data = load_data(info, args.data, calib_images=n_cal, limit=limit, seed=args.seed, **data_kw)
    qmodel, secs = _quantize(info, recipe, data, args.seed, not args.quiet, lower=lower)
    return info, _recipe_label(recipe_name, overrides), n_cal, data, qmodel, secs


def cmd_quantize(args) -> int:
    artifact.check_target(args.out, force=args.force)  # before calibrating, not after
    torch.manual_seed(args.seed)
    info, label, n_cal, data, qmodel, secs = _quantize_from_args(args, limit=args.limit or 0)  # no evaluation images
    if not distributed.is_main():  # every rank holds the same model; rank 0 writes it
        return 0
    out = artifact.save(qmodel, args.out, model_spec=args.model, example_inputs=info.example_inputs(),
                        extra={"calib_images": n_cal, "calib_seconds": round(secs, 3), "seed": args.seed,
                               "calib_data": data.source, "recipe_label": label,
                               "calib_processes": distributed.world_size(), "state_digest": state_digest(qmodel)},
                        force=args.force)
    print(fx_report_text(qmodel))
    print(f"saved {args.recipe} model of '{args.model}' to {out} (calibration {secs:.1f} s on {n_cal} images, "
          f"{distributed.world_size()} process(es))")
    return 0


def fx_report_text(qmodel) -> str:
    return str(report(qmodel))


def _print_plugin_records(res) -> None:
    """What OpenVINO's CPU plugin runs in int8 in each compile configuration to_openvino checked."""
    kinds = list(dict.fromkeys(k for r in res.records for k in r.int8_summary()))
    print("  OpenVINO CPU plugin, layers in int8 per compile configuration:")
    print(f"    {'configuration':34s}" + "".join(f"{k:>20s}" for k in kinds))
    for r in res.records:
        summary = r.int8_summary()
        cells = "".join(f"{'%d/%d' % summary[k] if k in summary else '-':>20s}" for k in kinds)
        print(f"    {r.config.label + ' (' + r.precision + ')':34s}{cells}")
    odd = res.inconsistent()
    if odd:
        print(f"  WARNING: {len(odd)} of {len(res.records)} configurations run other layers in float than "
              f"'{res.records[0].config.label}': {', '.join(r.config.label for r in odd)}")
    elif res.records:
        print(f"  the same int8 layers in all {len(res.records)} configurations (dynamic and static batch, "
              f"default and f32 precision, latency and throughput hints)")
    attention = res.int8_attention()
    if attention[1] and attention[0] == 0:
        print("  (attention matmuls in float: OpenVINO runs them in int8 with symmetric activation quantizers, "
              "e.g. recipe w8a8-sym)")


def cmd_export(args) -> int:
    torch.manual_seed(args.seed)
    info, label, n_cal, data, qmodel, secs = _quantize_from_args(args, limit=16)
    if not distributed.is_main():
        return 0
    x = torch.cat([b[0] for b in data.test_batches()])[:16]
    with torch.no_grad():
        ref = logits_of(qmodel(x))
    if args.format == "openvino":
        res = to_openvino(qmodel, info.example_inputs(), args.out, act_dtype=args.act_dtype, opset=args.opset)
        diff = (run_openvino(res.xml, (x,)) - ref).abs().max().item()
        print(f"exported {label} '{args.model}' to {res.xml} + {res.bin.name} (OpenVINO IR via ONNX QDQ, opset {args.opset})")
        _print_plugin_records(res)
        print(f"OpenVINO vs fxquant fake-quant on {len(x)} test images: max |Δlogit| = {diff:.4g}")
        _int8_note()
        return 0
    res = to_onnx(qmodel, info.example_inputs(), args.out, act_dtype=args.act_dtype, opset=args.opset, target=args.target)
    diff = (run_onnx(res.path, (x,)) - ref).abs().max().item()
    print(f"exported {label} '{args.model}' to {res.path} (opset {res.opset}, "
          f"{sum(res.nodes.values())} nodes: {res.nodes.get('QuantizeLinear', 0)} QuantizeLinear, "
          f"{res.nodes.get('DequantizeLinear', 0)} DequantizeLinear; initializers {res.initializer_types})")
    print(f"onnxruntime vs fxquant fake-quant on {len(x)} test images: max |Δlogit| = {diff:.4g}")
    _int8_note()
    return 0


def _int8_note() -> None:
    """Say when this CPU's int8 GEMMs saturate (no VNNI/AMX): the Δlogit above then measures the runtime."""
    if not int8_dot_exact():
        print(f"note: {INT8_SATURATION_NOTE}")


def cmd_eval(args) -> int:
    torch.manual_seed(args.seed)
    is_artifact = Path(args.model).is_dir() and (Path(args.model) / artifact.META).exists()
    if is_artifact:
        meta = artifact.read_meta(args.model)
        if args.recipe and meta.get("recipe") and args.recipe != meta["recipe"]["name"]:
            raise FxQuantError(f"{args.model} holds a '{meta['recipe']['name']}' model; drop --recipe to evaluate it")
        if args.lower:
            raise FxQuantError("--lower applies when quantizing; a saved artifact keeps the pipeline it was made with")
        info = load_model(meta["model"]) if meta.get("model") else None
        if info is None:
            raise FxQuantError(f"{args.model} does not record its float model spec; evaluate it from Python")
        recipe_name = meta.get("recipe_label") or (meta["recipe"]["name"] if meta.get("recipe") else "custom")
        n_cal = int(meta.get("calib_images", 0))
        data = load_data(info, args.data, calib_images=0, limit=args.limit, seed=args.seed, batch_size=args.batch_size)
        qmodel = artifact.load(args.model, model=info.model, verify=not args.no_verify)
        calib_secs = float(meta.get("calib_seconds", 0.0))
        model_name = meta["model"]
    else:
        if not args.recipe:
            raise FxQuantError("--recipe is required unless --model is a saved artifact folder (see `fxquant recipes`)")
        if args.no_verify:
            raise FxQuantError("--no-verify applies to a saved artifact folder (--model DIR)")
        info, recipe_name, n_cal, data, qmodel, calib_secs = _quantize_from_args(
            args, limit=args.limit, lower=args.lower, batch_size=args.batch_size)
        model_name = args.model
    progress = not args.quiet
    fp32 = fp32_top1(info.model, data, batch_size=getattr(args, "batch_size", None), seed=args.seed,
                     progress=progress, recompute=args.recompute_fp32)
    t0 = time.perf_counter()
    acc = top1(qmodel, data.test_batches(), total=data.test_count, progress=progress, desc=recipe_name)
    eval_secs = time.perf_counter() - t0
    result = {"model": model_name, "recipe": recipe_name, "top1": round(acc, 4), "fp32_top1": round(fp32, 4),
              "test_images": data.test_count, "calib_images": n_cal, "calib_seconds": round(calib_secs, 3),
              "eval_seconds": round(eval_secs, 3), "seed": args.seed, "processes": distributed.world_size(),
              "state_digest": state_digest(qmodel)}
    if args.lower:
        result["lowered"] = True
    # the honest size of the activations: dynamic quantizers carry a scale (and zero point) per token/group
    bits = activation_bits(qmodel, next(iter(data.test_batches())))
    result["activation_bits"] = bits
    print(_table([(model_name, recipe_name, f"{fp32:.2f}", f"{acc:.2f}", f"{acc - fp32:+.2f}", data.test_count, n_cal,
                   f"{calib_secs:.1f}")], ("model", "recipe", "fp32 top1", "top1", "delta", "images", "calib", "calib s")))
    print(f"data: {data.source}; {distributed.world_size()} process(es); state digest {result['state_digest'][:16]}")
    if bits and bits["with_metadata"] != bits["nominal"]:
        print(f"activation bits per element: {bits['nominal']:.2f} nominal, {bits['with_metadata']:.2f} with the "
              f"per-token/group scales and zero points (fp16 + 8-bit)")
    _write_json(args.json, result)
    return 0




def _held_out(data, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` evaluation images and labels (never the calibration images)."""
    xs, ys, seen = [], [], 0
    for x, y in data.test_batches():
        xs.append(x)
        ys.append(y)
        seen += len(y)
        if seen >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def cmd_report(args) -> int:
    torch.manual_seed(args.seed)
    reports, meta = [], {"model": args.model, "images": args.images, "recipes": {}}
    for name in args.recipe:
        info, label, n_cal, data, qmodel, secs = _quantize_from_args(args, limit=args.images, recipe_name=name)
        x, _ = _held_out(data, args.images)
        reports.append(error_report(qmodel, torch.split(x, 100), label=label, example_inputs=info.example_inputs(),
                                    progress=not args.quiet))
        meta["recipes"][label] = {"calib_images": n_cal, "calib_seconds": round(secs, 2), "data": data.source}
    if not distributed.is_main():
        return 0
    print(report_table(reports))
    meta["processes"] = distributed.world_size()
    paths = write_report(reports, args.out, meta=meta)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_sensitivity(args) -> int:
    torch.manual_seed(args.seed)
    info, label, n_cal, data, qmodel, secs = _quantize_from_args(args, limit=args.images)
    x, y = _held_out(data, args.images)
    rows = layer_sensitivity(qmodel, x, y, granularity=args.granularity, progress=not args.quiet)
    print(f"{label} on '{args.model}': one {args.granularity} quantized at a time, {len(y)} held-out images")
    print(sensitivity_table(rows, args.top))
    _write_json(args.json, {"model": args.model, "recipe": label, "images": len(y), "granularity": args.granularity,
                            "calib_images": n_cal, "layers": [vars(r) for r in rows]})
    return 0


# ------------------------------------------------------------------------------------------
# `fxquant platform`: the transformer-quantization platform's command line (docs/methods.md, IGQ-ViT)
# ------------------------------------------------------------------------------------------



def _str2bool(v: str | bool) -> bool:
    """The platform's ``str2bool``: ``--flag``, ``--flag=True``, ``--flag false``."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def _head_stem(v: str | bool) -> str:
    """``--head_stem_8bit``: True is the platform's behaviour (head and stem stay float: its
    quantizers return the input unchanged at 8 bits), ``int8`` really quantizes them at 8 bits,
    False quantizes them at ``--n_bits``."""
    if isinstance(v, str) and v.lower() in ("int8", "8bit"):
        return "int8"
    if isinstance(v, str) and v.lower() == "float":
        return "float"
    return "float" if _str2bool(v) else "quantized"


def _platform_data(path: str | None) -> str | None:
    """An ImageNet root (``train/``, ``val/``) means its ``val`` folder, as the platform's loader."""
    if path and path != "cifar10" and (Path(path) / "val").is_dir():
        return str(Path(path) / "val")
    return path


def cmd_platform(args) -> int:
    if bool(args.name) == bool(args.model):
        raise FxQuantError("give --name {vit,deit,swin}_{tiny,small,base} or --model <fxquant model spec>, not both")
    torch.manual_seed(args.seed)
    spec = f"timm:{PLATFORM_NAMES[args.name]}" if args.name else args.model
    info = load_model(spec, pretrained=args.pretrained)
    options = {"n_bits": args.n_bits, "n_groups": args.n_groups, "channel_wise": args.channel_wise,
               "head_stem": args.head_stem_8bit, "eps": args.eps, "group_mode": args.group_mode}
    recipe = get_recipe("platform", **options)
    if args.calib_images == 0:
        raise ConfigError("--calib_images 0 gives the platform recipe no calibration data; give at least 1")
    label = _recipe_label("platform", {k: v for k, v in options.items()})
    data = load_data(info, _platform_data(args.data), calib_images=args.calib_images, limit=args.limit, seed=args.seed,
                     batch_size=args.batch_size)
    progress = not args.quiet
    print(f"platform: model {spec}; recipe {label}; {args.calib_images} calibration images; data {data.source}")
    if args.channel_wise and args.n_groups > 1:
        print(f"platform: --channel_wise quantizes Linear inputs per channel (G = C), so --n_groups {args.n_groups} "
              f"has no effect on them")
    fp32 = None
    if args.test_before_calibration:
        fp32 = top1(info.model, data.test_batches(), total=data.test_count, progress=progress, desc="fp32")
        print(f"Test accuracy before calibration (fp32): {fp32:.2f}")
    qmodel, secs = _quantize(info, recipe, data, args.seed, progress)
    t0 = time.perf_counter()
    acc = top1(qmodel, data.test_batches(), total=data.test_count, progress=progress, desc="platform")
    eval_secs = time.perf_counter() - t0
    result = {"model": spec, "recipe": label, "top1": round(acc, 4), "fp32_top1": None if fp32 is None else round(fp32, 4),
              "test_images": data.test_count, "calib_images": args.calib_images, "calib_seconds": round(secs, 3),
              "eval_seconds": round(eval_secs, 3), "seed": args.seed}
    fp = "-" if fp32 is None else f"{fp32:.2f}"
    delta = "-" if fp32 is None else f"{acc - fp32:+.2f}"
    print(_table([(spec, "platform", fp, f"{acc:.2f}", delta, data.test_count, args.calib_images, f"{secs:.1f}")],
                 ("model", "recipe", "fp32 top1", "top1", "delta", "images", "calib", "calib s")))
    _write_json(args.json, result)
    return 0


def _add_platform_parser(sub) -> None:
    pl = sub.add_parser("platform", help="the transformer-quantization platform's command line (recipe 'platform')",
                        description="Flags as the platform's main.py: --channel_wise and --channel_wise=True both work. "
                                    "See docs/methods.md, 'IGQ-ViT and the transformer-quantization platform', for the "
                                    "mapping to recipes.")
    who = pl.add_mutually_exclusive_group(required=True)
    who.add_argument("--name", choices=sorted(PLATFORM_NAMES), help="platform model name (timm, random init unless "
                     "--pretrained and cached)")
    who.add_argument("--model", help="any fxquant model spec instead (cifar-vit, timm:<name>, folder)")
    pl.add_argument("--n_bits", "--n-bits", type=int, default=4, help="weight and activation bits (default 4)")
    pl.add_argument("--n_groups", "--n-groups", type=int, default=8, help="channel groups of Linear inputs (default 8)")
    pl.add_argument("--channel_wise", "--channel-wise", type=_str2bool, nargs="?", const=True, default=False,
                    help="per-row weights and per-channel Linear inputs")
    pl.add_argument("--head_stem_8bit", "--head-stem-8bit", type=_head_stem, nargs="?", const="float", default="quantized",
                    help="head and stem: True = float (the platform's behaviour), int8 = 8-bit quantized")
    pl.add_argument("--eps", type=float, default=1e-3, help="percentile range [Q(eps), Q(1-eps)] (default 1e-3)")
    pl.add_argument("--test_before_calibration", "--test-before-calibration", action="store_true",
                    help="evaluate the float model first")
    pl.add_argument("--data", "--data_dir", dest="data", default=None,
                    help="cifar10 | ImageFolder | ImageNet root with val/ (default: the model's own)")
    pl.add_argument("--calib_images", "--calib-images", type=_count, default=32, help="calibration images (default 32)")
    pl.add_argument("--limit", type=_positive_int, default=None, help="evaluate on the first N test images")
    pl.add_argument("--seed", type=int, default=1, help="seed (the platform's default: 1)")
    pl.add_argument("--group_mode", "--group-mode", choices=("contiguous", "instance"), default="contiguous",
                    help="groups of --n_groups: the platform's contiguous blocks or IGQ-ViT's instance-aware groups")
    pl.add_argument("--batch-size", "--batch_size", dest="batch_size", type=_positive_int, default=200)
    pl.add_argument("--pretrained", action="store_true", help="timm: load pretrained weights (must be cached)")
    pl.add_argument("--json", type=_json_path, default=None, help="write the result as JSON (the keys of fxquant eval --json)")
    pl.add_argument("--quiet", action="store_true", help="no progress bars")
    pl.set_defaults(fn=cmd_platform)


def cmd_demo(args) -> int:
    t_start = time.perf_counter()
    info = load_model("embedded")
    rows = []
    data = load_data(info, "cifar10", calib_images=32, seed=0)
    print(f"fxquant demo: the embedded CIFAR-10 ViT ({sum(p.numel() for p in info.model.parameters()):,} parameters), "
          f"{data.test_count} embedded test images, 32 calibration images")
    fp32 = top1(info.model, data.test_batches(), total=data.test_count, desc="fp32")
    rows.append(("fp32", f"{fp32:.2f}", "+0.00", "-"))
    for name in ("w8a8", "w4a4"):
        recipe = get_recipe(name)
        qmodel, secs = _quantize(info, recipe, data, 0, True)
        acc = top1(qmodel, data.test_batches(), total=data.test_count, desc=name)
        rows.append((name, f"{acc:.2f}", f"{acc - fp32:+.2f}", f"{secs:.1f}"))
    print(_table(rows, ("recipe", "top1 %", "vs fp32", "compile s")))
    print(f"total {time.perf_counter() - t_start:.1f} s. Full test set: fxquant eval --model cifar-vit --recipe w8a8")
    return 0


def cmd_finetune(args) -> int:
    if args.out is not None and distributed.is_main():
        artifact.check_target(Path(args.out) / "model")  # the artifact written after training
    cfg = FinetuneConfig(model=args.model, task=args.task, init=args.init, bits=args.bits, rank=args.rank, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                         train_images=args.train_images, val_images=args.val_images, test_images=args.test_images,
                         oqfv_images=args.oqfv_images, oqfv_lr=args.oqfv_lr, loftq_iters=args.loftq_iters,
                         loftq_grid=args.loftq_grid)
    res = finetune(cfg, out=args.out, progress=not args.quiet)
    if distributed.is_main():
        rows = [(res["init"], res["task"], res["bits"] or "fp", res["rank"], f"{res['top1_init']:.2f}", f"{res['top1']:.2f}",
                 res["trainable_params"], f"{res['seconds']:.1f}")]
        print(_table(rows, ("init", "task", "bits", "rank", "top1 init %", "top1 %", "trainable", "seconds")))
        print(f"{res['test_images']} test images, {res['train_images']} train / {res['val_images']} val, "
              f"{res['world_size']} process(es)")
        _write_json(args.json, res)
    return 0


def _add_finetune_parser(sub) -> None:
    f = sub.add_parser("finetune", help="low-bit LoRA fine-tuning (OQFV, LoftQ, QLoRA, FP LoRA) on a few-shot task",
                       description="VTAB-1k protocol (train800val200 of CIFAR-10's labelled training images, evaluation on "
                                   "the test set). Under `torchrun --nproc_per_node N -m fxquant finetune ...` it runs "
                                   "data-parallel (DDP) with the same result.")
    f.add_argument("--model", default="cifar-vit", help="cifar-vit | hf:cifar-vit | embedded | folder | hf:<folder>")
    f.add_argument("--task", default="cifar10", choices=("cifar10", "rotation"))
    f.add_argument("--init", default="oqfv", choices=("qlora", "loftq", "oqfv", "fp"))
    f.add_argument("--bits", type=int, default=2)
    f.add_argument("--rank", type=int, default=32)
    f.add_argument("--epochs", type=int, default=20)
    f.add_argument("--batch-size", type=_positive_int, default=64, help="global batch (split over torchrun processes)")
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--weight-decay", type=float, default=1e-4)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--train-images", type=int, default=800)
    f.add_argument("--val-images", type=int, default=200)
    f.add_argument("--test-images", type=int, default=None, help="default: the whole test set")
    f.add_argument("--oqfv-images", type=int, default=128, help="OQFV's class-stratified logit-MSE sample")
    f.add_argument("--oqfv-lr", type=float, default=1e-3, help="OQFV's one AdamW step")
    f.add_argument("--loftq-iters", type=int, default=5)
    f.add_argument("--loftq-grid", default="refit", choices=("refit", "fixed"))
    f.add_argument("--out", default=None, help="folder: checkpoint.safetensors, the artifact model/, peft/ (HF models)")
    f.add_argument("--json", type=_json_path, default=None, help="write the result as JSON to this path")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(fn=cmd_finetune)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxquant", description="torch.fx post-training quantization for vision transformers")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("recipes", help="list recipes and passes").set_defaults(fn=cmd_recipes)

    def common(sp, need_recipe: bool, several: bool = False):
        sp.add_argument("--model", required=True, help="cifar-vit | cifar-vit-outliers | embedded | timm:<name> | folder")
        if several:
            sp.add_argument("--recipe", action="append", required=True, help="recipe (repeat to compare several)")
        else:
            sp.add_argument("--recipe", required=need_recipe, help="recipe name (fxquant recipes)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe option (repeatable)")
        sp.add_argument("--data", default=None, help="cifar10 | ImageFolder path (default: the model's own)")
        sp.add_argument("--calib-images", type=_count, default=None, help="calibration images (default: the recipe's)")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--pretrained", action="store_true", help="timm: load pretrained weights (must be cached)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars")

    q = sub.add_parser("quantize", help="quantize a model and save it (safetensors + JSON)")
    common(q, True)
    q.add_argument("--out", required=True, help="artifact folder (new, empty, or an artifact it replaces)")
    q.add_argument("--force", action="store_true", help="replace --out even if it holds files that are not an artifact")
    q.add_argument("--limit", type=_positive_int, default=None, help=argparse.SUPPRESS)
    q.set_defaults(fn=cmd_quantize)

    e = sub.add_parser("eval", help="quantize (or load) a model and report top-1 against FP32")
    common(e, False)
    e.add_argument("--limit", type=_positive_int, default=None, help="evaluate on the first N test images")
    e.add_argument("--batch-size", type=_positive_int, default=200)
    e.add_argument("--json", type=_json_path, default=None, help="write the result as JSON to this path")
    e.add_argument("--no-verify", action="store_true",
                   help="load a saved artifact without checking its digests (for artifacts edited on purpose)")
    e.add_argument("--lower", action="store_true",
                   help="run quantized Linears, the patch embedding and attention matmuls on integer kernels (LowerToKernels)")
    e.add_argument("--recompute-fp32", action="store_true",
                   help="measure the FP32 top-1 again instead of reading it from the cache "
                        "($FXQUANT_CACHE_DIR or ~/.cache/fxquant/fp32_top1.json; keyed by the float weights' SHA-256 "
                        "and the data)")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="quantize a model and export it to ONNX QDQ (onnxruntime) or OpenVINO IR")
    common(x, True)
    x.add_argument("--out", required=True, help="path of the .onnx file (or the .xml of OpenVINO IR)")
    x.add_argument("--format", default="onnx", choices=("onnx", "openvino"),
                   help="onnx: QDQ for onnxruntime; openvino: IR (.xml/.bin) through the same QDQ graph with "
                        "OpenVINO's Q/DQ placement (needs pip install -e \".[openvino]\")")
    x.add_argument("--target", default="onnxruntime", choices=("onnxruntime", "openvino"),
                   help="Q/DQ placement of an ONNX file: onnxruntime (each pair right before its consumer) or "
                        "openvino (per-tensor pairs moved above the reshapes/transposes feeding them; same function)")
    x.add_argument("--act-dtype", default="int8", choices=("int8", "uint8"), help="activation Q/DQ type")
    x.add_argument("--opset", type=int, default=18)
    x.set_defaults(fn=cmd_export)

    r = sub.add_parser("report", help="per-layer error report (SQNR/cosine/rel. L2, local and accumulated) with plots + HTML")
    common(r, True, several=True)
    r.add_argument("--images", type=_positive_int, default=1000, help="held-out evaluation images to measure on")
    r.add_argument("--out", required=True, help="folder for report.json, *.png and report.html")
    r.set_defaults(fn=cmd_report)

    sn = sub.add_parser("sensitivity", help="quantize one layer (or block) at a time: KL and top-1 drop, ranked")
    common(sn, True)
    sn.add_argument("--images", type=_positive_int, default=1000, help="held-out evaluation images")
    sn.add_argument("--granularity", default="layer", choices=("layer", "block"))
    sn.add_argument("--top", type=_positive_int, default=None, help="print only the N most sensitive")
    sn.add_argument("--json", type=_json_path, default=None, help="write the result as JSON to this path")
    sn.set_defaults(fn=cmd_sensitivity)

    _add_platform_parser(sub)
    _add_finetune_parser(sub)
    sub.add_parser("demo", help="W8A8 and W4A4 on the embedded CIFAR-10 ViT (needs nothing else)").set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command. Under ``torchrun`` every command joins the process group first: ``eval``,
    ``quantize`` and ``report`` shard calibration and evaluation batches across the processes
    with the single-process result (``fxquant.core.distributed``), ``finetune`` runs DDP; rank 0 prints
    and writes files, the other ranks' standard output is dropped."""
    args = build_parser().parse_args(argv)
    joined = distributed.init_from_env()
    try:
        with contextlib.ExitStack() as stack:
            if not distributed.is_main():
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            return args.fn(args)
    except FxQuantError as e:
        print(f"fxquant: error: {e}", file=sys.stderr)
        return 2
    finally:
        if joined:
            distributed.shutdown()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
