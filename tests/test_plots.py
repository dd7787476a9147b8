"""server/plots.py: the one plot style of report.md and the audit's --plot.

Each figure is checked through matplotlib's own objects (axis limits, lines, legend entries),
then written to a PNG that must be a real image.
"""
import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from server import plots  # noqa: E402


def _ledger(hospitals, rounds, epsilon, budget=lambda i: 3.0):
    return [{"hospital": f"hospital-{i}", "round": n, "epsilon": epsilon(i, n), "max_epsilon": budget(i),
             "delta": 1e-5} for n in range(1, rounds + 1) for i in hospitals]


def _labels(axis):
    legend = axis.get_legend()
    return [text.get_text() for text in legend.get_texts()] if legend else []


def _budget_lines(axis):
    return sorted(line.get_ydata()[0] for line in axis.get_lines() if line.get_label().startswith("budget"))


def test_distinct_hospitals_get_their_own_colour_marker_and_line_style_and_a_sorted_legend(tmp_path):
    # Arrival order 10, 2, 0, 1: the legend sorts naturally (hospital-2 before hospital-10).
    records = _ledger([10, 2, 0, 1], 6, lambda i, n: (0.2 + 0.1 * i) * n, budget=lambda i: 8.0 if i < 10 else 10.0)
    figure = plots.epsilon_figure(records)
    axis = figure.axes[0]
    assert _labels(axis) == ["hospital-0", "hospital-1", "hospital-2", "hospital-10", "budget 8", "budget 10"]
    lines = [line for line in axis.get_lines() if line.get_label().startswith("hospital")]
    assert len({(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines}) == 4
    assert len({line.get_marker() for line in lines}) == 4 and len({line.get_linestyle() for line in lines}) == 4
    assert axis.get_ylim()[0] == 0 and axis.get_ylim()[1] > 10  # from 0, the highest budget in view
    assert _budget_lines(axis) == [8.0, 10.0]
    assert axis.get_xlim()[0] == 0
    path = plots.save(figure, tmp_path / "epsilon.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_coinciding_hospitals_are_one_line_with_their_band_and_named_extremes():
    # Planned noise: every hospital ends at its budget, within a few thousandths.
    records = _ledger(range(5), 20, lambda i, n: 0.15 * n - 0.001 * i)
    axis = plots.epsilon_figure(records).axes[0]
    hospital_lines = [line for line in axis.get_lines() if not line.get_label().startswith(("budget", "_"))]
    assert len(hospital_lines) == 1 and "5 hospitals (lines coincide within" in hospital_lines[0].get_label()
    assert "min-max band" in _labels(axis)
    notes = " ".join(text.get_text() for text in axis.texts)
    assert "highest hospital-0 3.000" in notes and "lowest hospital-4 2.996" in notes
    assert axis.get_ylim()[0] == 0 and _budget_lines(axis) == [3.0]


def test_fifty_hospitals_are_a_median_and_band_not_fifty_legend_entries():
    records = _ledger(range(50), 4, lambda i, n: (0.5 + 0.02 * i) * n)
    axis = plots.epsilon_figure(records).axes[0]
    assert _labels(axis) == ["median of 50 hospitals", "min-max band", "budget 3"]
    assert "highest hospital-49" in axis.texts[0].get_text() and "lowest hospital-0" in axis.texts[0].get_text()


def test_accuracy_starts_at_zero_with_the_chance_level():
    metrics = [{"round": n, "accuracy": 0.1 * n, "balanced_accuracy": 0.09 * n, "federated_accuracy": 0.08 * n,
                "classes": 10} for n in range(1, 6)]
    axis = plots.accuracy_figure(metrics).axes[0]
    assert axis.get_ylim() == (0, 1)
    chance = [line for line in axis.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and chance[0].get_ydata()[0] == pytest.approx(0.1)
    assert _labels(axis)[-1] == "chance level 1/10"
    assert len([line for line in axis.get_lines() if not line.get_label().startswith("chance")]) == 3


def test_hospital_bars_carry_their_value_and_n_and_the_chance_level():
    evaluation = {f"hospital-{i}": {"accuracy": 0.3 + 0.1 * i, "num-examples": 20 + i} for i in range(4)}
    axis = plots.hospital_accuracy_figure(evaluation, classes=2).axes[0]
    texts = sorted(text.get_text() for text in axis.texts)
    assert texts == ["0.300  (n=20)", "0.400  (n=21)", "0.500  (n=22)", "0.600  (n=23)"]
    assert axis.get_xlim()[0] == 0
    assert [line.get_xdata()[0] for line in axis.get_lines() if line.get_label().startswith("chance")] == [0.5]


def test_label_distribution_names_each_hospitals_n(tmp_path):
    counts = {"hospital-10": [1, 2], "hospital-2": [3, 4]}
    figure = plots.label_figure(counts, ["benign", "malignant"])
    axis = figure.axes[0]
    assert [t.get_text() for t in axis.get_yticklabels()] == ["hospital-2", "hospital-10"]
    assert sorted(text.get_text() for text in axis.texts) == [" n=3", " n=7"]
    assert plots.save(figure, tmp_path / "labels.png").stat().st_size > 3000


def test_plots_import_nothing_that_trains():
    """The audit may draw with it: no tensorflow, no training code, only matplotlib."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(plots.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "math", "re", "statistics", "pathlib", "matplotlib"}, imported


def test_an_infinite_or_unreadable_epsilon_leaves_a_gap_not_a_crash(tmp_path):
    """The audit draws recomputed figures: zero noise is inf, an unrecomputable one None."""
    records = _ledger([0, 1], 4, lambda i, n: 0.5 * n + i)
    records[2]["epsilon"] = float("inf")
    records[3]["epsilon"] = None
    records.append({"hospital": "hospital-0", "round": "5", "epsilon": 9.0, "max_epsilon": 3.0, "delta": 1e-5})
    figure = plots.epsilon_figure(records, ylabel="cumulative epsilon (PLD, recomputed)")
    axis = figure.axes[0]
    assert axis.get_ylabel() == "cumulative epsilon (PLD, recomputed)"
    assert 3.0 < axis.get_ylim()[1] < 9.0  # the string round is left out; inf does not stretch the axis
    assert plots.save(figure, tmp_path / "epsilon.png").stat().st_size > 3000


def test_identical_hospitals_are_said_to_be_identical():
    axis = plots.epsilon_figure(_ledger([0, 1], 2, lambda i, n: 2.5 * n)).axes[0]
    assert "2 hospitals (identical)" in _labels(axis)
    assert axis.texts[0].get_text() == "round 2: all 2 hospitals at 5.000"
