"""LoRA: the initial teacher is the base model (adapter disabled), ema keeps copies of the adapter tensors only,
and the end of a run saves the adapter and, on request, the merged model."""

import pytest
import torch
from conftest import build_dataset, build_model
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from selfdistill import ReferenceSolution, SelfDistillConfig, SelfDistillTrainer
from selfdistill.export import save_final_model

IDS = torch.tensor([[5, 6, 7, 8, 9]])


def lora_trainer(tmp_path, tokenizer, **overrides):
    args = dict(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=4, num_generations=2,
                max_completion_length=6, logging_steps=1, report_to=[], save_strategy="no", learning_rate=5e-2,
                use_cpu=True, seed=0, disable_tqdm=True)
    args.update(overrides)
    return SelfDistillTrainer(
        model=build_model(tokenizer),
        args=SelfDistillConfig(**args),
        train_dataset=build_dataset(),
        processing_class=tokenizer,
        privileged=ReferenceSolution(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )


def adapter_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_initial_teacher_ignores_a_nonzero_adapter(tmp_path, tokenizer):
    trainer = lora_trainer(tmp_path, tokenizer)
    trainer.train()
    model = trainer.model
    # The adapter has moved away from its zero start (lora_B starts at 0, so a zero B would make the test vacuous).
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 1e-3 for p in lora_b)
    base = build_model(tokenizer)  # same seed: the weights under the adapter
    with torch.no_grad():
        with trainer.teacher.scoring(model) as teacher:
            teacher_logits = teacher(input_ids=IDS).logits
        student_logits = model(input_ids=IDS).logits
        base_logits = base(input_ids=IDS).logits
    torch.testing.assert_close(teacher_logits, base_logits)
    assert (student_logits - base_logits).abs().max() > 1e-3


def test_ema_teacher_under_lora_copies_the_adapter_only(tmp_path, tokenizer):
    trainer = lora_trainer(tmp_path, tokenizer, teacher_policy="ema", teacher_ema_rate=0.5)
    start = adapter_tensors(trainer.model)
    copied = set(trainer.teacher.params)
    assert copied == set(start) and all("lora_" in n for n in copied)
    total = sum(p.numel() for p in trainer.model.parameters())
    assert sum(t.numel() for t in trainer.teacher.params.values()) < 0.1 * total  # no full model copy
    trainer.train()
    model = trainer.model
    student = adapter_tensors(model)
    ema = {n: t.clone() for n, t in trainer.teacher.params.items()}
    # After 3 updates at rate 0.5 the teacher adapter sits between the start and the student's adapter.
    assert any(not torch.equal(ema[n], student[n]) for n in ema)
    assert any(not torch.equal(ema[n], start[n]) for n in ema)
    # Scoring with the teacher is the same network with the EMA adapter tensors in place of the student's.
    with torch.no_grad():
        with trainer.teacher.scoring(model) as teacher:
            teacher_logits = teacher(input_ids=IDS).logits
        named = dict(model.named_parameters())
        for n, t in ema.items():
            named[n].data.copy_(t)
        expected = model(input_ids=IDS).logits
    torch.testing.assert_close(teacher_logits, expected)


def test_final_model_saves_the_adapter_and_the_merged_model(tmp_path, tokenizer):
    trainer = lora_trainer(tmp_path, tokenizer, max_steps=2)
    trainer.train()
    with torch.no_grad():
        trained_logits = trainer.model(input_ids=IDS).logits
    out = save_final_model(trainer, tmp_path / "final", merged=True)
    assert out["adapter"] and (tmp_path / "final" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "final" / "model.safetensors").exists()  # the adapter alone, not the whole model
    merged = AutoModelForCausalLM.from_pretrained(out["merged_path"])
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=IDS).logits, trained_logits, rtol=1e-4, atol=1e-5)


def test_merging_without_an_adapter_names_the_fix(tmp_path, tokenizer):
    trainer = SelfDistillTrainer(
        model=build_model(tokenizer),
        args=SelfDistillConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                               num_generations=2, max_completion_length=4, report_to=[], use_cpu=True),
        train_dataset=build_dataset(), processing_class=tokenizer, privileged=ReferenceSolution(),
    )
    with pytest.raises(ValueError, match="needs a LoRA adapter.*peft block"):
        save_final_model(trainer, tmp_path / "final", merged=True)
    assert (tmp_path / "final" / "model.safetensors").exists()
