"""Config loading: TOML + overrides onto typed sections; errors name the key and what is allowed."""
from pathlib import Path

import pytest

from trainer.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_shipped_configs_load(name):
    from balancing import make_balancer
    from models.config import MODEL_KINDS

    cfg = load_config(CONFIGS / name)
    assert cfg.data.global_batch_size > 0
    assert cfg.model.kind in MODEL_KINDS
    make_balancer(cfg.balance.method, 2, **cfg.balance.options)  # its options are valid


def test_values_and_overrides(tmp_path):
    path = write(tmp_path, '[model]\nkind = "shared_bottom"\n[train]\nsteps = 7\n')
    cfg = load_config(path, ["train.dense_lr=0.01", "balance.method=multibalance", "model.tower_layers=[8, 4]",
                             "balance.options.beta=0.5"])
    assert cfg.model.kind == "shared_bottom"
    assert cfg.train.steps == 7
    assert cfg.train.dense_lr == 0.01
    assert cfg.balance.method == "multibalance"
    assert cfg.model.tower_layers == [8, 4]
    assert cfg.balance.options == {"beta": 0.5}


def test_int_accepted_for_float(tmp_path):
    assert load_config(write(tmp_path, "[train]\ndense_lr = 1\n")).train.dense_lr == 1.0


@pytest.mark.parametrize(
    "text, message",
    [
        ('[model]\nkind = "dlrm"\n', "config key 'model.kind': 'dlrm' is not allowed; expected one of 'mmoe', 'shared_bottom'"),
        ("[model]\nnum_expert = 3\n", "unknown config key 'model.num_expert' in section 'model'; allowed keys: kind,"),
        ("[trian]\nsteps = 3\n", "unknown config key 'trian' in the top level; allowed keys: data, model,"),
        ('[train]\nsteps = "ten"\n', "config key 'train.steps': 'ten' is not allowed; expected a int"),
        ("[train]\nsteps = -1\n", "config key 'train.steps': -1 is not allowed; expected an integer >= 0"),
        ("[train]\ndense_lr = 0\n", "config key 'train.dense_lr': 0.0 is not allowed; expected a number > 0"),
        ('[train]\nembedding_optimizer = "adam"\n', "expected one of 'sgd', 'adagrad', 'rowwise_adagrad'"),
        ('[sharding]\ntype = "data_parallel"\n', "config key 'sharding.type': 'data_parallel' is not allowed"),
        ("[model]\ntower_layers = []\n", "config key 'model.tower_layers': [] is not allowed"),
        ("[data]\nshuffle = 1\n", "config key 'data.shuffle': 1 is not allowed; expected a bool"),
        ("model = 3\n", "config key 'model' must be a table"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert message in str(err.value)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[model\n"))


def test_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="not of the form section.key=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        load_config(None, ["train.stepz=3"])


@pytest.mark.parametrize("override, key", [
    ("train.epochs=inf", "train.epochs"),
    ("train.dense_lr=inf", "train.dense_lr"),
    ("train.embedding_lr=nan", "train.embedding_lr"),
    ("balance.options.beta=-inf", "balance.options.beta"),
    ("balance.options.weights=[1.0, nan]", "balance.options.weights[1]"),
])
def test_non_finite_numbers_are_refused_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"config key '{key}':" in str(err.value) and "expected a finite number" in str(err.value)


def test_process_group_is_not_a_user_option():
    with pytest.raises(ConfigError, match="config key 'balance.options.process_group' is not allowed"):
        load_config(None, ['balance.options.process_group="x"'])
