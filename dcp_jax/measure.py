"""How dcp_jax measures cost: XLA's cost and memory analysis of compiled programs, the device's own peak,
median timing on a drifting machine, random stand-in text, and the two inference stages of one model.

`Bench(config, model, mode=...)` compiles the inference stages of dcp_jax/forward.py for a slot bucket K and
reports their GFLOPs, memory and latency (`head_gflops` for the head alone). dcp_jax/bench.py (the tables),
dcp_jax/accelerator.py (the accelerator check and memory plans), `ablate` and the web page all measure with it.

`profile_trace(DIR)` / `profile_runs(fn, DIR, ...)`: the jax.profiler traces of `--profile DIR` (train and bench),
readable by TensorBoard's profile plugin and by Perfetto.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import statistics
import time
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dcp_jax import forward, inference
from dcp_jax import config as config_lib
from dcp_jax.models import compute, dcp, selection

GIB = 2**30
PROFILE_STEPS = 3  # steps (train) or runs (bench) traced by default: a steady state to look at, small files
PERFETTO_FILE = "perfetto_trace.json.gz"  # jax writes it beside HOST.xplane.pb: HOST.trace.json.gz less its metadata


def median_seconds(fn, runs: int, other=None) -> float | tuple[float, float]:
    """Median seconds of `fn()` over `runs` runs after a warm-up. With `other` (a second function),
    the two run alternately, one of each per round, and both medians come back: on a shared machine
    whose speed drifts by tens of percent over minutes, both see the same load."""
    fns = [fn] if other is None else [fn, other]
    for f in fns:
        jax.block_until_ready(f())  # warm-up (and compile)
    times = [[] for _ in fns]
    for _ in range(runs):
        for f, spent in zip(fns, times):
            start = time.perf_counter()
            jax.block_until_ready(f())
            spent.append(time.perf_counter() - start)
    medians = [statistics.median(t) for t in times]
    return medians[0] if other is None else tuple(medians)


def median_step_and_host_seconds(fn, runs: int) -> tuple[float, float]:
    """(median seconds of `fn()` until its results are ready, median seconds until `fn()` returned) over `runs`
    runs after a warm-up. jax runs programs asynchronously, so the second is the host's part of a step
    (flattening the arguments, dispatch); where it nears the first, the host and not the device sets the pace."""
    jax.block_until_ready(fn())  # warm-up (and compile)
    steps, host = [], []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn()
        host.append(time.perf_counter() - start)
        jax.block_until_ready(out)
        steps.append(time.perf_counter() - start)
    return statistics.median(steps), statistics.median(host)


def compiled_stats(compiled) -> tuple[float, float]:
    """(GFLOPs, XLA memory in GiB: arguments + outputs + temporaries) of a compiled program."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    memory = compiled.memory_analysis()
    used = 0.0
    if memory is not None:
        used = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                - memory.alias_size_in_bytes) / GIB
    return float(cost.get("flops", 0.0)) / 1e9, used


def device_peak_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats()
    return stats["peak_bytes_in_use"] / GIB if stats and "peak_bytes_in_use" in stats else None


def random_text(num_classes: int, num_templates: int, dim: int, seed: int = 0) -> np.ndarray:
    t = np.random.default_rng(seed).standard_normal((num_classes, num_templates, dim)).astype(np.float32)
    return t / np.linalg.norm(t, axis=-1, keepdims=True)


TOKENS_PER_PROMPT = 16  # random stand-in prompts for the step's text re-encoding (CLIP prompts: ~8-20 tokens)


def random_text_tokens(config, vocab_size: int, num_classes: int, seed: int = 0) -> tuple:
    """(guidance_tokens, cost_tokens) for a train step of `config`, random ids of TOKENS_PER_PROMPT tokens:
    what the step re-encodes (a learnt context or clip.text_finetune) costs what real prompts of that length
    cost. None where the config re-encodes nothing. `vocab_size`: the model's (model.clip.config.text), not
    the config's, whose clip.checkpoint may be "toy:", which names no architecture."""
    rng = np.random.default_rng(seed)

    def tokens(*shape):
        ids = rng.integers(1, vocab_size - 2, (*shape, TOKENS_PER_PROMPT), dtype=np.int32)
        ids[..., -1] = vocab_size - 1  # the end token, where CLIP pools (the largest id)
        return jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32)

    guidance = tokens(num_classes) if dcp.reencodes_text(config) else None
    cost = tokens(num_classes, dcp.num_templates(config)) if config_lib.text_finetune(config) == "cost" else None
    return guidance, cost


class Bench:
    """The model, its two compiled stages and the inputs of one image's views."""

    def __init__(self, config, model, *, mode: str, seed: int = 0):
        self.graphdef, self.params = nnx.split(model)
        self.model = model
        self.views_per_image = inference.num_views(mode, crop=int(config.train.crop_size),
                                                   stride=int(config.eval.slide_stride),
                                                   canvas=int(config.eval.slide_canvas))
        crop = int(config.train.crop_size)
        rng = np.random.default_rng(seed)
        self.views = jnp.asarray(rng.uniform(0, 255, (self.views_per_image, crop, crop, 3)).astype(np.float32))

    def stages(self, text: jax.Array, slots: int):
        """Compiled stage 1 and stage 2 for this vocabulary and K, with their arguments."""
        c = text.shape[0]
        bar = selection.mean_text_embedding(text)
        seen = jnp.ones(c, bool)
        one = forward.encode_select.lower(self.graphdef, self.params, self.views, text,
                                          views_per_image=self.views_per_image, max_slots=c).compile()
        features, ranked = one(self.params, self.views, text)
        # Slots 0..K-1 valid: the cost of decoding K classes does not depend on which they are.
        slot_class = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (1, c))
        slot_valid = jnp.arange(c)[None] < slots
        args = (features, text, bar, slot_class, slot_valid, seen)
        two = forward.decode.lower(self.graphdef, self.params, *args, views_per_image=self.views_per_image,
                                   num_slots=slots).compile()
        return (one, (self.params, self.views, text)), (two, (self.params, *args))

    def gflops(self, text: jax.Array, slots: int, stages=None) -> tuple[float, float]:
        """(CLIP, head) GFLOPs of the two compiled stages at K = slots, counted on the programs with
        loops unrolled (compute.for_cost_analysis: the cost analysis counts a loop once); `stages`:
        the arguments from `stages(text, slots)`, if at hand."""
        (one, args_one), (two, args_two) = stages or self.stages(text, slots)
        if not has_loops(self.model):  # the programs at hand are the ones to count
            return compiled_stats(one)[0], compiled_stats(two)[0]
        with compute.for_cost_analysis():
            one = forward.encode_select.lower(self.graphdef, *args_one, views_per_image=self.views_per_image,
                                              max_slots=text.shape[0]).compile()
            two = forward.decode.lower(self.graphdef, *args_two, views_per_image=self.views_per_image,
                                       num_slots=slots).compile()
        return compiled_stats(one)[0], compiled_stats(two)[0]

    def head_gflops(self, text: jax.Array, slots: int) -> float:
        """GFLOPs of the compiled head (stage 2) at K = slots."""
        return self.gflops(text, slots)[1]

    def row(self, text: jax.Array, slots: int, runs: int, other=None, *, profile: str | os.PathLike | None = None,
            profile_steps: int = PROFILE_STEPS) -> dict:
        """One bench row at K = slots. `other(xla_memory_gib)`: None, or a function to time alternately
        with the JAX forward (the PyTorch reference), whose median becomes `torch_latency_s`. `profile`: a folder
        for a trace of `profile_steps` more runs of the JAX forward, after the timing (`profile` in the row)."""
        stages = (one, args_one), (two, args_two) = self.stages(text, slots)
        clip_gflops, head_gflops = self.gflops(text, slots, stages)
        memory = max(compiled_stats(one)[1], compiled_stats(two)[1])  # of the programs that run
        row = {"slots": slots, "gflops": clip_gflops + head_gflops, "clip_gflops": clip_gflops,
               "head_gflops": head_gflops, "latency_s": None, "xla_memory_gib": memory}
        if not too_big_to_run(memory):
            forward = lambda: (one(*args_one), two(*args_two))  # noqa: E731
            with (other(memory) if other else contextlib.nullcontext()) as call:
                if call is None:
                    row["latency_s"] = median_seconds(forward, runs)
                else:
                    row["latency_s"], row["torch_latency_s"] = median_seconds(forward, runs, call)
            if profile:  # after the timing, which the profiler would slow
                row["profile"] = str(profile_runs(forward, profile, profile_steps, name="forward").perfetto)
        return {**row, "device_peak_gib": device_peak_gib()}



def has_loops(model) -> bool:
    """Whether the model's programs hold loops that XLA's cost analysis would count once: attention in
    CPU chunks, the scanned CLIP blocks."""
    return compute.chunks_attention() or model.clip.vision_model.encoder.scan_layers


def too_big_to_run(memory_gib: float) -> bool:
    """Whether a CPU program would need more than 80 % of this machine's memory (it would swap or be killed):
    such rows report what XLA planned and are not run."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return jax.devices()[0].platform == "cpu" and memory_gib * GIB > 0.8 * physical


# ---------------------------------------------------------------------------------------------
# Profiling (`--profile DIR` of train and bench)
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trace:
    """One jax.profiler trace: `directory`, what `tensorboard --logdir` takes, and, once the trace has stopped,
    `folder`, the run jax wrote there: DIR/plugins/profile/<YYYY_MM_DD_HH_MM_SS>/ with HOST.xplane.pb (what
    TensorBoard's profile plugin reads), HOST.trace.json.gz and perfetto_trace.json.gz (for ui.perfetto.dev)."""
    directory: Path
    folder: Path | None = None

    @property
    def perfetto(self) -> Path | None:
        return None if self.folder is None else self.folder / PERFETTO_FILE


@contextlib.contextmanager
def profile_trace(directory: str | os.PathLike) -> Iterator[Trace]:
    """A jax.profiler trace of the block into `directory` (created), with the Perfetto file. Only one trace can
    run at a time in a process. The trace is stopped (and written) when the block ends, also on an error,
    whose traceback is then the one shown."""
    directory = Path(directory).expanduser().absolute()
    directory.mkdir(parents=True, exist_ok=True)
    runs = directory / "plugins" / "profile"
    before = set(runs.iterdir()) if runs.is_dir() else set()
    trace = Trace(directory)
    jax.profiler.start_trace(directory, create_perfetto_trace=True)
    try:
        yield trace
    except BaseException:
        with contextlib.suppress(Exception):
            jax.profiler.stop_trace()
        raise
    jax.profiler.stop_trace()
    # jax names a run by the second it stopped: a second trace into DIR within that second reuses the folder
    new = [p for p in runs.iterdir() if p not in before]
    trace.folder = max(new or runs.iterdir(), key=os.path.getmtime)


def profile_runs(fn, directory: str | os.PathLike, runs: int = PROFILE_STEPS, *, name: str) -> Trace:
    """A trace of `runs` calls of `fn()`, each waited for and marked as step i of `name`
    (jax.profiler.StepTraceAnnotation, by which TensorBoard's profile plugin splits a trace into steps). Call it
    with `fn` compiled and warm (after its timing): the trace then holds steady-state runs only."""
    with profile_trace(directory) as trace:
        for i in range(runs):
            with jax.profiler.StepTraceAnnotation(name, step_num=i):
                jax.block_until_ready(fn())
    return trace


def folder_name(text: str) -> str:
    """A row's or case's name as a folder name: letters, digits, '.' and '-' kept, each run of other characters
    one '_' ("B/16 train K=32" -> "B_16_train_K_32")."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "trace"


def profile_note(directory: str | os.PathLike, perfetto: list, what: str) -> str:
    """The lines printed after a --profile run: where its traces are (`perfetto`: their Perfetto files; `what`:
    what they hold) and the two ways to open them."""
    directory = Path(directory).expanduser().absolute()
    if not perfetto:
        return f"profile: nothing was traced into {directory} ({what})"
    more = f" (one per folder, {len(perfetto)} in all)" if len(perfetto) > 1 else ""
    return "\n".join([
        f"profile: {len(perfetto)} trace(s) of {what} in {directory}",
        f"  TensorBoard: tensorboard --logdir {directory}  (pip install tensorboard tensorboard-plugin-profile; "
        "the PROFILE tab)",
        f"  Perfetto: open https://ui.perfetto.dev and load {perfetto[0]}{more}"])
