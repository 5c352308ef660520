from __future__ import annotations

from pathlib import Path

import pytest

from reshuffle.config import (
    ConfigError,
    ConfigWarning,
    RunConfig,
    ShuffleConfig,
    dataset_entry,
    dump_yaml,
    load_run_config,
    load_system_config,
    planner_settings,
    system_config_path,
)
from reshuffle.config.loading import load_yaml_text, parse_overrides

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
RUN_CONFIGS = sorted(p for p in CONFIGS.glob("*.yaml") if p.name != "system.yaml")


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_run_config_loads(path):
    config = load_run_config(path)
    assert isinstance(config, RunConfig)
    assert load_run_config(None, _as_overrides(load_yaml_text(dump_yaml(config)))) == config


def _as_overrides(mapping, prefix=""):
    items = []
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            items += _as_overrides(value, f"{prefix}{key}.")
        else:
            items.append(f"{prefix}{key}={_yaml_scalar(value)}")
    return items


def _yaml_scalar(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        import json

        return json.dumps(value)
    return str(value)


def test_the_shipped_system_config_loads():
    system = load_system_config(CONFIGS / "system.yaml")
    assert dataset_entry(system, "imagenette").loader == "imagefolder"
    assert dataset_entry(system, "fashion-mnist").path == "/usr/share/datasets/fashion-mnist"


def test_smoke_config_is_small_synthetic_and_two_epochs():
    config = load_run_config(CONFIGS / "smoke.yaml")
    assert (config.data.name, config.train.epochs, config.model.name) == ("synthetic", 2, "small-cnn")


def test_contract_override_keys():
    overrides = [
        "name=grid-1",
        "seed=3",
        "data.name=fashion-mnist",
        "shuffle.strategy=partial",
        "shuffle.fraction=0.25",
        "shuffle.partition=label-sorted",
        "shuffle.mode=store",
        "shuffle.store_dir=/tmp/stores",
        "train.epochs=7",
        "train.batch_size=128",
        "log.dir=/tmp/runs",
    ]
    config = load_run_config(CONFIGS / "smoke.yaml", overrides)
    assert config.name == "grid-1" and config.seed == 3 and config.data.name == "fashion-mnist"
    assert (config.shuffle.strategy, config.shuffle.fraction, config.shuffle.partition) == (
        "partial",
        0.25,
        "label-sorted",
    )
    assert (config.shuffle.mode, config.shuffle.store_dir) == ("store", "/tmp/stores")
    assert (config.train.epochs, config.train.batch_size, config.log.dir) == (7, 128, "/tmp/runs")


def test_scientific_notation_is_a_float_in_files_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: {lr: 1e-3, optimizer_kwargs: {weight_decay: 5e-4}}\n")
    config = load_run_config(path, ["train.label_smoothing=1e-1"])
    assert config.train.lr == 0.001 and config.train.optimizer_kwargs == {"weight_decay": 0.0005}
    assert config.train.label_smoothing == 0.1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.epoch=3"], r"unknown config key 'train.epoch'; did you mean 'train.epochs'\?"),
        (["shufle.strategy=local"], r"unknown config key 'shufle'; did you mean 'shuffle'\?"),
        (["train.epochs=three"], "train.epochs must be an integer, got 'three'"),
        (["train.epochs=2.5"], "train.epochs must be an integer, got 2.5"),
        (["train.compile=maybe"], "train.compile must be true or false, got 'maybe'"),
        (
            ["model.norm=layer"],
            "model.norm must be one of 'batch' | 'sync-batch' | 'group' | 'none', got 'layer'",
        ),
        (["shuffle.mode=disk"], "shuffle.mode must be one of 'index' | 'store'"),
        (["data.synthetic.shape=[1, 28]"], r"data.synthetic.shape must be a list of 3 items"),
        (
            ["shuffle.strategy=sorted"],
            "shuffle: unknown strategy 'sorted'; choose one of: corgipile, global, importance, local, "
            "partial",
        ),
        (["shuffle.partition=by-color"], "shuffle: unknown partition 'by-color'"),
        (["shuffle.fraction=2"], r"shuffle: fraction must be in \[0, 1\] .*got 2.0"),
        (["shuffle.strategy=partial", "shuffle.select=best"], "shuffle.select must be one of"),
        (
            ["shuffle.strategy=importance", "shuffle.fraction=0", "shuffle.warmup_epochs=0"],
            "shuffle: importance: warmup_epochs must be an integer >= 1",
        ),
        (["train.batch_size=0"], "train.batch_size must be at least 1, got 0"),
        (["train.lr=-1"], "train.lr must not be negative"),
        (["dist.timeout_s=0"], "dist.timeout_s must be positive"),
        (["name=a/b"], "name must be a plain directory name"),
        (["train"], r"override 'train' must look like section.key=value"),
        (["train.=3"], "must look like section.key=value"),
        (["train=3"], "train must be a mapping, got 3"),
    ],
)
def test_bad_config_names_the_key_and_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(CONFIGS / "smoke.yaml", overrides)


@pytest.mark.parametrize(
    ("overrides", "key", "users"),
    [
        (["shuffle.strategy=local", "shuffle.fraction=0.1"], "fraction", "shuffle.strategy=partial"),
        (["shuffle.strategy=global", "shuffle.select=importance"], "select", "shuffle.strategy=partial"),
        (["shuffle.strategy=partial", "shuffle.measure=variance"], "measure", "shuffle.strategy=importance"),
    ],
)
def test_a_key_the_strategy_ignores_is_a_warning_and_goes_back_to_its_default(overrides, key, users):
    with pytest.warns(ConfigWarning) as caught:
        config = load_run_config(CONFIGS / "smoke.yaml", overrides)
    (warning,) = [w for w in caught if f"shuffle.{key}=" in str(w.message)]
    assert users in str(warning.message)
    assert getattr(config.shuffle, key) == getattr(ShuffleConfig(), key)  # config.yaml records what ran


def test_each_strategy_option_is_a_shuffle_key_and_reaches_the_planner():
    from reshuffle.plan import STRATEGIES

    for name, strategy in STRATEGIES.items():
        shuffle = ShuffleConfig(strategy=name, fraction=0.25)
        settings = planner_settings(shuffle)
        assert set(settings) == {"strategy", *strategy.option_defaults} | (
            {"fraction"} if strategy.uses_fraction else set()
        )
        for key, default in strategy.option_defaults.items():
            assert getattr(ShuffleConfig(), key) == default, f"shuffle.{key}'s default differs from {name}'s"


def test_missing_and_malformed_files_name_the_path(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope.yaml not found"):
        load_run_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml is not valid YAML"):
        load_run_config(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml must hold a mapping"):
        load_run_config(listing)


def test_system_config_is_found_by_flag_then_environment(tmp_path, monkeypatch):
    path = tmp_path / "system.yaml"
    path.write_text("master_port: 1234\ndatasets: {mine: {loader: imagefolder, path: /data/mine}}\n")
    monkeypatch.setenv("RESHUFFLE_SYSTEM", str(path))
    assert system_config_path() == path
    system = load_system_config()
    assert system.master_port == 1234
    assert dataset_entry(system, "mine").path == "/data/mine"
    assert dataset_entry(system, "cifar10").loader == "cifar10"  # built-ins remain
    with pytest.raises(ConfigError, match="unknown dataset 'imagenet'; known: cifar10, digits"):
        dataset_entry(system, "imagenet")
    path.write_text("datasets: {mine: {loader: imagefolder, pth: /x}}\n")
    with pytest.raises(
        ConfigError, match=r"unknown config key 'datasets.mine.pth'; did you mean 'datasets.mine.path'"
    ):
        load_system_config()


def test_only_true_and_false_are_booleans():
    assert load_yaml_text("a: off\nb: yes\nc: true\nd: False") == {
        "a": "off",
        "b": "yes",
        "c": True,
        "d": False,
    }
    assert load_run_config(None, ["train.amp=off", "log.wandb=off"]).train.amp == "off"


def test_parse_overrides_nests_keys():
    assert parse_overrides(["a.b.c=1", "a.d=x", "e=[1, 2]"]) == {"a": {"b": {"c": 1}, "d": "x"}, "e": [1, 2]}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["shuffle.level=node", "dist.virtual_ranks=8"], "shuffle.level=node needs the ranks per node"),
        (["shuffle.level=node", "dist.virtual_ranks=8", "dist.ranks_per_node=3"], "divide the ranks"),
        (["shuffle.level=node", "shuffle.strategy=corgipile"], "keeps its own training order"),
        (["shuffle.level=nodes"], "shuffle.level"),
    ],
)
def test_node_level_settings_are_checked_when_the_config_loads(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(CONFIGS / "smoke.yaml", overrides)
    fine = ["shuffle.level=node", "dist.virtual_ranks=8", "dist.ranks_per_node=4"]
    assert load_run_config(CONFIGS / "smoke.yaml", fine).shuffle.level == "node"
