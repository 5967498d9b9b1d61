"""A client's tool schema checked in bounded time and without fetching (the cases not
already driven through a real llproxy in test_operator_schemas.py)."""

from __future__ import annotations

from typing import Any

import pytest

from llproxy.core.toolschema import SchemaRefusal, check, schema_problems


def refusal(schema: dict[str, Any], arguments: Any) -> str:
    with pytest.raises(SchemaRefusal) as refused:
        check(schema, arguments)
    return str(refused.value)


@pytest.mark.timeout(30)  # pairwise comparison of 20,000 objects takes many minutes
def test_unique_items_of_objects_in_linear_time() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "array", "uniqueItems": True}}}
    check(schema, {"a": [{"i": i} for i in range(20_000)]})
    duplicated = [{"i": i} for i in range(20_000)] + [{"i": 7.0}]
    assert "has non-unique elements" in refusal(schema, {"a": duplicated})
    check(schema, {"a": [True, 1, [1, 2], [2, 1], {"x": None}, {"x": False}]})


@pytest.mark.timeout(30)
def test_references_that_fan_out_are_stopped() -> None:
    defs: dict[str, Any] = {"d40": {"type": "object"}}
    for i in range(40):  # 2**40 paths to the last one
        defs[f"d{i}"] = {"allOf": [{"$ref": f"#/$defs/d{i + 1}"}, {"$ref": f"#/$defs/d{i + 1}"}]}
    schema = {"$defs": defs, "$ref": "#/$defs/d0"}
    assert refusal(schema, {}) == "the tool's schema takes too much work to check"


def test_a_schema_that_refers_to_itself_without_end() -> None:
    assert "refers to itself" in refusal({"$ref": "#"}, {})


def test_references_inside_the_schema_and_to_metaschemas_resolve() -> None:
    schema = {
        "$defs": {"city": {"type": "string", "minLength": 1}},
        "type": "object",
        "properties": {
            "city": {"$ref": "#/$defs/city"},
            "filter": {"$ref": "https://json-schema.org/draft/2020-12/schema"},
        },
    }
    check(schema, {"city": "Oslo", "filter": {"type": "string"}})
    assert "city: '' should be non-empty" in refusal(schema, {"city": ""})
    draft7 = {"$schema": "http://json-schema.org/draft-07/schema#", "definitions": {}}
    draft7["properties"] = {"n": {"$ref": "#/definitions/missing"}}
    assert "does not resolve inside the schema" in refusal(draft7, {"n": 1})


def test_patterns_run_on_re2() -> None:
    schema = {
        "type": "object",
        "patternProperties": {"^x-": {"type": "integer"}},
        "properties": {"word": {"type": "string", "pattern": r"^(a+)+$"}},
        "additionalProperties": False,
    }
    check(schema, {"x-count": 3, "word": "aaaa"})
    assert "does not match" in refusal(schema, {"word": "a" * 5000 + "!"})
    assert "x-count: 'three' is not of type 'integer'" in refusal(schema, {"x-count": "three"})
    assert "('other' was unexpected)" in refusal(schema, {"other": 1})


def test_the_schemas_of_one_request_share_a_budget_when_it_arrives() -> None:
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(500)}}
    bad = {"type": "object", "properties": {"a": {"pattern": r"(?=lookahead)"}}}
    schemas = {"bad": bad, **{f"wide{i}": wide for i in range(1000)}, "bad too": bad}
    # The first bad one is named; the steps run out long before the last, which is left
    # for the check of a call (it is not blamed for the budget the others spent).
    assert list(schema_problems(schemas)) == ["bad"]
    assert list(schema_problems({"bad": bad, "bad too": bad})) == ["bad", "bad too"]


@pytest.mark.timeout(30)
def test_a_subschema_with_its_own_draft_still_runs_patterns_on_re2() -> None:
    """jsonschema picks a new validator class for a subschema naming its `$schema`: that
    one must be bounded too, or its pattern runs on Python's backtracking re."""
    pattern = {"type": "string", "pattern": r"^([a-zA-Z0-9]+\s?)*$"}
    schema = {
        "type": "object",
        "properties": {
            "text": {"$schema": "http://json-schema.org/draft-07/schema#", **pattern},
        },
    }
    sentence = "Please book the small meeting room for the team on Thursday morning, thanks"
    assert "does not match" in refusal(schema, {"text": sentence})


def test_a_refusal_quotes_a_large_value_shortened() -> None:
    schema = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 10}}}
    reason = refusal(schema, {"text": "x" * 100_000})
    assert reason.startswith("arguments do not fit the tool's schema: text: 'xxx")
    assert len(reason) < 600 and " … " in reason and reason.endswith("is too long")
