"""`python -m dcp_jax.ablate`: what each table trains, the seed statistics and the tables it prints
(hand-worked numbers), and its flags' errors. The tables themselves are a command (docs/ablations.md)."""

import pytest

from dcp_jax import ablate
from dcp_jax import config as config_lib


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


def _row(label, variant, per_seed, *, tv=True, versus=None, paper=None):
    return {"label": label, "variant": variant, "tv": tv, "versus": versus, "paper": paper,
            **ablate.summarise(per_seed)}


def test_tables_print_mean_std_the_difference_with_its_standard_error_and_the_papers_numbers():
    full = [_scores(50.0), _scores(52.0)]
    report = {"seeds": 2, "seconds": 125.0, "train_seconds": {"DCP-CLIP, seed 0": 60.0, "DCP-CLIP, seed 1": 60.0},
              "tables": {
                  "removal": {"title": "Parts removed", "rows": [
                      _row("DCP-CLIP", "DCP-CLIP", full, paper=[12.3, 32.4]),
                      _row("w/o SED", "w/o SED", [_scores(45.0), _scores(46.0)], versus="DCP-CLIP"),
                      _row("w/o TV", "DCP-CLIP", [_scores(50.0), _scores(51.0)], tv=False, versus="DCP-CLIP"),
                      _row("zero-shot CLIP", "zero-shot CLIP",
                           [{**_scores(30.0), "selected_mean": None, "tv_relabelled": None}], tv=False,
                           versus="DCP-CLIP")]},
                  "7": {"title": "Table VII", "rows": [
                      {**_row("0.5", "DCP-CLIP", full, paper=[12.3, 32.4]), "train_memory_gib": 0.25,
                       "train_step_s": 0.1234}]}},
              "theta_sweep": {0.5: {**_scores(51.0), "head_gflops": 0.82}}}
    text = ablate.format_markdown(report)
    assert "(2 seeds, mean ± standard deviation)" in text
    # full: 51 +- 1.414; w/o SED: 45.5 +- 0.707 -> difference -5.5, SE sqrt(2/2 + 0.5/2) = 1.118: 4.9 SE
    assert ("| DCP-CLIP | 51.0 ± 1.4 | 52.0 ± 1.4 | 50.0 ± 1.4 | 50.5 ± 1.4 |  |  |  | 8.0 ± 0.0 | 2.0 ± 0.0 "
            "| 12.3 / 32.4 |") in text
    assert "| w/o SED | 45.5 ± 0.7 | 46.5 ± 0.7 | 44.5 ± 0.7 | 45.0 ± 0.7 | DCP-CLIP | -5.5 ± 1.1 * | -5.5 ± 1.1 * |" in text
    # w/o TV: 50.5 +- 0.707, -0.5 against the same SE 1.118: within the noise, no mark
    assert "| w/o TV | 50.5 ± 0.7 | 51.5 ± 0.7 | 49.5 ± 0.7 | 50.0 ± 0.7 | DCP-CLIP | -0.5 ± 1.1 | -0.5 ± 1.1 |" in text
    # one value: no spread, and its difference's SE comes from the other row alone (sqrt(2/2) = 1.0)
    assert "| zero-shot CLIP | 30.0 | 31.0 | 29.0 | 29.5 | DCP-CLIP | -21.0 ± 1.0 * |" in text
    assert "| 0.5 | 51.0 ± 1.4 |" in text and "| 12.3 / 32.4 | 0.25 | 0.123 |" in text
    assert "| 0.5 | 51.0 | 52.0 | 50.0 | 50.5 | 8.0 | 0.82 |" in text
    assert "The command took 2 min (2 training runs)." in text


def test_one_seed_prints_differences_without_a_standard_error():
    assert ablate.difference(ablate.summarise([_scores(50.0)]), ablate.summarise([_scores(47.5)])) == (2.5, None)


def test_table_3_trains_the_papers_additive_rows_and_scores_all_but_the_last_without_tag_validation():
    rows, variants = ablate.plan(["3"], (), 0.5)
    (title, table), = rows.values()
    assert list(variants) == ["DCP-CLIP", "fine-tuned CLIP", "DCS only", "w/o SED", "w/o TGA"]
    assert [r.tv for r in table] == [False] * 5 + [True]  # TV is the last part added
    # the baseline: no selection (theta 0, a slot per class), no attention branches, no Swin blocks
    assert variants["fine-tuned CLIP"] == {**ablate.NO_DCS, **ablate.NO_TGA, **ablate.NO_SED}
    assert variants["DCS only"] == {**ablate.NO_TGA, **ablate.NO_SED}
    labels = {r.label for r in table}
    assert all(r.versus in labels for r in table if r.versus)


def test_a_variant_shared_by_tables_trains_once_and_table_7_trains_the_papers_thetas():
    rows, variants = ablate.plan(ablate.parse_tables("all"), ablate.PAPER_THETAS, 0.5)
    assert len(variants) == len(set(variants)) == 18
    theta_rows = rows["7"][1]
    assert [(r.label, r.variant) for r in theta_rows] == [
        ("0", "w/o DCS"), ("0.2", "theta 0.2"), ("0.5", "DCP-CLIP"), ("0.8", "theta 0.8"), ("0.9", "theta 0.9")]
    assert variants["theta 0.2"] == {"model.dcs.theta": 0.2}
    assert {ablate.slug(v) for v in variants} >= {"no_cls_logit_and_prompt", "shallow_plus_cost_fusion",
                                                   "theta_0_2", "dcp_clip"}
    assert len({ablate.slug(v) for v in variants}) == 18  # one directory each


def test_every_variant_is_a_valid_change_of_the_demo_recipe():
    """Each variant's keys exist in configs/demo.py (a typo would raise) and change what they say."""
    from dcp_jax.configs import demo
    recipe = demo.get_config()
    _, variants = ablate.plan(ablate.parse_tables("all"), ablate.PAPER_THETAS, float(recipe.model.dcs.theta))
    for name, overrides in variants.items():
        config = ablate._variant(recipe, overrides)
        for key, value in overrides.items():
            node = config
            for part in key.split("."):
                node = node[part]
            assert node == value, (name, key)
        config_lib.check_ranges(config)
        config_lib.check_finetune_rows(config)
    with pytest.raises(KeyError):  # a misspelt key is an error, not a silent no-op
        ablate._variant(recipe, {"model.tga.cross_atention": False})


def test_table_names_are_checked_before_any_work(tmp_path, capsys):
    assert ablate.parse_tables("3, 4,3") == ["3", "4"] and ablate.parse_tables("all") == list(ablate.TABLE_KEYS)
    for argv, message in [(["--tables", "3,8"], "--tables '3,8': expected some of removal, 3, 4, 5, 6, 7"),
                          (["--table", "3", "--tables", "4"], "--table and --tables: give one"),
                          (["--quick", "--seeds", "3"], "--quick is one seed: drop --seeds 3 or --quick"),
                          (["--train-thetas", "0,1.5"], "--train-thetas '0,1.5': expected comma-separated numbers")]:
        assert ablate.main(["--out", str(tmp_path / "out"), *argv]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_bad_seed_count_is_a_clear_error(tmp_path, capsys):
    code = ablate.main(["--out", str(tmp_path), "--seeds", "0"])
    assert code == 2 and "--seeds 0: at least 1" in capsys.readouterr().err
