"""Serving: the VQA endpoint's HTTP contract (limits, parsing, answers, error shapes) and its client.
The top layer: may use every package below it."""
