"""Help that reads like a well-kept CLI's, for every command on the app (see ResnetCommand).

Why Typer shows `--strict <bool>`, `INPUT... <list[str]>` and `{INPUT...}...`: its rich help
prints `display_type_rich()` for every parameter, and TyperOption returns a `<type>` even for
flags, which take no value; TyperArgument always returns its annotation's type; and the usage
line wraps a required argument in braces and appends `...` even after a metavar that has one.
Typer has no setting for this, so the parameters Typer builds are given the two subclasses below
(same objects, no state added; only how help shows them), from get_params() of our command and
group classes, which covers the help option and the completion options Typer adds later too.
"""

from __future__ import annotations

import typer
from typer.core import TyperArgument, TyperCommand, TyperOption


def _value_name(param: TyperOption, ctx: typer.Context) -> str | None:
    """What an option's value is called in help: its metavar, its choices, or TEXT/INTEGER/FLOAT/PATH."""
    if param.is_flag or param.count:
        return None  # a flag takes no value
    if param.metavar is not None:
        return param.metavar
    shown = param.display_type(ctx).strip("<>")  # Typer's own: str, int range, table|json|..., file
    if "|" in shown:
        if len(shown) > CHOICES_SHOWN_INLINE:  # a long list would break mid-word in the metavar column
            return max(param.opts, key=len).lstrip("-").upper().replace("-", "_")
        return f"[{shown}]"
    kind = shown.split()[0]
    return {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "bool": "BOOLEAN"}.get(kind, kind.upper())


class _HelpOption(TyperOption):
    """Typer's option, shown click-style in help: `--top INTEGER`, `--strict` without a type."""

    def display_type_rich(self, ctx: typer.Context) -> str | None:
        return _value_name(self, ctx)


class _HelpArgument(TyperArgument):
    """Typer's argument, shown as `INPUT...` (required) or `[NAME]...` (optional), without a type."""

    def display_type_rich(self, ctx: typer.Context) -> str | None:
        return None

    def get_usage_pieces(self, ctx: typer.Context) -> list[str]:
        name = self.metavar or self.name.upper()
        name = name if self.required else f"[{name}]"
        return [name + ("..." if self.nargs != 1 and not name.endswith("...") else "")]


#: Choices longer than this (e.g. `nearest|nearest-exact|bilinear|...`) are named in the help text
#: rather than in the value column, which would fold them mid-word at 80 columns.
CHOICES_SHOWN_INLINE = 20


def tidy(params: list) -> list:
    """Typer's parameters as _HelpOption/_HelpArgument: they add no state, only how help shows them."""
    for param in params:
        if type(param) is TyperOption:
            choices = [str(getattr(c, "value", c)) for c in (param.type_descriptor.choices or ())]
            if (
                choices
                and len("|".join(map(str, choices))) > CHOICES_SHOWN_INLINE
                and "One of:" not in (param.help or "")
            ):
                param.help = f"{param.help or ''} One of: {', '.join(map(str, choices))}.".strip()
            param.__class__ = _HelpOption
        elif type(param) is TyperArgument:
            param.__class__ = _HelpArgument
    return params


class ResnetCommand(TyperCommand):
    """A command whose help shows its parameters click-style (see _HelpOption, _HelpArgument)."""

    def get_params(self, ctx: typer.Context) -> list:
        return tidy(super().get_params(ctx))
