"""Low-rank adapters (LoRA, DoRA), data and evaluation for fine-tuning OpenELM."""
