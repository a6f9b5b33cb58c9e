"""The trained model at the end of a run: the weights (or the LoRA adapter) and, on request, the merged model.

``<folder>`` gets what ``Trainer.save_model`` writes: the full model, or under LoRA the adapter alone (a few MB),
with the tokenizer. With ``save_merged_model`` a LoRA run also writes ``<folder>-merged``: the adapter folded into
the base weights, a plain ``transformers`` model that loads without ``peft``. Under ZeRO-3 the adapter is saved from
the gathered weights and the merge runs on the main process from the saved adapter.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from selfdistill.distributed import is_zero3_model


def process_umask() -> int:
    """The process umask, read without changing it (Linux: /proc/self/status), else by setting and restoring it."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: str) -> None:
    """Give every file and folder under ``folder`` the mode the process umask asks for. Some writers (safetensors'
    atomic write in transformers) create files 0600 whatever the umask, which a shared cache or a container under
    another uid then cannot read."""
    mask = process_umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
    os.chmod(folder, 0o777 & ~mask)


def is_peft_model(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_final_model(trainer: Any, folder: str | Path, merged: bool = False) -> dict[str, Any]:
    """Save the model (every rank calls it: saving under ZeRO-3 gathers); returns the paths written."""
    folder = Path(folder)
    trainer.save_model(str(folder))
    if hasattr(trainer, "create_model_card"):
        trainer.create_model_card(output_dir=str(folder))
    trainer.accelerator.wait_for_everyone()
    if trainer.accelerator.is_main_process:
        follow_umask(str(folder))
    model = trainer.accelerator.unwrap_model(trainer.model)
    out: dict[str, Any] = {"path": str(folder), "adapter": is_peft_model(model), "merged_path": None}
    if not merged:
        return out
    if not out["adapter"]:
        raise ValueError("save_merged_model=True needs a LoRA adapter to merge; add a peft block to the recipe "
                         "(or pass peft_config=) or set save_merged_model=False: the full model is already saved")
    target = folder.parent / f"{folder.name}-merged"
    if trainer.accelerator.is_main_process:
        if is_zero3_model(model):
            from peft import AutoPeftModelForCausalLM

            base = AutoPeftModelForCausalLM.from_pretrained(str(folder)).merge_and_unload()
        else:
            # The run is over: fold the adapter into the base weights in place (no second copy of the model).
            base = model.merge_and_unload()
        base.save_pretrained(str(target))
        if trainer.processing_class is not None:
            trainer.processing_class.save_pretrained(str(target))
        follow_umask(str(target))
    trainer.accelerator.wait_for_everyone()
    out["merged_path"] = str(target)
    return out


def write_model_card(trainer: Any, folder: str, model_name: str | None = None, dataset_name: str | None = None,
                     tags: str | list[str] | None = None, model_ref: str | None = None) -> None:
    """A README.md model card in ``folder``: the base model, the method and its paper, the source, teacher policy
    and loss, the run's size and the library versions (template: selfdistill/templates/model_card.md)."""
    from importlib.metadata import version
    from importlib.resources import files

    from huggingface_hub import ModelCard, ModelCardData

    model = trainer.accelerator.unwrap_model(trainer.model)
    base = getattr(getattr(model, "config", None), "_name_or_path", None)
    base = base if base and not os.path.isdir(base) else None
    paper = getattr(trainer.privileged, "paper", {}) or {}
    name = model_name or os.path.basename(os.path.normpath(model_ref or folder))
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    tags += [t for t in ("selfdistill", "on-policy-distillation", paper.get("name")) if t and t not in tags]
    method = paper.get("name", type(trainer.privileged).__name__)
    if paper.get("id"):
        method += f" ([{paper.get('title', paper['id'])}](https://huggingface.co/papers/{paper['id']}))"
    a = trainer.args
    card = ModelCard.from_template(
        ModelCardData(base_model=base, datasets=dataset_name, library_name="transformers", model_name=name, tags=tags),
        template_path=str(files("selfdistill") / "templates" / "model_card.md"),
        model_name=name, base_model=base, model_ref=trainer.hub_model_id or model_ref or folder, method_line=method,
        example_prompt=json.dumps(example_prompt(trainer)),
        dataset_name=dataset_name, source=type(trainer.privileged).__name__, teacher_policy=a.teacher_policy,
        loss=f"{a.divergence}, support {a.support}, clip {a.clip} (tau {a.clip_tau})",
        steps=trainer.state.global_step, rollouts_per_step=a.per_device_train_batch_size * a.world_size,
        num_generations=a.num_generations, learning_rate=a.learning_rate,
        selfdistill_version=version("selfdistill"), trl_version=version("trl"),
        transformers_version=version("transformers"), pytorch_version=version("torch"),
    )
    card.save(os.path.join(folder, "README.md"))


def example_prompt(trainer: Any) -> list[dict[str, str]]:
    """The model card's example: the first prompt of the user's training data (as chat messages)."""
    rows = getattr(trainer, "train_dataset", None)
    try:
        first = next(iter(rows))["prompt"] if rows is not None else None
    except (StopIteration, KeyError, TypeError):
        first = None
    if isinstance(first, str):
        return [{"role": "user", "content": first}]
    if isinstance(first, list) and first and all(isinstance(m, dict) and "content" in m for m in first):
        return [{"role": str(m.get("role", "user")), "content": str(m["content"])} for m in first]
    return [{"role": "user", "content": "Hello!"}]
