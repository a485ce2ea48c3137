"""Argument types shared by the command-line tools (argparse ``type=`` callables)."""
from __future__ import annotations

import argparse


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def unit_fraction(text: str) -> float:
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def expected_errors() -> tuple:
    """Errors that mean bad input (a file, a config key, a weight file, a checkpoint), not a bug."""
    import yaml

    from .config import ConfigError
    from .data.nifti import DataError
    from .engine.checkpoints import CheckpointError
    from .models.weights import WeightLoadError

    return (ConfigError, DataError, CheckpointError, WeightLoadError, ValueError, OSError, yaml.YAMLError)


def run_tool(main, argv=None) -> int:
    """Run a command line's ``main``: an expected error becomes one ``error:`` line and exit status 2;
    an unexpected one keeps its traceback; Ctrl-C exits 130 without one."""
    import sys

    try:
        return main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if isinstance(exc, expected_errors()):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
