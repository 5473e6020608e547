"""The driver's side of a Ray Train run: which cluster it runs on, what reaches its terminal, and
what Ctrl-C does.

The workers' tracebacks are held back while the job runs, dropped when they only carry a user
mistake, printed when they carry a bug. The CLI starts Ray with log_to_driver=True: the workers'
progress bars and warnings reach the terminal through it. A UserError raised in a worker would
reach it too, as Ray Train's own report of the failure: the worker's traceback ("Error in training
function:"), then the controller's ("[FailurePolicy] RAISE ... WorkerGroupError"), 60 lines or
more around the one line `dist-prune: error: ...` that the driver prints. Which of the two an
exception is, is known only when `trainer.fit()` raises; so stderr batches that start a
traceback, and everything after them from the same process, wait until then.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from typing import Callable, Iterator

from dist_prune.errors import UserError

# Where Ray's log_to_driver hands each batch of a worker's output to the terminal
# (ray/_private/worker.py connect(): global_worker_stdstream_dispatcher.add_handler("ray_print_logs", ...))
HANDLER = "ray_print_logs"
# The first lines of a failure report: Python's, Ray Train worker's, Ray Train controller's
MARKERS = ("Traceback (most recent call last):", "Error in training function", "[FailurePolicy]")


class TracebackGate:
    """A stand-in for Ray's printing handler: stdout and ordinary stderr batches go straight
    through; a stderr batch with a traceback, and every later stderr batch of its process, waits
    for `release` (printed in order) or `drop` (never printed, nor anything that comes later: the
    driver's one line, a user error's or an interrupt's, stays the last)."""

    def __init__(self, forward: Callable[[dict], None]):
        self.forward = forward
        self.held: list[dict] = []
        self.holding: set = set()  # pids whose failure report is being held
        self.dropping = False
        self._lock = threading.Lock()

    def __call__(self, batch: dict) -> None:
        with self._lock:
            if self.dropping:  # the outcome is out: whatever Ray forwards now is its echo or noise
                return
            if batch.get("is_err") and (batch.get("pid") in self.holding
                                        or any(m in line for line in batch.get("lines", ()) for m in MARKERS)):
                self.holding.add(batch.get("pid"))
                self.held.append(batch)
                return
        self.forward(batch)

    def release(self) -> None:
        with self._lock:
            held, self.held, self.holding = self.held, [], set()
        for batch in held:
            self.forward(batch)

    def drop(self) -> None:
        with self._lock:
            self.held, self.dropping = [], True


@contextlib.contextmanager
def tracebacks_held() -> Iterator[TracebackGate]:
    """Hold the workers' failure reports while the block runs. Leaving it, they are printed,
    unless `drop()` was called: then they, and any that Ray forwards later (its log monitor runs
    behind the workers), never are; Ray's own handler comes back only at Ray's shutdown. Where
    this process does not print the workers' output (log_to_driver=False, a sweep trial's actor),
    the gate sees nothing."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher  # lazy: Ray

    printing = dict(dispatcher.handlers).get(HANDLER)
    gate = TracebackGate(printing or (lambda batch: None))
    _swap(dispatcher, gate)
    try:
        yield gate
    finally:
        if not gate.dropping:
            _swap(dispatcher, printing)
        gate.release()


def _swap(dispatcher, handler) -> None:
    """Replace Ray's printing handler in place, under the dispatcher's lock: removing and adding
    it would lose a batch that arrived between the two."""
    with dispatcher._lock:
        dispatcher.handlers = [(name, handler if name == HANDLER else h) for name, h in dispatcher.handlers]


def interruptible_trainer(trainer_class: type) -> type:
    """`trainer_class` (a Ray Train trainer) with Ctrl-C left to Python: a KeyboardInterrupt out of
    `fit()`, which the CLI turns into `dist-prune: interrupted` and exit code 130.

    Ray Train installs its own SIGINT handler in fit() and never restores the one before: it aborts
    the controller and ends the process with sys.exit(0) (exit code 0 or 1, Ray's message, no
    word from dist-prune), and a Ctrl-C after fit() (verifying or registering the export) meets the
    same handler of a run that is over. The workers need no abort of their own: a local Ray instance
    ends with the driver (ray.init's atexit shutdown), and on a cluster the controller and the
    workers are actors this driver owns, which Ray ends when their owner goes."""

    class Interruptible(trainer_class):
        def _register_sigint_handler(self, controller) -> None:
            """Not Ray Train's handler: the process keeps its own (Python's KeyboardInterrupt)."""

    Interruptible.__name__ = Interruptible.__qualname__ = trainer_class.__name__
    return Interruptible


def ray_address() -> tuple[str | None, str]:
    """The Ray cluster a job runs on, and where that address comes from: $RAY_ADDRESS ("local":
    none), else the cluster `ray start` recorded on this machine, else none (address None: a local
    Ray of the job's own).

    A cluster that `ray start --head` left on this machine is joined, as Ray's own ray.init() does:
    starting it is how a user says that Ray jobs on this machine run there, and a second, private
    Ray beside it would compete for the same cores and memory unseen. Ray's internals also find
    "the cluster" by that recorded address, whichever instance asks: in a private instance, Ray
    Train's placement-group cleaner asked the recorded head for the job's controller, found none
    and gave up its watch (measured with a head started with its dashboard, Ray 2.60)."""
    from ray._private.utils import get_ray_address_file, read_ray_address  # lazy: Ray only where a job runs

    if os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        return (None if address == "local" else address), f"RAY_ADDRESS={address}"
    recorded = read_ray_address()
    return recorded, (f"{recorded} (recorded by `ray start` in {get_ray_address_file(None)})" if recorded else "")


def _from_ray(error: BaseException) -> bool:
    """One of Ray's own exception classes: a wrapper, never the job's own mistake or bug."""
    return type(error).__module__.startswith("ray.")


def _looked_through(error: BaseException) -> Iterator[BaseException]:
    """`error` and what Ray's wrappers around it hold: a RayTaskError (an instance of its cause's
    class too, whose str() is the remote traceback), Ray Train's WorkerGroupError (each rank's
    exception, in a UserExceptionWithTraceback) and ControllerError. Any other exception ends the
    walk: what it was raised while handling (its __context__) is not what ended the job."""
    seen, stack = set(), [error]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        if _from_ray(e):
            stack += [x for x in (e.__cause__, e.__context__, getattr(e, "cause", None),
                                  getattr(e, "_base_exc", None), getattr(e, "controller_failure", None)) if x]
            stack += (getattr(e, "worker_failures", None) or {}).values()


def find_user_error(error: BaseException) -> str | None:
    """The message of the UserError that ended a job, raised on the driver or in a worker. A bug,
    even one raised while a UserError was being handled (its __context__, or in a worker its
    traceback text, holds the UserError), keeps its traceback (tests/test_bad_runtime.py)."""
    told = None
    for e in _looked_through(error):
        wrapper = _from_ray(e)
        if isinstance(e, UserError) and not wrapper:
            return str(e)
        # a cause Ray could not rebuild arrives as text only: its last line is the final exception
        last = (str(e).strip().splitlines() or [""])[-1] if wrapper else ""
        if told is None and last.startswith(_USER_ERROR_LINE):
            told = last[len(_USER_ERROR_LINE):].strip()
    return told


_USER_ERROR_LINE = f"{UserError.__module__}.{UserError.__qualname__}: "


def out_of_memory(error: BaseException) -> str | None:
    """One line for a job process that Ray's memory monitor killed (its message is 40 lines: the
    killing policy, the top 10 processes, six environment variables), else None."""
    from ray.exceptions import OutOfMemoryError  # lazy: Ray only where a job runs

    for e in _looked_through(error):
        text = str(e)
        if isinstance(e, OutOfMemoryError) or "killed due to the node running low on memory" in text:
            usage = re.search(r"was ([\d.]+\s*GB) used / ([\d.]+\s*GB) limit \(([\d.]+)\)", text)
            seen = f" ({usage[1]} of {usage[2]} in use, {float(usage[3]):.0%})" if usage else ""
            return (f"Ray's memory monitor killed a process of the job: the node ran low on memory{seen}; "
                    "give the job more, or make it need less (fewer cluster.num_workers per node, "
                    "model.dtype=bfloat16, shorter data.calibration.seq_len or finetune.data.seq_len), or set "
                    "Ray's kill threshold RAY_memory_usage_threshold where Ray starts; `ray logs raylet.out` "
                    "has Ray's report")
    return None
