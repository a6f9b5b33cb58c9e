"""Built-in tasks with verifiable answers."""

from selfdistill.tasks.arithmetic import (
    DEFAULT_PROMPT_TEMPLATE,
    OPERATIONS,
    REFERENCE_TEMPLATE,
    arithmetic_reward,
    count_problems,
    extract_final_integer,
    make_arithmetic_dataset,
    with_reference_solution,
)

__all__ = [
    "DEFAULT_PROMPT_TEMPLATE",
    "OPERATIONS",
    "REFERENCE_TEMPLATE",
    "arithmetic_reward",
    "count_problems",
    "extract_final_integer",
    "make_arithmetic_dataset",
    "with_reference_solution",
]
