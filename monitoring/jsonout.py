"""json.dumps for plain data, byte for byte, without the json package on the on-host check's path.

`import json` imports re (json.decoder and json.encoder compile their patterns at import): ~3 ms of a check
whose budget is `ss -tan state time-wait | wc -l`, to write one document. Strings are quoted by the same C
function json.dumps uses (`_json.encode_basestring_ascii`); numbers, constants and the indented layout follow
json.encoder's rules (ensure_ascii, allow_nan, item separator "," when indented, ", " when not). Only plain
data is accepted: dicts, lists, tuples, str, int, float, bool, None (monitoring.model.to_dict's output);
anything else is the same TypeError json.dumps raises. tests/monitoring/test_jsonout.py compares the two.
"""

from __future__ import annotations

try:
    from _json import encode_basestring_ascii as _quote
except ImportError:  # an interpreter without CPython's accelerator: the json package's own quoting
    from json.encoder import encode_basestring_ascii as _quote

TYPE_CHECKING = False  # typing's own, without importing typing on the check's path (see monitoring.values)
if TYPE_CHECKING:
    from typing import Any, List, Optional

_INFINITY = float("inf")


def dumps(value: Any, indent: Optional[int] = None) -> str:
    """json.dumps(value, indent=indent).

    >>> dumps({"a": [1, 2.5, None], "b": {}, "c": "é"}, indent=2)
    '{\\n  "a": [\\n    1,\\n    2.5,\\n    null\\n  ],\\n  "b": {},\\n  "c": "\\\\u00e9"\\n}'
    >>> dumps({"a": [True, float("nan")], 1: ()})
    '{"a": [true, NaN], "1": []}'
    """
    out: List[str] = []
    _encode(value, out, "\n" if indent is not None else "", " " * indent if indent is not None else "")
    return "".join(out)


def scalar(value: Any) -> Optional[str]:
    """A string, number or constant as JSON text; None for anything else (json.encoder's rules)."""
    if isinstance(value, str):
        return _quote(value)
    if value is None or value is True or value is False:
        return "null" if value is None else "true" if value else "false"
    if isinstance(value, int):
        return int.__repr__(value)
    if isinstance(value, float):
        return _float(value)
    return None


def _float(value: float) -> str:
    if value != value:  # noqa: PLR0124 - NaN is the one value unequal to itself
        return "NaN"
    if value in (_INFINITY, -_INFINITY):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


def _encode(value: Any, out: List[str], newline: str, step: str) -> None:
    """Append value's text; newline: "\\n" plus this level's indent ("" when not indenting)."""
    text = scalar(value)
    if text is not None:
        out.append(text)
        return
    inner = newline + step if newline else ""
    sep = "," + inner if newline else ", "
    if isinstance(value, (list, tuple)):
        if not value:
            out.append("[]")
            return
        out.append("[" + inner)
        for i, item in enumerate(value):
            if i:
                out.append(sep)
            _encode(item, out, inner, step)
        out.append(newline + "]")
    elif isinstance(value, dict):
        if not value:
            out.append("{}")
            return
        out.append("{" + inner)
        for i, (key, item) in enumerate(value.items()):
            name = key if isinstance(key, str) else scalar(key)
            if name is None:
                raise TypeError(f"keys must be str, int, float, bool or None, not {type(key).__name__}")
            out.append((sep if i else "") + _quote(name) + ": ")
            _encode(item, out, inner, step)
        out.append(newline + "}")
    else:
        raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")
