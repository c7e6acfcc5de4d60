"""LoRA on the vision-language model, the optimiser's parameter groups, and the merged export (METHOD §2).

Training follows the paper: LoRA on every LLM linear, a smaller LoRA on the vision tower (which must
receive gradients — the reference code's bug was a ``no_grad`` around it), and the projector trained
fully. The projector is a PEFT ``modules_to_save`` module: the trained copy lives beside the frozen
original, so ``with peft_model.disable_adapter():`` runs the untouched stage-start model — exactly the
frozen reference DPO needs (METHOD §4).

Which modules are "the LLM", "the vision tower" and "the projector" is the model family's
(``stmed.model.families``): LLaVA's ``vision_tower`` / ``multi_modal_projector``, Qwen2.5-VL's
``visual.blocks`` / ``visual.merger``; the LLM is ``language_model`` in both.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import load_peft_weights, set_peft_model_state_dict
from torch import nn
from transformers import PreTrainedModel

from stmed.config import LoRAConfig
from stmed.log import get_logger
from stmed.model.export import save_published
from stmed.model.families import Family, family_of, hf_model
from stmed.model.families.base import LANGUAGE_MODEL

log = get_logger(__name__)

# The LLM's token embeddings and output head, by their module names (every family).
EMBEDDINGS = ("embed_tokens", "lm_head")
GROUP_NAMES = ("llm_lora", "vit_lora", "projector")


def lora_targets(model: PreTrainedModel, lora: LoRAConfig) -> tuple[list[str], list[str]]:
    """Full module names that get an adapter: (language-model linears, vision-tower linears).

    Vision blocks whose output never reaches the projector (LLaVA reads its tower at the penultimate
    layer) get none: an adapter there would only be dead weight — and an unused trainable parameter
    that DistributedDataParallel refuses to reduce.
    """
    family = family_of(model)
    used = {str(i) for i in family.vision_blocks_used(model)}
    vit_targets = lora.vit_targets if lora.vit_targets is not None else list(family.vit_targets)
    llm, vit = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        if LANGUAGE_MODEL in parts and parts[-1] in lora.llm_targets:
            llm.append(name)
        elif lora.train_vit and family.is_vision(name) and parts[-1] in vit_targets:
            blocks = family.vision_blocks
            block = parts[parts.index(blocks) + 1] if blocks in parts else None
            if block in used:
                vit.append(name)
    if not llm:
        raise ValueError(f"lora.llm_targets {lora.llm_targets} match no linear layer of the language model")
    if lora.train_vit and not vit:
        raise ValueError(f"lora.vit_targets {vit_targets} match no linear layer of the {family.name} vision "
                         f"tower (its own: {list(family.vit_targets)})")  # fmt: skip
    return llm, vit


def attach_lora(model: PreTrainedModel, lora: LoRAConfig) -> PeftModel:
    """Wrap ``model``: LLM LoRA, ViT LoRA, projector fully trainable, every other weight frozen.

    With ``lora.train_embeddings`` the token embeddings and the output head are trainable too, kept like
    the projector as ``modules_to_save`` copies, so ``disable_adapter()`` still runs the original ones.

    One PEFT adapter ("default") carries both LoRAs: ``rank_pattern``/``alpha_pattern`` give the vision
    modules their own r/alpha, and their dropout is set afterwards (PEFT has no dropout pattern). That
    dropout is a training-time setting only and is not stored in ``adapter_config.json``.
    """
    llm, vit = lora_targets(model, lora)
    family = family_of(model)
    # A pattern is matched against full module names; every targeted vision module carries the tower's name.
    vit_pattern = rf".*{family.vision_tower}\..*"
    config = LoraConfig(
        r=lora.llm_r, lora_alpha=lora.llm_alpha, lora_dropout=lora.llm_dropout,
        target_modules=llm + vit,
        rank_pattern={vit_pattern: lora.vit_r} if vit else {},
        alpha_pattern={vit_pattern: lora.vit_alpha} if vit else {},
        modules_to_save=[family.projector, *(EMBEDDINGS if lora.train_embeddings else ())], bias="none",
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    vit_set = set(vit)
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer) and name in vit_set:
            module.lora_dropout["default"] = (
                nn.Dropout(lora.vit_dropout) if lora.vit_dropout > 0 else nn.Identity()
            )
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log.info("LoRA on %d LLM + %d ViT linears; %.2fM trainable params", len(llm), len(vit), trainable / 1e6)
    return peft_model


def _group_of(name: str, family: Family) -> str:
    """Which optimiser group a trainable parameter belongs to, from its name."""
    parts = name.split(".")
    if family.projector in parts:
        return "projector"
    if "modules_to_save" in name and any(f".{module}." in name for module in EMBEDDINGS):
        return "llm_lora"  # lora.train_embeddings: the LLM's own weights learn at the LLM's rate
    if "lora_" in name and family.vision_tower in parts:
        return "vit_lora"
    if "lora_" in name and LANGUAGE_MODEL in parts:
        return "llm_lora"
    raise ValueError(f"trainable parameter {name} is neither LoRA nor projector; attach_lora froze it wrong")


def param_groups(
    model: nn.Module, lr_llm: float, lr_vit: float, lr_projector: float, weight_decay: float = 0.0
) -> list[dict]:
    """AdamW parameter groups ``llm_lora`` / ``vit_lora`` / ``projector``, each with its own lr.

    Every trainable parameter lands in exactly one group; empty groups (no ViT LoRA) are left out.
    """
    lrs = {"llm_lora": lr_llm, "vit_lora": lr_vit, "projector": lr_projector}
    params: dict[str, list[nn.Parameter]] = {name: [] for name in GROUP_NAMES}
    family = family_of(model)
    for name, param in model.named_parameters():
        if param.requires_grad:
            params[_group_of(name, family)].append(param)
    return [
        {"name": name, "params": params[name], "lr": lrs[name], "weight_decay": weight_decay}
        for name in GROUP_NAMES
        if params[name]
    ]


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute activations in backward (vision tower and LLM) to trade compute for memory.

    Non-reentrant checkpointing lets gradients reach LoRA weights inside checkpointed blocks even though
    the frozen inputs do not require grad, so no ``enable_input_require_grads`` hook is needed.
    """
    hf = hf_model(model)
    hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # transformers 5.16 name
    hf.config.use_cache = False  # a KV cache is useless in training and conflicts with checkpointing
    hf.config.text_config.use_cache = False


# ----------------------------------------------------------------------------- saving


def save_trainable(model: PeftModel, out_dir: str | Path) -> Path:
    """Write the adapter and the trained projector (``adapter_model.safetensors`` + config)."""
    if not isinstance(model, PeftModel):
        raise TypeError(f"save_trainable needs the PeftModel from attach_lora, got {type(model).__name__}")
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    return out_dir


def load_trainable(model: PeftModel, in_dir: str | Path) -> None:
    """Load weights written by ``save_trainable`` into a model prepared by ``attach_lora`` (same LoRA config).

    Every trainable tensor must be in the file and every tensor in the file must land somewhere.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"load_trainable needs the PeftModel from attach_lora, got {type(model).__name__}")
    weights = load_peft_weights(str(in_dir), device="cpu")
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as err:  # torch reports shape mismatches (another rank) as RuntimeError
        raise ValueError(f"{in_dir} does not fit this model (different lora settings?): {err}") from err
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(trainable & set(result.missing_keys))
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{in_dir} does not fit this model: unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}; "
            "was it saved with the same lora settings?"
        )


def merge_and_export(
    peft_model: PeftModel, processor, out_dir: str | Path, inplace: bool = False
) -> Path:
    """Fold the LoRA deltas and the trained projector into plain weights; save model + processor.

    By default a deep copy is merged, so ``peft_model`` keeps training/serving unchanged (this needs room
    for a second copy of the model on its device). ``inplace=True`` merges ``peft_model`` itself, which is
    then spent: use it at the end of a job. The weights carry the family's published key names and the
    generation config no decoding defaults (``stmed.model.export``); the result loads with
    ``load_model(ModelConfig(name_or_path=out_dir))`` and in vLLM.
    """
    if not isinstance(peft_model, PeftModel):
        raise TypeError(f"merge_and_export needs a PeftModel, got {type(peft_model).__name__}")
    target = peft_model if inplace else copy.deepcopy(peft_model)
    merged = target.merge_and_unload()
    if any(re.search(r"lora_|modules_to_save|original_module", n) for n, _ in merged.named_parameters()):
        raise RuntimeError("merge_and_unload left PEFT parameters behind; refusing to export a broken model")
    out_dir = Path(out_dir)
    save_published(merged, out_dir)  # the release's key names, which vLLM and other tools read
    processor.save_pretrained(out_dir)
    log.info("exported merged model to %s", out_dir)
    return out_dir
