"""Before training: does the task meet the premises the method rests on? (``selfdistill diagnose``; docs/diagnose.md)

Self-distillation teaches the student what the teacher does better. On a few hundred rollouts of the recipe's own
model, data and source, this measures whether there is anything to teach, and whether it can be taught:

- the **PI gap**: the student's reward (greedy and sampled) against the reward of the teacher *generating under its
  own context* (the task plus the privileged information). No gap, no signal;
- the **signal**: the mean per-token reverse KL from the student to the teacher on the student's own rollouts, and
  the share of tokens that carry 80% of it (how dense the signal is);
- **focus**: where the divergence sits, when the answers spell numbers: its share on the tokens that spell digits
  against those tokens' share (a teacher that differs from the student mostly in wording teaches its style, unless
  that wording is a form the student computes better in: its reward when its reply starts with the teacher's form),
  and at the student's own stops after a right answer the probability each model gives that stop;
- **stops**: with a teacher that follows the student (``live``, ``ema``, ``sync``), whether the teacher is as ready
  as the student to stop after a right answer (one less ready teaches the student to write on, and then follows it);
- **room**: the share of student and teacher generations cut at ``max_completion_length``, their lengths, and the
  share of the teacher's successful answers that would not fit (a run whose divergence falls while its reward stays
  at zero is predicted here);
- per method: SD-Zero's revision rates (wrong -> right, right -> right); each AVSD view's own teacher reward and the
  pairwise JSD between views on the student's tokens; Skill-SD's teacher reward with the bank's skills against
  without them.

Every premise ends in a verdict (``holds`` / ``fails`` / ``unknown``) against the thresholds in :data:`THRESHOLDS`,
which docs/diagnose.md justifies with the measured gains of benchmarks/premises.py.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from selfdistill.rollout import eos_ids, sample_completions, sampling_precision, take_rows, verify_completions
from selfdistill.sequences import (
    _plain_head,
    render_context,
    score_completions,
    splice,
    teacher_contexts,
)
from selfdistill.sources.base import PrivilegedSource, Rollout, user_text

#: Verdict thresholds (docs/diagnose.md says where each comes from).
THRESHOLDS: dict[str, float] = {
    "pi_gap": 0.10,  # teacher reward - student sampled reward
    "signal_kl": 0.02,  # mean reverse KL, nats per student token
    "teacher_cut": 0.20,  # share of the teacher's successful answers longer than max_completion_length
    "student_cut": 0.50,  # share of student rollouts cut at max_completion_length
    "revision": 0.25,  # SD-Zero: share of wrong answers the reviser turns right
    "view_ceiling": 0.95,  # AVSD: a single view this good leaves the consensus nothing to add
    "skill_gap": 0.10,  # Skill-SD: teacher reward with skills - without
    "blind_gap": 0.10,  # rows with options: teacher reward - the best rule that ignores the problem
    "digit_focus": 1.5,  # digit share of the divergence / digit share of the tokens (answers that spell numbers)
    "digit_tokens": 0.02,  # below this share of digit tokens in the rollouts, `focus` has nothing to read
    "form_gain": 0.10,  # `focus`: the student's greedy reward in the teacher's form - its own
    "stop_gap": 0.03,  # a teacher that follows the student: p(stop) student - teacher after a right answer
}

#: Teacher policies whose weights follow the student's: what the student picks up, the teacher shows it again.
FOLLOWING_TEACHERS = ("live", "ema", "sync")


@dataclass
class _Batch:
    rows: list[dict[str, Any]]
    prompts: list[Any]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    truncated: list[bool]
    rewards: list[float | None]
    texts: list[str]
    masks: list[list[int]] | None = None  # the model's own tokens of an episode


def _mean(values: Sequence[float | None]) -> float | None:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return statistics.mean(finite) if finite else None


def _success(values: Sequence[float | None], threshold: float) -> float | None:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return sum(v >= threshold for v in finite) / len(finite) if finite else None


_NUMBER = re.compile(r"\d+")


def shows_work(answer: str, prompt: Any) -> bool:
    """Whether ``answer`` writes the problem out before its result: it names at least two distinct numbers of the
    task before its last number ("73 + 99 = 172" does; "The answer is 172." and "172 is one of the two: 172" do not)."""
    given = set(_NUMBER.findall(user_text(prompt)))
    said = _NUMBER.findall(answer)
    return len({n for n in said[:-1] if n in given}) >= 2


def _work_share(texts: Sequence[str], rows: Sequence[dict[str, Any]]) -> float | None:
    """The share of ``texts`` that :func:`shows_work` for their rows' tasks (``None`` without texts)."""
    pairs = [(t, r.get("prompt", "")) for t, r in zip(texts, rows)]
    return sum(shows_work(t, p) for t, p in pairs) / len(pairs) if pairs else None


def _lengths(ids: Sequence[Sequence[int]], cut: Sequence[bool]) -> dict[str, Any]:
    n = [len(x) for x in ids]
    if not n:
        return {}
    qs = statistics.quantiles(n, n=10) if len(n) > 1 else [n[0]] * 9
    return {"mean": statistics.mean(n), "p10": qs[0], "p50": statistics.median(n), "p90": qs[-1], "max": max(n),
            "cut_share": sum(cut) / len(cut)}


def reverse_kl(student_logp: torch.Tensor, teacher_logp: torch.Tensor) -> torch.Tensor:
    """``[T]`` KL(student || teacher) per position over the whole vocabulary, from ``[T, V]`` log-probabilities."""
    return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)


def jensen_shannon(a_logp: torch.Tensor, b_logp: torch.Tensor) -> torch.Tensor:
    """``[T]`` Jensen-Shannon divergence (nats) per position between two ``[T, V]`` log-distributions."""
    mix = torch.logsumexp(torch.stack([a_logp, b_logp]), 0) - math.log(2)
    return 0.5 * (reverse_kl(a_logp, mix) + reverse_kl(b_logp, mix))


def dense_share(values: torch.Tensor, mass: float = 0.8) -> float | None:
    """The smallest share of positions whose values sum to ``mass`` of the total (negatives count as 0): near 1 when
    the signal is spread over every token, near 0 when a few tokens carry it."""
    if values.numel() == 0:
        return None
    ordered = values.clamp_min(0).sort(descending=True).values
    total = float(ordered.sum())
    if total <= 0:
        return 0.0
    cum = ordered.cumsum(0)
    carry = int((cum < mass * total * (1 - 1e-9)).sum()) + 1
    return min(carry, values.numel()) / values.numel()


#: Greedy generations kept in diagnosis.json per role (the table prints the first).
EXAMPLES = 3


class Diagnosis:
    """Measures one source's premises with a model; :meth:`run` returns the report (``diagnosis.json``'s content)."""

    def __init__(self, model: Any, tokenizer: Any, rows: Sequence[dict[str, Any]], source: PrivilegedSource,
                 reward_funcs: Sequence[Callable], *, max_completion_length: int, temperature: float = 1.0,
                 top_p: float = 1.0, samples: int = 4, threshold: float = 0.5, teacher_rollouts: int = 64,
                 max_teacher_length: int | None = None, env_factory: Callable | None = None,
                 max_turns: int | None = None, batch_size: int = 64, progress: bool = True,
                 teacher_policy: str | None = None):
        self.model, self.tokenizer, self.rows, self.source = model, tokenizer, list(rows), source
        self.teacher_policy = teacher_policy
        self.reward_funcs = list(reward_funcs)
        self.limit, self.temperature, self.top_p = max_completion_length, temperature, top_p
        self.samples, self.threshold, self.teacher_rollouts = samples, threshold, teacher_rollouts
        self.max_teacher_length = max_teacher_length or getattr(model.config, "max_position_embeddings", 2048)
        self.env_factory, self.max_turns, self.batch_size = env_factory, max_turns, batch_size
        self.eos = eos_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id
        self.bar = tqdm(total=6, desc="diagnose", disable=not progress, unit="stage")
        self._student_greedy: list[float | None] | None = None  # the student's greedy rewards, by row

    # ------------------------------------------------------------------------------------------ generation
    def _complete(self, prompt_ids, *, greedy: bool, max_new_tokens: int) -> tuple[list[list[int]], list[bool]]:
        """The model's completions of ``prompt_ids`` in batches of ``batch_size``, and which were cut at the limit."""
        ids, cut = [], []
        for i in range(0, len(prompt_ids), self.batch_size):
            out = sample_completions(self.model, prompt_ids[i : i + self.batch_size], pad_id=self.pad, eos=self.eos,
                                     max_new_tokens=max_new_tokens, do_sample=not greedy,
                                     temperature=self.temperature, top_p=self.top_p)
            ids += out.completion_ids
            cut += out.truncated
        return ids, cut

    def _generate(self, rows, prompts, prompt_ids, *, greedy: bool, max_new_tokens: int) -> _Batch:
        if self.env_factory is not None:
            return self._episodes(rows, prompts, greedy=greedy)
        ids, cut = self._complete(prompt_ids, greedy=greedy, max_new_tokens=max_new_tokens)
        verified = verify_completions(self.tokenizer, self.reward_funcs, [1.0] * len(self.reward_funcs), prompts,
                                      ids, rows)
        return _Batch(list(rows), list(prompts), list(prompt_ids), ids, cut, verified.rewards, verified.texts)

    def _episodes(self, rows, prompts, *, greedy: bool) -> _Batch:
        from selfdistill.agent import run_episodes

        played = []
        for i in range(0, len(rows), self.batch_size):
            chunk = [{**row, "prompt": prompt} for row, prompt in zip(rows[i : i + self.batch_size],
                                                                      prompts[i : i + self.batch_size])]
            played += run_episodes(self.model, self.tokenizer, chunk, self.env_factory, pad_id=self.pad,
                                   eos=self.eos, max_new_tokens=self.limit, max_turns=self.max_turns,
                                   do_sample=not greedy, temperature=self.temperature, top_p=self.top_p)
        return _Batch(list(rows), [e.prompt for e in played], [e.prompt_ids for e in played],
                      [e.completion_ids for e in played], [e.truncated_replies > 0 for e in played],
                      [e.reward for e in played], [e.transcript() for e in played], [e.env_mask for e in played])

    # -------------------------------------------------------------------------------------------- scoring
    @torch.no_grad()
    def _logprobs(self, contexts: list[list[int]], completions: list[list[int]],
                  masks: list[list[int]]) -> list[torch.Tensor]:
        """Per rollout, ``[K, V]`` float32 log-probabilities predicting its ``K`` kept completion tokens (``masks``:
        1 where the token is the model's own; an episode's observations are 0). The head runs on the kept positions
        only (an episode's transcript is mostly observations) when applying it by hand gives the model's logits; a
        head with a logit transform after it (Gemma's soft-capping) takes the model's own logits instead."""
        out: list[torch.Tensor | None] = [None] * len(contexts)
        step = max(1, self.batch_size // 4)
        head = _plain_head(self.model)
        # Batched in context order, so that rows sharing a beginning (a prompt's samples; the teacher's prompt and
        # privileged text) sit together and that prefix runs once, as the trainer's passes run it
        # (score_completions); in the rollouts' own order (rollout j is prompt j % n's) no two rows of a batch
        # would share more than the system prompt.
        order = sorted(range(len(contexts)), key=lambda i: list(contexts[i]))
        for i in range(0, len(order), step):
            chunk = order[i : i + step]
            batch = splice([contexts[j] for j in chunk], [completions[j] for j in chunk], self.pad)
            scores = score_completions(self.model, batch, [contexts[j] for j in chunk], share_prefix=True, head=head)
            for k, j in enumerate(chunk):
                keep = torch.tensor(masks[j], dtype=torch.bool, device=scores.device)
                kept = scores[k, : len(masks[j])][keep]
                logits = (kept if head is None else head(kept)).float()
                if not torch.isfinite(logits).all():
                    raise FloatingPointError("the model produced NaN/inf logits while diagnosing; check the model's "
                                             "weights and dtype (bf16 weights overflow more easily than float32)")
                out[j] = torch.log_softmax(logits, dim=-1)
        return out

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        start = time.perf_counter()
        tok, rows = self.tokenizer, self.rows
        prompts = [r["prompt"] for r in rows]
        prompt_ids = [render_context(tok, p) for p in prompts]
        was_training = self.model.training
        self.model.eval()
        try:
            self.bar.set_postfix_str("student greedy")
            greedy = self._generate(rows, prompts, prompt_ids, greedy=True, max_new_tokens=self.limit)
            self._student_greedy = None if self.env_factory is not None else greedy.rewards
            self.bar.update()
            self.bar.set_postfix_str("student sampled")
            g = self.samples
            # Sample-major: rollout j belongs to prompt j % len(rows), so that every measure read on the first n
            # rollouts (the teacher's own generations, a capped signal, the reviser's revisions) covers n prompts,
            # not the first n / g prompts' groups (with g = 8 and 64 teacher rollouts that was 8 problems).
            rep = [(r, p, i) for _ in range(g) for r, p, i in zip(rows, prompts, prompt_ids)]
            sampled = self._generate([x[0] for x in rep], [x[1] for x in rep], [x[2] for x in rep], greedy=False,
                                     max_new_tokens=self.limit)
            self.bar.update()
            rollouts = [Rollout(row=row, prompt=prompt, completion=text, completion_ids=ids, reward=reward,
                                group=i % len(rows), finished=not cut,
                                extras={} if sampled.masks is None else {"env_mask": sampled.masks[i]})
                        for i, (row, prompt, text, ids, reward, cut) in enumerate(zip(
                            sampled.rows, sampled.prompts, sampled.texts, sampled.completion_ids, sampled.rewards,
                            sampled.truncated))]
            views = self.source.views(rollouts)
            teacher = teacher_contexts(tok, self.source, rollouts, views, self.max_teacher_length, "truncate")
            names = teacher.names[0]
            if len(names) == 1 and any(n != names for n in teacher.names):
                names = ["teacher"]  # one view whose name varies by rollout (a reviser's verdict, a sibling or not)
            report: dict[str, Any] = {
                "source": type(self.source).__name__, "prompts": len(rows), "rollouts": len(rollouts),
                "samples_per_prompt": g, "max_completion_length": self.limit,
                "teacher_policy": self.teacher_policy,
                "student_reward": _mean(sampled.rewards), "student_reward_greedy": _mean(greedy.rewards),
                "student_success": _success(sampled.rewards, self.threshold),
                "student_success_greedy": _success(greedy.rewards, self.threshold),
                "student_lengths": _lengths(sampled.completion_ids, sampled.truncated),
                "student_examples": list(greedy.texts[:EXAMPLES]),
                "student_shows_work": None if self.env_factory is not None else _work_share(greedy.texts, rows),
                "views": names, "truncated_pi": teacher.truncated_pi, "episodes": self.env_factory is not None,
            }
            self.bar.update()
            self.bar.set_postfix_str("teacher generating")
            generating = names[: self.source.diagnosed_views or len(names)]
            report["teacher"] = self._teacher_generation(rollouts, teacher, generating)
            best = max(generating, key=lambda n: report["teacher"][n]["reward"] or -math.inf)
            report["teacher_reward"] = report["teacher"][best]["reward"]
            report["teacher_reward_greedy"] = report["teacher"][best].get("reward_greedy")
            report["teacher_view"] = best
            self.bar.update()
            self.bar.set_postfix_str("teacher scoring")
            report["signal"] = self._signal(sampled, teacher, names)
            self.bar.update()
            # Before the method sections, which drop the teacher's per-rollout rewards from the report.
            blind = self._blind_rules(rows, rollouts, report["teacher"][best].get("rewards"))
            report.update(self._method_sections(rollouts, teacher, names, report))
            if blind is not None:
                report["blind_rule"] = blind
            report["verdicts"] = verdicts(report)
            report["seconds"] = round(time.perf_counter() - start, 1)
            self.bar.update()
        finally:
            self.bar.close()
            self.model.train(was_training)
        return report

    def _blind_rules(self, rows: list[dict[str, Any]], rollouts: Sequence[Rollout] = (),
                     teacher_rewards: Sequence[float | None] | None = None) -> dict[str, Any] | None:
        """On rows that list answer options (an ``options`` column, "80, 90"), the reward of answering the k-th option
        on every row, whatever the problem: a rule that reads no problem. When one scores as well as the teacher,
        training can gain by learning the rule instead of the task (benchmarks/choice_positions.py found every
        method on two-option addition doing so). ``None`` without options or a verifier.

        The teacher's and the student's rewards are also split by the best rule's verdict on each row: a teacher that
        knows the task scores as well where the rule is wrong as where it is right; one that leans on the rule scores
        well only where the rule is right, and distilling it teaches the rule. Their mean over the two halves (the
        *balanced* reward, 0.5 for every such rule on two options) is what the verdict compares."""
        if not self.reward_funcs or not rows or any("options" not in r for r in rows):
            return None
        listed = [[v.strip() for v in str(r["options"]).replace(" or ", ",").split(",") if v.strip()] for r in rows]
        width = min(len(x) for x in listed)
        if width < 2:
            return None
        prompts = [r["prompt"] for r in rows]
        rewards = {}
        per_row = {}
        for k in range(width):
            answers = [f"The answer is {x[k]}." for x in listed]
            ids = [self.tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
            verified = verify_completions(self.tokenizer, self.reward_funcs, [1.0] * len(self.reward_funcs),
                                          prompts, ids, rows)
            rewards[f"option {k + 1}"] = _mean(verified.rewards)
            per_row[f"option {k + 1}"] = verified.rewards
        best = max(rewards, key=lambda n: rewards[n] if rewards[n] is not None else -math.inf)
        out = {"rules": rewards, "best_rule": best, "best_rule_reward": rewards[best], "rows": len(rows)}
        rule_right = per_row[best]

        def split(values: Sequence[float | None], groups: Sequence[int]) -> dict[str, Any]:
            halves = {True: [], False: []}
            for value, group in zip(values, groups):
                if value is not None and rule_right[group] is not None:
                    halves[rule_right[group] >= self.threshold].append(value)
            with_rule, against = _mean(halves[True]), _mean(halves[False])
            return {"where_rule_right": with_rule, "where_rule_wrong": against,
                    "rollouts_where_rule_wrong": len(halves[False]),
                    "balanced": None if with_rule is None or against is None else (with_rule + against) / 2}

        groups = [r.group for r in rollouts]
        if teacher_rewards is not None and groups:
            out["teacher"] = split(teacher_rewards, groups[: len(teacher_rewards)])
            out["student"] = split([r.reward for r in rollouts], groups)
        return out

    def _teacher_generation(self, rollouts: list[Rollout], teacher: Any, names: list[str]) -> dict[str, Any]:
        """Each view's teacher generating under its own context (the first ``teacher_rollouts`` rollouts' contexts):
        reward within the rollout limit, and how long its successful answers are when allowed twice that."""
        # several views share the budget: each gets at least 32 contexts (64 for one or two views, 42 for three)
        n = min(len(rollouts), self.teacher_rollouts, max(32, 2 * self.teacher_rollouts // max(len(names), 1)))
        idx = list(range(n))
        out = {}
        for k, name in enumerate(names):
            contexts = [teacher.ids[i][k] for i in idx]
            rows = [rollouts[i].row for i in idx]
            if self.env_factory is not None:
                # The task as the environment first shows it (run_episodes appends the first observation itself).
                bare = [Rollout(row=rollouts[i].row, prompt=rollouts[i].row["prompt"], completion="",
                                completion_ids=[], reward=None) for i in idx]
                ctx_prompts = [views[k].context for views in self.source.views(bare)]
                played = self._episodes(rows, ctx_prompts, greedy=False)
                # No greedy teacher episodes: no verdict reads them under an environment, and an episode costs
                # max_turns replies (on Sokoban they would cost what the student's greedy episodes do: 17 s for 4).
                out[name] = {"reward": _mean(played.rewards), "success": _success(played.rewards, self.threshold),
                             "reward_greedy": None, "shows_work": None,
                             "lengths": _lengths(played.completion_ids, played.truncated), "fits_share": None}
                continue
            long = self._generate(rows, [rollouts[i].prompt for i in idx], contexts, greedy=False,
                                  max_new_tokens=2 * self.limit)
            within = [ids[: self.limit] for ids in long.completion_ids]
            verified = verify_completions(self.tokenizer, self.reward_funcs, [1.0] * len(self.reward_funcs),
                                          long.prompts, within, rows)
            # Greedy decoding is deterministic: once per distinct context (the G rollouts of a prompt share one for
            # every source whose context does not depend on the rollout), so a view's greedy reward costs 1/G.
            first: dict[tuple[int, ...], int] = {}
            for j, context in enumerate(contexts):
                first.setdefault(tuple(context), j)
            distinct = list(first.values())
            greedy = self._generate([rows[j] for j in distinct], [rollouts[idx[j]].prompt for j in distinct],
                                    [contexts[j] for j in distinct], greedy=True, max_new_tokens=self.limit)
            in_form = self._in_form(greedy, [idx[j] % len(self.rows) for j in distinct])
            good_long = [len(ids) for ids, r in zip(long.completion_ids, long.rewards)
                         if r is not None and r >= self.threshold]
            out[name] = {
                "reward": _mean(verified.rewards),
                "success": _success(verified.rewards, self.threshold),
                "reward_unbounded": _mean(long.rewards),
                "reward_greedy": _mean(greedy.rewards),
                "lengths": _lengths(long.completion_ids, [len(x) > self.limit for x in long.completion_ids]),
                "successes_too_long": (sum(n_ > self.limit for n_ in good_long) / len(good_long)) if good_long
                else None,
                "rewards": verified.rewards,
                # What the teacher writes (greedy, the first contexts): the form a failed `focus` reads as wording
                # may be the help (an equation the model computes better in) or a preamble (docs/diagnose.md).
                "examples": list(greedy.texts[:EXAMPLES]),
                # The share of them that write the problem's numbers out before the answer (`focus` reads it).
                "shows_work": _work_share(greedy.texts, greedy.rows),
                # The student answering in that form: its greedy reward when its reply starts with the teacher's
                # greedy answer up to the answer's last number (what reverse KL on the wording would teach it).
                "in_form": in_form,
            }
        return out

    def _form_prefix(self, ids: Sequence[int]) -> list[int] | None:
        """The tokens of a greedy answer before its last number ("The answer is: 91 + 94 = " of "... = 185"); ``None``
        when it names no number."""
        decode = self.tokenizer.decode
        numbers = list(_NUMBER.finditer(decode(ids, skip_special_tokens=True)))
        if not numbers:
            return None
        cut, k = numbers[-1].start(), 0
        while k < len(ids) and len(decode(ids[: k + 1], skip_special_tokens=True)) <= cut:
            k += 1
        return list(ids[:k])

    def _in_form(self, teacher: _Batch, row_index: list[int]) -> dict[str, Any] | None:
        """The student's greedy reward when its reply is started with each teacher answer's form (the answer up to its
        last number) and it writes the rest, beside its own greedy reward on the same rows. Reverse KL on the wording
        teaches the form; the student's own digits then follow it. A form the student computes better in is a help
        `focus` cannot see (SD-Zero on two options, Skill-SD's format skill); one it does not is style."""
        if self._student_greedy is None:
            return None
        items = [(row, prompt, i, prefix) for row, prompt, i, ids in zip(teacher.rows, teacher.prompts, row_index,
                                                                        teacher.completion_ids)
                 if (prefix := self._form_prefix(ids)) is not None and len(prefix) < self.limit]
        if not items:
            return None
        contexts = [render_context(self.tokenizer, prompt) + prefix for _, prompt, _, prefix in items]
        # the whole reply keeps the rollout limit: no row needs more new tokens than the shortest form leaves
        replies, _ = self._complete(contexts, greedy=True,
                                    max_new_tokens=self.limit - min(len(x[3]) for x in items))
        ids = [prefix + reply[: self.limit - len(prefix)] for (_, _, _, prefix), reply in zip(items, replies)]
        verified = verify_completions(self.tokenizer, self.reward_funcs, [1.0] * len(self.reward_funcs),
                                      [x[1] for x in items], ids, [x[0] for x in items])
        own = [self._student_greedy[i] for _, _, i, _ in items]
        in_form, plain = _mean(verified.rewards), _mean(own)
        return {"rows": len(items), "student_reward_greedy": plain, "student_reward_in_form": in_form,
                "gain": None if in_form is None or plain is None else in_form - plain,
                "examples": list(verified.texts[:EXAMPLES])}

    def _signal(self, sampled: _Batch, teacher: Any, names: list[str]) -> dict[str, Any]:
        """Reverse KL student -> teacher per student token (full vocabulary), its density, and the views' JSDs."""
        # Three or more views share the budget: the first max(128, 512 // views) rollouts (all of them for one or two
        # views; each view's full-vocabulary log-probs are held for the pairwise JSD).
        scored = len(sampled.completion_ids) if len(names) <= 2 else max(128, 512 // len(names))
        masks = (sampled.masks or [[1] * len(c) for c in sampled.completion_ids])[:scored]
        student = self._logprobs(sampled.prompt_ids[:scored], sampled.completion_ids[:scored], masks)
        per_view: dict[str, list[torch.Tensor]] = {}
        view_logps: list[list[torch.Tensor]] = []
        for k, name in enumerate(names):
            t_logp = self._logprobs([ids[k] for ids in teacher.ids[:scored]], [s[k] for s in teacher.scored[:scored]],
                                    masks)
            view_logps.append(t_logp)
            per_view[name] = [reverse_kl(s, t) for s, t in zip(student, t_logp)]
        out: dict[str, Any] = {}
        for k, (name, kls) in enumerate(per_view.items()):
            flat = torch.cat(kls) if kls else torch.zeros(0)
            if flat.numel() == 0:
                out[name] = {"reverse_kl": None, "dense_share": None, "tokens": 0}
                continue
            pulls = torch.cat([t.argmax(-1) for t in view_logps[k]]) if view_logps[k] else None
            out[name] = {"reverse_kl": float(flat.mean()), "dense_share": dense_share(flat),
                         "tokens": int(flat.numel()), **self._digit_focus(flat, sampled, masks, pulls),
                         **self._stopping(student, view_logps[k], sampled)}
        if len(names) > 1:
            pairs = {}
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    values = []
                    for pa, pb in zip(view_logps[a], view_logps[b]):
                        values.append(jensen_shannon(pa, pb))
                    pairs[f"{names[a]}|{names[b]}"] = float(torch.cat(values).mean())
            out["pairwise_jsd"] = pairs
        first = out[names[0]] if len(names) == 1 else None
        out["reverse_kl"] = first["reverse_kl"] if first else _mean([out[n]["reverse_kl"] for n in names])
        out["dense_share"] = first["dense_share"] if first else _mean([out[n]["dense_share"] for n in names])
        for key in ("digit_share", "digit_token_fraction", "digit_pull_share", "digit_pull_fraction",
                    "student_p_stop", "teacher_p_stop"):
            out[key] = first.get(key) if first else _mean([out[n].get(key) for n in names])
        return out

    def _stopping(self, student: list[torch.Tensor], teacher: list[torch.Tensor], sampled: _Batch) -> dict[str, Any]:
        """Where the student stopped after a right answer (its last token an end-of-sequence token, its reward at
        least the threshold): the probability the student and the teacher give that stop. A teacher far less ready to
        stop there pulls the student into talking on after its answer. Not for episodes (a reply's end is a turn's)."""
        if sampled.masks is not None:
            return {}
        eos = set(self.eos)
        stops = [i for i in range(len(student)) if sampled.completion_ids[i] and sampled.completion_ids[i][-1] in eos
                 and sampled.rewards[i] is not None and sampled.rewards[i] >= self.threshold]
        if not stops:
            return {"stops": 0, "student_p_stop": None, "teacher_p_stop": None}

        def p_stop(logps: list[torch.Tensor]) -> float:
            return statistics.mean(float(logps[i][-1, sampled.completion_ids[i][-1]].exp()) for i in stops)

        return {"stops": len(stops), "student_p_stop": p_stop(student), "teacher_p_stop": p_stop(teacher)}

    def _digit_focus(self, values: torch.Tensor, sampled: _Batch, masks: list[list[int]],
                     pulls: torch.Tensor | None = None) -> dict[str, float]:
        """Where the divergence sits: the share of it on tokens that spell digits, and those tokens' share of the
        student's tokens (the same measure as training's ``divergence/digit_share``; ``values`` are the per-token
        divergences of the kept tokens, in rollout order).

        With ``pulls`` (the teacher's most likely token at each of those positions), also where it pulls: the share
        of the divergence at positions where the student's token *or the teacher's* spells a digit, and those
        positions' share (``digit_pull_share``, ``digit_pull_fraction``). A teacher that would write the sum out
        where the student writes "The answer is" differs on the student's wording, towards digits; a preamble differs
        towards words. Reported beside `focus`, not in its verdict (a hypothesis from two rows, docs/diagnose.md)."""
        from selfdistill.step import digit_share, digit_tokens, mask_share, spells_digit

        if getattr(self, "_digits", None) is None:
            self._digits = digit_tokens(self.tokenizer)
        tokens = torch.tensor([t for ids, mask in zip(sampled.completion_ids, masks) for t, keep in zip(ids, mask)
                               if keep], dtype=torch.long)
        if tokens.numel() != values.numel():  # the scored tokens are the kept ones; a mismatch measures nothing
            return {}
        shares = digit_share(values, tokens, self._digits)
        out = {"digit_share": shares.get("divergence/digit_share"),
               "digit_token_fraction": shares.get("divergence/digit_token_fraction")}
        if pulls is not None and pulls.numel() == tokens.numel() and tokens.numel():
            either = spells_digit(tokens, self._digits) | spells_digit(pulls.to(tokens.device), self._digits)
            out["digit_pull_fraction"], out["digit_pull_share"] = mask_share(values, either)
        return out

    def _method_sections(self, rollouts: list[Rollout], teacher: Any, names: list[str],
                         report: dict[str, Any]) -> dict[str, Any]:
        from selfdistill.methods.avsd.source import MultiView
        from selfdistill.methods.sdzero.source import Reviser
        from selfdistill.methods.skillsd.source import Skills

        out: dict[str, Any] = {}
        if isinstance(self.source, Reviser):
            # The reviser's generation after "this response is wrong / correct" is its revision.
            right, wrong = [], []
            n = min(len(rollouts), self.teacher_rollouts)
            revised = report["teacher"][names[0]].get("rewards") or []
            for rollout, after in zip(rollouts[:n], revised):
                if rollout.reward is None or after is None:
                    continue
                (right if rollout.reward >= self.threshold else wrong).append(after >= self.threshold)
            out["revision"] = {"wrong_to_right": sum(wrong) / len(wrong) if wrong else None, "wrong": len(wrong),
                               "right_kept_right": sum(right) / len(right) if right else None, "right": len(right)}
        if isinstance(self.source, MultiView):
            out["multiview"] = {name: {"teacher_reward": report["teacher"][name]["reward"],
                                       "teacher_reward_greedy": report["teacher"][name].get("reward_greedy"),
                                       "reverse_kl": report["signal"][name]["reverse_kl"]} for name in names}
        if isinstance(self.source, Skills):
            shown = [bool(v[0].tag) for v in self.source.views(rollouts[:1])]
            with_skills = report["teacher"][names[0]]["reward"]
            out["skills"] = {"bank_size": len(self.source.bank), "shown": any(shown),
                             "teacher_reward_with_skills": with_skills if any(shown) else None,
                             "teacher_reward_without": report["student_reward"]}
        for section in report["teacher"].values():
            section.pop("rewards", None)
        return out


def verdicts(report: dict[str, Any]) -> list[dict[str, str]]:
    """One line per premise: ``{"premise", "verdict", "why"}`` against :data:`THRESHOLDS`."""
    th, out = THRESHOLDS, []

    def add(premise: str, ok: bool | None, why: str) -> None:
        out.append({"premise": premise, "verdict": "unknown" if ok is None else ("holds" if ok else "fails"),
                    "why": why})

    def close(margin: float, se: float | None) -> str:
        """Said when a figure is within one standard error of its threshold: another draw of the same size may
        well land on the other side (on open addition two SD-Zero seeds did: docs/diagnose.md, twelfth session)."""
        if se is None or not abs(margin) < se:
            return ""
        return (f" [within one standard error (about {se:.2f}) of the threshold: a draw of this size could fall "
                "either side; rerun with more --prompts to settle it]")

    student, teacher = report.get("student_reward"), report.get("teacher_reward")
    view = report.get("teacher", {}).get(report.get("teacher_view")) or {}  # the best view's section
    student_g, teacher_g = report.get("student_reward_greedy"), report.get("teacher_reward_greedy",
                                                                           view.get("reward_greedy"))
    if student is None or teacher is None:
        add("pi_gap", None, "no reward to compare: give the recipe a verifier (rewards:) or an environment")
    else:
        # Greedy where both were measured: reverse KL pulls the student to the teacher's modes, and the held-out
        # accuracy it is judged by is greedy (docs/diagnose.md: SD-Zero on open addition, +0.14 sampled, -0.05 greedy,
        # gained nothing; a format skill, +0.04 sampled, +0.19 greedy, gained). Sampled otherwise (episodes).
        greedy = student_g is not None and teacher_g is not None
        gap = teacher_g - student_g if greedy else teacher - student
        measured = (f"teacher {teacher_g:.2f} vs student {student_g:.2f} greedy (gap {gap:+.2f}; sampled "
                    f"{teacher:.2f} vs {student:.2f})" if greedy else
                    f"teacher {teacher:.2f} vs student {student:.2f} (gap {gap:+.2f})")
        n, se = report.get("prompts"), None
        if greedy and n:  # two shares of about n rows each, taken as independent
            se = math.sqrt((teacher_g * (1 - teacher_g) + student_g * (1 - student_g)) / n)
        add("pi_gap", gap >= th["pi_gap"],
            f"{measured}, needs >= {th['pi_gap']:.2f}: "
            + ("the teacher knows something to teach" if gap >= th["pi_gap"] else
               "the teacher does no better than the student: no gap, no signal") + close(gap - th["pi_gap"], se))
    kl = report["signal"].get("reverse_kl")
    add("signal", None if kl is None else kl >= th["signal_kl"],
        "no student tokens to score" if kl is None else
        f"reverse KL {kl:.3f} nats/token on the student's rollouts (needs >= {th['signal_kl']}), 80% of it on "
        f"{report['signal'].get('dense_share') or 0:.0%} of the tokens")
    share, fraction = report["signal"].get("digit_share"), report["signal"].get("digit_token_fraction")
    if fraction is not None and fraction >= th["digit_tokens"] and share is not None:
        focus = share / fraction
        why = (f"{share:.0%} of the divergence sits on the {fraction:.0%} of tokens that spell digits ({focus:.2f}x "
               f"their share; needs >= {th['digit_focus']:.2f}x)")
        # Reported, not judged: a teacher writing the task out where the student does not turned two failed `focus`
        # rows into gains, but failed its first test (SD-Zero's earlier stage on open addition; docs/diagnose.md).
        work_s = report.get("student_shows_work")
        work_t = view.get("shows_work")
        if work_s is not None and work_t is not None:
            why += (f"; the teacher writes the problem's numbers out before its answer in {work_t:.0%} of its greedy "
                    f"answers, the student in {work_s:.0%}")
        # The wording may be a form that helps: the student answering in the teacher's form gains. (Until the
        # twelfth session the teacher also had to be right in that form at least as often as the student; on open
        # addition, each seed's own stage diagnosed, it failed on every seed that gained: docs/diagnose.md.)
        form = view.get("in_form") or {}
        in_form, own = form.get("student_reward_in_form"), form.get("student_reward_greedy")
        helps = None
        if in_form is not None and own is not None:
            helps = in_form - own >= th["form_gain"] - 1e-9
            why += (f"; answering in the teacher's form the student scores {in_form:.2f} greedy against its own "
                    f"{own:.2f} (needs +{th['form_gain']:.2f})"
                    + ("" if teacher_g is None else f", the teacher {teacher_g:.2f} in it"))
        if focus >= th["digit_focus"]:
            add("focus", True, why)
        elif helps:
            add("focus", True, why + ": the divergence sits on a form of answer the student computes better in")
        else:
            add("focus", False, why + ": the teacher differs from the student mostly in wording, not in the answer's "
                "digits, so distillation teaches the teacher's style; read what the teacher writes (a worked form "
                "can help, a preamble does not) or try another wording of the privileged information "
                "(docs/diagnose.md, focus)")
    ps, pt, policy = report["signal"].get("student_p_stop"), report["signal"].get("teacher_p_stop"), report.get(
        "teacher_policy")
    if ps is not None and pt is not None and policy is not None:
        gap, follows = ps - pt, policy in FOLLOWING_TEACHERS
        ok = not follows or gap < th["stop_gap"]
        add("stops", ok,
            f"after a right answer the teacher gives the student's stop {pt:.2f} against the student's {ps:.2f} "
            f"(gap {gap:+.2f}); teacher_policy={policy}" + (
                (" follows the student" + ("" if ok else f" (needs a gap < {th['stop_gap']:.2f} then): what the "
                 "student learns to say after its answer, the teacher shows it again, and the student writes on to "
                 "the limit; use teacher_policy=initial, or a max_completion_length that ends near the answer "
                 "(docs/diagnose.md, stops)")) if follows else " does not follow the student: its lower readiness "
                "to stop is not taught back"))
    elif policy in FOLLOWING_TEACHERS and report["signal"].get("stops") == 0:
        add("stops", None,
            f"no student rollout ended after a right answer, so there is no stop to compare; teacher_policy={policy} "
            "follows the student: watch completions/clipped_ratio in training, or use teacher_policy=initial "
            "(docs/diagnose.md, stops)")
    too_long, cut = view.get("successes_too_long"), report["student_lengths"].get("cut_share", 0.0)
    if too_long is None:
        what = "student episodes with a reply" if report.get("episodes") else "student rollouts"
        add("room", cut <= th["student_cut"],
            f"{cut:.0%} of {what} cut at max_completion_length={report['max_completion_length']} (needs <= "
            f"{th['student_cut']:.0%})")
    else:
        ok = too_long <= th["teacher_cut"] and cut <= th["student_cut"]
        add("room", ok,
            f"{too_long:.0%} of the teacher's successful answers need more than max_completion_length="
            f"{report['max_completion_length']} tokens (needs <= {th['teacher_cut']:.0%}); {cut:.0%} of student "
            "rollouts are cut there" + ("" if ok else ": raise max_completion_length, or the reward can stay at "
                                              "zero while the divergence falls"))
    if "revision" in report:
        rate = report["revision"]["wrong_to_right"]
        wrong = report["revision"].get("wrong") or 0
        add("revision", None if rate is None else rate >= th["revision"],
            "no wrong rollout to revise" if rate is None else
            f"the reviser turns {rate:.1%} of {wrong} wrong answers right (needs >= {th['revision']:.0%}) and keeps "
            f"{report['revision']['right_kept_right'] or 0:.0%} of right ones right"
            + close(rate - th["revision"], math.sqrt(rate * (1 - rate) / wrong) if wrong else None))
    if "multiview" in report and student is not None:
        gaps = {n: v["teacher_reward"] - student for n, v in report["multiview"].items()
                if v["teacher_reward"] is not None}
        informative = [n for n, gap in gaps.items() if gap >= th["pi_gap"]]
        # a view sufficient on its own: its teacher answers (nearly) every row, sampled or greedy (on answer-only
        # arithmetic the full solution scores 0.78 sampled but 1.00 greedy, and AVSD lost to it; docs/diagnose.md)
        top = max(max(v["teacher_reward"] or 0.0, v.get("teacher_reward_greedy") or 0.0)
                  for v in report["multiview"].values())
        ok = len(informative) >= 2 and top < th["view_ceiling"]
        add("views", ok,
            f"{len(informative)} of {len(gaps)} views carry a gap >= {th['pi_gap']:.2f}; the best view's teacher "
            f"reward (sampled or greedy) is {top:.2f}" + ("" if ok else (
                f" (>= {th['view_ceiling']:.2f}: one view already says it all, the consensus can only dilute it)"
                if top >= th["view_ceiling"] else ": fewer than two informative views to combine")))
    if "skills" in report:
        sk = report["skills"]
        if not sk["shown"]:
            add("skills", None, "the bank is empty: seed it (source.seed_skills) or load one (--skills PATH)")
        else:
            if teacher_g is not None and student_g is not None:  # greedy where measured, as pi_gap (the same view)
                gap = teacher_g - student_g
                why = f"teacher with the bank's skills {teacher_g:.2f} vs without {student_g:.2f} greedy (sampled " \
                      f"{sk['teacher_reward_with_skills']:.2f} vs {sk['teacher_reward_without'] or 0.0:.2f})"
            else:
                gap = sk["teacher_reward_with_skills"] - (sk["teacher_reward_without"] or 0.0)
                why = (f"teacher with the bank's skills {sk['teacher_reward_with_skills']:.2f} vs without "
                       f"{sk['teacher_reward_without'] or 0.0:.2f}")
            add("skills", gap >= th["skill_gap"], f"{why} (needs a gap >= {th['skill_gap']:.2f})")
    if "blind_rule" in report and report.get("teacher_reward") is not None:
        bl = report["blind_rule"]
        rule, teacher = bl["best_rule_reward"] or 0.0, report["teacher_reward"]
        ok = teacher - rule >= th["blind_gap"]
        why = (f"answering {bl['best_rule']} on every row, whatever the problem, scores {rule:.2f} against the "
               f"teacher's {teacher:.2f} (needs the teacher ahead by >= {th['blind_gap']:.2f})")
        split = (bl.get("teacher") or {})
        if split.get("balanced") is not None:
            # Every such rule scores 1 where it is right and 0 where it is wrong: 0.5 over the two halves.
            balanced_ok = split["balanced"] - 0.5 >= th["blind_gap"]
            why += (f"; where that rule is wrong the teacher scores {split['where_rule_wrong']:.2f}, where it is right "
                    f"{split['where_rule_right']:.2f}: {split['balanced']:.2f} over the two halves against the rule's "
                    f"0.50 (needs >= {0.5 + th['blind_gap']:.2f})")
            ok = ok and balanced_ok
        add("blind_rule", ok, why + (
            "" if ok else ": a policy can gain as much by learning that rule as by learning the task; measure the "
            "trained model with the options reordered (benchmarks/choice_positions.py)"))
    return out


def format_report(report: dict[str, Any]) -> str:
    """The table ``selfdistill diagnose`` prints, then one verdict line per premise."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f}"

    lines = [f"{'measure':48} value", "-" * 64,
             f"{'student reward, greedy':48} {pct(report['student_reward_greedy'])}",
             f"{'student reward, sampled':48} {pct(report['student_reward'])}"]
    for name, t in report["teacher"].items():
        lines.append(f"{'teacher reward under its own context [' + name + ']':48} {pct(t['reward'])} sampled, "
                     f"{pct(t.get('reward_greedy'))} greedy")
    sig = report["signal"]
    lines.append(f"{'reverse KL student->teacher (nats/token)':48} {pct(sig.get('reverse_kl'))}")
    lines.append(f"{'share of tokens carrying 80% of it':48} {pct(sig.get('dense_share'))}")
    if sig.get("teacher_p_stop") is not None:
        lines.append(f"{'p(stop) after a right answer, student / teacher':48} {pct(sig.get('student_p_stop'))} / "
                     f"{pct(sig['teacher_p_stop'])}")
    if sig.get("digit_share") is not None:
        lines.append(f"{'share of it on digit tokens / their share':48} {pct(sig['digit_share'])} / "
                     f"{pct(sig.get('digit_token_fraction'))}")
    if report.get("student_shows_work") is not None:
        view = report["teacher"].get(report.get("teacher_view")) or {}
        lines.append(f"{'answers writing the task out, student / teacher':48} {pct(report['student_shows_work'])} / "
                     f"{pct(view.get('shows_work'))}")
    form = (report["teacher"].get(report.get("teacher_view")) or {}).get("in_form")
    if form and form.get("student_reward_in_form") is not None:
        label = "student greedy, own form / in the teacher's form"
        lines.append(f"{label:48} "
                     f"{pct(form.get('student_reward_greedy'))} / {pct(form['student_reward_in_form'])} "
                     f"({form['rows']} rows)")
    if sig.get("digit_pull_share") is not None:
        lines.append(f"{'... where student or teacher spells a digit':48} {pct(sig['digit_pull_share'])} / "
                     f"{pct(sig.get('digit_pull_fraction'))}")
    for pair, jsd in (sig.get("pairwise_jsd") or {}).items():
        lines.append(f"{'JSD ' + pair:48} {jsd:.3f}")
    sl = report["student_lengths"]
    lines.append(f"{'student length mean / p90 / cut share':48} {sl.get('mean', 0):.1f} / {sl.get('p90', 0):.0f} / "
                 f"{sl.get('cut_share', 0):.0%}")
    for name, t in report["teacher"].items():
        tl = t["lengths"]
        extra = "" if t.get("successes_too_long") is None else f", successes too long {t['successes_too_long']:.0%}"
        lines.append(f"{'teacher length mean / p90 [' + name + ']':48} {tl.get('mean', 0):.1f} / "
                     f"{tl.get('p90', 0):.0f}{extra}")
    shown = [("student writes (greedy)", (report.get("student_examples") or [None])[0])]
    shown += [(f"teacher writes (greedy) [{name}]", (t.get("examples") or [None])[0])
              for name, t in report["teacher"].items()]
    for label, text in shown:
        if text is not None:
            text = " ".join(str(text).split())
            lines.append(f"{label:48} {text if len(text) <= 70 else text[:70] + '...'}")
    if report.get("srt"):
        st = report["srt"]
        seconds = st.get('sample_seconds', 0) + st.get('sft_seconds', 0)
        lines.append(f"{'self-revision stage first (examples / seconds)':48} {st.get('examples', 0)} / "
                     + (f"reused ({seconds:.0f} when it ran)" if st.get("reused_from") else f"{seconds:.0f}"))
    if "revision" in report:
        rv = report["revision"]
        lines.append(f"{'reviser: wrong -> right (of ' + str(rv['wrong']) + ')':48} {pct(rv['wrong_to_right'])}")
        lines.append(f"{'reviser: right kept right (of ' + str(rv['right']) + ')':48} {pct(rv['right_kept_right'])}")
    if "skills" in report:
        sk = report["skills"]
        lines.append(f"{'skills in the bank':48} {sk['bank_size']}")
    if "blind_rule" in report:
        bl = report["blind_rule"]
        lines.append(f"{'best rule ignoring the problem (' + bl['best_rule'] + ')':48} {pct(bl['best_rule_reward'])}")
        for who in ("student", "teacher"):
            if (bl.get(who) or {}).get("balanced") is not None:
                sp = bl[who]
                lines.append(f"{who + ' where that rule is right / wrong':48} {pct(sp['where_rule_right'])} / "
                             f"{pct(sp['where_rule_wrong'])}")
    lines.append("")
    for v in report["verdicts"]:
        lines.append(f"{v['premise']:>9}: {v['verdict'].upper():7} {v['why']}")
    return "\n".join(lines)


def diagnose(model: Any, tokenizer: Any, dataset: Any, privileged: PrivilegedSource,
             reward_funcs: Sequence[Callable] = (), args: Any = None, *, prompts: int | None = None,
             samples: int | None = None, environment_factory: Callable | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Measure ``privileged``'s premises on ``prompts`` rows of ``dataset`` before training (the Python form of
    ``selfdistill diagnose``): the same arguments as :class:`~selfdistill.SelfDistillTrainer` (``args`` a
    :class:`~selfdistill.SelfDistillConfig`, for the completion limit, temperature and generations).

    ``prompts`` defaults to 64 rows, ``max(4, 320 // max_turns**2)`` under an environment (each turn re-reads the
    episode's transcript: 20 for guess-the-number's 4 turns, 5 for Sokoban's 8), so that a shipped
    recipe is diagnosed within 3 minutes on 2 CPU cores (benchmarks/diagnose_recipes.py).

    Returns the report: ``student_reward``, ``teacher_reward``, the per-premise sections and ``verdicts``;
    :func:`format_report` renders it.
    """

    if args is None:
        from selfdistill.config import SelfDistillConfig

        args = SelfDistillConfig(output_dir="diagnose", use_cpu=True, report_to="none")
    if prompts is None:  # each turn of an episode re-reads its transcript: an episode costs about turns**2 replies
        turns = getattr(args, "max_turns", None) or 4
        prompts = max(4, 320 // turns**2) if environment_factory is not None else 64
    rows = take_rows(dataset, prompts)
    if not rows:
        raise ValueError("the dataset is empty: diagnose needs at least one row")
    g = samples or max(args.num_generations, 4)
    return Diagnosis(model, tokenizer, rows, privileged, reward_funcs, max_completion_length=args.max_completion_length,
                     temperature=args.temperature, top_p=args.top_p, samples=g,
                     max_teacher_length=args.max_teacher_length, env_factory=environment_factory,
                     max_turns=getattr(args, "max_turns", None), progress=progress,
                     teacher_policy=getattr(args, "teacher_policy", None),
                     # one teacher generation a prompt, at least 64 (so `--prompts 192` measures the teacher, the
                     # reviser and the student in its form on 192 rows too); episodes: the teacher plays half as
                     # many as the student (each costs several replies)
                     teacher_rollouts=max(64, len(rows)) if environment_factory is None
                     else min(64, len(rows) * g // 2)).run()


def diagnose_recipe(recipe: Any, prompts: int | None = None, samples: int | None = None, skills: str | None = None,
                    progress: bool = True, srt: bool = True) -> dict[str, Any]:
    """``selfdistill diagnose``: the recipe's model, data, source and verifier, measured before any training; writes
    ``<output_dir>/diagnosis.json`` and returns the report.

    A recipe with an enabled ``srt:`` section (SD-Zero) is measured after its self-revision stage, run first exactly
    as training runs it: its teacher is the reviser that stage leaves, not the model the recipe names (on open
    addition the 135M reviser turns 9% of its wrong answers right before the stage and 28% after it).
    ``srt=False`` measures the model as named (``--no-srt``: quicker, but not the teacher training will use).
    """
    import json
    from pathlib import Path

    from transformers import set_seed

    from selfdistill.checks import check_datasets
    from selfdistill.data import load_splits
    from selfdistill.modeling import load_model, load_tokenizer
    from selfdistill.recipes import RecipeError, build_env, build_source
    from selfdistill.run import env_splits, resolve_reward

    args = recipe.config()
    set_seed(args.seed)
    start = time.perf_counter()
    train, _ = load_splits(recipe.data) if recipe.env is None else env_splits(recipe)
    rewards = [resolve_reward(r) for r in recipe.rewards]
    env_factory = build_env(recipe.env) if recipe.env is not None else None
    source = build_source(recipe.source)
    if skills:
        from selfdistill.methods.skillsd.bank import SkillBank

        bank = getattr(source, "bank", None)
        if bank is None:
            raise RecipeError(f"--skills {skills}: the recipe's source ({type(source).__name__}) has no skill bank")
        try:
            loaded = SkillBank.load(skills)
        except (FileNotFoundError, ValueError) as err:
            raise RecipeError(f"--skills: {err}") from err
        source.load_state_dict({"bank": loaded.state_dict()})
    if not rewards and env_factory is None:
        raise RecipeError("diagnose compares rewards: give the recipe a verifier (rewards: [...]) or an env")
    try:
        check_datasets(source, args, train)
    except (KeyError, TypeError, ValueError) as err:
        raise RecipeError(f"data: {err.args[0] if err.args else err}") from err
    tokenizer = load_tokenizer(recipe.model)
    model = load_model(recipe.model, args.model_init_kwargs)
    setup = time.perf_counter() - start
    srt_stats = None
    if srt and getattr(recipe, "srt", None) is not None and recipe.srt.enabled:
        from selfdistill.methods.sdzero.srt import srt_stage

        # As run.py runs it (before the trainer exists, so outside any autocast): the same reviser training starts
        # from. The stage is kept in the recipe's output folder, so `selfdistill train` afterwards loads it instead of
        # running it again (and so does a second diagnose).
        srt_stats = dict(srt_stage(model, tokenizer, train, source, rewards, recipe, args, args.output_dir,
                                   progress=progress))
        srt_stats.pop("config", None)
        # The measurement draws from the seed, not from what the stage left of the random state, so it reads the
        # same whether the stage ran in this process or was loaded (the trainer re-seeds the same way).
        set_seed(args.seed)
    # The rollouts are sampled the way training samples them: under the recipe's autocast (bf16 when it trains in bf16).
    with sampling_precision(model, args):
        report = diagnose(model, tokenizer, train, source, rewards, args, prompts=prompts, samples=samples,
                          environment_factory=env_factory, progress=progress)
    report.update(recipe=recipe.path, method=recipe.method, model=recipe.model, setup_seconds=round(setup, 1),
                  wall_seconds=round(time.perf_counter() - start, 1), thresholds=THRESHOLDS,
                  **({"srt": srt_stats} if srt_stats is not None else {}))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnosis.json").write_text(json.dumps(report, indent=1, default=str))
    report["path"] = str(out / "diagnosis.json")
    return report
