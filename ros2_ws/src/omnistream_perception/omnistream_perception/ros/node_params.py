"""Declare, read and validate a node's parameters from one table (shared by every OmniStream node).

    PARAMETERS = {
        "control_rate": ParamSpec(10.0, "Hz", check=number_in(0.5, 1000.0)),
        "action_mode": ParamSpec("auto", "relative | absolute | auto", check=one_of("auto", "relative", "absolute")),
    }
    declare_parameters(node, PARAMETERS)        # raises ValueError naming every bad value (-> one FATAL line)
    value = parameter_value(node, "control_rate", PARAMETERS)

A number parameter (``ParamSpec`` with a float default) is declared with dynamic typing, so ``control_rate:=10``
on the command line (an integer) is accepted and read as 10.0; its check refuses anything that is not a finite
number in its range. Every change at runtime passes the same checks (``ros2 param set`` gets the reason).
The tables and checks are rclpy-free (testable without ROS); only declaring and reading touch the node.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class ParamSpec:
    default: Any
    description: str
    read_only: bool = False  # fixed at start (models, topics, sessions)
    check: Check | None = None  # the reason a value is bad, or None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def number_in(low: float, high: float, low_open: bool = False, zero_ok: bool = False) -> Check:
    """A finite number in [low, high] ((low, high] with ``low_open``); ``zero_ok`` also admits exactly 0."""

    def check(value: Any) -> str | None:
        if not _is_number(value) or not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        if zero_ok and value == 0:
            return None
        inside = (low < value if low_open else low <= value) and value <= high
        if not inside:
            return f"must be in {'(' if low_open else '['}{low:g}, {high:g}]{' or 0' if zero_ok else ''}, got {value:g}"
        return None

    return check


def integer_in(low: int, high: int | None = None) -> Check:
    def check(value: Any) -> str | None:
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be an integer, got {value!r}"
        if value < low or (high is not None and value > high):
            return f"must be >= {low}" + (f" and <= {high}" if high is not None else "") + f", got {value}"
        return None

    return check


def one_of(*choices: Any) -> Check:
    def check(value: Any) -> str | None:
        return None if value in choices else f"must be one of {', '.join(map(str, choices))}; got {value!r}"

    return check


def non_empty(what: str) -> Check:
    def check(value: Any) -> str | None:
        return None if str(value).strip() else f"is required: {what}"

    return check


def _is_float_spec(spec: ParamSpec) -> bool:
    return isinstance(spec.default, float)


def problem(name: str, value: Any, specs: Mapping[str, ParamSpec]) -> str | None:
    """``"<name> <reason>"`` when ``value`` is bad for parameter ``name``, else None (unknown names pass)."""
    spec = specs.get(name)
    if spec is None or spec.check is None:
        return None
    reason = spec.check(value)
    return None if reason is None else f"{name} {reason}"


def declare_parameters(node, specs: Mapping[str, ParamSpec], skip: tuple[str, ...] = ()) -> None:
    """Declares every parameter of ``specs``, checks the start values and installs the runtime check.

    Raises ValueError listing every bad start value (``node_main.run_node`` turns it into one FATAL line)."""
    from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
    from rclpy.exceptions import ParameterException

    wrong: dict[str, str] = {}
    for name, spec in specs.items():
        descriptor = ParameterDescriptor(
            description=spec.description, read_only=spec.read_only, dynamic_typing=_is_float_spec(spec)
        )
        try:
            node.declare_parameter(name, spec.default, descriptor)
        except ParameterException:  # a value of another type than the default's, e.g. window:=abc
            given = node._parameter_overrides.get(name)
            wrong[name] = problem(name, given.value, specs) if given is not None else None
            wrong[name] = wrong[name] or f"{name} has the wrong type (expected {type(spec.default).__name__})"
    bad = list(wrong.values())
    bad += [
        p
        for name in specs
        if name not in skip and name not in wrong and (p := problem(name, parameter_value(node, name, specs), specs))
    ]
    if bad:
        raise ValueError(f"bad {node.get_name()} parameters: " + "; ".join(bad))

    def on_set(params) -> SetParametersResult:
        for p in params:
            reason = problem(p.name, p.value, specs)
            if reason is not None:
                return SetParametersResult(successful=False, reason=reason)
        return SetParametersResult(successful=True)

    node.add_on_set_parameters_callback(on_set)


def parameter_value(node, name: str, specs: Mapping[str, ParamSpec]) -> Any:
    """The parameter's value; a number parameter given as an integer comes back as a float."""
    from rclpy.parameter import Parameter

    value = node.get_parameter_or(name, Parameter(name, value=None)).value
    spec = specs.get(name)
    if spec is not None and _is_float_spec(spec) and _is_number(value):
        return float(value)
    return value
