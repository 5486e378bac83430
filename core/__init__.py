"""fxquant's core (installed as ``fxquant.core``): everything below the methods.

Bottom to top (``tests/test_layers.py`` checks the imports): ``errors``; ``quant`` (the quantizer
core: specs, rounding rules, codes, observers, fake-quant modules); ``meta`` | ``batches`` |
``distributed`` | ``knapsack``; ``match`` (graph patterns by op type and structure); ``graph`` |
``models``; then the pass manager (``pipeline``), ``calibration``, ``evaluate``, ``data``, ``aph``
(APHQ's Hessian approximations), ``error_report`` and ``layer_sensitivity`` (one-layer KL ranking),
``testing`` (toy models shared by tests and tools).

Nothing here imports ``fxquant.kernels``, ``fxquant.passes``, ``fxquant.export`` or the front.
"""
