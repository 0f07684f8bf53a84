"""Config merging: defaults -> file -> overrides, a closed schema, the merged file saved."""

import pytest
import yaml
from omegaconf import OmegaConf

from lvd.curate.config import ConfigError, iter_keys, load_config, packaged_config_path, save_config


def _commented_keys(path):
    """Dotted keys of a YAML file that have a comment line right above them."""
    lines = path.read_text().splitlines()
    found, stack = set(), []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped or stripped.startswith("-"):
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        key = stripped.split(":", 1)[0]
        dotted = ".".join([k for _, k in stack] + [key])
        if i > 0 and lines[i - 1].strip().startswith("#"):
            found.add(dotted)
        stack.append((indent, key))
    return found


def test_every_default_key_is_commented():
    path = packaged_config_path("default")
    commented = _commented_keys(path)
    data = yaml.safe_load(path.read_text())

    def walk(node, prefix=""):
        for key, value in node.items():
            dotted = prefix + key
            yield dotted
            if isinstance(value, dict):
                yield from walk(value, dotted + ".")

    missing = [k for k in walk(data) if k not in commented]
    assert not missing, f"keys without a comment line above them: {missing}"


@pytest.mark.parametrize("name", ["demo", "demo_photos", "lvd142m"])
def test_packaged_configs_load_and_stay_inside_the_schema(name):
    cfg = load_config(name)
    assert set(iter_keys(cfg)) >= {"run_dir", "embed.model", "dedup.k", "retrieve.n"}


def test_merge_order_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("run_dir: from_file\nembed:\n  batch_size: 7\ndedup:\n  k: 9\n")
    cfg = load_config(path, ["dedup.k=11", "sources.seeds.birds=/data/birds"])
    assert cfg.run_dir == "from_file"
    assert cfg.embed.batch_size == 7  # from the file
    assert cfg.dedup.k == 11  # override wins
    assert cfg.embed.model == yaml.safe_load(packaged_config_path("default").read_text())["embed"]["model"]
    assert cfg.sources.seeds.birds == "/data/birds"  # set names are the user's


def test_unknown_key_in_a_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("embed:\n  batchsize: 7\n")
    with pytest.raises(ConfigError, match="embed.batchsize"):
        load_config(path)


def test_unknown_key_in_an_override_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="retrieve.nn"):
        load_config(None, ["retrieve.nn=3"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["retrieve.n"])


def test_interpolation_follows_overridden_run_dir():
    cfg = load_config("demo", ["run_dir=/somewhere"])
    assert cfg.sources.pool == ["/somewhere/data/pool"]


def test_merged_config_is_saved_and_reloads_equal(tmp_path):
    cfg = load_config("demo", [f"run_dir={tmp_path}", "cluster.k=3"])
    saved = save_config(cfg, tmp_path)
    assert saved == tmp_path / "config.yaml"
    again = load_config(saved)
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("dedup.threshold=abc", "dedup.threshold must be auto or a number, got 'abc'"),
        ("cluster.k=-5", "cluster.k must be >= 1, got -5"),
        (
            "embed.model=dinov2_vitz14",
            "embed.model must be auto (the architecture the weights file records) or a registry model",
        ),
        ("dedup.k=0", "dedup.k must be >= 1, got 0"),
        ("retrieve.floor_quantile=1.5", "retrieve.floor_quantile must be within [0.0, 1.0]"),
        ("dedup.keep=largest", "dedup.keep must be one of ['quality', 'pixels']"),
        ("shards.quality=0", "shards.quality must be within [1, 100]"),
        ("embed.copy_detection.space=clip", "embed.copy_detection.space must be null or one of ['sscd']"),
    ],
)
def test_bad_values_are_rejected_when_the_config_is_loaded(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_an_override_can_empty_a_mapping_or_a_list():
    cfg = load_config("demo", ["run_dir=/r", "sources.seeds={}", "sources.pool=[]"])
    assert dict(cfg.sources.seeds) == {} and list(cfg.sources.pool) == []
    assert dict(cfg.sources.eval) == {"fmnist_test": "/r/data/eval/fmnist_test"}  # the rest stays
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(None, ["no_such_section={}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.epochs=0", "optim.epochs must be >= 1, got 0"),
        ("mode=dino3", "mode must be one of ['dino', 'dinov2', 'distill']"),
        ("model.arch=vit_huge", "model.arch must name a registry model"),
        ("crops.global_scale=[0.9,0.2]", "crops.global_scale must be [low, high] within [0.0, 1.0]"),
        ("train.parallel=zero3", "train.parallel must be one of ['ddp', 'fsdp']"),
        ("model.drop_path_uniform=2", "model.drop_path_uniform must be true or false"),
    ],
)
def test_bad_training_values_are_rejected_by_both_loaders(override, message):
    from lvd.pretrain.train.config import load_config as load_training_config

    with pytest.raises(ConfigError) as direct:
        load_training_config(overrides=[override])
    with pytest.raises(ConfigError) as through_the_cli_loader:
        load_config(None, [override], defaults="pretrain")
    assert message in str(direct.value) and message in str(through_the_cli_loader.value)
