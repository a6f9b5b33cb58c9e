"""Recipe files: YAML, safe-loaded, validated completely before any model loads.

A recipe names a model, a dataset, a privileged source, optional verifiers, the evaluation and the
``SelfDistillConfig`` fields under ``training``. Unknown keys are rejected with the closest valid key, wrong types
and impossible combinations with a message that names the fix. ``key=value`` overrides use dotted paths
(``training.learning_rate=3e-5``, ``data.n_train=500``); values are parsed as YAML scalars.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from selfdistill.config import SelfDistillConfig
from selfdistill.dotted import import_dotted, split_dotted
from selfdistill.methods.sdzero.srt import RevisionConfig
from selfdistill.sources import SOURCES, PrivilegedSource


class RecipeError(ValueError):
    """A recipe that cannot run, with the key at fault and the fix."""


BUILT_IN_TASKS = ("arithmetic", "codes")


@dataclass
class DataSpec:
    """Where the rows come from: the built-in ``task`` or files / a hub dataset with a column mapping."""

    task: str | None = "arithmetic"  # or "codes": keyed recall of city codes (selfdistill.tasks.codes)
    n_train: int | None = None  # arithmetic: 2000; codes: every city in every training wording; files/hub: all rows
    n_test: int | None = None  # arithmetic: 200; codes: every city in every held-out wording; files/hub: all rows
    digits: Any = 2
    ops: Any = ("add",)
    prompt_template: Any = None  # built-in task: one wording with {question}, or a list of them (one per problem)
    choices: int = 0  # built-in task: options listed in the prompt (make_arithmetic_dataset)
    references: int = 0  # built-in task: independent noisy references reference_1..k and references_all
    reference_error: float = 0.0  # built-in task: the chance that each reference is wrong
    seed: int = 0
    train_files: Any = None
    test_files: Any = None
    hub: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    test_size: float | None = None
    columns: dict = field(default_factory=dict)
    system_prompt: str | None = None


@dataclass
class SourceSpec:
    """The privileged-information source: its ``type`` and its constructor arguments (the other keys).

    In YAML the arguments sit beside ``type`` (``source: {type: reference, column: solution}``); they are checked
    against the source class's signature, so a misspelt argument is named with the closest valid one.
    """

    type: str | None = None
    args: dict = field(default_factory=dict)


@dataclass
class EnvSpec:
    """A multi-turn environment: its ``type`` and constructor arguments (the other keys, checked against the class's
    signature). Its ``make_rows`` generates the train and test rows from ``data.n_train``, ``data.n_test`` and
    ``data.seed``; held-out evaluation is then the greedy success rate."""

    type: str | None = None
    args: dict = field(default_factory=dict)


@dataclass
class EvalSpec:
    """Held-out evaluation: greedy accuracy (and pass@k) before and after training, plus a learning curve."""

    before: bool = True
    after: bool = True
    n: int | None = None
    batch_size: int = 64
    max_new_tokens: int = 32
    pass_k: int = 0
    temperature: float = 1.0
    every_steps: int = 0
    curve_n: int = 100


@dataclass
class Recipe:
    description: str = ""
    method: str = "opsd"
    model: str = "smollm2-135m-instruct"
    data: DataSpec = field(default_factory=DataSpec)
    source: SourceSpec = field(default_factory=SourceSpec)
    env: EnvSpec | None = None
    srt: RevisionConfig | None = None
    rewards: list = field(default_factory=list)
    peft: dict | None = None
    eval: EvalSpec = field(default_factory=EvalSpec)
    training: dict = field(default_factory=dict)
    path: str | None = None

    def config(self, hardware_checks: bool = True) -> SelfDistillConfig:
        return build_config(self.training, hardware_checks)


#: method name -> the source type it uses by default
METHODS = {"opsd": "reference", "sdzero": "reviser", "avsd": "multiview", "skillsd": "skills"}
_SECTIONS = {"data": DataSpec, "eval": EvalSpec}
_TOP = {f.name for f in dataclasses.fields(Recipe)} - {"path"}


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(sorted(valid))}."


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value: Any, default: Any) -> Any:
    """YAML 1.1 reads ``3e-5`` (no dot) as a string; a float field takes it as the number it means."""
    if isinstance(default, float) and not isinstance(default, bool) and isinstance(value, str):
        if _FLOAT.match(value.strip()):
            return float(value)
    return value


def _check_type(where: str, value: Any, default: Any) -> None:
    if value is None or default is None:
        return
    expected: tuple[type, ...]
    if isinstance(default, bool):
        expected = (bool,)
    elif isinstance(default, int):
        expected = (int,)
    elif isinstance(default, float):
        expected = (int, float)
    elif isinstance(default, str):
        expected = (str,)
    else:
        return
    if isinstance(value, bool) and expected != (bool,):
        raise RecipeError(f"{where}: expected {expected[-1].__name__}, got the boolean {value!r}")
    if not isinstance(value, expected):
        raise RecipeError(f"{where}: expected {expected[-1].__name__}, got {type(value).__name__} {value!r}")


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise RecipeError(f"{name}: expected a mapping of keys to values, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in fields:
            raise RecipeError(f"unknown key {name}.{key}.{_suggest(key, list(fields))}")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        raw[key] = value = _coerce(value, default)
        _check_type(f"{name}.{key}", value, default)
    return cls(**raw)


#: Set to 1 to keep ``training.bf16: true`` on a CPU without native bfloat16.
CPU_BF16_ENV = "SELFDISTILL_CPU_BF16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matrix products natively (AVX512-BF16 or AMX)."""
    import torch

    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check() for check in checks if check is not None)


@functools.lru_cache(maxsize=1)
def _warn_cpu_bf16() -> None:
    warnings.warn(
        "training.bf16 is true, but this CPU has no native bfloat16 (AVX512-BF16 or AMX): autocast would emulate "
        "it about 20x slower than float32 (docs/performance.md), so this run trains in float32. Set "
        f"{CPU_BF16_ENV}=1 to keep bf16 anyway, or training.bf16=false to silence this.",
        stacklevel=3,
    )


def _on_cpu(kwargs: dict[str, Any]) -> bool:
    import torch

    return bool(kwargs.get("use_cpu")) or not torch.cuda.is_available()


def build_config(training: dict[str, Any], hardware_checks: bool = True) -> SelfDistillConfig:
    """``SelfDistillConfig(**training)`` with unknown keys and wrong types named before the config runs.

    ``hardware_checks=False`` validates a GPU recipe on a machine without one: mixed precision, which
    ``TrainingArguments`` checks against the hardware present, is switched off for the check only. On a CPU
    without native bfloat16, ``bf16: true`` falls back to float32 with a warning (``SELFDISTILL_CPU_BF16=1``
    keeps it).
    """
    fields = {f.name: f for f in dataclasses.fields(SelfDistillConfig) if f.init}
    kwargs = dict(training)
    for key, value in training.items():
        if key not in fields:
            raise RecipeError(f"unknown key training.{key}.{_suggest(key, list(fields))}")
        default = fields[key].default
        default = None if default is dataclasses.MISSING else default
        kwargs[key] = value = _coerce(value, default)
        annotation = str(fields[key].type)
        if isinstance(value, list) and "list" in annotation or isinstance(value, dict) and "dict" in annotation:
            continue
        _check_type(f"training.{key}", value, default)
    if not hardware_checks:
        kwargs.update(bf16=False, fp16=False)
    elif (kwargs.get("bf16") and _on_cpu(kwargs) and os.environ.get(CPU_BF16_ENV) != "1"
          and not cpu_has_native_bf16()):
        _warn_cpu_bf16()
        kwargs["bf16"] = False
    kwargs.setdefault("output_dir", "outputs/selfdistill")
    kwargs.setdefault("report_to", [])
    try:
        return SelfDistillConfig(**kwargs)
    except (ValueError, TypeError) as err:
        if (kwargs.get("bf16") or kwargs.get("fp16")) and not kwargs.get("use_cpu") and "use_cpu" in str(err):
            # transformers' own message ("Your setup doesn't support bf16/gpu") does not say what to do in a recipe.
            raise RecipeError(
                "training: this recipe trains in mixed precision on a GPU (bf16/fp16, no use_cpu) and no GPU is "
                "visible here. Run it on a machine with one, or add training.use_cpu=true to run it on the CPU "
                f"(transformers: {err})") from err
        raise RecipeError(f"training: {err}") from err


BUILTIN_REWARDS = {
    "arithmetic": "selfdistill.tasks.arithmetic:arithmetic_reward",
    "math": "selfdistill.rewards:math_reward",
}
ALLOW_CODE_ENV = "SELFDISTILL_ALLOW_CODE"  # comma-separated modules a recipe may import code from ("*": any)


def allowed_code(allow: Sequence[str] = ()) -> tuple[str, ...]:
    """Modules whose functions a recipe may name: selfdistill's own, ``allow`` (``--allow-code``) and the
    comma-separated ``SELFDISTILL_ALLOW_CODE``."""
    from_env = [m.strip() for m in os.environ.get(ALLOW_CODE_ENV, "").split(",") if m.strip()]
    return ("selfdistill", *allow, *from_env)


def _check_module(where: str, target: str, module: str, allow: Sequence[str]) -> None:
    if "*" in allow or any(module == m or module.startswith(m + ".") for m in allow):
        return
    top = module.split(".")[0] or target
    raise RecipeError(
        f"{where}: {target!r} would import and run code from module {module!r}, which this run does not allow. "
        f"Recipes may name built-in functions freely; code of your own needs your consent: "
        f"`selfdistill train RECIPE --allow-code {top}` (or {ALLOW_CODE_ENV}={top}). See docs/reliability.md."
    )


def check_code(rewards: list[str], source: SourceSpec, training: dict[str, Any], allow: Sequence[str]) -> None:
    """Refuse, before anything is imported, a recipe that would run code the user has not allowed: a dotted-path
    reward or view outside the allowed modules, or a model loaded with ``trust_remote_code``."""
    from selfdistill.methods.avsd.source import BUILTIN_VIEWS, COLUMN_VIEW

    refs = [("rewards", r) for r in rewards if r not in BUILTIN_REWARDS]
    views = source.args.get("views") or []
    refs += [("source.views", v) for v in views if isinstance(v, str) and v not in BUILTIN_VIEWS and v not in SOURCES
             and not v.startswith(COLUMN_VIEW)]
    for where, target in refs:
        module, _ = split_dotted(target)
        if not module:  # not a dotted path: no code to import (an unknown view is named by the source itself)
            if where == "rewards":
                raise RecipeError(f"reward {target!r} is neither built in ({', '.join(BUILTIN_REWARDS)}) nor a dotted "
                                  "path like 'my_package.rewards.exact_match'")
            continue
        _check_module(where, target, module, allow)
    if (training.get("model_init_kwargs") or {}).get("trust_remote_code") and "*" not in allow:
        raise RecipeError(
            "training.model_init_kwargs.trust_remote_code runs Python files shipped with the model; allow it "
            f"explicitly with `--allow-code '*'` (or {ALLOW_CODE_ENV}='*'), or remove it"
        )


def parse_recipe(raw: Any, path: str | None = None, hardware_checks: bool = True,
                 allow_code: Sequence[str] = ()) -> Recipe:
    """Validate a recipe mapping (already YAML-loaded) and return it; builds the config to check it.

    ``allow_code``: modules (besides selfdistill) whose functions the recipe may name as rewards or views
    (``"*"``: any); see :func:`check_code`.
    """
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe is a YAML mapping of sections; {path or 'the input'} holds {type(raw).__name__}")
    for key in raw:
        if key not in _TOP:
            raise RecipeError(f"unknown top-level key {key!r}.{_suggest(key, sorted(_TOP))}")
    method = raw.get("method", "opsd")
    if not isinstance(method, str):
        raise RecipeError(f"method: expected a string, got {type(method).__name__}")
    given_type = raw["source"].get("type") if isinstance(raw.get("source"), dict) else None
    if method not in METHODS and not given_type:  # a method of your own is named freely, with its source.type
        raise RecipeError(f"method={method!r} is not available; choose one of: {', '.join(METHODS)} (or name your "
                          "own method and give its source.type)")
    sections = {name: _build_section(name, cls, raw.get(name)) for name, cls in _SECTIONS.items()}
    source = parse_source(raw.get("source"), METHODS.get(method, "reference"), allow_code)
    srt = None
    if raw.get("srt") is not None:
        if source.type != "reviser":
            raise RecipeError(
                f"srt: self-revision training is SD-Zero's phase 1 and needs source.type: reviser (this recipe uses "
                f"{source.type!r}); remove the srt section or use method: sdzero"
            )
        try:
            srt = _build_section("srt", RevisionConfig, raw["srt"])
        except RecipeError:
            raise
        except ValueError as err:
            raise RecipeError(str(err)) from err
    rewards = raw.get("rewards") or []
    if isinstance(rewards, str):
        rewards = [rewards]
    if not isinstance(rewards, list) or not all(isinstance(r, str) for r in rewards):
        raise RecipeError("rewards: expected a list of names ('arithmetic') or dotted paths ('pkg.module.func')")
    peft = raw.get("peft")
    if peft is not None and not isinstance(peft, dict):
        raise RecipeError("peft: expected a mapping of LoraConfig arguments (r, lora_alpha, target_modules, ...)")
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise RecipeError("training: expected a mapping of SelfDistillConfig fields")
    for key in ("model", "description"):
        if key in raw and not isinstance(raw[key], str):
            raise RecipeError(f"{key}: expected a string, got {type(raw[key]).__name__}")
    check_code(rewards, source, training, allowed_code(allow_code))
    data = sections["data"]
    env = parse_env(raw.get("env"))
    if env is not None:
        given = (raw.get("data") or {}).get("task")
        if given is not None and given != env.type or data.train_files or data.hub:
            raise RecipeError(
                f"env.type={env.type!r} generates the rows itself; remove data.task, data.train_files and data.hub "
                "(data.n_train, data.n_test and data.seed still apply)"
            )
    elif data.task is None and not (data.train_files or data.hub):
        raise RecipeError("data: give a built-in task (task: arithmetic), train_files (json/jsonl/parquet/csv) or hub")
    if data.task is not None and data.task not in BUILT_IN_TASKS:
        raise RecipeError(f"data.task={data.task!r} is not a built-in task; use one of {', '.join(BUILT_IN_TASKS)} "
                          "or set task: null and give train_files or hub")
    if data.task == "codes" and env is None:
        _check_code_facts(data, source)
    recipe = Recipe(
        description=raw.get("description", ""),
        method=method,
        model=raw.get("model", "smollm2-135m-instruct"),
        data=data,
        source=source,
        env=env,
        srt=srt,
        rewards=rewards,
        peft=peft,
        eval=sections["eval"],
        training=training,
        path=path,
    )
    recipe.config(hardware_checks)
    _check_peft(peft)
    source_instance = build_source(recipe.source)
    if env is not None:
        build_env(env)  # builds one environment: checks the argument values
        if recipe.eval.pass_k:
            raise RecipeError("eval.pass_k counts verifier passes; with an env section the held-out measure is the "
                              "greedy success rate: remove eval.pass_k")
    if recipe.config(hardware_checks).grpo_weight > 0 and not (rewards or env):
        raise RecipeError("training.grpo_weight > 0 needs rewards: add a verifier under rewards or an env section")
    if source_instance.needs_rewards and not rewards and env is None:
        raise RecipeError(
            f"source.type={source.type!r} needs a verifier; add one under rewards (e.g. rewards: [arithmetic])"
        )
    return recipe


def _check_code_facts(data: DataSpec, source: SourceSpec) -> None:
    """Keyed recall's seeded facts must be those of its ``data.seed`` (``tasks.codes.check_seeded_facts``)."""
    seeded = source.args.get("seed_skills")
    if not seeded:
        return
    from selfdistill.methods.skillsd.source import read_seed_skills
    from selfdistill.tasks.codes import check_seeded_facts

    try:
        skills = read_seed_skills(seeded)
    except ValueError as err:
        raise RecipeError(f"source.seed_skills: {err}") from err
    try:
        check_seeded_facts(skills, data.seed)
    except ValueError as err:
        raise RecipeError(str(err)) from err


def parse_source(raw: Any, default_type: str, allow_code: Sequence[str] = ()) -> SourceSpec:
    """``type`` plus constructor arguments checked against the source class's signature. ``type`` is a registered
    name (``reference``, ...) or the dotted path of a :class:`PrivilegedSource` subclass (``pkg.module:Class``),
    imported only from allowed modules (:func:`check_code`): a new method is a file plus a recipe."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"source: expected a mapping of keys to values, got {type(raw).__name__}")
    args = dict(raw)
    kind = args.pop("type", None) or default_type
    _check_args("source", kind, source_class(kind, allowed_code(allow_code)), args)
    return SourceSpec(type=kind, args=args)


def source_class(kind: str, allow: Sequence[str] = ("selfdistill",)) -> type[PrivilegedSource]:
    """The class of a registered source name, or of a dotted path ``pkg.module:Class`` / ``pkg.module.Class`` from an
    allowed module."""
    if kind in SOURCES:
        return SOURCES[kind]
    module, attr = split_dotted(kind)
    if not module or not attr:
        raise RecipeError(f"source.type={kind!r} is not available.{_suggest(str(kind), list(SOURCES))} Or give "
                          "the dotted path of a PrivilegedSource subclass, e.g. my_pkg.sources:MySource")
    _check_module("source.type", kind, module, allow)
    cls = import_dotted(kind, "source.type", RecipeError)
    if not (isinstance(cls, type) and issubclass(cls, PrivilegedSource)):
        raise RecipeError(f"source.type={kind!r} is {cls!r}, not a subclass of "
                          "selfdistill.sources.PrivilegedSource")
    return cls


def _check_args(section: str, kind: str, cls: type, args: dict[str, Any]) -> None:
    """Constructor arguments checked against ``cls``'s signature: unknown keys and wrong types, named."""
    params = {
        name: p for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    for key, value in args.items():
        if key not in params:
            raise RecipeError(
                f"unknown key {section}.{key} for {section}.type={kind!r}.{_suggest(key, list(params) + ['type'])}"
            )
        default = params[key].default
        default = None if default is inspect.Parameter.empty else default
        args[key] = value = _coerce(value, default)
        _check_type(f"{section}.{key}", value, default)


def parse_env(raw: Any) -> EnvSpec | None:
    """The ``env`` section: ``type`` plus the environment's constructor arguments."""
    if raw is None:
        return None
    from selfdistill.envs import ENVIRONMENTS

    if not isinstance(raw, dict):
        raise RecipeError(f"env: expected a mapping with a type (one of {', '.join(ENVIRONMENTS)}), got "
                          f"{type(raw).__name__}")
    args = dict(raw)
    kind = args.pop("type", None)
    if kind not in ENVIRONMENTS:
        raise RecipeError(f"env.type={kind!r} is not available.{_suggest(str(kind), list(ENVIRONMENTS))}")
    _check_args("env", kind, ENVIRONMENTS[kind], args)
    return EnvSpec(type=kind, args=args)


def build_env(spec: EnvSpec) -> Any:
    """A factory of fresh environments; building one here checks the argument values."""
    import functools

    from selfdistill.envs import ENVIRONMENTS

    factory = functools.partial(ENVIRONMENTS[spec.type], **spec.args)
    try:
        factory()
    except (TypeError, ValueError) as err:
        raise RecipeError(f"env ({spec.type}): {err}") from err
    return factory


def build_source(spec: SourceSpec) -> PrivilegedSource:
    """The source object a recipe describes; bad argument values become a :class:`RecipeError`."""
    try:
        return source_class(spec.type, ("*",))(**spec.args)  # parse_source checked the consent
    except (TypeError, ValueError) as err:
        raise RecipeError(f"source ({spec.type}): {err}") from err


def _check_peft(peft: dict | None) -> None:
    if not peft:
        return
    from peft import LoraConfig

    try:
        LoraConfig(**peft)
    except TypeError as err:
        valid = [f.name for f in dataclasses.fields(LoraConfig)]
        bad = str(err).split("'")[-2] if "'" in str(err) else ""
        raise RecipeError(f"peft: {err}.{_suggest(bad, valid) if bad else ''}") from err


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a raw recipe mapping (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"override {item!r} is not key=value (e.g. training.learning_rate=3e-5)")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {item!r}: {part!r} is not a section")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as err:
            raise RecipeError(f"override {item!r}: the value is not a YAML scalar or list ({err}); quote it, e.g. "
                              f"{key}='\"...\"'") from err
        if isinstance(parsed, str) and _FLOAT.match(parsed.strip()):
            parsed = float(parsed)
        node[parts[-1]] = parsed
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (the plain loader keeps the last silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise RecipeError(f"key {key!r} is given twice, on lines {seen[key]} and {line}; keep one (the plain YAML "
                              "reading would silently take the last)")
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_recipe_yaml(path: Path) -> Any:
    """A recipe file's YAML document, every failure a :class:`RecipeError` that names the file and the fix."""
    if not path.exists():
        raise RecipeError(f"recipe {path} does not exist; `selfdistill recipes` lists the shipped ones")
    if path.is_dir():
        raise RecipeError(f"recipe {path} is a folder; give a recipe YAML file in it (`selfdistill recipes` lists the "
                          "shipped ones)")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"recipe {path} cannot be read ({type(err).__name__}: {err}); check its permissions and "
                          "that it is a UTF-8 text file") from err
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from err
    except yaml.YAMLError as err:
        raise RecipeError(f"{path} is not valid YAML: {err}") from err


def load_recipe(path: str | Path, overrides: list[str] | None = None, hardware_checks: bool = True,
                allow_code: Sequence[str] = ()) -> Recipe:
    path = Path(path)
    raw = read_recipe_yaml(path)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a YAML mapping of sections (model, data, source, training, ...), got "
                          f"a {type(raw).__name__}")
    return parse_recipe(apply_overrides(raw, overrides or []), str(path), hardware_checks, allow_code)


def recipe_dirs() -> list[Path]:
    """Where shipped recipes live: ./recipes and the repository's recipes folder."""
    here = Path(__file__).resolve().parent.parent / "recipes"
    dirs = [Path("recipes").resolve(), here]
    out = []
    for d in dirs:
        if d.is_dir() and d not in out:
            out.append(d)
    return out


def list_recipes() -> list[tuple[str, str]]:
    """(path, description) of every recipe YAML found in :func:`recipe_dirs`."""
    found = []
    for folder in recipe_dirs():
        for path in sorted(folder.glob("*.yaml")):
            try:
                raw = yaml.safe_load(path.read_text()) or {}
                description = str(raw.get("description", "")).strip().splitlines()[0] if raw.get("description") else ""
            except yaml.YAMLError:
                description = "(invalid YAML)"
            found.append((str(path), description))
    return found
