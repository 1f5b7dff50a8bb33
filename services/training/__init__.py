"""The training service (port 8500): SFT (full, LoRA, DoRA, QLoRA) and export jobs."""
