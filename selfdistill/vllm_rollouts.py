"""Rollouts sampled by vLLM, through TRL's ``VLLMGeneration`` (colocate and server modes).

TRL's helper owns the engine: in ``colocate`` mode a ``vllm.LLM`` inside each training process (sharing the GPU,
``vllm_gpu_memory_utilization`` of it), in ``server`` mode a client of a ``trl vllm-serve`` process that the main
rank sends every rank's prompts to. It also pushes the student's weights to the engine (gathering them under ZeRO-3,
merging a LoRA adapter first). This module adapts it to the trainer's rollout format and adds the two things the
trainer needs:

- the weights are pushed once per optimizer step, before the first generation of that step;
- vLLM's log-probabilities of the sampled tokens are returned beside the completions. vLLM's kernels and sampler
  are not the trainer's, so ``pi_vllm(y_t)`` differs from ``pi_theta(y_t)`` even with equal weights; the trainer
  uses these log-probs as ``pi_old`` and multiplies each token's loss by ``sg(min(pi_theta / pi_vllm, ratio_clip))``
  (truncated importance sampling, METHODS.md §1), exactly as for reused rollouts.

vLLM needs a CUDA GPU; on a machine without one ``use_vllm=True`` fails at trainer construction with the fix.
"""

from __future__ import annotations

from typing import Any

import torch

from selfdistill.rollout import Generated

VLLM_MISSING = (
    "use_vllm=True needs vLLM, which is not installed; on a CUDA machine run `pip install 'selfdistill[vllm]'` "
    "(server mode: start the server with `trl vllm-serve --model MODEL`), or set use_vllm=False to sample with "
    "transformers' generate"
)


def _make_engine(model: Any, accelerator: Any, tokenizer: Any, args: Any) -> Any:
    """TRL's vLLM helper configured from a :class:`~selfdistill.SelfDistillConfig` (tests replace this function)."""
    from trl.import_utils import is_vllm_available

    if not is_vllm_available():
        raise ImportError(VLLM_MISSING)
    from trl.generation.vllm_generation import VLLMGeneration

    return VLLMGeneration(
        model=model,
        accelerator=accelerator,
        processing_class=tokenizer,
        mode=args.vllm_mode,
        server_base_url=args.vllm_server_base_url,
        server_host=args.vllm_server_host,
        server_port=args.vllm_server_port,
        server_timeout=args.vllm_server_timeout,
        tensor_parallel_size=args.vllm_tensor_parallel_size,
        gpu_memory_utilization=args.vllm_gpu_memory_utilization,
        max_model_length=args.max_prompt_length + args.max_completion_length if args.max_prompt_length else None,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k or 0,
        max_completion_length=args.max_completion_length,
        logprobs=0,  # the sampled token's log-prob only: pi_old of the importance ratio
    )


class VLLMRollouts:
    """Samples a generation batch with vLLM; returns the trainer's ``Generated`` and the sampler's log-probs."""

    def __init__(self, model: Any, accelerator: Any, tokenizer: Any, args: Any):
        self.args = args
        self.engine = _make_engine(model, accelerator, tokenizer, args)
        self.synced_step = -1  # the first call pushes the weights too: the model may differ from its checkpoint
        self.syncs = 0

    def sample(
        self, prompt_ids: list[list[int]], eos: list[int], step: int
    ) -> tuple[Generated, list[torch.Tensor]]:
        """Completions (cut after the first EOS, EOS kept) and ``log pi_vllm`` of each of their tokens."""
        if step != self.synced_step:
            self.engine.sync_weights()
            self.synced_step = step
            self.syncs += 1
        _, completions, logprobs, _ = self.engine.generate(prompt_ids, None, self.args.num_generations)
        if len(completions) != len(prompt_ids):
            raise RuntimeError(
                f"vLLM returned {len(completions)} completions for {len(prompt_ids)} prompts; the prompts of a rank "
                "must come in groups of num_generations identical rows"
            )
        stop = set(eos)
        cut_ids, truncated, sampler_logps = [], [], []
        for ids, lps in zip(completions, logprobs):
            ids = list(ids)
            end = next((i + 1 for i, t in enumerate(ids) if t in stop), None)
            if end is not None:
                ids = ids[:end]
            cut_ids.append(ids)
            truncated.append(end is None and len(ids) >= self.args.max_completion_length)
            sampler_logps.append(torch.tensor([float(lp[0]) for lp in lps[: len(ids)]], dtype=torch.float32))
        return Generated(cut_ids, truncated), sampler_logps
