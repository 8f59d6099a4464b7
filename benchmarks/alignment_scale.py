"""Speed and memory of the neighbour search against faiss, of ``precision_matrix`` (M spaces, all pairs)
against references, then how far it scales.

    python -m benchmarks.alignment_scale                                   # this machine, default sizes
    python -m benchmarks.alignment_scale --sizes= --max_n=0 --knn_sizes=10000,20000 --knn_dims=384,4096
    python -m benchmarks.alignment_scale --sizes=10000 --dims=384 --repeats=2 --knn_sizes=
    python -m benchmarks.alignment_scale --sizes=20000 --dims=4096 --max_n=1000000 --device_summary  # a GPU

First the search alone against faiss, the exact search an engineer would otherwise reach for, for every
N in ``--knn_sizes`` and D in ``--knn_dims``, one space, in one process per (N, D): ours is
``knn_indices(x, k)`` on the raw rows (it normalises them inside); faiss (faiss-cpu, or faiss-gpu's
``GpuIndexFlatIP`` on a GPU) is ``IndexFlatIP`` built on the pre-normalised rows and searched for k + 1
neighbours, the row itself then dropped. Both run on every core (faiss's OpenMP threads set to
``os.cpu_count()``; XLA:CPU's pool is that size already), or on ``--knn_threads`` cores (the process
pinned to them; XLA single-threaded for 1). Times are the best of ``--knn_rounds`` interleaved rounds,
compiled (from N = 50 000 the first calls, compilation included: seconds against minutes), with
the ratio of CPU seconds beside the ratio of wall seconds
(on one core, CPU time is what a busy machine disturbs least); our first call, with compilation, is
beside them. Peak memory beyond the inputs is measured for each in turn, faiss first (the process's peak RSS is
reset in between). Then the neighbour sets are compared row by row: identical, or differing only inside a tie at
our 1e-6 rounding (two candidates whose similarities round to the same value, where we take the lower
index and faiss the higher similarity), or different (a mismatch: none is expected).

For every N and D, with M random spaces, in one run:
- ours: ``lvaa_jax.alignment.precision_matrix`` (neighbours once per space from the tiles of half of
  x x^T, then all pairs);
- floor: the bare similarity matmuls, x @ x.T once per space (jitted, same precision, no top-k);
- torch: what common public code does (the Platonic Representation Hypothesis ``mutual_knn``, with topk in
  place of its full argsort): per pair, both full N x N cosine matrices, top-k, N x N masks;
- numpy: the same definition and algorithm as ours in plain numpy (neighbours once per space, from the full
  N x N matrix rounded to 1e-6, ties to the lower index).
The last two columns are the largest difference of any precision@k from ours: against numpy it should be 0
(it is 1 / (N k), one neighbour, where float noise straddles a rounding boundary); torch does not round, so
near-ties within float noise may go either way.
All pairs do identical work, so ``--ref_pairs=P`` times the torch reference on P pairs and scales to all of
them (marked "~"). Then the tiled search alone (one space, ``knn_indices``) from N = ``--min_n``
(100 000), doubling, up to ``--max_n``, with its throughput as a fraction of the matmul floor's (and of the
GPU's fp32 peak, on a GPU). Throughputs count the full x x^T (2 N^2 D FLOPs): the search computes half
of it, so it can run above the floor.

Each measurement runs in a fresh process. Memory on CPU: the process's peak RSS (VmHWM) minus its RSS once
its framework is imported, minus the inputs' bytes. XLA's buffers count (tracemalloc would miss them), and so
do one-off costs such as compiling (~100-200 MB for ours, whatever N); inputs are made one space at a time,
so setup adds at most one space (N D 4 bytes) to the peak. On a GPU: the peak device memory in use (JAX
``memory_stats``, ``torch.cuda.max_memory_allocated``) minus the inputs' bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
PEAK_FP32_TFLOPS = {  # dense float32 (no tensor cores: the kernel asks for full float32 precision)
    "H100 80GB HBM3": 66.9, "H100 SXM": 66.9, "H100 PCIe": 51.2, "H100 NVL": 60.0, "H200": 66.9,
    "A100": 19.5, "L4": 30.3, "A10G": 31.2,
}


# ---------------------------------------------------------------------------------------- one measurement
def _status_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak so far) of this process, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _reset_peak() -> None:
    """Resets this process's peak RSS (VmHWM) to its current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _knn_vs_faiss(spec: dict) -> dict:
    """Ours and faiss on the same random space: first calls, memory, interleaved warm rounds, and the
    comparison of their neighbour sets."""
    threads = spec["threads"]
    if threads < os.cpu_count():  # before XLA starts its thread pool
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
        if threads == 1:
            os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false"
    import faiss
    import jax
    import jax.numpy as jnp

    from lvaa_jax.alignment import knn_indices

    n, d, k = spec["n"], spec["d"], spec["k"]
    faiss.omp_set_num_threads(threads)
    gpu = jax.devices()[0].platform == "gpu" and hasattr(faiss, "StandardGpuResources")
    resources = faiss.StandardGpuResources() if gpu else None
    x = np.random.default_rng(spec.get("seed", 0)).standard_normal((n, d), dtype=np.float32)
    rows = x / np.linalg.norm(x, axis=1, keepdims=True)
    on_device = jax.block_until_ready(jnp.asarray(x))

    def ours() -> np.ndarray:
        return np.asarray(knn_indices(on_device, k))

    def theirs() -> np.ndarray:
        index = faiss.GpuIndexFlatIP(resources, d) if gpu else faiss.IndexFlatIP(d)
        index.add(rows)
        _, found = index.search(rows, k + 1)
        return found

    out = {"faiss": f"faiss {faiss.__version__} ({'GpuIndexFlatIP' if gpu else 'IndexFlatIP'}, "
                    f"{faiss.omp_get_max_threads()} threads)"}
    # faiss first: memory it frees could be reused by what runs after it without raising the peak, and its
    # footprint is the smaller, so ours is the one whose peak could be understated (by at most faiss's).
    for name, run in (("faiss", theirs), ("ours", ours)):
        before = _status_bytes("VmRSS")
        _reset_peak()
        start, cpu = time.perf_counter(), time.process_time()
        result = run()
        out[f"{name}_first"] = time.perf_counter() - start
        out[f"{name}_first_cpu"] = time.process_time() - cpu
        out[f"{name}_mem"] = _status_bytes("VmHWM") - before
        if name == "ours":
            mine = result
        else:
            found = result
    for _ in range(spec["rounds"]):  # interleaved, so that a busy spell hits both; wall and CPU seconds
        for name, run in (("ours", ours), ("faiss", theirs)):
            start, cpu = time.perf_counter(), time.process_time()
            run()
            for key, value in ((f"{name}_best", time.perf_counter() - start),
                               (f"{name}_cpu", time.process_time() - cpu)):
                out[key] = min(out.get(key, value), value)
    out |= _compare_sets(rows, mine, found, k)
    return out


def _compare_sets(rows: np.ndarray, mine: np.ndarray, found: np.ndarray, k: int) -> dict:
    """Rows whose neighbour sets are identical, differ only inside a tie at the 1e-6 rounding, or differ."""
    n = len(rows)
    theirs = np.stack([row[row != i][:k] if (row == i).any() else row[:k] for i, row in enumerate(found)])
    same = (np.sort(mine, 1) == np.sort(theirs, 1)).all(1)
    ties = mismatches = 0
    for i in np.flatnonzero(~same):
        quantised = np.round(rows[i].astype(np.float64) @ rows.astype(np.float64).T * 1e6)
        quantised[i] = -np.inf
        kth = np.sort(quantised)[-k]
        differing = np.setxor1d(mine[i], theirs[i])
        if (np.abs(quantised[differing] - kth) <= 1).all():  # one quantum: float32 against float64 sums
            ties += 1
        else:
            mismatches += 1
    return {"identical": int(same.sum()), "tie_only": ties, "mismatches": mismatches, "rows": n}


def _measure(spec: dict) -> dict:
    """Runs one implementation on fresh inputs in this process; seconds, memory and the result."""
    if spec["impl"] == "knn_vs_faiss":
        return _knn_vs_faiss(spec)
    impl, n, d, m = spec["impl"], spec["n"], spec["d"], spec["m"]
    setup, make = _IMPLS[impl]
    native, on_host = setup()  # imports the framework before the baseline
    baseline = _status_bytes("VmRSS")
    rng = np.random.default_rng(0)
    spaces = [native(rng.standard_normal((n, d), dtype=np.float32)) for _ in range(m)]  # one numpy at a time
    run, device_extra = make(spaces, spec, m * n * d * 4)
    start = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - start
    host_extra = _status_bytes("VmHWM") - baseline - (m * n * d * 4 if on_host else 0)
    out = {"seconds": seconds, "rss_extra": max(host_extra, 0), "device_extra": device_extra(),
           "result": result}
    # A second call, same shapes: ours compiled; a reference on an accelerator past its lazy start (a host
    # reference has no first-call cost worth a second run).
    if spec.get("warm") and (impl.startswith("ours") or not on_host):
        start = time.perf_counter()
        run()
        out["seconds_warm"] = time.perf_counter() - start
    return out


def _jax_setup():
    import jax
    import jax.numpy as jnp

    return (lambda x: jax.block_until_ready(jnp.asarray(x))), jax.devices()[0].platform == "cpu"


def _jax_device_extra(inputs: int):
    """Peak device memory beyond the inputs, read after the run; None on CPU (RSS is used there)."""
    import jax

    device = jax.devices()[0]
    if device.platform == "cpu":
        return lambda: None
    return lambda: device.memory_stats()["peak_bytes_in_use"] - inputs


def _ours(spaces, spec: dict, inputs: int):
    from lvaa_jax.alignment import precision_matrix

    named = {f"s{i}": x for i, x in enumerate(spaces)}
    return (lambda: precision_matrix(named, spec["k"])[1].tolist()), _jax_device_extra(inputs)


def _ours_knn(spaces, spec: dict, inputs: int):
    from lvaa_jax.alignment import knn_indices

    return (lambda: np.asarray(knn_indices(spaces[0], spec["k"]))[:2].tolist()), _jax_device_extra(inputs)


def _floor(spaces, spec: dict, inputs: int):
    import jax
    import jax.numpy as jnp

    gram = jax.jit(lambda x: jnp.dot(x, x.T, precision=jax.lax.Precision.HIGHEST))
    jax.block_until_ready(gram(spaces[0]))  # compile outside the timing: one shape for all spaces

    def run():
        for x in spaces:
            jax.block_until_ready(gram(x))

    return run, _jax_device_extra(inputs)


def _torch_setup():
    import torch

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return (lambda x: torch.from_numpy(x).to(device)), device == "cpu"


def _torch(spaces, spec: dict, inputs: int):
    import torch

    k = spec["k"]
    pairs = [(a, b) for a in range(len(spaces)) for b in range(a + 1, len(spaces))]
    pairs = pairs[: spec["ref_pairs"] or len(pairs)]
    cuda = spaces[0].is_cuda
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def neighbours(x):  # PRH compute_nearest_neighbors, topk for its full argsort
        x = torch.nn.functional.normalize(x, dim=-1)
        return (x @ x.T).fill_diagonal_(-1e8).topk(k, dim=1).indices

    def mutual_knn(a, b):  # PRH mutual_knn
        knn_a, knn_b = neighbours(a), neighbours(b)
        n = knn_a.shape[0]
        rows = torch.arange(n, device=knn_a.device).unsqueeze(1)
        mask_a = torch.zeros(n, n, device=knn_a.device)
        mask_b = torch.zeros(n, n, device=knn_a.device)
        mask_a[rows, knn_a] = 1.0
        mask_b[rows, knn_b] = 1.0
        return ((mask_a * mask_b).sum(dim=1) / k).mean().item()

    def run():
        with torch.no_grad():
            out = [mutual_knn(spaces[a], spaces[b]) for a, b in pairs]
        sync()
        return out

    return run, (lambda: torch.cuda.max_memory_allocated() - inputs) if cuda else (lambda: None)


def _numpy(spaces, spec: dict, inputs: int):
    k = spec["k"]
    def neighbours(x):  # our definition: similarities rounded to 1e-6, ties to the lower index
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        sims = x @ x.T
        n, top = x.shape[0], []
        for start in range(0, n, 1024):  # integer sort keys for 1024 rows at a time, not N x N int64
            rows = np.round(sims[start : start + 1024] * 1e6).astype(np.int64)
            key = rows * (1 << 21) - np.arange(n)  # larger first, then lower index; exact for N < 2^21
            key[np.arange(len(key)), np.arange(start, start + len(key))] = -(1 << 62)
            top.append(np.argpartition(-key, k, axis=1)[:, :k])
        return np.concatenate(top)

    def run():
        sets = [neighbours(x) for x in spaces]
        n = sets[0].shape[0]
        return [[float((a[:, :, None] == b[:, None, :]).sum()) / (n * k) for b in sets] for a in sets]

    return run, lambda: None


_IMPLS = {  # name: (setup returning (numpy -> native array, inputs live in host memory), make)
    "ours": (_jax_setup, _ours),
    "ours_knn": (_jax_setup, _ours_knn),
    "floor": (_jax_setup, _floor),
    "torch": (_torch_setup, _torch),
    "numpy": (lambda: ((lambda x: x), True), _numpy),
}


# ---------------------------------------------------------------------------------------- the driver
def measure(spec: dict, timeout: float) -> dict | None:
    """``_measure`` in a fresh process (its own peak memory); None when it failed or ran out of time."""
    try:
        command = [sys.executable, "-m", "benchmarks.alignment_scale", "--child", json.dumps(spec)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        print(f"  {spec['impl']}: over {timeout:.0f} s, skipped", flush=True)
        return None
    if done.returncode != 0:
        print(f"  {spec['impl']} failed: {done.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.0f} MiB"


def _mem(r: dict) -> float:
    return r["device_extra"] if r.get("device_extra") is not None else r["rss_extra"]


def device_summary() -> tuple[str, float | None]:
    import jax

    device = jax.devices()[0]
    kind = device.device_kind
    peak = next((v for name, v in PEAK_FP32_TFLOPS.items() if name.lower() in kind.lower()), None)
    print(f"devices: {jax.devices()}; kind {kind!r}; jax {jax.__version__}")
    stats = device.memory_stats()
    if stats:
        print(f"memory: {stats.get('bytes_limit', 0) / 2**30:.1f} GiB; peak fp32 {peak or '?'} TFLOP/s")
    try:
        import torch

        where = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"torch {torch.__version__}: the reference runs on {where}")
    except ImportError:
        print("torch is not installed: no torch reference")
    return device.platform, peak


HEADER = (f"{'N':>7} {'D':>5} | {'ours':>7} {'warm':>7} {'mem':>9} | {'floor':>7} {'ours/fl':>7} | "
          f"{'torch':>8} {'x':>6} {'mem':>10} | {'numpy':>7} {'x':>5} {'mem':>10} | {'d numpy':>8} {'d torch':>8}")


def compare(n: int, d: int, args: flags.FlagValues, refs: list[str], peak: float | None) -> float | None:
    """One row of the comparison (M spaces of N x D); returns the floor's matmul FLOP/s."""
    pairs = args.spaces * (args.spaces - 1) // 2
    warm = n <= args.warm_max_n
    spec = {"n": n, "d": d, "m": args.spaces, "k": args.k, "ref_pairs": args.ref_pairs}
    ours = measure(spec | {"impl": "ours", "warm": warm}, args.timeout_s)
    floor = measure(spec | {"impl": "floor"}, args.timeout_s)
    got = {r: measure(spec | {"impl": r, "warm": warm}, args.timeout_s) for r in refs}
    if ours is None:
        return None
    t = ours.get("seconds_warm", ours["seconds"])
    row = f"{n:>7} {d:>5} | {ours['seconds']:>7.2f} {t:>7.2f} {_mib(_mem(ours)):>9} | "
    row += f"{floor['seconds']:>7.2f} {t / floor['seconds']:>7.2f} | " if floor else f"{'-':>7} {'-':>7} | "
    mine, diff = np.asarray(ours["result"]), {}
    if tr := got.get("torch"):
        done = len(tr["result"])
        total = tr.get("seconds_warm", tr["seconds"]) * pairs / done
        mark = "" if done == pairs else "~"
        row += f"{mark + format(total, '.1f'):>8} {total / t:>5.1f}x {_mib(_mem(tr)):>10} | "
        diff["torch"] = float(np.abs(mine[np.triu_indices(args.spaces, 1)][:done] - tr["result"]).max())
    else:
        row += f"{'-':>8} {'-':>6} {'-':>10} | "
    if npy := got.get("numpy"):
        row += f"{npy['seconds']:>7.2f} {npy['seconds'] / t:>4.1f}x {_mib(_mem(npy)):>10} | "
        diff["numpy"] = float(np.abs(mine - np.asarray(npy["result"])).max())
    else:
        row += f"{'-':>7} {'-':>5} {'-':>10} | "
    row += " ".join(f"{diff[r]:>8.1e}" if r in diff else f"{'-':>8}" for r in ("numpy", "torch"))
    print(row, flush=True)
    if not floor:
        return None
    flops = args.spaces * 2 * n * n * d
    if peak:
        tflops = flops / t / 1e12
        print(f"{'':>15} ours {tflops:.1f} TFLOP/s = {tflops / peak:.0%} of the {peak} TFLOP/s fp32 peak; "
              f"floor {flops / floor['seconds'] / 1e12 / peak:.0%}", flush=True)
    return flops / floor["seconds"]


def against_faiss(args: flags.FlagValues) -> None:
    """The search alone, ours against faiss, every N of --knn_sizes and D of --knn_dims (see the top)."""
    threads = args.knn_threads or os.cpu_count()
    print(f"\nNeighbour search, one space, k = {args.k}, {threads} of {os.cpu_count()} cores: ours (knn_indices) "
          "against faiss's exact search; seconds (best of interleaved rounds, compiled), first call, peak memory "
          "beyond the inputs; 'cpu': the ratio of CPU seconds (best rounds), which a busy machine moves less")
    print(f"{'N':>7} {'D':>5} | {'ours':>7} {'1st call':>8} {'mem':>9} | {'faiss':>7} {'mem':>9} | "
          f"{'faiss/ours':>10} {'cpu':>6} | {'identical':>9} {'ties':>5} {'mismatch':>8}")
    header = None
    for n in (int(v) for v in args.knn_sizes.split(",") if v):
        for d in map(int, args.knn_dims.split(",")):
            rounds = args.knn_rounds if n < 50_000 else 0
            r = measure({"impl": "knn_vs_faiss", "n": n, "d": d, "k": args.k, "rounds": rounds,
                         "threads": threads}, args.timeout_s)
            if r is None:
                continue
            if header != r["faiss"]:
                header = r["faiss"]
                print(f"  ({header})")
            ours, theirs = r.get("ours_best", r["ours_first"]), r.get("faiss_best", r["faiss_first"])
            cpu = r.get("faiss_cpu", r["faiss_first_cpu"]) / r.get("ours_cpu", r["ours_first_cpu"])
            print(f"{n:>7} {d:>5} | {ours:>7.2f} {r['ours_first']:>8.2f} {_mib(r['ours_mem']):>9} | "
                  f"{theirs:>7.2f} {_mib(r['faiss_mem']):>9} | {theirs / ours:>9.2f}x "
                  f"{cpu:>5.2f}x | "
                  f"{r['identical'] / r['rows']:>9.2%} {r['tie_only']:>5} {r['mismatches']:>8}", flush=True)


def scaling(args: flags.FlagValues, floor_rate: float | None, peak: float | None) -> None:
    """The tiled search alone on one space, N doubling from --min_n to --max_n."""
    d = args.scale_dim
    print(f"\nTiled kNN alone, one space, D = {d}, k = {args.k}; GFLOP/s of the full x x^T (warm where timed)")
    print(f"{'N':>9} | {'seconds':>8} {'warm':>8} {'mem':>10} {'mem/N':>9} | {'GFLOP/s':>8} {'of floor':>8} "
          f"{'of peak':>7}")
    sizes = [args.min_n * 2**i for i in range(64) if args.min_n * 2**i < args.max_n] + [args.max_n]
    for n in sizes:
        r = measure({"impl": "ours_knn", "n": n, "d": d, "m": 1, "k": args.k, "warm": n <= args.warm_max_n},
                    args.timeout_s)
        if r is None:
            return
        warm = f"{r['seconds_warm']:>8.1f}" if "seconds_warm" in r else f"{'-':>8}"
        rate = 2 * n * n * d / r.get("seconds_warm", r["seconds"])
        of_floor = f"{rate / floor_rate:.0%}" if floor_rate else "-"
        of_peak = f"{rate / 1e12 / peak:.0%}" if peak else "-"
        print(f"{n:>9} | {r['seconds']:>8.1f} {warm} {_mib(_mem(r)):>10} {_mem(r) / n:>7.0f} B | {rate / 1e9:>8.1f} "
              f"{of_floor:>8} {of_peak:>7}", flush=True)


flags.DEFINE_string("knn_sizes", "10000,20000", "N values of the search against faiss ('': none).")
flags.DEFINE_string("knn_dims", "384,4096", "D values of the search against faiss.")
flags.DEFINE_integer("knn_rounds", 3, "Interleaved rounds of the search against faiss below N = 50 000 (above, "
                     "the first calls, compilation included).")
flags.DEFINE_integer("knn_threads", 0, "Cores for the search against faiss (0: all; fewer pins the process).")
flags.DEFINE_string("sizes", "2000,10000,20000", "N values of the comparison ('': none).")
flags.DEFINE_string("dims", "384,4096", "D values of the comparison.")
flags.DEFINE_integer("spaces", 8, "M, spaces compared pairwise.")
flags.DEFINE_integer("k", 15, "Neighbours per instruction.")
flags.DEFINE_integer("ref_pairs", 3, "Pairs the torch reference runs (0: all).")
flags.DEFINE_string("refs", "torch,numpy", "References to run (comma-separated, or none).")
flags.DEFINE_integer("repeats", 1, "Repeat the whole comparison (noisy machines).")
flags.DEFINE_integer("warm_max_n", 10000, "Up to this N, time ours (and a reference on an accelerator) a second time, warm.")
flags.DEFINE_integer("min_n", 100000, "First N of the scaling run (then doubled).")
flags.DEFINE_integer("max_n", 200000, "Largest N of the scaling run (0: none).")
flags.DEFINE_integer("scale_dim", 384, "D of the scaling run.")
flags.DEFINE_float("peak_tflops", 0, "GPU peak fp32 TFLOP/s (default: known).")
flags.DEFINE_bool("device_summary", False, "Print the devices and their peak.")
flags.DEFINE_float("timeout_s", 3600, "Seconds per measurement.")
flags.DEFINE_string("child", None, "Internal: one measurement, as JSON.")


def main(_) -> None:
    args = flags.FLAGS
    if args.child:
        print(json.dumps(_measure(json.loads(args.child))))
        return

    platform, peak = device_summary() if args.device_summary else ("cpu", None)
    peak = (args.peak_tflops or peak) if platform != "cpu" else None
    refs = [r for r in args.refs.split(",") if r in ("torch", "numpy")]
    if args.knn_sizes:
        against_faiss(args)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    floor_rate = {}  # D -> matmul FLOP/s of the floor at the largest N
    if sizes:
        print(f"M = {args.spaces} spaces, k = {args.k}; seconds, and memory beyond the runtime and the inputs")
    for _ in range(args.repeats if sizes else 0):
        print(HEADER)
        for n in sizes:
            for d in map(int, args.dims.split(",")):
                floor_rate[d] = compare(n, d, args, refs, peak) or floor_rate.get(d)
    if sizes:
        print("'warm': a second call on the same shapes, compiled (ratios use it when measured). 'x': reference "
              "time / ours. '~': torch timed on --ref_pairs pairs, scaled to all.")
    if args.max_n:
        scaling(args, floor_rate.get(args.scale_dim), peak)


if __name__ == "__main__":
    app.run(main)
