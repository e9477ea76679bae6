"""Training: a generic loop (train.loop) and the objectives that plug into it (SFT, DPO)."""
