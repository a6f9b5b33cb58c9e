"""SD-Zero (arXiv 2604.12002; METHODS.md §3): the reviser source and self-revision training (phase 1)."""
