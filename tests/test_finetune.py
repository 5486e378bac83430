"""``fxquant finetune``: the few-shot tasks, the Hugging Face conversion and peft adapters, what
trains and what stays frozen, and 2-process DDP against the single-process run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import fxquant
from fxquant import artifact
from fxquant.core.data import load_fewshot, rotate_task
from fxquant.core.errors import ConfigError
from fxquant.core.graph import logits_of
from fxquant.core.models import load_model
from fxquant.finetune import FinetuneConfig, finetune, trainable_parameters

SMALL = dict(train_images=64, val_images=16, test_images=32, epochs=1, batch_size=32, oqfv_images=32)


def test_cifar_vit_converts_to_hugging_face_with_equal_logits_and_loads_from_a_folder(cifar_data, tmp_path):
    timm_model = load_model("cifar-vit").model
    hf = load_model("hf:cifar-vit")
    x = cifar_data[1][:64]
    with torch.no_grad():
        ref, got = timm_model(x), hf.model(x).logits
    assert (ref - got).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert hf.num_classes == 10 and hf.mean == load_model("cifar-vit").mean
    hf.model.save_pretrained(tmp_path / "vit")
    folder = load_model(f"hf:{tmp_path / 'vit'}")
    with torch.no_grad():
        assert torch.equal(folder.model(x).logits, got)
    assert folder.input_size == (3, 32, 32) and folder.num_classes == 10
    with pytest.raises(ConfigError, match="could not load the Hugging Face model"):
        load_model(f"hf:{tmp_path / 'missing'}")


def test_rotation_task_is_exact_balanced_and_split_as_vtab():
    x = torch.randn(8, 3, 32, 32)
    rx, ry = rotate_task(x)
    assert ry.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    for i in range(8):
        assert torch.equal(torch.rot90(rx[i], -int(ry[i]), dims=(1, 2)), x[i])
    info = load_model("embedded")
    task = load_fewshot(info, "rotation", train=80, val=20, test=40, embedded=True)
    assert task.num_classes == 4 and len(task.train[1]) == 80 and len(task.val[1]) == 20 and len(task.test[1]) == 40
    with pytest.raises(ConfigError, match="exceed the 256 labelled training images"):
        load_fewshot(info, "cifar10", train=250, val=10, embedded=True)


def test_finetune_trains_only_adapters_and_head_is_seeded_and_saves_what_it_trained(tmp_path):
    cfg = FinetuneConfig(model="embedded", task="rotation", init="qlora", **SMALL)
    res = finetune(cfg, out=tmp_path, progress=False)
    for key in ("init", "task", "bits", "rank", "top1_init", "top1", "trainable_params", "seconds", "losses"):
        assert key in res
    assert res["bits"] == 2 and res["rank"] == 32 and len(res["losses"]) == 2 and res["num_classes"] == 4
    again = finetune(cfg, progress=False)  # seeded: a rerun is bit-identical
    assert again["trainable_digest"] == res["trainable_digest"] and again["losses"] == res["losses"]
    # the same compile before training: frozen tensors must be bit-identical, trained ones must have moved
    info = load_model("embedded")
    task = load_fewshot(info, "rotation", train=64, val=16, test=32, embedded=True)
    start = fxquant.compile(info.model, passes=cfg.passes(info, task), calib=[task.train], example_inputs=(task.train[0][:2],),
                            progress=False).state_dict()
    trained = artifact.load(tmp_path / "model").state_dict()
    ckpt = load_file(str(tmp_path / "checkpoint.safetensors"))
    assert set(ckpt) == {k for k in trained if ".lora_A." in k or ".lora_B." in k or k.startswith("head.")}
    assert res["trainable_params"] == sum(v.numel() for v in ckpt.values())
    for k, v in trained.items():
        if k in ckpt:
            assert torch.equal(v, ckpt[k])
            if ".lora_A." in k or k.startswith("head."):  # B starts at 0 and moves too; A and the head surely do
                assert not torch.equal(v, start[k]), k
        else:
            assert torch.equal(v, start[k]), f"frozen tensor {k} changed"


def test_only_adapters_and_head_receive_gradients():
    info = load_model("embedded")
    task = load_fewshot(info, "rotation", train=16, val=0, test=8, embedded=True)
    cfg = FinetuneConfig(model="embedded", task="rotation", init="loftq")
    gm = fxquant.compile(info.model, passes=cfg.passes(info, task), example_inputs=(task.train[0][:2],), progress=False)
    trainable = trainable_parameters(gm)
    torch.nn.functional.cross_entropy(gm(task.train[0]), task.train[1]).backward()
    assert len(trainable) == 2 * 24 + 2 and {"head.weight", "head.bias"} <= set(trainable)
    for name, p in gm.named_parameters():
        assert (p.grad is not None) == (name in trainable), name


def test_hugging_face_adapters_load_in_peft_with_equal_logits(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import ViTForImageClassification

    res = finetune(FinetuneConfig(model="hf:cifar-vit", task="cifar10", init="loftq", **SMALL), out=tmp_path, progress=False)
    cfg = json.loads((tmp_path / "peft" / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 32 and cfg["modules_to_save"] == ["classifier"]
    assert (tmp_path / "peft" / "adapter" / "adapter_model.safetensors").exists()
    base = ViTForImageClassification.from_pretrained(res["peft"]["base"])
    peft_model = PeftModel.from_pretrained(base, res["peft"]["adapter"]).eval()
    ours = artifact.load(tmp_path / "model")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (peft_model(x).logits - logits_of(ours(x))).abs().max().item() < 1e-4


# slow on the 2-core AVX2 CI machine; torchrun equality by default: tests/core/test_distributed.py
@pytest.mark.slow
def test_two_process_ddp_equals_the_single_process_run(tmp_path):
    """Same global batches (DistributedSampler, batch/2 per process), averaged gradients, OQFV's
    logit step reduced across processes; float summation order differs (DDP's all-reduce, thread
    counts). Stated tolerances: losses and OQFV's pre-step MSE within 1e-5 relative; equal top-1;
    the two trained models' logits within 1e-4 of their range; each trained tensor within 1e-3
    relative (L2). The last is loose by construction: an Adam step moves every element by about
    ±lr whatever its gradient's size, so an element whose gradient is at float-noise level can move
    the other way in the other run: one such element of a LoRA factor (‖A‖ ≈ 3.6, lr 1e-3) is
    already 5e-4 relative."""
    opts = dict(model="embedded", task="cifar10", init="oqfv", train_images=64, val_images=16, test_images=64, epochs=2,
                batch_size=32, oqfv_images=32)
    one = finetune(FinetuneConfig(**opts), out=tmp_path / "one", progress=False)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in opts.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fxquant", "finetune",
                           *flags, "--json", str(tmp_path / "two.json"), "--out", str(tmp_path / "two"), "--quiet"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2 and len(one["losses"]) == len(two["losses"]) == 4
    for a, b in zip(one["losses"], two["losses"]):
        assert abs(a - b) <= 1e-5 * abs(a)
    # before OQFV's step the MSE is a sum reduced across processes; its one AdamW step moves each weight by ~lr·sign(g),
    # so a gradient element at float-noise level can flip: the MSE after it agrees to 1e-4
    assert one["oqfv"]["mse_before"] == pytest.approx(two["oqfv"]["mse_before"], rel=1e-5)
    assert one["oqfv"]["mse_after"] == pytest.approx(two["oqfv"]["mse_after"], rel=1e-4)
    assert one["top1_init"] == two["top1_init"] and one["top1"] == two["top1"]
    w1, w2 = (load_file(str(tmp_path / run / "checkpoint.safetensors")) for run in ("one", "two"))
    assert set(w1) == set(w2)
    for k in w1:
        assert ((w1[k] - w2[k]).norm() / w1[k].norm().clamp(min=1e-12)).item() <= 1e-3, k
    x = load_fewshot(load_model("embedded"), "cifar10", train=64, val=16, test=64, embedded=True).test[0]
    with torch.no_grad():
        l1, l2 = (logits_of(artifact.load(tmp_path / run / "model")(x)) for run in ("one", "two"))
    assert (l1 - l2).abs().max().item() <= 1e-4 * (l1.max() - l1.min()).item()


def test_finetune_config_errors():
    with pytest.raises(ConfigError, match="--init must be one of"):
        FinetuneConfig(init="nf2")
    with pytest.raises(ConfigError, match="unknown task 'dtd'"):
        load_fewshot(load_model("embedded"), "dtd", embedded=True)
