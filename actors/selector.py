"""The selector in the generate stream: rates each new answer pair before the judge and labels the pairs it
is sure of (selective judging, ``stmed.selection.selective``).

    ds.map_batches(PairSelector, fn_constructor_kwargs={"settings": cfg.selective, "image_root": root},
                   compute=ActorPoolStrategy(size=1), batch_format="numpy")

The constructor loads what ``jobs.select`` trained on: the policy named in its ``config.yaml`` (frozen: the
features must come from the model the head was trained on, not from this round's generator) and
``head.safetensors`` with its judge-scale line. ``__call__`` adds ``labelled_by`` and ``selector_margin`` to
every row and, to the pairs it labels, the verdict columns; ``KeptPairJudge`` then judges only the rows whose
``labelled_by`` is ``judge``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.judge import VERDICT_COLUMNS
from stmed.config import ModelConfig, build_config, read_yaml
from stmed.log import get_logger
from stmed.model.build import load_model
from stmed.selection.features import extract_features
from stmed.selection.head import head_extra, load_head, rate
from stmed.selection.pairs import Answer
from stmed.selection.selective import JUDGE, SELECTOR, SelectiveSettings, selector_verdict, to_judge
from stmed.selection.train import HEAD_FILE
from stmed.selfplay.preferences import OK

log = get_logger(__name__)


class PairSelector:
    """Ray Data callable: selector margins and routing for a batch of generated rows."""

    def __init__(self, settings: SelectiveSettings | dict[str, Any], image_root: str):
        self.settings = settings if isinstance(settings, SelectiveSettings) else build_config(SelectiveSettings,
                                                                                              settings)
        folder = Path(self.settings.select_dir or "")
        if not (folder / HEAD_FILE).is_file():
            raise FileNotFoundError(f"selective.select_dir: no {HEAD_FILE} in {folder} (run jobs.select first)")
        trained = read_yaml(folder / "config.yaml")
        self.max_length = int(trained.get("train", {}).get("max_length", 1024))
        self.model, self.processor = load_model(build_config(ModelConfig, trained["model"]))
        self.model.requires_grad_(False)
        self.head = load_head(folder / HEAD_FILE)
        scale = head_extra(folder / HEAD_FILE).get("judge_scale")
        if not scale:
            raise ValueError(f"selective.select_dir: {folder / HEAD_FILE} has no judge scale; rerun jobs.select")
        self.scale = (float(scale[0]), float(scale[1]))
        self.image_root = image_root

    def margins(self, rows: list[dict[str, Any]]) -> list[tuple[float, float] | None]:
        """Each row's two selector scores, or None where an answer could not be rated."""
        answers = [(Answer.of(r["image_path"], r["question"], r["answer1"]),
                    Answer.of(r["image_path"], r["question"], r["answer2"])) for r in rows]  # fmt: skip
        flat = list({a.answer_id: a for pair in answers for a in pair}.values())
        features, _ = extract_features(self.model, self.processor, flat, self.image_root, self.max_length)
        rated = {}
        if features:
            ids = list(features)
            rated = dict(zip(ids, rate(self.head, torch.stack([features[i] for i in ids])).tolist()))
        return [(rated[a.answer_id], rated[b.answer_id]) if a.answer_id in rated and b.answer_id in rated else None
                for a, b in answers]  # fmt: skip

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(batch)
        rows = [{name: batch[name][i] for name in names} for i in range(len(batch[names[0]]))] if names else []
        ok = [i for i, r in enumerate(rows) if r["status"] == OK]
        scores = self.margins([rows[i] for i in ok])
        judged = to_judge([None if s is None else s[0] - s[1] for s in scores], self.settings)
        for row in rows:
            row.update({"labelled_by": None, "selector_margin": None, **dict.fromkeys(VERDICT_COLUMNS)})
        for i, s, to_the_judge in zip(ok, scores, judged):
            rows[i]["labelled_by"] = JUDGE if to_the_judge else SELECTOR
            rows[i]["selector_margin"] = None if s is None else s[0] - s[1]
            if not to_the_judge:
                verdict = selector_verdict(rows[i]["pair_id"], s[0], s[1], self.scale)
                rows[i].update({k: verdict[k] for k in VERDICT_COLUMNS})
        if ok:
            log.info("selector: %d of %d pairs to the judge", sum(judged), len(ok))
        out = {name: np.array([r[name] for r in rows], dtype=batch[name].dtype) for name in names}
        for name in ("labelled_by", "selector_margin", *VERDICT_COLUMNS):
            out[name] = np.array([r[name] for r in rows], dtype=object)
        return out
