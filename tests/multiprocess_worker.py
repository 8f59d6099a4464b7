"""One process of a job that tests_multiprocess.py starts twice: the neighbour search over the mesh of both
processes, and how the helpers of lvaa_jax.distributed end both processes on the error of one.

    python tests/multiprocess_worker.py --distributed --coordinator_address=localhost:PORT --num_processes=2
        --process_id=I --out=DIR --workdir=DIR_I

Writes ``<out>/knn_<case>_<process>.npz`` (similarities, ids) and ``<out>/outcomes_<process>.json`` (what each call ended with).
"""

import json
from pathlib import Path

import numpy as np
from absl import flags

from lvaa_jax import cli

# (N, D, k, block_size): the default tiles (16 rows: diagonal tiles split, the last block padded, 91 tiles
# shared out unevenly) and small whole blocks (diagonal tiles whole, several blocks per device).
KNN_CASES = {"default": (203, 16, 7, None), "blocks_8": (64, 8, 5, 8)}


def knn_input(n: int, d: int) -> np.ndarray:
    """Gaussian rows with exact copies among them: ties that only the lower-index rule breaks."""
    x = np.random.default_rng(n * d).normal(size=(n, d)).astype(np.float32)
    x[1::7] = x[0]
    return x


def outcome(fn) -> str:
    try:
        return f"returned {fn()!r}"
    except Exception as error:  # noqa: BLE001 - the type is what is tested
        return f"{type(error).__name__}: {error}"


def main(argv):
    DISTRIBUTED.initialize()  # noqa: F821 - defined when run as a script, below
    import jax

    from lvaa_jax.alignment import knn_indices, nearest_neighbours
    from lvaa_jax.distributed import gather, on_every_process, on_process_zero
    from lvaa_jax.errors import LvaaError
    from lvaa_jax.runlock import hold_run_folder

    me, out = jax.process_index(), Path(flags.FLAGS.out)
    for case, (n, d, k, block) in KNN_CASES.items():
        similarities, ids = nearest_neighbours(knn_input(n, d), k, block_size=block)
        assert similarities.is_fully_addressable and ids.is_fully_addressable, "every process gets all of it"
        np.testing.assert_array_equal(knn_indices(knn_input(n, d), k, block_size=block), ids)
        np.savez(out / f"knn_{case}_{me}.npz", similarities=similarities, ids=ids)

    def fails_on(process, error):
        def fn():
            if jax.process_index() == process:
                raise error
            return "fine"
        return fn

    def hold():
        with hold_run_folder(flags.FLAGS.workdir):
            return "held"

    outcomes = {
        "zero_user_error": outcome(lambda: on_process_zero(fails_on(0, LvaaError("bad setting on 0")), "a")),
        "zero_bug": outcome(lambda: on_process_zero(fails_on(0, ValueError("boom")), "b")),
        "zero_result": outcome(lambda: on_process_zero(lambda: {"answer": [jax.process_index()]}, "c")),
        "every_user_error": outcome(lambda: on_every_process(fails_on(1, LvaaError("bad file on 1")), "d")),
        "gather": outcome(lambda: gather(jax.process_index() * 10, "e")),
        "hold": outcome(hold),
    }
    (out / f"outcomes_{me}.json").write_text(json.dumps(outcomes))


if __name__ == "__main__":  # flags defined here only: test_multiprocess.py imports the cases above
    flags.DEFINE_string("out", None, "Folder for the results.")
    flags.DEFINE_string("workdir", None, "A run folder to hold (give each process another to see it refused).")
    DISTRIBUTED = cli.DistributedFlags()
    cli.run(main)
