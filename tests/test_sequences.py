"""Token splicing: the teacher scores exactly the student's completion ids."""

import pytest
import torch
from conftest import build_model

from selfdistill.sequences import completion_logits, fit_view, render_context, splice
from selfdistill.sources import ReferenceSolution, Rollout, TeacherView


def test_splice_layout_and_positions():
    batch = splice([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], pad_id=0)
    assert batch.context_width == 3
    assert batch.input_ids.tolist() == [[1, 2, 3, 7, 8, 0], [0, 0, 4, 9, 10, 11]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 4], [0, 0, 0, 1, 2, 3]]
    assert batch.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]


@pytest.mark.parametrize("text", ["  two  spaces\n\ttab", "Héllo wörld ✓ 数学", "“quotes” — dash", "42"])
def test_teacher_sequence_holds_the_exact_completion_ids(tokenizer, text):
    # A non-canonical split of the completion (one token per byte-level piece) must survive untouched:
    # re-tokenising the text would merge it differently.
    canonical = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.convert_tokens_to_ids(t) for t in tokenizer.convert_ids_to_tokens(canonical)]
    split = []
    for token in tokenizer.convert_ids_to_tokens(pieces):
        split.extend(tokenizer.convert_tokens_to_ids(list(token)))
    completion = split + [tokenizer.eos_token_id]
    assert tokenizer(tokenizer.decode(split), add_special_tokens=False)["input_ids"] != split or len(split) == len(
        canonical
    )
    rollout = Rollout(
        row={"solution": "x = 1"},
        prompt=[{"role": "user", "content": "Q?"}],
        completion=tokenizer.decode(split),
        completion_ids=completion,
    )
    (view,) = ReferenceSolution().views([rollout])[0:1][0]
    context, cut = fit_view(tokenizer, view, len(completion), 10_000)
    assert not cut
    batch = splice([context, [5]], [completion, [3]], pad_id=tokenizer.pad_token_id)
    w = batch.context_width
    assert batch.input_ids[0, w : w + len(completion)].tolist() == completion
    assert batch.input_ids[0, :w][batch.attention_mask[0, :w].bool()].tolist() == context


def test_student_and_teacher_share_the_chat_template(tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    rollout = Rollout(row={"solution": "2 + 2 = 4"}, prompt=prompt, completion="4", completion_ids=[1])
    (view,) = ReferenceSolution().views([rollout])[0]
    student = tokenizer.decode(render_context(tokenizer, prompt))
    teacher = tokenizer.decode(render_context(tokenizer, view.context))
    assert student.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert teacher.startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert student.endswith("<|im_start|>assistant\n") and teacher.endswith("<|im_start|>assistant\n")
    assert "2 + 2 = 4" in teacher and "2 + 2 = 4" not in student


def test_logits_at_completion_positions_match_an_unpadded_forward(tokenizer):
    model = build_model(tokenizer)
    contexts, completions = [[5, 6, 7, 8], [9]], [[10, 11], [12, 13, 14]]
    batch = splice(contexts, completions, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logits = completion_logits(model, batch)
        for i, (ctx, comp) in enumerate(zip(contexts, completions)):
            alone = model(input_ids=torch.tensor([ctx + comp])).logits[0, len(ctx) - 1 : len(ctx) + len(comp) - 1]
            torch.testing.assert_close(logits[i, : len(comp)], alone, rtol=1e-5, atol=1e-5)


def test_fit_view_truncates_only_the_privileged_text(tokenizer):
    pi = "step " * 200
    view = TeacherView(context=[{"role": "user", "content": "Q? " + pi + " Now answer."}], pi=pi)
    ids, cut = fit_view(tokenizer, view, completion_length=20, max_length=120)
    assert cut and len(ids) + 20 <= 120
    text = tokenizer.decode(ids)
    assert "Q? " in text and "Now answer." in text and "[...]" in text
    with pytest.raises(ValueError, match="raise max_teacher_length"):
        fit_view(tokenizer, view, completion_length=20, max_length=120, overflow="error")


def test_shared_prefix_logits_match_the_unshared_pass(tokenizer):
    from conftest import build_model

    from selfdistill.sequences import completion_hidden, shared_prefix_logits

    model = build_model(tokenizer).eval()
    a = tokenizer("What is 12 + 3? Reference: 15", add_special_tokens=False)["input_ids"]
    b = tokenizer("What is 7?", add_special_tokens=False)["input_ids"]
    texts = ["15", "The answer is 15", "", "14 ok", "7"]
    completions = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    contexts = [a, b, a, a, b]  # repeats, interleaved, with an empty completion among them
    batch = splice(contexts, completions, tokenizer.pad_token_id)
    mask = batch.completion_mask.bool()
    with torch.no_grad():
        reference = completion_logits(model, batch)[mask]
        shared = shared_prefix_logits(model, batch, contexts)[mask]
        torch.testing.assert_close(shared, reference, rtol=1e-5, atol=1e-5)
        # the same with the head passed through (the fused loss's hidden states)
        from selfdistill.sequences import head_passthrough

        with head_passthrough(model.lm_head):
            hidden = shared_prefix_logits(model, batch, contexts)[mask]
        torch.testing.assert_close(hidden, completion_hidden(model, model.lm_head, batch)[mask], rtol=1e-5, atol=1e-5)
        # nothing repeats: nothing to share
        assert shared_prefix_logits(model, splice([a, b], completions[:2], tokenizer.pad_token_id), [a, b]) is None


def test_trainer_with_and_without_shared_prefixes_agree(tmp_path, tokenizer):
    from conftest import build_model
    from test_trainer import make_trainer

    losses = []
    for share in (True, False):
        trainer = make_trainer(tmp_path / str(share), tokenizer, model=build_model(tokenizer), max_steps=2,
                               num_generations=4, share_teacher_prefix=share)
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert losses[0] == pytest.approx(losses[1], rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("min_shared", [1, 4, 8])
def test_partial_prefixes_are_shared_exactly(tokenizer, min_shared):
    """AVSD-style views: one problem, different privileged texts after it, plus repeated whole contexts."""
    from conftest import build_model

    from selfdistill.sequences import _prefix_groups, shared_prefix_logits

    model = build_model(tokenizer).eval()
    problem = tokenizer("What is 12 + 3? Here is", add_special_tokens=False)["input_ids"]
    views = [problem + tokenizer(t, add_special_tokens=False)["input_ids"]
             for t in [" a reference solution: 15", " the answer: 15", " a hint"]]
    other = tokenizer("What is 7?", add_special_tokens=False)["input_ids"]
    contexts = [views[0], views[1], views[2], other, views[0], problem]
    completions = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["15", "The answer", "1", "7", "", "x"]]
    batch = splice(contexts, completions, tokenizer.pad_token_id)
    mask = batch.completion_mask.bool()
    groups, lengths = _prefix_groups(contexts, min_shared)
    assert groups[0] == groups[1] == groups[2] == groups[4] == groups[5]  # all start with the problem
    if min_shared > 2:  # with a 1-token minimum "What is 7?" joins too, on the shared "What is"
        assert lengths[groups[0]] == len(problem) and groups[3] != groups[0]
    with torch.no_grad():
        reference = completion_logits(model, batch)[mask]
        shared = shared_prefix_logits(model, batch, contexts, min_shared=min_shared)[mask]
    torch.testing.assert_close(shared, reference, rtol=1e-5, atol=1e-5)


def test_avsd_views_share_their_prefix_in_training(tmp_path, tokenizer):
    from conftest import build_dataset, build_model
    from test_trainer import exact_reward, make_args

    from selfdistill import SelfDistillTrainer
    from selfdistill.sources import MultiView

    losses = []
    for share in (True, False):
        trainer = SelfDistillTrainer(model=build_model(tokenizer), train_dataset=build_dataset(),
                                     args=make_args(tmp_path / str(share), max_steps=1, share_teacher_prefix=share),
                                     processing_class=tokenizer, privileged=MultiView(answer_column="answer"),
                                     reward_funcs=[exact_reward])
        trainer.train()
        losses.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert losses[0] == pytest.approx(losses[1], rel=1e-3, abs=1e-7)
