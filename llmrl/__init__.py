"""llmrl: reinforcement-learning post-training of LLMs, one readable loop (llmrl/loop.py) with
parts plugged in from registries (llmrl/registry.py). docs/architecture.md maps the seams."""

__version__ = "0.1.0"
