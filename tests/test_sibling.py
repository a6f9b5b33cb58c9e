"""The worked example of a new method in one file (selfdistill/sources/sibling.py, docs/methods/new-method.md):
SDPO-style privileged information from a successful sibling rollout, named in a recipe by its dotted path."""

import pytest
import yaml
from conftest import build_model

from selfdistill.cli import main
from selfdistill.methods.sdpo import SiblingSolution
from selfdistill.recipes import RecipeError, parse_recipe
from selfdistill.sources import Rollout, TeacherView

PROMPT = [{"role": "user", "content": "What is 2 + 3?"}]


def _rollouts(rewards, groups):
    return [Rollout(row={}, prompt=PROMPT, completion=f"attempt {i}", completion_ids=[i], reward=r, group=g)
            for i, (r, g) in enumerate(zip(rewards, groups))]


def test_each_rollout_sees_another_accepted_rollout_of_its_prompt():
    source = SiblingSolution()
    views = source.views(_rollouts([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, None], [0, 0, 0, 0, 1, 1, 1, 1]))
    shown = [v[0].pi for v in views]
    # Group 0: both failures see the first accepted sibling; each success sees the other one.
    assert shown[:4] == ["attempt 2", "attempt 0", "attempt 0", "attempt 0"]
    # Group 1: the failures see attempt 6; attempt 6 is its group's only success and sees the bare problem.
    assert shown[4:] == ["attempt 6", "attempt 6", None, "attempt 6"]
    # ... and, as in the paper, leaves the distillation loss (fallback="skip", the default)
    assert views[6][0] == TeacherView(context=PROMPT, pi=None, name="no_sibling", trains=False)
    assert all(v[0].trains for i, v in enumerate(views) if i != 6)
    bare = SiblingSolution(fallback="problem").views(_rollouts([0.0, 1.0], [0, 0]))
    assert bare[1][0] == TeacherView(context=PROMPT, pi=None, name="no_sibling", trains=True)
    assert "another attempt:\nattempt 2" in views[0][0].context[-1]["content"]
    assert source.metrics() == {"sibling/shown_fraction": 7 / 8}
    # fallback="self": a lone success is shown its own text.
    lone = SiblingSolution(fallback="self").views(_rollouts([0.0, 1.0], [0, 0]))
    assert [v[0].pi for v in lone] == ["attempt 1", "attempt 1"]


def test_bad_settings_name_the_fix():
    with pytest.raises(ValueError, match="lacks the {sibling} placeholder"):
        SiblingSolution(template="{problem} only")
    with pytest.raises(ValueError, match="fallback='none'"):
        SiblingSolution(fallback="none")


def test_a_source_by_dotted_path_needs_consent_and_a_privileged_source(monkeypatch):
    monkeypatch.delenv("SELFDISTILL_ALLOW_CODE", raising=False)
    base = {"method": "mine", "data": {"task": "arithmetic"}, "rewards": ["arithmetic"], "training": {"use_cpu": True}}
    with pytest.raises(RecipeError, match="source.type: 'json:JSONDecoder' would import and run code"):
        parse_recipe({**base, "source": {"type": "json:JSONDecoder"}})
    with pytest.raises(RecipeError, match="not a subclass of selfdistill.sources.PrivilegedSource"):
        parse_recipe({**base, "source": {"type": "json:JSONDecoder"}}, allow_code=["json"])
    with pytest.raises(RecipeError, match="unknown key source.treshold.*Did you mean 'threshold'"):
        parse_recipe({**base, "source": {"type": "selfdistill.methods.sdpo:SiblingSolution", "treshold": 1}})
    with pytest.raises(RecipeError, match="method='mine' is not available.*give its source.type"):
        parse_recipe({k: v for k, v in base.items()})


def test_the_recipe_trains_end_to_end_with_a_model_card(tmp_path, tokenizer):
    model_dir = tmp_path / "tiny"
    build_model(tokenizer, max_position_embeddings=1024).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    raw = yaml.safe_load(open("recipes/sdpo_arithmetic.yaml"))
    raw.update(model=str(model_dir), data={"task": "arithmetic", "n_train": 16, "n_test": 4, "digits": 1},
               eval={"before": False, "after": True, "n": 4, "batch_size": 4, "max_new_tokens": 4})
    raw["training"].update(output_dir=str(tmp_path / "out"), max_steps=2, max_completion_length=4, bf16=False,
                           logging_steps=1, save_strategy="steps", save_steps=2, disable_tqdm=True)
    path = tmp_path / "sdpo.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--no-progress"]) == 0
    card = (tmp_path / "out" / "final" / "README.md").read_text()
    assert "SDPO" in card and "2601.20802" in card and "SiblingSolution" in card
