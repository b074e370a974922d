"""`python -m dcp_jax.bench`: the rows it writes, and that selection lowers the head's cost."""

import json

import pytest

from conftest import xla_flags
from dcp_jax import bench, measure


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


def test_flops_count_chunked_attention_and_scanned_blocks_in_full(monkeypatch):
    """XLA's cost analysis counts a loop body once: the bench counts FLOPs on the programs traced with
    every loop unrolled (compute.for_cost_analysis), so neither CPU chunking (compute.CPU_SCORE_CHUNK_BYTES)
    nor the scanned CLIP blocks (clip.scan_layers) hide FLOPs."""
    import jax
    import jax.numpy as jnp

    from dcp_jax.configs import tiny
    from dcp_jax.models import build, compute, dcp

    config = tiny.get_config()
    text = jnp.asarray(measure.random_text(12, dcp.num_templates(config), 32))
    config.clip.scan_layers = "false"
    monkeypatch.setattr(compute, "CPU_SCORE_CHUNK_BYTES", 1 << 62)
    jax.clear_caches()
    (one, _), (two, _) = measure.Bench(config, build.create_model(config), mode="whole").stages(text, 8)
    plain = measure.compiled_stats(one)[0], measure.compiled_stats(two)[0]  # no loop in either program
    config.clip.scan_layers = "true"
    runner = measure.Bench(config, build.create_model(config), mode="whole")
    monkeypatch.setattr(compute, "CPU_SCORE_CHUNK_BYTES", 1)  # every attention call in chunks
    jax.clear_caches()
    stages = runner.stages(text, 8)
    # what the analysis alone would say
    assert all(measure.compiled_stats(stages[i][0])[0] < 0.99 * plain[i] for i in (0, 1))
    assert runner.gflops(text, 8, stages) == pytest.approx(plain, rel=1e-9)
    assert not compute.unroll_scans()
    assert compute.CPU_SCORE_CHUNK_BYTES == 1  # restored


def test_accelerator_check_runs_every_case_with_the_tiny_config(tmp_path):
    """`--suite accelerator` on CPU with configs/tiny.py for both models: every case runs, in one
    subprocess on one device as a user would start it (the README promises under 3 minutes here)."""
    import os
    import subprocess
    import sys
    import time

    from dcp_jax import accelerator

    tiny = os.path.join("configs", "tiny.py")
    env = dict(os.environ, XLA_FLAGS=xla_flags(1))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dcp_jax.bench", "--suite", "accelerator", "--config", tiny,
                           "--large-config", tiny, "--runs", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "accelerator.json").read_text())
    rows = {r["case"]: r for r in report["rows"]}
    assert len(rows) == len(accelerator.CASES) - 1  # the two slide cases share the name "tiny slide ..."
    assert report["header"]["peak_bf16_tflops"] is None and "no MFU" in proc.stdout
    for r in report["rows"]:
        assert r["compile_s"] > 0 and r["step_ms"] > 0 and r["gflops"] > 0 and r["plan_gib"] > 0, r
        assert 0 < r["host_ms"] <= r["step_ms"], r  # the call returns before (or when) its results are ready
        assert r["mfu"] is None and abs(r["tflops_per_s"] - r["gflops"] / r["step_ms"]) < 1e-9
    b4, b16 = rows["tiny train K=32 batch 4 bf16"], rows["tiny train K=32 batch 16 bf16"]
    assert b16["gflops"] == pytest.approx(4 * b4["gflops"], rel=0.05)  # FLOPs scale with the batch
    assert rows["tiny train K=32 batch 4 f32"]["gflops"] == pytest.approx(b4["gflops"], rel=0.05)
    assert b16["images_per_s"] == pytest.approx(16 / (b16["step_ms"] / 1e3))
    print(f"accelerator check with the tiny config: {seconds:.0f} s")


def test_memory_plan_counts_the_step_it_was_given(tmp_path, capsys):
    """The ahead-of-time plan (`--suite plan`) on the 4 CPU devices: its argument bytes are the train state,
    this device's share of the batch and the text embeddings, counted here from the real objects; a
    larger batch plans more, FSDP plans less state per device."""
    import jax
    from flax import nnx

    from dcp_jax import accelerator, optim
    from dcp_jax.configs import tiny
    from dcp_jax.models import build, dcp

    code = bench.main(["--suite", "plan", "--config", "configs/tiny.py", "--config.train.batch_size=4",
                       "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    (plan,) = json.loads((tmp_path / "plan.json").read_text())["rows"]
    assert "| this machine: 4 x cpu | 1 | 8 | float32 | none |" in (tmp_path / "plan.md").read_text()

    config = tiny.get_config()
    model = build.create_model(config)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state((model, optim.make_optimizer(config, model)))))
    crop = config.train.crop_size
    batch_bytes = crop * crop * 3 + crop * crop * 4  # one uint8 image and its int32 labels per device
    text_bytes = 171 * dcp.num_templates(config) * model.clip_dim * 4
    assert plan["argument"] * measure.GIB == pytest.approx(state_bytes + batch_bytes + text_bytes, rel=1e-6)

    config.train.batch_size = 8
    bigger = accelerator.memory_plan(config, jax.devices())
    assert bigger["argument"] * measure.GIB == pytest.approx(plan["argument"] * measure.GIB + batch_bytes, rel=1e-6)
    assert bigger["temp"] > 1.5 * plan["temp"]
    config.train.batch_size, config.mesh.fsdp, config.mesh.min_shard_size = 4, 4, 0
    sharded = accelerator.memory_plan(config, jax.devices())
    assert sharded["argument"] < 0.5 * plan["argument"]
    with pytest.raises(ValueError, match="does not divide over the 4 devices"):
        config.train.batch_size = 6
        accelerator.memory_plan(config, jax.devices())
    with pytest.raises(ValueError, match="unknown slice; known: v4-8"):
        accelerator.tpu_slice_devices("v9-8")


def test_device_peaks_are_named():
    from dcp_jax import accelerator

    assert accelerator.device_peak_tflops("NVIDIA H200") == accelerator.device_peak_tflops("NVIDIA H100 80GB HBM3")
    assert accelerator.device_peak_tflops("TPU v5 lite") == 197.0
    assert accelerator.device_peak_tflops("NVIDIA L4") == 121.0 and accelerator.device_peak_tflops("NVIDIA L40S") == 362.0
    assert accelerator.device_peak_tflops("cpu") is None


def test_launch_script_installs_carried_wheels_aside_and_runs_the_check(tmp_path):
    """launch/accelerator_check.sh: wheels from a folder go to a private --target folder (found through
    PYTHONPATH, not installed into the environment), then the check runs and writes its table."""
    import os
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "dcp_probe-1.0-py3-none-any.whl", "w") as whl:  # a minimal pure wheel
        whl.writestr("dcp_probe/__init__.py", "CARRIED = True\n")
        whl.writestr("dcp_probe-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: dcp-probe\nVersion: 1.0\n")
        whl.writestr("dcp_probe-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                     "Tag: py3-none-any\n")
        whl.writestr("dcp_probe-1.0.dist-info/RECORD", "")
    # python3 on PATH is this interpreter; the probe import proves the script's PYTHONPATH reaches the wheels
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    sitecustomize = tmp_path / "hook"
    sitecustomize.mkdir()
    probes = tmp_path / "probes.txt"  # a line per interpreter started once the script set PYTHONPATH
    (sitecustomize / "sitecustomize.py").write_text(
        "import os\nif 'dcp_jax_site' in os.environ.get('PYTHONPATH', ''):\n"
        "    try:\n        import dcp_probe\n        found = 'carried' if dcp_probe.CARRIED else 'wrong'\n"
        "    except ImportError:\n        found = 'missing'\n"
        f"    open({str(probes)!r}, 'a').write(found + '\\n')\n")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(sitecustomize),
               XLA_FLAGS=xla_flags(1))
    tiny = str(repo / "configs" / "tiny.py")
    proc = subprocess.run([str(repo / "launch" / "accelerator_check.sh"), str(wheels), str(tmp_path / "out"),
                           "--config", tiny, "--large-config", tiny, "--runs", "1", "--only", "slide"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    table = (tmp_path / "out" / "accelerator.md").read_text()
    assert "| tiny slide inference 16 classes |" in table and table in (tmp_path / "out" / "log.txt").read_text()
    assert probes.read_text().split() == ["carried", "carried"]  # the jax line and the bench
    check = subprocess.run([sys.executable, "-c", "import dcp_probe"], capture_output=True, env=dict(os.environ))
    assert check.returncode != 0  # nothing was installed into the environment itself


def _perfetto_steps(perfetto, name, programs):
    """The step numbers of the StepTraceAnnotation events called `name` in a Perfetto file, and whether the
    trace holds a call of each jitted program named in `programs`."""
    import gzip
    with gzip.open(perfetto) as f:
        events = json.load(f)["traceEvents"]
    steps = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == name and e.get("ph") == "X")
    return steps, all(any(p in e.get("name", "") for e in events) for p in programs)


def test_bench_profile_writes_one_trace_per_row(tmp_path, capsys):
    """--profile: a folder per row with TensorBoard's xplane.pb and Perfetto's file, each holding the runs asked
    for; the rows' numbers are measured as without it."""
    code = bench.main(["--config", "configs/tiny.py", "--vocab-sizes", "40", "--thetas", "0,0.5", "--runs", "1",
                       "--selected", "5", "--config.eval.num_slots=64", "--out", str(tmp_path / "out"),
                       "--profile", str(tmp_path / "trace"), "--profile-steps", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    folders = sorted(p.name for p in (tmp_path / "trace").iterdir())
    assert folders == ["00_C40_theta0_K40", "01_C40_theta0.5_K8"]
    for row, folder in zip(rows, folders):
        (perfetto,) = (tmp_path / "trace" / folder).glob("plugins/profile/*/perfetto_trace.json.gz")
        assert row["profile"] == str(perfetto) and list(perfetto.parent.glob("*.xplane.pb"))
        assert _perfetto_steps(perfetto, "forward", ("encode_select", "decode")) == ([0, 1], True)
        assert row["latency_s"] > 0
    assert "2 trace(s)" in err and "tensorboard --logdir" in err and "ui.perfetto.dev" in err


def test_accelerator_case_profile_traces_its_step(tmp_path, capsys):
    """--suite accelerator --profile, one case (the tiny slide-mode inference, the cheapest: a training case takes
    seconds a step here): its folder, named after the case, holds the runs asked for."""
    tiny = "configs/tiny.py"
    code = bench.main(["--suite", "accelerator", "--config", tiny, "--large-config", tiny, "--only", "B/16 slide",
                       "--runs", "1", "--out", str(tmp_path / "out"), "--profile", str(tmp_path / "trace"),
                       "--profile-steps", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    (row,) = json.loads((tmp_path / "out" / "accelerator.json").read_text())["rows"]
    folder = tmp_path / "trace" / "00_tiny_slide_inference_16_classes"
    (perfetto,) = folder.glob("plugins/profile/*/perfetto_trace.json.gz")
    assert row["profile"] == str(perfetto) and row["step_ms"] > 0
    assert _perfetto_steps(perfetto, "forward", ("encode_select", "decode")) == ([0, 1], True)
    assert "1 trace(s) of 2 steps per case" in err


@pytest.mark.parametrize("extra, message", [
    (["--suite", "plan"], "--suite plan compiles ahead of time and runs nothing to trace"),
    (["--profile-steps", "0"], "trace at least 1 run"),
])
def test_bench_profile_errors_are_one_line(tmp_path, capsys, extra, message):
    code = bench.main(["--config", "configs/tiny.py", "--out", str(tmp_path / "out"), "--profile",
                       str(tmp_path / "trace"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "trace").exists()


def test_bench_profile_folder_that_is_a_file_is_refused(tmp_path, capsys):
    file = tmp_path / "trace"
    file.write_text("")
    code = bench.main(["--config", "configs/tiny.py", "--out", str(tmp_path / "out"), "--profile", str(file)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "is a file; give a directory" in err, err
