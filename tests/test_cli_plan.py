from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reshuffle.cli import main
from reshuffle.config import ConfigError


def table_rows(text: str) -> list[list[str]]:
    lines = text.strip().splitlines()
    rule = next(i for i, line in enumerate(lines) if set(line.replace(" ", "")) == {"-"})
    return [line.split() for line in lines[rule + 1 :]]


def test_plan_prints_one_row_per_epoch_with_expectations(capsys):
    assert (
        main(
            [
                "plan",
                "--num-samples",
                "8000",
                "--world-size",
                "4",
                "--strategy",
                "partial",
                "--fraction",
                "0.25",
                "--epochs",
                "4",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "N=8000 M=4 strategy=partial fraction=0.25" in out
    rows = table_rows(out)
    assert [row[0] for row in rows] == ["0", "1", "2", "3"]
    assert rows[0][1] == "-" and all(row[1] == row[2] == "0.25" for row in rows[1:])  # churn = expected = Q


def test_plan_with_labels_from_a_dataset(capsys):
    assert (
        main(
            [
                "plan",
                "--labels-from",
                "digits",
                "--world-size",
                "10",
                "--strategy",
                "local",
                "--partition",
                "label-sorted",
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "N=1437 M=10" in out
    rows = table_rows(out)
    assert float(rows[0][5]) > 0.7  # label-sorted local: far from the dataset's label mix


def test_plan_errors_are_one_line_with_exit_status_2(capsys):
    assert main(["plan", "--num-samples", "3", "--world-size", "4"]) == 2
    assert "num_samples (3) is smaller than world_size (4)" in capsys.readouterr().err
    assert main(["plan", "--world-size", "4"]) == 2
    assert "give --num-samples N, or --labels-from DATASET" in capsys.readouterr().err
    assert main(["plan", "--world-size", "2", "--labels-from", "no-such-set"]) == 2
    assert "unknown dataset 'no-such-set'" in capsys.readouterr().err


def test_console_script_is_installed():
    script = shutil.which("reshuffle", path=str(Path(sys.executable).parent))
    assert script is not None
    result = subprocess.run(
        [script, "plan", "--num-samples", "100", "--world-size", "2", "--epochs", "2"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "strategy=global" in result.stdout
    help_text = subprocess.run(
        [script, "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "plan" in help_text


@pytest.mark.parametrize("flag", ["--strategy=sorted", "--partition=by-color"])
def test_plan_rejects_unknown_choices(flag):
    with pytest.raises(SystemExit):
        main(["plan", "--num-samples", "10", "--world-size", "2", flag])


def test_partial_without_a_fraction_follows_one_rule_everywhere(capsys, tmp_path):
    """compare: `partial` alone takes the config's shuffle.fraction (it ran with 0.0), and an error
    when that is 0; plan and simulate: an error naming the spelling. A key=value word after
    --strategies is an override for every run, not an unknown strategy."""
    from reshuffle.commands.compare import compare_runs

    config = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")  # fraction: 0.1
    runs = compare_runs(config, [f"log.dir={tmp_path}"], ["partial", "global", "train.epochs=1"], 1)
    assert [(r.config.shuffle.strategy, r.config.shuffle.fraction) for r in runs] == [
        ("partial", 0.1), ("global", 0.0)
    ]  # fmt: skip
    assert all(r.config.train.epochs == 1 for r in runs)
    with pytest.raises(ConfigError, match=r"'partial' needs a fraction: write partial:Q"):
        compare_runs(config, [f"log.dir={tmp_path}", "shuffle.fraction=0"], ["partial"], 1)
    assert main(["plan", "--num-samples", "100", "--world-size", "4", "--strategy", "partial"]) == 2
    assert "--strategy partial needs --fraction Q" in capsys.readouterr().err
    assert main(["simulate", "--workers", "8", "--strategies", "partial"]) == 2
    assert "needs a fraction, e.g. partial:0.1" in capsys.readouterr().err


def test_plan_help_and_errors_name_the_cli_flags(capsys):
    """plan --help keeps its example's line continuation; a label partition without labels asks
    for --labels-from (not the API's labels=); a simulate error carries its prefix once."""
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "--fraction 0.1 \\\n        --partition label-sorted" in capsys.readouterr().out
    assert main(["plan", "--num-samples", "100", "--world-size", "4", "--partition", "label-sorted"]) == 2
    assert "--partition label-sorted needs labels: add --labels-from DATASET" in capsys.readouterr().err
    assert main(["simulate", "--workers", "8", "--strategies", "partial:2"]) == 2
    assert capsys.readouterr().err.count("--strategies:") == 1


def test_plan_shows_what_each_node_holds_and_what_crosses_nodes(capsys):
    """Per-node table: a rank-level local plan on label-sorted partitions moves nothing and its
    nodes keep their skew; a node-level partial plan moves Q of each node's samples across nodes
    and re-deals within the node, so a rank's churn is about 1 - (1 - Q) / R."""
    common = ["plan", "--num-samples", "4000", "--world-size", "8", "--ranks-per-node", "4", "--epochs", "3"]
    assert main([*common, "--strategy", "local"]) == 0
    out = capsys.readouterr().out
    nodes = table_rows(out.split("per node (2 nodes of 4 ranks):")[1])
    assert [row[-1] for row in nodes] == ["0", "0", "0"]
    assert main([*common, "--strategy", "partial", "--fraction", "0.2", "--level", "node"]) == 0
    out = capsys.readouterr().out
    ranks, nodes = out.split("per node (2 nodes of 4 ranks):")
    assert [float(row[-1]) for row in table_rows(nodes)] == [0.2, 0.2, 0.2]
    assert [row[1] for row in table_rows(nodes)] == ["-", "0.2", "0.2"]
    churn = float(table_rows(ranks)[1][1])
    assert churn == pytest.approx(1 - 0.8 / 4, abs=0.03) and float(table_rows(ranks)[1][2]) == 0.8
    assert main(["plan", "--num-samples", "100", "--world-size", "4", "--level", "node"]) == 2
    assert "--level node needs --ranks-per-node R" in capsys.readouterr().err


def test_the_cli_and_the_planner_do_not_import_torch():
    """``reshuffle --help``, ``plan`` and ``simulate`` start in a fraction of a second: torch (about
    1.5 s to import) is imported by the commands that train or read stores, when they run."""
    probe = (
        "import sys, contextlib, io\n"
        "from reshuffle.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['plan', '--num-samples', '1000', '--world-size', '4', '--strategy', 'partial',"
        " '--fraction', '0.1']) == 0\n"
        "    assert main(['simulate', '--preset', 'imagenet', '--workers', '16',"
        " '--strategies', 'local']) == 0\n"
        "    for command in ('run', 'compare', 'report', 'slurm', 'verify'):\n"
        "        try:\n"
        "            main([command, '--help'])\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'matplotlib')))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
