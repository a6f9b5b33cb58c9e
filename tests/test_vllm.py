"""vLLM rollouts: configuration, construction, and the importance-ratio correction wired through the trainer.

vLLM needs a CUDA GPU and is not installable on the CI machine; the engine is replaced here by a stand-in with the
interface of TRL's ``VLLMGeneration`` (``generate`` and ``sync_weights``) that samples with transformers and
reports log-probs shifted by a known amount, as a mismatched sampler would. The real engine runs only in
``test_vllm_colocate_on_gpu``, skipped without a GPU and vLLM.
"""

import importlib.util
import math

import pytest
import torch
from conftest import build_dataset, build_model

import selfdistill.losses as losses_module
import selfdistill.vllm_rollouts as vllm_rollouts
from selfdistill import ReferenceSolution, SelfDistillConfig, SelfDistillTrainer
from selfdistill.rollout import sample_completions
from selfdistill.sequences import completion_logits, splice

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def vllm_args(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, num_generations=2,
                max_completion_length=6, logging_steps=1, report_to=[], save_strategy="no", learning_rate=1e-2,
                use_cpu=True, seed=0, disable_tqdm=True, use_vllm=True)
    base.update(overrides)
    return SelfDistillConfig(**base)


class FakeVLLM:
    """TRL VLLMGeneration's interface: transformers sampling, log-probs of the sampled tokens shifted by ``shift``."""

    def __init__(self, model, tokenizer, shift):
        self.model, self.tokenizer, self.shift = model, tokenizer, shift
        self.syncs = 0
        self.returned = []

    def sync_weights(self):
        self.syncs += 1

    @torch.no_grad()
    def generate(self, prompts, images, num_generations):
        out = sample_completions(self.model, prompts, pad_id=self.tokenizer.pad_token_id,
                                 eos=[self.tokenizer.eos_token_id], max_new_tokens=6)
        batch = splice(prompts, out.completion_ids, self.tokenizer.pad_token_id)
        logps = torch.log_softmax(completion_logits(self.model, batch).float(), -1)
        logps = logps.gather(-1, batch.completion_ids[..., None])[..., 0]
        lps = [[[float(v) + self.shift] for v in row[: len(c)]] for row, c in zip(logps, out.completion_ids)]
        self.returned.append(lps)
        return prompts, out.completion_ids, lps, None


def fake_trainer(tmp_path, tokenizer, monkeypatch, shift, **overrides):
    model = build_model(tokenizer)
    engine = FakeVLLM(model, tokenizer, shift)
    monkeypatch.setattr(vllm_rollouts, "_make_engine", lambda *a, **k: engine)
    trainer = SelfDistillTrainer(model=model, args=vllm_args(tmp_path, **overrides), train_dataset=build_dataset(),
                                 processing_class=tokenizer, privileged=ReferenceSolution())
    return trainer, engine


@pytest.mark.parametrize("overrides, message", [
    (dict(vllm_mode="remote"), "vllm_mode='remote' is not valid; choose one of: colocate, server"),
    (dict(ratio_clip=None), "set ratio_clip=2.0"),
    (dict(vllm_mode="server", vllm_tensor_parallel_size=2), "trl vllm-serve --tensor_parallel_size"),
    (dict(vllm_gpu_memory_utilization=1.5), "must be in \\(0, 1\\]"),
])
def test_config_rejects_bad_vllm_settings(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        vllm_args(tmp_path, **overrides)


def test_config_accepts_both_modes(tmp_path):
    assert vllm_args(tmp_path, vllm_mode="server", vllm_server_base_url="http://127.0.0.1:8000").use_vllm
    assert vllm_args(tmp_path, vllm_mode="colocate", vllm_gpu_memory_utilization=0.5).vllm_mode == "colocate"


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here: the missing-package error cannot occur")
@pytest.mark.parametrize("mode", ["colocate", "server"])
def test_missing_vllm_is_a_clear_error_at_construction(tmp_path, tokenizer, mode):
    with pytest.raises(ImportError, match="pip install 'selfdistill\\[vllm\\]'.*use_vllm=False"):
        SelfDistillTrainer(model=build_model(tokenizer), args=vllm_args(tmp_path, vllm_mode=mode),
                           train_dataset=build_dataset(), processing_class=tokenizer, privileged=ReferenceSolution())


def test_engine_is_built_from_the_config(tmp_path, tokenizer, monkeypatch):
    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    import trl.generation.vllm_generation as trl_vllm
    import trl.import_utils as trl_imports

    monkeypatch.setattr(trl_imports, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(trl_vllm, "VLLMGeneration", Recorder)
    args = vllm_args(tmp_path, vllm_mode="server", vllm_server_base_url="http://127.0.0.1:8123", temperature=0.7,
                     top_k=20, max_prompt_length=100)
    vllm_rollouts._make_engine(build_model(tokenizer), accelerator=None, tokenizer=tokenizer, args=args)
    assert seen["mode"] == "server" and seen["server_base_url"] == "http://127.0.0.1:8123"
    assert seen["temperature"] == 0.7 and seen["top_k"] == 20 and seen["max_completion_length"] == 6
    assert seen["max_model_length"] == 106 and seen["logprobs"] == 0


def test_sampler_logprobs_are_pi_old_of_the_ratio(tmp_path, tokenizer, monkeypatch):
    captured = []
    real = losses_module.token_losses  # the default source hook looks it up at call time

    def spy(*args, old_logps=None, **kwargs):
        captured.append(old_logps)
        return real(*args, old_logps=old_logps, **kwargs)

    monkeypatch.setattr(losses_module, "token_losses", spy)
    # A sampler that puts 0.1 nats less on each sampled token than the trainer: ratio exp(0.1) < 2, never clipped.
    trainer, engine = fake_trainer(tmp_path, tokenizer, monkeypatch, shift=-0.1)
    trainer.train()
    assert engine.syncs == 3  # weights pushed once per optimizer step, before its generation
    assert len(captured) == 3 and all(c is not None for c in captured)
    first = torch.tensor([v[0] for row in engine.returned[0] for v in row])
    torch.testing.assert_close(captured[0].cpu(), first)  # the trainer's pi_old is exactly the sampler's log-probs
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(h["ratio_clip_fraction"] == 0.0 for h in logs)


def test_a_far_off_sampler_is_clipped(tmp_path, tokenizer, monkeypatch):
    # 2 nats below the trainer: ratio e^2 > ratio_clip = 2 on every token, so every token's weight is capped.
    trainer, _ = fake_trainer(tmp_path, tokenizer, monkeypatch, shift=-2.0, max_steps=1)
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][0]
    assert log["ratio_clip_fraction"] == 1.0 and math.isfinite(log["loss"])


def test_correction_can_be_switched_off(tmp_path, tokenizer, monkeypatch):
    trainer, _ = fake_trainer(tmp_path, tokenizer, monkeypatch, shift=-2.0, max_steps=1,
                              vllm_importance_sampling=False)
    trainer.train()
    log = [h for h in trainer.state.log_history if "loss" in h][0]
    assert log["ratio_clip_fraction"] == 0.0


@pytest.mark.skipif(not (HAS_VLLM and torch.cuda.is_available()),
                    reason="vLLM needs a CUDA GPU and the vllm package; this machine has neither")
def test_vllm_colocate_on_gpu(tmp_path, tokenizer):  # pragma: no cover - runs on a GPU machine only
    model_dir = tmp_path / "model"
    build_model(tokenizer, max_position_embeddings=512).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    trainer = SelfDistillTrainer(model=str(model_dir), args=vllm_args(tmp_path, use_cpu=False, max_steps=2,
                                                                      vllm_gpu_memory_utilization=0.2),
                                 train_dataset=build_dataset(), privileged=ReferenceSolution())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert trainer.vllm.syncs == 2
