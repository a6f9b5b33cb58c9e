"""Each method in a miniature where its premise holds, against its baselines at equal training rollouts.

One comparison per task (issue "premises"); every run is a shipped recipe plus overrides, run by the `selfdistill`
command one after the other (`recipe_runs.run_recipe`). ``--seeds`` repeats a configuration with
``training.seed=S``. Every finished run is merged into benchmarks/results/premises.json as
``{"task", "method", "seed", "accuracy", "generated_tokens", ...}`` (accuracy: held-out greedy accuracy or success
rate as a fraction), and the table and docs/img/premises.png are redrawn from that file.

    python benchmarks/premises.py --list                                   # the comparisons and their runs
    python benchmarks/premises.py guess_number_skillsd skillsd_seeded --seeds 0 1 2
    python benchmarks/premises.py arithmetic_sdpo --seeds 0                # every configuration of one comparison
    python benchmarks/premises.py choice_sdpo sdpo --seeds 0 1 2           # its GRPO seeds are choice_sdzero's
    python benchmarks/premises.py arithmetic_sdpo grpo --reuse 0=benchmarks/results/all_methods.json:grpo@s0
        # record a run of the same configuration made by another benchmark (marked "reused_from")
    python benchmarks/premises.py --plot-only
    python benchmarks/premises.py arithmetic_sdpo sdpo_g8_len32 --diagnose  # diagnose a configuration, no training
    python benchmarks/premises.py open_sdzero sdzero_stage160 --diagnose --seeds 0 1 2
        # SD-Zero: diagnose the self-revision stage each seed's run trained from (kept in its folder), not a new one
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from recipe_runs import ROOT, diagnose_recipe, machine, run_recipe

from selfdistill.premises import verdicts
from selfdistill.tasks.codes import code_facts, code_table

RESULTS = ROOT / "benchmarks" / "results" / "premises.json"
DIAGNOSES = ROOT / "benchmarks" / "results" / "premises_diagnosis.json"
PLOT = ROOT / "docs" / "img" / "premises.png"

# A correct strategy for guess-the-number 1-8 in 4 guesses (binary search), written by a person: Skill-SD's premise
# is a teacher that knows something the student does not; with this bank it does, whatever the 135M model writes.
BINARY_SEARCH = ("Guess 4 first. If I say higher, guess 6; if I say lower, guess 2. Then guess the middle of the "
                 "numbers still possible. Reply with one number only.")

# AVSD's full_solution view wording, for the single-view baselines (ReferenceSolution's {solution} is AVSD's {pi}).
VIEW_TEMPLATE = ("{problem}\n\nHere is a reference solution:\n{solution}\n\nUnderstand it, then answer in your own "
                 "words.")

# The main job's settings for every arithmetic run (960 training rollouts of <= 16 tokens, lr 3e-5, bf16), as in
# benchmarks/compare_methods.py, so its recorded GRPO runs can be reused.
MAIN_BUDGET = ["training.per_device_train_batch_size=8", "training.max_steps=120"]
GRPO_ARITHMETIC = [*MAIN_BUDGET, "training.distill_weight=0", "training.grpo_weight=1", "training.num_generations=4",
                   "eval.every_steps=20"]

SWITCH_CUE = "\n\nWait, this response is wrong, so the answer is the other option. Let me correct it.\n\n"

FORMAT_SKILL = "Write the sum in one line, as: a + b = c. Nothing else."
TIP_TEMPLATE = "{task}\n\nHere is a tip:\n{skills}\n\nUnderstand it, then answer in your own words."
# Skills that carry a strategy, not only a form (sixth session): the format skill above won with a fixed teacher while
# diagnose's `skills` premise failed (the skill lifted the sampled teacher by 0.04). Candidates are screened with
# `--diagnose` first; the one whose premise holds is trained.
EXAMPLE_SKILL = "Write the sum in one line, as: a + b = c. For example: 23 + 45 = 68."
DECOMPOSE_SKILL = ("Add the tens, then the ones, then the two results. For example, for 23 + 45: 20 + 40 = 60, "
                   "3 + 5 = 8, 60 + 8 = 68.")

G8_LEN32 = ["training.max_steps=60", "training.per_device_train_batch_size=16", "training.num_generations=8",
            "training.max_completion_length=32"]
# One GRPO configuration serves arithmetic_sdpo and arithmetic_skillsd: its runs are recorded once per seed.
GRPO_G8_LEN32 = ("recipes/opsd_arithmetic.yaml", [*G8_LEN32, "training.distill_weight=0", "training.grpo_weight=1",
                                                  "eval.every_steps=20"])
SIBLING_IN_VIEW_WORDING = f"source.template={json.dumps(VIEW_TEMPLATE.replace('{solution}', '{sibling}'))}"
SKILLSD_FORMAT = [*G8_LEN32, f"source.seed_skills=[{json.dumps(FORMAT_SKILL)}]", "source.summaries_per_step=0",
                  "source.top_k=1", f"source.template={json.dumps(TIP_TEMPLATE)}", "eval.every_steps=20"]

# AVSD over three independent references, each wrong on 30% of rows: against OPSD on each reference alone and
# OPSD shown all three in one context; at the recipe's setting (whole vocabulary, scale clip tau 4) and at the
# paper's (union of each view's top-64 plus the sampled token, per-entry clip 0.05, uniform weights).
NOISY_REFERENCES: dict[str, tuple[str, list[str]]] = {
    "avsd": ("recipes/avsd_noisy_references.yaml", []),
    "avsd_paper": ("recipes/avsd_noisy_references.yaml", ["source.top_k=64", "training.clip=entry",
                                                          "training.clip_tau=0.05"]),
    # The same wording as AVSD's views (the full_solution template), so that only the combination differs. A
    # first run with ReferenceSolution's default (the paper's long instruction) collapsed to 1% ("This is a
    # reference to a reference ..."); it is kept in premises.json as opsd_view_reference_1_default_template.
    **{f"opsd_view_reference_{k}": ("recipes/avsd_noisy_references.yaml", [
        f"source={{type: reference, column: reference_{k}, template: {json.dumps(VIEW_TEMPLATE)}}}"])
       for k in (1, 2, 3)},
    "opsd_all_views": ("recipes/avsd_noisy_references.yaml", [
        "source={type: reference, column: references_all, template: \"{problem}\\n\\nHere are three reference "
        "solutions (some may be wrong):\\n{solution}\\n\\nUnderstand them, then answer in your own words.\"}"]),
}

#: comparison -> (task, {configuration: (recipe, overrides)}); the first configuration is the method.
COMPARISONS: dict[str, tuple[str, dict[str, tuple[str, list[str]]]]] = {
    # SDPO (a successful sibling as the teacher's PI) against GRPO with the same binary reward and rollouts.
    "arithmetic_sdpo": ("arithmetic", {
        "sdpo": ("recipes/sdpo_arithmetic.yaml", []),
        # the recipe before the audit: rollouts without a successful sibling distilled towards the bare problem
        "sdpo_fallback_problem": ("recipes/sdpo_arithmetic.yaml", ["source.fallback=problem"]),
        "grpo": ("recipes/opsd_arithmetic.yaml", GRPO_ARITHMETIC),
        # Where SDPO's premise holds: 32 tokens (room: no successful teacher answer is cut; 7% of student rollouts)
        # and 8 rollouts a prompt, so that a rollout has a successful sibling about half the time at the start
        # (the student succeeds on 10% of sampled rollouts: 1 - 0.9**7) instead of about a fifth. Same 960
        # rollouts (60 steps x 16), the paper's loss (JSD, EMA teacher) unchanged; GRPO at the same G and length.
        "sdpo_g8_len32": ("recipes/sdpo_arithmetic.yaml", [*G8_LEN32, "eval.every_steps=20"]),
        "grpo_g8_len32": GRPO_G8_LEN32,
        # The sibling shown in the main job's OPSD wording. With SDPO's own ("... written by another attempt: ...
        # Now answer the problem yourself.") seed 0 took up the teacher's "I'll provide a corrected answer to the
        # original question." and fell from 18% to 0%; diagnose's focus premise fails there (1.49x) and holds here
        # (1.9x: the divergence sits on the answer's digits).
        "sdpo_g8_len32_reference_wording": ("recipes/sdpo_arithmetic.yaml", [
            *G8_LEN32, "eval.every_steps=20", SIBLING_IN_VIEW_WORDING]),
        # The same with the initial model as the teacher (OPSD's), not the EMA of the student: seed 0 above reached
        # 57% at step 40 and then took up the teacher's habit of commenting after its answer ("The answer is indeed
        # 100.\n\nI made a minor adjustment to the explanation ..."), whose numbers the verifier reads: 2.5%. Does
        # a teacher that does not follow the student keep from it?
        "sdpo_g8_len32_reference_wording_initial_teacher": ("recipes/sdpo_arithmetic.yaml", [
            *G8_LEN32, "eval.every_steps=20", "training.teacher_policy=initial", SIBLING_IN_VIEW_WORDING]),
    }),
    # Skill-SD on addition with a bank a person seeded with the form in which this model adds best ("a + b = c"),
    # against the same GRPO as arithmetic_sdpo's (G = 8, 32 tokens, 960 rollouts; Skill-SD is GRPO + IW-RKL).
    # The teacher's message in the main job's OPSD wording: under Skill-SD's default one ("Skills learned from
    # earlier attempts ... Use these skills to do the task well.") the 135M model answered "I'm ready to help.
    # What's your task?" to every problem (a one-off probe: 0 of 48 right, against 6 of 48 for the bare problem;
    # diagnose: teacher 0.00 greedy).
    "arithmetic_skillsd": ("arithmetic", {
        "skillsd_format_skill": ("recipes/skillsd_arithmetic.yaml", SKILLSD_FORMAT),
        "grpo_g8_len32": GRPO_G8_LEN32,
        # The teacher kept at the initial model instead of synced with the student every 10 steps: with SDPO the
        # EMA teacher taught the student's drift back, and a fixed one kept it stable.
        "skillsd_format_skill_initial_teacher": ("recipes/skillsd_arithmetic.yaml", [
            *SKILLSD_FORMAT, "training.teacher_policy=initial"]),
        # The control for the row above: the same run with an empty bank, so the fixed teacher sees what the student
        # sees and the distillation term is a reverse KL to the initial model (GRPO's usual anchor, here in
        # Skill-SD's importance-weighted form). Is the gain the skill's, or the anchor's?
        "grpo_kl_to_initial": ("recipes/skillsd_arithmetic.yaml", [
            *[o for o in SKILLSD_FORMAT if not o.startswith("source.seed_skills=")],
            "training.teacher_policy=initial"]),
        **{f"skillsd_{kind}_skill_initial_teacher": ("recipes/skillsd_arithmetic.yaml", [
            *[o for o in SKILLSD_FORMAT if not o.startswith("source.seed_skills=")],
            f"source.seed_skills=[{json.dumps(text)}]", "training.teacher_policy=initial"])
           for kind, text in (("example", EXAMPLE_SKILL), ("decompose", DECOMPOSE_SKILL))},
    }),
    # Skill-SD with a bank holding a correct strategy, against GRPO alone and Skill-SD with learned skills, at the
    # settings of benchmarks/skillsd_vs_grpo.py (float32, 40 steps x 8 episodes), so its recorded runs can be reused;
    # plus the distillation weight lambda (Skill-SD = GRPO + lambda * IW-RKL).
    "guess_number_skillsd": ("guess_number", {
        "skillsd_seeded": ("recipes/skillsd_guess_number.yaml",
                           [f"source.seed_skills=[{json.dumps(BINARY_SEARCH)}]", "source.summaries_per_step=0",
                            "source.top_k=1"]),
        "skillsd_learned": ("recipes/skillsd_guess_number.yaml", []),
        "grpo": ("recipes/skillsd_guess_number.yaml", ["training.distill_weight=0", "source.summaries_per_step=0"]),
        **{f"skillsd_seeded_lambda{w}": ("recipes/skillsd_guess_number.yaml",
                                         [f"source.seed_skills=[{json.dumps(BINARY_SEARCH)}]",
                                          "source.summaries_per_step=0", "source.top_k=1",
                                          f"training.distill_weight={w}"])
           for w in ("0.1", "0.3", "3.0")},
    }),
    # Skill-SD where its premise holds by construction (eighth session): keyed recall (selfdistill/tasks/codes.py),
    # where what an attempt finds out about a city serves every later attempt at it and the student cannot know it
    # otherwise. The recipe's bank is seeded with one fact per city, retrieved by similarity (diagnose: teacher 0.91
    # against the student's 0.02; `stops` fails with the recipe's synced teacher, every premise holds with the initial
    # one). Against GRPO alone (the same recipe with the distillation term off) and Skill-SD with the skills the model
    # writes about its own attempts, filed under each city.
    "codes_skillsd": ("codes", {
        "skillsd_seeded": ("recipes/skillsd_codes.yaml", []),
        "grpo": ("recipes/skillsd_codes.yaml", ["training.distill_weight=0", "source.seed_skills=[]"]),
        "skillsd_learned": ("recipes/skillsd_codes.yaml", ["source.seed_skills=[]", "source.summaries_per_step=2"]),
        # Seed 0 at the recipe's settings drifted to the 32-token cap from step 20 (95% of rollouts cut by step 40)
        # and learned slowly. Two screens: the initial model as a teacher that does not follow the student (it kept
        # the replies short), and the whole vocabulary as the support (the same reverse KL, not a one-sample estimate
        # of it: it learned faster).
        "skillsd_seeded_initial_teacher": ("recipes/skillsd_codes.yaml", ["training.teacher_policy=initial"]),
        # Diagnosed only: the same 24 facts as one skill, one list shown for every city. Does the 135M teacher look a
        # code up in a list, or only copy the one fact it is shown?
        "skillsd_seeded_one_list": ("recipes/skillsd_codes.yaml", [
            f"source.seed_skills=[{json.dumps(' '.join(code_facts(code_table())))}]"]),
        "skillsd_seeded_full_support": ("recipes/skillsd_codes.yaml", ["training.support=full"]),
        # Both: seeds 0 and 1 of the full support drifted to the cap too (the student took up the synced teacher's
        # talk about its tip: "I'll give you a tip, and ..."), while learning faster than the one-sample estimate.
        "skillsd_seeded_full_support_initial_teacher": ("recipes/skillsd_codes.yaml", [
            "training.support=full", "training.teacher_policy=initial"]),
    }),
    # SD-Zero on open addition at the main job's budget (960 training rollouts after SRT), against the same GRPO as
    # arithmetic_sdpo's (whose runs it shares) and its SRT stage alone (from the same run). Before SRT the 135M reviser
    # turns 9% of its wrong answers right; after it, 28% (diagnose measures the reviser SRT leaves).
    "open_sdzero": ("arithmetic", {
        "sdzero": ("recipes/sdzero_arithmetic.yaml", []),
        "grpo": ("recipes/opsd_arithmetic.yaml", GRPO_ARITHMETIC),
        # The recipe's earlier self-revision stage (256 prompts x 3 epochs at 1e-5): a test of diagnose's rules as
        # revised in the tenth session, which read every premise holding for it (greedy gap +0.20, the teacher writing
        # the sum out in 92% of its answers against the student's 16%) and failing two for the current stage.
        "sdzero_earlier_stage": ("recipes/sdzero_arithmetic.yaml", ["srt.prompts=256", "srt.epochs=3",
                                                                     "srt.learning_rate=1e-5"]),
        # choice_sdzero's sdzero_stage160 stage on open addition: a second test of `focus`'s form clause (eleventh
        # session), diagnosed and its prediction written down before training.
        "sdzero_stage160": ("recipes/sdzero_arithmetic.yaml", ["srt.prompts=160", "srt.epochs=2",
                                                               "srt.learning_rate=2e-5"]),
    }),
    # SD-Zero on two-option addition, where "this response is wrong" leaves one option; its SRT stage alone is read
    # from the same run (eval_after_srt, recorded as method "srt"), GRPO has the same binary reward.
    "choice_sdzero": ("arithmetic_choice", {
        "sdzero": ("recipes/sdzero_choice.yaml", []),
        "grpo": ("recipes/sdzero_choice.yaml", ["srt.enabled=false", "training.distill_weight=0",
                                                "training.grpo_weight=1", "training.num_generations=4"]),
        # The reviser told what "wrong" means with two options. With the paper's cue the 135M reviser turned 40% of
        # wrong answers right and kept 45% of right ones (teacher 0.41, below the 0.50 of a rule that ignores the
        # problem: blind_rule fails); this cue was meant to make it switch, so that its target is the right option
        # on every rollout. It did not (benchmarks/reviser_anchoring.py --name switch_cue: 35% of wrong answers
        # turned right), so this configuration was not trained. Its SRT stage would be recorded as srt_switch_cue.
        "sdzero_switch_cue": ("recipes/sdzero_choice.yaml", [f"source.cues={json.dumps({'wrong': SWITCH_CUE})}"]),
        # A self-revision stage between the seventh session's (256 x 3 at 1e-5) and the ninth's (96 x 2 at 3e-5): a
        # test of `focus`'s form clause (eleventh session), diagnosed and its prediction written down before training.
        "sdzero_stage160": ("recipes/sdzero_choice.yaml", ["srt.prompts=160", "srt.epochs=2",
                                                           "srt.learning_rate=2e-5"]),
    }),
    # SDPO where its premise holds: on two-option addition the student's rollouts succeed about a quarter of the time,
    # so with G = 4 most rollouts have a successful sibling (on open addition, 5-10%: most steps had none). Same
    # rollouts (60 steps x 8), learning rate and sampling as choice_sdzero's GRPO, whose seeds it shares.
    # At 16 tokens diagnose's `room` fails there (28% of the sibling teacher's successes are longer; seed 0 drifted to
    # a preamble that pushed the answer past the cut), so the `_len32` pair gives both methods 32 tokens.
    "choice_sdpo": ("arithmetic_choice", {
        "sdpo": ("recipes/sdpo_arithmetic.yaml", ["data.choices=2", "training.max_steps=60"]),
        "grpo": ("recipes/sdzero_choice.yaml", ["srt.enabled=false", "training.distill_weight=0",
                                                "training.grpo_weight=1", "training.num_generations=4"]),
        "sdpo_len32": ("recipes/sdpo_arithmetic.yaml", ["data.choices=2", "training.max_steps=60",
                                                        "training.max_completion_length=32"]),
        # The teacher shown the sibling in the main job's OPSD wording instead of "written by another attempt ...
        # Now answer the problem yourself.", whose teacher opens with a preamble the student takes up (seed 0).
        "sdpo_len32_reference_wording": ("recipes/sdpo_arithmetic.yaml", [
            "data.choices=2", "training.max_steps=60", "training.max_completion_length=32",
            f"source.template={json.dumps(VIEW_TEMPLATE.replace('{solution}', '{sibling}'))}"]),
        "grpo_len32": ("recipes/sdzero_choice.yaml", ["srt.enabled=false", "training.distill_weight=0",
                                                      "training.grpo_weight=1", "training.num_generations=4",
                                                      "training.max_completion_length=32"]),
    }),
    # AVSD over three noisy references (NOISY_REFERENCES above).
    "noisy_references_avsd": ("arithmetic_noisy_references", NOISY_REFERENCES),
    # The same comparison with room for the answer (fifth session): at 16 tokens diagnose's `room` fails there at 128
    # prompts (29% of the best view's successful answers are longer; 45% of student rollouts cut), so every
    # configuration gets 32 tokens. The paper's settings are left out (25% at 16 tokens, seed 0).
    "noisy_references_avsd_len32": ("arithmetic_noisy_references", {
        f"{name}_len32": (recipe, [*overrides, "training.max_completion_length=32"])
        for name, (recipe, overrides) in NOISY_REFERENCES.items() if name != "avsd_paper"
    }),
}


def accuracy(result: dict) -> float:
    return float(result["eval_after"]["greedy_accuracy"])


def row(task: str, method: str, seed: int, result: dict, comparison: str) -> dict:
    """One run as premises.json records it; the tokens include SD-Zero's self-revision phase."""
    srt = (result.get("srt") or {}).get("generated_tokens", 0)
    return {
        "task": task, "method": method, "seed": seed, "accuracy": accuracy(result),
        "generated_tokens": int(result["generated_tokens"]) + int(srt), "comparison": comparison,
        "accuracy_before": (result.get("eval_before") or {}).get("greedy_accuracy"),
        "rollouts": result.get("rollouts"), "train_seconds": result.get("train_seconds"),
        "overrides": result.get("overrides"), "recipe": result.get("recipe"),
        **({"reused_from": result["reused_from"]} if "reused_from" in result else {}),
    }


def load(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def record(path: Path, entry: dict) -> list[dict]:
    """Replace the run with the same (task, method, seed), merged into what is on disk now."""
    runs = [r for r in load(path) if (r["task"], r["method"], r["seed"]) != (entry["task"], entry["method"],
                                                                               entry["seed"])]
    runs.append(entry)
    runs.sort(key=lambda r: (r["task"], r["method"], r["seed"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(runs, indent=1))
    return runs


def summaries(runs: list[dict]) -> list[dict]:
    """Per (task, configuration), in order: its runs, mean accuracy, the sd text (empty for one seed), mean tokens."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["method"]), []).append(r)
    out = []
    for (task, method), rs in sorted(groups.items()):
        acc = [r["accuracy"] for r in rs]
        out.append({"task": task, "method": method, "runs": rs, "mean": statistics.mean(acc),
                    "sd": f" ± {statistics.stdev(acc):.1%}" if len(acc) > 1 else "",
                    "tokens": statistics.mean(r["generated_tokens"] for r in rs)})
    return out


def table(runs: list[dict]) -> str:
    head = f"{'task':14} {'method':28} {'seeds':>5} {'accuracy (mean ± sd)':>21} {'per seed':>24} {'gen. tokens':>11}"
    lines = [head, "-" * len(head)]
    for g in summaries(runs):
        per_seed = " ".join(f"s{r['seed']}:{r['accuracy']:.1%}" for r in g["runs"])
        lines.append(f"{g['task']:14} {g['method']:28} {len(g['runs']):>5} {g['mean']:>13.1%}{g['sd']:>8} "
                     f"{per_seed:>24} {g['tokens']:>11.0f}")
    return "\n".join(lines)


def markdown(runs: list[dict]) -> str:
    """The table of docs/results.md: per task and configuration, mean ± sd over the seeds run, and each seed."""
    lines = ["| task | configuration | seeds | held-out accuracy, mean ± sd | per seed | generated tokens (mean) |",
             "|---|---|---|---|---|---|"]
    for g in summaries(runs):
        seeds = " / ".join(f"{r['accuracy']:.1%}" for r in g["runs"])
        ids = ", ".join(str(r["seed"]) for r in g["runs"])
        lines.append(f"| {g['task']} | {g['method']} | {ids} | {g['mean']:.1%}{g['sd']} | {seeds} | "
                     f"{g['tokens']:,.0f} |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    """One panel per task: each configuration's seeds as dots and its mean as a bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in runs})
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 4.2), dpi=120, squeeze=False)
    for ax, task in zip(axes[0], tasks):
        methods = sorted({r["method"] for r in runs if r["task"] == task})
        for i, method in enumerate(methods):
            acc = [100 * r["accuracy"] for r in runs if r["task"] == task and r["method"] == method]
            ax.bar(i, statistics.mean(acc), color="C0" if method.startswith(("grpo", "srt", "opsd")) else "C1",
                   alpha=0.6)
            ax.scatter([i] * len(acc), acc, color="k", s=12, zorder=3)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=35, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_title(task, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("held-out greedy accuracy / success (%)")
    fig.suptitle("Each method where its premise holds (bars: mean over seeds; dots: seeds; blue: baselines)",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def stage_name(name: str) -> str:
    """The name an SD-Zero configuration's self-revision stage alone is recorded under (``sdzero_x`` -> ``srt_x``)."""
    return name.replace("sdzero", "srt", 1)


def run_dir(out_root: Path, comparison: str, name: str, seed: int) -> Path:
    """Where ``name@sS`` of a comparison trains."""
    return out_root / comparison / f"{name}@s{seed}"


def diagnosis_dir(out_root: Path, comparison: str, name: str, seed: int) -> Path:
    """Where ``name@sS`` is diagnosed (any ``--prompts``: the folder keeps the latest report and the linked stage)."""
    return out_root / "diagnose" / comparison / f"{name}@s{seed}"


def rejudge(entry: dict) -> dict[str, str]:
    """A saved diagnosis's verdicts by the thresholds and rules as they stand now, for the premises its recorded
    figures cover (pi_gap, signal, focus, revision); the others (room, stops, ...) as recorded."""
    view = {"reward": entry.get("teacher_reward"), "reward_greedy": entry.get("teacher_reward_greedy"),
            "in_form": entry.get("student_in_teacher_form"), "successes_too_long": 0.0}
    report = {k: entry.get(k) for k in ("student_reward", "student_reward_greedy", "teacher_reward",
                                        "teacher_reward_greedy")}
    report.update(teacher_view="v", teacher={"v": view}, max_completion_length=0, student_lengths={"cut_share": 0.0},
                  signal={k: entry.get(k) for k in ("reverse_kl", "digit_share", "digit_token_fraction")})
    if entry.get("revision"):
        report["revision"] = entry["revision"]
    now = {v["premise"]: v["verdict"] for v in verdicts(report)}
    recorded = dict(entry.get("verdicts") or {})
    recorded.update({k: now[k] for k in ("pi_gap", "signal", "focus", "revision") if k in now and k in recorded})
    return recorded


def seed_diagnoses(comparison: str, runs: list[dict], found: dict, out_root: Path, prompts: int | None = None) -> str:
    """Per seed of an SD-Zero comparison: its own stage's diagnosis beside that seed's gain over the stage (markdown).

    A row needs a diagnosis saved as ``comparison/name@sS`` (``--diagnose --seeds``; ``@pN`` after it with
    ``--prompts N``) and both runs of that seed in premises.json (``name`` and its stage, ``srt...``)."""
    task = COMPARISONS[comparison][0]
    acc = {(r["method"], r["seed"]): r["accuracy"] for r in runs if r["task"] == task}
    lines = ["| run | stage alone | SD-Zero | gain | student greedy, own / in the reviser's form | reviser greedy | "
             "wrong -> right | focus (digits) | verdicts failing |", "|---|---|---|---|---|---|---|---|---|"]
    summary: dict[bool, list[float]] = {True: [], False: []}
    nan = float("nan")

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{x:.1%}"

    suffix = f"@p{prompts}" if prompts else ""
    for key in sorted(k for k in found if k.startswith(comparison + "/") and "@s" in k
                      and (k.endswith(suffix) if suffix else "@p" not in k)):
        name, seed = key.split("/", 1)[1].removesuffix(suffix).rsplit("@s", 1)
        d, seed = found[key], int(seed)
        stage, method = acc.get((stage_name(name), seed)), acc.get((name, seed))
        form = d.get("student_in_teacher_form") or {}
        rev = d.get("revision") or {}
        focus = (d["digit_share"] / d["digit_token_fraction"] if d.get("digit_share") is not None
                 and d.get("digit_token_fraction") else None)
        saved = diagnosis_dir(out_root, comparison, name, seed) / "diagnosis.json"
        report = json.loads(saved.read_text()) if saved.exists() else {}
        if report.get("prompts") == (prompts or 64):  # the whole report kept: every premise judged again
            judged = {v["premise"]: v["verdict"] for v in verdicts(report)}
        else:
            judged = rejudge(d)
        failing = ", ".join(k for k, v in judged.items() if v == "fails") or "none"
        if stage is not None and method is not None:
            summary[failing == "none"].append(100 * (method - stage))
        lines.append(
            f"| {name}@s{seed} | {pct(stage)} | {pct(method)} | "
            f"{'–' if stage is None or method is None else f'{100 * (method - stage):+.1f}'} | "
            f"{form.get('student_reward_greedy', nan):.2f} / {form.get('student_reward_in_form', nan):.2f} | "
            f"{d.get('teacher_reward_greedy') or nan:.2f} | "
            f"{round((rev.get('wrong_to_right') or 0) * rev.get('wrong', 0))} of {rev.get('wrong', 0)} "
            f"({rev.get('wrong_to_right') or 0:.1%}) | "
            f"{'–' if focus is None else f'{focus:.2f}x'} | {failing}"
            + ("" if _same_stage(out_root, comparison, name, seed) else " (not the run's stage)") + " |")
    if len(lines) == 2:
        return (f"no per-seed diagnosis of {comparison}" + (f" at {prompts} prompts" if prompts else "") + ": run "
                f"`python benchmarks/premises.py {comparison} NAME --diagnose --seeds 0 1 2` first")
    agree = sum(g > 0 for g in summary[True]) + sum(g <= 0 for g in summary[False])
    for held, gains in ((True, summary[True]), (False, summary[False])):
        if gains:
            each = " / ".join(f"{g:+.1f}" for g in gains)
            lines.append(f"\n{'every premise holds' if held else 'a premise fails'}: {len(gains)} seeds, gain over "
                         f"the stage {statistics.mean(gains):+.1f} on average ({each})")
    lines.append(f"\nthe verdicts agree with the sign of the gain on {agree} of "
                 f"{len(summary[True]) + len(summary[False])} seeds")
    return "\n".join(lines)


def _same_stage(out_root: Path, comparison: str, name: str, seed: int) -> bool:
    """Whether a seed's diagnosis measured the very stage its run trained from (one file, hard-linked both ways)."""
    weights = Path("srt") / "reviser" / "model.safetensors"
    diagnosed = diagnosis_dir(out_root, comparison, name, seed) / weights
    trained = run_dir(out_root, comparison, name, seed) / weights
    return diagnosed.exists() and trained.exists() and os.path.samefile(diagnosed, trained)


def _link_stage(run: Path, out: Path) -> None:
    """Hard-link the self-revision stage kept under ``run`` (``srt/reviser``) into ``out``: a diagnosis of seed S
    gets the stage that seed's trained run kept, and a run of seed S the stage its diagnosis made. ``srt_stage``
    reuses it only when its fingerprint matches (same recipe, overrides and seed), so the diagnosis measures the
    model training starts from; a stage that does not match is run again into the copy, never into the original
    (a save replaces the link, not the file)."""
    stage = run / "srt" / "reviser"
    if not stage.is_dir():
        return
    target = out / "srt" / "reviser"
    target.mkdir(parents=True, exist_ok=True)
    for f in stage.iterdir():
        dest = target / f.name
        if dest.exists():
            dest.unlink()
        os.link(f, dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("comparison", nargs="?", help=f"one of: {', '.join(COMPARISONS)}")
    parser.add_argument("names", nargs="*", help="configurations of that comparison (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="training.seed of each run (default 0); with --diagnose, diagnose each seed's run as "
                             "trained (SD-Zero: from the self-revision stage that run kept)")
    parser.add_argument("--reuse", action="append", default=[], metavar="SEED=FILE[:KEY]",
                        help="record a results.json (or KEY of a benchmark's results file) as the named "
                             "configuration's run of SEED, instead of running it")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--out-root", type=Path, default=ROOT / "outputs" / "premises")
    parser.add_argument("--diagnose", action="store_true",
                        help="run `selfdistill diagnose` on the named configurations instead of training them "
                             "(benchmarks/results/premises_diagnosis.json; docs/diagnose.md's table)")
    parser.add_argument("--prompts", type=int, default=None,
                        help="with --diagnose: training rows to roll out (diagnose's --prompts; saved as NAME@pN); "
                             "with --seed-diagnoses: which of those diagnoses to print (default: the 64-prompt ones)")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown (docs/results.md)")
    parser.add_argument("--seed-diagnoses", action="store_true",
                        help="print, per seed of the named comparison, its own stage's diagnosis beside its gain")
    args = parser.parse_args()
    if args.list:
        for name, (task, configs) in COMPARISONS.items():
            print(f"{name} ({task})")
            for config, (recipe, overrides) in configs.items():
                print(f"    {config:28} {recipe} {' '.join(overrides)}")
        return
    if args.seed_diagnoses:
        if args.comparison not in COMPARISONS:
            raise SystemExit(f"name a comparison: {', '.join(COMPARISONS)}")
        found = json.loads(DIAGNOSES.read_text()) if DIAGNOSES.exists() else {}
        print(seed_diagnoses(args.comparison, load(args.results), found, args.out_root, args.prompts))
        return
    if not args.plot_only:
        if args.comparison not in COMPARISONS:
            raise SystemExit(f"name a comparison: {', '.join(COMPARISONS)} (or --plot-only, --list)")
        task, configs = COMPARISONS[args.comparison]
        for name in args.names:
            if name not in configs:
                raise SystemExit(f"unknown configuration {name!r} of {args.comparison}; choose from: "
                                 f"{', '.join(configs)}")
        if args.diagnose:
            found = json.loads(DIAGNOSES.read_text()) if DIAGNOSES.exists() else {}
            for name in args.names or list(configs):
                recipe, overrides = configs[name]
                for seed in args.seeds or [None]:
                    key = f"{args.comparison}/{name}" + ("" if seed is None else f"@s{seed}")
                    extra = [] if seed is None else [f"training.seed={seed}"]
                    if seed is None:
                        out = args.out_root / "diagnose" / key
                    else:
                        out = diagnosis_dir(args.out_root, args.comparison, name, seed)
                        _link_stage(run_dir(args.out_root, args.comparison, name, seed), out)
                    key += f"@p{args.prompts}" if args.prompts else ""
                    print(f"diagnosing {key} ...", flush=True)
                    entry = diagnose_recipe(ROOT / recipe, [*overrides, *extra], out, prompts=args.prompts)
                    print(entry.pop("table", entry.get("error", "")), flush=True)
                    found[key] = {"recipe": recipe, **entry, "cpu": machine().get("cpu")}
                    DIAGNOSES.write_text(json.dumps(found, indent=1))
            print(f"wrote {DIAGNOSES}")
            return
        if args.reuse:
            if len(args.names) != 1:
                raise SystemExit("--reuse records runs of one configuration: name exactly one")
            for item in args.reuse:
                seed, _, ref = item.partition("=")
                file, _, key = ref.partition(":")
                result = json.loads(Path(file).read_text())
                result = dict(result[key] if key else result)
                result.update(reused_from=ref, recipe=configs[args.names[0]][0], overrides=configs[args.names[0]][1])
                record(args.results, row(task, args.names[0], int(seed), result, args.comparison))
        else:
            info = machine()
            print(f"machine: {info.get('cpu')}", flush=True)
            for seed in args.seeds or [0]:
                for name in args.names or list(configs):
                    recipe, overrides = configs[name]
                    run = f"{args.comparison}/{name}@s{seed}"
                    print(f"running {run} ...", flush=True)
                    # a stage diagnosed for this seed (--diagnose --seeds) is the one it trains from (srt_stage
                    # reuses it only if its fingerprint matches); a run that kept its own stage keeps it
                    if not (run_dir(args.out_root, args.comparison, name, seed) / "srt" / "reviser").is_dir():
                        _link_stage(diagnosis_dir(args.out_root, args.comparison, name, seed),
                                    run_dir(args.out_root, args.comparison, name, seed))
                    result = run_recipe(f"{name}@s{seed}", recipe, [*overrides, f"training.seed={seed}"],
                                        args.out_root / args.comparison)
                    if "error" in result:
                        print(f"{run} failed: {result['error']}", flush=True)
                        continue
                    runs = record(args.results, {**row(task, name, seed, result, args.comparison),
                                                 "cpu": info.get("cpu")})
                    if result.get("eval_after_srt"):  # SD-Zero's first stage alone, from the same run
                        srt = {**result, "eval_after": result["eval_after_srt"], "generated_tokens": 0}
                        srt_name = stage_name(name)
                        runs = record(args.results, {**row(task, srt_name, seed, srt, args.comparison),
                                                     "cpu": info.get("cpu")})
                    print(table([r for r in runs if r["task"] == task]), flush=True)
    runs = load(args.results)
    print(markdown(runs) if args.markdown else table(runs))
    plot(runs, PLOT)
    print(f"wrote {args.results} and {PLOT}")


if __name__ == "__main__":
    main()
