"""Tensor-parallel serving: the serving rank broadcasts each request, every rank generates.

Only global rank 0 serves HTTP. Before each generation it broadcasts the command and its
arguments to all ranks (`LeaderRunner`); the other ranks wait in `follower_loop`, run the same
engine call (joining its collectives) and go back to waiting, until the leader sends STOP.
An error the engine raises before any collective (bad input) is raised on every rank alike; the
followers swallow it and wait for the next command.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist

__all__ = ["LocalRunner", "LeaderRunner", "follower_loop", "GENERATE", "BEAM_SEARCH", "STOP"]

GENERATE, BEAM_SEARCH, STOP = 0, 1, 2


class LocalRunner:
    """One process: calls the engine directly."""

    def __init__(self, engine):
        self.engine = engine

    def generate_tokens(self, prompt_tokens, params, on_step=None, cancelled=None):
        return self.engine.generate_tokens(prompt_tokens, params, on_step, cancelled)

    def beam_search_tokens(self, prompt_tokens, tokens_to_generate, beam_width, stop_token, length_penalty):
        return self.engine.beam_search_tokens(prompt_tokens, tokens_to_generate, beam_width, stop_token,
                                              length_penalty)

    def shutdown(self) -> None:
        pass


def _broadcast(obj, src: int, group=None):
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class LeaderRunner(LocalRunner):
    """The serving rank (global rank 0) of a multi-process run: broadcasts, then generates."""

    def __init__(self, engine, src: int = 0):
        super().__init__(engine)
        self.src = src

    def generate_tokens(self, prompt_tokens, params, on_step=None, cancelled=None):
        _broadcast((GENERATE, ([list(p) for p in prompt_tokens], params)), self.src)
        # The callbacks run here only; the engine broadcasts the rows they end to the other ranks.
        return self.engine.generate_tokens(prompt_tokens, params, on_step, cancelled)

    def beam_search_tokens(self, prompt_tokens, tokens_to_generate, beam_width, stop_token, length_penalty):
        args = (list(prompt_tokens), tokens_to_generate, beam_width, stop_token, length_penalty)
        _broadcast((BEAM_SEARCH, args), self.src)
        return self.engine.beam_search_tokens(*args)

    def shutdown(self) -> None:
        _broadcast((STOP, None), self.src)


def follower_loop(engine, src: int = 0, max_commands: Optional[int] = None) -> int:
    """Run the leader's commands until STOP (or max_commands); returns how many ran."""
    done = 0
    while max_commands is None or done < max_commands:
        command, args = _broadcast(None, src)
        if command == STOP:
            break
        try:
            if command == GENERATE:
                engine.generate_tokens(*args)
            elif command == BEAM_SEARCH:
                engine.beam_search_tokens(*args)
            else:
                raise RuntimeError(f"unknown generation command {command!r} from rank {src}")
        except ValueError:
            pass  # the leader got the same error before any collective and reports it
        done += 1
    return done
