"""`selfdistill diagnose`: the premise measures against float64 references, the verdicts, and end-to-end runs."""

import json
import math

import pytest
import torch
import yaml
from conftest import build_dataset, build_model

from selfdistill.cli import main
from selfdistill.config import SelfDistillConfig
from selfdistill.methods.avsd.source import MultiView
from selfdistill.methods.sdzero.source import Reviser
from selfdistill.methods.skillsd.source import Skills
from selfdistill.premises import THRESHOLDS, dense_share, diagnose, jensen_shannon, reverse_kl, verdicts
from selfdistill.sources import PrivilegedSource, ReferenceSolution, TeacherView


# ------------------------------------------------------------------------------------------- pure measures
def test_reverse_kl_and_jsd_match_a_float64_loop():
    torch.manual_seed(0)
    s = torch.log_softmax(torch.randn(5, 7, dtype=torch.float64), -1)
    t = torch.log_softmax(torch.randn(5, 7, dtype=torch.float64), -1)
    for pos in range(5):
        p, q = s[pos].exp().tolist(), t[pos].exp().tolist()
        kl = sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))  # KL(student || teacher)
        m = [(pi + qi) / 2 for pi, qi in zip(p, q)]
        js = 0.5 * sum(pi * math.log(pi / mi) for pi, mi in zip(p, m)) + 0.5 * sum(
            qi * math.log(qi / mi) for qi, mi in zip(q, m))
        assert reverse_kl(s, t)[pos].item() == pytest.approx(kl, rel=1e-10)
        assert jensen_shannon(s, t)[pos].item() == pytest.approx(js, rel=1e-10)
    # the direction: a student sure of token 0 against a teacher sure of token 1 costs log(p_s / p_t) on token 0
    sure = torch.log(torch.tensor([[0.99, 0.01]], dtype=torch.float64))
    other = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    assert reverse_kl(sure, other).item() == pytest.approx(0.99 * math.log(0.99 / 0.5) + 0.01 * math.log(0.01 / 0.5))
    assert reverse_kl(sure, other).item() != pytest.approx(reverse_kl(other, sure).item())


@pytest.mark.parametrize("values, expected", [
    ([1.0, 1.0, 1.0, 1.0, 1.0], 0.8),  # spread evenly: 80% of the mass needs 80% of the tokens
    ([8.0, 1.0, 0.5, 0.5], 0.25),  # one token carries 80%
    ([0.0, 0.0], 0.0),
    ([5.0, -1.0, 0.0, 0.0], 0.25),  # negatives count as nothing
])
def test_dense_share_is_the_smallest_share_carrying_80_percent(values, expected):
    assert dense_share(torch.tensor(values)) == pytest.approx(expected)
    # brute force: the fewest tokens whose values reach 80% of the total
    pos = sorted((max(v, 0.0) for v in values), reverse=True)
    total = sum(pos)
    if total:
        k = next(i + 1 for i in range(len(pos)) if sum(pos[: i + 1]) >= 0.8 * total - 1e-12)
        assert dense_share(torch.tensor(values)) == pytest.approx(k / len(values))
    assert dense_share(torch.zeros(0)) is None


# ------------------------------------------------------------------------------------------------- verdicts
def _report(student=0.2, teacher=0.9, kl=0.3, too_long=0.0, cut=0.0, **extra):
    return {"student_reward": student, "teacher_reward": teacher, "teacher_view": "v", "max_completion_length": 16,
            "teacher": {"v": {"reward": teacher, "successes_too_long": too_long}},
            "signal": {"reverse_kl": kl, "dense_share": 0.3}, "student_lengths": {"cut_share": cut}, **extra}


def _verdict(report, premise):
    return next(v for v in verdicts(report) if v["premise"] == premise)["verdict"]


def test_verdicts_follow_the_thresholds():
    gap = THRESHOLDS["pi_gap"]
    assert _verdict(_report(), "pi_gap") == "holds"
    assert _verdict(_report(student=0.5, teacher=0.5 + gap / 2), "pi_gap") == "fails"
    assert _verdict(_report(student=None), "pi_gap") == "unknown"
    assert _verdict(_report(kl=THRESHOLDS["signal_kl"] / 2), "signal") == "fails"
    assert _verdict(_report(too_long=0.5), "room") == "fails"
    assert _verdict(_report(cut=0.9), "room") == "fails"
    rev = {"wrong_to_right": 0.1, "right_kept_right": 0.9, "wrong": 10, "right": 10}
    assert _verdict(_report(revision=rev), "revision") == "fails"
    assert _verdict(_report(revision={**rev, "wrong_to_right": 0.5}), "revision") == "holds"
    views = {"a": {"teacher_reward": 1.0}, "b": {"teacher_reward": 0.6}}
    assert _verdict(_report(multiview=views), "views") == "fails"  # one view already says it all
    assert _verdict(_report(multiview={**views, "a": {"teacher_reward": 0.7}}), "views") == "holds"
    # sufficient greedily: answer-only arithmetic's full solution (0.78 sampled, 1.00 greedy), where AVSD lost
    greedy_sufficient = {"a": {"teacher_reward": 0.78, "teacher_reward_greedy": 1.0}, "b": {"teacher_reward": 0.8}}
    assert _verdict(_report(multiview=greedy_sufficient), "views") == "fails"
    skills = {"bank_size": 1, "shown": True, "teacher_reward_with_skills": 0.5, "teacher_reward_without": 0.2}
    assert _verdict(_report(skills=skills), "skills") == "holds"
    assert _verdict(_report(skills={**skills, "teacher_reward_with_skills": 0.22}), "skills") == "fails"
    assert _verdict(_report(skills={**skills, "shown": False, "bank_size": 0}), "skills") == "unknown"
    # focus: the divergence's share on digit tokens against their share of the tokens
    assert _verdict(_report(signal={"reverse_kl": 0.3, "digit_share": 0.66, "digit_token_fraction": 0.31}),
                    "focus") == "holds"  # the main job's first logged window: 2.1x
    assert _verdict(_report(signal={"reverse_kl": 0.3, "digit_share": 0.21, "digit_token_fraction": 0.19}),
                    "focus") == "fails"  # SDPO on open addition: 1.1x, then its teacher's preamble
    no_digits = verdicts(_report(signal={"reverse_kl": 0.3, "digit_share": None, "digit_token_fraction": 0.0}))
    assert "focus" not in {v["premise"] for v in no_digits}  # answers that spell no numbers: nothing to read
    # stops: a teacher that follows the student must be as ready as the student to stop after a right answer
    stop = {"reverse_kl": 0.3, "student_p_stop": 0.81, "teacher_p_stop": 0.71}  # SDPO, EMA teacher: collapsed
    assert _verdict(_report(signal=stop, teacher_policy="ema"), "stops") == "fails"
    assert _verdict(_report(signal=stop, teacher_policy="sync"), "stops") == "fails"
    assert _verdict(_report(signal=stop, teacher_policy="initial"), "stops") == "holds"  # stayed stable
    level = {**stop, "teacher_p_stop": 0.81 - THRESHOLDS["stop_gap"] / 2}
    assert _verdict(_report(signal=level, teacher_policy="live"), "stops") == "holds"
    for unread in (_report(signal=stop), _report(signal={**stop, "teacher_p_stop": None}, teacher_policy="ema")):
        assert "stops" not in {v["premise"] for v in verdicts(unread)}  # no policy given, or no right stop seen
    # a following teacher and no right answer among the student's rollouts (keyed recall: the student knows no code):
    # nothing to compare, said so rather than left out; a fixed teacher needs no such reading
    none_right = {"reverse_kl": 0.3, "stops": 0, "student_p_stop": None, "teacher_p_stop": None}
    assert _verdict(_report(signal=none_right, teacher_policy="sync"), "stops") == "unknown"
    assert "stops" not in {v["premise"] for v in verdicts(_report(signal=none_right, teacher_policy="initial"))}


def test_digit_focus_matches_a_count_over_the_kept_tokens(tokenizer):
    """The share of the divergence on tokens that spell digits, over the model's own (kept) tokens only, checked
    against a plain loop over the token pieces."""
    from types import SimpleNamespace

    from selfdistill.premises import Diagnosis, _Batch

    ids = [i for i in range(len(tokenizer))]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    digit = [i for i, p in enumerate(pieces) if p and any(c.isdigit() for c in p)]
    other = [i for i, p in enumerate(pieces) if p and not any(c.isdigit() for c in p)]
    assert digit and other, "the test tokenizer must spell some digits"
    completions = [[digit[0], other[0], other[1], digit[-1]], [other[2], digit[0], other[3]]]
    masks = [[1, 1, 0, 1], [1, 1, 1]]  # an observation token (masked out) is never scored
    kept = [t for c, m in zip(completions, masks) for t, k in zip(c, m) if k]
    values = torch.tensor([0.5, 0.1, 0.9, 0.2, 0.3, 0.0], dtype=torch.float64)[: len(kept)].float()
    batch = _Batch([], [], [], completions, [], [], [])
    fake = SimpleNamespace(tokenizer=tokenizer, _digits=None)
    out = Diagnosis._digit_focus(fake, values, batch, masks)
    is_digit = [t in set(digit) for t in kept]
    expected = sum(v for v, d in zip(values.tolist(), is_digit) if d) / sum(values.tolist())
    assert out["digit_share"] == pytest.approx(expected, rel=1e-6)
    assert out["digit_token_fraction"] == pytest.approx(sum(is_digit) / len(kept))
    # misaligned: no figure rather than a wrong one
    assert Diagnosis._digit_focus(fake, values[:-1], batch, masks) == {}


def test_stopping_reads_both_models_at_the_students_stops_after_right_answers():
    """p(stop): at the last token of each finished, right rollout, the probability each model gives that end token;
    cut or wrong rollouts do not count (a plain loop over hand-made log-probabilities)."""
    from types import SimpleNamespace

    from selfdistill.premises import Diagnosis, _Batch

    eos, vocab = 5, 6
    torch.manual_seed(0)
    completions = [[1, 2, eos], [3, eos], [1, 2, 3], [4, eos]]  # right and stopped; right and stopped; cut; wrong
    rewards = [1.0, 1.0, 1.0, 0.0]
    student = [torch.log_softmax(torch.randn(len(c), vocab), -1) for c in completions]
    teacher = [torch.log_softmax(torch.randn(len(c), vocab), -1) for c in completions]
    batch = _Batch([], [], [], completions, [False, False, True, False], rewards, [])
    fake = SimpleNamespace(eos=[eos], threshold=0.5)
    out = Diagnosis._stopping(fake, student, teacher, batch)
    assert out["stops"] == 2
    for key, logps in (("student_p_stop", student), ("teacher_p_stop", teacher)):
        expected = (math.exp(logps[0][2, eos].item()) + math.exp(logps[1][1, eos].item())) / 2
        assert out[key] == pytest.approx(expected, rel=1e-6)
    none = Diagnosis._stopping(fake, student, teacher, _Batch([], [], [], completions, [], [0.0] * 4, []))
    assert none == {"stops": 0, "student_p_stop": None, "teacher_p_stop": None}
    episodes = _Batch([], [], [], completions, [], rewards, [], masks=[[1] * len(c) for c in completions])
    assert Diagnosis._stopping(fake, student, teacher, episodes) == {}


# ---------------------------------------------------------------------------------------------- end to end
class BareProblem(PrivilegedSource):
    """A teacher that sees exactly what the student sees: no privileged information at all."""

    def views(self, rollouts):
        return [[TeacherView(context=r.prompt, name="bare")] for r in rollouts]


def even_answer(prompts, completions, answer, **_):
    """Right exactly on every other row of build_dataset (answers 30, 38, 46, ...), whatever was written: rewards
    known in advance."""
    return [float(int(a) % 16 < 8) for a in answer]


def _args(tmp_path, **kw):
    return SelfDistillConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", max_completion_length=4,
                             num_generations=2, temperature=1.0, **kw)


def test_a_teacher_without_privileged_information_has_no_gap_and_no_signal(tmp_path, tokenizer):
    model = build_model(tokenizer)
    report = diagnose(model, tokenizer, build_dataset(6), BareProblem(), [even_answer], _args(tmp_path), prompts=6,
                      samples=2, progress=False)
    assert report["rollouts"] == 12 and report["prompts"] == 6
    share = 0.5
    assert report["student_reward"] == pytest.approx(share) and report["teacher_reward"] == pytest.approx(share)
    assert report["signal"]["reverse_kl"] == pytest.approx(0.0, abs=1e-6)  # same context, same distribution
    assert _verdict(report, "pi_gap") == "fails" and _verdict(report, "signal") == "fails"
    assert report["student_lengths"]["max"] <= 4


def test_the_teacher_generates_for_as_many_prompts_as_it_has_rollouts(tokenizer):
    """The teacher's own generations (capped at teacher_rollouts) spread over the prompts: with 4 samples a prompt
    and 8 teacher rollouts they cover 8 problems, not the first 2 prompts' groups; each group still holds its own
    prompt's rollouts (siblings are found by group)."""
    from selfdistill.premises import Diagnosis

    rows = list(build_dataset(8))
    diag = Diagnosis(build_model(tokenizer), tokenizer, rows, ReferenceSolution(column="solution"), [even_answer],
                     max_completion_length=4, samples=4, teacher_rollouts=8, progress=False)
    seen, original = [], diag._generate

    def spy(rows_, prompts, prompt_ids, *, greedy, max_new_tokens):
        out = original(rows_, prompts, prompt_ids, greedy=greedy, max_new_tokens=max_new_tokens)
        seen.append((greedy, max_new_tokens, [r["answer"] for r in rows_], out))
        return out

    diag._generate = spy
    diag.run()
    student = next(answers for greedy, limit, answers, _ in seen if not greedy and limit == 4)
    assert len(student) == 32 and all(student[j] == rows[j % 8]["answer"] for j in range(32))
    teacher = next(answers for greedy, limit, answers, _ in seen if not greedy and limit == 8)
    assert sorted(teacher) == sorted(r["answer"] for r in rows)  # 8 rollouts, 8 different problems


@pytest.mark.parametrize("prompts, expected", [(6, 64), (64, 64), (192, 192)])
def test_more_prompts_give_the_teacher_as_many_generations(tmp_path, tokenizer, monkeypatch, prompts, expected):
    """`--prompts 192` measures the teacher, the reviser and the student in the teacher's form on 192 rows, not on
    the first 64 (one teacher generation a prompt, never fewer than 64)."""
    import selfdistill.premises as premises

    seen = {}

    class Recorder:
        def __init__(self, model, tokenizer, rows, *args, **kwargs):
            seen.update(rows=len(rows), **kwargs)

        def run(self):
            return {}

    monkeypatch.setattr(premises, "Diagnosis", Recorder)
    diagnose(None, tokenizer, build_dataset(prompts), ReferenceSolution(column="solution"), [even_answer],
             _args(tmp_path), prompts=prompts, progress=False)
    assert seen["rows"] == prompts and seen["teacher_rollouts"] == expected


def test_a_reference_teacher_is_scored_on_the_student_tokens(tmp_path, tokenizer):
    model = build_model(tokenizer)
    report = diagnose(model, tokenizer, build_dataset(4), ReferenceSolution(column="solution"), [even_answer],
                      _args(tmp_path), prompts=4, samples=2, progress=False)
    assert report["signal"]["reverse_kl"] > 0 and report["signal"]["reference"]["tokens"] > 0
    assert 0.0 <= report["signal"]["digit_token_fraction"] <= 1.0
    # where the student or the teacher's top token spells a digit: a superset of the student's digit tokens
    assert report["signal"]["digit_pull_fraction"] >= report["signal"]["digit_token_fraction"]
    assert set(report["teacher"]["reference"]) >= {"reward", "reward_greedy", "lengths", "successes_too_long",
                                                   "reward_unbounded"}
    assert "rewards" not in report["teacher"]["reference"]
    assert report["teacher_policy"] == _args(tmp_path).teacher_policy  # the stops verdict reads the run's policy
    # What each role writes is kept (a few greedy texts) and the table shows the first.
    examples = report["teacher"]["reference"]["examples"]
    assert 1 <= len(examples) <= 3 and all(isinstance(t, str) for t in examples)
    assert 1 <= len(report["student_examples"]) <= 3
    from selfdistill.premises import format_report

    assert "teacher writes (greedy) [reference]" in format_report(report)


def test_scoring_keeps_the_models_own_tokens_and_matches_the_full_head(tokenizer):
    """An episode's observations are masked out: the head runs on the kept positions only, and what it gives equals
    the full-sequence log-probabilities at those positions (a float64 model; the scores are kept in float32)."""
    from selfdistill.premises import Diagnosis
    from selfdistill.sequences import completion_logits, splice

    model = build_model(tokenizer).double().eval()
    diag = Diagnosis(model, tokenizer, [], BareProblem(), [], max_completion_length=4, progress=False)
    contexts = [[5, 6, 7, 8], [9, 10, 11]]
    completions = [[12, 13, 14, 15, 16], [17, 18, 19]]
    masks = [[1, 0, 0, 1, 1], [0, 1, 0]]
    kept = diag._logprobs(contexts, completions, masks)
    with torch.no_grad():
        batch = splice(contexts, completions, tokenizer.pad_token_id)
        full = torch.log_softmax(completion_logits(model, batch).float(), -1)
    for k, mask in enumerate(masks):
        positions = [i for i, m in enumerate(mask) if m]
        assert kept[k].shape == (len(positions), full.shape[-1])
        torch.testing.assert_close(kept[k], full[k, positions], rtol=1e-6, atol=1e-6)


def test_scoring_runs_a_shared_beginning_once_and_keeps_the_rollouts_order(tokenizer):
    """Rows sharing a prompt (a prompt's samples, interleaved as diagnose samples them) are scored from one pass over
    that prompt, and each rollout gets its own log-probabilities back in its own place."""
    from selfdistill.premises import Diagnosis
    from selfdistill.sequences import completion_logits, splice

    model = build_model(tokenizer).double().eval()
    diag = Diagnosis(model, tokenizer, [], BareProblem(), [], max_completion_length=4, progress=False)
    a, b = list(range(5, 17)), list(range(30, 42))  # two 12-token prompts
    contexts = [a, b, a, b + [50], a]
    completions = [[12, 13], [17, 18, 19], [14], [20, 21], [15, 16, 17]]
    masks = [[1] * len(c) for c in completions]
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: seen.append(int(kw["input_ids"].numel())),
                                           with_kwargs=True)
    try:
        kept = diag._logprobs(contexts, completions, masks)
    finally:
        hook.remove()
    with torch.no_grad():
        batch = splice(contexts, completions, tokenizer.pad_token_id)
        full = torch.log_softmax(completion_logits(model, batch).float(), -1)
    for k, c in enumerate(completions):
        torch.testing.assert_close(kept[k], full[k, : len(c)], rtol=1e-6, atol=1e-6)
    assert sum(seen) < batch.input_ids.numel()  # fewer positions run than the rows one by one (padded)


def test_scoring_takes_the_models_own_logits_when_its_head_is_followed_by_a_transform(tokenizer):
    """A soft-capped head (Gemma 2) cannot be applied by hand: the kept positions' log-probabilities are still the
    model's own."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from selfdistill.premises import Diagnosis
    from selfdistill.sequences import completion_logits, splice

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5,
                          pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    model = Gemma2ForCausalLM(config).double().eval()
    diag = Diagnosis(model, tokenizer, [], BareProblem(), [], max_completion_length=4, progress=False)
    contexts, completions, masks = [[5, 6, 7]], [[12, 13, 14]], [[1, 0, 1]]
    kept = diag._logprobs(contexts, completions, masks)[0]
    with torch.no_grad():
        full = torch.log_softmax(completion_logits(model, splice(contexts, completions, tokenizer.pad_token_id)), -1)
    torch.testing.assert_close(kept, full[0, [0, 2]].float(), rtol=1e-6, atol=1e-6)


def test_a_rule_that_ignores_the_problem_is_scored_on_rows_with_options(tokenizer):
    """Always answering the k-th option scores the share of rows whose answer is printed k-th (counted here)."""
    from selfdistill.premises import Diagnosis
    from selfdistill.tasks.arithmetic import arithmetic_reward, make_arithmetic_dataset

    rows = make_arithmetic_dataset(60, 0, seed=3, choices=2)["train"].to_list()
    diag = Diagnosis(build_model(tokenizer), tokenizer, rows, BareProblem(), [arithmetic_reward],
                     max_completion_length=4, progress=False)
    blind = diag._blind_rules(rows)
    for k in (0, 1):
        expected = sum(r["options"].split(", ")[k] == r["answer"] for r in rows) / len(rows)
        assert blind["rules"][f"option {k + 1}"] == pytest.approx(expected)
    assert blind["best_rule_reward"] == max(blind["rules"].values()) and 0.2 < blind["best_rule_reward"] < 0.8
    assert diag._blind_rules([{k: v for k, v in r.items() if k != "options"} for r in rows]) is None
    rule = {"rules": {"option 1": 0.45, "option 2": 0.55}, "best_rule": "option 2", "best_rule_reward": 0.55}
    assert _verdict(_report(teacher=0.41, blind_rule=rule), "blind_rule") == "fails"
    assert _verdict(_report(teacher=0.80, blind_rule=rule), "blind_rule") == "holds"


def test_a_teacher_right_only_where_the_rule_is_right_fails_the_blind_rule(tokenizer):
    """The teacher's rewards split by the best rule's verdict per row: a teacher that answers the last option
    everywhere beats a rule's mean by nothing over the halves (0.5), one that knows the task scores on both."""
    from selfdistill.premises import Diagnosis
    from selfdistill.sources.base import Rollout
    from selfdistill.tasks.arithmetic import arithmetic_reward, make_arithmetic_dataset

    rows = make_arithmetic_dataset(40, 0, seed=3, choices=2)["train"].to_list()
    diag = Diagnosis(build_model(tokenizer), tokenizer, rows, BareProblem(), [arithmetic_reward],
                     max_completion_length=4, progress=False)
    rollouts = [Rollout(row=rows[i % 40], prompt=rows[i % 40]["prompt"], completion="", completion_ids=[],
                        reward=0.0, group=i % 40) for i in range(80)]  # sample-major, as diagnose lays them out
    last_is_right = [float(r["options"].split(", ")[1] == r["answer"]) for r in rows]
    best = diag._blind_rules(rows)["best_rule"]
    rule_right = last_is_right if best == "option 2" else [1.0 - x for x in last_is_right]
    leaning = diag._blind_rules(rows, rollouts, [rule_right[i % 40] for i in range(60)])
    assert leaning["teacher"]["where_rule_right"] == 1.0 and leaning["teacher"]["where_rule_wrong"] == 0.0
    assert leaning["teacher"]["balanced"] == 0.5
    assert leaning["teacher"]["rollouts_where_rule_wrong"] == sum(1 - rule_right[i % 40] for i in range(60))
    assert leaning["student"]["balanced"] == 0.0  # every student rollout scored 0
    knowing = diag._blind_rules(rows, rollouts, [1.0 if i % 5 else 0.0 for i in range(60)])
    assert 0.7 < knowing["teacher"]["balanced"] < 0.9
    # the verdict: ahead of the rule's mean, but only where the rule is right -> fails; on both halves -> holds
    mean_only = {k: leaning[k] for k in ("rules", "best_rule", "best_rule_reward")}
    teacher = leaning["best_rule_reward"] + 0.2
    assert _verdict(_report(teacher=teacher, blind_rule=mean_only), "blind_rule") == "holds"
    assert _verdict(_report(teacher=teacher, blind_rule=leaning), "blind_rule") == "fails"
    assert _verdict(_report(teacher=teacher, blind_rule=knowing), "blind_rule") == "holds"


def test_an_environment_is_diagnosed_on_episodes_and_scored_on_the_models_own_tokens(tmp_path, tokenizer):
    """Under an environment: episodes, not single replies; the signal counts only the model's own tokens (the
    observations are masked); the default number of prompts follows max(4, 320 // max_turns**2)."""
    import functools

    from datasets import Dataset

    from selfdistill.envs import GuessNumber

    rows = GuessNumber.make_rows(40, seed=0, split="train", low=1, high=4, max_turns=3)
    model = build_model(tokenizer, max_position_embeddings=1024)
    source = Skills(seed_skills=["Guess two first, then move up or down by one."], summaries_per_step=0)
    args = _args(tmp_path, max_turns=3)
    report = diagnose(model, tokenizer, Dataset.from_list(rows), source, [], args, samples=2, progress=False,
                      environment_factory=functools.partial(GuessNumber, low=1, high=4, max_turns=3))
    assert report["episodes"] and report["prompts"] == 320 // 9 and report["rollouts"] == 2 * (320 // 9)
    # every episode has observations between the model's replies: fewer scored tokens than transcript tokens
    assert 0 < report["signal"]["skills"]["tokens"] < report["student_lengths"]["mean"] * report["rollouts"]
    assert report["signal"]["reverse_kl"] > 0  # the seeded skill changes the teacher's context
    assert report["teacher"]["skills"]["reward_greedy"] is None and report["teacher_reward"] is not None


def test_diagnose_splits_the_teachers_reward_by_the_blind_rule(tmp_path, tokenizer):
    """End to end: with an ``options`` column the report carries the split. even_answer rewards a row whatever is
    written, so every rule and the teacher are right on the same rows: balanced 0.5, and the premise fails."""
    data = build_dataset(6).map(lambda r: {"options": f"{r['answer']}, {int(r['answer']) + 10}"})
    report = diagnose(build_model(tokenizer), tokenizer, data, Reviser(), [even_answer], _args(tmp_path), prompts=6,
                      samples=2, progress=False)
    split = report["blind_rule"]["teacher"]
    assert split["where_rule_right"] == 1.0 and split["where_rule_wrong"] == 0.0 and split["balanced"] == 0.5
    assert report["blind_rule"]["student"]["balanced"] == 0.5
    assert "rewards" not in report["teacher"]["teacher"]  # per-rollout rewards stay out of diagnosis.json
    assert _verdict(report, "blind_rule") == "fails"


def test_reviser_revision_rates_and_multiview_jsd(tmp_path, tokenizer):
    model = build_model(tokenizer)
    report = diagnose(model, tokenizer, build_dataset(6), Reviser(), [even_answer], _args(tmp_path), prompts=6,
                      samples=2, progress=False)
    # even_answer fixes each row's verdict: a wrong row's revision stays wrong, a right one stays right
    assert report["revision"]["wrong_to_right"] == 0.0 and report["revision"]["right_kept_right"] == 1.0
    assert report["revision"]["wrong"] + report["revision"]["right"] == 12
    views = MultiView(views=["full_solution", "answer_only"], column="solution", answer_column="answer")
    report = diagnose(model, tokenizer, build_dataset(4), views, [even_answer], _args(tmp_path), prompts=4,
                      samples=2, progress=False)
    assert set(report["multiview"]) == {"full_solution", "answer_only"}
    assert report["signal"]["pairwise_jsd"]["full_solution|answer_only"] > 0
    assert any(v["premise"] == "views" for v in report["verdicts"])


def test_skills_without_a_bank_are_unknown_and_a_seeded_bank_is_measured(tmp_path, tokenizer):
    model = build_model(tokenizer)
    data = build_dataset(4)
    empty = diagnose(model, tokenizer, data, Skills(summaries_per_step=0), [even_answer], _args(tmp_path),
                     prompts=4, samples=2, progress=False)
    assert _verdict(empty, "skills") == "unknown"
    seeded_source = Skills(summaries_per_step=0, seed_skills=["Add the tens, then the ones."])
    seeded = diagnose(model, tokenizer, data, seeded_source,
                      [even_answer], _args(tmp_path), prompts=4, samples=2, progress=False)
    assert seeded["skills"]["shown"] and seeded["skills"]["teacher_reward_with_skills"] is not None


def _cli_recipe(tmp_path, tokenizer, method: str, source: dict, rewards: list[str], num_generations: int,
                **sections) -> str:
    """A recipe file over a tiny saved model and one-digit addition, for the ``diagnose`` command."""
    model_dir = tmp_path / "tiny"
    build_model(tokenizer, max_position_embeddings=1024).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    recipe = {
        "method": method, "model": str(model_dir),
        "data": {"task": "arithmetic", "n_train": 16, "n_test": 4, "digits": 1},
        "source": source, "rewards": rewards, **sections,
        "training": {"output_dir": str(tmp_path / "out"), "max_steps": 1, "per_device_train_batch_size": 4,
                     "num_generations": num_generations, "max_completion_length": 4, "use_cpu": True,
                     "save_strategy": "no"},
    }
    path = tmp_path / f"{method}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def test_cli_diagnose_writes_diagnosis_json(tmp_path, tokenizer, capsys):
    path = _cli_recipe(tmp_path, tokenizer, "opsd", {"type": "reference", "column": "solution"}, ["arithmetic"], 2)
    assert main(["diagnose", path, "--prompts", "4", "--samples", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "pi_gap:" in out and "signal:" in out and "room:" in out
    written = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert {"student_reward", "teacher_reward", "signal", "verdicts", "thresholds"} <= set(written)
    assert written["rollouts"] == 8
    assert main(["diagnose", path, "--prompts", "0"]) == 2
    assert main(["diagnose", path, "--skills", str(tmp_path / "none.json")]) == 2  # not a Skill-SD source


def test_contrastive_hints_generate_under_the_correct_hint_only_and_greedy_once_per_context(tmp_path, tokenizer,
                                                                                            monkeypatch):
    """RLCSD's wrong hints are scored (the contrast) but not generated under; a teacher's greedy answer is decoded
    once per distinct context, not once per rollout (the G rollouts of a prompt share it)."""
    import selfdistill.premises as premises
    from selfdistill.methods.rlcsd import ContrastiveHints

    calls = []
    real = premises.sample_completions

    def spy(model, prompt_ids, **kwargs):
        calls.append((kwargs["do_sample"], len(prompt_ids)))
        return real(model, prompt_ids, **kwargs)

    monkeypatch.setattr(premises, "sample_completions", spy)
    report = diagnose(build_model(tokenizer), tokenizer, build_dataset(4), ContrastiveHints(), [even_answer],
                      _args(tmp_path), prompts=4, samples=2, progress=False)
    assert report["views"] == ["correct_hint", "wrong_hint_1"] and list(report["teacher"]) == ["correct_hint"]
    assert "correct_hint|wrong_hint_1" in report["signal"]["pairwise_jsd"]
    # student greedy (4 prompts), student sampled (8), teacher sampled on every rollout's context (8), teacher greedy
    # once per distinct context (4 prompts)
    assert calls == [(False, 4), (True, 8), (True, 8), (False, 4)]


def _srt_recipe(tmp_path, tokenizer, monkeypatch, module: str, **sections) -> tuple[str, list]:
    """An SD-Zero recipe whose SRT stage accepts every other revision, and a list that records, in order,
    ``("before_srt" | "after_srt" | "measured", weights checksum)`` of the model the stage and diagnose see."""
    import selfdistill.methods.sdzero.srt as srt_module
    import selfdistill.premises as premises

    def checksum(model):
        return float(sum(p.detach().double().sum() for p in model.parameters()))

    events: list = []
    real_srt, real_diagnose = srt_module.self_revision_training, premises.diagnose

    def srt_spy(model, *args, **kwargs):
        events.append(("before_srt", checksum(model)))
        stats = real_srt(model, *args, **kwargs)
        events.append(("after_srt", checksum(model)))
        return stats

    def diagnose_spy(model, *args, **kwargs):
        events.append(("measured", checksum(model)))
        return real_diagnose(model, *args, **kwargs)

    monkeypatch.setattr(srt_module, "self_revision_training", srt_spy)
    monkeypatch.setattr(premises, "diagnose", diagnose_spy)
    (tmp_path / f"{module}.py").write_text("def every_other(prompts, completions, **kw):\n"
                                           "    return [float(i % 2) for i in range(len(completions))]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _cli_recipe(tmp_path, tokenizer, "sdzero", {"type": "reviser"}, [f"{module}.every_other"], 1,
                       srt={"prompts": 8, "revisions": 1, "max_new_tokens": 4, "epochs": 1, "learning_rate": 1e-3,
                            "train_batch_size": 4, "keep_truncated": True}, **sections)
    return path, events


def test_an_sdzero_recipe_is_diagnosed_after_its_self_revision_stage(tmp_path, tokenizer, monkeypatch, capsys):
    """SD-Zero's teacher is the reviser its SRT stage leaves: diagnose runs that stage first and measures the model
    it leaves (``--no-srt`` measures the model as named)."""
    path, events = _srt_recipe(tmp_path, tokenizer, monkeypatch, "lenient_srt")
    args = ["diagnose", path, "--prompts", "4", "--samples", "2", "--no-progress", "--allow-code", "lenient_srt"]
    assert main(args) == 0
    written = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert written["srt"]["sft_steps"] >= 1 and "self-revision stage first" in capsys.readouterr().out
    seen = dict(events)
    assert seen["after_srt"] != seen["before_srt"] and seen["measured"] == seen["after_srt"]
    events.clear()  # the stage is kept in the output folder (next test); --no-srt neither runs nor loads it
    assert main([*args, "--no-srt"]) == 0
    assert [kind for kind, _ in events] == ["measured"] and events[0][1] == seen["before_srt"]
    assert "srt" not in json.loads((tmp_path / "out" / "diagnosis.json").read_text())


def test_a_self_revision_stage_runs_once_per_recipe_and_output_folder(tmp_path, tokenizer, monkeypatch):
    """diagnose keeps the reviser its SRT stage leaves in the output folder; a second diagnose and ``train`` load it
    instead of running the stage again, and a changed stage setting or a missing record runs it again."""
    path, events = _srt_recipe(tmp_path, tokenizer, monkeypatch, "lenient_srt2", eval={"before": False, "after": False})

    def runs():
        return sum(kind == "after_srt" for kind, _ in events)

    def measured():
        return [value for kind, value in events if kind == "measured"]

    flags = ["--no-progress", "--allow-code", "lenient_srt2"]
    diag = ["diagnose", path, "--prompts", "4", "--samples", "2", *flags]
    stage = tmp_path / "out" / "srt" / "reviser"
    assert main(diag) == 0 and runs() == 1
    assert (stage / "stage.json").is_file() and (stage / "model.safetensors").is_file()
    first = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert main(diag) == 0 and runs() == 1  # loaded, not run
    again = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    for key in ("student_reward", "teacher_reward", "revision", "signal", "student_lengths"):
        assert again[key] == first[key], key  # the same draws, whether the stage ran here or was loaded
    assert measured()[1] == measured()[0] == dict(events)["after_srt"]  # the same reviser measured both times
    written = json.loads((tmp_path / "out" / "diagnosis.json").read_text())
    assert written["srt"]["reused_from"] == str(stage) and written["srt"]["sft_steps"] >= 1
    assert main(["train", path, *flags]) == 0 and runs() == 1  # training starts from the same reviser
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["srt"]["reused_from"] == str(stage)
    # another stage setting, or a record that is gone: the stage runs again
    assert main(["diagnose", path, "srt.learning_rate=2e-3", "--prompts", "4", "--samples", "2", *flags]) == 0
    assert runs() == 2 and "reused_from" not in json.loads((tmp_path / "out" / "diagnosis.json").read_text())["srt"]
    (stage / "stage.json").unlink()
    assert main(diag) == 0 and runs() == 3


def test_the_pull_share_counts_where_the_student_or_the_teacher_spells_a_digit():
    """Beside `focus`: a teacher that would write a digit where the student writes a word pulls towards the answer;
    the divergence at such positions counts with the student's own digit tokens (hand-made, ids 1 and 3 digits)."""
    from types import SimpleNamespace

    from selfdistill.premises import Diagnosis

    diag = Diagnosis.__new__(Diagnosis)  # only the digit table is needed
    diag._digits = torch.tensor([False, True, False, True])
    sampled = SimpleNamespace(completion_ids=[[0, 2], [1]], masks=None)
    values = torch.tensor([0.5, 0.3, 0.2])
    out = diag._digit_focus(values, sampled, [[1, 1], [1]], pulls=torch.tensor([3, 2, 1]))
    assert out["digit_share"] == pytest.approx(0.2) and out["digit_token_fraction"] == pytest.approx(1 / 3)
    assert out["digit_pull_share"] == pytest.approx(0.7) and out["digit_pull_fraction"] == pytest.approx(2 / 3)
    assert "digit_pull_share" not in diag._digit_focus(values, sampled, [[1, 1], [1]])  # no teacher tokens given


@pytest.mark.parametrize("answer, expected", [
    ("73 + 99 = 172", True),  # the two operands before the result
    ("The answer is: 73 + 99 = 172.", True),
    ("The answer is 172.", False),  # the result alone
    ("132 is indeed one of the two: 132 is indeed", False),  # one of the task's numbers, twice
    ("12 + 34 = 46", False),  # numbers the task does not hold
    ("73 + 99", False),  # the last number is the result, not work
])
def test_an_answer_shows_its_work_when_it_names_two_of_the_tasks_numbers_before_its_last(answer, expected):
    from selfdistill.premises import shows_work

    task = [{"role": "system", "content": "You add 2 numbers."},
            {"role": "user", "content": "What is 73 + 99? The answer is one of: 172 or 182."}]
    assert shows_work(answer, task) is expected
    assert shows_work(answer, task[1]["content"]) is expected  # a plain prompt reads the same


def test_pi_gap_reads_the_greedy_rewards_and_focus_reports_the_worked_form_without_judging_it():
    """Rows from docs/diagnose.md ("Does diagnose predict?"): SD-Zero on open addition (+0.14 sampled, -0.05 greedy:
    gained nothing over its stage) and a format skill (+0.04 sampled, +0.19 greedy). A teacher writing the sum out
    where the student does not is reported in `focus`'s line, not judged: as a verdict it failed its first test."""
    open_addition = _report(student=0.28, teacher=0.42, student_reward_greedy=0.45, teacher_reward_greedy=0.41)
    assert _verdict(open_addition, "pi_gap") == "fails"
    assert _verdict(_report(student=0.28, teacher=0.42), "pi_gap") == "holds"  # no greedy figures: the sampled gap
    skill = _report(student=0.09, teacher=0.12, student_reward_greedy=0.08, teacher_reward_greedy=0.27,
                    skills={"bank_size": 1, "shown": True, "teacher_reward_with_skills": 0.12,
                            "teacher_reward_without": 0.09})
    skill["teacher"]["v"]["reward_greedy"] = 0.27
    assert _verdict(skill, "pi_gap") == "holds" and _verdict(skill, "skills") == "holds"
    worked = _report(signal={"reverse_kl": 0.3, "digit_share": 0.16, "digit_token_fraction": 0.29},
                     student_shows_work=0.05)
    worked["teacher"]["v"]["shows_work"] = 0.77
    line = next(v for v in verdicts(worked) if v["premise"] == "focus")
    assert line["verdict"] == "fails" and "in 77% of its greedy answers, the student in 5%" in line["why"]


def test_the_form_prefix_is_a_greedy_answer_up_to_its_last_number(tokenizer):
    from selfdistill.premises import Diagnosis

    diag = Diagnosis(build_model(tokenizer), tokenizer, list(build_dataset(2)), ReferenceSolution(column="solution"),
                     [even_answer], max_completion_length=16, progress=False)
    text = "The answer is: 91 + 94 = 185"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix = diag._form_prefix(ids)
    assert ids[: len(prefix)] == prefix
    shown = tokenizer.decode(prefix)
    assert text.startswith(shown) and "94" in shown and text[len(shown):].strip() == "185"
    assert diag._form_prefix(tokenizer("no number here", add_special_tokens=False)["input_ids"]) is None


def test_the_student_is_scored_continuing_the_teachers_form_beside_its_own_greedy_reward(tokenizer):
    """The student's reply starts with the teacher's answer up to its last number; the verifier reads the whole reply
    (the form included), the student's own greedy rewards are read on the same rows, and a teacher answer without a
    number is left out."""
    from selfdistill.premises import Diagnosis, _Batch

    rows = list(build_dataset(3))

    def writes_equation(prompts, completions, **_):  # chat prompts: each completion is a list of messages
        return [float("=" in (c if isinstance(c, str) else c[-1]["content"])) for c in completions]

    diag = Diagnosis(build_model(tokenizer), tokenizer, rows, ReferenceSolution(column="solution"),
                     [writes_equation], max_completion_length=12, progress=False)
    diag._student_greedy = [0.0, 1.0, 0.0]
    answers = ["30 = 30", "no number", "12 + 34 = 46"]
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    teacher = _Batch(rows, [r["prompt"] for r in rows], [[] for _ in rows], ids, [False] * 3, [None] * 3, answers)
    form = diag._in_form(teacher, [0, 1, 2])
    assert form["rows"] == 2  # "no number" has no form
    assert form["student_reward_in_form"] == 1.0  # every reply kept the form's "="
    assert form["student_reward_greedy"] == 0.0 and form["gain"] == 1.0  # rows 0 and 2 of the student's own
    assert all("=" in t for t in form["examples"])


@pytest.mark.parametrize("in_form, own, teacher_g, expected", [
    (0.75, 0.53, 0.81, "holds"),  # SD-Zero on two options (ninth session's stage): +16.3 over GRPO
    (0.25, 0.08, 0.27, "holds"),  # Skill-SD's format skill, initial teacher: +10.8 over GRPO's mean
    (0.56, 0.23, 0.44, "holds"),  # SD-Zero's earlier stage on open addition, seed 0: the reviser's sums are worse
    (0.47, 0.20, 0.39, "holds"),  # SD-Zero's stage160 on open addition: worse sums too, +15.7 over its stage
    (0.15, 0.08, 0.33, "fails"),  # SDPO in its own wording: the form helps too little, -56.5
    (0.45, 0.45, 0.41, "fails"),  # SD-Zero on open addition: no help from the form, -1.0
])
def test_focus_holds_on_wording_when_it_is_a_form_the_student_computes_better_in(in_form, own, teacher_g, expected):
    """Rows of docs/diagnose.md ("Does diagnose predict?", eleventh and twelfth sessions): the divergence sits on
    wording (0.54x) in every case; `focus` then reads the student answering in the teacher's form, whatever the
    teacher's own reward in it."""
    report = _report(signal={"reverse_kl": 0.3, "digit_share": 0.16, "digit_token_fraction": 0.29},
                     student_reward_greedy=own, teacher_reward_greedy=teacher_g)
    report["teacher"]["v"]["in_form"] = {"rows": 64, "student_reward_greedy": own, "student_reward_in_form": in_form}
    line = next(v for v in verdicts(report) if v["premise"] == "focus")
    assert line["verdict"] == expected and f"scores {in_form:.2f} greedy against its own {own:.2f}" in line["why"]
    digits = _report(signal={"reverse_kl": 0.3, "digit_share": 0.6, "digit_token_fraction": 0.3})
    assert _verdict(digits, "focus") == "holds"  # on the answer's digits it holds without any form figure


@pytest.mark.parametrize("rate, wrong, close", [
    (0.245, 143, True),  # the earlier stage's seed 0 on open addition: failed, and gained +10.0
    (0.429, 163, False),  # the recipe's stage, seed 3: held clearly
    (0.20, 10, True),  # ten wrong answers: a standard error of 0.13
])
def test_a_revision_rate_within_one_standard_error_of_its_threshold_is_said_to_be_close(rate, wrong, close):
    report = _report(revision={"wrong_to_right": rate, "wrong": wrong, "right_kept_right": 1.0, "right": 5})
    line = next(v for v in verdicts(report) if v["premise"] == "revision")
    se = math.sqrt(rate * (1 - rate) / wrong)
    assert (abs(rate - THRESHOLDS["revision"]) < se) == close  # the brute-force reading of "close"
    assert ("within one standard error" in line["why"]) == close
    assert line["verdict"] == ("holds" if rate >= THRESHOLDS["revision"] else "fails")  # the verdict is unchanged


def test_a_greedy_gap_near_its_threshold_is_said_to_be_close_on_few_prompts_only():
    near = _report(student_reward_greedy=0.3125, teacher_reward_greedy=0.3958, prompts=192)  # seed 4: +0.08
    line = next(v for v in verdicts(near) if v["premise"] == "pi_gap")
    assert line["verdict"] == "fails" and "within one standard error (about 0.05)" in line["why"]
    far = _report(student_reward_greedy=0.12, teacher_reward_greedy=0.46, prompts=192)  # seed 3: +0.34
    assert "within one standard error" not in next(v for v in verdicts(far) if v["premise"] == "pi_gap")["why"]
    many = _report(student_reward_greedy=0.3125, teacher_reward_greedy=0.3958, prompts=100_000)
    assert "within one standard error" not in next(v for v in verdicts(many) if v["premise"] == "pi_gap")["why"]
