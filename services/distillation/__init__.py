"""Knowledge-distillation service: validation (validate.py) and trainers (trainers/)."""
