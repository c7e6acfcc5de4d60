"""Selective judging in the generate stream: the PairSelector rates each pair with a jobs.select head and
routes it; KeptPairJudge then pays only for the pairs routed to the judge."""

from __future__ import annotations

import asyncio
import json

import httpx
import yaml

from actors.generator import KeptPairJudge, to_columns
from actors.selector import PairSelector
from stmed.data.images import image_to_data_url, load_image
from stmed.data.synthetic import make_dataset
from stmed.judge.judging import JudgeSettings
from stmed.model.build import build_tiny
from stmed.selection.features import feature_dim
from stmed.selection.head import SelectionHead, save_head
from stmed.selection.selective import SELECTOR_MODEL, SelectiveSettings, to_judge
from stmed.selfplay.preferences import make_row


def test_to_judge_sends_the_most_uncertain_share_or_those_below_the_threshold():
    margins = [3.0, -0.1, None, 0.5, -2.0]
    assert to_judge(margins, SelectiveSettings(judge_share=0.5)) == [False, True, True, True, False]
    assert to_judge(margins, SelectiveSettings(judge_share=0.0)) == [False, False, True, False, False]
    assert to_judge(margins, SelectiveSettings(judge_share=None, margin_threshold=1.0)) == \
        [False, True, True, True, False]  # fmt: skip


def test_the_selector_labels_the_sure_pairs_and_the_judge_pays_only_for_the_rest(tmp_path):
    data = make_dataset(tmp_path / "data", num_images=4, seed=0)
    images = sorted(data.images.glob("*.png"))
    policy, processor = build_tiny(seed=0)
    policy.save_pretrained(tmp_path / "policy")
    processor.save_pretrained(tmp_path / "policy")
    select = tmp_path / "select"
    select.mkdir()
    (select / "config.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": str(tmp_path / "policy")},
                                                        "train": {"max_length": 256}}))  # fmt: skip
    save_head(SelectionHead(feature_dim(policy), hidden=8, layers=2), select / "head.safetensors",
              {"judge_scale": [1.0, 5.0]})  # fmt: skip
    url = image_to_data_url(load_image(images[0]))
    answers = [("Left.", "Right."), ("Yes.", "No, the scan is normal."), ("A lesion.", "Nothing."),
               ("The liver.", "The brain.")]  # fmt: skip
    rows = [make_row(p.name, str(p), index=0, question="Which side?", question_seed=i, answers=answers[i],
                     seeds=(1, 2), image_data_url=url, gate=("passed", 0, "d")) for i, p in enumerate(images)]
    rows.append(make_row("x", str(images[0]), "image_error", "file not found"))
    selector = PairSelector({"select_dir": str(select), "judge_share": 0.5}, str(data.images))
    routed = selector(to_columns(rows))
    by = [routed["labelled_by"][i] for i in range(len(rows))]
    assert sorted(by[:4]) == ["judge", "judge", "selector", "selector"] and by[4] is None
    for i in range(4):
        if by[i] == "selector":
            assert routed["judge_model"][i] == SELECTOR_MODEL and 0.0 <= routed["score1"][i] <= 10.0
            assert 0.0 <= routed["score2"][i] <= 10.0 and routed["selector_margin"][i] is not None
            assert routed["error"][i] is None and routed["attempts"][i] == 0
    sent = []

    def reply(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        return httpx.Response(200, json={
            "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "7 3\nok"}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105}})  # fmt: skip

    judge = KeptPairJudge(JudgeSettings(base_url="http://127.0.0.1:9/v1", model="m"),
                          http_client=httpx.AsyncClient(transport=httpx.MockTransport(reply)))  # fmt: skip
    out = asyncio.run(judge(routed))
    got = {out["pair_id"][i]: {k: out[k][i] for k in out} for i in range(len(out["pair_id"]))}
    assert len(sent) == 2  # only the two uncertain pairs were paid for
    for i, row in enumerate(rows[:4]):
        verdict = got[row["pair_id"]]
        assert verdict["labelled_by"] == by[i]
        if by[i] == "judge":
            assert (verdict["score1"], verdict["score2"]) == (7.0, 3.0) and verdict["judge_model"] == "m"
        else:
            assert verdict["judge_model"] == SELECTOR_MODEL and verdict["score1"] == routed["score1"][i]
