"""The trainer behind train.py: two phases (frozen backbone on cached embeddings, then fine-tuning).

Modules: ``cli`` (flags -> config), ``context`` (accelerator, shards, label tables built once per run),
``cache`` (per-view backbone embeddings computed once), ``phases`` (what each phase prepares),
``loop`` (epochs, steps, validation, export, checkpoints), and the helpers ``schedule``, ``ema``,
``checkpoint``, ``tracking``. Nothing heavy is imported here so that ``train.py --help`` stays fast.
"""
