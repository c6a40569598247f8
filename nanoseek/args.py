"""Dataclass -> argparse helpers shared by every `nanoseek <command>` and `python -m nanoseek.<module>`.

    from nanoseek.args import Parser, add_fields, from_args, module_main
    add_fields(subparser, PretrainArgs, HELP)      # one flag per dataclass field
    a = from_args(PretrainArgs, parsed)            # and back

A leaf: it imports nothing of nanoseek but errors, so trainers can use it and cli.py stays the top.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys

from .errors import NanoseekError

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks (examples) and shows every option's default, unless its help
    already speaks of it or there is none to show (None, False)."""

    def add_argument(self, action):
        if action.help is None and self._shows_default(action):   # argparse would print no line at all
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        super().add_argument(action)

    @staticmethod
    def _shows_default(action) -> bool:
        d = action.default
        return (bool(action.option_strings) and action.nargs != 0     # switches speak for themselves
                and d is not None and d is not False and d is not argparse.SUPPRESS)

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h.lower() or not self._shows_default(action):
            return h
        return (h + " " if h else "") + "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Examples and defaults in --help (HelpFormatter); subcommands inherit it."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)


TYPES = {"int": int, "float": float, "int | None": int, "float | None": float}  # annotations as strings
COMMON_HELP = {"progress": "no progress bar"}


def add_fields(s: argparse.ArgumentParser, cls, help: dict[str, str], choices: dict | None = None, *,
               preset=(), required=(), exclusive=(), skip=(), metavar: dict[str, str] | None = None) -> None:
    """One flag per field of the dataclass `cls`, in field order: `seq_len` -> `--seq-len SEQ_LEN`.

    A bool field is a switch: `--name` when it defaults to False, `--no-name` when it defaults to True.
    A list field takes one or more values. Help is help[name], else the field's default. Fields named
    in `preset` default to None so that a preset can fill in what was not given (switches keep theirs);
    `required` ones must be given, the `exclusive` ones exclude each other, the `skip` ones get no flag."""
    help, choices, metavar = {**COMMON_HELP, **help}, choices or {}, metavar or {}
    group = s.add_mutually_exclusive_group() if exclusive else None
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        add = (group if f.name in exclusive else s).add_argument
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else (
            None if f.default is dataclasses.MISSING else f.default)
        hint = help.get(f.name, None if default is None else f"default {default}")
        if f.type in ("bool", bool) and default:
            add("--no-" + flag[2:], dest=f.name, action="store_false", help=help.get(f.name))
        elif f.type in ("bool", bool):
            add(flag, action="store_true", help=hint)
        elif isinstance(default, list):
            add(flag, nargs="+", default=default, metavar=metavar.get(f.name), help=hint)
        else:
            add(flag, type=TYPES.get(str(f.type), str), default=None if f.name in preset else default,
                required=f.name in required, choices=choices.get(f.name), metavar=metavar.get(f.name), help=hint)


def from_args(cls, args: argparse.Namespace):
    """The dataclass `cls` built from the parsed flags that are its fields."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def module_main(add_parser, command: str, argv: list[str] | None = None) -> int:
    """`python -m nanoseek.train.<module> ...`, the same as `nanoseek <command> ...`."""
    p = Parser(prog="python -m nanoseek")
    add_parser(p.add_subparsers(dest="command"))
    args = p.parse_args([command, *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except NanoseekError as e:
        print(f"nanoseek: error: {e}", file=sys.stderr)
        return 2
