"""The model: building and loading, LoRA groups, merge and export, the tokenizer, prompts and the chat
template, conversation rendering and label masks, and HF generation. Imports nothing above it."""
