"""`@frozen`: the host side's frozen dataclasses, without importing `dataclasses` on the on-host check's path.

`python -m monitoring --port P --json` runs as a whole process on every host (Nagios, cron, Consul), and its
goal is the wall time of `ss -tan state time-wait | wc -l`. `import dataclasses` alone pulls in inspect, ast,
dis, tokenize and re (~8 ms of CPU on a 2-core test VM) and every `@dataclass` execs generated code (~0.3 ms
a class, 25 classes on that path): together a third of the check, before any work. So the values on that
path are declared exactly like frozen dataclasses (annotated fields with defaults) and `@frozen` makes them:
slots, immutable (assignment raises AttributeError), ==/hash/repr over the fields, picklable.

They stay dataclasses for everyone else: `cls.__dataclass_fields__` is built on first access (importing
`dataclasses` then), so `dataclasses.fields/replace/asdict/is_dataclass` keep working on the operator side,
in hostctl and in tests. The hot path itself uses `field_names`, `defaults` and `replace` from here.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (it imports re: ~2 ms on the check)
if TYPE_CHECKING:
    from typing import Any, Dict, Mapping, Tuple, TypeVar

    V = TypeVar("V")


def field_names(cls_or_value: Any) -> Tuple[str, ...]:
    """The fields of a @frozen class or value, in declaration order."""
    return cls_or_value.__value_fields__


def defaults(cls: Any) -> Mapping[str, Any]:
    """Field name -> default, for the fields that have one."""
    return cls.__value_defaults__


def is_value(obj: Any) -> bool:
    """Whether obj is a @frozen value (an instance, not the class)."""
    return hasattr(type(obj), "__value_fields__") and not isinstance(obj, type)


def astuple(value: Any) -> Tuple[Any, ...]:
    """The field values in declaration order (not recursive)."""
    return tuple(getattr(value, name) for name in value.__value_fields__)


def replace(value: V, **changes: Any) -> V:
    """A copy with some fields changed (dataclasses.replace for @frozen values)."""
    for name in value.__value_fields__:  # type: ignore[attr-defined]
        if name not in changes:
            changes[name] = getattr(value, name)
    return type(value)(**changes)


def _own_annotations(cls: type) -> Dict[str, Any]:
    """The class's own field annotations (strings here: `from __future__ import annotations`). From its
    __dict__ because before 3.10 `cls.__annotations__` of a class without any is its base's; 3.14 (PEP 649)
    no longer keeps them there, and there the attribute is the class's own."""
    own = cls.__dict__.get("__annotations__")  # noqa: RUF063 - see the docstring; inspect costs the check ~5 ms
    return dict(own if own is not None else getattr(cls, "__annotations__", {}))


class _LazyFields:
    """`__dataclass_fields__` on first access, for dataclasses.fields/replace/asdict/is_dataclass."""

    def __get__(self, obj: Any, owner: Any) -> Dict[str, Any]:
        import dataclasses

        out = {}
        hints = _own_annotations(owner)
        for name in owner.__value_fields__:
            f = dataclasses.field(default=owner.__value_defaults__.get(name, dataclasses.MISSING))
            f.name, f.type = name, hints.get(name)
            # how dataclasses tells a field from a ClassVar/InitVar pseudo-field (every version since 3.7)
            f._field_type = dataclasses._FIELD  # type: ignore[attr-defined]
            out[name] = f
        type.__setattr__(owner, "__dataclass_fields__", out)
        return out


class _Value:
    __slots__ = ()
    __value_fields__: Tuple[str, ...] = ()
    __value_defaults__: Dict[str, Any] = {}  # noqa: RUF012 - replaced per class by @frozen, never mutated

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self.__value_fields__
        if len(args) > len(names):
            raise TypeError(
                f"{type(self).__name__}() takes {len(names)} arguments but {len(args)} were given"
            )
        setter = object.__setattr__
        for name, value in zip(names, args):
            if name in kwargs:
                raise TypeError(f"{type(self).__name__}() got multiple values for argument {name!r}")
            setter(self, name, value)
        fallback = self.__value_defaults__
        for name in names[len(args) :]:
            if name in kwargs:
                setter(self, name, kwargs.pop(name))
            elif name in fallback:
                setter(self, name, fallback[name])
            else:
                raise TypeError(f"{type(self).__name__}() missing required argument: {name!r}")
        if kwargs:  # what is left matched no field
            raise TypeError(
                f"{type(self).__name__}() got an unexpected keyword argument {next(iter(kwargs))!r}"
            )

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of frozen {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of frozen {type(self).__name__}")

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return astuple(self) == astuple(other)

    def __hash__(self) -> int:
        return hash(astuple(self))

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__value_fields__)
        return f"{type(self).__qualname__}({inner})"

    def __reduce__(self) -> Tuple[Any, ...]:
        return type(self), astuple(self)


def frozen(cls: type) -> Any:
    """Make a frozen, slotted value class of a class body written as for @dataclass(frozen=True).

    >>> @frozen
    ... class Point:
    ...     x: int
    ...     y: int = 0
    >>> p = Point(1)
    >>> p, p == Point(1, 0), replace(p, y=2), field_names(Point), defaults(Point)
    (Point(x=1, y=0), True, Point(x=1, y=2), ('x', 'y'), {'y': 0})
    >>> p.x = 5
    Traceback (most recent call last):
    AttributeError: cannot assign to field 'x' of frozen Point
    >>> import dataclasses; dataclasses.is_dataclass(p), dataclasses.asdict(p)
    (True, {'x': 1, 'y': 0})
    """
    names = tuple(_own_annotations(cls))
    ns = {k: v for k, v in cls.__dict__.items() if k not in names and k not in ("__dict__", "__weakref__")}
    ns["__slots__"] = names
    ns["__value_fields__"] = names
    ns["__value_defaults__"] = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
    ns["__dataclass_fields__"] = _LazyFields()
    ns["__match_args__"] = names
    ns["__qualname__"] = cls.__qualname__
    bases = (*(b for b in cls.__bases__ if b is not object), _Value)
    return type(cls.__name__, bases, ns)
