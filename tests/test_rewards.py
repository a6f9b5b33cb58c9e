"""The math verifier on equivalent, malformed and empty answers."""

from conftest import build_model
from datasets import Dataset

from selfdistill.evaluation import evaluate
from selfdistill.rewards import completion_text, math_reward


def test_equivalent_forms_and_chat_completions():
    gold = ["so the result is $\\boxed{\\frac{1}{2}}$"] * 3
    completions = ["It is $0.5$.", [{"role": "assistant", "content": "\\boxed{1/2}"}], "It is $0.25$."]
    assert math_reward(None, completions, solution=gold) == [1.0, 1.0, 0.0]


def test_malformed_and_empty_completions_score_zero():
    assert math_reward(None, ["", "no answer here", "}}{{\\boxed{"], answer=["42"] * 3) == [0.0, 0.0, 0.0]


def test_unparseable_gold_is_left_out():
    # a gold with no mathematical answer is not a wrong answer: None leaves it out of the reward mean
    assert math_reward(None, ["42"], solution=["no boxed answer at all"]) == [None]


def test_completion_text():
    assert completion_text("x") == "x"
    assert completion_text([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]) == "a"
    assert completion_text(None) == ""


def test_math_reward_under_the_trainers_timeout_thread():
    # math-verify's own timeouts need the main thread; under reward_timeout the verifier runs in another one
    from selfdistill.rollout import score_rollouts

    completions = ["so it is $\\frac{1}{2}$", "\\boxed{0.5}", "no idea", ""]
    totals, _, failures = score_rollouts([math_reward], [1.0], ["p"] * 4, completions, [[1]] * 4,
                                         [{"prompt": "p", "answer": "0.5"}] * 4, timeout=30)
    assert totals == [1.0, 1.0, 0.0, 0.0] and failures == 0


def test_evaluation_survives_a_verifier_that_raises_on_one_completion(tokenizer):
    def picky(prompts, completions, **kwargs):
        if len(completions) > 1:
            raise ValueError("cannot parse a batch")
        return [1.0]

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 1?"}]} for i in range(3)])
    result = evaluate(build_model(tokenizer), tokenizer, data, picky, max_new_tokens=2, progress=False)
    assert result["n"] == 3 and result["greedy_accuracy"] == 1.0  # retried one by one, each scored
