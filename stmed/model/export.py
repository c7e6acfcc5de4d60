"""Exports in the published layout of their family: the key names, and a generation config that decodes nothing.

transformers 5 keeps its own parameter names in memory (``model.vision_tower.embeddings…``) and, on
``save_pretrained``, turns them back into the names of the checkpoint it loaded them from. A model that
was *built* (a tiny preset) has no such record, and transformers falls back to a partial mapping: a
LLaVA preset comes out as ``vision_tower.embeddings.*`` where llava-hf publishes
``vision_tower.vision_model.embeddings.*`` — and vLLM, which reads the published names only, refuses it
(``There is no module or parameter named 'vision_tower.embeddings'``). So an export does not rely on that
record: every in-memory name is renamed by its family's ``published_names`` and saved as is, whatever
the model was built from (preset, published checkpoint, converted original LLaVA).

A published ``generation_config.json`` can carry decoding defaults (Qwen2.5-VL-7B-Instruct:
``repetition_penalty`` 1.05, ``temperature`` 1e-6, ``do_sample``). HF ``generate`` and vLLM's OpenAI
server apply them; ``ray.data.llm``'s explicit sampling parameters do not. Exports keep only the special
token ids, so every engine decodes with the settings stmed passes and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel

from stmed.model.families import Family, family_of

TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
"""What an export's ``generation_config.json`` keeps: which tokens are special, no decoding defaults."""


def published_name(family: Family, name: str) -> str:
    """A transformers-5 parameter name as the family's releases name it (``family.published_names``)."""
    for memory, published in family.published_names:
        if name.startswith(memory):
            return published + name[len(memory):]
    raise ValueError(f"{family.name}: parameter {name} has no published name (Family.published_names)")


def published_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's tensors under the published names of its family."""
    family = family_of(model)
    return {published_name(family, name): tensor for name, tensor in model.state_dict().items()}


def neutral_generation_config(config: GenerationConfig) -> GenerationConfig:
    """``config`` with its decoding defaults dropped: the special token ids only."""
    return GenerationConfig(**{k: getattr(config, k) for k in TOKEN_ID_FIELDS if getattr(config, k, None) is not None})


def save_published(model: PreTrainedModel, out_dir: str | Path) -> Path:
    """Save ``model`` (weights, ``config.json``, a neutral ``generation_config.json``) in the published layout."""
    out_dir = Path(out_dir)
    state = published_state_dict(model)
    original = model.generation_config
    model.generation_config = neutral_generation_config(original)
    try:
        # save_original_format=False: the names are already the published ones; no second renaming.
        model.save_pretrained(out_dir, state_dict=state, save_original_format=False)
    finally:
        model.generation_config = original
    return out_dir
