"""Fine-tune a pretrained cellfoundry encoder for a task from a YAML run config.

Usage::

    python finetuning/finetune.py --task annotation \
        --config finetuning/configs/annotation/starmap-lora.yaml \
        [--data cells.h5ad] [--output_dir runs/ft] [--max_steps N] [--resume latest] \
        [key=value ...]

Overrides are ``key=value`` pairs: ``learning_rate=3e-4`` (training section) or
``task.tuning=full`` (task section). The script only parses the config: data, model, loop and
scoring live in ``cellfoundry.tasks``.
"""

from __future__ import annotations

import sys

from cellfoundry.tasks.entry import finetune_main

if __name__ == "__main__":
    sys.exit(finetune_main())
