"""The privileged-information (PI) source interface.

A source turns a batch of finished rollouts into teacher contexts. For every rollout it returns one or more
:class:`TeacherView` objects: the teacher's context (the task plus the privileged information, as chat messages
or a raw string) that the trainer tokenises and splices in front of the rollout's exact completion ids. With one
view per rollout the views are used as they are; several views per rollout are combined by the source's
``combine`` rule. A stateful source (e.g. a skill bank) observes finished rollouts and saves its state with each
checkpoint.

Adding a method means writing one subclass of :class:`PrivilegedSource` in this package.
"""

from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

Messages = list[dict[str, Any]]
Prompt = Messages | str


@dataclass
class TeacherView:
    """One teacher context for one rollout.

    Attributes:
        context: chat messages (rendered with the tokenizer's chat template and a generation prompt, the same way
            the student's prompt is) or a raw string used as is.
        pi: the privileged text inside ``context``. When the teacher sequence is too long, the trainer shortens this
            text (never the completion) and counts the truncation; ``None`` means the view cannot be shortened.
        name: the view's name, used in metrics (``full_solution``, ``answer_only``, ...).
        completion_ids: the ids the teacher scores; ``None`` means the rollout's own completion ids (the usual case).
        continuation: segments appended after the rendered context, in order: a list of ids is spliced as is (never
            re-tokenised, e.g. the rollout's own tokens for a reviser), a string is tokenised without special tokens
            (e.g. a cue). Empty for a plain prompt-plus-PI view.
        tag: opaque to the trainer and handed back to :meth:`PrivilegedSource.feedback` with the view's outcome
            (e.g. the ids of the skills it showed).
        trains: ``False`` when the view carries no privileged information for this rollout (SDPO's rollout without
            a successful sibling): a rollout none of whose views trains leaves the distillation loss and its
            token count (the normaliser), as a row without a demonstration leaves the paper's loss. The GRPO term,
            when on, still covers it.
    """

    context: Prompt
    pi: str | None = None
    name: str = "teacher"
    completion_ids: list[int] | None = None
    continuation: list[list[int] | str] = field(default_factory=list)
    tag: Any = None
    trains: bool = True


@dataclass
class Rollout:
    """A finished rollout as a source sees it."""

    row: dict[str, Any]  # the dataset row it was sampled for
    prompt: Prompt  # the student's context
    completion: str  # decoded completion text (special tokens removed)
    completion_ids: list[int]  # the exact sampled ids, EOS included when sampled
    reward: float | None = None  # summed weighted reward, when reward functions are given
    group: int = 0  # index of its prompt within the generation batch (its G siblings share it)
    finished: bool = True  # ended with an EOS token (the last id); False when cut at max_completion_length
    extras: dict[str, Any] = field(default_factory=dict)


class PrivilegedSource(ABC):
    """Builds the teacher's privileged contexts for a batch of rollouts."""

    #: How several views of one rollout become one target ("identity" requires exactly one view).
    combine: str = "identity"
    #: Dataset columns the source reads; checked against the dataset before training starts.
    required_columns: tuple[str, ...] = ()
    #: Whether the source needs rewards (then the trainer requires reward functions).
    needs_rewards: bool = False
    #: Whether the source writes text with the model (it is then given ``generate`` through :meth:`attach`).
    needs_generation: bool = False
    #: The method's paper, for the model card: {"name": ..., "title": ..., "id": arXiv id}.
    paper: dict[str, str] = {}

    @abstractmethod
    def views(self, rollouts: Sequence[Rollout]) -> list[list[TeacherView]]:
        """One list of teacher views per rollout, in rollout order."""

    def observe(self, rollouts: Sequence[Rollout]) -> None:  # noqa: B027 - optional hook
        """Called with every finished batch; stateful sources update themselves here."""

    def attach(self, generate: Any) -> None:  # noqa: B027 - optional hook
        """Given ``generate(prompts, max_new_tokens) -> list[str]`` (greedy, the current student weights) by the
        trainer when ``needs_generation`` is set."""

    def feedback(self, tags: Sequence[Any], signals: Sequence[dict[str, float]]) -> None:  # noqa: B027
        """After the loss of a micro-batch: each view's ``tag`` with its rollout's ``reward``, ``advantage`` (GRPO's:
        the reward minus its group's mean, scaled per ``scale_rewards``; None without rewards) and ``logp_gap``
        (mean log p_T(y_t) - log p_S(y_t) over the scored tokens)."""

    def metrics(self) -> dict[str, float]:
        """Numbers about the source's state, logged after each generation batch."""
        return {}

    #: How many of a rollout's views (the first ones) are contexts the teacher should be measured generating under
    #: (``selfdistill diagnose``); ``None``: all. RLCSD's wrong hints are not: only its correct hint is.
    diagnosed_views: int | None = None

    #: ``True`` for a source whose teacher views reshape the GRPO term's per-token advantages (RLCSD) through
    #: :meth:`shape_advantages`; the trainer then runs the teacher pass even with ``distill_weight=0``.
    shapes_advantages: bool = False

    def shape_advantages(self, advantages: Any, view_logp: Any, view_trains: Any) -> Any:
        """Per-token advantages from the teacher's log-probs of the sampled tokens (``view_logp`` ``[M, N]``, no
        grad) and each token's rollout advantage (``advantages`` ``[N]``); ``view_trains`` ``[M, N]`` marks the views
        that are real for each token's rollout. Returns an object with ``advantages`` ``[N]``, ``scale`` ``[N]`` (each
        token's loss weight) and ``metrics`` (see selfdistill.methods.rlcsd.Contrast)."""
        raise NotImplementedError(f"{type(self).__name__} sets shapes_advantages but has no shape_advantages")

    def token_losses(self, student_logits: Any, view_logits: Any, tokens: Any, spec: Any, view_names: Sequence[str],
                     old_logps: Any = None) -> tuple[Any, dict[str, float]]:
        """The per-token distillation loss of a micro-batch and its metrics: ``student_logits`` ``[N, V]`` (with
        grad), ``view_logits`` ``[M, N, V]`` (one slice per view, no grad), the sampled ``tokens`` ``[N]``.

        The default scores the one view with :func:`selfdistill.losses.token_losses`; a multi-view source
        (``combine != "identity"``) overrides it with its combination rule (AVSD: selfdistill.methods.avsd.combine)."""
        from selfdistill.losses import summarize
        from selfdistill.losses import token_losses as single_view_losses

        per_token = single_view_losses(student_logits, view_logits[0], tokens, spec, old_logps=old_logps)
        return per_token, summarize(per_token)

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state saved with each checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restores :meth:`state_dict` when training resumes."""

    def check_dataset(self, column_names: Sequence[str]) -> None:
        """Raises a clear error when a column this source reads is missing."""
        for column in self.required_columns:
            if column not in column_names:
                close = difflib.get_close_matches(column, list(column_names), n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise KeyError(
                    f"column {column!r} missing from the dataset; {type(self).__name__} reads it.{hint} Set the "
                    f"source's column name to one of: {', '.join(map(repr, column_names))}"
                )


def with_user_text(prompt: Prompt, text: str) -> Prompt:
    """The student's prompt with its last user message replaced by ``text`` (a string prompt becomes ``text``).

    System messages and earlier turns are kept, so both sides share the same template and history.
    """
    if isinstance(prompt, str):
        return text
    messages = [dict(m) for m in prompt]
    for message in reversed(messages):
        if message.get("role") == "user":
            message["content"] = text
            return messages
    raise ValueError("the prompt has no user message to attach the privileged information to")


def append_user_text(prompt: Prompt, text: str, separator: str = "\n\n") -> Prompt:
    """The prompt with ``separator + text`` appended to its last user message (or to a string prompt)."""
    if isinstance(prompt, str):
        return f"{prompt}{separator}{text}"
    messages = [dict(m) for m in prompt]
    for message in reversed(messages):
        if message.get("role") == "user":
            message["content"] = f"{message['content']}{separator}{text}"
            return messages
    raise ValueError("the prompt has no user message to append to")


def user_text(prompt: Prompt) -> str:
    """The task text: the last user message of a chat prompt, or the prompt string itself."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):  # multimodal-style content parts
                return "".join(part.get("text", "") for part in content if isinstance(part, dict))
            return str(content)
    raise ValueError("the prompt has no user message")


#: The built-in source types by the name recipes use (``source.type``), as import paths: a source that names
#: another (AVSD's views) looks it up here without importing every method first.
BUILTIN_SOURCES: dict[str, str] = {
    "reference": "selfdistill.methods.opsd.ReferenceSolution",
    "reviser": "selfdistill.methods.sdzero.source.Reviser",
    "multiview": "selfdistill.methods.avsd.source.MultiView",
    "skills": "selfdistill.methods.skillsd.source.Skills",
    "contrastive": "selfdistill.methods.rlcsd.ContrastiveHints",
}


def builtin_source(name: str) -> type[PrivilegedSource]:
    """The class of built-in source ``name`` (a key of :data:`BUILTIN_SOURCES`)."""
    from selfdistill.dotted import import_dotted

    return import_dotted(BUILTIN_SOURCES[name], "source type")
