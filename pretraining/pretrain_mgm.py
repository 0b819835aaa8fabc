"""Masked-gene pretraining of a cellfoundry encoder from a YAML run config.

Usage (see pretraining/README.md for GPU and multi-GPU launch lines)::

    python pretraining/pretrain_mgm.py --config pretraining/configs/bert-tiny.yaml \
        --data data/tokenized/human --output_dir runs/bert-tiny [--max_steps N] \
        [--resume latest] [key=value ...]

Overrides are ``key=value`` pairs: ``learning_rate=3e-4``, ``batch_size=64``,
``model.hidden_size=256``. The script only parses the config: data, model and loop live in
``cellfoundry.training``.
"""

from __future__ import annotations

import sys

from cellfoundry.training.entry import pretrain_main

if __name__ == "__main__":
    sys.exit(pretrain_main())
