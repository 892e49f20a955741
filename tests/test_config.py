import pytest

from config import DEFAULTS, ConfigError, load_config, parse_override


def test_defaults_resolve_and_are_frozen():
    config = load_config()
    assert config.train.epochs == DEFAULTS["train"]["epochs"]
    with pytest.raises(AttributeError):
        config.train.epochs = 3


def test_required_keys_exist():
    config = load_config()
    for key in ["data.root", "data.format", "data.image_size", "model.backbone", "model.embedding_dim",
                "train.epochs", "train.loss", "train.miner", "train.margin", "train.lr", "train.seed",
                "train.precision", "output.dir", "wandb.mode"]:
        section, name = key.split(".")
        assert hasattr(getattr(config, section), name), key


def test_overrides_are_parsed_to_the_default_type():
    config = load_config(None, ["train.epochs=3", "train.lr=1e-4", "data.root=/data/sop", "train.margin=1",
                                "eval.recall_ks=[1,5]", "model.backbone=tiny"])
    assert config.train.epochs == 3 and isinstance(config.train.epochs, int)
    assert config.train.lr == pytest.approx(1e-4)
    assert config.train.margin == 1.0 and isinstance(config.train.margin, float)
    assert config.data.root == "/data/sop"
    assert config.eval.recall_ks == [1, 5]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 0.001\n")
    config = load_config(path, ["train.epochs=2"])
    assert config.train.epochs == 2
    assert config.train.lr == pytest.approx(0.001)
    assert config.to_dict()["train"]["epochs"] == 2


@pytest.mark.parametrize("override, words", [
    ("train.epoch=3", ["train.epoch", "train.epochs"]),
    ("nosuch.key=1", ["nosuch.key"]),
    ("train.epochs=three", ["train.epochs", "int"]),
    ("train.epochs=2.5", ["train.epochs", "int"]),
    ("train.lr=fast", ["train.lr", "float"]),
    ("train.lr=0", ["train.lr", "positive"]),
    ("train.miner=hardest", ["train.miner", "batchhard"]),
    ("data.images_per_class=1", ["data.images_per_class"]),
    ("train.epochs", ["train.epochs", "key=value"]),
])
def test_bad_overrides_are_one_line_errors_naming_the_key(override, words):
    with pytest.raises(ConfigError) as raised:
        load_config(None, [override])
    message = str(raised.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unknown_key_in_yaml_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochz: 7\n")
    with pytest.raises(ConfigError, match="train.epochz"):
        load_config(path)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=") == ("a.b", "")
    assert parse_override("a.b=x=y") == ("a.b", "x=y")


def test_mapping_keys_from_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  loss: multi_similarity\n  loss_params: {alpha: 2, beta: 50}\n")
    config = load_config(path, ["train.loss_params.beta=40", "train.miner_params={epsilon: 0.2}"])
    assert dict(config.train.loss_params) == {"alpha": 2, "beta": 40}
    assert dict(config.train.miner_params) == {"epsilon": 0.2}
    assert config.is_explicit("train.loss_params") and config.is_explicit("train.miner_params")
    assert config.to_dict()["train"]["loss_params"] == {"alpha": 2, "beta": 40}
    with pytest.raises(TypeError):
        config.train.loss_params["alpha"] = 3  # frozen like the rest
    assert dict(load_config(path, ["train.loss_params={}"]).train.loss_params) == {}


@pytest.mark.parametrize("override, named", [
    ("train.loss_params=3", "expects a mapping"),
    ("train.loss_params.alpha=[1,2]", "train.loss_params.alpha"),
    ("train.loss_params.alpha=.nan", "finite"),
    ("train.margin.alpha=1", "unknown config key 'train.margin.alpha'"),
])
def test_bad_mapping_values_are_one_line_errors(override, named):
    with pytest.raises(ConfigError, match=None) as error:
        load_config(None, [override])
    assert named in str(error.value) and "\n" not in str(error.value)
