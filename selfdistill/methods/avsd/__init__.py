"""AVSD (arXiv 2605.20643; METHODS.md §4): the multi-view source and the consensus-plus-gated-residual combination."""
