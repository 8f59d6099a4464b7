"""Training throughput of the jitted BC step against the same architecture in eager PyTorch.

    python -m benchmarks.train_throughput                 # this machine's default device
    python -m benchmarks.train_throughput --sharding_check # also 1 vs 8 forced CPU devices
    python -m benchmarks.train_throughput --pathways       # also each pathway's forward+backward alone

Both sides train the model of configs/default.py (or configs/paper.py with --model=paper) (same widths,
layers, heads, parameter count) on the same batches of real demo windows, packed into rows as the config
says, with AdamW and gradient clipping; samples are rows of ``context`` steps, and real steps/s counts
the steps that are not padding. On a GPU, model FLOPs utilisation is the compiled step's FLOPs per second over
the bf16 matmul rate measured in the same run.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks.timing import interleaved_best_seconds
from configs.default import get_config
from configs.paper import get_config as paper_config
from lvaa_jax.agent.model import Agent
from lvaa_jax.agent.train import (
    build_agent,
    create_state,
    init_params,
    make_mesh,
    make_train_step,
    shard_batch,
)
from lvaa_jax.babyai import WindowBatches, make_demos
from lvaa_jax.cli import restart_on_huge_pages

MODEL = flags.DEFINE_enum("model", "default", ["default", "paper"], "Model and batch of configs/<model>.py.")
STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per round (after warm-up).")
ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds per side, JAX and PyTorch alternating; the fastest counts.")
BATCH = flags.DEFINE_integer("batch_size", 0, "Rows per step (0: the config's).")
PACK = flags.DEFINE_integer("windows_per_row", 0, "Windows packed per row (0: the config's).")
DTYPE = flags.DEFINE_string("dtype", "float32", "JAX activation dtype: float32 or bfloat16.")
TORCH = flags.DEFINE_bool("torch", True, "Measure the PyTorch reference too.")
PATHWAYS = flags.DEFINE_bool("pathways", False, "Also time each pathway's forward+backward alone, JAX vs PyTorch.")
SHARDING = flags.DEFINE_bool("sharding_check", False, "Compare the step on 1 vs 8 forced CPU devices.")
SHARDING_CHILD = flags.DEFINE_bool("sharding_child", False, "Internal: run the 1-vs-8 comparison here.")


def demo_batches(config, workdir):
    config.data.episodes_per_level = max(200, config.train.batch_size)  # at least one batch of windows
    config.data.num_workers = 0
    config.data.census_resets = 0
    dataset = make_demos(config, workdir, progress=False)
    return dataset, WindowBatches(dataset, config.train.batch_size, config.model.context, seed=0,
                                  windows_per_row=config.train.windows_per_row)


def jax_runner(config, dataset, timed):
    """run(count) for the jitted step on the ``timed`` batches in turn, warmed up; its compiled FLOPs; its
    parameter count."""
    model = build_agent(config, dataset)
    mesh = make_mesh()
    state = create_state(model, config, mesh)
    step = make_train_step(model, mesh, config.seed)
    data = [shard_batch(batch, mesh) for batch in timed]
    step = step.lower(state, data[0]).compile()  # compiled once: it runs the steps and counts their FLOPs
    flops = (step.cost_analysis() or {}).get("flops", float("nan"))

    def run(count):
        nonlocal state
        for i in range(count):
            state, metrics = step(state, data[i % len(data)])
        jax.block_until_ready(metrics)

    run(3)  # warm-up
    return run, flops, sum(x.size for x in jax.tree.leaves(state.params))


def torch_device(config):
    """The PyTorch reference's device (CUDA where there is one) and autocast dtype (None: float32)."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, torch.bfloat16 if config.model.dtype == "bfloat16" else None


def torch_runner(config, dataset, timed):
    """run(count) for the eager PyTorch step on the ``timed`` batches in turn, warmed up; its parameter count."""
    import torch

    from benchmarks.torch_agent import TorchAgent, torch_step

    device, autocast = torch_device(config)
    torch.manual_seed(0)
    model = TorchAgent(config.model, dataset.tokenizer.size, dataset.max_instruction_length).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.train.learning_rate,
                                  weight_decay=config.train.weight_decay)
    data = [{k: torch.from_numpy(np.asarray(v)).to(device) for k, v in batch.items()} for batch in timed]

    def run(count):
        for i in range(count):
            loss = torch_step(model, optimizer, data[i % len(data)], config.train.grad_clip, autocast)
        float(loss)  # waits for the device

    run(3)  # warm-up
    return run, sum(p.numel() for p in model.parameters())


def pathway_runners(config, dataset, batch) -> tuple[dict[str, dict[str, object]], dict[str, float]]:
    """{pathway: {"PyTorch": run(count), "JAX": run(count)}}, and the JAX side's compiled FLOPs per pathway.

    Forward and backward (of the sum of squared outputs) of each pathway alone, on the instructions,
    observations and packing of ``batch``, the same random step and instruction vectors on both sides, no
    optimiser update: says where in the step one framework gains on the other."""
    import torch

    from benchmarks.torch_agent import TorchAgent

    model = build_agent(config, dataset)
    params = init_params(model, config.seed)
    device, autocast = torch_device(config)
    torch.manual_seed(0)
    reference = TorchAgent(config.model, dataset.tokenizer.size, dataset.max_instruction_length).to(device)
    length = batch["tokens"].shape[-1]
    used = batch["token_mask"].reshape(-1, length).any(-1)  # the instruction slots the step encodes
    rng = np.random.default_rng(0)
    steps, z = (rng.standard_normal((*batch["segment"].shape, model.width), np.float32) for _ in range(2))
    inputs = {"tokens": batch["tokens"].reshape(-1, length)[used],
              "token_mask": batch["token_mask"].reshape(-1, length)[used], "image": batch["image"],
              "direction": batch["direction"], "segment": batch["segment"], "position": batch["position"],
              "steps": steps, "z": z}
    t = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in inputs.items()}
    jax_pathways = {
        "instruction encoder": lambda p: model.apply(
            {"params": p}, inputs["tokens"], inputs["token_mask"], method=Agent.embed_instruction)[-1],
        "observation encoder": lambda p: model.apply(
            {"params": p}, inputs["image"], inputs["direction"], z, method=Agent.observe),
        "memory and head": lambda p: model.apply(
            {"params": p}, steps, z, inputs["segment"], inputs["position"], method=Agent.act),
    }
    torch_pathways = {
        "instruction encoder": lambda: reference.embed_instruction(t["tokens"].long(), t["token_mask"]),
        "observation encoder": lambda: reference.observation(t["image"], t["direction"], t["z"]),
        "memory and head": lambda: reference.act(t["steps"], t["z"], t["segment"].long(), t["position"].long()),
    }

    compiled = {name: jax.jit(jax.grad(lambda p, f=f: (f(p) ** 2).sum())).lower(params).compile()
                for name, f in jax_pathways.items()}

    def jax_run(grad):
        def run(count):
            for _ in range(count):
                out = grad(params)
            jax.block_until_ready(out)
        return run

    def torch_run(pathway):
        def run(count):
            for _ in range(count):
                reference.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                    out = pathway()
                loss = (out.float() ** 2).sum()
                loss.backward()
            float(loss.detach())  # waits for the device
        return run

    runners = {name: {"PyTorch": torch_run(torch_pathways[name]), "JAX": jax_run(compiled[name])}
               for name in jax_pathways}
    for pair in runners.values():
        for run in pair.values():
            run(2)  # warm-up
    return runners, {name: (c.cost_analysis() or {}).get("flops", float("nan")) for name, c in compiled.items()}


def matmul_rate(dtype, m: int = 8192, k: int = 8192, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an [m, k] x [k, n] matmul on the default device, best of three timings of ``repeats``
    calls. The 8192^3 default is the ceiling MFU is measured against."""
    a = jax.random.normal(jax.random.key(0), (m, k), dtype)
    b = jax.random.normal(jax.random.key(1), (k, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            out = f(a, b)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n * repeats / best


def sharding_child():
    """Runs in a subprocess with 8 forced CPU devices: three steps on 1 device vs on all 8."""
    config = get_config()
    with tempfile.TemporaryDirectory() as workdir:
        dataset, batches = demo_batches(config, workdir)
        model = build_agent(config, dataset)
        out = {}
        for name, devices in (("1 device", jax.devices()[:1]), ("8 devices", jax.devices())):
            mesh = make_mesh(devices)
            state, step = create_state(model, config, mesh), make_train_step(model, mesh, config.seed)
            step(state, shard_batch(batches.batch_at(0), mesh))  # compile (the state above is donated)
            state = create_state(model, config, mesh)
            start = time.perf_counter()
            for i in range(3):
                state, metrics = step(state, shard_batch(batches.batch_at(i), mesh))
            jax.block_until_ready(metrics)
            out[name] = {"seconds_per_step": (time.perf_counter() - start) / 3, "loss": float(metrics["loss"]),
                         "params": jax.device_get(state.params)}
        diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                                out["1 device"]["params"], out["8 devices"]["params"])))
        print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "params"} for k, v in out.items()}
                         | {"max_param_difference": diff}))


def main(_):
    if SHARDING_CHILD.value:
        return sharding_child()
    config = get_config() if MODEL.value == "default" else paper_config()
    config.model.dtype = DTYPE.value
    if BATCH.value:
        config.train.batch_size = BATCH.value
    if PACK.value:
        config.train.windows_per_row = PACK.value
    backend = jax.default_backend()
    with tempfile.TemporaryDirectory() as workdir:
        dataset, batches = demo_batches(config, workdir)
        timed = [batches.batch_at(i) for i in range(4)]  # both sides step through the same four batches
        contenders = {}  # name: (run(count), parameter count); the first is the reference
        if TORCH.value:
            contenders["PyTorch eager (ref)"] = torch_runner(config, dataset, timed)
        run_jax, flops, jax_params = jax_runner(config, dataset, timed)
        contenders["JAX jitted step"] = (run_jax, jax_params)
        steps = STEPS.value
        best = interleaved_best_seconds({name: lambda run=run: run(steps) for name, (run, _) in contenders.items()},
                                        ROUNDS.value)
        per_step = {name: seconds / steps for name, seconds in best.items()}
        jax_s, reference = per_step["JAX jitted step"], next(iter(per_step.values()))
        b = config.train.batch_size
        real = np.mean([batch["mask"].sum() for batch in timed])
        print(f"device: {jax.devices()[0].device_kind} ({backend}), batch {b} rows x {config.model.context} steps, "
              f"at most {config.train.windows_per_row} window(s) per row, {real / (b * config.model.context):.0%} real steps")
        print(f"{'':24s} {'params':>9s} {'ms/step':>8s} {'samples/s':>10s} {'real steps/s':>13s} {'ratio':>6s}")
        for name, (_, count) in contenders.items():
            t = per_step[name]
            print(f"{name:24s} {count:9d} {t * 1e3:8.1f} {b / t:10.1f} {real / t:13.0f} {reference / t:5.2f}x")
        print(f"compiled step: {flops / 1e9:.1f} GFLOP, {flops / jax_s / 1e12:.3f} TFLOP/s")
        if backend == "gpu":
            peak = matmul_rate(jnp.bfloat16 if DTYPE.value == "bfloat16" else jnp.float32)
            print(f"model FLOPs utilisation: {flops / jax_s / peak:.1%} of the {peak / 1e12:.0f} TFLOP/s "
                  f"{DTYPE.value} 8192^3 matmul measured here")
        if PATHWAYS.value:
            print("each pathway alone, forward + backward (ms):")
            runners, pathway_flops = pathway_runners(config, dataset, timed[0])
            tokens, width = b * config.model.context, config.model.width
            hidden = width * config.model.mlp_ratio
            ceiling = matmul_rate(jnp.dtype(DTYPE.value), tokens, width, hidden, repeats=100)
            print(f"  (a step MLP's [{tokens}, {width}] x [{width}, {hidden}] {DTYPE.value} matmul alone: "
                  f"{ceiling / 1e9:.0f} GFLOP/s)")
            for name, pair in runners.items():
                best = interleaved_best_seconds({side: lambda run=run: run(steps) for side, run in pair.items()},
                                                ROUNDS.value)
                torch_ms, jax_ms = (best[side] / steps * 1e3 for side in ("PyTorch", "JAX"))
                print(f"  {name:20s} PyTorch {torch_ms:6.1f}  JAX {jax_ms:6.1f}  {torch_ms / jax_ms:5.2f}x   "
                      f"JAX {pathway_flops[name] / 1e9:.2f} GFLOP at {pathway_flops[name] / jax_ms / 1e6:.0f} GFLOP/s")
    if SHARDING.value:
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
        result = subprocess.run([sys.executable, "-m", "benchmarks.train_throughput", "--sharding_child"], env=env, capture_output=True,
                                text=True, check=True)
        print("1 vs 8 forced CPU devices (sharding correctness, not speed):", result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    restart_on_huge_pages()  # as the training scripts do
    app.run(main)
