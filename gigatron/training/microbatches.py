"""The global batch size of each training step, and so its number of micro-batches.

    MicroBatchCalculator(global_batch_size, micro_batch_size, data_parallel_size,
                         rampup_batch_size=None, step_batch_size_schedule=None, seq_length=None)

The batch size is a function of the samples consumed so far (the counter a checkpoint stores), so a
resumed run continues the schedule where it stopped. Three kinds, as in Megatron:

- constant: --global-batch-size every step;
- --rampup-batch-size START INCREMENT SAMPLES: from START, INCREMENT more every
  SAMPLES / ((GBS - START) / INCREMENT) consumed samples, --global-batch-size after SAMPLES;
- --step-batch-size-schedule "THRESHOLD:BS THRESHOLD:BS ...": batch BS once THRESHOLD tokens are
  consumed. Entries are separated by spaces or commas; a number may end in K, M, B or T (10^3,
  10^6, 10^9, 10^12; a decimal before it is allowed, e.g. 1.5B) and the suffix is case-blind.
  Thresholds count tokens: each becomes floor(THRESHOLD / --seq-length) samples. The entries are
  sorted by threshold; the first must be 0 and the thresholds (in samples) strictly increasing.
  The run's --global-batch-size is the batch of the last entry (giving the flag as well is an
  error). A batch size need only divide by micro-batch size x data-parallel size when the run
  reaches it (`check_reachable`), so a run resumed on more ranks may leave early small entries behind.

The loop asks `global_batch_size_at(consumed)` before each step and adds that many samples after
it; the learning-rate schedule is stepped by the same count, and the log line shows it.
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["MicroBatchCalculator", "parse_step_batch_size_schedule", "SCHEDULE_FLAG"]

SCHEDULE_FLAG = "--step-batch-size-schedule"
_SUFFIXES = {"K": 10 ** 3, "M": 10 ** 6, "B": 10 ** 9, "T": 10 ** 12}
_EXAMPLE = '--step-batch-size-schedule "0:256 2B:512 4B:1024"'


def _parse_number(text: str, entry: str, what: str) -> int:
    value = text.strip().upper()
    multiplier = 1
    if value and value[-1] in _SUFFIXES:
        multiplier = _SUFFIXES[value[-1]]
        value = value[:-1]
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{SCHEDULE_FLAG}: the {what} of entry {entry!r} is {text!r}, not a number (digits with "
                         f"an optional K, M, B or T suffix); e.g. {_EXAMPLE}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{SCHEDULE_FLAG}: the {what} of entry {entry!r} is not a finite number; e.g. {_EXAMPLE}")
    return int(number * multiplier)


def parse_step_batch_size_schedule(text: str, seq_length: Optional[int]) -> list[tuple[int, int]]:
    """[(threshold in samples, global batch size), ...] sorted by threshold, from the flag's text
    (thresholds in tokens, converted with `seq_length`; None: they are samples already). Raises
    ValueError naming the flag, the entry and the fix."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{SCHEDULE_FLAG} is empty; give THRESHOLD:BATCH pairs starting at 0, e.g. {_EXAMPLE}")
    if seq_length is not None and seq_length < 1:
        raise ValueError(f"{SCHEDULE_FLAG} converts its token thresholds with --seq-length, which is {seq_length}")
    schedule = []
    for entry in text.strip().replace(",", " ").split():
        if ":" not in entry:
            raise ValueError(f"{SCHEDULE_FLAG}: entry {entry!r} is not THRESHOLD:BATCH (a token count and the global "
                             f"batch size from there on); e.g. {_EXAMPLE}")
        threshold_text, batch_text = entry.split(":", 1)
        threshold = _parse_number(threshold_text, entry, "threshold")
        batch = _parse_number(batch_text, entry, "batch size")
        if threshold < 0:
            raise ValueError(f"{SCHEDULE_FLAG}: entry {entry!r} has a negative threshold; thresholds count tokens "
                             "consumed from 0")
        if batch <= 0:
            raise ValueError(f"{SCHEDULE_FLAG}: entry {entry!r} has batch size {batch}; every batch size must be "
                             "positive")
        if seq_length is not None:
            threshold //= seq_length
        schedule.append((threshold, batch))
    schedule.sort(key=lambda pair: pair[0])
    if schedule[0][0] != 0:
        raise ValueError(f"{SCHEDULE_FLAG}: the first threshold is {schedule[0][0]} samples, but the schedule must "
                         f"start at 0 (the batch size of the first step); add a 0:BATCH entry, e.g. {_EXAMPLE}")
    for (previous, _), (threshold, _) in zip(schedule, schedule[1:]):
        if threshold <= previous:
            unit = f" (thresholds are tokens, {seq_length} to a sample)" if seq_length else ""
            raise ValueError(f"{SCHEDULE_FLAG}: two entries start at the same sample ({threshold}){unit}; make the "
                             "thresholds strictly increasing, at least one sequence apart")
    return schedule


class MicroBatchCalculator:
    """Global batch size and number of micro-batches at a given consumed-sample count (see the
    module docstring for the three kinds)."""

    def __init__(self, global_batch_size: int, micro_batch_size: int, data_parallel_size: int,
                 rampup_batch_size: Optional[Sequence[int]] = None, step_batch_size_schedule: Optional[str] = None,
                 seq_length: Optional[int] = None) -> None:
        if rampup_batch_size and step_batch_size_schedule:
            raise ValueError(f"{SCHEDULE_FLAG} and --rampup-batch-size both set the batch size over training; "
                             "give one of them")
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.data_parallel_size = data_parallel_size
        self.rampup = None
        self.schedule = None
        if rampup_batch_size:
            start, increment, samples = (int(v) for v in rampup_batch_size)
            num_increments = (global_batch_size - start) // increment
            per_increment = samples / num_increments if num_increments > 0 else 0.0
            self.rampup = (start, increment, samples, per_increment)
        if step_batch_size_schedule:
            self.schedule = parse_step_batch_size_schedule(step_batch_size_schedule, seq_length)
            self.global_batch_size = self.schedule[-1][1]

    def global_batch_size_at(self, consumed_samples: int) -> int:
        if self.schedule is not None:
            batch = self.schedule[0][1]
            for threshold, size in self.schedule:
                if consumed_samples < threshold:
                    break
                batch = size
            return batch
        if self.rampup is None:
            return self.global_batch_size
        start, increment, samples, per_increment = self.rampup
        if consumed_samples > samples or per_increment <= 0:
            return self.global_batch_size
        steps = int(consumed_samples / per_increment)
        return min(start + steps * increment, self.global_batch_size)

    def num_microbatches_at(self, consumed_samples: int) -> int:
        """Micro-batches per data-parallel rank of the step that starts at `consumed_samples`."""
        batch = self.global_batch_size_at(consumed_samples)
        step = self.micro_batch_size * self.data_parallel_size
        if batch % step != 0:
            raise ValueError(self._indivisible(batch, consumed_samples))
        return batch // step

    def _indivisible(self, batch: int, consumed_samples: int) -> str:
        step = self.micro_batch_size * self.data_parallel_size
        source = SCHEDULE_FLAG if self.schedule is not None else "--global-batch-size"
        return (f"the global batch size {batch} of {source} (from {consumed_samples} consumed samples on) is not a "
                f"multiple of --micro-batch-size ({self.micro_batch_size}) x data-parallel size "
                f"({self.data_parallel_size}) = {step}; change that batch size or the micro-batch size")

    def check_reachable(self, consumed_samples: int, train_samples: Optional[int]) -> None:
        """Every batch size the run uses from `consumed_samples` until `train_samples` (None: to the
        end of the schedule) divides into micro-batches; raises ValueError naming the first that does not."""
        if self.schedule is None:
            return
        current = self.global_batch_size_at(consumed_samples)
        reachable = [(max(consumed_samples, 0), current)] + [
            (threshold, batch) for threshold, batch in self.schedule
            if threshold > consumed_samples and (train_samples is None or threshold < train_samples)]
        step = self.micro_batch_size * self.data_parallel_size
        for threshold, batch in reachable:
            if batch % step != 0:
                raise ValueError(self._indivisible(batch, threshold))

    def train_iters_for_samples(self, train_samples: int) -> int:
        """Iterations needed to consume `train_samples` (the ramp-up or schedule included)."""
        if self.rampup is None and self.schedule is None:
            return train_samples // self.global_batch_size
        last_change = self.rampup[2] if self.rampup is not None else self.schedule[-1][0]
        consumed, iterations = 0, 0
        while consumed < train_samples:
            batch = self.global_batch_size_at(consumed)
            if consumed >= last_change and batch == self.global_batch_size:
                return iterations + (train_samples - consumed) // self.global_batch_size
            consumed += batch
            iterations += 1
        return iterations

    def describe(self) -> Optional[str]:
        """The schedule as a log line (None without one)."""
        if self.schedule is None:
            return None
        step = self.micro_batch_size * self.data_parallel_size
        parts = [f">= {threshold} samples: {batch} ({batch // step if batch % step == 0 else 'not divisible into'} "
                 "micro-batches)" for threshold, batch in self.schedule]
        return f"> {SCHEDULE_FLAG}: global batch size " + "; ".join(parts)
