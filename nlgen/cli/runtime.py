"""What every command shares at run time: error mapping, Ctrl-C, closed pipes.

Errors are mapped in one place to one line on stderr and a documented exit code:
``NlgenError`` -> its own code (1 or 2), Ctrl-C or SIGTERM -> 130, a reader that closed the
pipe -> 0, a stdout that refuses writes (a full disk) -> 1,
anything unexpected -> 1 with a hint to set NLGEN_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar

import typer

from nlgen.cli.console import end_line, error, setup_logging, silence_stdout
from nlgen.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK, ModelError, NlgenError
from nlgen.jobs import distributed

F = TypeVar("F", bound=Callable[..., Any])


def debug_enabled() -> bool:
    return os.environ.get("NLGEN_DEBUG", "") not in ("", "0", "false", "no")


# The libraries underneath print warnings and progress bars of their own; nlgen owns stderr.
# Set for nlgen's own process by the CLI (never by the core), as defaults a user's own setting
# overrides; they are read when each library is imported.
QUIET_LIBRARIES = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
                   "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
                   # critical, not error: the csv loader logs a malformed file's parser error
                   # itself, and nlgen reports it once, as an InputError.
                   "DATASETS_VERBOSITY": "critical"}


def quiet_libraries() -> None:
    """Quiet transformers, the Hub client and datasets for this process (their env defaults);
    and keep transformers' index of its lazy modules between processes
    (nlgen.models.import_index: 0.2-0.3 s of each ``import transformers``)."""
    from nlgen.models import import_index

    import_index.install()
    for name, value in QUIET_LIBRARIES.items():
        os.environ.setdefault(name, value)
    # Already imported (a command run inside a larger program, or tests): tell them directly.
    bars_off = os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    if "transformers" in sys.modules:
        if os.environ["TRANSFORMERS_VERBOSITY"] == "error":
            sys.modules["transformers"].logging.set_verbosity_error()
        if bars_off:
            sys.modules["transformers"].logging.disable_progress_bar()
    if "datasets" in sys.modules and os.environ["DATASETS_VERBOSITY"] == "critical":
        sys.modules["datasets"].utils.logging.set_verbosity(logging.CRITICAL)
        if os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1":
            sys.modules["datasets"].disable_progress_bars()
    if "huggingface_hub" in sys.modules and bars_off:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def use_spare_threads(lm: Any) -> None:
    """Take a loaded model's thread advice (fewer threads while other processes keep cores
    busy: see devices.spare_threads): this process is nlgen's, so the CLI decides."""
    if lm.spare_threads is None:
        return
    import torch

    if lm.spare_threads < torch.get_num_threads():
        logging.getLogger("nlgen").info("other processes keep the CPU busy: using %d thread(s)",
                                        lm.spare_threads)
        torch.set_num_threads(lm.spare_threads)


def guard(command: F) -> F:
    """Wrap a command so that no user-facing failure ends in a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # Under a launcher only rank 0 speaks: the other ranks' notices are dropped, and their
        # failures reach rank 0 (nlgen.jobs.parallel), which reports them once. A bug still shows.
        main = is_main_process()
        setup_logging(verbose=bool(kwargs.get("verbose")),
                      quiet=bool(kwargs.get("quiet")) or not main)
        quiet_libraries()
        with terminate_noted():  # a SIGTERM while a failure is reported: see _guarded
            return _guarded(command, main, args, kwargs)

    return wrapper  # type: ignore[return-value]


def _guarded(command: Callable[..., Any], main: bool, args: tuple[Any, ...],
             kwargs: dict[str, Any]) -> Any:
    """Run ``command``, each failure mapped to its line and exit code. Once the command is
    left, a SIGTERM is only noted (:func:`terminate_noted`): under a launcher it comes while
    rank 0 is still finding out which rank was lost, and must not kill it before it says so."""
    try:
        with terminate_as_interrupt():
            return command(*args, **kwargs)
    except (typer.Exit, typer.Abort):
        raise
    except NlgenError as exc:
        _fail(exc, main, kwargs.get("ctx"))
    except KeyboardInterrupt:
        _end_line_quietly()  # what was printed stays intact, its last line ended
        lost = _lost_peer(kwargs) if _terminated else None
        if lost is not None:  # the launcher stopped us because another rank died
            _fail(lost, main, None)
        if main:
            error("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:
        # The reader (head, less, ...) has what it wanted: stop quietly, successfully.
        silence_stdout()
        raise typer.Exit(EXIT_OK) from None
    except Exception as exc:
        lost = _lost_peer(kwargs)  # a collective that lost its peer
        if lost is not None:
            _fail(lost, main, None)
        if debug_enabled():
            raise
        flush_stdout_quietly()
        error(f"unexpected {type(exc).__name__}: {exc}",
              hint="this is a bug in nlgen; NLGEN_DEBUG=1 shows the traceback")
        raise typer.Exit(EXIT_FAILURE) from None


def _fail(exc: NlgenError, main: bool, ctx: typer.Context | None) -> NoReturn:
    if debug_enabled():
        raise exc
    flush_stdout_quietly()
    if main:
        error(_with_origin(exc, ctx), exc.hint)
    raise typer.Exit(exc.exit_code) from None


def _lost_peer(kwargs: dict[str, Any]) -> NlgenError | None:
    """Under a launcher, rank 0's error when another rank of the job is gone (killed, out of
    memory): a job with --output continues with --resume."""
    try:
        return distributed.peer_failure(resumable=bool(kwargs.get("output")))
    except Exception:  # never let the diagnosis hide the failure itself
        return None


def terminate_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM (what schedulers, containers and launchers send before a kill) does what Ctrl-C
    does: the command stops cleanly, with exit code 130, and finetune saves a checkpoint."""
    return _on_sigterm(_interrupt)


def terminate_noted() -> contextlib.AbstractContextManager[None]:
    """A SIGTERM is only noted, not acted on, until the block ends: around a command's failure
    mapping, which is short and ends the process."""
    return _on_sigterm(_note_terminate)


@contextmanager
def _on_sigterm(handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for SIGTERM inside the block, the previous one put back after (only the
    main thread may set handlers; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def stop_signals(stop: Callable[[bool], None]) -> Iterator[None]:
    """Ctrl-C and SIGTERM end a server (``nlgen serve``) its own way instead of interrupting it
    where it stands: ``stop(True)`` for Ctrl-C (requests in flight cancelled, exit 130),
    ``stop(False)`` for SIGTERM (requests drained, exit 0). ``stop`` runs in the signal handler:
    it only sets flags."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: stop(signum == signal.SIGINT))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_terminated = False  # the interruption was a SIGTERM (under a launcher: a rank may be lost)


def _interrupt(signum: int, frame: Any) -> None:
    _note_terminate(signum, frame)
    raise KeyboardInterrupt


def _note_terminate(signum: int, frame: Any) -> None:
    global _terminated
    _terminated = True


def is_main_process() -> bool:
    """Rank 0, or the only process (a malformed RANK is reported by the command itself)."""
    try:
        return distributed.is_main_process()
    except NlgenError:
        return True


def _with_origin(exc: NlgenError, ctx: typer.Context | None) -> str:
    """A model error about a value the user did not type says where the value came from."""
    if isinstance(exc, ModelError) and ctx is not None:
        source = ctx.get_parameter_source("model")
        if source is not None and source.name == "ENVIRONMENT":
            return f"{exc.message} (the model named by NLGEN_MODEL)"
    return exc.message


def _end_line_quietly() -> None:
    try:
        end_line()
    except (OSError, ValueError, NlgenError):
        silence_stdout()


def flush_stdout_quietly() -> None:
    """Flush stdout; where it cannot take the bytes (a closed pipe, a full disk), drop them,
    so that the interpreter's own flush at exit does not fail again."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        silence_stdout()


# Set by generate, whose work is done once its output is flushed, and by every process that
# joined a process group (cli/jobs.py).
_exit_fast = False


def exit_fast_when_done() -> None:
    """Let ``main`` end the process without Python's teardown once the command has finished.

    Clearing the modules of torch and transformers at exit took ~0.5 s of an 8-token
    `generate` process on the 2-core machine (README, "Design notes"). A command that
    writes its files atomically before returning (--output is closed and synced) and holds
    nothing else to clean up (no training run) has nothing for that teardown to do.
    """
    global _exit_fast
    _exit_fast = True


def end_process(code: Any) -> None:
    """Exit now with ``code`` (as SystemExit would: a message is printed, status 1) when the
    command asked for it and the heavy modules are loaded."""
    if not (_exit_fast and "torch" in sys.modules):
        return
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    flush_stdout_quietly()
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code or 0)
