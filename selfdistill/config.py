"""`SelfDistillConfig`: the training arguments of on-policy self-distillation, in TRL's style.

Every field carries a help string; every check lives in ``__post_init__`` so a bad combination fails when the
config is built, not at step 300.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from transformers import TrainingArguments

from selfdistill.losses import CLIPS, DIVERGENCES, SUPPORTS, TOPK_SOURCES, LossSpec

TEACHER_POLICIES = ("live", "initial", "ema", "sync")
VLLM_MODES = ("colocate", "server")
PI_OVERFLOW = ("truncate", "error")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of: {', '.join(choices)}")


@dataclass
class SelfDistillConfig(TrainingArguments):
    r"""Configuration for [`SelfDistillTrainer`].

    Beside [`~transformers.TrainingArguments`], the fields fall into four groups: generation (how the student samples
    its rollouts), loss (divergence, support and clipping, METHODS.md §1), rollout reuse, and the teacher (which
    weights score the rollouts). ``per_device_train_batch_size`` counts *rollouts*, as in TRL's GRPO: with
    ``num_generations=4`` a batch of 8 holds 2 prompts with 4 rollouts each.

    The default loss is the token-level reverse KL(student || teacher) over the full vocabulary, clipped per token
    (``clip="scale"``: each token contributes at most ``clip_tau`` nats, its gradient scaled by ``clip_tau / D_t``
    above that), with an importance-ratio cap ``c = 2`` on stale rollouts: "reverse KL with clipping".
    """

    # Overrides of TrainingArguments defaults.
    learning_rate: float = field(
        default=1e-5,
        metadata={"help": "Initial learning rate for AdamW (1e-5 suits full fine-tuning of ~100M models)."},
    )
    logging_steps: float = field(
        default=10, metadata={"help": "Log every X update steps (a float in [0, 1) is a ratio of total steps)."}
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep every dataset column: privileged-information sources and reward functions read them."},
    )

    model_init_kwargs: dict | None = field(
        default=None,
        metadata={"help": "Keyword arguments for from_pretrained when the model is given as a name or path "
                  "(e.g. {'dtype': 'bfloat16'})."},
    )

    # Generation
    num_generations: int = field(
        default=4, metadata={"help": "Rollouts G sampled per prompt. The rollout batch must be divisible by G."}
    )
    max_prompt_length: int | None = field(
        default=512,
        metadata={"help": "Longest student prompt in tokens; a longer prompt is an error naming the row "
                  "(None: no limit)."},
    )
    max_completion_length: int = field(default=256, metadata={"help": "New tokens sampled per rollout at most."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the rollouts."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the smallest set with this mass."})
    top_k: int | None = field(default=None, metadata={"help": "Sample among the k most likely tokens (None: all)."})

    # Loss
    divergence: str = field(
        default="reverse_kl",
        metadata={"help": "Token divergence: 'reverse_kl' = KL(student||teacher), 'forward_kl', or 'jsd' "
                  "(see jsd_beta)."},
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "JSD mixture weight in (0, 1): m = beta*p_T + (1-beta)*p_S, "
                  "D = beta KL(T||m) + (1-beta) KL(S||m)."},
    )
    support: str = field(
        default="full",
        metadata={"help": "Vocabulary support: 'full' (exact), 'topk' (see support_top_k), or 'sampled' (the realised "
                  "token only, REINFORCE surrogate; reverse KL)."},
    )
    support_top_k: int = field(default=64, metadata={"help": "k of the top-k support."})
    topk_from: str = field(
        default="student", metadata={"help": "Whose top-k forms the support: 'student', 'teacher' or 'union'."}
    )
    tail_bucket: bool = field(
        default=True,
        metadata={"help": "Top-k support: add one bucket holding the uncaptured mass (True) or renormalise (False)."},
    )
    clip: str = field(
        default="scale",
        metadata={"help": "Divergence clip: 'token' caps each token's divergence min(D_t, clip_tau) (no gradient "
                  "above tau); 'scale' has the same value but scales the token's gradient by tau/D_t; 'entry' caps "
                  "each vocabulary term (OPSD, tau 0.05); 'none'."},
    )
    clip_tau: float = field(default=1.0, metadata={"help": "Threshold tau of the divergence clip, in nats."})
    ratio_clip: float | None = field(
        default=2.0,
        metadata={"help": "Cap c of the importance ratio min(pi_theta/pi_old, c) on reused rollouts (None: off). "
                  "Required when rollouts are reused (num_iterations > 1 or steps_per_generation > "
                  "gradient_accumulation_steps)."},
    )

    fused_loss: bool = field(
        default=False,
        metadata={"help": "Compute the loss from hidden states fused with the output head, loss_chunk_size tokens at "
                  "a time, so no [tokens, vocab] logits exist in full (exact; for long completions or large "
                  "vocabularies)."},
    )
    loss_chunk_size: int = field(default=1024, metadata={"help": "Tokens per chunk of the fused loss."})

    # Rollout reuse
    steps_per_generation: int | None = field(
        default=None,
        metadata={"help": "Micro-batches served from one generation round (None: gradient_accumulation_steps)."},
    )
    num_iterations: int = field(
        default=1, metadata={"help": "Optimisation passes over each generation round (> 1 reuses rollouts)."}
    )

    # Teacher
    teacher_policy: str = field(
        default="initial",
        metadata={"help": "Teacher weights: 'initial' (frozen start; under LoRA the adapter disabled), 'live' (the "
                  "current student, no grad), 'ema' (moving average), 'sync' (hard copy every teacher_update_every)."},
    )
    teacher_ema_rate: float = field(
        default=0.05, metadata={"help": "EMA rate alpha: theta_T <- (1-alpha) theta_T + alpha theta at each update."}
    )
    teacher_update_every: int = field(
        default=1, metadata={"help": "Optimizer steps between teacher updates ('ema' and 'sync')."}
    )
    max_teacher_length: int | None = field(
        default=None,
        metadata={"help": "Longest teacher sequence (context + completion) in tokens; None: the model's "
                  "max_position_embeddings."},
    )
    share_teacher_prefix: bool = field(
        default=True,
        metadata={"help": "Run each distinct teacher context (prompt + privileged information) once and reuse its KV "
                  "cache for every rollout that shares it (the num_generations rollouts of a prompt)."},
    )
    share_prompt_prefix: bool = field(
        default=True,
        metadata={"help": "Run the beginning that prompts share (the G copies of one prompt, the chat template's "
                  "system prompt) once: in sampling's prefill, and with gradients in the student pass, where the "
                  "rollouts of a shared prefix are packed into one sequence with a block attention mask (one "
                  "forward, one backward). The student pass shares in one process without DeepSpeed or FSDP (packed "
                  "also under gradient checkpointing)."},
    )
    teacher_batch_views: bool = field(
        default=True,
        metadata={"help": "Score all teacher views of a micro-batch in one forward (M x B sequences); False runs one "
                  "forward per view, for when M x B sequences do not fit in memory."},
    )
    pi_overflow: str = field(
        default="truncate",
        metadata={"help": "When a teacher sequence is too long: 'truncate' the privileged text (counted in "
                  "metrics) or 'error'. Completion tokens are never truncated."},
    )

    # Rewards
    reward_timeout: float | None = field(
        default=60.0,
        metadata={"help": "Seconds a reward function may take on one batch; a slower call counts its rollouts as "
                  "verifier failures (NaN reward) instead of stalling the run, and a function that fails on every "
                  "rollout of a batch stops the run with the fix. None: no limit."},
    )
    env_timeout: float | None = field(
        default=60.0,
        metadata={"help": "Seconds each environment call (construction, reset, step, reward) may take; a slower or "
                  "raising one stops the run with an error naming the call, the turn and the task. None: no limit."},
    )

    # Scale-out: vLLM rollouts and the final model (docs/scaling.md)
    use_vllm: bool = field(
        default=False,
        metadata={"help": "Sample rollouts with vLLM through TRL's VLLMGeneration (needs a CUDA GPU and "
                  "`pip install selfdistill[vllm]`); the student's weights are pushed to vLLM after each optimizer "
                  "step."},
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={"help": "'colocate': a vLLM engine inside each training process, sharing its GPU; 'server': a "
                  "separate `trl vllm-serve` process the main rank sends prompts to."},
    )
    vllm_server_base_url: str | None = field(
        default=None, metadata={"help": "Server mode: base URL (e.g. 'http://10.0.0.5:8000'); overrides host/port."}
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Server mode: host of the vLLM server."})
    vllm_server_port: int = field(default=8000, metadata={"help": "Server mode: port of the vLLM server."})
    vllm_server_timeout: float = field(
        default=240.0, metadata={"help": "Server mode: seconds to wait for the server to come up."}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3,
        metadata={"help": "Colocate mode: share of each GPU's memory vLLM may take (weights and KV cache); the rest "
                  "is the trainer's."},
    )
    vllm_tensor_parallel_size: int = field(
        default=1, metadata={"help": "Colocate mode: GPUs one vLLM engine spans; must divide the number of ranks."}
    )
    vllm_importance_sampling: bool = field(
        default=True,
        metadata={"help": "Correct the sampler/trainer mismatch: vLLM's log-probs of the sampled tokens are pi_old and "
                  "each token's loss is multiplied by sg(min(pi_theta / pi_vllm, ratio_clip))."},
    )
    save_merged_model: bool = field(
        default=False,
        metadata={"help": "Under LoRA, also write the adapter merged into the base weights to <final>-merged at the "
                  "end of `selfdistill train` (the adapter alone is always saved)."},
    )

    # Multi-turn rollouts (an environment_factory is given to the trainer) and the GRPO term (Skill-SD)
    max_turns: int | None = field(
        default=None,
        metadata={"help": "Multi-turn rollouts: replies per episode at most (default: the environment's own limit). "
                  "max_completion_length is then the limit of one reply."},
    )
    max_episode_length: int | None = field(
        default=None,
        metadata={"help": "Multi-turn rollouts: tokens after the prompt (replies and environment turns) at most; an "
                  "episode that would exceed it on its next turn ends there. None: half of max_teacher_length."},
    )
    distill_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the distillation loss. 0 with grpo_weight > 0 trains GRPO alone (the teacher "
                  "pass is skipped)."},
    )
    grpo_weight: float = field(
        default=0.0,
        metadata={"help": "Weight lambda of a GRPO term beside the distillation loss (Skill-SD trains both); needs "
                  "rewards and num_generations >= 2. 0: off."},
    )
    epsilon: float = field(
        default=0.2, metadata={"help": "GRPO term: lower clip of the ratio, 1 - epsilon (as GRPOConfig)."}
    )
    epsilon_high: float | None = field(
        default=None, metadata={"help": "GRPO term: upper clip 1 + epsilon_high (default: epsilon; as GRPOConfig)."}
    )
    rlsd_lambda: float = field(
        default=0.0,
        metadata={"help": "RLSD (selfdistill.methods.rlsd): each token's GRPO advantage becomes A * ((1 - lambda) + "
                  "lambda * w_t), w_t = clip(exp(sign(A) (log pi_T - log pi_S)), 1 - rlsd_epsilon, 1 + rlsd_epsilon) "
                  "from the teacher's view of the sampled token. Needs grpo_weight > 0 and a single-view source. "
                  "0: off."},
    )
    rlsd_epsilon: float = field(
        default=0.2, metadata={"help": "RLSD: the weights w_t are clipped to [1 - rlsd_epsilon, 1 + rlsd_epsilon]."}
    )
    rlsd_decay_steps: int | None = field(
        default=None,
        metadata={"help": "RLSD: lambda falls linearly from rlsd_lambda to 0 over this many optimizer steps (the "
                  "paper's text: 50), after which the run is GRPO. None: constant (the authors' shipped config)."},
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per reward function (default 1.0 each), as GRPOConfig; the trainer's "
                  "reward_weights= argument, when given, takes precedence."},
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={"help": "GRPO term: a completion cut at max_completion_length gets advantage 0, so a cut rollout "
                  "that happens to score is not reinforced (GRPOConfig's name; DAPO's overlong filtering). Its "
                  "reward still enters its group's mean and std, its tokens still count in the step's token "
                  "normalisation, and the distillation term still covers them."},
    )
    scale_rewards: str = field(
        default="group",
        metadata={"help": "GRPO advantages (r - group mean) divided by the group's reward std ('group', TRL's "
                  "default), the batch's ('batch') or not at all ('none')."},
    )

    # Logging
    log_completions: bool = field(
        default=False,
        metadata={"help": "At each logging step, print sample rollouts with their rewards and log them as a "
                  "wandb.Table (as GRPOConfig)."},
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "How many sample rollouts log_completions shows (default 4)."}
    )
    heatmap_steps: int = field(
        default=0,
        metadata={"help": "Every this many optimizer steps, render the per-token teacher-student divergence of "
                  "heatmap_samples rollouts as HTML and PNG under <output_dir>/heatmaps (and to wandb when it is a "
                  "report_to target). 0: off."},
    )
    heatmap_samples: int = field(default=4, metadata={"help": "Rollouts per divergence heatmap."})

    def __post_init__(self) -> None:
        self._check_numbers()
        super().__post_init__()
        _choice("divergence", self.divergence, DIVERGENCES)
        _choice("support", self.support, SUPPORTS)
        _choice("topk_from", self.topk_from, TOPK_SOURCES)
        _choice("clip", self.clip, CLIPS)
        _choice("teacher_policy", self.teacher_policy, TEACHER_POLICIES)
        _choice("pi_overflow", self.pi_overflow, PI_OVERFLOW)
        if self.num_generations < 1:
            raise ValueError(f"num_generations={self.num_generations} must be >= 1")
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length={self.max_completion_length} must be >= 1")
        if self.per_device_train_batch_size < 1:
            raise ValueError(f"per_device_train_batch_size={self.per_device_train_batch_size} must be >= 1 (rollouts "
                             "per device per optimizer step)")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps={self.max_steps} trains nothing; give a number of optimizer steps >= 1 (or -1 "
                             "to train for num_train_epochs)")
        if self.remove_unused_columns:
            raise ValueError(
                "remove_unused_columns=True would drop the dataset columns the privileged source (e.g. the reference "
                "solution) and the reward functions (**columns) read; leave it False (the default, as in GRPOConfig)"
            )
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0; rollouts are sampled, not greedy")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        if self.steps_per_generation < 1 or self.num_iterations < 1:
            raise ValueError("steps_per_generation and num_iterations must be >= 1")
        if self.steps_per_generation % self.gradient_accumulation_steps:
            raise ValueError(
                f"steps_per_generation={self.steps_per_generation} must be a multiple of gradient_accumulation_steps="
                f"{self.gradient_accumulation_steps}, so that each optimizer step's global token count (the loss "
                "normaliser) is known when its loss is computed"
            )
        rollouts = self.per_device_train_batch_size * self.steps_per_generation
        if rollouts % self.num_generations:
            raise ValueError(
                f"the rollout batch per_device_train_batch_size x steps_per_generation = {rollouts} is not divisible "
                f"by num_generations={self.num_generations}; make per_device_train_batch_size a multiple of "
                f"{self.num_generations}"
            )
        reused = self.num_iterations > 1 or self.steps_per_generation > self.gradient_accumulation_steps
        if reused and self.ratio_clip is None:
            raise ValueError(
                "rollouts are reused (num_iterations > 1 or steps_per_generation > gradient_accumulation_steps) "
                "but ratio_clip is None; the stale rollouts need the importance ratio: set ratio_clip=2.0"
            )
        if self.teacher_policy == "ema" and not 0 < self.teacher_ema_rate <= 1:
            raise ValueError(f"teacher_ema_rate={self.teacher_ema_rate} must be in (0, 1] for teacher_policy='ema'")
        if self.teacher_update_every < 1:
            raise ValueError(f"teacher_update_every={self.teacher_update_every} must be >= 1")
        if self.loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size={self.loss_chunk_size} must be >= 1")
        for name in ("reward_timeout", "env_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name}={value} must be > 0 seconds (or None for no limit)")
        if self.heatmap_steps < 0 or self.heatmap_samples < 1:
            raise ValueError("heatmap_steps must be >= 0 (0 switches heatmaps off) and heatmap_samples >= 1")
        _choice("scale_rewards", self.scale_rewards, ("group", "batch", "none"))
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(f"max_turns={self.max_turns} must be >= 1 (or None for the environment's limit)")
        if self.max_episode_length is not None and self.max_episode_length <= self.max_completion_length:
            raise ValueError(f"max_episode_length={self.max_episode_length} must exceed max_completion_length="
                             f"{self.max_completion_length} (one reply)")
        if self.distill_weight < 0 or self.grpo_weight < 0 or self.distill_weight + self.grpo_weight == 0:
            raise ValueError(f"distill_weight={self.distill_weight} and grpo_weight={self.grpo_weight} must be >= 0 "
                             "and not both 0")
        if self.grpo_weight > 0 and self.num_generations < 2:
            raise ValueError(f"grpo_weight={self.grpo_weight} compares the rollouts of one prompt, but num_generations="
                             f"{self.num_generations}; set num_generations >= 2")
        if self.grpo_weight > 0 and self.fused_loss:
            raise ValueError("grpo_weight > 0 needs the student's token log-probs, which the fused loss does not form; "
                             "set fused_loss=False")
        if not 0 <= self.rlsd_lambda <= 1:
            raise ValueError(f"rlsd_lambda={self.rlsd_lambda} must be in [0, 1] (0 switches RLSD off)")
        if not 0 < self.rlsd_epsilon < 1:
            raise ValueError(f"rlsd_epsilon={self.rlsd_epsilon} must be in (0, 1): RLSD's weights lie in "
                             "[1 - rlsd_epsilon, 1 + rlsd_epsilon]")
        if self.rlsd_decay_steps is not None and self.rlsd_decay_steps < 1:
            raise ValueError(f"rlsd_decay_steps={self.rlsd_decay_steps} must be >= 1 (or None for a constant lambda)")
        if self.rlsd_lambda > 0 and self.grpo_weight == 0:
            raise ValueError(f"rlsd_lambda={self.rlsd_lambda} reshapes the GRPO term's advantages, but grpo_weight=0; "
                             "set grpo_weight=1 (and distill_weight=0 for RLSD as published)")
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError("epsilon and epsilon_high must be > 0")
        self.loss_spec()  # validates the loss combination with the loss module's own messages
        self._check_vllm()

    def _check_numbers(self) -> None:
        """Numbers that no setting makes meaningful: NaN or infinite values, and lengths or counts out of range."""
        for f in fields(self):
            value = getattr(self, f.name, None)
            values = value if f.name == "reward_weights" and isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{f.name}={value} is not a finite number; give a finite value")
        for name in ("max_prompt_length", "max_teacher_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1 token (or None for the model's context window)")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 or None samples from the whole vocabulary)")
        if not 0 <= self.jsd_beta <= 1:
            raise ValueError(f"jsd_beta={self.jsd_beta} must be in [0, 1] (the mixture weight of the generalised JSD)")
        if self.support_top_k < 1:
            raise ValueError(f"support_top_k={self.support_top_k} must be >= 1 token")
        if self.learning_rate < 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be >= 0")

    def check_context_window(self, window: int | None) -> None:
        """The lengths against the model's context window (``max_position_embeddings``), once the model is known:
        a student sequence is a prompt plus a completion; a teacher's context is capped at ``max_teacher_length``."""
        if not window:
            return
        if self.max_prompt_length is not None and self.max_prompt_length + self.max_completion_length > window:
            raise ValueError(
                f"max_prompt_length={self.max_prompt_length} + max_completion_length={self.max_completion_length} = "
                f"{self.max_prompt_length + self.max_completion_length} tokens exceeds the model's context window of "
                f"{window} (max_position_embeddings); lower one of them so that their sum is <= {window}"
            )
        if self.max_completion_length >= window:
            raise ValueError(f"max_completion_length={self.max_completion_length} leaves no room for a prompt in the "
                             f"model's context window of {window} tokens; lower it")
        if self.max_teacher_length is not None and self.max_teacher_length > window:
            raise ValueError(
                f"max_teacher_length={self.max_teacher_length} exceeds the model's context window of {window} tokens "
                f"(max_position_embeddings); set it <= {window}, or None to use the window"
            )

    def _check_vllm(self) -> None:
        _choice("vllm_mode", self.vllm_mode, VLLM_MODES)
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            raise ValueError(f"vllm_gpu_memory_utilization={self.vllm_gpu_memory_utilization} must be in (0, 1]")
        if self.vllm_tensor_parallel_size < 1:
            raise ValueError(f"vllm_tensor_parallel_size={self.vllm_tensor_parallel_size} must be >= 1")
        if self.use_vllm and self.vllm_importance_sampling and self.ratio_clip is None:
            raise ValueError(
                "use_vllm with vllm_importance_sampling weights each token by min(pi_theta / pi_vllm, ratio_clip), "
                "but ratio_clip is None; set ratio_clip=2.0 (or vllm_importance_sampling=False to skip the correction)"
            )
        if self.use_vllm and self.vllm_mode == "server" and self.vllm_tensor_parallel_size != 1:
            raise ValueError(
                "vllm_tensor_parallel_size applies to colocate mode; in server mode pass the tensor-parallel size to "
                "the server (`trl vllm-serve --tensor_parallel_size N`) and leave vllm_tensor_parallel_size=1"
            )

    @property
    def reuses_rollouts(self) -> bool:
        return self.num_iterations > 1 or self.steps_per_generation > self.gradient_accumulation_steps

    def loss_spec(self) -> LossSpec:
        """The loss this config asks for, as the pure loss module's spec."""
        return LossSpec(
            divergence=self.divergence,
            jsd_beta=self.jsd_beta,
            support=self.support,
            top_k=self.support_top_k,
            topk_from=self.topk_from,
            tail_bucket=self.tail_bucket,
            clip=self.clip,
            clip_tau=self.clip_tau,
            ratio_clip=self.ratio_clip,
        )
