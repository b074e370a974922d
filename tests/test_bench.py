"""`python -m dcp_jax.bench`: the rows it writes, and that selection lowers the head's cost."""

import json

from dcp_jax import bench


def test_bench_rows_and_selection_saves_head_flops(tmp_path, capsys):
    code = bench.main(["--config", "configs/tiny.py", "--vocab-sizes", "40", "--thetas", "0,0.5", "--runs", "1",
                       "--selected", "5", "--config.eval.num_slots=64", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    keys = {"vocab_size", "theta", "slots", "gflops", "clip_gflops", "head_gflops", "latency_s", "params_total",
            "params_learnable", "selected", "selected_from", "xla_memory_gib"}
    assert all(keys <= set(r) for r in rows)
    full, selected = rows
    assert (full["theta"], full["slots"], selected["theta"], selected["slots"]) == (0.0, 40, 0.5, 8)  # bucket of 5
    assert selected["clip_gflops"] == full["clip_gflops"]  # the image tower does not depend on the selection
    assert selected["head_gflops"] < 0.4 * full["head_gflops"]  # 8 slots instead of 40
    assert "--selected 5" in selected["selected_from"]
    table = (tmp_path / "bench.md").read_text()
    assert "| 40 | 0.5 | 5.0 | 8 |" in table


def test_flops_count_chunked_attention_in_full(monkeypatch):
    """XLA's cost analysis counts a loop body once: the bench counts FLOPs on the programs with attention
    as one op, so CPU chunking (compute.CPU_SCORE_CHUNK_BYTES) does not hide FLOPs."""
    import jax
    import jax.numpy as jnp
    import pytest

    from dcp_jax.configs import tiny
    from dcp_jax.models import build, compute, dcp

    config = tiny.get_config()
    model = build.create_model(config)
    runner = bench.Bench(config, model, mode="whole")
    text = jnp.asarray(bench.random_text(12, dcp.num_templates(config), model.clip_dim))
    monkeypatch.setattr(compute, "CPU_SCORE_CHUNK_BYTES", 1 << 62)
    jax.clear_caches()
    (one, _), (two, _) = runner.stages(text, 8)
    plain = bench._compiled_stats(one)[0], bench._compiled_stats(two)[0]
    monkeypatch.setattr(compute, "CPU_SCORE_CHUNK_BYTES", 1)  # every attention call in chunks
    jax.clear_caches()
    stages = runner.stages(text, 8)
    assert bench._compiled_stats(stages[1][0])[0] < 0.99 * plain[1]  # what the analysis alone would say
    assert runner.gflops(text, 8, stages) == pytest.approx(plain, rel=1e-9)
    assert compute.CPU_SCORE_CHUNK_BYTES == 1  # restored
