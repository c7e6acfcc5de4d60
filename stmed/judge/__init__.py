"""The judge: its prompt and reply parsing, the async client with pacing and a reply cache, and the
offline reference judge with its grading rules. Builds on ``stmed.model`` and ``stmed.data``."""
