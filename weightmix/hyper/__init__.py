"""Hyper-Merge (seed 001): one average model plus LoRAs shared by all models, with one
multiplier per model and LoRA (shared.py: the algorithm; run.py: files; evaluate.py)."""
