"""Plan feedback in plain words: the phrasing test set, determinism, clarifications, answers, the LLM adapter."""

import json
import os
from pathlib import Path

import pytest

from twinrt.planning.conversation import (Clarification, CoverageRequest, DeliveryRequest, GoalEdit, Question,
                                          TradeOff, answer, interpretation_from_dict, parse_feedback, to_edits)
from twinrt.planning.goals import Goal, GoalResult
from twinrt.planning.llm_adapter import (ENV_API_KEY, ENV_ENDPOINT, ENV_MODEL, DeterministicFeedbackParser,
                                         HTTPLanguageModelParser, LanguageModelNotConfiguredError, default_parser)

DATA = json.loads((Path(__file__).parent / "data" / "feedback_phrasings.json").read_text(encoding="utf-8"))
SETS = DATA["structure_sets"]
ROWS = DATA["phrasings"]
HN = SETS["hn"]


def _parse(row):
    return parse_feedback(row["text"], SETS[row["structures"]])


def test_phrasing_set_is_large_and_varied():
    kinds = {r["expected"]["kind"] for r in ROWS}
    assert len(ROWS) >= 60
    assert kinds == {"GoalEdit", "TradeOff", "CoverageRequest", "DeliveryRequest", "Question", "Clarification"}
    # Ambiguous and negative phrasings are a real share of the set, not a token few.
    assert sum(r["expected"]["kind"] == "Clarification" for r in ROWS) >= 20


@pytest.mark.parametrize("row", ROWS, ids=[r["text"][:40] or "<empty>" for r in ROWS])
def test_phrasing(row):
    got = _parse(row).to_dict()
    wrong = {k: (v, got.get(k)) for k, v in row["expected"].items() if got.get(k) != v}
    assert not wrong, f"{row['text']!r}: expected vs got {wrong}"


def test_deterministic():
    first = [_parse(r).to_dict() for r in ROWS]
    second = [_parse(r).to_dict() for r in reversed(ROWS)][::-1]
    assert first == second
    # Structure order in the case does not change the result either.
    for r in ROWS:
        names = SETS[r["structures"]]
        assert parse_feedback(r["text"], list(reversed(names))).to_dict() == _parse(r).to_dict()


@pytest.mark.parametrize("text", ["keep the parotid mean under 20 Gy", "spare the parotid", "more coverage of the PTV",
                                  "why is the parotid so high?", "keep the parotis mean below 26 Gy"])
def test_ambiguous_structure_is_asked_never_guessed(text):
    result = parse_feedback(text, HN)
    assert isinstance(result, Clarification)
    assert result.reason == "ambiguous_structure"
    assert len(result.options) >= 2
    for option in result.options:
        assert option in result.question
    assert result.question.endswith("?")
    assert to_edits(result) == []


def test_parotid_question_text():
    result = parse_feedback("the parotid mean under 20 Gy", HN)
    assert result.question == "Which parotid: LeftParotid or RightParotid?"


def test_unknown_structure_lists_close_matches():
    result = parse_feedback("keep the brainsteem max under 54 Gy", ["Brainstem", "BrainstemPRV", "SpinalCord"])
    assert isinstance(result, Clarification) and result.reason == "ambiguous_structure"
    result = parse_feedback("keep the kidny mean under 10 Gy", ["Kidney_L", "Kidney_R", "Liver"])
    assert isinstance(result, Clarification) and set(result.options) == {"Kidney_L", "Kidney_R"}
    result = parse_feedback("keep the heart mean under 10 Gy", ["Hearts", "Liver"])
    assert isinstance(result, Clarification) and result.reason == "unknown_structure"
    assert "Hearts" in result.question


def test_one_fuzzy_candidate_is_named_in_the_confirmation():
    result = parse_feedback("rectm mean under 40 Gy", ["Rectum", "Bladder"])
    assert isinstance(result, GoalEdit) and result.structure == "Rectum"
    assert "Rectum Dmean <= 40 Gy" in result.confirmation_text()


def test_cgy_is_converted_and_goal_is_valid():
    result = parse_feedback("Rt parotid Dmean < 2600 cGy", HN)
    goal = result.to_goal()
    assert goal == Goal("RightParotid", "Dmean", "<=", 26.0, "should", source="user feedback",
                        note="Rt parotid Dmean < 2600 cGy")


def test_confirmation_texts_restate_the_edit():
    texts = {t: parse_feedback(t, HN).confirmation_text() for t in
             ["keep the left parotid mean under 20 Gy", "more coverage of PTV63",
              "spare the larynx even if PTV56 drops a bit", "fewer MU", "keep MU under 800", "lower the cord max",
              "why is the cord so high?"]}
    assert "LeftParotid Dmean <= 20 Gy" in texts["keep the left parotid mean under 20 Gy"]
    assert "at most 20 Gy" in texts["keep the left parotid mean under 20 Gy"]
    assert "PTV63" in texts["more coverage of PTV63"]
    assert "Larynx" in texts["spare the larynx even if PTV56 drops a bit"]
    assert "PTV56 may lose some coverage" in texts["spare the larynx even if PTV56 drops a bit"]
    assert "monitor units" in texts["fewer MU"]
    assert "800" in texts["keep MU under 800"]
    assert "Lower SpinalCord Dmax" in texts["lower the cord max"]
    assert "nothing is changed" in texts["why is the cord so high?"]
    assert not parse_feedback("why is the cord so high?", HN).needs_confirmation
    assert parse_feedback("fewer MU", HN).needs_confirmation


# ------------------------------------------------------------------------------------ evaluation

class FakeEvaluation:
    """The parts of PlanEvaluation the answers read: results and deliverability."""

    def __init__(self, results, deliverability=None):
        self.results = results
        self.deliverability = deliverability
        self.explanations = [r.explanation for r in results if r.passed is False]


def _result(structure, metric, comparator, limit, value, priority="should", case_structure=None):
    goal = Goal(structure, metric, comparator, limit, priority)
    margin = limit - value if comparator == "<=" else value - limit
    passed = margin >= 0
    text = f"{structure} {metric} is {value:.2f} Gy, " + ("within the limit." if passed else
                                                          f"{abs(margin):.2f} Gy above the {priority} limit.")
    return GoalResult(goal, value, passed, margin, text,
                      {"case_structure": case_structure} if case_structure else {})


EVAL = FakeEvaluation([
    _result("SpinalCord", "D0.1cc", "<=", 45.0, 47.3, "must"),
    _result("LeftParotid", "Dmean", "<=", 26.0, 21.0),
    _result("PTV63", "D95%", ">=", 59.85, 60.2, "must"),
    _result("Parotid_R", "Dmean", "<=", 26.0, 24.0, case_structure="RightParotid"),
], {"total_mu": 812.4, "n_beams": 7, "n_segments": 63, "delivery_time_s": 300.0})


def test_answer_cord_from_goal_results():
    q = parse_feedback("why is the cord so high?", HN, EVAL)
    assert isinstance(q, Question) and q.structure == "SpinalCord"
    text = answer(q, EVAL)
    assert "SpinalCord D0.1cc is 47.30 Gy" in text
    assert "1 of 1 goal(s) on SpinalCord are not met" in text


def test_answer_structure_without_goal():
    text = answer(parse_feedback("why is the larynx so high?", HN), EVAL)
    assert "There is no goal for Larynx" in text


def test_answer_uses_case_structure_of_aliased_goals():
    text = answer(parse_feedback("is the right parotid ok?", HN), EVAL)
    assert "Parotid_R Dmean is 24.00 Gy" in text and "All 1 goal(s)" in text


def test_answer_mu_failed_and_no_evaluation():
    assert answer(parse_feedback("what is the total MU?", HN), EVAL) == (
        "The plan needs 812 MU per fraction in 63 segments over 7 beams. Estimated delivery time 5.0 min.")
    failed = answer(parse_feedback("which goals failed?", HN), EVAL)
    assert "SpinalCord" in failed and "LeftParotid" not in failed
    assert "no plan evaluation yet" in answer(parse_feedback("why is the cord so high?", HN), None)
    assert "does not report monitor units" in answer(parse_feedback("how many MU?", HN), FakeEvaluation([]))
    # Non-questions are answered with their confirmation text.
    edit = parse_feedback("fewer MU", HN)
    assert answer(edit, EVAL) == edit.confirmation_text()


def test_evaluation_fixes_metric_and_action():
    relax = parse_feedback("relax the cord limit to 48 Gy", HN, EVAL)
    assert isinstance(relax, GoalEdit)
    assert (relax.metric, relax.comparator, relax.value, relax.action) == ("D0.1cc", "<=", 48.0, "relax")
    tighten = parse_feedback("keep the left parotid mean under 20 Gy", HN, EVAL)
    assert tighten.action == "tighten"
    new = parse_feedback("keep the larynx mean under 45 Gy", HN, EVAL)
    assert new.action == "add"
    # Without the evaluation the metric is not known: ask, do not guess.
    assert parse_feedback("relax the cord limit to 48 Gy", HN).reason == "missing_metric"


# ------------------------------------------------------------------------------------ edits

def test_to_edits_maps_onto_agent_edits():
    agent = pytest.importorskip("twinrt.planning.agent")
    goal = to_edits(parse_feedback("keep the left parotid mean under 20 Gy", HN))
    assert [e.to_dict() for e in goal] == [agent.Edit(
        "add_goal", "LeftParotid", metric="Dmean", value=20.0, comparator="<=", priority="should",
        reason="user feedback: keep the left parotid mean under 20 Gy").to_dict()]
    goals = agent.apply_goal_edits([Goal("LeftParotid", "Dmean", "<=", 26.0)],
                                   to_edits(parse_feedback("keep the left parotid mean under 20 Gy", HN, EVAL)))
    assert [(g.structure, g.value) for g in goals] == [("LeftParotid", 20.0)]
    trade = to_edits(parse_feedback("spare the larynx even if PTV56 drops a bit", HN))
    assert [(e.kind, e.structure, e.factor) for e in trade] == [("scale_weight", "Larynx", 2.0),
                                                               ("scale_weight", "PTV56", 0.5)]
    objs = agent.apply_edits([{"structure": "Larynx", "kind": "mean_dose", "dose_gy": 0, "weight": 10},
                              {"structure": "PTV56", "kind": "squared_underdose", "dose_gy": 56, "weight": 1000}],
                             trade)
    assert [o["weight"] for o in objs] == [20.0, 500.0]
    cover = to_edits(parse_feedback("more coverage of PTV63", HN))
    assert [(e.kind, e.structure, e.factor) for e in cover] == [("scale_weight", "PTV63", 2.0)]
    assert to_edits(parse_feedback("why is the cord so high?", HN)) == []


def test_delivery_requests_become_set_up_edits():
    agent = pytest.importorskip("twinrt.planning.agent")
    from twinrt.planning.conversation import SMOOTHNESS_START
    from twinrt.planning.workflow import PlanSetup

    base = PlanSetup(levels=20)
    fewer = to_edits(parse_feedback("fewer MU", HN), base)
    assert [(e.kind, e.parameter, e.value) for e in fewer] == [("set_setup", "smoothness_weight", SMOOTHNESS_START)]
    assert "0 → 30" in fewer[0].reason
    smoother = agent.apply_setup_edits(base, fewer)
    assert smoother.smoothness_weight == SMOOTHNESS_START and base.smoothness_weight == 0.0
    # A second request doubles it; "more MU" halves it, and below the start value switches it off.
    again = agent.apply_setup_edits(smoother, to_edits(parse_feedback("less modulation please", HN), smoother))
    assert again.smoothness_weight == 2 * SMOOTHNESS_START
    back = agent.apply_setup_edits(again, to_edits(parse_feedback("allow more MU", HN), again))
    assert back.smoothness_weight == SMOOTHNESS_START
    off = agent.apply_setup_edits(back, to_edits(parse_feedback("allow more MU", HN), back))
    assert off.smoothness_weight == 0.0
    # A limit ("keep MU under 800") is a smoothing edit too; the caller checks the limit afterwards.
    limited = parse_feedback("keep MU under 800", HN)
    assert isinstance(limited, DeliveryRequest) and limited.limit == 800
    assert [e.parameter for e in to_edits(limited, base)] == ["smoothness_weight"]
    seg = agent.apply_setup_edits(base, to_edits(parse_feedback("fewer segments", HN), base))
    assert seg.levels == 14 and isinstance(seg.levels, int)
    assert agent.apply_setup_edits(PlanSetup(levels=3), to_edits(parse_feedback("fewer segments", HN),
                                                                  PlanSetup(levels=3))).levels == 3
    # Objective and goal edits ignore set-up edits, and the other way round.
    assert agent.apply_edits([], fewer) == [] and agent.apply_goal_edits([], fewer) == []
    with pytest.raises(agent.InvalidInputError, match="smoothness_weight must be"):
        agent.Edit("set_setup", "plan", parameter="smoothness_weight", value=-1.0)
    with pytest.raises(agent.InvalidInputError, match="changes one of"):
        agent.Edit("set_setup", "plan", parameter="gantry_deg", value=10.0)


def test_interpretation_round_trip_and_refusal_of_foreign_structures():
    for row in ROWS:
        result = _parse(row)
        back = interpretation_from_dict(result.to_dict(), SETS[row["structures"]], row["text"])
        assert back == result
    foreign = interpretation_from_dict({"kind": "GoalEdit", "structure": "Liver", "metric": "Dmean",
                                        "comparator": "<=", "value": 20, "unit": "Gy"}, HN, "x")
    assert isinstance(foreign, Clarification) and foreign.reason == "unknown_structure"
    bad = interpretation_from_dict({"kind": "GoalEdit", "structure": "Larynx", "metric": "Dfoo",
                                    "comparator": "<=", "value": 20, "unit": "Gy"}, HN, "x")
    assert isinstance(bad, Clarification)
    assert isinstance(interpretation_from_dict({"kind": "Launch"}, HN), Clarification)


# ------------------------------------------------------------------------------------ LLM adapter

@pytest.fixture
def no_llm_env(monkeypatch):
    for name in (ENV_ENDPOINT, ENV_MODEL, ENV_API_KEY):
        monkeypatch.delenv(name, raising=False)


def test_llm_off_by_default(no_llm_env):
    assert isinstance(default_parser(), DeterministicFeedbackParser)
    assert default_parser().parse("fewer MU", HN) == parse_feedback("fewer MU", HN)
    calls = []
    parser = HTTPLanguageModelParser(transport=lambda *a: calls.append(a) or b"{}")
    assert not parser.is_configured()
    with pytest.raises(LanguageModelNotConfiguredError, match=ENV_ENDPOINT):
        parser.parse("fewer MU", HN)
    assert HTTPLanguageModelParser(endpoint="http://x", transport=lambda *a: b"").is_configured() is False
    assert calls == []  # nothing was sent


def test_llm_reads_environment_at_call_time(no_llm_env, monkeypatch):
    parser = HTTPLanguageModelParser(transport=lambda *a: b"{}")
    assert not parser.is_configured()
    monkeypatch.setenv(ENV_ENDPOINT, "http://localhost:9/v1/chat/completions")
    monkeypatch.setenv(ENV_MODEL, "m")
    assert parser.is_configured()
    monkeypatch.delenv(ENV_MODEL)
    assert not parser.is_configured()
    assert not any("localhost" in str(v) for v in vars(parser).values())


def test_llm_parses_canned_response_with_fake_transport(no_llm_env, monkeypatch):
    monkeypatch.setenv(ENV_API_KEY, "secret-token")
    sent = {}
    content = ('```json\n{"kind": "GoalEdit", "structure": "leftparotid", "metric": "Dmean", "comparator": "<=", '
               '"value": 20, "unit": "Gy", "priority": "should", "action": "set"}\n```')

    def fake(url, body, headers, timeout_s):
        sent.update(url=url, body=json.loads(body), headers=headers)
        return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()

    parser = HTTPLanguageModelParser("https://llm.example/v1/chat/completions", "demo", transport=fake)
    result = parser.parse("keep the left parotid mean under 20 Gy", HN)
    assert result == parse_feedback("keep the left parotid mean under 20 Gy", HN)
    assert sent["url"] == "https://llm.example/v1/chat/completions"
    assert sent["body"]["model"] == "demo" and sent["body"]["temperature"] == 0
    assert "LeftParotid" in sent["body"]["messages"][1]["content"]
    assert sent["headers"]["Authorization"] == "Bearer secret-token"
    assert "secret-token" not in json.dumps({k: str(v) for k, v in vars(parser).items()})
    # A reply that is not JSON becomes a clarification, never an edit.
    garbage = HTTPLanguageModelParser("https://llm.example/v1", "demo", transport=lambda *a: b"not json")
    assert isinstance(garbage.parse("x", HN), Clarification)


def test_llm_refuses_non_http_endpoint(no_llm_env):
    with pytest.raises(LanguageModelNotConfiguredError):
        HTTPLanguageModelParser("file:///etc/passwd", "m", transport=lambda *a: b"{}").parse("x", HN)
    assert os.environ.get(ENV_ENDPOINT) is None


def test_result_types_are_exported():
    assert {TradeOff, CoverageRequest, DeliveryRequest} <= {type(_parse(r)) for r in ROWS}


def test_random_word_salad_never_raises_and_never_edits_outside_the_case():
    import random

    rng = random.Random(0)  # fixed seed: the test is deterministic
    words = " ".join(r["text"] for r in ROWS).split() + ["<", ">=", "?", "%", "0", "cGy", "D500%", "v0", "§s"]
    for _ in range(2000):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(1, 10)))
        result = parse_feedback(text, HN)
        result.confirmation_text()
        for edit in to_edits(result):
            assert edit.structure in HN or (edit.kind == "set_setup" and edit.structure == "plan")
