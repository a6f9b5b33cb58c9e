"""Multi-turn rollouts: the model talks to an environment, one reply per turn, until the episode ends.

An episode's token layout is the one the distillation loss needs. ``prompt_ids`` is the task prompt (with the
environment's first observation appended to its last user message, TRL's ``reset`` convention), rendered with the
chat template and a generation prompt. ``completion_ids`` is everything after it, in order: the model's reply
(sampled ids, EOS included), the chat-template text that closes that turn and carries the environment's answer as
the next user message up to the next generation prompt, the next reply, and so on. ``env_mask`` (TRL's name) is 1
on the tokens the model sampled and 0 on the environment's, so the loss covers only the model's own tokens.

Every id is exact: the student's context for turn k is ``prompt_ids + completion_ids`` so far, and the teacher
later scores the same ``completion_ids`` after its own context. Environment text is tokenised once, on its own;
it starts right after a special end-of-turn token, so no BPE merge crosses the seam.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from selfdistill.envs.base import Environment
from selfdistill.rollout import eos_ids, sample_completions, take_rows
from selfdistill.sequences import render_context
from selfdistill.sources.base import Prompt, append_user_text

EnvironmentFactory = Callable[[], Environment]

_USER_MARK = "\u2063USERMARK\u2063"
_REPLY_MARK = "\u2063REPLYMARK\u2063"


def with_observation(prompt: Prompt, observation: str) -> Prompt:
    """The prompt with the environment's first observation appended to its last user message."""
    return append_user_text(prompt, observation) if observation else prompt


class TurnTemplate:
    """The chat-template text between the end of one assistant reply and the start of the next.

    Found by rendering a probe conversation: for ChatML it is ``<|im_end|>`` ``\\n<|im_start|>user\\n{observation}
    <|im_end|>\\n<|im_start|>assistant\\n``. The end-of-turn token is dropped from the front when the model sampled
    it itself (its reply ended with EOS).
    """

    def __init__(self, tokenizer: Any):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("multi-turn rollouts need a tokenizer with a chat template; set tokenizer.chat_template")
        self.tokenizer = tokenizer
        probe = [{"role": "user", "content": "probe"}, {"role": "assistant", "content": _REPLY_MARK}]
        before = tokenizer.apply_chat_template(probe, tokenize=False)
        after = tokenizer.apply_chat_template(probe + [{"role": "user", "content": _USER_MARK}], tokenize=False,
                                              add_generation_prompt=True)
        if not after.startswith(before) or _REPLY_MARK not in before or after.count(_USER_MARK) != 1:
            raise ValueError(
                "the chat template re-renders earlier turns when a user message is added, so environment turns "
                "cannot be appended token-exactly; use a template that keeps earlier turns unchanged (e.g. ChatML)"
            )
        self.closer = before[before.index(_REPLY_MARK) + len(_REPLY_MARK):]  # e.g. "<|im_end|>\n"
        self.user_prefix, self.user_suffix = after[len(before):].split(_USER_MARK)
        self.eos_text = tokenizer.eos_token or ""

    def between(self, observation: str, reply_closed: bool) -> list[int]:
        """Ids after a reply and before the next one: the turn closer, the observation as a user turn, the
        generation prompt. ``reply_closed``: the reply already ends with the EOS token."""
        closer = self.closer
        if reply_closed and self.eos_text and closer.startswith(self.eos_text):
            closer = closer[len(self.eos_text):]
        text = closer + self.user_prefix + observation + self.user_suffix
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Episode:
    """One finished multi-turn rollout."""

    row: dict[str, Any]
    prompt: Prompt  # the student's context: the task prompt plus the first observation
    prompt_ids: list[int]
    completion_ids: list[int] = field(default_factory=list)  # replies and environment turns, in order
    env_mask: list[int] = field(default_factory=list)  # 1 where the model sampled the token, 0 for environment text
    messages: list[dict[str, str]] = field(default_factory=list)  # the conversation after the prompt
    reward: float = 0.0  # the environment's get_reward() at the end
    success: bool = False
    turns: int = 0
    invalid_actions: int = 0
    done: bool = False  # the environment ended the episode (False: cut by max_turns or the token budget)
    truncated_replies: int = 0  # replies cut at the per-turn token limit

    @property
    def agent_tokens(self) -> int:
        return sum(self.env_mask)

    def transcript(self) -> str:
        """The conversation after the prompt as plain text, one line per turn."""
        names = {"assistant": "You", "user": "Environment"}
        return "\n".join(f"{names.get(m['role'], m['role'])}: {m['content']}" for m in self.messages)


class EnvironmentFailure(RuntimeError):
    """An environment raised or hung during an episode; the message names the call, the turn and the task."""


def _env_call(func: Any, what: str, row: dict[str, Any], turn: int, timeout: float | None, *args: Any,
              **kwargs: Any) -> Any:
    from selfdistill.rollout import _call

    owner = getattr(func, "__self__", None)
    name = type(owner).__name__ if owner is not None else getattr(func, "__name__", type(func).__name__)
    try:
        return _call(lambda: func(*args, **kwargs), timeout, {}, setting="env_timeout", error=TimeoutError)
    except Exception as err:
        task = {k: v for k, v in row.items() if k != "prompt"}
        raise EnvironmentFailure(
            f"environment {name}: {what} failed at turn {turn} ({type(err).__name__}: {err}) on the task "
            f"{str(task)[:200]}. Fix the environment's {what} (it must not raise on any reply the model can write: "
            "report a bad reply as an invalid action instead), or raise env_timeout if it is only slow."
        ) from err


@torch.no_grad()
def run_episodes(
    model: Any,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    env_factory: EnvironmentFactory,
    *,
    pad_id: int,
    eos: Sequence[int],
    max_new_tokens: int,
    max_turns: int | None = None,
    max_episode_length: int = 1024,
    do_sample: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    template: TurnTemplate | None = None,
    env_timeout: float | None = None,
) -> list[Episode]:
    """Play one episode per row, all rows in lock-step: each turn is one batched ``generate`` over the episodes
    still running.

    Args:
        rows: dataset rows; ``prompt`` is the task, the other fields go to ``env.reset(**fields)``.
        env_factory: builds one fresh environment per row.
        max_new_tokens: the per-reply token limit.
        max_turns: stop after this many replies (default: the environment's own ``max_turns``).
        max_episode_length: cap on ``len(completion_ids)``; an episode that would exceed it on its next turn stops.
        env_timeout: seconds each environment call (construction, reset, step, reward) may take.

    An environment that raises or exceeds ``env_timeout`` stops the rollout with :class:`EnvironmentFailure`, which
    names the environment, the call, the turn and the task.
    """
    template = template or TurnTemplate(tokenizer)
    eos_set = set(eos)
    episodes, envs = [], []
    for row in rows:
        task = {k: v for k, v in row.items() if k != "prompt"}
        env = _env_call(env_factory, "construction", row, 0, env_timeout)
        prompt = with_observation(row["prompt"], _env_call(env.reset, "reset", row, 0, env_timeout, **task))
        episodes.append(Episode(row=dict(row), prompt=prompt, prompt_ids=render_context(tokenizer, prompt)))
        envs.append(env)
    limit = max_turns or max(env.max_turns for env in envs)
    active = list(range(len(rows)))
    while active:
        contexts = [episodes[i].prompt_ids + episodes[i].completion_ids for i in active]
        generated = sample_completions(model, contexts, pad_id=pad_id, eos=eos, max_new_tokens=max_new_tokens,
                                       do_sample=do_sample, temperature=temperature, top_p=top_p, top_k=top_k)
        still = []
        for i, reply, cut in zip(active, generated.completion_ids, generated.truncated):
            episode, env = episodes[i], envs[i]
            episode.completion_ids += reply
            episode.env_mask += [1] * len(reply)
            episode.turns += 1
            episode.truncated_replies += int(cut)
            text = tokenizer.decode(reply, skip_special_tokens=True).strip()
            episode.messages.append({"role": "assistant", "content": text})
            result = _env_call(env.step, "step", episode.row, episode.turns, env_timeout, text)
            episode.invalid_actions += int(not result.valid)
            episode.done = result.done
            closed = bool(reply) and reply[-1] in eos_set
            between = [] if result.done else template.between(result.observation, closed)
            budget_left = max_episode_length - len(episode.completion_ids) - len(between) - max_new_tokens
            if result.done or episode.turns >= limit or budget_left < 0:
                episode.reward = float(_env_call(env.get_reward, "get_reward", episode.row, episode.turns,
                                                 env_timeout))
                episode.success = env.success
                if result.done:
                    episode.messages.append({"role": "user", "content": result.observation})
                continue
            episode.completion_ids += between
            episode.env_mask += [0] * len(between)
            episode.messages.append({"role": "user", "content": result.observation})
            still.append(i)
        active = still
    return episodes


def episode_stats(episodes: Sequence[Episode]) -> dict[str, float]:
    """Success rate, mean reward, turns, invalid-action rate, the model's tokens and unfinished episodes."""
    count = max(len(episodes), 1)
    turns = sum(e.turns for e in episodes)
    return {
        "success": sum(e.success for e in episodes) / count,
        "mean_reward": sum(e.reward for e in episodes) / count,
        "turns": float(turns),
        "mean_turns": turns / count,
        "invalid_action_rate": sum(e.invalid_actions for e in episodes) / max(turns, 1),
        "mean_agent_tokens": sum(e.agent_tokens for e in episodes) / count,
        "unfinished": float(sum(not e.done for e in episodes)),
    }


@torch.no_grad()
def evaluate_env(
    model: Any,
    tokenizer: Any,
    dataset: Any,
    env_factory: EnvironmentFactory,
    *,
    n: int | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 32,
    max_turns: int | None = None,
    max_episode_length: int = 1024,
    desc: str = "eval",
    progress: bool = True,
    env_timeout: float | None = 60.0,
    **_: Any,
) -> dict[str, Any]:
    """Greedy success rate of ``model`` on the environment tasks of ``dataset``.

    The result uses the same keys as :func:`selfdistill.evaluation.evaluate` (``greedy_accuracy`` is the success
    rate here), so learning curves and summaries treat both alike.
    """
    rows = take_rows(dataset, n)
    was_training = model.training
    model.eval()
    eos = eos_ids(model, tokenizer)
    template = TurnTemplate(tokenizer)
    start = time.perf_counter()
    episodes: list[Episode] = []
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, unit="episode")
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            episodes += run_episodes(model, tokenizer, chunk, env_factory, pad_id=tokenizer.pad_token_id, eos=eos,
                                     max_new_tokens=max_new_tokens, max_turns=max_turns,
                                     max_episode_length=max_episode_length, do_sample=False, template=template,
                                     env_timeout=env_timeout)
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    stats = episode_stats(episodes)
    return {
        "n": len(episodes),
        "greedy_accuracy": stats["success"],
        "mean_reward": stats["mean_reward"],
        "mean_turns": stats["mean_turns"],
        "invalid_action_rate": stats["invalid_action_rate"],
        "mean_completion_tokens": stats["mean_agent_tokens"],
        "seconds": time.perf_counter() - start,
        "samples": [{"prompt": e.prompt, "transcript": e.transcript(), "success": e.success} for e in episodes[:3]],
    }
