"""Errors a user can cause and fix: reported as one line, without a traceback."""

import difflib
import signal
from pathlib import Path
from typing import Optional


class UserError(Exception):
    """A mistake in the config, the data or a checkpoint that the user can correct."""


class HeldBack:
    """stderr, holding back the line Hydra writes above a single run's error before it re-raises
    it, for __main__ to show above a traceback or drop: the run's own command needs no repeating.
    In a sweep the line names the failed job and passes (Optuna's sweeper goes on after it), and
    the sweep's folder is kept for __main__ to summarise a sweep that ended in an error."""

    # Relies on: Hydra writes this line, alone, before re-raising a job's error (tests/test_hydra_contract.py).
    PREFIX = "Error executing job with overrides:"

    def __init__(self, stream):
        self.stream, self.line = stream, None
        self.single_run, self.sweep = False, None  # until job() says otherwise

    def job(self, single_run: bool, sweep: Optional[Path]) -> None:
        """Called by the Hydra task (resnet_lab.training.train.run), to which this object is
        sys.stderr: Hydra's mode and its sweep's folder are known only inside a job."""
        self.single_run, self.sweep = single_run, sweep

    def write(self, text: str) -> int:
        if text.startswith(self.PREFIX) and self.single_run:
            self.line = text
            return len(text)
        return self.stream.write(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def closest(name, choices) -> str:
    """' (did you mean X?)' when one of choices is close to name, else ''."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def _schema_keys(error) -> list:
    """The keys of the schema (a dataclass of resnet_lab.config) in which OmegaConf looked the
    unknown key up: OmegaConf's errors name it as object_type."""
    import dataclasses

    schema = getattr(error, "object_type", None)
    return [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else []


def describe(e: BaseException):
    """One line for an error the user caused, or None for a bug (which keeps its traceback)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, MissingConfigException) and e.missing_cfg_file and e.options is not None:
        group, _, option = e.missing_cfg_file.rpartition("/")
        if group:
            return (f"{group}={option}: no such option{closest(option, e.options)}; "
                    f"choose from: {', '.join(e.options)}")
        return _first_line(e)
    cause = e.__cause__
    if isinstance(e, ConfigCompositionException) and isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        key = cause.full_key
        allowed = _schema_keys(cause)
        name = key.rpartition(".")[2]
        where = key.rpartition(".")[0] or "the top level"
        return (f"{key}: no such key{closest(name, allowed)}; {where} has: {', '.join(allowed)}")
    if isinstance(e, ConfigCompositionException) and isinstance(cause, ValidationError):
        return f"{cause.full_key}: {_first_line(cause)}"
    if isinstance(e, OverrideParseException):
        line = _first_line(e)
        if not line.isascii():
            key, _, value = line.partition(": ")[2].partition("=")
            return (f"could not parse the command-line overrides: {line}; Hydra takes characters beyond "
                    f"ASCII only in a quoted value: '{key}=\"{value}\"'")
        return f"could not parse the command-line overrides: {line}"
    if isinstance(e, ConfigCompositionException):
        return " ".join(filter(None, [_first_line(e), _first_line(cause) if cause else ""]))
    if isinstance(e, ValueError) and str(e) == "No trials are completed yet.":
        # Optuna's sweeper asks its study for the best trial after the last one.
        return "every trial of the Optuna search failed (the 'Failed experiment' lines above say why)"
    if isinstance(e, ValueError) and str(e).startswith("Unable to configure handler"):
        e = e.__cause__  # logging's, when Hydra cannot open the run's log file
    if isinstance(e, OSError) and e.filename:
        # Hydra creating the run folder, or a write into it, failed.
        return (f"{e.filename}: {e.strerror}; the run folder must be writable and have free space "
                f"(choose it with hydra.run.dir, or hydra.sweep.dir for -m)")
    return None


def reason(e: BaseException) -> str:
    """Why a run failed, in one line: describe's, or for a bug the error's type and first line."""
    return describe(e) or f"{type(e).__name__}: {_first_line(e)}"


def ended(status: int) -> str:
    """How a child process ended, from its exit status (negative: the signal that killed it, as
    subprocess gives it; 128 + N: as a shell gives it): 'died of SIGBUS (signal 7)' or
    'failed with exit status 1'."""
    signum = -status if status < 0 else status - 128 if 128 < status < 128 + signal.NSIG else 0
    try:
        return f"died of {signal.Signals(signum).name} (signal {signum})"
    except ValueError:
        return f"failed with exit status {status}"
