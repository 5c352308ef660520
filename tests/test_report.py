"""compare and report: runs per strategy and seed, plots, the summary table, named errors."""

from __future__ import annotations

from pathlib import Path

from reshuffle.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = [
    "data.synthetic.num_samples=256", "data.synthetic.test_samples=64", "train.batch_size=16",
    "train.epochs=2", "model.width=8", "log.every_steps=0",
]  # fmt: skip
PLOTS = ["test_acc.png", "train_loss.png", "label_js.png", "churn.png", "coverage.png", "bytes.png",
         "frontier.png", "time_breakdown.png"]  # fmt: skip


def test_compare_runs_every_strategy_and_seed_then_reports(tmp_path, capsys):
    arguments = [
        "compare", str(CONFIGS / "smoke.yaml"), "--strategies", "global", "partial:0.25",
        "local+model.norm=group", "--seeds", "2", "--virtual-ranks", "2", f"log.dir={tmp_path}",
        "name=cmp", "shuffle.partition=label-sorted", *TINY,
    ]  # fmt: skip
    assert main(arguments) == 0
    out = capsys.readouterr().out
    runs = sorted(p.name for p in (tmp_path / "cmp" / "runs").iterdir())
    assert runs == [
        f"{s}-seed{k}" for s in ("global", "local_model.norm-group", "partial-0.25") for k in (0, 1)
    ]
    report = tmp_path / "cmp" / "report"
    for plot in PLOTS:
        assert (report / plot).stat().st_size > 10_000, plot
    text = (report / "report.md").read_text()
    assert all(f"]({plot})" in text for plot in PLOTS)
    for label in ("global", "partial 0.25", "local, norm=group"):
        assert f"| {label}" in text and label in out
    assert "vs global (pp)" in text and "+0.00" in text  # global against itself
    assert "report: " in out
    # a second compare skips the finished runs and writes the same report
    assert main(arguments) == 0
    assert capsys.readouterr().out.count("finished earlier, skipped") == 6
    # `reshuffle report` on the compare folder stands for all its runs and writes to its report/
    table = (report / "summary.md").read_text()
    (report / "summary.md").unlink()
    assert main(["report", str(tmp_path / "cmp")]) == 0
    assert f"report: {report / 'report.md'}" in capsys.readouterr().out
    assert sorted((report / "summary.md").read_text().splitlines()) == sorted(table.splitlines())


def test_report_names_a_missing_or_malformed_metrics_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err
    bad = tmp_path / "bad"
    (bad / "metrics").mkdir(parents=True)
    (bad / "config.yaml").write_text("name: bad\nseed: 0\n")
    (bad / "metrics" / "epochs.csv").write_text("epoch,loss\n0,1.0\n")
    assert main(["report", str(bad)]) == 2
    assert "lacks the column(s) train_loss, test_acc, epoch_s" in capsys.readouterr().err
    (bad / "metrics" / "epochs.csv").write_text("epoch,train_loss,test_acc,epoch_s\n0,1.0,zero,2\n")
    assert main(["report", str(bad)]) == 2
    assert "epochs.csv line 2" in capsys.readouterr().err


def test_compare_rejects_a_bad_strategy_spec_before_training(tmp_path, capsys):
    assert (
        main(["compare", str(CONFIGS / "smoke.yaml"), "--strategies", "local+norm", f"log.dir={tmp_path}"])
        == 2
    )
    assert "'norm' in 'local+norm' is not key=value" in capsys.readouterr().err
    assert (
        main(["compare", str(CONFIGS / "smoke.yaml"), "--strategies", "sorted", f"log.dir={tmp_path}"]) == 2
    )
    assert "unknown strategy 'sorted'" in capsys.readouterr().err
    assert not (tmp_path / "smoke").exists()


def test_moved_per_rank_and_epoch_counts_only_the_epoch_boundaries(tmp_path):
    """Nothing moves after the last epoch: the summary's moved MB/rank/epoch averages the
    boundaries only (global with 2 ranks moves half a rank's samples: 4.4 MB shown where 8.8 MB
    moved per boundary), and a 1-epoch run, with no boundary, shows '-'."""
    from reshuffle.report import Group, Run, summary_rows

    def run(moved: list[float]) -> Run:
        rows = [{"epoch": e, "world_size": 2, "bytes_planned": b, "test_acc": 0.5, "epoch_s": 1.0,
                 "storage_bytes": 1e6} for e, b in enumerate(moved)]  # fmt: skip
        return Run(tmp_path, {"shuffle.strategy": "global"}, rows)

    headers, rows = summary_rows([Group("global", [run([17.6e6, 17.6e6, 0.0])]), Group("one", [run([0.0])])])
    moved = headers.index("moved MB/rank/epoch")
    assert rows[0][moved] == 8.8 and rows[1][moved] == "-"


def _run(path: Path, config: dict, epochs: int = 2, acc: float = 0.5):
    from reshuffle.report import Run

    rows = [{"epoch": e, "world_size": 2, "bytes_planned": 4e6 if e < epochs - 1 else 0.0, "test_acc": acc,
             "epoch_s": 1.0, "storage_bytes": 1e6} for e in range(epochs)]  # fmt: skip
    return Run(path, {"train.epochs": epochs, **config}, rows)


def test_labels_name_only_the_settings_that_differ_and_matter(tmp_path):
    """A setting that applies to none of the differing runs (data.synthetic.* where data.name is
    not synthetic, shuffle.fraction under local) or that does not change what a run learns
    (log.*, train.workers) stays out of the labels; the rest go by their last name."""
    from reshuffle.report import label_runs

    real = {"data.name": "fashion-mnist", "train.workers": 0, "log.dir": "a"}
    runs = [
        _run(tmp_path / "a", {**real, "shuffle.strategy": "global", "data.synthetic.noise": 0.1}),
        _run(
            tmp_path / "b",
            {
                **real,
                "shuffle.strategy": "local",
                "shuffle.fraction": 0.3,
                "data.synthetic.noise": 0.5,
                "train.workers": 4,
                "log.dir": "b",
            },
        ),
        _run(
            tmp_path / "c", {**real, "shuffle.strategy": "partial", "shuffle.fraction": 0.1, "train.lr": 0.2}
        ),
    ]
    assert label_runs(runs) == ["global, lr=None", "local, lr=None", "partial 0.1, lr=0.2"]
    runs[0].config.update({"data.name": "synthetic"})  # now the noise of that one run applies
    assert label_runs(runs)[0] == "global, data=synthetic, lr=None"


def test_a_report_over_several_experiments_labels_by_experiment_and_lists_their_settings(tmp_path):
    """Runs of different configs (many settings differ): each label is the strategy, the
    experiment's name and what differs inside it, short enough for a legend; report.md lists each
    experiment's differing settings; vs global compares within an experiment only."""
    from reshuffle.report import differences, group_runs, label_runs, summary_rows

    def experiment(name: str, extra: dict) -> list:
        base = {"train.lr": 0.1 * len(name), "train.batch_size": 8 * len(name), "train.epochs": len(name),
                "model.width": len(name), "data.train_limit": 100 * len(name), **extra}  # fmt: skip
        return [
            _run(tmp_path / name / "runs" / f"{s}-seed0", {**base, "shuffle.strategy": s}, len(name), acc)
            for s, acc in (("global", 0.6 + len(name) / 100), ("local", 0.5))
        ]

    runs = experiment("two", {}) + experiment("fives", {"model.norm": "group"})
    labels = label_runs(runs)
    assert labels == ["global, two", "local, two", "global, fives", "local, fives"], labels
    assert all(len(label) < 40 for label in labels)
    assert any("train.batch_size=40" in line for line in differences(runs))
    headers, rows = summary_rows(group_runs(runs))
    versus = headers.index("vs global (pp)")
    assert [row[versus] for row in rows] == ["+0.00", "-13.00", "+0.00", "-15.00"]


def test_the_bytes_plot_has_no_point_after_the_last_epoch(tmp_path):
    """Nothing moves after a run's last epoch: bytes.png shows the boundaries only, not a 0."""
    from reshuffle.report import Group
    from reshuffle.report.figures import moved_points

    assert moved_points(Group("g", [_run(tmp_path, {}, epochs=3)])) == [(0, 2.0), (1, 2.0)]
    assert moved_points(Group("g", [_run(tmp_path, {}, epochs=1)])) == []


def test_the_frontier_keeps_the_groups_nothing_beats_in_cost_and_accuracy():
    from reshuffle.report.figures import pareto

    points = [(0.0, 0.50), (0.0, 0.60), (0.1, 0.55), (0.3, 0.80), (1.0, 0.79), (2.0, 0.85)]
    assert pareto(points) == [(0.0, 0.60), (0.3, 0.80), (2.0, 0.85)]
    assert pareto([]) == []


def test_the_frontier_counts_data_sent_to_other_ranks_when_nothing_crossed_nodes(tmp_path):
    """4 ranks on one host send nothing across nodes: the frontier's x axis is then what each
    rank sent (before, every run sat at x = 0 on a symmetric-log axis with negative ticks)."""
    from reshuffle.report import Group
    from reshuffle.report.figures import frontier_basis

    def group(name, planned, across):
        run = _run(tmp_path / name, {})
        for row in run.epochs:
            row["bytes_across_nodes"] = across
        run.epochs[0]["bytes_planned"] = planned
        return Group(name, [run])

    column, points = frontier_basis([group("global", 8e6, 0.0), group("local", 0.0, 0.0)])
    assert column == "bytes_planned" and [(i, m) for i, m, _ in points] == [(0, 4.0), (1, 0.0)]
    column, points = frontier_basis([group("global", 8e6, 2e6), group("local", 0.0, 0.0)])
    assert column == "bytes_across_nodes" and [(i, m) for i, m, _ in points] == [(0, 1.0), (1, 0.0)]
