"""Prompt parameters: CLIP text encoders found in checkpoints, CLIP's tokenizer from local
files, and the encoding of prompts before a merge (see resolve.py)."""

from weightmix.prompts.resolve import Prompts, check_prompts, encode_prompts, prompt_params

__all__ = ["Prompts", "check_prompts", "encode_prompts", "prompt_params"]
