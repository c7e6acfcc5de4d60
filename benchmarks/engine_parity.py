"""HF generation against vLLM on the same merged checkpoint: prompt token ids, greedy answers, throughput.

    .venv/bin/python benchmarks/engine_parity.py                               # both presets, 200 questions
    .venv/bin/python benchmarks/engine_parity.py --presets tiny --questions 400 --max-new-tokens 16
    .venv/bin/python benchmarks/engine_parity.py --presets llava-1.5-7b-hf qwen2.5-vl-7b-instruct  # fixtures

For each family's tiny preset: export it as a merged checkpoint (``stmed.model.export``, the published
layout), load that folder in the HF engine (``stmed.model.generate.HFEngine``, fp32) and in vLLM's CPU
backend (fp32, eager), render every benchmark question with ``stmed.model.prompts.answer_prompt`` and
decode greedily on both. Prints how many prompts tokenize to the same ids (the image tokens expanded), how
many cleaned answers agree exactly, where they first diverge, and questions per second of each engine
(model load and warm-up excluded). The untrained preset never ends a turn, so every answer runs the full
``--max-new-tokens``: agreement then measures how long two fp32 implementations pick the same argmax.
Questions come from the synthetic benchmark (made in a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from stmed.config import ModelConfig
from stmed.data.images import load_image
from stmed.data.records import read_benchmark
from stmed.data.synthetic import make_dataset
from stmed.model import prompts
from stmed.model.build import load_model
from stmed.model.export import save_published
from stmed.model.generate import HFEngine, Sampling, clean_output
from stmed.model.prompts import CLOSED_SUFFIX

CPU_ENGINE = {"dtype": "float32", "enforce_eager": True, "gpu_memory_utilization": 0.05, "max_model_len": 1024}
"""vLLM's CPU backend on a shared 24 GiB machine: on CPU the utilisation is the share of host memory the
KV cache takes (0.05 = 1.2 GiB), and eager mode skips torch.compile's minutes of start-up."""


REAL_LAYOUT = ("llava-1.5-7b-hf", "qwen2.5-vl-7b-instruct")
"""Shrunk random-weight copies of the releases in ../shared/fixtures (tests/checkpoints.py): the published
tokenizer, processor and config (a LLaVA image is 576 tokens), loaded and exported as training would."""


def export_preset(preset: str, out: Path) -> Path:
    """The preset (or a real-layout fixture) as a merged checkpoint in its family's published layout."""
    if preset in REAL_LAYOUT:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout: tests.checkpoints
        from tests import checkpoints

        # vLLM's CPU attention takes head_dim >= 32 (the releases' is 128): two 32-wide heads, not four of 16.
        checkpoints.SHRUNK_TEXT.update(num_attention_heads=2, num_key_value_heads=2)
        checkpoints.QWEN_TEXT.update(num_attention_heads=2, num_key_value_heads=2,
                                     rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})
        build = checkpoints.build_llava_hf if preset == REAL_LAYOUT[0] else checkpoints.build_qwen2_5_vl
        model, processor = load_model(ModelConfig(name_or_path=str(build(out.parent / f"{preset}-release"))))
    else:
        model, processor = load_model(ModelConfig(preset=preset))
    save_published(model, out)
    processor.save_pretrained(out)
    return out


def vllm_engine(model_path: str | Path, **overrides: Any):
    """vLLM's offline engine in this process (no engine-core subprocess), as stmed configures it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    from actors.vllm_generator import engine_defaults

    return LLM(model=str(model_path), **{**engine_defaults(str(model_path)), **CPU_ENGINE, **overrides})


def vllm_greedy(llm, chat: prompts.ChatFormat, max_new_tokens: int):
    """SamplingParams of a greedy answer, stopped where the HF engine stops (the family's end of turn)."""
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=[chat.eos], repetition_penalty=1.0)


@dataclass
class Side:
    """One engine's prompt ids, cleaned answers and seconds over the questions."""

    ids: list[list[int]]
    answers: list[str]
    seconds: float


def hf_side(model_path: Path, texts: list[str], images: list[Image.Image], max_new_tokens: int,
            batch_size: int) -> Side:  # fmt: skip
    engine = HFEngine(*load_model(ModelConfig(name_or_path=str(model_path))), batch_size=batch_size)
    ids = [engine.processor(text=[t], images=[im], return_tensors="pt")["input_ids"][0].tolist()
           for t, im in zip(texts, images)]
    sampling = Sampling(max_new_tokens=max_new_tokens)
    engine.generate(texts[:batch_size], images[:batch_size], sampling)  # warm-up
    start = time.perf_counter()
    answers = engine.generate(texts, images, sampling)
    return Side(ids, answers, time.perf_counter() - start)


def vllm_side(model_path: Path, texts: list[str], images: list[Image.Image], max_new_tokens: int) -> Side:
    from stmed.model.build import checkpoint_chat

    # A release's processor bounds (Qwen2.5-VL: 12.8M pixels) make vLLM profile a huge image: more room.
    real = any(name in str(model_path) for name in REAL_LAYOUT)
    llm = vllm_engine(model_path, **({"gpu_memory_utilization": 0.15} if real else {}))
    params = vllm_greedy(llm, checkpoint_chat(str(model_path)), max_new_tokens)
    requests = [{"prompt": t, "multi_modal_data": {"image": im}} for t, im in zip(texts, images)]
    llm.generate(requests[:4], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    # The generated ids decoded as the HF engine decodes its own (vLLM's incremental detokenizer holds back
    # an incomplete UTF-8 sequence at the end, HF prints it as U+FFFD): answers then differ only by tokens.
    tokenizer = load_model(ModelConfig(name_or_path=str(model_path)))[1].tokenizer
    answers = [clean_output(tokenizer.decode(list(o.outputs[0].token_ids), skip_special_tokens=False), tokenizer)
               for o in outputs]
    return Side([list(o.prompt_token_ids) for o in outputs], answers, seconds)


def first_divergence(a: str, b: str) -> int:
    """The first word at which two answers differ."""
    wa, wb = a.split(), b.split()
    return next((i for i, (x, y) in enumerate(zip(wa, wb)) if x != y), min(len(wa), len(wb)))


def compare(preset: str, data: Path, questions: int, max_new_tokens: int, batch_size: int,
            root: Path) -> dict[str, Any]:  # fmt: skip
    examples = read_benchmark(data / "test.json")
    examples = (examples * (questions // len(examples) + 1))[:questions]
    model_path = export_preset(preset, root / preset)
    from stmed.model.build import checkpoint_chat

    chat = checkpoint_chat(str(model_path))
    texts = [prompts.answer_prompt(e.question + (CLOSED_SUFFIX if e.answer_type == "CLOSED" else ""), chat=chat)
             for e in examples]
    images = [load_image(data / "images" / e.image) for e in examples]
    hf = hf_side(model_path, texts, images, max_new_tokens, batch_size)
    vl = vllm_side(model_path, texts, images, max_new_tokens)
    same = [a == b for a, b in zip(hf.answers, vl.answers)]
    diverged = [first_divergence(a, b) for a, b, s in zip(hf.answers, vl.answers, same) if not s]
    return {"preset": preset, "questions": len(texts), "same_prompt_ids": sum(a == b for a, b in zip(hf.ids, vl.ids)),
            "agree": sum(same), "agreement": sum(same) / len(same),
            "diverged_at_word": sorted(diverged)[:10], "hf_questions_per_s": len(texts) / hf.seconds,
            "vllm_questions_per_s": len(texts) / vl.seconds,
            "example_disagreement": next(((a, b) for a, b, s in zip(hf.answers, vl.answers, same) if not s), None)}


def report(r: dict[str, Any]) -> str:
    line = (f"{r['preset']}: {r['questions']} questions, prompt ids identical {r['same_prompt_ids']}/{r['questions']}, "
            f"greedy answers agree {r['agree']}/{r['questions']} ({r['agreement']:.1%}); "
            f"HF {r['hf_questions_per_s']:.1f} q/s, vLLM {r['vllm_questions_per_s']:.1f} q/s")
    if r["example_disagreement"]:
        hf, vl = r["example_disagreement"]
        line += f"\n  disagreements diverge at word {r['diverged_at_word']}; e.g. HF {hf!r} vs vLLM {vl!r}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "tiny-qwen2.5-vl"])
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="HF engine batch (vLLM schedules its own)")
    parser.add_argument("--json", action="store_true", help="one JSON line per preset instead of text")
    args = parser.parse_args()
    if len(args.presets) > 1:
        # One process per preset: a vLLM engine does not give its reserved host memory back in-process.
        for preset in args.presets:
            command = [sys.executable, __file__, "--presets", preset, "--questions", str(args.questions),
                       "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
            subprocess.run(command + (["--json"] if args.json else []), check=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_dataset(root / "data", num_images=60, seed=0).root
        r = compare(args.presets[0], data, args.questions, args.max_new_tokens, args.batch_size, root)
        print(json.dumps(r) if args.json else report(r), flush=True)


if __name__ == "__main__":
    main()
