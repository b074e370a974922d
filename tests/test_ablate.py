"""`python -m dcp_jax.ablate`: the seed statistics and the tables it prints (hand-worked numbers)."""

import pytest

from dcp_jax import ablate


def _scores(miou, selected=8.0, relabelled=2):
    return {"mIoU": miou, "mIoU_seen": miou + 1, "mIoU_unseen": miou - 1, "hIoU": miou - 0.5,
            "selected_mean": selected, "tv_relabelled": relabelled, "buckets": {"8": 3}}


def test_rows_report_the_mean_and_sample_standard_deviation_over_seeds():
    row = ablate.summarise([_scores(50.0), _scores(52.0), _scores(57.0)])
    assert row["mean"]["mIoU"] == pytest.approx(53.0)
    assert row["std"]["mIoU"] == pytest.approx(((3 ** 2 + 1 ** 2 + 4 ** 2) / 2) ** 0.5)  # sample std, n - 1 = 2
    assert row["mean"]["selected_mean"] == 8.0 and row["std"]["tv_relabelled"] == 0.0
    single = ablate.summarise([_scores(50.0)])
    assert single["std"]["mIoU"] == 0.0
    missing = ablate.summarise([{**_scores(50.0), "hIoU": None}])
    assert missing["mean"]["hIoU"] is None


def test_tables_print_mean_plus_minus_std_and_the_trained_theta_rows():
    rows = {"DCP-CLIP": ablate.summarise([_scores(50.0), _scores(52.0)]),
            "zero-shot CLIP": ablate.summarise([{**_scores(30.0), "selected_mean": None, "tv_relabelled": None}])}
    report = {"seeds": 2, "rows": rows,
              "trained_thetas": {0.5: {"row": "DCP-CLIP", **rows["DCP-CLIP"], "train_memory_gib": 0.25,
                                       "train_step_s": 0.1234}},
              "theta_sweep": {0.5: {**_scores(51.0), "head_gflops": 0.82}}}
    text = ablate.format_markdown(report)
    assert "(2 seeds, mean ± standard deviation)" in text
    assert "| DCP-CLIP | 51.0 ± 1.4 | 52.0 ± 1.4 | 50.0 ± 1.4 | 50.5 ± 1.4 | 8.0 ± 0.0 | 2.0 ± 0.0 |" in text
    assert "| zero-shot CLIP | 30.0 | 31.0 | 29.0 | 29.5 | - | - |" in text  # one value: no spread to print
    assert "| 0.5 | DCP-CLIP | 51.0 ± 1.4 |" in text and "| 0.25 | 0.123 |" in text
    assert "| 0.5 | 51.0 | 52.0 | 50.0 | 50.5 | 8.0 | 0.82 |" in text


def test_bad_seed_count_is_a_clear_error(tmp_path, capsys):
    code = ablate.main(["--out", str(tmp_path), "--seeds", "0"])
    assert code == 2 and "--seeds 0: at least 1" in capsys.readouterr().err
