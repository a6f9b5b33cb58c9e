"""Skill-SD (arXiv 2604.10674; METHODS.md §5): the skill source and its skill bank."""
