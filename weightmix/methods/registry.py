"""The method registry: a merge method is a plain function of tensors, registered by a decorator.

The decorator reads the function's signature: positional parameters (or *args) are the input
tensors, keyword-only parameters are the user-settable parameters, typed by their annotations
(pydantic checks values, including ranges given with `Annotated[..., Field(...)]`).
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError

from weightmix.blocks import parse_block_value
from weightmix.errors import WeightmixError, closest
from weightmix.methods.streaming import ModelStatistic, Streamer
from weightmix.recipe import holds_non_finite, not_a_bool

Tensor = torch.Tensor
# Parameter types shared by methods: finite floats, and fractions in [0, 1].
Finite = Annotated[float, BeforeValidator(not_a_bool), Field(allow_inf_nan=False)]
Fraction = Annotated[float, BeforeValidator(not_a_bool), Field(ge=0.0, le=1.0, allow_inf_nan=False)]
Positive = Annotated[float, BeforeValidator(not_a_bool), Field(gt=0.0, allow_inf_nan=False)]
Iterations = Annotated[int, BeforeValidator(not_a_bool), Field(ge=1)]
# the share of a tensor's elements kept: in (0, 1]
Density = Annotated[float, BeforeValidator(not_a_bool), Field(gt=0.0, le=1.0, allow_inf_nan=False)]

WEIGHT, DELTA, ANY = "weight", "delta", "any"
SAME = "same"  # output space: the (common) space of the inputs


@dataclass(frozen=True)
class ParamSpec:
    name: str  # as recipes write it: 'lambda' for the Python argument lambda_
    annotation: Any
    default: Any
    adapter: TypeAdapter
    argument: str = ""  # the function's argument name, when it differs

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty

    @property
    def numeric(self) -> bool:
        """A single number (float or int, maybe optional): such a parameter may vary by block."""
        return _scalar_number(self.annotation)

    def check_value(self, value: Any, where: str, shown: Any = None) -> Any:
        """The value as the annotation reads it, or a one-line error naming it."""
        try:
            checked = self.adapter.validate_python(value)
        except ValidationError as error:
            message = str(error.errors()[0]["msg"]).removeprefix("Value error, ")
            text = repr(value) if shown is None else shown
            if isinstance(value, str) and _takes_list(self.annotation):
                message += f"; write a list in brackets: {self.name}=[{value.strip('[]() ')}]"
            raise WeightmixError(f"{where} {self.name}={text}: {message}") from None
        if holds_non_finite(checked):  # e.g. the string 'nan' read as a float
            raise WeightmixError(
                f"{where} {self.name}={value!r}: NaN and infinity are not allowed; give a"
                " finite number"
            )
        return checked


def _takes_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, Annotated):
        return any(_takes_list(a) for a in typing.get_args(annotation) if a is not type(None))
    return origin is list


def _scalar_number(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _scalar_number(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):  # a number or None; not a number or a list
        return all(_scalar_number(a) for a in typing.get_args(annotation) if a is not type(None))
    return annotation is float  # counts (iterations, rows) are not given per block


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: its function, arity, merge spaces and parameters."""

    name: str
    func: Callable[..., Tensor]
    min_inputs: int
    max_inputs: int | None
    input_spaces: tuple[str, ...]  # per position; the last repeats for extra inputs
    output_space: str
    params: dict[str, ParamSpec]
    check: Callable[[int, dict[str, Any]], str | None] | None
    summary: str
    elementwise: bool  # output element i depends only on input elements i: can run in chunks
    random: bool = False  # takes `draw`: seeded uniform numbers per element (see rounding.Draw)
    streamer: type[Streamer] | None = None  # runs in chunks after statistics passes
    model_statistic: type[ModelStatistic] | None = None  # gathered over all keys first
    # how many elements each input supplies (per-element choice methods; for --dry-run)
    census: Callable[[Sequence[Tensor], dict[str, Any]], list[int]] | None = None
    # the call is exactly linear_combination(inputs, linear(count, params))
    linear: Callable[[int, dict[str, Any]], list[float]] | None = None
    # fused(inputs as stored, params, compute dtype, out): the same bits as the function on
    # inputs widened to the compute dtype, widening inside its arithmetic (engine.fused_call)
    fused: Callable[[Sequence[Tensor], dict[str, Any], torch.dtype, Tensor], Tensor] | None = None
    # rounded(inputs as stored, params, out): fused's float32 result rounded to nearest into
    # `out` (the output dtype) in the same pass; returns how many inf/NaN values it wrote, or
    # None when it cannot (the engine then runs fused and casts)
    rounded: Callable[[Sequence[Tensor], dict[str, Any], Tensor], int | None] | None = None

    def streams(self, params: dict[str, Any]) -> bool:
        """Whether a call with these parameters can run in chunks with statistics passes."""
        return self.streamer is not None and self.streamer.accepts(params)

    def input_space(self, position: int) -> str:
        return self.input_spaces[min(position, len(self.input_spaces) - 1)]

    def arity_text(self) -> str:
        if self.max_inputs == self.min_inputs:
            return str(self.min_inputs)
        if self.max_inputs is None:
            return f"{self.min_inputs} or more"
        return f"{self.min_inputs} to {self.max_inputs}"

    def resolve_params(
        self, given: dict[str, Any], n_inputs: int, where: str, whole: bool = True
    ) -> dict[str, Any]:
        """Check names, types and ranges of `given`, fill defaults, run the method's own check
        (`whole`: the parameters are all given, so required ones and checks across them
        apply)."""
        resolved: dict[str, Any] = {}
        for name, value in given.items():
            spec = self.params.get(name)
            if spec is None:
                hint = closest(name, [*self.params, "inputs", "method", "name"])
                known = ", ".join(self.params) or "none"
                raise WeightmixError(
                    f"{where}: {self.name} has no parameter '{name}'{hint}; its parameters: {known}"
                )
            label = f"{where}: {self.name} parameter"
            block_value = parse_block_value(value, f"{label} {name}") if spec.numeric else None
            if block_value is not None:  # one value per block: each checked as the type says
                for number in block_value.numbers():
                    spec.check_value(number, label, shown=f"{value!r} (value {number:g})")
                resolved[name] = block_value
                continue
            resolved[name] = spec.check_value(value, label)
        for name, spec in self.params.items():
            if name not in resolved:
                if spec.required and whole:
                    raise WeightmixError(f"{where}: {self.name} needs parameter '{name}'")
                resolved[name] = spec.default
        if whole and self.check is not None and (problem := self.check(n_inputs, resolved)):
            raise WeightmixError(f"{where}: {self.name}: {problem}")
        return resolved

    def __call__(
        self, *inputs: Tensor, draw: Any = None, statistic: Any = None, **params: Any
    ) -> Tensor:
        arguments = {self.params[k].argument or k: v for k, v in params.items()}
        if self.random:
            arguments["draw"] = draw
        if self.model_statistic is not None:
            arguments["statistic"] = statistic
        return self.func(*inputs, **arguments)


METHODS: dict[str, MethodSpec] = {}


def merge_method(
    *,
    inputs: str | tuple[str, ...] = WEIGHT,
    output: str = WEIGHT,
    min_inputs: int | None = None,
    check: Callable[[int, dict[str, Any]], str | None] | None = None,
    name: str | None = None,
    elementwise: bool = False,
    streamer: type[Streamer] | None = None,
    model_statistic: type[ModelStatistic] | None = None,
    census: Callable[[Sequence[Tensor], dict[str, Any]], list[int]] | None = None,
    linear: Callable[[int, dict[str, Any]], list[float]] | None = None,
    fused: Callable[[Sequence[Tensor], dict[str, Any], torch.dtype, Tensor], Tensor] | None = None,
    rounded: Callable[[Sequence[Tensor], dict[str, Any], Tensor], int | None] | None = None,
) -> Callable[[Callable[..., Tensor]], MethodSpec]:
    """Register a merge method. `inputs` gives the merge space (weight, delta or any) of each
    input (the last repeats), `output` the space of the result (or 'same' as the inputs).
    `elementwise=True` promises that each output element depends only on the input elements
    at the same position (and the parameters), so the engine may feed the method in chunks.
    A `streamer` (see streaming.py) runs a method that needs whole-tensor statistics in chunks;
    a `model_statistic` is gathered over every key the call merges, before the merge, and given
    to the function as its keyword `statistic`. A `census(inputs, params)` of a method that
    picks each element from one input counts how many each input supplies (for --dry-run).
    `linear(count, params)` declares that the function is exactly
    arithmetic.linear_combination(inputs, those coefficients); `fused(inputs, params, dtype,
    out)` computes the same bits from inputs as stored (fp16, bf16 ... that `dtype` holds
    exactly), widening them inside its arithmetic, into `out` where it can; `rounded(inputs,
    params, out)` also rounds that float32 result into the output buffer `out` in the same
    pass and returns how many inf/NaN values it wrote (None: it cannot take these).
    A keyword `draw` (not a recipe parameter) asks for seeded random numbers: the engine passes
    a rounding.Draw for the elements at hand. A trailing _ is dropped from parameter names
    (lambda_ is written `lambda`)."""

    def register(func: Callable[..., Tensor]) -> MethodSpec:
        signature = inspect.signature(func)
        hints = typing.get_type_hints(func, include_extras=True)
        positional = [
            p
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        variadic = any(p.kind == p.VAR_POSITIONAL for p in signature.parameters.values())
        params = {
            p.name.rstrip("_"): ParamSpec(
                p.name.rstrip("_"), hints[p.name], p.default, TypeAdapter(hints[p.name]), p.name
            )
            for p in signature.parameters.values()
            if p.kind == p.KEYWORD_ONLY and p.name not in ("draw", "statistic")
        }
        spec = MethodSpec(
            name=name or func.__name__,
            func=func,
            min_inputs=min_inputs if min_inputs is not None else max(len(positional), 1),
            max_inputs=None if variadic else len(positional),
            input_spaces=(inputs,) if isinstance(inputs, str) else tuple(inputs),
            output_space=output,
            params=params,
            check=check,
            elementwise=elementwise,
            random="draw" in signature.parameters,
            streamer=streamer,
            model_statistic=model_statistic,
            census=census,
            linear=linear,
            fused=fused,
            rounded=rounded,
            summary=" ".join((inspect.getdoc(func) or "").split("\n\n")[0].split()),
        )
        if spec.name in METHODS:
            raise ValueError(f"merge method '{spec.name}' is registered twice")
        METHODS[spec.name] = spec
        return spec

    return register


def get_method(name: str, where: str = "recipe") -> MethodSpec:
    """Look a method up by name, or raise a one-line error naming the closest one."""
    spec = METHODS.get(name)
    if spec is None:
        raise WeightmixError(
            f"{where}: unknown method '{name}'{closest(name, METHODS)};"
            f" known methods: {', '.join(sorted(METHODS))}"
        )
    return spec


def describe_method(spec: MethodSpec) -> str:
    """One line for `weightmix methods`: how many inputs, each parameter and its default."""
    arity = spec.arity_text()
    text = f"{arity} {'input' if arity == '1' else 'inputs'}"
    params = [_describe_param(p) for p in spec.params.values()]
    return text + (f"; parameters: {', '.join(params)}" if params else "")


def _describe_param(param: ParamSpec) -> str:
    if param.required:
        return f"{param.name} (required)"
    if param.default is None:
        return f"{param.name} (optional)"
    return f"{param.name}={param.default!r}"
