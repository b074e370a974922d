"""Timing the PyTorch inference forward (for benchmarks against the compiled JAX path)."""

from __future__ import annotations

import contextlib
import statistics
import time

import numpy as np
import torch

from dcp_jax.torch_ref.model import TorchDCP


@contextlib.contextmanager
def forward_call(reference: TorchDCP, images, text_embeds, guidance_text=None, seen=None, *,
                 max_slots: int | None = None, bucket: bool = True, threads: int | None = None):
    """A context giving a zero-argument function that runs one `reference(images, text_embeds,
    guidance_text, seen, ...)` to completion (CUDA synchronised), for a caller that times it, e.g.
    alternately with the JAX forward so both see the same machine load (dcp_jax.bench).

    What one call includes (TorchDCP.forward, one view per image, like dcp_jax/forward.py's
    encode_select + decode on whole-mode views): pixel normalisation and the bilinear resize to the
    CLIP input size (a no-op at the crop size), the CLIP image tower with the dense / guidance-layer /
    last-attention features, DCS over the whole vocabulary, the slot bucket (`bucket`), the head (TGA
    + SED) on K slots and tag validation (when `seen` is given and model.tv.enabled).
    Excluded: the vocabulary's text embeddings and the guidance text (inputs: computed once per
    vocabulary on both sides), moving the inputs into tensors on the reference's device (done once,
    on entry), view making / combining and the final argmax to a label map.

    Inside the context torch runs under inference_mode with `threads` (torch.set_num_threads; the
    previous count is restored on exit).
    """
    device = next(reference.parameters()).device
    # np.array copies: arrays from JAX are read-only, which torch warns about
    as_tensor = lambda x, dtype: None if x is None else torch.as_tensor(np.array(x), dtype=dtype, device=device)  # noqa: E731
    images, text_embeds = as_tensor(images, torch.float32), as_tensor(text_embeds, torch.float32)
    guidance_text, seen = as_tensor(guidance_text, torch.float32), as_tensor(seen, torch.bool)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        with torch.inference_mode():
            def call():
                out = reference(images, text_embeds, guidance_text, seen, max_slots=max_slots, bucket=bucket)
                sync()
                return out

            yield call
    finally:
        torch.set_num_threads(previous)


def time_forward(reference: TorchDCP, images, text_embeds, guidance_text=None, seen=None, *,
                 max_slots: int | None = None, bucket: bool = True, runs: int = 10, warmup: int = 1,
                 threads: int | None = None) -> float:
    """Median wall-clock seconds of one forward_call (see there for what it includes) over `runs`
    calls after `warmup` untimed ones."""
    if runs < 1:
        raise ValueError(f"runs={runs}: must be >= 1")
    with forward_call(reference, images, text_embeds, guidance_text, seen, max_slots=max_slots, bucket=bucket,
                      threads=threads) as call:
        for _ in range(warmup):
            call()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return statistics.median(times)
