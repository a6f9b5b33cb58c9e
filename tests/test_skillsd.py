"""Skill-SD: environments, multi-turn rollouts, the skill bank, the GRPO term and importance-weighted reverse KL."""

import functools
import json

import pytest
import torch
from conftest import build_model
from datasets import Dataset

from selfdistill.agent import Episode, TurnTemplate, run_episodes, with_observation
from selfdistill.config import SelfDistillConfig
from selfdistill.envs import ENVIRONMENTS, GuessNumber, Sokoban
from selfdistill.envs.sokoban import Level, generate_level, solve
from selfdistill.grpo import group_advantages, policy_gradient_losses
from selfdistill.losses import LossSpec, token_losses
from selfdistill.methods.skillsd.bank import SkillBank
from selfdistill.methods.skillsd.source import clean_summary
from selfdistill.rollout import eos_ids
from selfdistill.sequences import completion_logits, render_context, splice
from selfdistill.sources import Rollout, Skills
from selfdistill.trainer import SelfDistillTrainer


# ------------------------------------------------------------------------------------------------ environments
@pytest.mark.parametrize("name", ["sokoban", "guess_number"])
def test_rows_and_episodes_are_deterministic_under_a_seed(name):
    cls = ENVIRONMENTS[name]
    rows = cls.make_rows(20, seed=3, split="train")
    assert rows == cls.make_rows(20, seed=3, split="train")
    assert rows != cls.make_rows(20, seed=4, split="train")
    task = {k: v for k, v in rows[0].items() if k != "prompt"}
    first, second = cls(), cls()
    assert first.reset(**task) == second.reset(**task)
    for action in ["up", "7", "left", "12", "down"]:
        a, b = first.step(action), second.step(action)
        assert a == b
        if a.done:
            break


def test_sokoban_train_and_test_boards_never_share_a_seed():
    train = {r["seed"] for r in Sokoban.make_rows(300, 0, "train")}
    test = {r["seed"] for r in Sokoban.make_rows(300, 0, "test")}
    assert not train & test


@pytest.mark.parametrize("seed", range(25))
def test_generated_boards_are_solvable_and_the_solution_solves_them(seed):
    level = generate_level(seed, min_moves=2, max_moves=8)
    path = solve(level, limit=8)
    assert path is not None and 2 <= len(path) <= 8
    env = Sokoban(max_turns=len(path))
    env.reset(seed=seed)
    results = [env.step(move) for move in path]
    assert results[-1].done and env.get_reward() == 1.0 and env.success
    assert all(not r.done for r in results[:-1])


def test_sokoban_pushes_boxes_and_walls_block():
    env = Sokoban(max_turns=5)
    # ######     player at (2,1) with a box to its right and a target beyond it
    # #____#
    # #PX_O#
    env.level = Level(5, walls={(r, c) for r in range(5) for c in range(5) if r in (0, 4) or c in (0, 4)},
                      targets={(2, 3)}, boxes={(2, 2)}, player=(2, 1))
    blocked = env.step("left")  # a wall
    assert blocked.valid and not blocked.done and "cannot move left" in blocked.observation
    assert env.level.player == (2, 1)
    solved = env.step("right")  # pushes the box onto the target
    assert solved.done and solved.reward == 1.0 and env.level.boxes == {(2, 3)}


def test_sokoban_cannot_push_two_boxes():
    walls = {(r, c) for r in range(6) for c in range(6) if r in (0, 5) or c in (0, 5)}
    env = Sokoban(size=6, max_turns=3)
    env.level = Level(6, walls=walls, targets={(1, 1), (1, 2)}, boxes={(2, 2), (2, 3)}, player=(2, 1))
    result = env.step("right")
    assert "cannot move right" in result.observation and env.level.boxes == {(2, 2), (2, 3)}


@pytest.mark.parametrize("reply", ["", "jump!", "I think I should go somewhere", "🙂"])
def test_unparseable_sokoban_actions_get_feedback_not_an_exception(reply):
    env = Sokoban(max_turns=2)
    env.reset(seed=1)
    before = env.level.render()
    result = env.step(reply)
    assert not result.valid and not result.done
    assert "up, down, left, right" in result.observation
    assert env.level.render() == before
    last = env.step("nonsense")
    assert last.done and last.reward == 0.0 and "No moves left" in last.observation


def test_guess_number_feedback_and_rewards():
    env = GuessNumber(low=1, high=16, max_turns=3)
    env.reset(secret=11)
    assert "Higher than 8" in env.step("My guess is 8").observation
    bad = env.step("banana")
    assert not bad.valid and not bad.done and "one whole number from 1 to 16" in bad.observation
    last = env.step("I say 11!")
    assert last.done and last.reward == 1.0 and env.success
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step("3")
    env.reset(secret=2)
    env.step("20")
    assert "not from 1 to 16" in env.step("0").observation
    out = env.step("5")
    assert out.done and env.get_reward() == 0.0 and "The number was 2" in out.observation


def test_guess_number_draws_secrets_from_a_given_list():
    rows = GuessNumber.make_rows(400, seed=0, split="train", low=1, high=8, max_turns=4, secrets=[6, 6, 6, 2])
    counts = {v: sum(r["secret"] == v for r in rows) for v in (2, 6)}
    assert counts[2] + counts[6] == 400 and 250 <= counts[6] <= 350  # three in four, by the repeats
    plain = GuessNumber.make_rows(400, seed=0, split="train", low=1, high=8, max_turns=4)
    assert {r["secret"] for r in plain} == set(range(1, 9))
    GuessNumber(low=1, high=8, secrets=[6, 2])  # the recipe's env block reaches the constructor too


@pytest.mark.parametrize("secrets, match", [([9], r"holds \[9\].*from 1 to 8"), ([], "non-empty list"),
                                            ("6", "non-empty list"), ([2.5], r"holds \[2.5\]")])
def test_guess_number_rejects_secrets_outside_its_range(secrets, match):
    with pytest.raises(ValueError, match=match):
        GuessNumber.make_rows(4, seed=0, split="train", low=1, high=8, secrets=secrets)
    with pytest.raises(ValueError, match=match):
        GuessNumber(low=1, high=8, secrets=secrets)


def test_environment_arguments_are_checked():
    with pytest.raises(ValueError, match="low < high"):
        GuessNumber(low=5, high=5)
    with pytest.raises(ValueError, match="size >= 5"):
        generate_level(0, size=4)


# ------------------------------------------------------------------------------------------ multi-turn rollouts
class Scripted:
    """Stands in for a model: replies with fixed token ids (the last being EOS)."""

    def __init__(self, replies):
        self.replies = replies
        self.calls = 0

    def __call__(self, *_, **__):
        from selfdistill.rollout import Generated

        reply = self.replies[self.calls]
        self.calls += 1
        return Generated([reply], [False])


def test_turn_template_ids_equal_the_rendered_conversation(tokenizer):
    prompt = [{"role": "user", "content": "What is 3 + 4?"}]
    reply = tokenizer("7", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    template = TurnTemplate(tokenizer)
    ids = render_context(tokenizer, prompt) + reply + template.between("Higher.", reply_closed=True)
    full = prompt + [{"role": "assistant", "content": "7"}, {"role": "user", "content": "Higher."}]
    assert ids == render_context(tokenizer, full)
    # A reply cut before its EOS gets the end-of-turn token from the template (an environment token).
    assert template.between("x", reply_closed=False)[0] == tokenizer.eos_token_id


def test_env_mask_marks_exactly_the_model_tokens(tokenizer, monkeypatch):
    eos = tokenizer.eos_token_id
    replies = [tokenizer("8", add_special_tokens=False)["input_ids"] + [eos],
               tokenizer("12", add_special_tokens=False)["input_ids"] + [eos],
               tokenizer("10", add_special_tokens=False)["input_ids"] + [eos]]
    monkeypatch.setattr("selfdistill.agent.sample_completions", Scripted(replies))
    row = {"prompt": [{"role": "user", "content": "Guess."}], "secret": 10}
    [episode] = run_episodes(None, tokenizer, [row], functools.partial(GuessNumber, max_turns=4), pad_id=0,
                             eos=[eos], max_new_tokens=4)
    assert episode.success and episode.turns == 3 and episode.done and episode.reward == 1.0
    assert len(episode.env_mask) == len(episode.completion_ids)
    model_ids = [t for t, m in zip(episode.completion_ids, episode.env_mask) if m]
    assert model_ids == replies[0] + replies[1] + replies[2]
    env_text = tokenizer.decode([t for t, m in zip(episode.completion_ids, episode.env_mask) if not m])
    assert "Higher than 8" in env_text and "Lower than 12" in env_text
    # The ids the student saw are the chat rendering of the whole conversation, token for token.
    conversation = episode.prompt + [{"role": m["role"], "content": m["content"]} for m in episode.messages[:-1]]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)  # ends "10<|im_end|>\n"
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    ours = episode.prompt_ids + episode.completion_ids
    assert full[: len(ours)] == ours and tokenizer.decode(full[len(ours):]) == "\n"


def test_episode_stops_at_the_token_budget(tokenizer, monkeypatch):
    eos = tokenizer.eos_token_id
    reply = tokenizer("no idea", add_special_tokens=False)["input_ids"] + [eos]
    monkeypatch.setattr("selfdistill.agent.sample_completions", Scripted([reply] * 10))
    row = {"prompt": "Guess.", "secret": 10}
    [episode] = run_episodes(None, tokenizer, [row], GuessNumber, pad_id=0, eos=[eos], max_new_tokens=len(reply),
                             max_episode_length=60)
    assert not episode.done and 1 <= episode.turns < 6 and len(episode.completion_ids) <= 60
    assert episode.invalid_actions == episode.turns  # no number in the reply: feedback, never an exception
    assert isinstance(episode, Episode)


def test_first_observation_is_appended_to_the_last_user_message():
    prompt = [{"role": "system", "content": "s"}, {"role": "user", "content": "task"}]
    assert with_observation(prompt, "board")[-1]["content"] == "task\n\nboard"
    assert with_observation("task", "") == "task"


# ------------------------------------------------------------------------------------------------- the losses
def test_group_advantages_match_a_brute_force_loop():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.2, 0.9], dtype=torch.float64)
    got = group_advantages(rewards, 4, "group")
    expected = []
    for g in range(2):
        group = rewards[4 * g : 4 * g + 4].tolist()
        mean = sum(group) / 4
        std = (sum((r - mean) ** 2 for r in group) / 3) ** 0.5  # unbiased, as TRL
        expected += [(r - mean) / (std + 1e-4) for r in group]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(group_advantages(rewards, 4, "none"),
                               rewards - rewards.view(2, 4).mean(1).repeat_interleave(4))
    assert group_advantages(torch.ones(4, dtype=torch.float64), 2).abs().max() == 0
    with pytest.raises(ValueError, match="num_generations >= 2"):
        group_advantages(rewards, 1)


def test_policy_gradient_losses_match_a_brute_force_reference():
    torch.manual_seed(0)
    logp = (torch.randn(12, dtype=torch.float64) - 1).requires_grad_()
    old = logp.detach() + torch.randn(12, dtype=torch.float64) * 0.4
    adv = torch.randn(12, dtype=torch.float64)
    loss, clipped = policy_gradient_losses(logp, adv, old, epsilon_low=0.2, epsilon_high=0.28)
    loss.sum().backward()
    for i in range(12):
        x = logp[i].detach().clone().requires_grad_()
        ratio = torch.exp(x - old[i])
        ref = -torch.min(ratio * adv[i], ratio.clamp(0.8, 1.28) * adv[i])
        ref.backward()
        torch.testing.assert_close(loss[i], ref.detach())
        torch.testing.assert_close(logp.grad[i], x.grad)
        assert bool(clipped[i]) == bool((ratio.clamp(0.8, 1.28) * adv[i] < ratio * adv[i]).item())
    # Fresh rollouts: ratio 1, gradient -A.
    fresh = logp.detach().clone().requires_grad_()
    policy_gradient_losses(fresh, adv)[0].sum().backward()
    torch.testing.assert_close(fresh.grad, -adv)


def test_importance_weighted_reverse_kl_matches_the_reference_formula():
    """Skill-SD's loss: min(pi/pi_old, c) * sg(log pi - log pi_T) * log pi on the realised token."""
    torch.manual_seed(1)
    n, v, cap = 7, 11, 2.0
    student = torch.randn(n, v, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(n, v, dtype=torch.float64)
    tokens = torch.randint(0, v, (n,))
    old = torch.log_softmax(student.detach(), -1).gather(-1, tokens[:, None])[:, 0] + torch.randn(n).double()
    spec = LossSpec(divergence="reverse_kl", support="sampled", clip="none", ratio_clip=cap)
    out = token_losses(student, teacher, tokens, spec, old_logps=old)
    out.loss.sum().backward()
    grad = student.grad.clone()
    student.grad = None
    total = 0.0
    for t in range(n):
        logp = torch.log_softmax(student[t], -1)[tokens[t]]
        target = torch.log_softmax(teacher[t], -1)[tokens[t]]
        weight = min(float(torch.exp(logp.detach() - old[t])), cap)
        term = weight * (logp.detach() - target) * logp
        total = total + term
        torch.testing.assert_close(out.loss[t], weight * (logp.detach() - target))  # the reported value
        torch.testing.assert_close(out.ratio[t].item(), weight)
    total.backward()
    torch.testing.assert_close(grad, student.grad)


# ------------------------------------------------------------------------------------------------ skill bank
def test_skill_bank_dedupes_caps_and_round_trips(tmp_path):
    bank = SkillBank(max_per_task=2, dedupe_threshold=0.6, top_k=2)
    a = bank.add("t", "Start with the middle number and halve the range after each answer.", step=1)
    assert bank.add("t", "start with the middle number and halve the range after each answer!", step=2) is None
    assert a.duplicates == 1
    assert bank.add("t", "ok", step=2) is None  # too short to be a skill
    b = bank.add("t", "Never repeat a guess that was already answered with higher or lower.", step=3)
    bank.credit([a.id], 0.5)
    bank.credit([b.id], -0.5)
    c = bank.add("t", "Push boxes only towards targets and never into a corner you cannot leave.", step=4)
    assert set(bank.skills) == {a.id, c.id}  # b: the tried skill with the lowest mean usefulness, dropped
    assert bank.add("other", "A skill for another task entirely, filed apart.", step=5).task == "other"
    path = bank.save(tmp_path / "skills.json")
    loaded = SkillBank.load(path)
    assert loaded.state_dict() == bank.state_dict()
    assert json.loads(path.read_text())["skills"][0]["text"].startswith("Start with the middle")
    assert "Start with the middle" in loaded.format()


def test_ucb_retrieval_tries_new_skills_then_prefers_useful_ones():
    bank = SkillBank(max_per_task=8, top_k=1, exploration=0.1)
    good = bank.add("t", "skill one about guessing the middle first", step=0)
    bad = bank.add("t", "skill two about guessing random numbers always", step=0)
    assert bank.retrieve("t") == [bad]  # untried first, newest first
    bank.credit([bad.id], -1.0)
    assert bank.retrieve("t") == [good]
    bank.credit([good.id], 1.0)
    for _ in range(5):
        bank.credit([good.id], 1.0)
        bank.credit([bad.id], -1.0)
    assert bank.retrieve("t") == [good]
    expected = good.mean + 0.1 * (torch.tensor(float(good.uses + bad.uses + 1)).log() / good.uses).sqrt().item()
    assert bank.ucb(good) == pytest.approx(expected)
    assert bank.retrieve("unknown task") == []


def test_similarity_retrieval_ranks_by_word_overlap():
    bank = SkillBank(retrieval="similarity", top_k=1)
    bank.add("a", "push the box left towards the target square", step=0)
    bank.add("b", "guess the middle number of the remaining range", step=0)
    assert bank.retrieve("b", "what number in the range should I guess")[0].task == "b"
    assert bank.retrieve("a", "the box is left of the target")[0].task == "a"


def _rollout(reward, task="guess", text="You: 8\nEnvironment: Higher."):
    return Rollout(row={"prompt": [], "task": task}, prompt=[{"role": "user", "content": "Guess my number."}],
                   completion=text, completion_ids=[1, 2], reward=reward)


def test_skills_source_views_observe_and_feedback():
    source = Skills(top_k=2, summaries_per_step=2)
    [[plain]] = source.views([_rollout(1.0)])
    assert plain.context == [{"role": "user", "content": "Guess my number."}] and plain.tag == []
    asked = []

    def generate(prompts, max_new_tokens):
        asked.extend(prompts)
        return [f"Skill number {i}: start in the middle and halve the range each time.\n\nextra" for i in
                range(len(prompts))]

    source.attach(generate)
    source.observe([_rollout(0.0), _rollout(1.0), _rollout(0.0)])
    assert len(asked) == 2 and "Outcome: success (reward 1)" in asked[0][0]["content"]
    assert "Outcome: failure (reward 0)" in asked[1][0]["content"]
    assert len(source.bank) == 1  # the second summary is a near-duplicate of the first
    [[view]] = source.views([_rollout(None)])
    assert "Skills learned from earlier attempts" in view.context[0]["content"]
    assert "start in the middle" in view.pi and view.tag == [0]
    source.feedback([view.tag, []], [{"advantage": 0.5, "logp_gap": 0.2, "reward": 1.0},
                                     {"advantage": 1.0, "logp_gap": 1.0, "reward": 1.0}])
    assert source.bank.skills[0].uses == 1 and source.bank.skills[0].value == pytest.approx(0.1)
    source.feedback([view.tag], [{"advantage": 0.0, "logp_gap": 5.0, "reward": 0.0}])  # A = 0: no credit
    assert source.bank.skills[0].uses == 1
    state = json.loads(json.dumps(source.state_dict()))
    fresh = Skills()
    fresh.load_state_dict(state)
    assert fresh.bank.state_dict()["skills"] == source.bank.state_dict()["skills"] and fresh.rounds == 1
    assert clean_summary("x" * 500).__len__() <= 400


def test_skills_source_checks_its_templates():
    with pytest.raises(ValueError, match="{skills}"):
        Skills(template="{task} only")
    with pytest.raises(ValueError, match="{outcome}"):
        Skills(summary_prompt="{task} {trajectory}")


# --------------------------------------------------------------------------------------------------- trainer
def _env_trainer(tmp_path, tokenizer, **overrides):
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_steps=2,
                    max_completion_length=4, max_turns=3, learning_rate=1e-3, logging_steps=1, report_to=[],
                    save_strategy="no", use_cpu=True, teacher_policy="sync", teacher_update_every=1,
                    support="sampled", clip="none", seed=0)
    settings.update(overrides)
    args = SelfDistillConfig(**settings)
    rows = GuessNumber.make_rows(8, seed=0, split="train", low=1, high=4, max_turns=3)
    model = build_model(tokenizer, max_position_embeddings=1024)
    return SelfDistillTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                              processing_class=tokenizer, privileged=Skills(summaries_per_step=1),
                              environment_factory=functools.partial(GuessNumber, low=1, high=4, max_turns=3))


def test_the_loss_covers_only_the_model_tokens(tmp_path, tokenizer):
    trainer = _env_trainer(tmp_path, tokenizer, teacher_policy="live")
    # A skill in the bank makes the teacher's context differ from the student's.
    trainer.privileged.bank.add("guess_number_1_4", "Guess two first, then move up or down by one.", step=0)
    rows = trainer.train_dataset.select(range(4)).to_list()
    [inputs] = trainer._make_rollouts(rows, "train", 1)
    masks = inputs["loss_masks"]
    assert any(0 in m for m in masks), "the episodes should contain environment turns"
    assert inputs["tokens"] == sum(sum(m) for m in masks)
    model = trainer.model
    loss = trainer.compute_loss(model, inputs)

    # Reference: full student and teacher forwards, the sampled reverse-KL terms at the model's tokens only.
    with torch.no_grad():
        student = splice(inputs["prompt_ids"], inputs["completion_ids"], trainer.pad_id)
        s_logits = completion_logits(model, student)[student.completion_mask.bool()]
        contexts = [ids[0] for ids in inputs["teacher_ids"]]
        assert contexts[0] != inputs["prompt_ids"][0]
        teacher = splice(contexts, inputs["completion_ids"], trainer.pad_id)
        t_logits = completion_logits(model, teacher)[teacher.completion_mask.bool()]
    keep = torch.tensor([m for row in masks for m in row], dtype=torch.bool)
    tokens = student.completion_ids[student.completion_mask.bool()]
    spec = LossSpec(divergence="reverse_kl", support="sampled", clip="none")
    per_token = token_losses(s_logits, t_logits, tokens, spec).loss
    expected = per_token[keep].sum() / inputs["normalizer"]
    assert expected.abs() > 1e-6
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-7)
    # Had the environment's tokens been trained, the loss would differ.
    assert (per_token.sum() / inputs["normalizer"] - expected).abs() > 1e-6


def test_grpo_alone_skips_the_teacher_and_uses_group_advantages(tmp_path, tokenizer):
    trainer = _env_trainer(tmp_path, tokenizer, distill_weight=0.0, grpo_weight=1.0)
    calls = []
    trainer._teacher_pass = lambda *a, **k: calls.append(1)
    rows = trainer.train_dataset.select(range(4)).to_list()
    [inputs] = trainer._make_rollouts(rows, "train", 1)
    rewards = torch.tensor(inputs["rewards"], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(inputs["advantages"], dtype=torch.float64),
                               group_advantages(rewards, 2, "group"))
    loss = trainer.compute_loss(trainer.model, inputs)
    assert not calls and torch.isfinite(loss)


def test_two_steps_of_skill_sd_train_and_log_env_metrics(tmp_path, tokenizer):
    trainer = _env_trainer(tmp_path, tokenizer, grpo_weight=0.5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for key in ("env/success", "env/turns", "skills/bank_size", "skills/summaries", "grpo/loss", "divergence"):
        assert key in logs[-1], key
    assert trainer.privileged.rounds == 2 and logs[-1]["skills/summaries"] >= 1


def test_config_refuses_impossible_grpo_settings(tmp_path):
    with pytest.raises(ValueError, match="num_generations >= 2"):
        SelfDistillConfig(output_dir=str(tmp_path), grpo_weight=1.0, num_generations=1, use_cpu=True)
    with pytest.raises(ValueError, match="not both 0"):
        SelfDistillConfig(output_dir=str(tmp_path), distill_weight=0.0, use_cpu=True)
    with pytest.raises(ValueError, match="fused_loss=False"):
        SelfDistillConfig(output_dir=str(tmp_path), grpo_weight=1.0, fused_loss=True, use_cpu=True)


def test_eos_ids_are_known_for_the_tiny_model(tokenizer):
    assert tokenizer.eos_token_id in eos_ids(build_model(tokenizer), tokenizer)


# ---------------------------------------------------------------------------------------------------- recipes
def test_skillsd_recipe_runs_two_steps_and_saves_the_bank(tmp_path, tokenizer, capsys):
    import yaml

    from selfdistill.cli import main

    model_dir = tmp_path / "tiny"
    build_model(tokenizer, max_position_embeddings=1024).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "out"
    recipe = {
        "method": "skillsd",
        "model": str(model_dir),
        "env": {"type": "guess_number", "low": 1, "high": 4, "max_turns": 2},
        "data": {"n_train": 8, "n_test": 4, "seed": 0},
        "source": {"summaries_per_step": 2, "top_k": 1},
        "eval": {"batch_size": 4, "max_new_tokens": 3, "every_steps": 1, "curve_n": 2},
        "training": {"output_dir": str(out), "max_steps": 2, "per_device_train_batch_size": 4, "num_generations": 2,
                     "max_completion_length": 3, "logging_steps": 1, "use_cpu": True, "save_strategy": "steps",
                     "save_steps": 1, "disable_tqdm": True, "teacher_policy": "sync", "teacher_update_every": 1,
                     "support": "sampled", "clip": "none", "grpo_weight": 0.5, "heatmap_steps": 1, "max_turns": 1},
    }
    path = tmp_path / "skillsd.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "skillsd" and results["steps"] == 2 and results["rollouts"] == 8
    assert results["eval_before"]["n"] == 4 and results["eval_after"]["n"] == 4
    assert 0.0 <= results["eval_after"]["greedy_accuracy"] <= 1.0 and results["env"]["type"] == "guess_number"
    assert results["eval_after"]["mean_turns"] == 1.0  # held-out episodes end where training's do (max_turns)
    assert [p["step"] for p in results["learning_curve"]] == [0, 1, 2]
    bank = json.loads((out / "skills.json").read_text())
    assert results["skills"]["count"] == len(bank["skills"])
    checkpoint_state = json.loads((out / "checkpoint-2" / "privileged_source.json").read_text())
    assert checkpoint_state["bank"]["skills"] == bank["skills"] and checkpoint_state["rounds"] == 2
    page = (out / "heatmaps" / "step-000002.html").read_text()
    assert "title='" in page
    capsys.readouterr()
    assert main(["skills", str(out / "checkpoint-2")]) == 0
    printed = capsys.readouterr().out
    assert "skills ==" in printed or "empty" in printed
    assert main(["skills", str(tmp_path / "nowhere")]) == 2


def test_env_recipe_keys_are_checked():
    from selfdistill.recipes import RecipeError, parse_recipe

    base = {"method": "skillsd", "env": {"type": "sokoban", "size": 6}, "training": {"use_cpu": True}}
    assert parse_recipe(base).env.args == {"size": 6}
    with pytest.raises(RecipeError, match="Did you mean 'size'"):
        parse_recipe({**base, "env": {"type": "sokoban", "sise": 6}})
    with pytest.raises(RecipeError, match="env.type='chess'"):
        parse_recipe({**base, "env": {"type": "chess"}})
    with pytest.raises(RecipeError, match="too small"):
        parse_recipe({**base, "env": {"type": "sokoban", "size": 3}})
    with pytest.raises(RecipeError, match="generates the rows itself"):
        parse_recipe({**base, "data": {"task": "arithmetic"}})
    with pytest.raises(RecipeError, match="Did you mean 'summaries_per_step'"):
        parse_recipe({**base, "source": {"summaries_per_stp": 1}})
    with pytest.raises(RecipeError, match="remove eval.pass_k"):
        parse_recipe({**base, "eval": {"pass_k": 4}})



def test_rollout_advantages_fill_missing_rewards_with_the_group_mean():
    from selfdistill.grpo import rollout_advantages

    got = rollout_advantages([1.0, None, 0.0, 0.5, None, None], 3, "none")
    assert got == pytest.approx([0.5, 0.0, -0.5, 0.0, 0.0, 0.0])
    assert rollout_advantages([None, None], 2) is None
    assert rollout_advantages([1.0, 0.0, None], 1) == pytest.approx([0.5, -0.5, 0.0])
    with pytest.raises(ValueError, match="multiple of num_generations"):
        rollout_advantages([1.0, 0.0, 1.0], 2)


def test_grpo_term_without_any_reward_gives_no_gradient(tmp_path, tokenizer):
    trainer = _env_trainer(tmp_path, tokenizer, distill_weight=0.0, grpo_weight=1.0)
    [inputs] = trainer._make_rollouts(trainer.train_dataset.select(range(4)).to_list(), "train", 1)
    inputs["advantages"] = None  # every verifier failed
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in trainer.model.parameters())


def test_seeded_skills_serve_every_task_survive_the_cap_and_checkpoints(tmp_path):
    strategy = "Start with the middle number, then halve the range the feedback leaves."
    path = tmp_path / "skills.txt"
    path.write_text(f"# a strategy known to work\n{strategy}\n\n")
    source = Skills(top_k=3, max_per_task=1, summaries_per_step=0, seed_skills=str(path))
    assert [s.text for s in source.bank.retrieve("any_task")] == [strategy]
    assert [s.text for s in source.bank.retrieve("another_task")] == [strategy]
    # learned skills come and go under the cap; the seeded one stays
    for i, text in enumerate(["guess four then two or six always", "never repeat a guess you already made"]):
        source.bank.add("any_task", text, step=i)
    texts = {s.text for s in source.bank.retrieve("any_task")}
    assert strategy in texts and "never repeat a guess you already made" in texts and len(source.bank) == 2
    [[view]] = Skills(summaries_per_step=0, seed_skills=[strategy]).views(
        [Rollout(prompt=[{"role": "user", "content": "Guess."}], completion_ids=[1], completion="4",
                 row={"task": "x"})])
    assert strategy in view.context[-1]["content"]
    # through a checkpoint: the state holds it once, and loading it into a seeded source does not duplicate it
    state = json.loads(json.dumps(source.state_dict()))
    fresh = Skills(summaries_per_step=0, seed_skills=[strategy])
    fresh.load_state_dict(state)
    assert sum(s.seeded for s in fresh.bank.skills.values()) == 1
    unseeded = Skills(summaries_per_step=0)
    unseeded.load_state_dict(state)
    assert [s.text for s in unseeded.bank.skills.values() if s.seeded] == [strategy]


@pytest.mark.parametrize("bad, message", [
    ("no/such/file.txt", "is not a file"),
    ([""], "non-empty text"),
    ([3], "non-empty text"),
])
def test_bad_seed_skills_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        Skills(seed_skills=bad)


def test_seed_skills_from_a_json_list_and_a_broken_json(tmp_path):
    good, broken = tmp_path / "s.json", tmp_path / "b.json"
    good.write_text(json.dumps(["Guess the middle of the range first."]))
    broken.write_text("[oops")
    assert Skills(seed_skills=str(good)).seed_skills == ["Guess the middle of the range first."]
    with pytest.raises(ValueError, match="not valid JSON"):
        Skills(seed_skills=str(broken))
