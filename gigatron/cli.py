"""How command-line entry points report a user's mistake: one clear line, not a traceback.

A wrong flag combination, a missing or corrupt file or malformed data raises an error whose message
already names the problem and the fix (`ValueError` and its subclasses, `OSError` such as
`FileNotFoundError`, and the checkpoint errors). An entry point wrapped by `run_cli` prints that
message as `error: ...` on standard error and exits with status 2; anything else is a bug and keeps
its traceback. `GIGATRON_DEBUG=1` shows the traceback of user errors too.

Imports nothing heavy, so that data tools that use it start fast.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional, Sequence

USER_ERROR_EXIT_CODE = 2


def _user_error_types() -> tuple[type, ...]:
    types: list[type] = [ValueError, OSError]
    if "gigatron.core.checkpoint.io" in sys.modules:  # loaded only by code that reads checkpoints
        types.append(sys.modules["gigatron.core.checkpoint.io"].CheckpointError)
    return tuple(types)


def is_user_error(error: BaseException) -> bool:
    """True for the errors that describe bad input (flags, files, data) rather than a bug."""
    return isinstance(error, _user_error_types())


def debug_enabled() -> bool:
    return os.environ.get("GIGATRON_DEBUG", "").strip() not in ("", "0", "false", "no")


def _rank_prefix() -> str:
    world = os.environ.get("WORLD_SIZE")
    if world and world != "1":
        return f"[rank {os.environ.get('RANK', '?')}] "
    return ""


def run_cli(main: Callable[[Optional[Sequence[str]]], Optional[int]],
            argv: Optional[Sequence[str]] = None) -> int:
    """Run `main(argv)`; a user error becomes one `error: ...` line and exit status 2."""
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print(f"{_rank_prefix()}interrupted", file=sys.stderr, flush=True)
        return 130
    except Exception as error:  # noqa: BLE001 - sorted into user errors and bugs below
        if not is_user_error(error) or debug_enabled():
            raise
        message = str(error) or type(error).__name__
        print(f"{_rank_prefix()}error: {message}", file=sys.stderr, flush=True)
        print(f"{_rank_prefix()}(set GIGATRON_DEBUG=1 to see the traceback)", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    return 0 if code is None else int(code)
