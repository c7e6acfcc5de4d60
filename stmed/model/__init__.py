"""The model: model families (``families/``: what differs between LLaVA-1.5, Qwen2.5-VL, …), building and
loading, LoRA groups, merge and export, the tokenizer, prompts and the chat templates, conversation
rendering and label masks, and HF generation. Imports nothing above it."""
