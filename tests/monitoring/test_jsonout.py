"""monitoring.jsonout writes what json.dumps writes, byte for byte, for every value `to_dict` can give."""

from __future__ import annotations

import json
import socket

import pytest

from monitoring import jsonout, probes, render
from monitoring.collect import Collector
from monitoring.model import to_dict
from monitoring.targets import port_targets
from monitoring.verdict import evaluate

AWKWARD = [
    {},
    [],
    (),
    "",
    0,
    -1,
    10**40,
    1.5,
    -0.0,
    1e300,
    5e-324,
    float("inf"),
    float("-inf"),
    float("nan"),
    True,
    False,
    None,
    'quote " backslash \\ newline \n tab \t nul \0 del \x7f',
    "é ü 日本 \U0001f600 \ud800",
    {"a": {"b": {"c": [[], {}, [[{}]], ()]}}},
    {7: "int key", 2.5: "float key", True: "bool key", False: "false key", None: "none key", "": "empty"},
    [1, [2, [3, [4]]], {"x": (5, 6)}],
]


@pytest.mark.parametrize("indent", [None, 0, 2, 4])
@pytest.mark.parametrize("value", AWKWARD, ids=repr)
def test_awkward_values_match_json_dumps(value: object, indent: int | None) -> None:
    assert jsonout.dumps(value, indent=indent) == json.dumps(value, indent=indent)


@pytest.mark.parametrize("value", [{1, 2}, b"bytes", object(), {(1, 2): "tuple key"}], ids=repr)
def test_what_json_refuses_is_a_type_error(value: object) -> None:
    with pytest.raises(TypeError):
        json.dumps(value)
    with pytest.raises(TypeError):
        jsonout.dumps(value)


def test_a_real_look_renders_as_json_dumps_renders_it() -> None:
    """A look at a real listener (counts, listeners, a probe, the verdict): json_text = json.dumps."""
    with socket.socket() as lst:
        lst.bind(("127.0.0.1", 0))
        lst.listen(8)
        port = lst.getsockname()[1]
        conns = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
        try:
            collector = Collector(
                port_targets([str(port), f"{port}/udp"]), probe=lambda t: probes.probe(t, 2.0)
            )
            snap = collector.snapshot()
        finally:
            for c in conns:
                c.close()
    verdict = evaluate(snap)
    data = to_dict(snap)
    data["verdict"] = to_dict(verdict)
    data["verdict"]["exit_code"] = verdict.exit_code
    assert data["services"][0]["port"]["states"]["ESTABLISHED"] == 3
    for indent in (2, None):
        assert render.json_text(snap, verdict, indent=indent) == json.dumps(data, indent=indent)
