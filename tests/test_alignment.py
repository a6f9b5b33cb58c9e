"""Audit: for every privileged source, the teacher's logits at completion position t predict the token the student
sampled at t (METHODS.md §1, "teacher context assembly").

The model here is a *successor machine*: a one-layer Llama whose attention and MLP write nothing, whose embedding is
the identity and whose head maps token v to v + 1. Its logits at a position depend only on the token at that
position, and their argmax is that token's successor. The student therefore samples (top_k=1) the chain
``y_t = succ(y_{t-1})``, and a teacher pass that is aligned predicts ``argmax = succ(input at W - 1 + t)`` = y_t for
every t >= 1 and succ(last context token) at t = 0. A teacher scoring one position too early or too late predicts
``y_{t-1}`` or ``y_{t+1}``; a re-tokenised completion predicts other ids still. The successor map has no fixed
point and no 2-cycle, so every such slip fails the test.

Each source goes through the trainer's real path (rollouts, views, teacher contexts, shared prefixes, splice, the
teacher pass, the keep-mask of an environment) and the per-token logits are taken where the loss receives them.
"""

import functools

import pytest
import torch
from conftest import build_dataset, build_model
from datasets import Dataset

import selfdistill.losses as losses_module
import selfdistill.methods.avsd.combine as combine_module
from selfdistill import SelfDistillConfig, SelfDistillTrainer
from selfdistill.envs import GuessNumber
from selfdistill.sources import MultiView, ReferenceSolution, Reviser, Skills


def successor_model(tokenizer):
    vocab = len(tokenizer)
    model = build_model(tokenizer, hidden_size=vocab, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=1024)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(vocab))
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_(torch.roll(torch.eye(vocab), shifts=1, dims=0))  # logit[v + 1] high at token v
    return model


def succ(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    return (ids + 1) % vocab


def exact_reward(prompts, completions, answer, **kwargs):
    return [float(a in c[0]["content"]) for c, a in zip(completions, answer)]


def _args(tmp_path, **overrides):
    settings = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
                    max_completion_length=6, top_k=1, learning_rate=1e-3, logging_steps=1, report_to=[],
                    save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True)
    settings.update(overrides)
    return SelfDistillConfig(**settings)


def _capture(monkeypatch):
    """Record what the loss receives: student logits, teacher (view) logits and the sampled tokens."""
    seen = []

    def single(student, teacher, tokens, spec, old_logps=None):
        seen.append((student.detach(), teacher.detach()[None], tokens))
        return original_single(student, teacher, tokens, spec, old_logps=old_logps)

    def multi(student, views, tokens, spec, view, old_logps=None):
        seen.append((student.detach(), views.detach(), tokens))
        return original_multi(student, views, tokens, spec, view, old_logps=old_logps)

    # The sources' token_losses hooks look these up at call time.
    original_single, original_multi = losses_module.token_losses, combine_module.multiview_token_losses
    monkeypatch.setattr(losses_module, "token_losses", single)
    monkeypatch.setattr(combine_module, "multiview_token_losses", multi)
    return seen


def _previous_tokens(inputs, view: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every scored token: the id the model reads at its position (the context's last id at t = 0, else
    y_{t-1}), and whether t = 0. Flattened in the loss's order (rollout by rollout, kept tokens only)."""
    previous, first = [], []
    masks = inputs.get("loss_masks") or [None] * len(inputs["completion_ids"])
    for context, completion, mask in zip(inputs["teacher_ids"], inputs["completion_ids"], masks):
        reads = [context[view][-1]] + list(completion[:-1])
        for t, (read, keep) in enumerate(zip(reads, mask or [1] * len(completion))):
            if keep:
                previous.append(read)
                first.append(t == 0)
    return torch.tensor(previous), torch.tensor(first)


def _check(trainer, seen, inputs, first_token_follows_prompt=True):
    vocab = len(trainer.processing_class)
    assert len(seen) == 1
    student, views, tokens = seen[0]
    assert tokens.numel() > 0
    # The student side: its logits at t predict y_t (it sampled greedily from the same machine).
    assert torch.equal(student.argmax(-1), tokens)
    for v in range(views.shape[0]):
        previous, first = _previous_tokens(inputs, v)
        predicted = views[v].argmax(-1)
        # Aligned: each position reads the token before it, so the teacher predicts its successor ...
        assert torch.equal(predicted, succ(previous, vocab)), f"view {v} reads the wrong positions"
        # ... which is exactly the student's sampled token at every t >= 1 (and at t = 0 when the teacher's
        # context ends with the same generation prompt as the student's).
        later = ~first if not first_token_follows_prompt else torch.ones_like(first)
        assert torch.equal(predicted[later], tokens[later]), f"view {v} does not score the student's tokens"


def _run(trainer, monkeypatch):
    seen = _capture(monkeypatch)
    rows = trainer.train_dataset.select(range(4)).to_list()
    [inputs] = trainer._make_rollouts(rows, "train", 1)
    trainer.compute_loss(trainer.model, inputs)
    return seen, inputs


@pytest.mark.parametrize("share_prefix", [True, False])
def test_opsd_teacher_scores_the_student_tokens(tmp_path, tokenizer, monkeypatch, share_prefix):
    args = _args(tmp_path, share_teacher_prefix=share_prefix)
    trainer = SelfDistillTrainer(model=successor_model(tokenizer), args=args, train_dataset=build_dataset(),
                                 processing_class=tokenizer,
                                 privileged=ReferenceSolution(column="solution"))
    seen, inputs = _run(trainer, monkeypatch)
    assert inputs["teacher_ids"][0][0] != inputs["prompt_ids"][0]  # the teacher really sees more
    _check(trainer, seen, inputs)


def test_sdzero_reviser_scores_only_the_second_copy(tmp_path, tokenizer, monkeypatch):
    trainer = SelfDistillTrainer(model=successor_model(tokenizer), args=_args(tmp_path), train_dataset=build_dataset(),
                                 processing_class=tokenizer, privileged=Reviser(), reward_funcs=[exact_reward])
    seen, inputs = _run(trainer, monkeypatch)
    # The teacher context ends with the first copy of y and the cue; the scored copy follows the cue.
    for context, completion in zip(inputs["teacher_ids"], inputs["completion_ids"]):
        first_copy = completion[:-1] if completion[-1] in trainer.eos else completion
        assert first_copy and any(context[0][i : i + len(first_copy)] == first_copy for i in range(len(context[0])))
    _check(trainer, seen, inputs, first_token_follows_prompt=False)


@pytest.mark.parametrize("form", ["full", "sampled"])
def test_avsd_every_view_scores_the_student_tokens(tmp_path, tokenizer, monkeypatch, form):
    source = MultiView(answer_column="answer", form=form, top_k=4)
    trainer = SelfDistillTrainer(model=successor_model(tokenizer), args=_args(tmp_path), train_dataset=build_dataset(),
                                 processing_class=tokenizer, privileged=source)
    seen, inputs = _run(trainer, monkeypatch)
    assert seen[0][1].shape[0] == 3  # full, partial, answer-only
    _check(trainer, seen, inputs)


def test_skillsd_teacher_scores_the_agent_tokens_of_an_episode(tmp_path, tokenizer, monkeypatch):
    args = _args(tmp_path, max_completion_length=4, max_turns=3, support="sampled", clip="none",
                 teacher_policy="live")
    rows = GuessNumber.make_rows(8, seed=0, split="train", low=1, high=4, max_turns=3)
    source = Skills(summaries_per_step=0)
    for row in rows:
        source.bank.add(source.task_of(row), "Guess two first, then move up or down by one.", step=0)
    trainer = SelfDistillTrainer(model=successor_model(tokenizer), args=args, train_dataset=Dataset.from_list(rows),
                                 processing_class=tokenizer, privileged=source,
                                 environment_factory=functools.partial(GuessNumber, low=1, high=4, max_turns=3))
    seen, inputs = _run(trainer, monkeypatch)
    assert any(0 in m for m in inputs["loss_masks"]), "the episodes should hold environment turns"
    assert inputs["teacher_ids"][0][0] != inputs["prompt_ids"][0]  # the skill is in the teacher's context
    _check(trainer, seen, inputs)


def test_a_misaligned_teacher_is_caught(tmp_path, tokenizer, monkeypatch):
    """The check itself: a teacher pass shifted by one position fails it."""
    trainer = SelfDistillTrainer(model=successor_model(tokenizer), args=_args(tmp_path), train_dataset=build_dataset(),
                                 processing_class=tokenizer, privileged=ReferenceSolution(column="solution"))
    original = trainer._teacher_pass

    def shifted(model, inputs, head):
        out, head_weight = original(model, inputs, head)
        return out.roll(1, dims=1), head_weight

    monkeypatch.setattr(trainer, "_teacher_pass", shifted)
    seen, inputs = _run(trainer, monkeypatch)
    with pytest.raises(AssertionError, match="reads the wrong positions"):
        _check(trainer, seen, inputs)
