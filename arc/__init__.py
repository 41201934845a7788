"""An ARC abstract-reasoning solver built on a small GPT/Mamba hybrid language model trained from scratch."""
