"""dialsum_raw: FLAN-T5 dialogue summarization with a hand-written loop and a from-scratch LoRA."""

__version__ = "0.1.0"
