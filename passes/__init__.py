"""Graph passes. Each is a frozen dataclass with a name, ``requires``/``provides`` facts and
``run(gm, ctx)``; ``fxquant.compile`` runs them through ``fxquant.core.pipeline.PassManager``."""

from .annotate import AnnotateUniform
from .aphq import AnnotateAPHQ, MLPReconstruct
from .bitlog2 import BitLog2Attention
from .block_recon import BlockReconstruct
from .calibrate import Calibrate
from .igq import AllocateGroups, GroupQuant
from .insert import InsertQuantizers
from .lora import LoRAQuantize, ReplaceHead
from .lower import LowerToKernels
from .mixed import MixedPrecision
from .qwt import QwTCompensate
from .repq import AnnotateRepQ, ReparameterizeLayerNorm

__all__ = ["AnnotateUniform", "InsertQuantizers", "Calibrate", "AnnotateRepQ", "ReparameterizeLayerNorm", "BitLog2Attention",
           "QwTCompensate", "LowerToKernels", "MLPReconstruct",
           "AnnotateAPHQ", "BlockReconstruct", "GroupQuant", "AllocateGroups",
           "LoRAQuantize", "ReplaceHead", "MixedPrecision"]
