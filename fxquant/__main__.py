"""``python -m fxquant ...`` (and ``torchrun ... -m fxquant finetune ...``): the command line."""

import sys

from .cli import main

sys.exit(main())
