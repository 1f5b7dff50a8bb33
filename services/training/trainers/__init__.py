"""Trainers of the training service, named on jobs as ``"module:function"``.

- ``services.training.trainers.sft:run``     supervised fine-tuning (full / LoRA / DoRA / QLoRA)
- ``services.training.trainers.export:run``  fuse an adapter, quantize or dequantize a model
"""

SFT = "services.training.trainers.sft:run"
EXPORT = "services.training.trainers.export:run"
