"""The summary table shared by the demo reports (tools/demo.py dice_table): one row per method in
the results' order, per-class and mean Dice in %, the cross-domain column only where asked, and the
oracle row only when the VAE report has one."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import demo as D  # noqa: E402


def _result(per_class, cross=None):
    r = {"in_domain": {"protocol": {"test_classes": list(per_class)}, "per_class": per_class,
                       "mean_dice": sum(per_class.values()) / len(per_class)}}
    if cross is not None:
        r["cross_domain"] = {"mean_dice": cross}
    return r


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_dice_table_with_cross_domain_and_oracle():
    results = {"sdfsmis": _result({"liver": 0.8, "spleen": 0.5}, cross=0.4),
               "support-copy": _result({"liver": 0.7, "spleen": 0.6}, cross=0.61)}
    oracle = {"dice": {"liver": 0.95}, "mean_dice": 0.9}
    rows = D.dice_table(results, oracle, "oracle (x)", cross_domain=True)
    assert _cells(rows[0]) == ["method", "in-domain liver", "in-domain spleen", "in-domain mean", "cross-domain mean"]
    assert all(len(_cells(r)) == 5 for r in rows)
    assert _cells(rows[2]) == ["sdfsmis", "80.00", "50.00", "65.00", "40.00"]
    assert _cells(rows[3]) == ["support-copy", "70.00", "60.00", "65.00", "61.00"]
    assert _cells(rows[4]) == ["oracle (x)", "95.00", "–", "90.00", "–"]


def test_dice_table_in_domain_only_without_oracle():
    results = {"sdfsmis": _result({"LV": 0.25, "MYO": 0.5, "RV": 0.75}),
               "support-copy": _result({"LV": 0.1, "MYO": 0.2, "RV": 0.3})}
    rows = D.dice_table(results, {}, "oracle", cross_domain=False)
    assert len(rows) == 4
    assert _cells(rows[0]) == ["method", "LV", "MYO", "RV", "mean"]
    assert all(len(_cells(r)) == 5 for r in rows)
    assert _cells(rows[2]) == ["sdfsmis", "25.00", "50.00", "75.00", "50.00"]
