"""Throughput of the stage-1 training step: tokens/s and samples/s; on CUDA also step time, peak memory, MFU.

    python benchmarks/train_throughput.py                                   # tiny model, CPU, a few steps
    python benchmarks/train_throughput.py --device cuda --shape 7b          # 7B-shaped LLaVA, random weights
    python benchmarks/train_throughput.py --shape 7b --dry-run              # meta device: counts + FLOPs only
    python benchmarks/train_throughput.py --padding                         # tiny: pad tokens, grouped or not

``--shape tiny`` runs the real loop (``stmed.train.sft.train_sft`` in a ``LocalSession``) on the synthetic
dataset and reads its metrics. ``--padding`` runs it twice on conversations cut to 1-5 question-answer
rounds (varied lengths), with and without ``train.group_by_length``, and sets the real tokens beside the
pad tokens of the same steps (4 micro-batches a step unless ``--grad-accum-steps`` says otherwise).
``--shape 7b`` builds a LLaVA-1.5-7B-shaped model from configs with random
weights (CLIP ViT-L/14 at 336 px + a Llama-7B decoder; nothing is downloaded), attaches the paper's LoRA
(METHOD §2: LLM r=128, ViT r=32, projector trainable), and times ``stmed.train.sft.sft_step`` on random
batches in bf16 autocast with gradient checkpointing.

MFU counts *model* FLOPs per step (recomputation from gradient checkpointing is not counted; MFU stays
comparable between runs with and without it). For a parameter block of N weights, T of them trainable,
applied to M positions, LoRA training costs 2·N·M (forward) + 2·N·M (backward to the inputs, needed
because gradients must reach LoRA weights upstream, the ViT's included) + 2·T·M (weight gradients):

    FLOPs = (4·N_llm + 2·T_llm)·B·S            LLM linears + LoRA + lm_head (not embed_tokens), S tokens/sample
          + 12·L·d·S·B·S                        attention scores and values (QKᵀ, AV), forward + backward
          + (4·N_vit + 2·T_vit)·B·P             vision tower at P positions per image (577 for 336/14 + CLS)
          + 6·N_proj·B·I                        projector, fully trainable, at I image tokens (576)

MFU = FLOPs / step_time / peak, with peak the dense bf16 rate (H100/H200 SXM 989 TFLOP/s, A100 312;
override with ``--peak-tflops``). The GPU path has not been run on this machine (no GPU here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from stmed.config import LoRAConfig, ModelConfig, config_to_dict
from stmed.data.synthetic import make_dataset
from stmed.model.conversation import IGNORE_INDEX, LOSS_QA, LOSS_VQ
from stmed.runs import MetricsLog
from stmed.train.session import LocalSession
from stmed.train.sft import SFTLoopConfig, sft_step, train_sft
from stmed.train.stage import TrainConfig, build_optimizer, make_trainable

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


# ----------------------------------------------------------------------------- tiny: the real loop


def run_tiny(
    args: argparse.Namespace, instruct: Path, images: Path, group_by_length: bool = True
) -> list[dict]:
    """``train_sft`` on ``instruct`` in a LocalSession; its metrics rows after the warm-up steps."""
    with tempfile.TemporaryDirectory(prefix="stmed-bench-") as tmp:
        train = TrainConfig(micro_batch_size=args.micro_batch_size, grad_accum_steps=args.grad_accum_steps,
                            max_steps=args.steps + args.warmup, max_length=args.seq_len,
                            group_by_length=group_by_length, log_every=10**6, checkpoint_every=10**6)  # fmt: skip
        cfg = SFTLoopConfig(model=ModelConfig(preset="tiny"), lora=LoRAConfig(llm_r=8, llm_alpha=16, vit_r=4,
                            vit_alpha=8), train=train, instruct_path=str(instruct),
                            image_root=str(images), output_dir=tmp, export_merged=False)  # fmt: skip
        train_sft(config_to_dict(cfg, redact=False), LocalSession(Path(tmp) / "ckpt", device=args.device))
        return MetricsLog(Path(tmp) / "metrics.jsonl").read()[args.warmup :]


def throughput(rows: list[dict]) -> dict:
    busy = sum(row["step_time_s"] for row in rows)
    return {"step_time_s": statistics.median(r["step_time_s"] for r in rows),
            "tokens_per_s": sum(r["tokens"] for r in rows) / busy,
            "samples_per_s": sum(r["samples"] for r in rows) / busy}  # fmt: skip


def bench_tiny(args: argparse.Namespace) -> dict:
    """``train_sft`` on the synthetic data; throughput from its metrics rows."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory(prefix="stmed-bench-") as tmp:
        paths = make_dataset(Path(tmp) / "data", num_images=60, seed=0)
        rows = run_tiny(args, paths.instruct, paths.images)
    return {"shape": "tiny", "device": args.device, "threads": torch.get_num_threads(), "steps": len(rows),
            "micro_batch_size": args.micro_batch_size, "grad_accum_steps": args.grad_accum_steps,
            **throughput(rows)}  # fmt: skip


def varied_lengths(instruct: Path, dst: Path) -> Path:
    """The synthetic conversations (5 question-answer rounds each) cut to 1-5 rounds in turn: ~100 to ~260
    tokens on the tiny model, so that batches have something to pad."""
    rows = json.loads(instruct.read_text())
    for i, row in enumerate(rows):
        row["conversations"] = row["conversations"][: 2 * (1 + i % 5)]
    dst.write_text(json.dumps(rows))
    return dst


def bench_padding(args: argparse.Namespace) -> dict:
    """The same steps with and without ``train.group_by_length`` on varied lengths: real and pad tokens."""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    result = {"shape": "tiny", "device": args.device, "micro_batch_size": args.micro_batch_size,
              "grad_accum_steps": args.grad_accum_steps}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="stmed-bench-") as tmp:
        paths = make_dataset(Path(tmp) / "data", num_images=60, seed=0)
        varied = varied_lengths(paths.instruct, Path(tmp) / "varied.json")
        for name, grouped in (("plain", False), ("grouped", True)):
            steps = run_tiny(args, varied, paths.images, group_by_length=grouped)
            real, pad = sum(r["tokens"] for r in steps), sum(r["pad_tokens"] for r in steps)
            result.update({f"{name}_steps": len(steps), f"{name}_real_tokens": real, f"{name}_pad_tokens": pad,
                           f"{name}_pad_fraction": pad / (real + pad),
                           f"{name}_tokens_per_s": throughput(steps)["tokens_per_s"]})  # fmt: skip
    return result


# ----------------------------------------------------------------------------- 7B shape: the step alone


def llava_7b_config() -> LlavaConfig:
    """llava-1.5-7b's shapes: CLIP ViT-L/14-336 (penultimate layer, CLS dropped) + Llama-7B, 2-layer MLP."""
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, tie_word_embeddings=False)  # fmt: skip
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
                       vision_feature_select_strategy="default", vision_feature_layer=-2,
                       projector_hidden_act="gelu")  # fmt: skip


def build_7b(device: str) -> LlavaForConditionalGeneration:
    """Random bf16 weights, created directly on ``device`` (the meta device allocates nothing)."""
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(llava_7b_config(), dtype=torch.bfloat16)
    return model


def _count(module: nn.Module, skip: str | None = None) -> tuple[int, int]:
    """(all, trainable) parameter counts of ``module``, leaving out names containing ``skip``."""
    params = [(n, p) for n, p in module.named_parameters() if skip is None or skip not in n]
    return sum(p.numel() for _, p in params), sum(p.numel() for _, p in params if p.requires_grad)


def step_flops(model: nn.Module, batch: int, seq_len: int) -> float:
    """Model FLOPs of one optimiser step over ``batch`` samples (formula in the module docstring)."""
    hf = model.get_base_model()
    config = hf.config
    n_llm, t_llm = _count(hf.model.language_model, skip="embed_tokens")
    n_head, t_head = _count(hf.lm_head)
    n_vit, t_vit = _count(hf.model.vision_tower)
    n_proj, _ = _count(hf.model.multi_modal_projector)
    text = config.text_config
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2 + 1
    llm = (4 * (n_llm + n_head) + 2 * (t_llm + t_head)) * batch * seq_len
    attention = 12 * text.num_hidden_layers * text.hidden_size * seq_len * batch * seq_len
    vit = (4 * n_vit + 2 * t_vit) * batch * patches
    projector = 6 * n_proj * batch * config.image_seq_length
    return float(llm + attention + vit + projector)


def random_batch(config: LlavaConfig, batch: int, seq_len: int, seed: int) -> dict[str, torch.Tensor]:
    """``<s>``, 576 image tokens, a 32-token prompt, then targets alternating answer/question runs."""
    g = torch.Generator().manual_seed(seed)
    image_tokens = config.image_seq_length
    if seq_len < image_tokens + 64:
        raise ValueError(f"--seq-len must be >= {image_tokens + 64} for the 7B shape, got {seq_len}")
    ids = torch.randint(3, config.image_token_index, (batch, seq_len), generator=g)
    ids[:, 0] = 1
    ids[:, 1 : 1 + image_tokens] = config.image_token_index
    first_target = 1 + image_tokens + 32
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, first_target:] = ids[:, first_target:]
    kinds = torch.zeros_like(ids)
    positions = torch.arange(seq_len)
    kinds[:, first_target:] = torch.where((positions[first_target:] // 64) % 2 == 0, LOSS_QA, LOSS_VQ)
    size = config.vision_config.image_size
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "loss_kind": kinds,
            "pixel_values": torch.randn(batch, 3, size, size, generator=g)}  # fmt: skip


def peak_tflops(override: float | None) -> float | None:
    if override:
        return override
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((tflops for key, tflops in PEAK_TFLOPS.items() if key in name), None)


def bench_7b(args: argparse.Namespace) -> dict:
    device = "meta" if args.dry_run else args.device
    torch.manual_seed(0)
    model = make_trainable(build_7b(device), LoRAConfig(), gradient_checkpointing=not args.no_checkpointing,
                           upcast=device == "cuda")  # fmt: skip
    flops = step_flops(model, args.micro_batch_size, args.seq_len)
    n_all, n_trainable = _count(model)
    result = {"shape": "7b", "device": device, "params": n_all, "trainable": n_trainable,
              "micro_batch_size": args.micro_batch_size, "seq_len": args.seq_len, "step_tflops": flops / 1e12}  # fmt: skip
    if args.dry_run:
        return result
    train = TrainConfig(micro_batch_size=args.micro_batch_size, bf16=True,
                        gradient_checkpointing=not args.no_checkpointing)  # fmt: skip
    optimizer, scheduler = build_optimizer(model, train, total_steps=args.steps + args.warmup)
    batch = random_batch(model.get_base_model().config, args.micro_batch_size, args.seq_len, seed=0)
    dev = torch.device(device)
    model.train()
    times = []
    for step in range(args.warmup + args.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        sft_step(model, [batch], optimizer, scheduler, train, world_size=1, device=dev)  # syncs via .cpu()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    step_time = statistics.median(times)
    peak = peak_tflops(args.peak_tflops) if dev.type == "cuda" else None
    result.update({
        "step_time_s": step_time, "tokens_per_s": args.micro_batch_size * args.seq_len / step_time,
        "samples_per_s": args.micro_batch_size / step_time, "achieved_tflops": flops / step_time / 1e12,
        "mfu": flops / step_time / (peak * 1e12) if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None,
    })  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (tiny: 10, 7b: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--grad-accum-steps", type=int, default=None, help="tiny: 1 (--padding: 4)")
    parser.add_argument("--padding", action="store_true", help="tiny: pad tokens with and without grouping")
    parser.add_argument("--seq-len", type=int, default=None, help="tiny: max_length (512); 7b: tokens (1024)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (tiny)")
    parser.add_argument("--no-checkpointing", action="store_true", help="7b: no gradient checkpointing")
    parser.add_argument("--peak-tflops", type=float, default=None, help="7b: the GPU's dense bf16 peak")
    parser.add_argument("--dry-run", action="store_true", help="7b: meta device; counts and FLOPs only")
    args = parser.parse_args(argv)
    args.steps = args.steps or (10 if args.shape == "tiny" else 5)
    args.seq_len = args.seq_len or (512 if args.shape == "tiny" else 1024)
    args.grad_accum_steps = args.grad_accum_steps or (4 if args.padding else 1)
    if args.padding and args.shape != "tiny":
        parser.error("--padding runs the tiny loop; leave out --shape 7b")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    if args.padding:
        result = bench_padding(args)
    else:
        result = bench_tiny(args) if args.shape == "tiny" else bench_7b(args)
    result["load_avg_1m"] = os.getloadavg()[0]  # CPU figures mean little on a busy shared machine
    for key, value in result.items():
        print(f"{key:>18}: {value:.4g}" if isinstance(value, float) else f"{key:>18}: {value}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
