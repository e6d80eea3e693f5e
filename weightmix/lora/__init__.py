"""LoRAs: kohya and PEFT files (formats.py), found in a model through its key dialects
(targets.py), read as task vectors in recipes (delta.py), extracted from fine-tunes and merged
(extract.py, merge.py)."""
