"""`python -m dcp_jax.models.summary` on the real recipes: counts worked out by hand, and the paper's Table II beside them."""

import re

from dcp_jax.models import summary


def _count(out: str, module: str) -> tuple[int, int]:
    total, learnable = re.search(rf"^{re.escape(module)}\s+([\d,]+)\s+([\d,]+)$", out, re.M).groups()
    return int(total.replace(",", "")), int(learnable.replace(",", ""))


def test_l14_recipe_counts_by_hand_and_the_table_ii_comparison(capsys):
    assert summary.main(["--config", "configs/dcp_vitl14_coco_stuff.py", "--config.clip.text_finetune=guidance"]) == 0
    out = capsys.readouterr().out
    # q/v projection weights, no biases (CAT-Seg): 24 image blocks of width 1024, 12 text blocks of width 768
    assert _count(out, "clip/vision_model")[1] == 24 * 2 * 1024 * 1024
    assert _count(out, "clip/text_model")[1] == 12 * 2 * 768 * 768
    # CA at CLIP's joint width D = 768 (Eqs. 8-11): q, k, v, out projections, two LayerNorms, a 4x MLP
    d = 768
    assert _count(out, "alignment/cross_block") == (4 * (d * d + d) + 2 * 2 * d + (d * 4 * d + 4 * d + 4 * d * d + d),) * 2
    total, learnable = _count(out, "TOTAL")
    table = out[out.index("Against the paper's Table II"):]
    diff = lambda ours, paper: re.escape(f"{(ours - paper) / 1e6:+.2f}")  # noqa: E731
    assert re.search(rf"^total\s+{total / 1e6:.2f}\s+443\.60\s+{diff(total, 443.6e6)}$", table, re.M)
    assert re.search(rf"^learnable\s+{learnable / 1e6:.2f}\s+80\.30\s+{diff(learnable, 80.3e6)}$", table, re.M)
    head = learnable - 24 * 2 * 1024 * 1024 - 12 * 2 * 768 * 768
    assert re.search(rf"of which the head\s+{head / 1e6:.2f}\s+{(80.3e6 - learnable + head) / 1e6:.2f}", table)
