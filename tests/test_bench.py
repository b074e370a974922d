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
