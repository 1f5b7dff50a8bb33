"""Every training method's config schema, in modules that never import MLX.

``base`` (DictConfig, ``setting``: defaults and bounds declared on the field), ``common``
(loop, optimizer, LoRA, quantization, model, dataset, resources), then one module per group
of methods: ``training`` (SFT, export), ``preference`` (reward model, DPO, KTO, ORPO),
``rollouts`` (PPO, GRPO) and ``distill``. ``services.registry`` names each method's class;
``scripts/gen_config_docs.py`` writes docs/config.md from the same fields.
"""
