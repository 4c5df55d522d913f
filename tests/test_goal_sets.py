"""Goal-set files: shipped sets conform to the schema and load; bad files are refused with file and line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from twinrt.errors import InvalidInputError, MissingInputError
from twinrt.planning.evaluation import GOALSETS_DIR, find_contradictions, load_goal_set, shipped_goal_sets
from twinrt.planning.goals import Goal

SCHEMA = json.loads((GOALSETS_DIR / "goalset.schema.json").read_text())
OPENKBP = ["Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible",
           "PTV56", "PTV63", "PTV70"]


def _validate(instance, schema, path="$"):
    """Errors of ``instance`` against the subset of JSON Schema 2020-12 the goal-set schema uses."""
    errors = []
    t = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float)}
    if t and (not isinstance(instance, types[t]) or (t in ("integer", "number") and isinstance(instance, bool))):
        return [f"{path}: expected {t}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{path}: {instance!r} not in {schema['enum']}")
    if isinstance(instance, str):
        if len(instance) < schema.get("minLength", 0):
            errors.append(f"{path}: too short")
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            errors.append(f"{path}: {instance!r} does not match the pattern")
    if isinstance(instance, (int, float)) and not isinstance(instance, bool):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{path}: below minimum")
        if "exclusiveMinimum" in schema and instance <= schema["exclusiveMinimum"]:
            errors.append(f"{path}: not above exclusiveMinimum")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{path}: too few items")
        for i, item in enumerate(instance):
            errors += _validate(item, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing {key}")
        for key, value in instance.items():
            if key in props:
                errors += _validate(value, props[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected {key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += _validate(value, schema["additionalProperties"], f"{path}.{key}")
    return errors


@pytest.mark.parametrize("name", ["head_and_neck_openkbp", "lung_conventional", "prostate"])
def test_shipped_sets_conform_to_schema_and_load(name):
    data = json.loads((GOALSETS_DIR / f"{name}.json").read_text())
    assert _validate(data, SCHEMA) == []
    try:  # the real validator too, when the environment has it
        import jsonschema
    except ImportError:
        pass
    else:
        jsonschema.Draft202012Validator(SCHEMA).validate(data)
    gs = load_goal_set(name)
    assert gs.name == name and len(gs.goals) == len(data["goals"])
    # Every goal cites a source present in the file, and the shipped sets have no contradictions.
    assert all(g.source in gs.sources for g in gs.goals)
    assert find_contradictions(gs) == []
    assert {g.priority for g in gs.goals} == {"must", "should", "nice"}


def test_schema_validator_catches_bad_entries():
    data = json.loads((GOALSETS_DIR / "prostate.json").read_text())
    data["goals"][0]["priority"] = "maybe"
    data["goals"][1]["metric"] = "D95"
    errors = _validate(data, SCHEMA)
    assert any("priority" in e for e in errors) and any("metric" in e for e in errors)


def test_shipped_names_and_head_and_neck_content():
    assert {"head_and_neck_openkbp", "lung_conventional", "prostate"} <= set(shipped_goal_sets())
    gs = load_goal_set("head_and_neck_openkbp")
    assert set(gs.structures) == set(OPENKBP)
    assert {(p["target"], p["dose_gy"], p["fractions"]) for p in gs.prescriptions} == {
        ("PTV70", 70.0, 35), ("PTV63", 63.0, 35), ("PTV56", 56.0, 35)}
    cord = [g for g in gs.goals if g.structure == "SpinalCord" and g.metric == "D0.1cc"][0]
    assert (cord.comparator, cord.value, cord.priority) == ("<=", 45.0, "must")
    assert "Cord" in gs.names_for("SpinalCord")
    assert "Esophagus" not in gs.required_structures and "PTV70" in gs.required_structures
    # Line numbers point at the goals in the file.
    lines = (GOALSETS_DIR / "head_and_neck_openkbp.json").read_text().splitlines()
    for g, n in zip(gs.goals, gs.goal_lines):
        assert f'"{g.structure}"' in lines[n - 1] and f'"{g.metric}"' in lines[n - 1]


def _write(tmp_path: Path, goals: list[str], name="bad_goals.json") -> Path:
    head = ['{', '  "name": "test", "version": 1, "site": "test",', '  "prescriptions": [],',
            '  "sources": {"QUANTEC": "Marks LB et al. IJROBP 76(3 Suppl):S10, 2010"},', '  "goals": [']
    body = ["    " + g + ("," if i < len(goals) - 1 else "") for i, g in enumerate(goals)]
    text = "\n".join(head + body + ['  ]', '}'])
    path = tmp_path / name
    path.write_text(text)
    return path


OK = ('{"structure": "Cord", "metric": "Dmax", "comparator": "<=", "value": 45, "unit": "Gy", '
      '"priority": "must", "source": "QUANTEC"}')


def test_unknown_metric_names_file_and_line(tmp_path):
    bad = OK.replace('"Dmax"', '"Dhot"')
    path = _write(tmp_path, [OK, OK, bad])
    with pytest.raises(InvalidInputError) as err:
        load_goal_set(path)
    msg = str(err.value)
    assert "bad_goals.json" in msg and "line 8" in msg and "Dhot" in msg


def test_unknown_priority_unit_comparator_source(tmp_path):
    cases = {OK.replace('"must"', '"critical"'): "priority",
             OK.replace('"Gy"', '"cGy"'): "unit",
             OK.replace('"<="', '"<"'): "comparator",
             OK.replace('"QUANTEC"}', '"Emami"}'): "Emami",
             OK.replace('"Dmax"', '"V20Gy"'): "is in %",
             OK.replace('"value": 45', '"value": "45"'): "value",
             OK.replace('"unit": "Gy", ', ''): "missing unit",
             OK.replace('}', ', "colour": "red"}'): "colour"}
    for i, (goal, words) in enumerate(cases.items()):
        path = _write(tmp_path, [OK, goal], name=f"g{i}.json")
        with pytest.raises(InvalidInputError) as err:
            load_goal_set(path)
        assert f"g{i}.json, line 7" in str(err.value) and words in str(err.value), str(err.value)


def test_multiline_goal_reports_line_of_the_field(tmp_path):
    bad = OK.replace(', "priority"', ',\n      "priority"').replace('"must"', '"urgent"')
    path = _write(tmp_path, [OK, bad])
    with pytest.raises(InvalidInputError, match="line 8: unknown priority 'urgent'"):
        load_goal_set(path)


def test_invalid_json_names_line(tmp_path):
    path = _write(tmp_path, [OK, OK[:-1]])  # missing closing brace on line 7
    with pytest.raises(InvalidInputError, match=r"bad_goals.json, line \d+: not valid JSON"):
        load_goal_set(path)


def test_missing_goal_set():
    with pytest.raises(MissingInputError, match="shipped sets"):
        load_goal_set("no_such_site")


def test_contradictory_must_goals_refused(tmp_path):
    low = OK.replace('"Dmax"', '"D95%"').replace('"<="', '">="').replace("45", "50")
    path = _write(tmp_path, [OK, low])
    with pytest.raises(InvalidInputError) as err:
        load_goal_set(path)
    assert "contradictory must goals" in str(err.value) and "lines 6 and 7" in str(err.value)


def test_contradictions_between_softer_goals_reported_not_refused(tmp_path):
    goals = [OK.replace('"must"', '"should"'),
             OK.replace('"Dmax"', '"D95%"').replace('"<="', '">="').replace("45", "50").replace('"must"', '"nice"'),
             OK.replace('"Dmax"', '"Dmean"').replace('"<="', '">="').replace("45", "46").replace('"must"', '"nice"')]
    gs = load_goal_set(_write(tmp_path, goals))
    found = find_contradictions(gs)
    assert len(found) == 2 and all("cannot both be met" in m for m in found)


@pytest.mark.parametrize("a, b, contradictory", [
    (("D95%", ">=", 70), ("V70Gy", "<=", 20), True),     # D95 >= 70 means V70 >= 95 %
    (("D95%", ">=", 70), ("V77Gy", "<=", 20), False),    # the RTOG hot-spot rule
    (("Dmean", "<=", 20), ("D50%", ">=", 50), True),     # half at 50 Gy gives a mean >= 25 Gy
    (("Dmean", "<=", 30), ("D50%", ">=", 50), False),
    (("Dmin", ">=", 50), ("Dmean", "<=", 40), True),
    (("Dmax", "<=", 70), ("Dmax", ">=", 70), False),     # a uniform 70 Gy meets both
    (("D0.1cc", "<=", 45), ("D2cc", ">=", 46), True),
    (("D2cc", "<=", 45), ("D0.1cc", ">=", 46), False),
    (("V20Gy", "<=", 30), ("V30Gy", ">=", 40), True),
    (("Dmax", "<=", 60), ("Dmean", ">=", 61), True),
])
def test_contradiction_rules(tmp_path, a, b, contradictory):
    from twinrt.planning.evaluation import GoalSet

    goals = [Goal("X", m, c, v, "should") for m, c, v in (a, b)]
    assert bool(find_contradictions(GoalSet("t", goals))) is contradictory
