"""``modelkeeper lora``: apply a LoRA to the loaded models of a running service, change its
strength, take it off."""

from __future__ import annotations

import math
import re
from typing import Annotated, Any

import typer
from rich.console import Console
from typer._click.core import Context
from typer._click.parser import _OptionParser, _ParsingState
from typer.core import TyperCommand

from modelkeeper.cli.explain import local_path
from modelkeeper.cli.remote import ApiJsonOption, DeviceOption, TokenOption, UrlOption, call, err, print_json

lora_app = typer.Typer(help="LoRAs on the loaded models of a running service.", no_args_is_help=True)
LoraArgument = Annotated[str, typer.Argument(help="The LoRA: handle, id, name, path or hash prefix.")]
LoadedArgument = Annotated[str, typer.Argument(help="A loaded model: handle, id, name, path or hash prefix.")]


def finite(value: float) -> float:
    """A strength: nan and inf would reach the service as JSON no parser takes."""
    if not math.isfinite(value):
        raise typer.BadParameter(f"strength must be a finite number, not {value}")
    return value


#: A negative number as typed: ``-0.5``, ``-1``, ``-.25``, ``-1e-3``.
NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class _NumbersParser(_OptionParser):
    """click's parser, except that a negative number is an argument, not an unknown option."""

    def _process_opts(self, arg: str, state: _ParsingState) -> None:
        if NEGATIVE_NUMBER.fullmatch(arg) and arg not in self._short_opt:
            state.largs.append(arg)
            return
        super()._process_opts(arg, state)


class NumberArguments(TyperCommand):
    """A command whose arguments may be negative numbers typed as they are (``lora strength M L
    -0.5``; click read ``-0.5`` as an option, "No such option: -0"); an unknown option is still one."""

    def make_parser(self, ctx: Context) -> _OptionParser:
        parser = _NumbersParser(ctx)
        for param in self.get_params(ctx):
            param.add_to_parser(parser, ctx)
        return parser


def _lora_devices(data: dict[str, Any], key: str) -> str:
    return ", ".join(str(d["device"]) for d in data.get(key, [])) or "no device"


@lora_app.command("apply")
def lora_apply(
    model: LoadedArgument,
    lora: LoraArgument,
    strength: Annotated[float, typer.Option(help="Scale of the LoRA's change.", callback=finite)] = 1.0,
    device: DeviceOption = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Apply a LoRA to a loaded model (on every device holding it, or on --device)."""
    with err.status(f"applying {lora} to {model}"):
        data = call(
            url,
            token,
            lambda c: c.apply_lora(local_path(model), local_path(lora), strength=strength, device=device),
        )
    if as_json:
        print_json(data)
        return
    for d in data["applied"]:
        keys = f"{d['matched_keys']} keys" if "matched_keys" in d else ""
        Console().print(
            f"[green]applied[/green] {lora} x{strength:g} to {model} on {d['device']}"
            + (f": {keys}" if keys else "")
        )


@lora_app.command("strength", cls=NumberArguments)
def lora_strength(
    model: LoadedArgument,
    lora: LoraArgument,
    strength: Annotated[
        float, typer.Argument(help="The new strength (0 turns it off; negative inverts it).", callback=finite)
    ],
    device: DeviceOption = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Change the strength of a LoRA applied to a loaded model."""
    data = call(
        url, token, lambda c: c.lora_strength(local_path(model), local_path(lora), strength, device=device)
    )
    if as_json:
        print_json(data)
        return
    Console().print(f"{lora} on {model}: strength {strength:g} on {_lora_devices(data, 'devices')}")


@lora_app.command("remove")
def lora_remove(
    model: LoadedArgument,
    lora: LoraArgument,
    device: DeviceOption = None,
    as_json: ApiJsonOption = False,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Remove a LoRA from a loaded model: its original weights come back."""
    data = call(url, token, lambda c: c.remove_lora(local_path(model), local_path(lora), device=device))
    if as_json:
        print_json(data)
        return
    Console().print(f"[green]removed[/green] {lora} from {model} on {_lora_devices(data, 'devices')}")
