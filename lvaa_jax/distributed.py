"""A job of several cooperating processes (``jax.distributed``): who does what, who waits, one error for all.

Every process of a job runs the same code. What runs over the global mesh (the training step, orbax's
checkpoints, the neighbour search) is collective: every process calls it, in the same order. Everything
else that writes a file, and the work that only feeds such a file (closed-loop evaluation, embedding), is
done by process 0 alone inside :func:`on_process_zero`, while the others wait for its outcome: its result,
or its error, which they then raise too, so that every process ends with the same one-line error instead of
waiting forever on a process that has stopped. Decisions that read files (is this checkpoint damaged?) are
taken by process 0 and shared the same way, so that every process takes the same branch.

Outcomes travel through the distributed runtime's key-value store (not a device collective: a process
waits there, for minutes if need be, without holding a collective open). Calls are numbered in the order
they are made, which is the same on every process.

With one process, or inside a block that process 0 runs alone, every helper here just runs its function.
This module does not import JAX at its top: the progress bars of ``make_demos``'s worker processes ask
:func:`is_primary` without wanting JAX loaded.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from lvaa_jax.errors import LvaaError

log = logging.getLogger(__name__)
T = TypeVar("T")
WAIT_MS = 60_000  # one wait on the key-value store; a waiting process asks again until the answer comes
_calls = itertools.count()
_alone = threading.local()  # depth of on_process_zero blocks this thread is running for the job


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Joins the job: ``jax.distributed.initialize`` with the three given, or with none (it then reads the
    cluster from its environment: SLURM, TPU VMs, ...). Before any other JAX call.

    CPU devices of several processes reduce through gloo (the default since jax 0.5; set here for the
    versions before it), so that a CPU cluster, and the tests, run the same collectives as a GPU one.
    """
    given = [v is not None for v in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise LvaaError("--coordinator_address, --num_processes and --process_id go together: give all three, or "
                        "none to let jax.distributed.initialize() read the cluster from its environment")
    if all(given):
        if not re.fullmatch(r"\S+:\d+", coordinator_address):
            raise LvaaError(f"--coordinator_address={coordinator_address}: must be HOST:PORT (process 0's host)")
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise LvaaError(f"--process_id={process_id}, --num_processes={num_processes}: need 0 <= process_id < "
                            "num_processes")
    import jax

    platforms = jax.config.jax_platforms or ""
    if platforms.split(",")[0] in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (ValueError, RuntimeError) as error:  # no cluster found, or the others never came
        where = (f"at {coordinator_address} as process {process_id} of {num_processes}" if all(given)
                 else "from the environment")
        raise LvaaError(
            f"--distributed: could not join the job {where}: {_first_line(error).rstrip('.')}; start every process with the "
            "same --coordinator_address and --num_processes and its own --process_id (or none of the three "
            "under SLURM or on a TPU VM)"
        ) from None


def process_index() -> int:
    jax = sys.modules.get("jax")
    return jax.process_index() if jax is not None and jax.distributed.is_initialized() else 0


def process_count() -> int:
    jax = sys.modules.get("jax")
    return jax.process_count() if jax is not None and jax.distributed.is_initialized() else 1


def is_primary() -> bool:
    """Process 0 of the job (or the only process): the one that writes files and shows progress."""
    return process_index() == 0


def cooperating() -> bool:
    """Several processes that must meet here: not a single process, nor process 0 inside a block it runs
    alone (where a helper of this module must not wait for the others, who are waiting for it)."""
    return process_count() > 1 and not getattr(_alone, "depth", 0)


def on_process_zero(fn: Callable[[], T], what: str) -> T:
    """``fn()`` run by process 0 alone; every process returns its result, which must be JSON (or None).

    If it raises, process 0 raises it and every other process raises LvaaError with the same message
    (an error that is not the user's names process 0 and its log). ``what`` says what the others wait for.
    """
    if not cooperating():
        return fn()
    key = _key()
    if process_index() != 0:
        return _outcome(json.loads(_wait(key)), what)
    _alone.depth = getattr(_alone, "depth", 0) + 1
    try:
        result = fn()
    except BaseException as error:
        _publish(key, {"what": what, "error": _message(error, 0)})
        raise
    finally:
        _alone.depth -= 1
    _publish(key, {"what": what, "result": result})
    return result


def on_every_process(fn: Callable[[], T], what: str) -> T:
    """``fn()`` run by every process, each returning its own result, once all have run it; if any raised,
    every process raises the first failure's message (the process of lowest index), so that all go on, or
    all stop, together."""
    result, failure = None, None
    try:
        result = fn()
    except BaseException as error:
        if not cooperating():
            raise
        failure = error
    outcomes = gather(None if failure is None else _message(failure, process_index()), what)
    for process, message in enumerate(outcomes):
        if message is not None:
            if process == process_index():
                raise failure
            raise LvaaError(message)
    return result


def gather(value: Any, what: str) -> list:
    """Every process's ``value`` (JSON), in process order, on every process."""
    if not cooperating():
        return [value]
    key = _key()
    _publish(f"{key}/{process_index()}", {"what": what, "result": value})
    return [_outcome(json.loads(_wait(f"{key}/{process}")), what) for process in range(process_count())]


def local_copy(tree: Any) -> Any:
    """This process's copy of replicated arrays that span processes (each leaf's first local replica), for
    work that process 0 does alone; other leaves are returned as they are."""
    import jax

    def local(leaf):
        if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
            return leaf
        if not leaf.is_fully_replicated:
            raise ValueError(f"local_copy needs replicated arrays, got one sharded as {leaf.sharding}")
        return leaf.addressable_data(0)

    return jax.tree.map(local, tree)


def spans_processes(mesh) -> bool:
    """Whether ``mesh`` holds devices of other processes (its computations are then collective)."""
    return any(device.process_index != process_index() for device in mesh.devices.flat)


def replicated_on(x, mesh):
    """``x`` (the same values on every process) as one array replicated over ``mesh``; on a mesh of this
    process alone, ``x`` as it is."""
    if not spans_processes(mesh):
        return x
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec()), np.asarray(x))


def gathered(x, mesh):
    """The whole of ``x``, an array (or a tuple or other tree of arrays) on ``mesh`` in any sharding, as
    arrays of this process (every process gets them); on a mesh of this process alone, ``x`` as it is."""
    if not spans_processes(mesh):
        return x
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    return local_copy(jax.jit(lambda a: a, out_shardings=NamedSharding(mesh, PartitionSpec()))(x))


def _key() -> str:
    return f"lvaa_jax/{next(_calls)}"


def _client():
    from jax._src import distributed  # the runtime's key-value store: jax exposes no public handle to it

    return distributed.global_state.client


def _publish(key: str, outcome: dict) -> None:
    _client().key_value_set(key, json.dumps(outcome))


def _wait(key: str) -> str:
    """The value at ``key``, once there. A process that has died ends this one (the runtime aborts it)."""
    import jax

    while True:
        try:
            return _client().blocking_key_value_get(key, WAIT_MS)
        except jax.errors.JaxRuntimeError as error:
            if "DEADLINE_EXCEEDED" not in str(error):
                raise


def _outcome(outcome: dict, what: str) -> Any:
    if outcome["what"] != what:  # a bug: the processes took different paths through the code
        raise RuntimeError(f"the processes of this job diverged: waiting for {what!r}, got {outcome['what']!r}")
    if "error" in outcome:
        raise LvaaError(outcome["error"])
    return outcome["result"]


def _message(error: BaseException, process: int) -> str:
    """The one line every process prints for ``error`` (raised by ``process``)."""
    if isinstance(error, LvaaError):
        return str(error)
    if isinstance(error, OSError):
        from lvaa_jax.cli import storage_error

        message = storage_error(error)
        if message is not None:
            return message
    if isinstance(error, KeyboardInterrupt):
        return "interrupted; run the same command again to resume"
    return f"process {process} stopped on an error ({type(error).__name__}: {_first_line(error)}); see its log"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]
